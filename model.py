"""
A Qwen3 decoder-only language model whose feed-forward block is SwiGLU or DGFN, in one file.

The architecture, with the parameter names of Hugging Face's Qwen3ForCausalLM, so that a
SwiGLU state_dict loads there unchanged:
- embed_tokens: token embedding, no scaling and no position embedding;
- num_hidden_layers pre-norm decoder layers, each
      h = h + self_attn(input_layernorm(h))
      h = h + mlp(post_attention_layernorm(h))
  where self_attn is causal grouped-query attention: q_proj, k_proj, v_proj, an RMSNorm over
  head_dim of every query and key head (q_norm, k_norm) before rotary position embedding
  (RoPE, rotate-half), softmax attention, o_proj. No biases and no dropout anywhere;
- norm, a final RMSNorm, then lm_head, tied to embed_tokens by default.

The feed-forward block (mlp) sees x, the normed hidden state; I is intermediate_size.
- swiglu, the Qwen3 baseline:  y = down_proj(silu(gate_proj x) * up_proj x)
- dgfn, the Dynamic Gating Feedforward Network:
      P      = PolyReLU(poly_proj x)    polynomial pathway: a0 + a1 u + a2 u^2 + a3 u^3, u = relu(poly_proj x)
      M      = f_mem(mem_proj x)        memory pathway: rows of mem_proj are keys matched against x
      lambda = sigmoid(w_g . x + b_g)   dynamic gate, one value per token
      y      = down_proj(lambda P + (1 - lambda) M)
  Both blocks hold three I x d matrices, so at equal I they differ by the d + 1 gate
  parameters and the four PolyReLU coefficients of each layer.

Sources: transformers' models/qwen3/modeling_qwen3.py (Qwen3), arXiv 2411.03884 (PolyReLU),
arXiv 2012.14913 (feed-forward layers as key-value memories), and "Dynamic Gating Feedforward
Networks: Analysis of Combining Polynomial Activations with Key-Value Memory Patterns" (DGFN).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

FFN_CHOICES = ("swiglu", "dgfn")
MEMORY_CHOICES = ("relu", "softmax")

# Dense bf16 tensor-core peaks from NVIDIA's datasheets, matched against torch.cuda.get_device_name
# in this order (so "H100 PCIe" is found before "H100"). Unknown devices get no MFU at all.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


@dataclass
class ModelConfig:
    vocab_size: int = 50304  # GPT-2's 50257 ids padded to a multiple of 64 for faster matmuls
    hidden_size: int = 640
    intermediate_size: int = 1728  # feed-forward width I
    num_hidden_layers: int = 11
    num_attention_heads: int = 10
    num_key_value_heads: int = 5
    head_dim: int = 64
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0  # the Qwen3Config default; released Qwen3 models use 1e6 for long context
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    ffn: str = "swiglu"  # "swiglu" or "dgfn"
    # Memory read-out f_mem. "relu" (default) is the unnormalised key-value memory that a plain
    # feed-forward layer already is. "softmax" normalises over the I slots like a memory network, so at
    # init it spreads near-uniform weight over all slots, and it costs an extra reduction per token.
    dgfn_memory: str = "relu"
    dgfn_gate: str | float = "dynamic"  # "dynamic" (learned gate) or a fixed lambda in [0, 1]
    tokenizer_vocab_size: int = 50257  # ids from here up to vocab_size are padding, never sampled

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "tokenizer_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid {name}={getattr(self, name)}: it must be a positive integer")
        if self.tokenizer_vocab_size > self.vocab_size:
            raise ValueError(f"invalid vocab_size={self.vocab_size}: it must be at least "
                             f"tokenizer_vocab_size={self.tokenizer_vocab_size}, the number of token ids")
        if self.ffn not in FFN_CHOICES:
            raise ValueError(f"invalid ffn {self.ffn!r}: valid values are {', '.join(FFN_CHOICES)}")
        if self.dgfn_memory not in MEMORY_CHOICES:
            raise ValueError(f"invalid dgfn_memory {self.dgfn_memory!r}: valid values are {', '.join(MEMORY_CHOICES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotate-half RoPE")
        self.fixed_gate()  # raises on an invalid dgfn_gate

    def fixed_gate(self):
        """Return the fixed DGFN gate value lambda, or None for the learned gate."""
        if self.dgfn_gate == "dynamic":
            return None
        try:
            value = float(self.dgfn_gate)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"invalid dgfn_gate {self.dgfn_gate!r}: use 'dynamic' or a number in [0, 1]")
        return value


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in float32 and cast back before the gain, exactly as Qwen3 does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with cos/sin tables that stay float32 whatever the model's dtype."""

    def __init__(self, head_dim, max_positions, theta):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build_tables(device=None)

    def _build_tables(self, device):
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)  # (hd/2,)
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        angles = torch.outer(positions, inv_freq)  # (T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, hd): dimension j pairs with j + hd/2
        self.cos, self.sin = angles.cos(), angles.sin()

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the tables; rebuild them in float32 on the new device.
        super()._apply(fn, recurse)
        self._build_tables(self.cos.device)
        return self

    def forward(self, x, offset):
        """Rotate x of shape (B, heads, T, hd) holding positions offset .. offset + T - 1."""
        cos = self.cos[offset : offset + x.size(-2)]
        sin = self.sin[offset : offset + x.size(-2)]
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of one attention layer for the positions seen so far, preallocated."""

    def __init__(self, max_positions):
        self.max_positions = max_positions
        self.length = 0
        self.k = self.v = None

    def update(self, k, v):
        """Append k and v of shape (B, KV, T, hd) and return the keys and values of every position so far."""
        if self.k is None:
            B, KV, _, hd = k.shape
            self.k = k.new_empty(B, KV, self.max_positions, hd)
            self.v = v.new_empty(B, KV, self.max_positions, hd)
        start, self.length = self.length, self.length + k.size(2)
        self.k[:, :, start : self.length] = k
        self.v[:, :, start : self.length] = v
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class Qwen3Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)  # one gain of size hd shared by all heads
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, rotary_emb, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)

        offset = kv_cache.length if kv_cache is not None else 0
        q = rotary_emb(q, offset).to(v.dtype)
        k = rotary_emb(k, offset).to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)

        # Query head h reads key/value head h // (H / KV): enable_gqa groups contiguous query heads.
        gqa = self.num_heads != self.num_kv_heads
        if q.size(2) == k.size(2):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # Queries at the end of a longer cached sequence: query i sees keys up to offset + i.
            # is_causal=True would align the triangle to the first key instead.
            mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril(k.size(2) - q.size(2))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H * hd)
        return self.o_proj(y)


class Qwen3MLP(nn.Module):
    """SwiGLU feed-forward block of Qwen3."""

    def __init__(self, config):
        super().__init__()
        d, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, I, bias=False)
        self.up_proj = nn.Linear(d, I, bias=False)
        self.down_proj = nn.Linear(I, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PolyReLU(nn.Module):
    """a0 + a1 u + a2 u^2 + a3 u^3 with u = relu(x) and learnable scalar coefficients (order 3)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), 1 / 3))  # a1, a2, a3
        self.bias = nn.Parameter(torch.zeros(()))  # a0

    def forward(self, x):
        # float32 math keeps the cubic term precise in bf16 runs; torch.compile fuses it into one kernel.
        u = F.relu(x.float())
        a1, a2, a3 = self.weight.float()
        return (self.bias.float() + u * (a1 + u * (a2 + u * a3))).to(x.dtype)


class DGFN(nn.Module):
    """Dynamic Gating Feedforward Network: a gated mix of a PolyReLU and a key-value memory pathway."""

    def __init__(self, config):
        super().__init__()
        d, I = config.hidden_size, config.intermediate_size
        self.memory = config.dgfn_memory
        self.fixed_gate = config.fixed_gate()
        # A gate fixed at 0 or 1 switches one pathway off entirely, so its projection is not built.
        if self.fixed_gate != 0.0:
            self.poly_proj = nn.Linear(d, I, bias=False)
            self.act_fn = PolyReLU()
        if self.fixed_gate != 1.0:
            self.mem_proj = nn.Linear(d, I, bias=False)
        self.down_proj = nn.Linear(I, d, bias=False)
        if self.fixed_gate is None:
            # Zero init puts lambda at exactly 0.5 for every token: both pathways start equal.
            self.gate_weight = nn.Parameter(torch.zeros(d))
            self.gate_bias = nn.Parameter(torch.zeros(()))
            self.register_buffer("gate_mean", torch.tensor(0.5), persistent=False)
        # A softmax over I slots is about 1/I per slot at init. Scaling by I gives a mean of 1 but an RMS
        # of 1.14 against the polynomial pathway's 0.33 (measured at the default config, d=640, I=1728,
        # N(0, 0.02^2) weights, 4096 random normed inputs); the further 1/4 brings it to 0.28.
        self.softmax_scale = I / 4

    def polynomial(self, x):
        return self.act_fn(self.poly_proj(x))

    def memory_read(self, x):
        scores = self.mem_proj(x)  # (B, T, I): how well x matches each key
        if self.memory == "relu":
            return F.relu(scores)  # unnormalised memory, as in a plain feed-forward layer
        return (F.softmax(scores.float(), dim=-1) * self.softmax_scale).to(scores.dtype)

    def forward(self, x):
        if self.fixed_gate == 1.0:
            return self.down_proj(self.polynomial(x))
        if self.fixed_gate == 0.0:
            return self.down_proj(self.memory_read(x))
        if self.fixed_gate is None:
            lam = torch.sigmoid(x @ self.gate_weight + self.gate_bias).unsqueeze(-1)  # (B, T, 1)
            with torch.no_grad():
                self.gate_mean.copy_(lam.mean())
        else:
            lam = self.fixed_gate
        # lerp(M, P, lambda) = lambda P + (1 - lambda) M, in one kernel rather than four.
        return self.down_proj(torch.lerp(self.memory_read(x), self.polynomial(x), lam))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen3MLP(config) if config.ffn == "swiglu" else DGFN(config)

    def forward(self, h, rotary_emb, kv_cache=None):
        h = h + self.self_attn(self.input_layernorm(h), rotary_emb, kv_cache)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h


class Qwen3Model(nn.Module):
    """The decoder stack without the LM head (Hugging Face's "model." prefix)."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)

    def forward(self, idx, kv_caches=None):
        h = self.embed_tokens(idx)  # (B, T, d)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.rotary_emb, kv_caches[i] if kv_caches is not None else None)
        return self.norm(h)


class Qwen3(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # Qwen3 initialises every matrix from N(0, 0.02^2) with no depth scaling; norms, PolyReLU and
        # the gate initialise themselves.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def forward(self, idx, targets=None, kv_caches=None):
        """Return logits (B, T, vocab_size) and the mean cross-entropy in nats (None without targets)."""
        offset = kv_caches[0].length if kv_caches is not None else 0
        if offset + idx.size(1) > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {offset + idx.size(1)} positions is longer than "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        logits = self.lm_head(self.model(idx, kv_caches))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def gate_means(self):
        """Return each layer's mean DGFN gate value from the last forward, or None without a learned gate."""
        if self.config.ffn != "dgfn" or self.config.fixed_gate() is not None:
            return None
        return [layer.mlp.gate_mean.item() for layer in self.model.layers]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """Build AdamW that decays matrices and embeddings only: never norm gains, PolyReLU or gate parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type in ("cuda", "cpu")  # the devices with a fused AdamW kernel in torch 2.13
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self, seq_len):
        """Estimate training FLOPs per token: 6N for the matmul weights plus 12 L H hd T for attention."""
        cfg = self.config
        n = sum(p.numel() for p in self.parameters() if p.dim() >= 2)
        if not cfg.tie_word_embeddings:
            n -= self.model.embed_tokens.weight.numel()  # an untied embedding is a lookup, not a matmul
        return 6 * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len

    def estimate_mfu(self, tokens_per_second, seq_len, device):
        """Return model FLOPs utilisation as a fraction of the device's bf16 peak, or None if the peak is unknown."""
        device = torch.device(device)
        if device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(device)
        peak = next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
        if peak is None:
            return None
        return self.flops_per_token(seq_len) * tokens_per_second / peak

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Yield (next_token (B, 1), logits (B, vocab_size)) for each new token after the prompt idx (B, T).

        Prompt plus continuation must fit max_position_embeddings, or a ValueError is raised before any
        work. The RoPE tables end there, and cropping the context would change what the model attends to.
        With use_cache, each step runs one position through the model; without it, the whole sequence.
        """
        B, T = idx.shape
        if T == 0:
            raise ValueError("the prompt is empty: pass at least one token, for example the EOT token")
        if T + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt of {T} tokens plus max_new_tokens={max_new_tokens} is longer than "
                             f"max_position_embeddings={self.config.max_position_embeddings}: "
                             "shorten the prompt or lower max_new_tokens")
        kv_caches = [KVCache(self.config.max_position_embeddings) for _ in self.model.layers] if use_cache else None
        tokens, step_input = idx, idx
        for _ in range(max_new_tokens):
            logits, _ = self(step_input if use_cache else tokens, kv_caches=kv_caches)
            logits = logits[:, -1, :].float()
            token = self._sample(logits, temperature, top_k, generator)
            yield token, logits
            tokens = torch.cat((tokens, token), dim=1)
            step_input = token

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Return idx (B, T) followed by max_new_tokens sampled tokens; temperature 0 is greedy."""
        new_tokens = [token for token, _ in self.stream(idx, max_new_tokens, temperature, top_k, use_cache, generator)]
        return torch.cat([idx, *new_tokens], dim=1)

    def _sample(self, logits, temperature, top_k, generator):
        logits = logits.clone()
        logits[:, self.config.tokenizer_vocab_size :] = float("-inf")  # padding ids are not tokens
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k:
            kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits[logits < kth_largest] = float("-inf")
        return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)

"""Tests of model.py on CPU: parity with transformers' Qwen3, KV cache, DGFN and training sanity."""

import math

import pytest
import torch
import transformers

from model import KVCache, ModelConfig, Qwen3, RMSNorm


def tiny_config(**overrides):
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                    tokenizer_vocab_size=120)
    settings.update(overrides)
    return ModelConfig(**settings)


def build(config, seed=0):
    torch.manual_seed(seed)
    return Qwen3(config)


def hf_model_from(model):
    """Build transformers' Qwen3ForCausalLM with our config and load our state_dict into it, strictly."""
    c = model.config
    hf_config = transformers.Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
    )
    hf = transformers.Qwen3ForCausalLM(hf_config)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


# --- parity with Hugging Face ---------------------------------------------------------------------------

PARITY_CONFIGS = {
    "gqa2_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa4_untied": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                        rope_theta=1e6, num_hidden_layers=3),
}


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_parity_with_transformers_qwen3(name):
    model = build(tiny_config(**PARITY_CONFIGS[name]))
    # Random gains so that a norm applied in the wrong place, or a swapped q_norm/k_norm, shows.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    hf = hf_model_from(model)
    idx = torch.randint(0, 120, (2, 48))
    targets = torch.randint(0, 120, (2, 48))

    logits, loss = model(idx, targets)
    hf_logits = hf(input_ids=idx).logits
    assert logits.shape == hf_logits.shape
    assert (logits - hf_logits).abs().max().item() < 1e-4
    hf_loss = torch.nn.functional.cross_entropy(hf_logits.flatten(0, 1), targets.flatten())
    assert abs(loss.item() - hf_loss.item()) < 1e-5


def test_rmsnorm_matches_transformers_in_bf16():
    # In bf16 the cast before the gain matters; in float32 the order is invisible.
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    ours, theirs = RMSNorm(64, 1e-6), Qwen3RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    x = torch.randn(8, 64, dtype=torch.bfloat16) * 3
    assert torch.equal(ours(x), theirs(x))


def test_state_dict_keys_match_transformers():
    model = build(tiny_config())
    hf = hf_model_from(model)
    assert set(model.state_dict()) == set(hf.state_dict())
    assert "model.layers.0.self_attn.q_norm.weight" in model.state_dict()
    assert "lm_head.weight" in model.state_dict()


# --- configuration and sizes ----------------------------------------------------------------------------

def test_default_parameter_counts():
    with torch.device("meta"):
        swiglu = Qwen3(ModelConfig())
        dgfn = Qwen3(ModelConfig(ffn="dgfn"))
    assert swiglu.num_parameters() == 82_222_848
    # Per layer DGFN adds the gate (640 weights + 1 bias) and the four PolyReLU coefficients.
    assert dgfn.num_parameters() - swiglu.num_parameters() == 11 * (640 + 1 + 4)
    big = {n: p.shape for n, p in swiglu.named_parameters() if p.dim() >= 2}
    big_dgfn = {n: p.shape for n, p in dgfn.named_parameters() if p.dim() >= 2}
    assert sorted(big.values()) == sorted(big_dgfn.values())


def test_invalid_settings_name_the_valid_values():
    with pytest.raises(ValueError, match="swiglu, dgfn"):
        ModelConfig(ffn="geglu")
    with pytest.raises(ValueError, match="relu, softmax"):
        ModelConfig(dgfn_memory="sigmoid")
    with pytest.raises(ValueError, match="dgfn_gate"):
        ModelConfig(dgfn_gate="1.5")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(num_attention_heads=10, num_key_value_heads=4)
    with pytest.raises(ValueError, match="hidden_size=0"):
        ModelConfig(hidden_size=0)


def test_flops_per_token_formula():
    model = build(tiny_config(tie_word_embeddings=False))
    c = model.config
    matmul_params = model.num_parameters() - c.vocab_size * c.hidden_size  # untied embedding is a lookup
    matmul_params -= sum(p.numel() for p in model.parameters() if p.dim() < 2)
    attention = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * 64
    assert model.flops_per_token(64) == 6 * matmul_params + attention
    assert model.estimate_mfu(1e6, 64, "cpu") is None


def test_bf16_cast_keeps_rope_tables_float32():
    model = build(tiny_config()).to(torch.bfloat16)
    rope = model.model.rotary_emb
    assert rope.cos.dtype == torch.float32
    assert rope.sin.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    float32_rope = build(tiny_config()).model.rotary_emb
    assert torch.equal(rope.cos, float32_rope.cos)
    assert torch.equal(rope.sin, float32_rope.sin)


def test_optimizer_decays_only_matrices():
    model = build(tiny_config(ffn="dgfn"))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, param in model.named_parameters():
        no_decay = "norm" in name or "act_fn" in name or "gate_" in name
        assert (id(param) in decayed) != no_decay, name


# --- attention and generation ---------------------------------------------------------------------------

def test_causality():
    model = build(tiny_config(ffn="dgfn"))
    idx = torch.randint(0, 120, (1, 40))
    changed = idx.clone()
    changed[0, 25] = (idx[0, 25] + 1) % 120
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    assert torch.equal(logits[:, :25], logits_changed[:, :25])
    assert not torch.allclose(logits[:, 25:], logits_changed[:, 25:])


@pytest.mark.parametrize("prompt_length", [1, 7])
@pytest.mark.parametrize("ffn", ["swiglu", "dgfn"])
def test_kv_cache_matches_full_recompute(prompt_length, ffn):
    model = build(tiny_config(ffn=ffn, num_attention_heads=8, num_key_value_heads=2, head_dim=8))
    prompt = torch.randint(0, 120, (2, prompt_length))
    cached = list(model.stream(prompt, 64, temperature=0, use_cache=True))
    uncached = list(model.stream(prompt, 64, temperature=0, use_cache=False))
    for step, ((token, logits), (token_ref, logits_ref)) in enumerate(zip(cached, uncached)):
        assert torch.equal(token, token_ref), f"step {step}"
        assert (logits - logits_ref).abs().max().item() < 1e-4, f"step {step}"


def test_cached_chunk_uses_offset_causal_mask():
    # A multi-token chunk after a cached prefix: the query is shorter than the keys.
    model = build(tiny_config())
    idx = torch.randint(0, 120, (2, 30))
    full_logits, _ = model(idx)
    caches = [KVCache(model.config.max_position_embeddings) for _ in model.model.layers]
    model(idx[:, :18], kv_caches=caches)
    chunk_logits, _ = model(idx[:, 18:], kv_caches=caches)
    assert (chunk_logits - full_logits[:, 18:]).abs().max().item() < 1e-5


def test_generation_never_samples_padding_ids():
    model = build(tiny_config())
    with torch.no_grad():
        model.lm_head.weight[120:] = 0.0
        model.lm_head.weight[120:, 0] = 100.0  # padding ids would win every draw if they were allowed
    generator = torch.Generator().manual_seed(0)
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 50, temperature=1.0, generator=generator)
    assert out.max().item() < 120
    greedy = model.generate(torch.zeros(4, 1, dtype=torch.long), 20, temperature=0)
    assert greedy.max().item() < 120


def test_generation_top_k_and_seed():
    model = build(tiny_config())
    prompt = torch.zeros(1, 1, dtype=torch.long)
    first = model.generate(prompt, 30, top_k=5, generator=torch.Generator().manual_seed(3))
    second = model.generate(prompt, 30, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    for token, logits in model.stream(prompt, 10, top_k=1):
        assert token.item() == logits[:, :120].argmax().item()


def test_generation_too_long_is_rejected():
    model = build(tiny_config(max_position_embeddings=32))
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        model.generate(torch.zeros(1, 20, dtype=torch.long), 13)
    assert model.generate(torch.zeros(1, 20, dtype=torch.long), 12).shape == (1, 32)


# --- DGFN -----------------------------------------------------------------------------------------------

def test_dgfn_gate_starts_at_half_and_stays_in_range():
    model = build(tiny_config(ffn="dgfn"))
    idx = torch.randint(0, 120, (2, 32))
    model(idx)
    assert model.gate_means() == [0.5, 0.5]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_weight.normal_(0, 3.0)
            layer.mlp.gate_bias.fill_(2.0)
    model(idx)
    for value in model.gate_means():
        assert 0.0 < value < 1.0
        assert value != 0.5


@pytest.mark.parametrize("memory", ["relu", "softmax"])
def test_dgfn_fixed_gate_isolates_each_pathway(memory):
    dynamic = build(tiny_config(ffn="dgfn", dgfn_memory=memory)).model.layers[0].mlp
    poly_only = build(tiny_config(ffn="dgfn", dgfn_memory=memory, dgfn_gate="1")).model.layers[0].mlp
    memory_only = build(tiny_config(ffn="dgfn", dgfn_memory=memory, dgfn_gate=0.0)).model.layers[0].mlp
    assert not hasattr(poly_only, "mem_proj")
    assert not hasattr(memory_only, "poly_proj")
    poly_only.load_state_dict(dynamic.state_dict(), strict=False)
    memory_only.load_state_dict(dynamic.state_dict(), strict=False)

    x = torch.randn(2, 5, 64)
    relu = torch.relu(x @ dynamic.poly_proj.weight.T)
    expected_poly = dynamic.down_proj((relu + relu**2 + relu**3) / 3)
    scores = x @ dynamic.mem_proj.weight.T
    if memory == "relu":
        read = torch.relu(scores)
    else:
        read = torch.softmax(scores, dim=-1) * 96 / 4
    expected_memory = dynamic.down_proj(read)
    torch.testing.assert_close(poly_only(x), expected_poly)
    torch.testing.assert_close(memory_only(x), expected_memory)
    torch.testing.assert_close(dynamic(x), (expected_poly + expected_memory) / 2)


def test_dgfn_every_parameter_gets_a_gradient():
    model = build(tiny_config(ffn="dgfn"))
    idx = torch.randint(0, 120, (2, 32))
    _, loss = model(idx, torch.roll(idx, -1, dims=1))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 0, name


def test_dgfn_pathways_have_comparable_rms_at_init():
    # Default widths, one layer: the softmax read-out is rescaled to the polynomial pathway's size.
    torch.manual_seed(0)
    mlp = Qwen3(ModelConfig(ffn="dgfn", dgfn_memory="softmax", num_hidden_layers=1, vocab_size=64,
                        tokenizer_vocab_size=64)).model.layers[0].mlp
    x = torch.randn(512, 640)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
    with torch.no_grad():
        poly_rms = mlp.polynomial(x).pow(2).mean().sqrt().item()
        memory_rms = mlp.memory_read(x).pow(2).mean().sqrt().item()
    assert 0.5 < memory_rms / poly_rms < 2.0


# --- training sanity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ffn", ["swiglu", "dgfn"])
def test_overfits_one_batch(ffn):
    model = build(tiny_config(ffn=ffn))
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 120, (4, 33), generator=generator)
    x, y = idx[:, :-1], idx[:, 1:]
    first_loss = None
    for _ in range(200):
        _, loss = model(x, y)
        first_loss = first_loss or loss.item()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    assert first_loss > math.log(120) - 0.5
    assert loss.item() < 1.0


def test_ignored_targets_do_not_count():
    model = build(tiny_config())
    idx = torch.randint(0, 120, (1, 16))
    targets = torch.randint(0, 120, (1, 16))
    _, loss_half = model(idx, torch.cat([targets[:, :8], torch.full((1, 8), -1)], dim=1))
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[0, :8], targets[0, :8])
    torch.testing.assert_close(loss_half, expected)


@pytest.mark.parametrize("ffn", ["swiglu", "dgfn"])
def test_bf16_autocast_close_to_float32(ffn):
    model = build(tiny_config(ffn=ffn))
    idx = torch.randint(0, 120, (2, 32))
    logits, loss = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_bf16, loss_bf16 = model(idx, idx)
    assert logits_bf16.dtype == torch.bfloat16
    assert torch.isfinite(logits_bf16).all()
    assert (logits_bf16.float() - logits).abs().max().item() < 0.05
    assert abs(loss_bf16.item() - loss.item()) < 0.01

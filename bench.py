"""
Time training steps (forward + backward + AdamW step) of the model with each
feed-forward block, and greedy generation with and without the KV cache.

    python bench.py                                   # the default model, batch 8 x 1024 tokens
    python bench.py --hidden_size=256 --intermediate_size=704 --num_hidden_layers=4 \\
        --num_attention_heads=4 --num_key_value_heads=2 --batch_size=4 --seq_len=256

When transformers is installed (and --hf=True), the same run also times
transformers' Qwen3ForCausalLM at the same shape, dtype and optimizer, so the
swiglu row can be compared with it. Inputs are random tokens. The project's
targets: dgfn/swiglu step time <= 1.15, ours/HF <= 1.0, and 256 tokens
generated with the KV cache >= 5x faster than without it.
"""
import gc
import resource
import statistics
import sys
import time

import torch

import configurator
from model import ModelConfig, Qwen3

# -----------------------------------------------------------------------------
# model shape: ModelConfig fields, defaults taken from ModelConfig
vocab_size = ModelConfig.vocab_size  # embedding rows (GPT-2's 50257 tokens padded up)
hidden_size = ModelConfig.hidden_size  # width of the residual stream
intermediate_size = ModelConfig.intermediate_size  # feed-forward width
num_hidden_layers = ModelConfig.num_hidden_layers  # number of decoder layers
num_attention_heads = ModelConfig.num_attention_heads  # query heads per layer
num_key_value_heads = ModelConfig.num_key_value_heads  # key/value heads per layer (grouped-query attention)
head_dim = ModelConfig.head_dim  # width of one attention head
max_position_embeddings = ModelConfig.max_position_embeddings  # maximum sequence length; must be >= seq_len
rope_theta = ModelConfig.rope_theta  # RoPE base
tie_word_embeddings = ModelConfig.tie_word_embeddings  # share the embedding matrix with the LM head
dgfn_memory = ModelConfig.dgfn_memory  # DGFN memory read-out: relu or softmax
dgfn_gate = ModelConfig.dgfn_gate  # DGFN gate: dynamic, or a fixed lambda in [0, 1]
# run
ffns = "swiglu,dgfn"  # comma-separated feed-forward blocks to time
hf = True  # also time transformers' Qwen3ForCausalLM (needs transformers and swiglu in ffns)
batch_size = 8  # sequences per training step
seq_len = 1024  # tokens per sequence
warmup_steps = 3  # untimed steps after the first (compiling) step
timed_steps = 10  # steps timed one by one; ms/step is their median
gen_tokens = 256  # tokens generated with and without the KV cache, batch 1; 0 skips generation
gen_prompt_tokens = 16  # length of the random prompt for generation
device = "auto"  # cpu, cuda, cuda:N, mps, or auto (cuda when available, else cpu)
dtype = "auto"  # float32, bfloat16 or float16 (autocast), or auto (bfloat16 on cuda where supported, else float32)
compile = "auto"  # torch.compile the training step: True, False, or auto (True on cuda only)
# -----------------------------------------------------------------------------


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# NOTE: the CUDA paths (synchronize, peak CUDA memory, compile by default, MFU) have only been
# written, not run, because the machine this was developed on has no GPU.
def synchronize(device_):
    if device_.type == "cuda":
        torch.cuda.synchronize(device_)


def reset_peak_memory(device_):
    gc.collect()
    if device_.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device_)


def peak_memory_mib(device_):
    """Return the peak memory in MiB: CUDA memory allocated since the last reset, or the process's peak RSS on CPU."""
    if device_.type == "cuda":
        return torch.cuda.max_memory_allocated(device_) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def make_hf_model(config):
    """Return transformers' Qwen3ForCausalLM at the shape of `config`, with SDPA attention."""
    import transformers
    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=False,
        max_position_embeddings=config.max_position_embeddings, attn_implementation="sdpa", use_cache=False,
    )
    # transformers 5.x takes RoPE settings as rope_parameters, 4.x as rope_theta.
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
    else:
        kwargs["rope_theta"] = config.rope_theta
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kwargs))


def make_adamw(model, device_):
    """Return AdamW set up like Qwen3.configure_optimizers: decay on matrices only, fused on cuda and cpu."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=device_.type in ("cuda", "cpu"))


def time_training(compute_loss, optimizer, device_, autocast):
    """Run the first step, warmup_steps and timed_steps training steps, and return (first step ms, median timed step ms)."""
    def step():
        with autocast:
            loss = compute_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    synchronize(device_)
    t0 = time.perf_counter()
    step()  # includes torch.compile when it is on
    synchronize(device_)
    first_ms = (time.perf_counter() - t0) * 1000
    for _ in range(warmup_steps):
        step()
    synchronize(device_)

    # The median of single steps, unlike the mean, ignores the odd step slowed by another process.
    step_ms = []
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        step()
        synchronize(device_)
        step_ms.append((time.perf_counter() - t0) * 1000)
    return first_ms, statistics.median(step_ms)


def time_generation(model, device_, autocast):
    """Time greedy generation of gen_tokens with and without the KV cache, and return (cached ms, uncached ms, same tokens)."""
    prompt = torch.randint(0, ModelConfig.tokenizer_vocab_size, (1, gen_prompt_tokens), device=device_)
    results = {}
    with torch.no_grad(), autocast:
        model.generate(prompt, 4, temperature=0)  # warm up kernels and allocator
        for use_cache in (True, False):
            synchronize(device_)
            t0 = time.perf_counter()
            tokens = model.generate(prompt, gen_tokens, temperature=0, use_cache=use_cache)
            synchronize(device_)
            results[use_cache] = ((time.perf_counter() - t0) * 1000, tokens)
    same = torch.equal(results[True][1], results[False][1])
    return results[True][0], results[False][0], same


def print_table(header, rows):
    """Print rows under a header, the first column left-aligned and the others right-aligned."""
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        print("  ".join(cells))


def resolve_run_settings():
    """Return (device, dtype name, autocast context, whether to compile), resolving the 'auto' values."""
    device_name = device
    if device == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device_ = torch.device(device_name)

    dtype_name = dtype
    if dtype == "auto":
        dtype_name = "bfloat16" if device_.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype_name not in dtypes:
        fail(f"invalid --dtype={dtype}: use one of auto, {', '.join(dtypes)}.")
    autocast = torch.autocast(device_.type, dtype=dtypes[dtype_name], enabled=dtype_name != "float32")

    compile_words = {"auto": device_.type == "cuda", "true": True, "1": True, "false": False, "0": False}
    if compile.lower() not in compile_words:
        fail(f"invalid --compile={compile}: use True, False or auto.")

    if seq_len > max_position_embeddings or gen_prompt_tokens + gen_tokens > max_position_embeddings:
        fail(f"--seq_len={seq_len} and --gen_prompt_tokens + --gen_tokens = {gen_prompt_tokens + gen_tokens} "
             f"must both be <= --max_position_embeddings={max_position_embeddings}.")
    return device_, dtype_name, autocast, compile_words[compile.lower()]


def make_configs():
    """Return {ffn name: ModelConfig} for the feed-forward blocks in --ffns, or exit on an invalid setting."""
    shape = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                 num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                 num_key_value_heads=num_key_value_heads, head_dim=head_dim,
                 max_position_embeddings=max_position_embeddings, rope_theta=rope_theta,
                 tie_word_embeddings=tie_word_embeddings, dgfn_memory=dgfn_memory, dgfn_gate=dgfn_gate)
    names = [name.strip() for name in ffns.split(",") if name.strip()]
    try:
        return {name: ModelConfig(ffn=name, **shape) for name in names}
    except ValueError as error:
        fail(f"invalid model settings: {error}")


def bench_ours(config, x, y, device_, autocast, use_compile):
    """Time training and generation of Qwen3 with one feed-forward block, and return the measurements as a dict."""
    reset_peak_memory(device_)
    model = Qwen3(config).to(device_)
    model.train()
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_.type)
    step_model = torch.compile(model) if use_compile else model
    first_ms, ms = time_training(lambda: step_model(x, targets=y)[1], optimizer, device_, autocast)
    tokens_per_s = x.numel() / (ms / 1000)
    result = dict(parameters=model.num_parameters(), first_ms=first_ms, ms=ms, tokens_per_s=tokens_per_s,
                  tflops=model.flops_per_token(x.size(1)) * tokens_per_s / 1e12,
                  mfu=model.estimate_mfu(tokens_per_s, x.size(1), device_), memory=peak_memory_mib(device_))
    del optimizer, step_model

    if gen_tokens > 0:
        model.eval()
        result["generation"] = time_generation(model, device_, autocast)
    return result


def bench_hf(config, x, device_, autocast, use_compile):
    """Time training of transformers' Qwen3ForCausalLM at the shape of `config`, and return the measurements as a dict."""
    reset_peak_memory(device_)
    model = make_hf_model(config).to(device_)
    model.train()
    optimizer = make_adamw(model, device_)
    step_model = torch.compile(model) if use_compile else model
    # HF shifts the labels inside its loss, so labels=x trains on the same next-token targets as ours.
    first_ms, ms = time_training(lambda: step_model(input_ids=x, labels=x).loss, optimizer, device_, autocast)
    parameters = sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once
    return dict(parameters=parameters, first_ms=first_ms, ms=ms, tokens_per_s=x.numel() / (ms / 1000),
                memory=peak_memory_mib(device_))


def print_report(results, device_):
    """Print the training table, the step-time ratios and the generation table."""
    rows = []
    for name, r in results.items():
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}%"
        rows.append([name, f"{r['parameters'] / 1e6:.1f}M", f"{r['first_ms']:.0f}", f"{r['ms']:.1f}",
                     f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.2f}", mfu, f"{r['memory']:,.0f}"])
    memory_label = "peak CUDA MiB" if device_.type == "cuda" else "peak RSS MiB"
    print()
    print_table(["model", "params", "first step ms", "ms/step", "tokens/s", "TFLOP/s", "MFU", memory_label], rows)
    if device_.type != "cuda":
        print("peak RSS is the whole process's high-water mark so far, so it never goes down from one row to the next")
    if "dgfn" in results and "swiglu" in results:
        print(f"dgfn/swiglu step time: {results['dgfn']['ms'] / results['swiglu']['ms']:.3f} (target <= 1.15)")
    if "hf qwen3" in results:
        print(f"ours/HF step time (swiglu): {results['swiglu']['ms'] / results['hf qwen3']['ms']:.3f} (target <= 1.0)")

    generation_rows = []
    for name, r in results.items():
        if "generation" in r:
            cached_ms, uncached_ms, same = r["generation"]
            generation_rows.append([name, f"{cached_ms:.0f}", f"{uncached_ms:.0f}", f"{uncached_ms / cached_ms:.1f}x",
                                    f"{gen_tokens / (cached_ms / 1000):,.0f}", "yes" if same else "no"])
    if generation_rows:
        print(f"\ngreedy generation of {gen_tokens} tokens after a {gen_prompt_tokens}-token prompt, batch 1, not compiled")
        print_table(["model", "KV cache ms", "no cache ms", "speedup", "tokens/s cached", "same tokens"], generation_rows)
        print("target: speedup >= 5x")


def main():
    device_, dtype_name, autocast, use_compile = resolve_run_settings()
    configs = make_configs()
    torch.manual_seed(0)
    data = torch.randint(0, ModelConfig.tokenizer_vocab_size, (batch_size, seq_len + 1), device=device_)
    x, y = data[:, :-1], data[:, 1:]
    if device_.type == "cuda":
        device_label = torch.cuda.get_device_name(device_)
    else:
        device_label = f"{torch.get_num_threads()} threads"
    print(f"device {device_} ({device_label}), dtype {dtype_name}, compile {use_compile}, "
          f"batch {batch_size} x {seq_len} = {batch_size * seq_len} tokens/step, torch {torch.__version__}")

    results = {}
    for name, config in configs.items():
        print(f"timing {name} ...", file=sys.stderr, flush=True)  # progress on stderr keeps stdout a clean table
        results[name] = bench_ours(config, x, y, device_, autocast, use_compile)
    if hf and "swiglu" not in configs:
        print("the Qwen3ForCausalLM comparison is skipped because it needs swiglu in --ffns")
    elif hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed, so the Qwen3ForCausalLM comparison is skipped")
        else:
            print("timing hf qwen3 ...", file=sys.stderr, flush=True)
            hf_result = bench_hf(configs["swiglu"], x, device_, autocast, use_compile)
            # The HF model has the swiglu model's shape, so it does the same FLOPs per token.
            speed = results["swiglu"]["ms"] / hf_result["ms"]
            hf_result["tflops"] = results["swiglu"]["tflops"] * speed
            hf_result["mfu"] = None if results["swiglu"]["mfu"] is None else results["swiglu"]["mfu"] * speed
            results["hf qwen3"] = hf_result

    print_report(results, device_)

if __name__ == "__main__":
    globals().update(configurator.configure(globals(), __file__))
    main()

"""
Sample text from a checkpoint written by train.py, printing tokens as they are generated.

    python sample.py --out_dir=out --start="The meaning of life is" --num_samples=3
    python sample.py --out_dir=out --start=FILE:prompt.txt --temperature=0

The checkpoint is loaded with torch.load(weights_only=True), so a file that
carries pickled Python code is rejected instead of run. Generation uses the
model's KV cache, and a fixed --seed reproduces the output on the same
device, dtype and software versions.
"""
import codecs
import os
import pickle
import sys

import tiktoken
import torch

import configurator
from model import ModelConfig, Qwen3

# -----------------------------------------------------------------------------
out_dir = "out"  # directory that contains ckpt.pt, as written by train.py
start = ""  # prompt text, or FILE:path to read the prompt from a UTF-8 file. "" starts from the end-of-text token (id 50256)
num_samples = 1  # number of samples to generate, one after another
max_new_tokens = 200  # tokens to generate per sample; prompt + new tokens must fit max_position_embeddings
temperature = 0.8  # divides the logits before sampling; 0 = greedy (always the most likely token)
top_k = 200  # sample only from the k most likely tokens; 0 = no limit
seed = 1337  # seed of the sampling generator; the same seed gives the same output
device = "auto"  # cpu, cuda, cuda:N, mps, or auto (cuda when available, else cpu)
dtype = "auto"  # float32, bfloat16 or float16 (autocast), or auto (bfloat16 on cuda where supported, else float32)
# -----------------------------------------------------------------------------

EOT_TOKEN = 50256  # GPT-2's <|endoftext|>, which separates documents in the training data


def fail(message):
    """Print an error to stderr and exit with status 1."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def error_summary(error):
    """Return the error's type and the first non-empty line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def load_checkpoint(path):
    """Load a checkpoint dict with weights_only=True, or exit with an error that names the file and the fix."""
    if not os.path.exists(path):
        fail(f"checkpoint not found: {path}. Train a model with train.py (it writes out_dir/ckpt.pt) "
             f"or point --out_dir at the directory that contains ckpt.pt.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only=True raises this both for a pickle that refers to Python objects other than
        # tensors and plain containers (a GLOBAL) and for a file that is not a pickle at all.
        globals_found = [line for line in str(error).splitlines() if "GLOBAL" in line]
        if globals_found:
            detail = globals_found[0].split(". Please")[0].strip()
            fail(f"{path} was rejected and not loaded, so no code in it ran: it contains pickled Python objects "
                 f"that are not tensors or plain data ({detail}). Use a ckpt.pt written by train.py.")
        # Torch's message starts with advice to retry with weights_only=False, which would run any code in the file.
        unsupported = [line.strip() for line in str(error).splitlines() if "Unsupported" in line]
        detail = unsupported[0] if unsupported else "not a weights-only pickle"
        fail(f"cannot read {path} as a PyTorch checkpoint ({detail}). "
             f"The file is damaged, truncated or of another format. Use a ckpt.pt written by train.py.")
    except Exception as error:  # noqa: BLE001 - on damaged input the unpickler raises many types (EOFError, KeyError, IndexError, ...)
        fail(f"cannot read {path} as a PyTorch checkpoint ({error_summary(error)}). "
             f"The file is damaged, truncated or of another format. Use a ckpt.pt written by train.py.")

    missing = [key for key in ("model", "model_config") if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        fail(f"{path} is not a train.py checkpoint: it has no {' or '.join(repr(k) for k in missing)} entry. "
             f"Use a ckpt.pt written by train.py.")
    return checkpoint


def build_model(checkpoint, path):
    """Build Qwen3 from the checkpoint's model_config, load its weights and return (model, config).

    Exits with a message that names the mismatched keys when the weights do not fit.
    """
    try:
        config = ModelConfig(**checkpoint["model_config"])
    except (TypeError, ValueError) as error:
        fail(f"the model_config stored in {path} does not fit this model.py ({error}). "
             f"The checkpoint comes from another version of the code. Sample with that version.")
    model = Qwen3(config)

    state_dict = checkpoint["model"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        fail(f"the 'model' entry in {path} is not a state_dict of tensors. Use a ckpt.pt written by train.py.")
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
                   for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    if missing or unexpected or wrong_shape:
        lines = [f"the weights in {path} do not match the model built from its model_config "
                 f"(ffn={config.ffn!r}, {config.num_hidden_layers} layers, hidden_size {config.hidden_size}):"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs model)", wrong_shape)):
            if keys:
                key_list = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                lines.append(f"  {len(keys)} {label}: {key_list}")
        if any(key.startswith("_orig_mod.") for key in unexpected):
            lines.append("Keys that start with _orig_mod. come from the state_dict of a torch.compile wrapper, "
                         "so save the uncompiled model's state_dict instead.")
        lines.append("The checkpoint comes from another model layout or version of model.py. "
                     "Sample with the code that trained it.")
        fail("\n".join(lines))
    model.load_state_dict(state_dict)
    return model, config


def read_prompt(text):
    """Return the prompt text, reading it from a file when it has the form FILE:path."""
    if not text.startswith("FILE:"):
        return text
    prompt_path = text[len("FILE:"):]
    try:
        with open(prompt_path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as error:
        fail(f"cannot read the prompt file {prompt_path} ({error}). Give --start=FILE:path with a UTF-8 text file.")


def resolve_device_and_dtype(device_name, dtype_name):
    """Return (device, torch dtype), resolving the 'auto' values."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device_name.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    try:
        device_ = torch.device(device_name)
    except RuntimeError:
        fail(f"invalid --device={device_name}: use auto, cpu, cuda, cuda:N or mps.")
    if device_.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device={device_name} but this PyTorch build sees no CUDA GPU. Use --device=cpu.")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype_name not in dtypes:
        fail(f"invalid --dtype={dtype_name}: use one of auto, {', '.join(dtypes)}.")
    return device_, dtypes[dtype_name]


def decode_stream(token_ids, encoding):
    """Yield the text of each token as it arrives, then the text of any bytes left at the end.

    A multi-byte UTF-8 character can be split across tokens, so the bytes are
    decoded incrementally and a partial character waits for the token that
    completes it. Bytes that never form a valid character come out as U+FFFD.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token_id in token_ids:
        yield decoder.decode(encoding.decode_single_token_bytes(token_id))
    yield decoder.decode(b"", final=True)


def main():
    if temperature < 0:
        fail(f"invalid --temperature={temperature}: use 0 for greedy decoding or a positive number.")
    if max_new_tokens < 1 or num_samples < 1:
        fail(f"invalid --max_new_tokens={max_new_tokens} or --num_samples={num_samples}: both must be at least 1.")
    if top_k < 0:
        fail(f"invalid --top_k={top_k}: use 0 for no limit or a positive number of tokens.")
    device_, dtype_ = resolve_device_and_dtype(device, dtype)

    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    checkpoint = load_checkpoint(ckpt_path)
    model, config = build_model(checkpoint, ckpt_path)
    del checkpoint
    model.to(device_)
    model.eval()
    # float32 runs without autocast; bfloat16 and float16 run the matmuls in that dtype under autocast.
    autocast = torch.autocast(device_.type, dtype=dtype_, enabled=dtype_ != torch.float32)

    encoding = tiktoken.get_encoding("gpt2")
    prompt = read_prompt(start)
    # A literal <|endoftext|> in the prompt becomes the EOT token, as in the training data.
    prompt_tokens = encoding.encode(prompt, allowed_special={"<|endoftext|>"}) if prompt else [EOT_TOKEN]
    limit = config.max_position_embeddings
    if len(prompt_tokens) + max_new_tokens > limit:
        fail(f"the prompt has {len(prompt_tokens)} token(s) and --max_new_tokens={max_new_tokens}, "
             f"{len(prompt_tokens) + max_new_tokens} in all, but the model's max_position_embeddings is {limit}. "
             f"Shorten the prompt or lower --max_new_tokens.")

    idx = torch.tensor([prompt_tokens], dtype=torch.long, device=device_)
    generator = torch.Generator(device=device_).manual_seed(seed)
    torch.manual_seed(seed)

    for sample_index in range(num_samples):
        print(prompt, end="", flush=True)
        try:
            with torch.no_grad(), autocast:
                stream = model.stream(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                      use_cache=True, generator=generator)
                for text in decode_stream((next_token.item() for next_token, _ in stream), encoding):
                    print(text, end="", flush=True)
        except ValueError as error:
            # The length check above should catch this first; the model raises the same limit itself.
            fail(f"generation failed: {error}")
        print()
        if sample_index < num_samples - 1:
            print("---------------")


if __name__ == "__main__":
    globals().update(configurator.configure(globals(), __file__))
    main()

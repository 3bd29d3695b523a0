"""Tests for sample.py (run as a script, as a user would) and a smoke test of bench.py.

The checkpoints are tiny models saved in train.py's checkpoint format. tiktoken
must find its GPT-2 files: set TIKTOKEN_CACHE_DIR on a machine without internet.
"""
import dataclasses
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
import torch

from model import ModelConfig, Qwen3
from sample import decode_stream

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=64)


def save_checkpoint(path, config, state_dict=None, **extra):
    """Save a checkpoint dict in train.py's format (the entries sample.py reads, plus any extra ones)."""
    if state_dict is None:
        torch.manual_seed(0)
        state_dict = Qwen3(config).state_dict()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint = {"model": state_dict, "model_config": dataclasses.asdict(config), "settings": {}, "step": 0}
    checkpoint.update(extra)
    torch.save(checkpoint, path)


def run_script(script, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    save_checkpoint(str(directory / "ckpt.pt"), ModelConfig(**TINY))
    return str(directory)


class MarkerWriter:
    """Pickles as a call to open(marker, "w"), so unpickling it without weights_only creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_sample_prints_prompt_and_text(out_dir):
    result = run_script("sample.py", f"--out_dir={out_dir}", "--start=Hello, world", "--max_new_tokens=20")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello, world")
    assert len(result.stdout.strip()) > len("Hello, world")


def test_prompt_read_from_file(out_dir, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Über den Wolken", encoding="utf-8")
    result = run_script("sample.py", f"--out_dir={out_dir}", f"--start=FILE:{prompt_file}", "--max_new_tokens=5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Über den Wolken")


def test_greedy_output_repeats(out_dir):
    # Greedy decoding ignores the seed, so two seeds must give the same text.
    first = run_script("sample.py", f"--out_dir={out_dir}", "--temperature=0", "--max_new_tokens=30", "--seed=1")
    second = run_script("sample.py", f"--out_dir={out_dir}", "--temperature=0", "--max_new_tokens=30", "--seed=2")
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout


def test_seed_reproduces_samples(out_dir):
    args = [f"--out_dir={out_dir}", "--temperature=1.0", "--top_k=0", "--max_new_tokens=30", "--num_samples=2"]
    first = run_script("sample.py", *args, "--seed=7")
    again = run_script("sample.py", *args, "--seed=7")
    other = run_script("sample.py", *args, "--seed=8")
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout
    samples = first.stdout.split("---------------")
    assert len(samples) == 2
    assert samples[0].strip() != samples[1].strip()


def test_pickled_code_rejected(tmp_path):
    marker = tmp_path / "marker"
    checkpoint_path = tmp_path / "evil" / "ckpt.pt"
    save_checkpoint(str(checkpoint_path), ModelConfig(**TINY), payload=MarkerWriter(str(marker)))

    # The payload is live: loading without weights_only runs it.
    probe = tmp_path / "probe"
    probe_path = tmp_path / "probe.pt"
    torch.save({"payload": MarkerWriter(str(probe))}, probe_path)
    torch.load(probe_path, weights_only=False)
    assert probe.exists()

    result = run_script("sample.py", f"--out_dir={checkpoint_path.parent}", "--max_new_tokens=5")
    assert result.returncode != 0
    assert not marker.exists()
    assert "rejected" in result.stderr
    assert str(checkpoint_path) in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_checkpoint(tmp_path):
    result = run_script("sample.py", f"--out_dir={tmp_path / 'nowhere'}")
    assert result.returncode != 0
    assert "checkpoint not found" in result.stderr
    assert str(tmp_path / "nowhere" / "ckpt.pt") in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["text", "empty", "truncated", "list", "dict without model"])
def test_not_a_checkpoint(tmp_path, kind):
    path = tmp_path / "ckpt.pt"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        save_checkpoint(str(path), ModelConfig(**TINY))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "list":
        torch.save([1, 2, 3], path)
    else:
        torch.save({"step": 3}, path)
    result = run_script("sample.py", f"--out_dir={tmp_path}")
    assert result.returncode != 0
    assert str(path) in result.stderr
    assert "train.py" in result.stderr
    assert "Traceback" not in result.stderr
    assert "weights_only" not in result.stderr  # torch's advice to load unsafely must not reach the user


def test_wrong_layout_names_keys(tmp_path):
    # DGFN weights under a model_config with ffn="swiglu".
    torch.manual_seed(0)
    dgfn_weights = Qwen3(ModelConfig(**TINY, ffn="dgfn")).state_dict()
    save_checkpoint(str(tmp_path / "ckpt.pt"), ModelConfig(**TINY, ffn="swiglu"), state_dict=dgfn_weights)
    result = run_script("sample.py", f"--out_dir={tmp_path}")
    assert result.returncode != 0
    assert "do not match" in result.stderr
    assert "model.layers.0.mlp.gate_proj.weight" in result.stderr  # missing
    unexpected = sorted(set(dgfn_weights) - set(Qwen3(ModelConfig(**TINY)).state_dict()))
    assert unexpected[0] in result.stderr
    assert "Traceback" not in result.stderr


def test_compiled_prefix_gets_hint(tmp_path):
    torch.manual_seed(0)
    weights = {f"_orig_mod.{key}": value for key, value in Qwen3(ModelConfig(**TINY)).state_dict().items()}
    save_checkpoint(str(tmp_path / "ckpt.pt"), ModelConfig(**TINY), state_dict=weights)
    result = run_script("sample.py", f"--out_dir={tmp_path}")
    assert result.returncode != 0
    assert "_orig_mod." in result.stderr
    assert "torch.compile" in result.stderr


def test_wrong_shape_names_key(tmp_path):
    wide = ModelConfig(**{**TINY, "intermediate_size": 96})
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "ckpt.pt"), ModelConfig(**TINY), state_dict=Qwen3(wide).state_dict())
    result = run_script("sample.py", f"--out_dir={tmp_path}")
    assert result.returncode != 0
    assert "model.layers.0.mlp.up_proj.weight (96, 32) vs (64, 32)" in result.stderr


def test_unknown_model_config_field(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), ModelConfig(**TINY))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_config"]["num_experts"] = 8
    torch.save(checkpoint, path)
    result = run_script("sample.py", f"--out_dir={tmp_path}")
    assert result.returncode != 0
    assert "model_config" in result.stderr
    assert "num_experts" in result.stderr


def test_too_many_new_tokens(out_dir):
    result = run_script("sample.py", f"--out_dir={out_dir}", "--start=one two three", "--max_new_tokens=64")
    assert result.returncode != 0
    assert "max_position_embeddings is 64" in result.stderr
    assert "--max_new_tokens" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("argument, expected", [
    ("--device=gpu", "invalid --device=gpu"),
    ("--num_samples=0", "--num_samples=0"),
    ("--max_new_tokens=-5", "--max_new_tokens=-5"),
])
def test_bad_settings_exit_with_message(out_dir, argument, expected):
    result = run_script("sample.py", f"--out_dir={out_dir}", argument)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_start_begins_at_eot(out_dir):
    empty = run_script("sample.py", f"--out_dir={out_dir}", "--start=", "--temperature=0", "--max_new_tokens=10")
    eot = run_script("sample.py", f"--out_dir={out_dir}", "--start=<|endoftext|>", "--temperature=0", "--max_new_tokens=10")
    assert empty.returncode == 0, empty.stderr
    assert eot.returncode == 0, eot.stderr
    assert eot.stdout.startswith("<|endoftext|>")
    assert empty.stdout == eot.stdout[len("<|endoftext|>"):]


def test_help_mentions_eot_start():
    result = run_script("sample.py", "--help")
    assert result.returncode == 0
    assert "50256" in result.stdout


def test_decode_stream_joins_split_characters():
    encoding = tiktoken.get_encoding("gpt2")
    text = "naïve 日本語 🙂 done"
    tokens = encoding.encode(text)
    # The test means something only if some token contains part of a character.
    partial = [t for t in tokens if not is_valid_utf8(encoding.decode_single_token_bytes(t))]
    assert partial
    pieces = list(decode_stream(tokens, encoding))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def is_valid_utf8(data):
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def write_shard(path, tokens):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, len(tokens)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, "train.py")), reason="train.py is not in this checkout")
def test_sample_from_compiled_train_run(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    write_shard(data_dir / "fineweb_val_000000.bin", rng.integers(0, 50257, 4096))
    write_shard(data_dir / "fineweb_train_000001.bin", rng.integers(0, 50257, 16384))
    out = tmp_path / "out"
    train = run_script("train.py", "--compile=True", "--device=cpu", f"--data_dir={data_dir}", f"--out_dir={out}",
                       *[f"--{key}={value}" for key, value in TINY.items()],
                       "--sequence_length=32", "--batch_size=2", "--total_batch_size=64", "--max_steps=2",
                       "--warmup_steps=1", "--eval_interval=2", "--val_tokens=128", timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert not any(key.startswith("_orig_mod.") for key in checkpoint["model"])

    result = run_script("sample.py", f"--out_dir={out}", "--start=The", "--max_new_tokens=10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The")
    assert len(result.stdout.strip()) > len("The")


def test_bench_smoke():
    result = run_script("bench.py", *[f"--{key}={value}" for key, value in TINY.items()],
                        "--batch_size=2", "--seq_len=32", "--warmup_steps=1", "--timed_steps=1",
                        "--gen_tokens=8", "--gen_prompt_tokens=4", "--compile=False", "--device=cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = ("swiglu", "dgfn", "hf qwen3") if importlib.util.find_spec("transformers") else ("swiglu", "dgfn")
    for row in rows:
        assert sum(line.startswith(row) for line in lines) >= 1, result.stdout
    assert "dgfn/swiglu step time" in result.stdout
    if "hf qwen3" in rows:
        assert "ours/HF step time" in result.stdout
    assert "speedup" in result.stdout

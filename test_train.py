"""
Tests of train.py and configurator.py on CPU, with tiny models and token shards that the tests write.

The shards hold a noisy Markov chain over 256 token ids, so a tiny model can learn it in a
few dozen steps: most tokens follow from the previous one, and one in ten is random.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import configurator
import train
from model import ModelConfig, Qwen3

REPO = os.path.dirname(os.path.abspath(__file__))
VOCAB = 256
SEQ_LEN = 64

# a 2-layer model with hidden size 64 and about 0.1M parameters
TINY = [
    "--compile=False", f"--vocab_size={VOCAB}", f"--tokenizer_vocab_size={VOCAB}", "--hidden_size=64",
    "--intermediate_size=128", "--num_hidden_layers=2", "--num_attention_heads=4", "--num_key_value_heads=2",
    "--head_dim=16", f"--sequence_length={SEQ_LEN}", "--val_tokens=2048", "--log_interval=1",
    "--warmup_steps=2", "--learning_rate=3e-3", "--dtype=float32", "--device=cpu",
]


def write_shard(path, tokens, magic=20240520, version=1, declared=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = [magic, version, len(tokens) if declared is None else declared]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def markov_tokens(count, seed):
    rng = np.random.default_rng(seed)
    tokens = np.empty(count, dtype=np.int64)
    tokens[0] = 0
    random_ids = rng.integers(0, VOCAB, count)
    is_random = rng.random(count) < 0.1
    for i in range(1, count):
        tokens[i] = random_ids[i] if is_random[i] else (7 * tokens[i - 1] + 3) % VOCAB
    return tokens


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shard(folder / "test_val_000000.bin", markov_tokens(8_000, seed=0))
    write_shard(folder / "test_train_000001.bin", markov_tokens(30_000, seed=1))
    write_shard(folder / "test_train_000002.bin", markov_tokens(30_000, seed=2))
    return str(folder)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(records, kind):
    key = "loss" if kind == "train" else "val_loss"
    return {r["step"]: r[key] for r in records if r["kind"] == kind}


def run_train(data_dir, out_dir, *extra):
    """Run train.main in this process and return the records of its log.jsonl."""
    train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra])
    return read_log(out_dir)


def run_script(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# ----------------------------------------------------------------------------- training runs

def test_tiny_run_lowers_losses(data_dir, tmp_path):
    records = run_train(data_dir, tmp_path, "--max_steps=40", "--eval_interval=20", "--batch_size=8",
                        "--total_batch_size=512")
    train_losses = losses(records, "train")
    val_losses = losses(records, "val")
    assert sorted(val_losses) == [0, 20, 40]
    assert val_losses[40] < val_losses[0] - 1.0, val_losses
    assert sorted(train_losses) == list(range(1, 41))
    assert np.mean([train_losses[s] for s in range(36, 41)]) < train_losses[1] - 1.0
    summary = records[-1]
    assert summary["kind"] == "summary"
    assert summary["last_val_loss"] == val_losses[40]
    assert summary["best_val_loss"] == min(val_losses.values())


RESUME_STEPS = ["--max_steps=8", "--eval_interval=4", "--batch_size=4", "--total_batch_size=512"]


class Killed(Exception):
    """Exception that stands in for killing the training process at a chosen point."""


def test_resume_matches_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    steps = RESUME_STEPS
    full = run_train(data_dir, tmp_path / "full", *steps)

    # Kill the second run right after it writes the step-4 checkpoint, then resume it.
    original_save = train.save_checkpoint

    def save_then_die(path, checkpoint):
        original_save(path, checkpoint)
        if checkpoint["step"] == 4:
            raise Killed

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run_train(data_dir, tmp_path / "resumed", *steps)
    monkeypatch.setattr(train, "save_checkpoint", original_save)
    resumed = run_train(data_dir, tmp_path / "resumed", *steps, "--init_from=resume")

    full_train, resumed_train = losses(full, "train"), losses(resumed, "train")
    assert [resumed_train[s] for s in range(5, 9)] == [full_train[s] for s in range(5, 9)]
    assert losses(resumed, "val")[8] == losses(full, "val")[8]
    full_weights = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["model"]
    resumed_weights = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["model"]
    for name, tensor in full_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name


def test_resume_log_has_each_step_once(data_dir, tmp_path, monkeypatch):
    steps = RESUME_STEPS
    full = run_train(data_dir, tmp_path / "full", *steps)

    # Die in step 7, after steps 5 and 6 were logged but after only the step-4 checkpoint.
    original_schedule = train.learning_rate_at

    def schedule_then_die(step, args, num_steps):
        if step == 6:
            raise Killed
        return original_schedule(step, args, num_steps)

    monkeypatch.setattr(train, "learning_rate_at", schedule_then_die)
    with pytest.raises(Killed):
        run_train(data_dir, tmp_path / "resumed", *steps)
    monkeypatch.setattr(train, "learning_rate_at", original_schedule)
    resumed = run_train(data_dir, tmp_path / "resumed", *steps, "--init_from=resume")

    assert [(r["kind"], r.get("step")) for r in resumed] == [(r["kind"], r.get("step")) for r in full]
    assert losses(resumed, "train") == losses(full, "train")


def test_scratch_run_keeps_existing_checkpoint(data_dir, tmp_path, capsys):
    run_train(data_dir, tmp_path, "--max_steps=2", "--eval_interval=2", "--batch_size=4", "--total_batch_size=256")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_train(data_dir, tmp_path, "--max_steps=2", "--eval_interval=2", "--batch_size=4",
                  "--total_batch_size=256")
    assert exit_info.value.code == 2
    assert "--init_from=resume" in capsys.readouterr().err
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_gradient_accumulation_matches_batch(data_dir, tmp_path):
    common = ["--max_steps=6", "--eval_interval=3", "--total_batch_size=512"]
    single = run_train(data_dir, tmp_path / "single", *common, "--batch_size=8")
    accumulated = run_train(data_dir, tmp_path / "accumulated", *common, "--batch_size=2")
    for kind in ("train", "val"):
        expected, actual = losses(single, kind), losses(accumulated, kind)
        assert sorted(expected) == sorted(actual)
        for step in expected:
            assert actual[step] == pytest.approx(expected[step], abs=1e-5), (kind, step)


def test_ddp_matches_single_process(data_dir, tmp_path):
    steps = ["--max_steps=4", "--eval_interval=2", "--total_batch_size=512"]
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    run_train(data_dir, single_out, *steps, "--batch_size=8")
    # batch_size 2 on 2 ranks gives 2 micro-steps a step, so the gradient-sync skip is exercised too
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        *TINY, *steps, f"--data_dir={data_dir}", f"--out_dir={ddp_out}", "--batch_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 micro-step(s)" in result.stdout
    single, ddp = read_log(single_out), read_log(ddp_out)
    for kind in ("train", "val"):
        expected, actual = losses(single, kind), losses(ddp, kind)
        assert sorted(expected) == sorted(actual)
        for step in expected:
            assert actual[step] == pytest.approx(expected[step], abs=1e-5), (kind, step)


def test_checkpoint_rebuilds_model(data_dir, tmp_path):
    run_train(data_dir, tmp_path, "--max_steps=2", "--eval_interval=2", "--batch_size=8",
              "--total_batch_size=512", "--ffn=dgfn")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 2
    assert checkpoint["settings"]["ffn"] == "dgfn"
    assert not any(name.startswith("_orig_mod.") for name in checkpoint["model"])
    model = Qwen3(ModelConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    assert not os.path.exists(tmp_path / "ckpt.pt.tmp")
    with open(tmp_path / "settings.json") as f:
        assert json.load(f)["ffn"] == "dgfn"
    gates = [r["gate_means"] for r in read_log(tmp_path) if r["kind"] == "val"]
    assert len(gates[-1]) == 2
    assert all(0.0 < g < 1.0 for g in gates[-1])


def test_rng_state_round_trip(tmp_path):
    state = train.capture_rng_state()
    expected = (train.random.random(), np.random.rand(), torch.rand(1))
    torch.save(state, tmp_path / "rng.pt")
    train.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert train.random.random() == expected[0]
    assert np.random.rand() == expected[1]
    assert torch.equal(torch.rand(1), expected[2])


def test_interrupted_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, {"step": 1, "weight": torch.ones(3)})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        train.save_checkpoint(path, {"step": 2, "weight": torch.zeros(3)})
    assert torch.load(path, weights_only=True)["step"] == 1


def test_non_finite_loss_stops_run(data_dir, tmp_path, capsys):
    common = ["--eval_interval=2", "--batch_size=8", "--total_batch_size=512", "--warmup_steps=0"]
    run_train(data_dir, tmp_path, *common, "--max_steps=2")
    checkpoint_bytes = (tmp_path / "ckpt.pt").read_bytes()
    capsys.readouterr()

    # A learning rate of 1e10 makes the weights overflow, so the second resumed step has a NaN gradient.
    with pytest.raises(SystemExit) as stopped:
        run_train(data_dir, tmp_path, *common, "--max_steps=10", "--init_from=resume", "--learning_rate=1e10")
    assert stopped.value.code == 1
    message = capsys.readouterr().err
    assert "not finite at step 4" in message
    assert "from step 2, is unchanged" in message
    assert (tmp_path / "ckpt.pt").read_bytes() == checkpoint_bytes
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


# ----------------------------------------------------------------------------- data loader

def test_loader_shifts_targets_within_shards(tmp_path):
    # A global batch is 2 ranks * 2 sequences * 64 = 256 tokens plus one target. Shard 0 fits 3 of
    # them with one token to spare, which a fourth batch would need, and shard 1 fits 2.
    sizes = [1024, 700]
    tokens = []
    for index, size in enumerate(sizes):
        shard = (np.arange(size) + 1000 * index) % 60000
        tokens.append(shard)
        write_shard(tmp_path / f"x_train_{index:06d}.bin", shard)
    files = sorted(str(p) for p in tmp_path.glob("*_train_*.bin"))
    loaders = [train.DataLoader(files, batch_size=2, seq_len=64, rank=r, world_size=2) for r in range(2)]
    assert loaders[0].batches_per_pass() == 3 + 2

    expected_starts = [(0, 0), (0, 256), (0, 512), (1, 0), (1, 256), (0, 0)]  # wraps to the first shard
    for shard_index, position in expected_starts:
        for rank, loader in enumerate(loaders):
            inputs, targets = loader.next_batch()
            assert inputs.dtype == torch.int64
            assert inputs.shape == (2, 64)
            start = position + rank * 128
            source = tokens[shard_index][start:start + 129]
            assert len(source) == 129, "read past the end of a shard"
            assert inputs.flatten().tolist() == source[:-1].tolist()
            assert targets.flatten().tolist() == source[1:].tolist()
            assert torch.equal(inputs.flatten()[1:], targets.flatten()[:-1])


def test_loader_resumes_from_state(tmp_path):
    write_shard(tmp_path / "x_train_000000.bin", np.arange(2000))
    files = [str(tmp_path / "x_train_000000.bin")]
    loader = train.DataLoader(files, batch_size=2, seq_len=16)
    loader.next_batch()
    state = loader.state_dict()
    expected = loader.next_batch()
    other = train.DataLoader(files, batch_size=2, seq_len=16)
    other.load_state_dict(state)
    actual = other.next_batch()
    assert torch.equal(actual[0], expected[0])
    assert torch.equal(actual[1], expected[1])


@pytest.mark.parametrize("case, expected", [
    ("magic", "magic number 12345"),
    ("version", "version 7"),
    ("odd_length", "the file has 1025 bytes"),
    ("truncated", "declares 100 tokens"),
    ("short_header", "shorter than the 1024-byte header"),
])
def test_read_shard_rejects_bad_file(tmp_path, case, expected):
    path = tmp_path / f"{case}_train_000000.bin"
    if case == "magic":
        write_shard(path, np.arange(10), magic=12345)
    elif case == "version":
        write_shard(path, np.arange(10), version=7)
    elif case == "odd_length":
        write_shard(path, [], declared=0)
        with open(path, "ab") as f:
            f.write(b"\x01")
    elif case == "truncated":
        write_shard(path, np.arange(50), declared=100)
    else:
        path.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError) as error:
        train.read_shard(str(path))
    assert expected in str(error.value)
    assert str(path) in str(error.value)


def test_loader_rejects_too_small_shard(tmp_path):
    write_shard(tmp_path / "x_train_000000.bin", np.arange(100))
    with pytest.raises(ValueError, match="fewer than the 129"):
        train.DataLoader([str(tmp_path / "x_train_000000.bin")], batch_size=2, seq_len=64)


def test_missing_data_dir_names_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main(TINY + [f"--data_dir={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'out'}",
                           "--max_steps=1"])
    assert stopped.value.code == 2
    assert "python prepare_fineweb.py" in capsys.readouterr().err


# ----------------------------------------------------------------------------- schedule

def schedule_args(**overrides):
    values = {"learning_rate": 1.0, "min_lr_ratio": 0.1, "warmup_steps": 10, "lr_schedule": "cosine",
              "decay_fraction": 0.2}
    values.update(overrides)
    return train.SimpleNamespace(**values)


def test_cosine_schedule_shape():
    args = schedule_args()
    rates = [train.learning_rate_at(step, args, 110) for step in range(110)]
    assert rates[0] == pytest.approx(0.1)
    assert rates[9] == pytest.approx(1.0)
    assert rates[60] == pytest.approx(0.55)
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))


def test_wsd_schedule_shape():
    args = schedule_args(lr_schedule="wsd")
    rates = [train.learning_rate_at(step, args, 100) for step in range(101)]
    assert rates[50] == 1.0
    assert rates[80] == 1.0
    assert rates[90] == pytest.approx(0.55)
    assert rates[100] == pytest.approx(0.1)


# ----------------------------------------------------------------------------- settings and command line

@pytest.mark.parametrize("argument, expected", [
    ("--batch_sise=4", "unknown setting 'batch_sise'"),
    ("--batch_size=four", "'four' for int setting 'batch_size'"),
    ("--ffn=mlp", "invalid ffn 'mlp'"),
    ("--init_from=latest", "invalid init_from='latest'"),
    ("--total_batch_size=1000", "invalid total_batch_size=1000"),
    ("--learning_rate=-1", "invalid learning_rate=-1"),
    ("--vocab_size=100", "invalid vocab_size=100"),
    ("--hidden_size=0", "invalid hidden_size=0"),
])
def test_bad_setting_exits_with_message(tmp_path, capsys, argument, expected):
    with pytest.raises(SystemExit) as stopped:
        train.main(TINY + [f"--out_dir={tmp_path}", argument])
    assert stopped.value.code == 2
    assert expected in capsys.readouterr().err


def test_command_line_errors_and_help():
    result = run_script("train.py", "--compile=maybe")
    assert result.returncode == 2
    assert "invalid value 'maybe' for bool setting 'compile'" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_script("train.py", "--help")
    assert result.returncode == 0
    settings = configurator.collect_settings(vars(train))
    assert len(settings) >= 30
    for name, value in settings.items():
        line = next((l for l in result.stdout.splitlines() if l.strip().startswith(f"--{name} ")), None)
        assert line is not None, name
        assert repr(value) in line, name
        assert "(no description)" not in line, name


@pytest.mark.parametrize("name", ["train_cpu_demo.py", "train_fineweb_swiglu.py", "train_fineweb_dgfn.py"])
def test_config_files_apply(name):
    settings = configurator.configure(vars(train), train.__file__, [os.path.join(REPO, "config", name)])
    assert settings["total_batch_size"] % (settings["batch_size"] * settings["sequence_length"]) == 0
    assert settings["sequence_length"] <= settings["max_position_embeddings"]
    ModelConfig(**{field: settings[field] for field in ModelConfig.__dataclass_fields__})
    if name == "train_cpu_demo.py":
        assert settings["device"] == "cpu"
        assert settings["compile"] is False
        assert settings["data_dir"] == "data/fineweb_sample"
    else:
        assert settings["ffn"] in name


# ----------------------------------------------------------------------------- configurator

DEFAULTS = {"batch_size": 16, "learning_rate": 6e-4, "compile": True, "ffn": "swiglu"}


def test_is_setting_rule():
    namespace = {"batch_size": 1, "ratio": 0.5, "flag": False, "name": "x", "_private": 1, "MAGIC": 5,
                 "items": [1], "nothing": None, "module": configurator}
    assert configurator.collect_settings(namespace) == {"batch_size": 1, "ratio": 0.5, "flag": False, "name": "x"}


@pytest.mark.parametrize("text, expected", [
    ("True", True), ("true", True), ("1", True), ("False", False), ("false", False), ("0", False),
])
def test_bool_parsing(text, expected):
    assert configurator.configure(DEFAULTS, "x.py", [f"--compile={text}"])["compile"] is expected


@pytest.mark.parametrize("argument", ["--compile=yes", "--compile=TRUE", "--batch_size=2.5", "--learning_rate=fast"])
def test_invalid_values_exit_2(argument, capsys):
    with pytest.raises(SystemExit) as stopped:
        configurator.configure(DEFAULTS, "x.py", [argument])
    assert stopped.value.code == 2
    assert argument.split("=")[0][2:] in capsys.readouterr().err


def test_typed_overrides():
    settings = configurator.configure(DEFAULTS, "x.py", ["--learning_rate=1", "--batch_size=32", "--ffn=dgfn"])
    assert settings == {"batch_size": 32, "learning_rate": 1.0, "compile": True, "ffn": "dgfn"}
    assert type(settings["learning_rate"]) is float
    assert DEFAULTS["batch_size"] == 16, "the input dict must not change"


def test_unknown_key_suggests_name(capsys):
    with pytest.raises(SystemExit) as stopped:
        configurator.configure(DEFAULTS, "x.py", ["--learning_rat=1"])
    assert stopped.value.code == 2
    assert "Did you mean: learning_rate?" in capsys.readouterr().err


def test_config_file_then_override_order(tmp_path):
    config = tmp_path / "config.py"
    config.write_text("import math\nbatch_size = 2 ** 3\nlearning_rate = 1\nffn = 'dgfn'\n")
    settings = configurator.configure(DEFAULTS, "x.py", [str(config), "--batch_size=5"])
    assert settings["batch_size"] == 5
    assert settings["learning_rate"] == 1.0
    assert settings["ffn"] == "dgfn"
    assert configurator.configure(DEFAULTS, "x.py", ["--batch_size=5", str(config)])["batch_size"] == 8


@pytest.mark.parametrize("source, expected", [
    ("batch_sizes = 3\n", "unknown setting 'batch_sizes'"),
    ("batch_size = 3.0\n", "expected int"),
    ("compile = 1\n", "expected bool"),
    ("batch_size = \n", "failed to run: SyntaxError"),
])
def test_config_file_errors(tmp_path, capsys, source, expected):
    config = tmp_path / "config.py"
    config.write_text(source)
    with pytest.raises(SystemExit) as stopped:
        configurator.configure(DEFAULTS, "x.py", [str(config)])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert expected in message
    assert str(config) in message


def test_missing_config_file(capsys):
    with pytest.raises(SystemExit) as stopped:
        configurator.configure(DEFAULTS, "x.py", ["no/such/config.py"])
    assert stopped.value.code == 2
    assert "config file not found: no/such/config.py" in capsys.readouterr().err


def test_help_reads_comments(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text('"""Do a thing.\n\nMore."""\nbatch_size = 16  # sequences per step\n'
                      'learning_rate = 6e-4  # peak rate\ncompile = True\nffn = "swiglu"  # block: a # b\n')
    with pytest.raises(SystemExit) as stopped:
        configurator.configure(DEFAULTS, str(script), ["--batch_size=3", "-h"])
    assert stopped.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Do a thing." in lines
    assert any("--batch_size" in l and "16" in l and "sequences per step" in l for l in lines)
    assert any("--learning_rate" in l and "0.0006" in l and "peak rate" in l for l in lines)
    assert any("--compile" in l and "(no description)" in l for l in lines)
    assert any("--ffn" in l and "block: a # b" in l for l in lines)

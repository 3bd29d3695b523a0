"""
Train the Qwen3 model of model.py (SwiGLU or DGFN feed-forward block) on FineWeb token shards.

    python train.py                                   # the 82M-parameter, 2B-token experiment, one process
    python train.py --ffn=dgfn                        # the same with the DGFN block
    torchrun --standalone --nproc_per_node=8 train.py # data-parallel on 8 GPUs, same global batch
    python train.py config/train_cpu_demo.py          # a small model in a few minutes on a CPU
    python train.py --help                            # every setting with its default and meaning

Settings are the module-level assignments below; config files and --key=value arguments
override them (see configurator.py). Output in out_dir: ckpt.pt, log.jsonl, settings.json.
"""
import contextlib
import dataclasses
import glob
import json
import math
import os
import random
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import configurator
from model import ModelConfig, Qwen3

# -----------------------------------------------------------------------------
# data and output
data_dir = "data/fineweb10B"  # folder with fineweb_val_*.bin and fineweb_train_*.bin shards (from prepare_fineweb.py)
out_dir = "out"  # folder for ckpt.pt, log.jsonl and settings.json
init_from = "scratch"  # scratch (new model from seed) or resume (continue from out_dir/ckpt.pt)
# model: the names and defaults of model.ModelConfig, the 82M-parameter model of the experiment
ffn = ModelConfig.ffn  # feed-forward block: swiglu or dgfn
dgfn_memory = ModelConfig.dgfn_memory  # DGFN memory read-out: relu or softmax
dgfn_gate = ModelConfig.dgfn_gate  # DGFN mix: dynamic (learned per-token sigmoid gate) or a fixed lambda in [0, 1], e.g. 0.5
vocab_size = ModelConfig.vocab_size  # embedding rows: GPT-2's 50257 ids padded to a multiple of 64
hidden_size = ModelConfig.hidden_size  # width d of the residual stream
intermediate_size = ModelConfig.intermediate_size  # feed-forward width I
num_hidden_layers = ModelConfig.num_hidden_layers  # number of decoder layers
num_attention_heads = ModelConfig.num_attention_heads  # query heads per layer
num_key_value_heads = ModelConfig.num_key_value_heads  # key/value heads per layer (grouped-query attention)
head_dim = ModelConfig.head_dim  # width of one attention head
max_position_embeddings = ModelConfig.max_position_embeddings  # maximum sequence length the model accepts, in tokens
rope_theta = ModelConfig.rope_theta  # RoPE base
rms_norm_eps = ModelConfig.rms_norm_eps  # epsilon of every RMSNorm
tie_word_embeddings = ModelConfig.tie_word_embeddings  # share the weight of lm_head and embed_tokens
initializer_range = ModelConfig.initializer_range  # standard deviation of the normal weight init
tokenizer_vocab_size = ModelConfig.tokenizer_vocab_size  # number of ids the tokenizer produces; higher ids are padding
# batch and length
sequence_length = 1024  # tokens per training sequence
# NOTE: batch_size 64 is an estimate of what fits in 80 GB at the default model size in bfloat16,
# not yet measured on a GPU. A smaller batch_size keeps the global batch through more micro-steps.
batch_size = 64  # micro-batch size per process, in sequences
total_batch_size = 524288  # tokens per optimizer step over all processes and micro-steps (2^19, about 0.5M)
train_tokens = 2_000_000_000  # training length in tokens, used when max_steps is 0
max_steps = 0  # optimizer steps to train, or 0 for train_tokens // total_batch_size (3814 with the defaults)
# optimizer: AdamW. The DGFN paper gives no optimizer settings, so these follow GPT-3 Small
# (125M parameters, 0.5M-token batches; Brown et al. 2020, arXiv 2005.14165, Table 2.1 and
# Appendix B), which the PolyReLU paper (arXiv 2411.03884) also uses for its dense runs.
learning_rate = 6e-4  # peak learning rate (GPT-3 Small)
min_lr_ratio = 0.1  # final learning rate as a fraction of the peak (GPT-3 and Chinchilla decay to 10%)
weight_decay = 0.1  # AdamW weight decay of matrices and embeddings (GPT-3)
beta1 = 0.9  # AdamW beta1 (GPT-3)
beta2 = 0.95  # AdamW beta2 (GPT-3)
grad_clip = 1.0  # clip the global gradient norm to this value; 0 disables clipping (GPT-3 uses 1.0)
lr_schedule = "cosine"  # cosine (warmup, then cosine decay to the final rate) or wsd (warmup, constant, linear decay)
warmup_steps = 200  # linear warmup steps: 200 are 105M tokens or about 5% of the run (GPT-3 warmed up over 375M of 300B tokens)
decay_fraction = 0.2  # wsd only: fraction of the steps spent in the final linear decay (such a cooldown matched cosine in arXiv 2405.18392)
# evaluation and logging
eval_interval = 250  # steps between validation runs, each followed by a checkpoint
val_tokens = 10485760  # validation tokens from the start of the val shards (10 x 2^20, as modded-nanogpt uses)
log_interval = 10  # steps between train log lines
# system
device = "auto"  # cpu, cuda, cuda:N, or auto (cuda when available, else cpu). Under torchrun, cuda means cuda:LOCAL_RANK
dtype = "auto"  # float32 or bfloat16 (autocast), or auto (bfloat16 on cuda where supported, else float32)
compile = True  # torch.compile the model (slow to start, especially on CPU)
seed = 1337  # seed of the python, numpy and torch random generators (model init)
# -----------------------------------------------------------------------------

SHARD_MAGIC = 20240520  # header layout of llm.c's token shards, also written by prepare_fineweb.py
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def fail(message, status=2):
    """Print an error to stderr (on rank 0 only) and exit with `status`: 2 for a user error, 1 for a failed run."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


# ----------------------------------------------------------------------------- data

def read_shard(path):
    """Memory-map the uint16 tokens of a shard after checking its header; raise ValueError naming the file."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"invalid shard {path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"invalid shard {path}: magic number {header[0]}, expected {SHARD_MAGIC}")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"invalid shard {path}: version {header[1]}, expected {SHARD_VERSION}")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens <= 0 or size != expected:
        raise ValueError(f"invalid shard {path}: the header declares {num_tokens} tokens ({expected} bytes) "
                         f"but the file has {size} bytes. Recreate it with prepare_fineweb.py")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def shard_token_count(path):
    """Return the token count declared in a shard's header (read_shard checks it)."""
    return int(np.fromfile(path, dtype="<i4", count=3)[2])


def find_shards(data_dir, split):
    """Return the sorted shard paths of a split (train or val), or exit with the command that creates them."""
    files = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.bin")))
    if not files:
        fail(f"no {split} shards (*_{split}_*.bin) found in data_dir={data_dir!r}. Create them with "
             f"'python prepare_fineweb.py --out_dir {data_dir}' (options: python prepare_fineweb.py --help) "
             f"or point --data_dir at existing shards")
    return files


class DataLoader:
    """Reads (inputs, targets) batches in order from token shards.

    A global batch is world_size * batch_size * seq_len consecutive tokens, and each rank takes
    its own slice of it. The tail of a shard that cannot fill a whole global batch is skipped,
    and after the last shard reading starts again at the first. The cursor (shard index,
    position) is the whole state, so a checkpoint can store it.
    """

    def __init__(self, files, batch_size, seq_len, rank=0, world_size=1):
        self.files = files
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.span = world_size * batch_size * seq_len  # tokens consumed per global batch
        self.load_state_dict({"shard_index": 0, "position": 0})

    def _open(self, shard_index):
        self.tokens = read_shard(self.files[shard_index])
        self.shard_index = shard_index
        if len(self.tokens) < self.span + 1:  # + 1 for the target of the last input token
            raise ValueError(f"shard {self.files[shard_index]} has {len(self.tokens)} tokens, fewer than the "
                             f"{self.span + 1} that one global batch needs. Lower batch_size or sequence_length")

    def batches_per_pass(self):
        """Return how many global batches one pass over all shards yields."""
        return sum((shard_token_count(path) - 1) // self.span for path in self.files)

    def next_batch(self):
        """Return the next inputs and targets as int64 tensors of shape (batch_size, seq_len).

        The targets are the inputs shifted by one token.
        """
        if self.position + self.span + 1 > len(self.tokens):
            self._open((self.shard_index + 1) % len(self.files))
            self.position = 0
        start = self.position + self.rank * self.batch_size * self.seq_len
        chunk = self.tokens[start:start + self.batch_size * self.seq_len + 1].astype(np.int64)
        self.position += self.span
        chunk = torch.from_numpy(chunk)
        inputs = chunk[:-1].view(self.batch_size, self.seq_len)
        targets = chunk[1:].view(self.batch_size, self.seq_len)
        return inputs, targets

    def state_dict(self):
        return {"shard_index": self.shard_index, "position": self.position}

    def load_state_dict(self, state):
        self._open(state["shard_index"])
        self.position = state["position"]


# ----------------------------------------------------------------------------- schedule and evaluation

def learning_rate_at(step, args, num_steps):
    """Return the learning rate of optimizer step `step` (0-based) of a run of num_steps steps."""
    peak, final = args.learning_rate, args.learning_rate * args.min_lr_ratio
    if step < args.warmup_steps:
        return peak * (step + 1) / args.warmup_steps
    if args.lr_schedule == "cosine":
        progress = (step - args.warmup_steps) / max(1, num_steps - args.warmup_steps)
        return final + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (peak - final)
    decay_start = max(args.warmup_steps, num_steps - round(args.decay_fraction * num_steps))
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, num_steps - decay_start)
    return peak + min(progress, 1.0) * (final - peak)


@torch.no_grad()
def evaluate(model, raw_model, loader, num_batches, autocast, world_size):
    """Return the mean validation cross-entropy (nats) over the same fixed tokens every call,
    and the per-layer mean DGFN gate (None without a learned gate), both averaged over ranks."""
    model.eval()
    loader.load_state_dict({"shard_index": 0, "position": 0})
    device = next(raw_model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    gate_sum = None
    for _ in range(num_batches):
        inputs, targets = loader.next_batch()
        with autocast:
            _, loss = model(inputs.to(device), targets.to(device))
        loss_sum += loss.float()
        gates = raw_model.gate_means()
        if gates is not None:
            gates = torch.tensor(gates, device=device)
            gate_sum = gates if gate_sum is None else gate_sum + gates
    model.train()

    # Every batch has the same token count, so the mean of batch means is the mean over all tokens.
    if world_size > 1:
        dist.all_reduce(loss_sum)  # SUM, because gloo has no AVG
        if gate_sum is not None:
            dist.all_reduce(gate_sum)
    val_loss = loss_sum.item() / (num_batches * world_size)
    gate_means = None if gate_sum is None else (gate_sum / (num_batches * world_size)).tolist()
    return val_loss, gate_means


# ----------------------------------------------------------------------------- checkpoints

def capture_rng_state():
    """Return the python, numpy and torch RNG states in types torch.load(weights_only=True) accepts."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, checkpoint):
    """Write a checkpoint atomically: a kill during the write leaves the previous file intact."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def resume_from_checkpoint(path, settings, model_config, raw_model, optimizer, train_loader):
    """Load model, optimizer, data cursor and RNG states from a checkpoint, in place.

    Returns (step, best val loss, its step, last val loss). Exits with status 2 when the
    checkpoint is missing or was written for a different model shape.
    """
    if not os.path.exists(path):
        fail(f"init_from=resume but {path} does not exist. Start with --init_from=scratch")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    current = dataclasses.asdict(model_config)
    if checkpoint["model_config"] != current:
        changed = [name for name, value in checkpoint["model_config"].items() if current.get(name) != value]
        fail(f"the model settings differ from those in {path}: {', '.join(changed)}. "
             f"Resume with the settings of the run that wrote it")
    changed = [name for name, value in checkpoint["settings"].items()
               if name != "init_from" and settings.get(name) != value]
    if changed and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: resuming with changed settings: {', '.join(changed)}")

    raw_model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    train_loader.load_state_dict(checkpoint["train_loader"])
    restore_rng_state(checkpoint["rng"])
    return checkpoint["step"], checkpoint["best_val_loss"], checkpoint["best_step"], checkpoint["val_loss"]


def trim_log(path, step):
    """Drop the log records after `step`, which a resumed run writes again, and any final summary."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records if r["kind"] != "summary" and r.get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


# ----------------------------------------------------------------------------- setup

def resolve_settings(argv):
    """Apply config files and --key=value arguments, check the values, and return settings, a namespace and the model config."""
    settings = configurator.configure(globals(), __file__, argv)
    args = SimpleNamespace(**settings)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    choices = {"init_from": ("scratch", "resume"), "lr_schedule": ("cosine", "wsd"),
               "dtype": ("auto", "float32", "bfloat16")}
    for name, valid in choices.items():
        if getattr(args, name) not in valid:
            fail(f"invalid {name}={getattr(args, name)!r}: valid values are {', '.join(valid)}")
    for name in ("sequence_length", "batch_size", "total_batch_size", "eval_interval", "val_tokens", "log_interval"):
        if getattr(args, name) <= 0:
            fail(f"invalid {name}={getattr(args, name)}: it must be positive")
    for name in ("max_steps", "warmup_steps", "grad_clip", "weight_decay", "learning_rate"):
        if getattr(args, name) < 0:
            fail(f"invalid {name}={getattr(args, name)}: it must not be negative")
    for name in ("min_lr_ratio", "decay_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"invalid {name}={getattr(args, name)}: it must be between 0 and 1")

    tokens_per_micro_step = args.batch_size * args.sequence_length * world_size
    if args.total_batch_size % tokens_per_micro_step:
        fail(f"invalid total_batch_size={args.total_batch_size}: it must be a multiple of batch_size * "
             f"sequence_length * processes = {args.batch_size} * {args.sequence_length} * {world_size} "
             f"= {tokens_per_micro_step}. Change total_batch_size or batch_size")
    if args.sequence_length > args.max_position_embeddings:
        fail(f"invalid sequence_length={args.sequence_length}: it exceeds "
             f"max_position_embeddings={args.max_position_embeddings}")
    if args.max_steps == 0 and args.train_tokens < args.total_batch_size:
        fail(f"invalid train_tokens={args.train_tokens}: it is less than one step of "
             f"total_batch_size={args.total_batch_size} tokens. Raise it or set max_steps")

    fields = {field.name: settings[field.name] for field in dataclasses.fields(ModelConfig)}
    try:
        model_config = ModelConfig(**fields)
    except ValueError as error:
        fail(f"invalid model setting: {error}")
    return settings, args, model_config


def setup_device(args):
    """Start the process group under torchrun and return (rank, local_rank, world_size, device)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"  # torch.cuda.set_device needs an index; LOCAL_RANK is 0 without torchrun
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"invalid device={args.device!r}: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world_size, device


def main(argv=None):
    settings, args, model_config = resolve_settings(argv)
    rank, local_rank, world_size, device = setup_device(args)
    master = rank == 0
    ddp = world_size > 1

    def say(message):
        if master:
            tqdm.write(message)
            sys.stdout.flush()  # show progress promptly when stdout is a file or a pipe

    torch.manual_seed(args.seed)  # the same seed on every rank gives every replica the same initial weights
    np.random.seed(args.seed)
    random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = args.dtype == "bfloat16" or (
        args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext())

    grad_accum_steps = args.total_batch_size // (args.batch_size * args.sequence_length * world_size)
    num_steps = args.max_steps or args.train_tokens // args.total_batch_size
    if master:
        print("settings:\n" + "\n".join(f"  {name} = {value!r}" for name, value in settings.items()))
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "settings.json"), "w") as f:
            json.dump(settings, f, indent=1)
    say(f"{world_size} process(es) on {device}, {'bfloat16 autocast' if use_bf16 else 'float32'}; "
        f"{num_steps} step(s) of {args.total_batch_size} tokens, {grad_accum_steps} micro-step(s) each")

    # data: a missing folder or a corrupt shard stops every rank with the same message
    try:
        train_loader = DataLoader(find_shards(args.data_dir, "train"), args.batch_size, args.sequence_length,
                                  rank, world_size)
        val_loader = DataLoader(find_shards(args.data_dir, "val"), args.batch_size, args.sequence_length,
                                rank, world_size)
    except ValueError as error:
        fail(str(error), status=1)
    val_batches = min(args.val_tokens // val_loader.span, val_loader.batches_per_pass())
    if val_batches == 0:
        fail(f"val_tokens={args.val_tokens} is less than one global batch of {val_loader.span} tokens, or the "
             f"val shards are shorter than that. Raise val_tokens or lower batch_size")
    if val_batches * val_loader.span != args.val_tokens:
        say(f"note: validating on {val_batches * val_loader.span} tokens (whole global batches that fit in "
            f"val_tokens={args.val_tokens} and in the val shards)")

    # model and optimizer, then the checkpoint on resume
    raw_model = Qwen3(model_config).to(device)
    optimizer = raw_model.configure_optimizers(args.weight_decay, args.learning_rate,
                                               (args.beta1, args.beta2), device.type)
    checkpoint_path = os.path.join(args.out_dir, "ckpt.pt")
    start_step, best_val, best_step, last_val = 0, math.inf, -1, math.inf
    saved_step = None  # step of the checkpoint in checkpoint_path, if this run wrote or resumed from one
    if args.init_from == "scratch" and os.path.exists(checkpoint_path):
        fail(f"{checkpoint_path} already exists, and init_from=scratch would overwrite it. Continue that run "
             f"with --init_from=resume, choose another --out_dir, or delete {checkpoint_path} to start over")
    if args.init_from == "resume":
        start_step, best_val, best_step, last_val = resume_from_checkpoint(
            checkpoint_path, settings, model_config, raw_model, optimizer, train_loader)
        saved_step = start_step
        say(f"resumed from {checkpoint_path} at step {start_step}")
    say(f"model: {raw_model.num_parameters():,} parameters, ffn={model_config.ffn}")

    model = raw_model
    if args.compile:
        model = torch.compile(raw_model)
    train_model = model  # the module that training steps call: the DDP wrapper under torchrun
    if ddp:
        train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)

    log_file = None
    if master:
        log_path = os.path.join(args.out_dir, "log.jsonl")
        if args.init_from == "resume":
            trim_log(log_path, start_step)
        log_file = open(log_path, "a" if args.init_from == "resume" else "w")

    def log_record(record):
        if master:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    progress = tqdm(total=num_steps, initial=start_step, disable=None if master else True, desc="train")
    run_start = time.time()
    # `step` counts the optimizer steps already taken. Validation at `step` uses the weights after that
    # many steps, and the train line of a step shows its 1-based number, step + 1, as llm.c does.
    for step in range(start_step, num_steps + 1):
        last_step = step == num_steps

        # Validate, then save a checkpoint. A resumed run skips its first step, which the run that
        # saved the checkpoint has already validated.
        if (step % args.eval_interval == 0 or last_step) and not (args.init_from == "resume" and step == start_step):
            last_val, gate_means = evaluate(model, raw_model, val_loader, val_batches, autocast, world_size)
            if last_val < best_val:
                best_val, best_step = last_val, step
            gates = "" if gate_means is None else " | gates " + " ".join(f"{g:.3f}" for g in gate_means)
            say(f"step {step:5d}/{num_steps} | val loss {last_val:.6f}{gates}")
            log_record({"kind": "val", "step": step, "val_loss": last_val, "gate_means": gate_means})
            if step > 0:
                if master:
                    save_checkpoint(checkpoint_path, {
                        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "model_config": dataclasses.asdict(model_config), "settings": settings,
                        "step": step, "train_loader": train_loader.state_dict(), "rng": capture_rng_state(),
                        "val_loss": last_val, "best_val_loss": best_val, "best_step": best_step,
                    })
                saved_step = step
        if last_step:
            break

        # one optimizer step over grad_accum_steps micro-batches
        step_start = time.time()
        lr = learning_rate_at(step, args, num_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(grad_accum_steps):
            inputs, targets = train_loader.next_batch()
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if ddp:
                # All-reduce the gradients only in the last micro-step's backward. DDP reads this flag
                # in forward, so it is set before the forward.
                train_model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
            with autocast:
                _, loss = train_model(inputs, targets)
            # The loss is a mean over this micro-batch, and backward() adds gradients across micro-steps,
            # so dividing by grad_accum_steps makes the sum the gradient of the mean over the whole batch.
            loss = loss / grad_accum_steps
            loss_sum += loss.detach()
            loss.backward()
        if ddp:
            dist.all_reduce(loss_sum)
            loss_sum /= world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or math.inf)
        train_loss, grad_norm = loss_sum.item(), grad_norm.item()
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            checkpoint_note = "No checkpoint was written."
            if saved_step:
                checkpoint_note = f"The last checkpoint, {checkpoint_path} from step {saved_step}, is unchanged."
            message = (f"training loss {train_loss} or gradient norm {grad_norm} is not finite at step {step + 1}, "
                       f"so the run stops before updating the weights. {checkpoint_note}")
            log_record({"kind": "error", "step": step + 1, "message": message})
            if ddp:
                dist.destroy_process_group()
            fail(message, status=1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.time() - step_start
        progress.update(1)

        if step % args.log_interval == 0 or step == num_steps - 1:
            tokens_per_second = args.total_batch_size / step_time
            mfu = raw_model.estimate_mfu(tokens_per_second / world_size, args.sequence_length, device)
            say(f"step {step + 1:5d}/{num_steps} | loss {train_loss:.6f} | lr {lr:.2e} | norm {grad_norm:.4f} | "
                f"{step_time * 1000:.1f} ms | {tokens_per_second:,.0f} tok/s"
                + ("" if mfu is None else f" | MFU {100 * mfu:.1f}%"))
            log_record({"kind": "train", "step": step + 1, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                        "ms": step_time * 1000, "tokens_per_second": tokens_per_second, "mfu": mfu})

    progress.close()
    summary = {"kind": "summary", "best_val_loss": best_val, "best_step": best_step, "last_val_loss": last_val,
               "steps": num_steps, "minutes": (time.time() - run_start) / 60}
    say(f"done: best val loss {best_val:.6f} at step {best_step}, last val loss {last_val:.6f} at step {num_steps}")
    log_record(summary)
    if master:
        log_file.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

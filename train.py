"""
One training loop for the three architectures (dec, encdec, bdd), in the spirit of nanoGPT's
train.py. Every field of TrainConfig is a flag:

    python train.py --arch bdd                                  # CPU: a small BDD on Shakespeare
    python train.py --arch encdec --objective span --max_iters 300
    python train.py --arch bdd --init_from resume --max_iters 800    # continue out/bdd/ckpt.pt
    torchrun --standalone --nproc_per_node=4 train.py --arch bdd     # DistributedDataParallel

TrainConfig's defaults are the CPU run (1.6M byte tokens, about 5 minutes on 2 cores); on a CUDA
machine the flags left unset take CUDA_DEFAULTS instead (GPT-2-small width, gpt2 tokens, bf16,
torch.compile). Other scripts train with train(make_config(arch=..., ...)) and read the history.

Exit codes of the script: 2 with one line on stderr for bad flags, data, folders or checkpoints; 1
when the loss turns nan or inf (the last good checkpoint is kept); 130 on Ctrl-C.
"""

import argparse
import json
import math
import os
import textwrap
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cli
import corpus
import pack
from model import ARCHS, ModelConfig, build_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = {"arch": ARCHS, "objective": pack.OBJECTIVES, "tokenizer": corpus.TOKENIZERS,
           "init_from": ("scratch", "resume"), "dtype": tuple(DTYPES)}


@dataclass
class TrainConfig:
    # what to train
    arch: str = "bdd"
    objective: str = "prefix_lm"  # encdec pretraining objective; dec and bdd predict every token
    max_blocks: int = 8  # bdd: 1 to max_blocks - 1 random block boundaries per layout
    block_layouts: int = 4  # bdd: random block layouts per batch (pack.layout_groups)
    # data and output
    data: str = None  # text or jsonl file, folder of them, glob, nanoGPT folder; None: Shakespeare
    data_root: str = None  # where prepared datasets are cached; None: data/ in the repository
    tokenizer: str = "byte"
    text_field: str = "text"  # the text field of jsonl lines
    rehash: bool = False  # re-read the whole source to decide whether its prepared copy is current
    out_dir: str = None  # None: out/<arch>
    init_from: str = "scratch"  # or "resume" from out_dir/ckpt.pt
    overwrite: bool = False  # a fresh run may replace the run already in out_dir
    always_save_checkpoint: bool = False  # save at every evaluation, not only when val improves
    # model
    n_layer: int = 6  # total depth; encdec and bdd split it into encoder + n_dec_layer
    n_dec_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.0
    bias: bool = False
    # optimisation: AdamW, linear warmup, cosine decay to min_lr at lr_decay_iters
    batch_size: int = 16  # rows per micro-step and process
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step, on each process
    max_iters: int = 400
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 50
    lr_decay_iters: int = None  # None: follow max_iters (also a resumed run's new max_iters)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99  # 0.99 for small batches of tokens, as nanoGPT's Shakespeare-char
    grad_clip: float = 1.0  # 0: no clipping
    # evaluation and logging
    eval_interval: int = 100
    eval_iters: int = 4  # batches per evaluation set: eval_iters * batch_size windows
    log_interval: int = 10
    # system
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    flex: bool = False  # FlexAttention block masks (worth it on CUDA only)
    seed: int = 1337

    def __post_init__(self):
        if self.out_dir is None:
            self.out_dir = os.path.join("out", self.arch)


# The allowed values of every numeric field, checked by check_config in one loop: "[" and "]"
# include the bound, "(" and ")" exclude it. nan lies in no interval.
RANGES = {
    "max_blocks": "[2, inf)", "block_layouts": "[1, inf)", "n_layer": "[2, inf)", "n_dec_layer": "[1, inf)",
    "n_head": "[1, inf)", "n_embd": "[2, inf)", "block_size": "[2, inf)", "dropout": "[0, 1)",
    "batch_size": "[1, inf)", "gradient_accumulation_steps": "[1, inf)", "max_iters": "[0, inf)",
    "learning_rate": "(0, inf)", "min_lr": "[0, inf)", "warmup_iters": "[0, inf)",
    "lr_decay_iters": "[0, inf)", "weight_decay": "[0, inf)", "beta1": "[0, 1)",
    "beta2": "[0, 1)", "grad_clip": "[0, inf)", "eval_interval": "[1, inf)",
    "eval_iters": "[1, inf)", "log_interval": "[1, inf)", "seed": "[0, 1e18]",
}
# Path fields where "" would silently mean the current folder.
PATH_FIELDS = ("data", "data_root", "out_dir")


# A single-GPU run of GPT-2-small width: 16 x 1024 tokens x 2 micro-steps = 32k tokens per step,
# 1000 steps = 23 passes over Shakespeare's 1.4M gpt2 tokens, so dropout against overfitting.
CUDA_DEFAULTS = dict(tokenizer="gpt2", n_layer=12, n_dec_layer=4, n_head=12, n_embd=768,
                     block_size=1024, dropout=0.1, batch_size=16, gradient_accumulation_steps=2,
                     max_iters=1000, learning_rate=6e-4, min_lr=6e-5, warmup_iters=100, beta2=0.95,
                     eval_interval=250, eval_iters=10, dtype="bfloat16", compile=True)

# What a resumed run keeps of the machine it runs on rather than of the checkpoint.
MACHINE_FIELDS = ("device", "dtype", "compile", "flex", "init_from", "out_dir", "overwrite",
                  "rehash")
# Checkpoint and run must agree on these, or the weights do not fit the model.
SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_dec_layer", "n_head", "n_embd", "bias")
CHECKPOINT_KEYS = ("model", "optimizer", "arch", "model_config", "tokenizer", "objective",
                   "train_config", "iter_num", "best_val_loss", "history", "rng")


class ConfigError(ValueError):
    """A bad setting, device or checkpoint; the message says what is wrong and what to do."""


class LossNotFinite(RuntimeError):
    """The training or evaluation loss became nan or inf."""


# -----------------------------------------------------------------------------
# configuration


def make_config(**flags):
    """TrainConfig from the fields a user set. Every other field: the CPU defaults, CUDA_DEFAULTS
    when the device is a GPU, and, with init_from="resume", the value the checkpoint was trained
    with (so `--init_from resume --max_iters 800` continues a run without repeating its flags)."""
    device = flags.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    values = {"device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        values.update(CUDA_DEFAULTS)
        if not torch.cuda.is_bf16_supported():
            values["dtype"] = "float16"
    if flags.get("init_from") == "resume":
        saved = load_checkpoint(checkpoint_path(out_dir_of(flags)), mmap=True)["train_config"]
        values.update({k: v for k, v in saved.items() if k not in MACHINE_FIELDS})
    values.update(flags)
    return TrainConfig(**values)


def out_dir_of(flags):
    """The folder a run with these flags uses: --out_dir, else out/<arch>."""
    return flags.get("out_dir") or os.path.join("out", flags.get("arch", TrainConfig.arch))


def check_config(config):
    """Raise ConfigError for settings that cannot work, before any data or model is touched."""
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"--{name} {getattr(config, name)!r} is unknown; choose one of "
                              f"{', '.join(allowed)}")
    for name, interval in RANGES.items():
        value = getattr(config, name)
        if value is not None and not in_interval(value, interval):
            raise ConfigError(f"--{name} {value} is out of range: it must be "
                              f"{describe_interval(interval)}")
    for name in PATH_FIELDS:
        if getattr(config, name) == "":
            raise ConfigError(f"--{name} is empty; give a path, or leave --{name} out for its "
                              f"default")
    if config.objective != "prefix_lm" and config.arch != "encdec":
        raise ConfigError(f"--objective {config.objective} is an encoder-decoder objective; "
                          f"{config.arch} always predicts every next token: drop --objective "
                          f"or use --arch encdec")
    if not config.n_dec_layer < config.n_layer:
        raise ConfigError(f"--n_dec_layer {config.n_dec_layer} must be at least 1 and smaller "
                          f"than --n_layer {config.n_layer} (the encoder gets the other layers); "
                          f"lower --n_dec_layer or raise --n_layer")
    if config.n_embd % config.n_head or (config.n_embd // config.n_head) % 2:
        raise ConfigError(f"--n_embd {config.n_embd} must split into --n_head {config.n_head} "
                          f"heads of an even size (RoPE rotates pairs); e.g. --n_embd "
                          f"{64 * config.n_head}")
    check_device(config.device)
    check_folders(config)


def interval_bounds(interval):
    """"[0, 1)" -> (0.0, True, 1.0, False): lowest, whether included, highest, whether included."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    return lo, interval[0] == "[", hi, interval[-1] == "]"


def in_interval(value, interval):
    lo, lo_in, hi, hi_in = interval_bounds(interval)
    return (lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)


def describe_interval(interval):
    """"[0, 1)" -> "at least 0 and below 1"."""
    lo, lo_in, hi, hi_in = interval_bounds(interval)
    text = f"{'at least' if lo_in else 'above'} {lo:g}"
    return text if hi == math.inf else f"{text} and {'at most' if hi_in else 'below'} {hi:g}"


def check_folders(config):
    """Before any data is prepared or model built: out_dir and data_root must be folders this
    process can write (or create), and a fresh run must not silently replace another run."""
    writable_folder(config.out_dir, "out_dir")
    writable_folder(config.data_root or corpus.DATA, "data_root")
    path = checkpoint_path(config.out_dir)
    if config.init_from == "scratch" and not config.overwrite and path.exists():
        raise ConfigError(f"{path} already holds a run: continue it with --init_from resume, "
                          f"train into another --out_dir, or replace it with --overwrite")


def writable_folder(path, flag):
    """ConfigError unless path is a writable folder, or could be created as one."""
    existing = Path(path).absolute()
    while not existing.exists():  # the nearest existing folder is where it would be created
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--{flag} {path}: {existing} is a file, not a folder; choose another "
                          f"--{flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--{flag} {path}: {existing} is not writable; choose another --{flag}")


def check_device(device):
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device torch knows; use cpu, cuda or "
                          f"cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                          f"GPU(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: only cpu and cuda are supported")


def autocast(config):
    """The forward's mixed-precision context: nothing in float32."""
    if config.dtype == "float32":
        return nullcontext()
    return torch.autocast(torch.device(config.device).type, dtype=DTYPES[config.dtype])


def model_config(config):
    """The model's shape. FlexAttention has no CPU backward, so off CUDA --flex falls back to the
    dense masks: the same function (tested), only slower on a GPU."""
    return ModelConfig(vocab_size=pack.vocab_size(config.tokenizer, config.objective),
                       block_size=config.block_size, n_layer=config.n_layer,
                       n_dec_layer=config.n_dec_layer, n_head=config.n_head,
                       n_embd=config.n_embd, dropout=config.dropout, bias=config.bias,
                       flex=config.flex and torch.device(config.device).type == "cuda")


# -----------------------------------------------------------------------------
# checkpoints


def checkpoint_path(out_dir):
    return Path(out_dir) / "ckpt.pt"


def load_checkpoint(path, mmap=False):
    """The checkpoint dict on the CPU, or ConfigError if it is missing or unreadable."""
    if not path.exists():
        raise ConfigError(f"--init_from resume: no checkpoint at {path}; train one first "
                          f"(--init_from scratch) or point --out_dir at a run's folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # truncated or foreign files fail in many ways inside torch.load
        size = path.stat().st_size
        what = "it is empty" if size == 0 else f"torch.load cannot read its {size:,} bytes"
        raise ConfigError(f"{path} is not a readable checkpoint: {what}, so it was cut short or "
                          f"not written by train.py; delete it, or use another --out_dir") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else ["all"]
    if missing:
        raise ConfigError(f"{path} lacks the keys {', '.join(missing)} of a train.py checkpoint; "
                          f"delete it, or use another --out_dir")
    return ckpt


def check_resumable(ckpt, config, mconfig, path):
    """Refuse to load weights into a model of another arch or shape, or to stop a run before
    the iteration its checkpoint has reached."""
    if ckpt["arch"] != config.arch:
        raise ConfigError(f"{path} holds a {ckpt['arch']} model, not {config.arch}; use --arch "
                          f"{ckpt['arch']}, or another --out_dir")
    saved = {**ckpt["model_config"], "tokenizer": ckpt["tokenizer"], "objective": ckpt["objective"]}
    wanted = {**asdict(mconfig), "tokenizer": config.tokenizer, "objective": config.objective}
    differ = [k for k in ("tokenizer", "objective") + SHAPE_FIELDS if saved.get(k) != wanted[k]]
    if differ:
        what = ", ".join(f"{k} {saved.get(k)} (this run: {wanted[k]})" for k in differ)
        raise ConfigError(f"{path} was trained with {what}; drop those flags to resume it, or "
                          f"train this shape in another --out_dir")
    if ckpt["iter_num"] > config.max_iters:
        raise ConfigError(f"{path} is at iteration {ckpt['iter_num']}, past --max_iters "
                          f"{config.max_iters}; resume with --max_iters {ckpt['iter_num']} or more "
                          f"(or leave it out)")


def save_checkpoint(path, state):
    """Written whole (cli.written_whole) and synced to disk before the rename, so a crash or kill
    at any moment leaves the previous checkpoint whole."""
    with cli.written_whole(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state(batches):
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "batches": batches.gen.get_state()}


def set_rng_state(rng, batches):
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    batches.gen.set_state(rng["batches"])


# -----------------------------------------------------------------------------
# pieces of the loop


def setup_distributed(device):
    """(rank, world_size, device). Under torchrun (RANK set) join the process group: nccl with one
    GPU per process on CUDA, gloo on the CPU."""
    if "RANK" not in os.environ:
        return 0, 1, device
    cuda = device.startswith("cuda")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def configure_optimizer(model, config, device_type):
    """AdamW with weight decay on matrices and embeddings only (dim >= 2), not on norms/biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                             fused=device_type == "cuda")


def get_lr(it, config):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (None: at max_iters, so a
    run resumed with a larger --max_iters decays to the new end), then min_lr."""
    decay_end = config.max_iters if config.lr_decay_iters is None else config.lr_decay_iters
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    if it >= decay_end:
        return config.min_lr
    ratio = (it - config.warmup_iters) / (decay_end - config.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return config.min_lr + coeff * (config.learning_rate - config.min_lr)


def to_device(batch, device):
    """Copy a CPU batch to the device; on CUDA from pinned memory, without waiting for the copy."""
    if torch.device(device).type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def next_batch(batches, device, history):
    """A training batch on the device. Batches are built on the CPU, where supervision_stats is
    cheap and needs no device sync; its running means go into the history."""
    batch = batches.get_batch("train")
    stats = batches.supervision_stats(batch)
    n = history["train_batches"] = history["train_batches"] + 1
    history["supervised_fraction"] += (stats["supervised"] - history["supervised_fraction"]) / n
    history["padding_fraction"] += (stats["padding"] - history["padding_fraction"]) / n
    return to_device(batch, device)


def train_step(model, optimizer, scaler, batches, config, ctx, device, history):
    """One optimizer step over gradient_accumulation_steps micro-batches; returns the mean loss
    (a 0-dim tensor). Under DDP only the last micro-step all-reduces the gradients."""
    steps = config.gradient_accumulation_steps
    total = torch.zeros((), device=device)
    batch = next_batch(batches, device, history)
    for micro in range(steps):
        last = micro == steps - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with ctx:
                _, loss = model(batch)
            if not last:  # built on the CPU while the device runs the forward
                batch = next_batch(batches, device, history)
            scaler.scale(loss / steps).backward()
        total += loss.detach()
    if config.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / steps


def eval_sets(batches, config, device):
    """Fixed evaluation batches, the same every time, for every seed and (cont) every arch:
    the arch's own objective on train and val, and the shared continuation yardstick on val."""
    n = config.eval_iters * config.batch_size
    windows = batches.eval_windows("val", n).split(config.batch_size)  # each (B, T+1)
    sets = {"train_loss": batches.eval_batches("train", n),
            "val_loss": batches.eval_batches("val", n),
            "cont_loss": [pack.continuation_batch(config.arch, w) for w in windows]}
    return {name: [to_device(b, device) for b in bs] for name, bs in sets.items()}


@torch.no_grad()
def evaluate(model, sets, ctx):
    """Mean loss over each evaluation set, e.g. {"train_loss": 2.1, "val_loss": 2.2, ...}."""
    model.eval()
    losses = {}
    for name, batches in sets.items():
        total = 0.0
        for batch in batches:
            with ctx:
                total += model(batch)[1].item()
        losses[name] = total / len(batches)
    model.train()
    return losses


def eval_due(iter_num, config, history):
    """At every eval_interval, iteration 0 and the last; not twice at one iteration (a resumed
    run starts where the stopped one evaluated last)."""
    done = history["curve"] and history["curve"][-1]["iter"] == iter_num
    return (iter_num % config.eval_interval == 0 or iter_num == config.max_iters) and not done


def record(history, iter_num, losses, config, master):
    """Add an evaluation to the history's curve and (rank 0) to out_dir/log.jsonl."""
    point = {"iter": iter_num, "tokens": history["train_tokens"], **losses}
    history["curve"].append(point)
    history["val_loss"] = losses["cont_loss"]
    if master:
        with open(Path(config.out_dir) / "log.jsonl", "a") as f:
            f.write(json.dumps({**point, "lr": get_lr(iter_num, config),
                                "train_time": history["train_time"]}) + "\n")


def start_log(config, iter_num):
    """Make out_dir/log.jsonl agree with ckpt.pt before the first step. A fresh run starts an
    empty log, removing first the checkpoint of the run it replaces (--overwrite); a resumed run
    keeps the evaluations up to the checkpoint's iteration: a run killed after its last save may
    have logged later ones (or half a line), and it is about to run them again."""
    log_file = Path(config.out_dir) / "log.jsonl"
    kept = []
    if config.init_from == "scratch":
        checkpoint_path(config.out_dir).unlink(missing_ok=True)
    elif log_file.exists():
        kept = [line for line in log_file.read_text().splitlines()
                if logged_iter(line) <= iter_num]
    with cli.written_whole(log_file) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in kept))


def logged_iter(line):
    """The iteration of a log.jsonl line; inf for a line that is not a whole record."""
    try:
        return json.loads(line)["iter"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def param_checksum(model):
    """One number that differs when parameters differ: a position-weighted sum in float64."""
    return sum((i + 1) * p.detach().double().sum() for i, p in enumerate(model.parameters()))


def gather_ranks(raw_model, local_loss, device, world):
    """Every rank's parameter checksum (equal when DDP keeps the ranks in sync) and last local
    training loss (different, as each rank reads different batches)."""
    mine = torch.stack([param_checksum(raw_model).to(device),
                        local_loss.double().to(device)])
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    return {"world_size": world, "param_checksums": [t[0].item() for t in everyone],
            "last_losses": [t[1].item() for t in everyone]}


def duration(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def new_history(config, raw_model):
    return {"arch": config.arch, "config": asdict(config),
            "non_embedding_params": raw_model.num_params(non_embedding=True),
            "params": raw_model.num_params(non_embedding=False),
            "train_tokens": 0, "train_batches": 0, "supervised_fraction": 0.0,
            "padding_fraction": 0.0, "train_time": 0.0, "train_tokens_per_sec": 0.0,
            "wall_time": 0.0, "curve": [], "val_loss": None, "iter_losses": []}


# -----------------------------------------------------------------------------
# the loop


def train(config, log=print):
    """Train config.arch as config says; returns the history (also saved in the checkpoint).

    history: arch, config, non_embedding_params, params, train_tokens (rows * block_size over all
    steps and ranks), supervised_fraction and padding_fraction (means over the training batches),
    train_time and train_tokens_per_sec (training only, no evaluation), wall_time, curve (one
    {iter, tokens, train_loss, val_loss, cont_loss} per evaluation), val_loss (the last
    continuation loss), iter_losses (training loss of every iteration), and under DDP "ddp".
    Raises ConfigError or corpus.DataError for bad input, LossNotFinite if training diverges.
    """
    t_start = time.time()
    check_config(config)
    rank, world, device = setup_distributed(config.device)
    try:
        return run(config, rank, world, device, log if rank == 0 else (lambda *a: None), t_start)
    finally:
        if world > 1:
            dist.destroy_process_group()


def load_batches(config, rank, world):
    """Training and evaluation batches; rank 0 prepares (tokenizes) the data, the others then
    find it ready. Every rank draws its own training batches (seed + rank)."""
    root = {} if config.data_root is None else {"root": config.data_root}
    if rank == 0:
        meta = corpus.prepare(config.data, config.tokenizer, text_field=config.text_field,
                            rehash=config.rehash, **root)
    if world > 1:
        dist.barrier()
    if rank != 0:
        meta = corpus.prepare(config.data, config.tokenizer, text_field=config.text_field, **root)
    # built on the CPU: supervision_stats there needs no device sync, and to_device overlaps copies
    return pack.Batches(meta, config.arch, config.block_size, config.batch_size,
                        objective=config.objective, max_blocks=config.max_blocks,
                        layouts=config.block_layouts,
                        seed=config.seed + rank, device="cpu")


def restore(ckpt, raw_model, optimizer, batches, config, rank, world):
    """Load a checkpoint's weights, optimizer and generators; returns iter_num, best_val_loss,
    history. The checkpoint holds rank 0's generators; other ranks go on with fresh seeds."""
    raw_model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    iter_num, history = ckpt["iter_num"], ckpt["history"]
    history["config"] = asdict(config)
    if rank == 0:
        set_rng_state(ckpt["rng"], batches)
    else:
        torch.manual_seed(config.seed + rank + world * iter_num)
        batches.gen.manual_seed(config.seed + rank + world * iter_num)
    return iter_num, ckpt["best_val_loss"], history


def run(config, rank, world, device, log, t_start):
    device_type = torch.device(device).type
    master = rank == 0
    ckpt_file = checkpoint_path(config.out_dir)
    mconfig = model_config(config)
    ckpt = None
    if config.init_from == "resume":
        ckpt = load_checkpoint(ckpt_file)
        check_resumable(ckpt, config, mconfig, ckpt_file)
    batches = load_batches(config, rank, world)
    sets = eval_sets(batches, config, device)

    # the same seed on every rank (DDP also broadcasts rank 0's weights); rank r's dropout: + r
    torch.manual_seed(config.seed + rank)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    raw_model = build_model(config.arch, mconfig).to(device)
    optimizer = configure_optimizer(raw_model, config, device_type)
    iter_num, best_val_loss, history = 0, float("inf"), new_history(config, raw_model)
    if ckpt is not None:
        iter_num, best_val_loss, history = restore(ckpt, raw_model, optimizer, batches, config,
                                                   rank, world)
        del ckpt  # the CPU copy of weights and optimizer state
    model = torch.compile(raw_model) if config.compile else raw_model
    train_model = model if world == 1 else \
        DDP(model, device_ids=[torch.device(device).index] if device_type == "cuda" else None)
    ctx = autocast(config)
    scaler = torch.amp.GradScaler(device_type, enabled=config.dtype == "float16")

    rows_per_iter = config.batch_size * config.gradient_accumulation_steps * world
    tokens_per_iter = rows_per_iter * config.block_size
    wall_before = history["wall_time"]
    log("config: " + textwrap.fill(", ".join(f"{k}={v}" for k, v in asdict(config).items()),
                                   100, subsequent_indent="  "))
    if config.flex and not mconfig.flex:
        log(f"warning: --flex needs CUDA (FlexAttention cannot train on {device_type}: it has no "
            f"backward there); training with the dense masks, the same function")
    log(f"{config.arch}: {history['non_embedding_params'] / 1e6:.2f}M non-embedding parameters "
        f"({history['params'] / 1e6:.2f}M in all), {tokens_per_iter:,} tokens per iteration, "
        f"{world} process(es) on {device}")
    if iter_num:
        log(f"resuming {ckpt_file} at iter {iter_num}")
    if master:
        os.makedirs(config.out_dir, exist_ok=True)
        start_log(config, iter_num)

    def checkpoint():
        history["wall_time"] = wall_before + time.time() - t_start
        save_checkpoint(ckpt_file, {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "arch": config.arch, "model_config": asdict(mconfig), "tokenizer": config.tokenizer,
            "objective": config.objective, "train_config": asdict(config), "iter_num": iter_num,
            "best_val_loss": best_val_loss, "history": history, "rng": rng_state(batches)})
        return iter_num

    def diverged(what, value):
        saved = (f"the last good checkpoint {ckpt_file} (iter {last_saved}) is kept"
                 if last_saved is not None else "no checkpoint was written")
        return LossNotFinite(f"{what} is {value} at iter {iter_num}: training diverged; {saved}. "
                             f"Lower --learning_rate or raise --warmup_iters")

    last_saved = iter_num if iter_num else None  # what ckpt.pt holds
    local_loss = torch.tensor(float("nan"))  # this rank's last training loss, for the DDP report
    window_iters, window_time = 0, 0.0  # since the last log line
    last_eval_time = 0.0
    while True:
        if eval_due(iter_num, config, history):
            t0 = time.time()
            losses = evaluate(model, sets, ctx)
            for name, value in losses.items():
                if not math.isfinite(value):
                    raise diverged(name, value)
            record(history, iter_num, losses, config, master)
            improved = losses["cont_loss"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["cont_loss"])
            if master and (improved or config.always_save_checkpoint) and \
                    0 < iter_num < config.max_iters:  # the end saves anyway
                last_saved = checkpoint()
            last_eval_time = time.time() - t0
            log(f"eval iter {iter_num}: train {losses['train_loss']:.4f}, val "
                f"{losses['val_loss']:.4f}, continuation {losses['cont_loss']:.4f} "
                f"({last_eval_time:.1f}s{', saved' if last_saved == iter_num else ''})")
        if iter_num >= config.max_iters:
            break

        t0 = time.time()
        lr = get_lr(iter_num, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        local_loss = train_step(train_model, optimizer, scaler, batches, config, ctx, device,
                                history)
        loss = local_loss.clone()
        if world > 1:  # every rank must take the same nan decision, so they all see one loss
            dist.all_reduce(loss)
            loss /= world
        lossf = loss.item()
        if not math.isfinite(lossf):
            raise diverged("the training loss", lossf)
        iter_num += 1
        dt = time.time() - t0
        history["iter_losses"].append(lossf)
        history["train_tokens"] += tokens_per_iter
        history["train_time"] += dt
        window_iters, window_time = window_iters + 1, window_time + dt
        if iter_num % config.log_interval == 0 or iter_num == config.max_iters:
            left = config.max_iters - iter_num  # at the current speed, plus the evaluations
            eta = left * window_time / window_iters + \
                (left // config.eval_interval + 1) * last_eval_time
            log(f"iter {iter_num}/{config.max_iters} | loss {lossf:.4f} | lr {lr:.2e} | "
                f"{window_iters * tokens_per_iter / window_time:,.0f} tok/s | "
                f"{duration(time.time() - t_start)} elapsed | ETA {duration(eta)}")
            window_iters, window_time = 0, 0.0

    history["train_tokens_per_sec"] = history["train_tokens"] / max(history["train_time"], 1e-9)
    if world > 1:
        history["ddp"] = gather_ranks(raw_model, local_loss, device, world)
    if master:
        checkpoint()
    if world > 1:  # no rank tears the process group down while another still uses it
        dist.barrier()
    history["wall_time"] = wall_before + time.time() - t_start
    log(f"done: {iter_num} iters, {history['train_tokens']:,} tokens in "
        f"{duration(history['wall_time'])} ({history['train_tokens_per_sec']:,.0f} tok/s "
        f"training); continuation loss {history['val_loss']:.4f}; checkpoint {ckpt_file}")
    return history


# -----------------------------------------------------------------------------
# command line

HELP = {
    "arch": "architecture", "objective": "encdec pretraining objective",
    "max_blocks": "bdd: up to max_blocks - 1 random block boundaries per layout",
    "block_layouts": "bdd: random block layouts per batch, each shared by an equal group of its "
                     "rows (at most this many; batch_size: one per row)",
    "data": "text or jsonl file, folder of .txt/.jsonl files, glob, or nanoGPT folder with "
            "train.bin and val.bin (default: Shakespeare)",
    "data_root": "folder of prepared datasets (default: data/)", "tokenizer": "tokenizer",
    "text_field": "the text field of jsonl lines",
    "rehash": "re-read the whole source (not only file sizes and times) to decide whether its "
              "prepared copy is current",
    "out_dir": "checkpoint and log folder (default: out/<arch>)",
    "init_from": "scratch, or resume from <out_dir>/ckpt.pt (unset flags come from it)",
    "overwrite": "let a fresh run replace the run already in --out_dir",
    "always_save_checkpoint": "save at every evaluation, not only when the val loss improves",
    "n_layer": "total layers", "n_dec_layer": "decoder layers of encdec and bdd",
    "n_head": "attention heads", "n_embd": "width", "block_size": "tokens per row",
    "dropout": "dropout", "bias": "biases in Linear layers",
    "batch_size": "rows per micro-step and process",
    "gradient_accumulation_steps": "micro-steps per optimizer step, on each process",
    "max_iters": "optimizer steps", "learning_rate": "peak learning rate",
    "min_lr": "final learning rate", "warmup_iters": "linear warmup steps",
    "lr_decay_iters": "step where the cosine reaches min_lr (default: max_iters)",
    "weight_decay": "AdamW weight decay of matrices", "beta1": "AdamW beta1",
    "beta2": "AdamW beta2", "grad_clip": "clip the gradient norm (0: off)",
    "eval_interval": "evaluate every this many steps",
    "eval_iters": "batches per evaluation set", "log_interval": "log every this many steps",
    "device": "cpu, cuda or cuda:N (default: cuda if available)",
    "dtype": "autocast dtype of the forward", "compile": "torch.compile the model",
    "flex": "FlexAttention masks (CUDA)", "seed": "random seed (rank r uses seed + r)",
}
def parser():
    """One flag per TrainConfig field. Unset flags stay out of the namespace (SUPPRESS), so
    make_config can tell them from flags given with their default value."""
    p = cli.Parser(description="Train dec, encdec or bdd.",
                   argument_default=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        default = f"default {f.default}" + (f", CUDA {CUDA_DEFAULTS[f.name]}"
                                            if f.name in CUDA_DEFAULTS else "")
        allowed = f", allowed {RANGES[f.name]}" if f.name in RANGES else ""
        help = f"{HELP[f.name]} ({default}{allowed})"
        if f.type is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help)
        else:
            p.add_argument(f"--{f.name}", type=f.type, choices=CHOICES.get(f.name), help=help)
    return p


def kept_checkpoint(out_dir):
    """What an interrupted run leaves behind, in words."""
    path = checkpoint_path(out_dir)
    try:
        iter_num = load_checkpoint(path, mmap=True)["iter_num"]
    except ConfigError:
        return f"there is no readable checkpoint at {path}, so nothing to resume"
    return f"{path} (iteration {iter_num}) is kept: continue with --init_from resume"


def main(argv=None):
    flags = vars(parser().parse_args(argv))
    try:
        train(make_config(**flags))
    except (ConfigError, corpus.DataError) as e:
        cli.fail(str(e))
    except LossNotFinite as e:
        cli.fail(str(e), code=1)
    except KeyboardInterrupt:
        cli.fail(f"interrupted (Ctrl-C); {kept_checkpoint(out_dir_of(flags))}", code=130)


if __name__ == "__main__":
    main()

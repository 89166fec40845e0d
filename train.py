"""
One training loop for dec, encdec and bdd, in the spirit of nanoGPT's train.py. Every field of
config.TrainConfig is a flag; unset ones come from config.PRESETS (cpu, or gpu on a CUDA machine):

    python train.py --arch bdd                                  # CPU: a small BDD on Shakespeare
    python train.py --arch bdd --init_from resume --max_iters 600    # continue out/bdd/ckpt.pt
    python train.py --init_from out/bdd --out_dir out/ft --boundaries turns  # fine-tune out/bdd
    torchrun --standalone --nproc_per_node=4 train.py --arch bdd     # DistributedDataParallel

Other scripts call train(config.make_config(...)); a run holds its --out_dir while it lives and
keeps its last whole checkpoint. Exit codes: 2 bad input, 1 nan loss, 3 unwritable, 130 Ctrl-C.
"""

import json
import math
import os
import statistics
import textwrap
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cli
import config as cfg
import files
import pack
from corpus.prepare import prepare
from corpus.rows import is_rows, load_rows


class LossNotFinite(cli.Stop):
    """The training or evaluation loss became nan or inf (exit 1)."""
    code = 1


# -----------------------------------------------------------------------------
# pieces of the loop


def setup_distributed(device):
    """(rank, world_size, device). Under torchrun (RANK set) join the process group: nccl with one
    GPU per process on CUDA, gloo on the CPU."""
    if "RANK" not in os.environ:
        return 0, 1, device
    cuda = device.startswith("cuda")
    # DDP's constructor imports torch.distributed.nn, whose functions default to group.WORLD:
    # imported after the group exists, they hold it until the process exits, so that
    # destroy_process_group cannot free it and gloo's threads run on into the interpreter's exit
    # (which they abort now and then: "terminate called without an active exception").
    # Imported before, their default is None.
    import torch.distributed.nn  # noqa: F401
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
    end = cfg.decay_end(config)
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    if it >= end:
        return config.min_lr
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - config.warmup_iters) / (end - config.warmup_iters)))
    return config.min_lr + coeff * (config.learning_rate - config.min_lr)  # coeff: 1 -> 0


def to_device(batch, device):
    """Copy a CPU batch to the device; on CUDA from pinned memory, without waiting for the copy."""
    if torch.device(device).type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def load_batches(config, rank=0, world=1, log=print):
    """Training and evaluation batches, each rank drawing its own (seed + rank); built on the CPU,
    where supervision_stats needs no device sync, and to_device overlaps the copies."""
    kw = dict(text_field=config.text_field, turn_regex=config.turn_regex,
              **({} if config.data_root is None else {"root": config.data_root}))
    if is_rows(config.data):  # a task's fixed-length rows (lab/probe.py): nothing to prepare
        meta = load_rows(config.data, config.tokenizer)
    else:  # rank 0 prepares (tokenizes) the data; the others wait, then find it ready
        if rank == 0:
            meta = prepare(config.data, config.tokenizer, rehash=config.rehash, **kw)
        if world > 1:
            dist.barrier()
        if rank != 0:
            meta = prepare(config.data, config.tokenizer, **kw)
    batches = pack.Batches(meta, config.arch, config.block_size, config.batch_size,
                           objective=config.objective, max_blocks=config.max_blocks,
                           layouts=config.block_layouts, boundaries=config.boundaries,
                           seed=config.seed + rank, device="cpu")
    for note in batches.notes:
        log(note)
    return batches


def next_batch(batches, device, history):
    """A training batch on the device; its supervision stats go into the history's running means."""
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
    """Fixed evaluation batches, the same every time, for every seed and (cont) every arch: the
    arch's own objective on train and val, and the shared continuation yardstick on val."""
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
    with ctx:
        losses = {name: sum(model(b)[1].item() for b in bs) / len(bs) for name, bs in sets.items()}
    model.train()
    return losses


def new_history(config, model):
    """What a run reports. train_tokens: rows x block_size over all steps and ranks; the
    fractions: means over the training batches; curve: one {iter, tokens, train_loss, val_loss,
    cont_loss} per evaluation (the arch's own objective, then the shared yardstick)."""
    return {"arch": config.arch, "config": asdict(config),
            "non_embedding_params": model.num_params(non_embedding=True),
            "params": model.num_params(non_embedding=False),
            "train_tokens": 0, "train_batches": 0, "supervised_fraction": 0.0,
            "padding_fraction": 0.0, "train_time": 0.0, "train_tokens_per_sec": 0.0,
            "wall_time": 0.0, "curve": [], "cont_loss": None, "iter_losses": []}


def start_log(config, iter_num):
    """Make out_dir/log.jsonl agree with ckpt.pt before the first step: a fresh run removes the
    run it replaces (--overwrite); a resumed one cuts the log back to its checkpoint's iteration
    (a run killed after its last save may have logged later ones, or half a line)."""
    if config.init_from != "resume":
        cfg.checkpoint_path(config.out_dir).unlink(missing_ok=True)
    files.cut_log(Path(config.out_dir) / "log.jsonl", iter_num if config.init_from == "resume"
                  else -1)


def param_checksum(model):
    """One number that differs when parameters differ: a position-weighted sum in float64."""
    return sum((i + 1) * p.detach().double().sum() for i, p in enumerate(model.parameters()))


def gather_ranks(model, local_loss, device, world):
    """Every rank's parameter checksum (equal: DDP keeps them in sync) and last loss (not)."""
    mine = torch.stack([param_checksum(model).to(device), local_loss.double().to(device)])
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    return {"world_size": world, "param_checksums": [t[0].item() for t in everyone],
            "last_losses": [t[1].item() for t in everyone]}


# torch's own thread count (OMP_NUM_THREADS, else one per core), before any run changes it
TORCH_THREADS = torch.get_num_threads()
# Counts the user chose (run_threads' why); the others Training.watch_threads may lower.
CHOSEN = ("--threads", "torch's")
SLOWDOWN, WATCHED_STEPS = 3.0, 3  # steps 3x slower than the run's fastest: a core was taken


def run_threads(config, resumed=None):
    """(threads, why) a run computes with: --threads; a resumed run's own (so that it computes
    bit for bit as the run it continues); torch's when OMP_NUM_THREADS says or off the CPU; else
    one per core that is idle as the run starts, at most torch's. Threads that wait for a core
    that another program keeps busy slow every step to a crawl (docs/RESULTS.md: 21x at 2
    threads with one core busy); the thread count changes the last bits of the results."""
    if config.threads is not None:
        return config.threads, "--threads"
    if resumed is not None:
        return resumed, "the resumed run's"
    if "OMP_NUM_THREADS" in os.environ or torch.device(config.device).type != "cpu":
        return torch.get_num_threads(), "torch's"
    idle = idle_cores()
    return (TORCH_THREADS, "torch's") if idle is None else \
        (max(1, min(round(idle), TORCH_THREADS)), f"{idle:.1f} of {TORCH_THREADS} cores idle as "
         f"it started")


def idle_cores(seconds=0.3):
    """How many of the cores this process may run on were idle over the next `seconds` (Linux's
    /proc/stat, per core); None where that cannot be read."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

    def ticks():  # {core: (idle ticks, all ticks)} since boot
        with open("/proc/stat") as f:
            rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in f
                    if line.startswith("cpu") and line[3].isdigit()}
        return {c: (rows[f"cpu{c}"][3] + rows[f"cpu{c}"][4], sum(rows[f"cpu{c}"])) for c in cores}
    try:
        before, _, after = ticks(), time.sleep(seconds), ticks()
    except (OSError, KeyError, ValueError):
        return None
    return sum((after[c][0] - before[c][0]) / max(after[c][1] - before[c][1], 1)
               for c in cores) if cores else None


def duration(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


# -----------------------------------------------------------------------------
# one run


@dataclass
class Training:
    """What a training run carries from step to step, and into its checkpoint."""
    config: cfg.TrainConfig
    model: torch.nn.Module          # the raw model (its state_dict is what is saved)
    train_model: torch.nn.Module    # what the step calls: compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    batches: pack.Batches
    history: dict
    rank: int
    world: int
    device: str
    log: object                     # print, or a function like it
    t_start: float                  # when this process started the run
    iter_num: int = 0
    best_cont_loss: float = math.inf
    last_saved: int = None          # the iteration ckpt.pt holds
    wall_before: float = 0.0        # wall time of the runs this one resumes
    threads_why: str = ""           # how the thread count was chosen (run_threads)
    watched: bool = False           # whether watch_threads may drop to one thread
    recent: list = field(default_factory=list)  # seconds of the last WATCHED_STEPS steps
    fastest: float = math.inf       # the lowest median of WATCHED_STEPS steps so far

    def save(self):
        self.history["wall_time"] = self.wall_time()
        cfg.save_checkpoint(cfg.checkpoint_path(self.config.out_dir), {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "arch": self.config.arch, "model_config": asdict(self.model.config),
            "tokenizer": self.config.tokenizer, "objective": self.config.objective,
            "train_config": asdict(self.config), "iter_num": self.iter_num,
            "best_cont_loss": self.best_cont_loss, "history": self.history,
            "rng": cfg.rng_state(self.batches.gen)})
        self.last_saved = self.iter_num

    def watch_threads(self, seconds):
        """Drop to one thread when the last WATCHED_STEPS steps took SLOWDOWN times as long as
        the fastest such steps of the run: its threads are waiting for a core that another
        program took since the run started. Logged, and kept by a resumed run."""
        if not self.watched or torch.get_num_threads() == 1:
            return
        self.recent = (self.recent + [seconds])[-WATCHED_STEPS:]
        typical = statistics.median(self.recent) if len(self.recent) == WATCHED_STEPS else None
        self.fastest = min(self.fastest, typical or math.inf)
        if typical and typical > SLOWDOWN * self.fastest:
            self.log(f"threads {torch.get_num_threads()} -> 1 at iter {self.iter_num}: its steps "
                     f"took {typical / self.fastest:.0f}x as long as its fastest, as another "
                     f"program uses a core; results now differ in their last bits from a run at "
                     f"a fixed --threads")
            torch.set_num_threads(1)
            self.history["threads"], self.recent = 1, []

    def wall_time(self):
        """Seconds of the whole run, the time of the runs it resumes included."""
        return self.wall_before + time.time() - self.t_start

    def diverged(self, what, value):
        path = cfg.checkpoint_path(self.config.out_dir)
        kept = (f"the last good checkpoint {path} (iter {self.last_saved}) is kept"
                if self.last_saved is not None else "no checkpoint was written")
        return LossNotFinite(f"{what} is {value} at iter {self.iter_num}: training diverged; "
                             f"{kept}. Lower --learning_rate or raise --warmup_iters")


def start(config, rank, world, device, log, t_start):
    """The run at its first step: fresh; resumed (weights, optimizer, generators: rank 0's, the
    others reseeded; its threads); or a fine-tune, fresh but for its source's weights."""
    ckpt = cfg.starting_checkpoint(config)
    resumed = ckpt["history"].get("threads") if config.init_from == "resume" else None
    threads, why = run_threads(config, resumed)
    torch.set_num_threads(threads)  # the process's setting: what follows the run uses it too
    batches = load_batches(config, rank, world, log)
    # the same seed on every rank (DDP also broadcasts rank 0's weights); rank r's dropout: + r
    model = cfg.fresh_model(config, device, seed=config.seed + rank)
    optimizer = configure_optimizer(model, config, torch.device(device).type)
    run = Training(config, model, model, optimizer, batches,
                   {**new_history(config, model), "threads": threads}, rank, world, device, log,
                   t_start, threads_why=why, watched=why not in CHOSEN and world == 1)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if ckpt is not None and config.init_from != "resume":  # a fine-tune: the weights only
        run.history["init_from"] = {"out_dir": config.init_from, "iter": ckpt["iter_num"]}
        if "conversion" in ckpt:  # uptraining continues its parent's pretraining and data order
            run.history["init_from"]["conversion"] = ckpt["conversion"]
            if rank == 0:
                batches.gen.set_state(ckpt["rng"]["batches"])
    elif ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        run.iter_num = run.last_saved = ckpt["iter_num"]
        run.best_cont_loss, run.history = ckpt["best_cont_loss"], ckpt["history"]
        run.history["config"] = asdict(config)
        if rank == 0:
            cfg.set_rng_state(ckpt["rng"], batches.gen)
        else:
            torch.manual_seed(config.seed + rank + world * run.iter_num)
            batches.gen.manual_seed(config.seed + rank + world * run.iter_num)
    run.wall_before = run.history["wall_time"]
    if config.compile:
        run.train_model = torch.compile(model)
    if world > 1:
        ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
        run.train_model = DDP(run.train_model, device_ids=ids)
    return run


def train(config, log=print):
    """Train config.arch as config says; returns the history (new_history says what it holds,
    and the checkpoint keeps it). Raises cli.Stop: ConfigError or DataError for bad input,
    LossNotFinite if training diverges, cli.CannotWrite if a checkpoint cannot be written."""
    t_start = time.time()
    cfg.check_folders(config)
    rank, world, device = setup_distributed(config.device)
    log = log if rank == 0 else (lambda *a: None)
    try:
        with files.holding(config.out_dir) if rank == 0 else nullcontext():
            return loop(start(config, rank, world, device, log, t_start))
    finally:
        if world > 1:
            dist.destroy_process_group()


def loop(run):
    """Evaluate, step, log, save: until max_iters. Returns the history."""
    config, history, device = run.config, run.history, run.device
    sets = eval_sets(run.batches, config, device)
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    ctx = cfg.autocast(config)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=config.dtype == "float16")
    tokens_per_iter = config.batch_size * config.gradient_accumulation_steps * run.world * \
        config.block_size
    log_start(run, tokens_per_iter)
    if run.rank == 0:
        start_log(config, run.iter_num)
    local_loss = torch.tensor(float("nan"))  # this rank's last training loss, for the DDP report
    window, last_eval_time = [0, 0.0], 0.0  # iterations and seconds since the last log line
    while True:
        if eval_due(run):
            last_eval_time = evaluation(run, sets, ctx)
        if run.iter_num >= config.max_iters:
            break
        t0 = time.time()
        lr = get_lr(run.iter_num, config)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        local_loss = train_step(run.train_model, run.optimizer, scaler, run.batches, config, ctx,
                                device, history)
        loss = local_loss.clone()
        if run.world > 1:  # every rank must take the same nan decision, so all see one loss
            dist.all_reduce(loss)
            loss /= run.world
        lossf = loss.item()
        if not math.isfinite(lossf):
            raise run.diverged("the training loss", lossf)
        run.iter_num += 1
        dt = time.time() - t0
        run.watch_threads(dt)
        history["iter_losses"].append(lossf)
        history["train_tokens"] += tokens_per_iter
        history["train_time"] += dt
        window = [window[0] + 1, window[1] + dt]
        if run.iter_num % config.log_interval == 0 or run.iter_num == config.max_iters:
            log_progress(run, lossf, lr, window, tokens_per_iter, last_eval_time)
            window = [0, 0.0]
    return finish(run, local_loss)


def eval_due(run):
    """At every eval_interval, iteration 0 and the last; not twice at one iteration (a resumed
    run starts where the stopped one evaluated last)."""
    c, curve = run.config, run.history["curve"]
    done = curve and curve[-1]["iter"] == run.iter_num
    return (run.iter_num % c.eval_interval == 0 or run.iter_num == c.max_iters) and not done


def evaluation(run, sets, ctx):
    """Evaluate, record the point (history and, on rank 0, log.jsonl), save if it is due; returns
    the seconds it took."""
    t0 = time.time()
    model = run.train_model.module if isinstance(run.train_model, DDP) else run.train_model
    losses = evaluate(model, sets, ctx)
    for name, value in losses.items():
        if not math.isfinite(value):
            raise run.diverged(name, value)
    point = {"iter": run.iter_num, "tokens": run.history["train_tokens"], **losses}
    run.history["curve"].append(point)
    run.history["cont_loss"] = losses["cont_loss"]
    improved = losses["cont_loss"] < run.best_cont_loss
    run.best_cont_loss = min(run.best_cont_loss, losses["cont_loss"])
    if run.rank == 0:
        with open(Path(run.config.out_dir) / "log.jsonl", "a") as f:
            f.write(json.dumps({**point, "lr": get_lr(run.iter_num, run.config),
                                "train_time": run.history["train_time"]}) + "\n")
        if (improved or run.config.always_save_checkpoint) and \
                0 < run.iter_num < run.config.max_iters:  # the end saves anyway
            run.save()
    seconds = time.time() - t0
    run.log(f"eval iter {run.iter_num}: train {losses['train_loss']:.4f}, val "
            f"{losses['val_loss']:.4f}, continuation {losses['cont_loss']:.4f} "
            f"({seconds:.1f}s{', saved' if run.last_saved == run.iter_num else ''})")
    return seconds


def log_start(run, tokens_per_iter):
    c, h = run.config, run.history
    if c.adapted:
        run.log(c.adapted)
    run.log("config: " + textwrap.fill(", ".join(f"{k}={v}" for k, v in asdict(c).items()),
                                       100, subsequent_indent="  "))
    if c.flex and not run.model.config.flex:
        run.log(f"warning: --flex needs CUDA (FlexAttention cannot train on "
                f"{torch.device(run.device).type}: it has no backward there); training with "
                f"the dense masks, the same function")
    run.log(f"{c.arch}: {h['non_embedding_params'] / 1e6:.2f}M non-embedding parameters "
            f"({h['params'] / 1e6:.2f}M in all), {tokens_per_iter:,} tokens per iteration, "
            f"{run.world} process(es) on {run.device}, {torch.get_num_threads()} thread(s) "
            f"({run.threads_why})")
    if run.iter_num:
        run.log(f"resuming {cfg.checkpoint_path(c.out_dir)} at iter {run.iter_num}")
    elif "init_from" in h:
        source, conversion = h["init_from"], h["init_from"].get("conversion")
        run.log(f"{'uptraining' if conversion else 'fine-tuning'}: the model starts from "
                f"{source['out_dir']} (iter {source['iter']})" + (
                    f", converted {conversion['source']} -> {conversion['target']}: "
                    f"{'; '.join(conversion['steps'])}" if conversion else ""))


def log_progress(run, lossf, lr, window, tokens_per_iter, last_eval_time):
    """A progress line: loss, learning rate, tokens/s, elapsed, and the ETA at the current speed
    plus the evaluations still to come."""
    c, (iters, seconds) = run.config, window
    left = c.max_iters - run.iter_num
    eta = left * seconds / iters + (left // c.eval_interval + 1) * last_eval_time
    run.log(f"iter {run.iter_num}/{c.max_iters} | loss {lossf:.4f} | lr {lr:.2e} | "
            f"{iters * tokens_per_iter / seconds:,.0f} tok/s | "
            f"{duration(time.time() - run.t_start)} elapsed | ETA {duration(eta)}")


def finish(run, local_loss):
    history = run.history
    history["train_tokens_per_sec"] = history["train_tokens"] / max(history["train_time"], 1e-9)
    if run.world > 1:
        history["ddp"] = gather_ranks(run.model, local_loss, run.device, run.world)
    if run.rank == 0:
        run.save()
    if run.world > 1:  # no rank tears the process group down while another still uses it
        dist.barrier()
    history["wall_time"] = run.wall_time()
    run.log(f"done: {run.iter_num} iters, {history['train_tokens']:,} tokens in "
            f"{duration(history['wall_time'])} ({history['train_tokens_per_sec']:,.0f} tok/s "
            f"training); continuation loss {history['cont_loss']:.4f}; checkpoint "
            f"{cfg.checkpoint_path(run.config.out_dir)}")
    return history


# -----------------------------------------------------------------------------
# command line


def kept_checkpoint(out_dir):
    """What an interrupted run leaves behind, in words."""
    path = cfg.checkpoint_path(out_dir)
    try:
        iter_num = cfg.load_checkpoint(path, mmap=True)["iter_num"]
    except cfg.ConfigError:
        return f"there is no readable checkpoint at {path}, so nothing to resume"
    return f"{path} (iteration {iter_num}) is kept: continue with --init_from resume"


def main(argv=None):
    parser = cfg.add_flags(cli.Parser(description="Train dec, encdec or bdd."))
    flags = cfg.given_flags(parser.parse_args(argv))
    out_dir = flags.get("out_dir") or cfg.default_out_dir(flags)
    with cli.guard(lambda: f"interrupted (Ctrl-C); {kept_checkpoint(out_dir)}"):
        train(cfg.make_config(**flags))


if __name__ == "__main__":
    main()

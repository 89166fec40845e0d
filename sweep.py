"""
The paper's scaling experiment: dec, encdec and bdd trained at several sizes with the same data,
seed and recipe; their loss against non-embedding parameters, training FLOPs and decode cost.

    python compare.py --sweep                       # CPU preset: 4 sizes x 3 archs, about 20 min
    python compare.py --sweep --sizes xs,s --seeds 3  # a subset of the sizes, 3 seeds each
    python compare.py --sweep --preset gpu --data corpus/   # the GPU grid: 8+4 layers, 0.6M-38M
    python compare.py --splits                      # bdd at 5:1, 2:1 and 1:1 against dec
    python sweep.py ...                             # the same, without compare.py

Every run trains through train.py's train() in its own folder,
<out_dir>/<size>/<arch>[_<n_enc>+<n_dec>]_s<seed>/ (checkpoint and log). Running the same command
again skips finished runs (their history comes from the checkpoint) and resumes unfinished ones
with train.py's exact resume, so a killed sweep loses at most one evaluation interval. Written to
--out_dir (default out/sweep):
- sweep.png: continuation loss against non-embedding parameters (with power-law fits), against
  training FLOPs (counted) and against decode-time KV bytes per context position (measured);
- splits.png (--splits): bdd's loss against its decode-time KV fraction n_dec / n_layer;
- sweep.json: every run, the per-size means, the fits and the parameter multipliers, in a "sweep"
  and a "splits" section (each command rewrites its own);
and the tables are printed at the end.
"""

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import torch

import cli
import corpus
import train
from model import ARCHS, build_model
from sample import flop_counter, load_checkpoint, measure_decode

ARCH_COLORS = {"dec": "tab:blue", "encdec": "tab:green", "bdd": "tab:red"}


@dataclass
class Preset:
    recipe: dict               # train.py flags shared by every run
    sizes: dict                # size name -> the train.py flags that make it (width and heads)
    split_size: str            # the size --splits trains at
    tokens_per_param: Optional[float] = None  # if set: max_iters per size for this many training
    #                                           tokens per (dec) non-embedding parameter


PRESETS = {
    # 6 layers (4 + 2) of width 32 to 112 (heads of 16): 74k to 0.90M non-embedding parameters,
    # each run 300 steps of 16 x 256 bytes (1.2M tokens, a quarter of the corpus) as compare.py.
    # The same tokens for every size (17 down to 1.4 per parameter): a laptop-scale trend, about
    # 20 minutes of single-core compute for the 12 runs.
    "cpu": Preset(
        recipe=dict(device="cpu", tokenizer="byte", n_layer=6, n_dec_layer=2, block_size=256,
                    dropout=0.0, batch_size=16, gradient_accumulation_steps=1, max_iters=300,
                    learning_rate=1e-3, min_lr=1e-4, warmup_iters=30, eval_interval=100,
                    eval_iters=4, log_interval=50, dtype="float32", compile=False, flex=False,
                    always_save_checkpoint=True),
        sizes={"xs": dict(n_embd=32, n_head=2), "s": dict(n_embd=48, n_head=3),
               "m": dict(n_embd=80, n_head=5), "l": dict(n_embd=112, n_head=7)},
        split_size="m"),
    # The authors' grid on one GPU: 12 layers (8 + 4), width 64 to 512, 0.59M to 37.8M
    # non-embedding parameters, 20 training tokens per parameter (12M to 755M gpt2 tokens: give
    # it a corpus that large with --data), bf16, torch.compile and FlexAttention.
    "gpu": Preset(
        recipe=dict(device="cuda", tokenizer="gpt2", n_layer=12, n_dec_layer=4, block_size=1024,
                    dropout=0.0, batch_size=16, gradient_accumulation_steps=2,
                    learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.95,
                    eval_interval=250, eval_iters=8, log_interval=50, dtype="bfloat16",
                    compile=True, flex=True, always_save_checkpoint=True),
        sizes={"xs": dict(n_embd=64, n_head=2), "s": dict(n_embd=128, n_head=2),
               "m": dict(n_embd=256, n_head=4), "l": dict(n_embd=384, n_head=6),
               "xl": dict(n_embd=512, n_head=8)},
        split_size="m", tokens_per_param=20),
}
SPLITS = (5, 2, 1)  # encoder:decoder layer ratios of --splits (n_dec = n_layer / (ratio + 1))
FLOP_BATCHES = 4    # real batches whose counted FLOPs are averaged (shapes vary for encdec)
# Checkpoint fields that may differ from this sweep's without changing what a run computes:
# max_iters (a longer run resumes the shorter), logging and evaluation points, the machine.
NOT_COMPARED = (*train.MACHINE_FIELDS, "max_iters", "log_interval", "eval_interval")


# -----------------------------------------------------------------------------
# small shared helpers (compare.py uses them too)


def write_json(obj, path):
    """obj as JSON in path, written whole."""
    with cli.written_whole(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=110):
    """Save a matplotlib figure as PNG, written whole, and close it."""
    try:
        with cli.written_whole(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        pyplot().close(fig)


def format_table(lines):
    """Rows of cells as aligned text: the first column left, the others right."""
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) for row in lines)


# -----------------------------------------------------------------------------
# power-law fits


def fit_power_law(n, loss, offset=True):
    """Fit L(N) = E + A * N^-alpha (offset) or L(N) = A * N^-alpha to points (n, loss).

    For a fixed E the law is a line in log space, log(L - E) = log A - alpha log N, so A and alpha
    come from linear least squares, and E from a bounded search over [0, min L) for the smallest
    squared loss residual. Returns {form, E, A, alpha, rms}; ValueError for fewer distinct sizes
    than parameters, or non-positive values."""
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    k = 3 if offset else 2
    form = "E + A*N^-alpha" if offset else "A*N^-alpha"
    if len(set(n.tolist())) < k:
        raise ValueError(f"{len(set(n.tolist()))} distinct sizes cannot fit the {k} parameters "
                         f"of L = {form}: train at least {k} sizes")
    if (n <= 0).any() or (loss <= 0).any() or not np.isfinite(loss).all():
        raise ValueError("a power law needs positive, finite sizes and losses")

    def line(E):  # (log A, alpha, squared residual) for this E
        slope, intercept = np.polyfit(np.log(n), np.log(loss - E), 1)
        pred = E + np.exp(intercept) * n ** slope
        return intercept, -slope, float(((pred - loss) ** 2).sum())

    E = 0.0
    if offset:
        top = loss.min() * (1 - 1e-9)
        grid = np.linspace(0.0, top, 401)
        best = int(np.argmin([line(e)[2] for e in grid]))
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        golden = (math.sqrt(5) - 1) / 2
        for _ in range(100):  # golden-section search between the best grid point's neighbours
            a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
            lo, hi = (lo, b) if line(a)[2] <= line(b)[2] else (a, hi)
        E = (lo + hi) / 2
    log_a, alpha, sse = line(E)
    return {"form": form, "E": float(E), "A": float(math.exp(log_a)), "alpha": float(alpha),
            "rms": math.sqrt(sse / len(n)), "points": len(n)}


def choose_fit(n, loss, mode="auto"):
    """The fit the sweep reports: mode "offset" or "power" as asked; "auto" takes E + A*N^-alpha
    when there are more sizes than its 3 parameters and E lands inside (0, min L), else the pure
    power law (E cannot be pinned). Returns the fit with a "why", or {"error": ...}."""
    try:
        if mode == "power":
            return {**fit_power_law(n, loss, offset=False), "why": "asked for (--fit power)"}
        if mode == "offset":
            return {**fit_power_law(n, loss), "why": "asked for (--fit offset)"}
        if len(set(n)) > 3:
            fit = fit_power_law(n, loss)
            if 1e-3 * min(loss) < fit["E"] < min(loss) * (1 - 1e-3):
                return {**fit, "why": "E pinned inside (0, min L)"}
            why = f"E not pinned (the best E, {fit['E']:.4g}, is at a bound)"
        else:
            why = f"E not pinned: {len(set(n))} sizes for 3 parameters"
        return {**fit_power_law(n, loss, offset=False), "why": why}
    except ValueError as e:
        return {"error": str(e)}


def fitted_loss(fit, n):
    return fit["E"] + fit["A"] * np.asarray(n, dtype=float) ** -fit["alpha"]


def params_for_loss(fit, loss):
    """The N at which the fitted law reaches `loss`; None if it never does (loss <= E)."""
    if loss <= fit["E"]:
        return None
    return (fit["A"] / (loss - fit["E"])) ** (1 / fit["alpha"])


def multipliers(fits, n_ranges):
    """How many times dec's non-embedding parameters each other arch needs for the same loss,
    from the fits: at the top, middle and bottom of the loss range that both fits span over their
    own sizes (n_ranges: arch -> (smallest N, largest N)); where the ranges do not overlap, at
    dec's range, marked extrapolated. None where a fit never reaches the loss."""
    if "dec" not in fits or "error" in fits["dec"]:
        return {}

    def span(arch):  # (lowest, highest) fitted loss over the arch's sizes
        return tuple(sorted(float(v) for v in fitted_loss(fits[arch], n_ranges[arch])))

    out = {}
    for arch, fit in fits.items():
        if arch == "dec" or "error" in fit:
            continue
        (d_lo, d_hi), (a_lo, a_hi) = span("dec"), span(arch)
        lo, hi = max(d_lo, a_lo), min(d_hi, a_hi)
        extrapolated = lo > hi
        if extrapolated:
            lo, hi = d_lo, d_hi
        out[arch] = []
        for loss in sorted({hi, (lo + hi) / 2, lo}, reverse=True):
            n_dec, n_arch = params_for_loss(fits["dec"], loss), params_for_loss(fit, loss)
            ratio = n_arch / n_dec if n_arch and n_dec else None
            out[arch].append({"loss": loss, "multiplier": ratio, "extrapolated": extrapolated})
    return out


# -----------------------------------------------------------------------------
# planning: which runs, in which state


def run_name(size, config):
    """<size>/<arch>[_<n_enc>+<n_dec>]_s<seed>: the run's folder under --out_dir."""
    n_enc, n_dec = config.n_layer - config.n_dec_layer, config.n_dec_layer
    split = "" if config.arch == "dec" else f"_{n_enc}+{n_dec}"
    return f"{size}/{config.arch}{split}_s{config.seed}"


@dataclass
class Run:
    size: str
    flags: dict                # train.py flags of this run: train.make_config(**flags) == config
    config: train.TrainConfig

    @property
    def name(self):
        return run_name(self.size, self.config)

    @property
    def shape(self):  # what its counted FLOPs depend on
        return self.size, self.config.arch, self.config.n_dec_layer

    @property
    def tokens_per_iter(self):
        c = self.config
        return c.batch_size * c.gradient_accumulation_steps * c.block_size


def checked_config(values):
    """The TrainConfig of these flags; ConfigError for settings that cannot work. (Whether a run
    may start fresh in its folder is decided once its folder is read, by run_state.)"""
    config = train.make_config(**values)
    train.check_config(replace(config, overwrite=True))
    return config


def make_run(size, values, out_root):
    config = checked_config(values)
    out_dir = os.path.join(out_root, run_name(size, config))
    return Run(size, {**values, "out_dir": out_dir}, replace(config, out_dir=out_dir))


def budget_iters(values, tokens_per_param):
    """Steps that give tokens_per_param training tokens per non-embedding parameter of dec at
    this size (every arch of the size gets the same tokens)."""
    config = checked_config({**values, "arch": "dec"})
    with torch.device("meta"):  # the shapes only, no memory
        n = build_model("dec", train.model_config(config)).num_params(non_embedding=True)
    per_iter = config.batch_size * config.gradient_accumulation_steps * config.block_size
    return math.ceil(tokens_per_param * n / per_iter)


def plan(args, flags, preset, sizes):
    """The runs of this command in training order: seed, then size, then arch (or split)."""
    base = flags.get("seed", train.TrainConfig.seed)
    runs = []
    for seed in range(base, base + args.seeds):
        for size in sizes:
            values = {**preset.recipe, **preset.sizes[size], **flags, "seed": seed}
            if preset.tokens_per_param and "max_iters" not in flags:
                values["max_iters"] = budget_iters(values, preset.tokens_per_param)
            if args.splits:  # dec as the reference, then bdd at each split
                n_layer = values["n_layer"]
                variants = [{"arch": "dec"}] + [{"arch": "bdd", "n_dec_layer": n_layer // (r + 1)}
                                                for r in SPLITS]
            else:
                variants = [{"arch": arch} for arch in ARCHS]
            runs += [make_run(size, {**values, **v}, args.out_dir) for v in variants]
    return runs


def run_state(run):
    """("new", 0), ("resume", iter) or ("done", iter) from the run folder's checkpoint. ConfigError
    if that checkpoint was trained with other settings, or for more steps than this sweep asks."""
    path = train.checkpoint_path(run.config.out_dir)
    if not path.exists():
        return "new", 0
    ckpt = train.load_checkpoint(path, mmap=True)
    saved, wanted = ckpt["train_config"], vars(run.config)
    # (a field newer than the checkpoint is missing from it; the run had its default then)
    differ = [f"{k} {saved[k]!r} (this sweep: {v!r})" for k, v in wanted.items()
              if k not in NOT_COMPARED and k in saved and saved[k] != v]
    if ckpt["iter_num"] > run.config.max_iters:
        differ.append(f"{ckpt['iter_num']} steps (this sweep: max_iters {run.config.max_iters})")
    if differ:
        raise train.ConfigError(f"{run.config.out_dir} holds a run trained with "
                                f"{', '.join(differ)}; use the same flags, another --out_dir, "
                                f"or delete that folder")
    return ("done" if ckpt["iter_num"] == run.config.max_iters else "resume"), ckpt["iter_num"]


# -----------------------------------------------------------------------------
# training and measuring


def count_train_flops(run, log=print):
    """FLOPs per training token of one step, forward and backward, counted by FlopCounterMode on
    the run's first FLOP_BATCHES real batches (its data, shape and seed; encdec's padded lengths
    and bdd's blocks vary per batch, so the mean). The optimizer's elementwise update is no
    matrix product and is not counted.

    Counted on the eager step without FlexAttention, as CPU runs train: bdd attends block by
    block to the keys each block may see, and its encoder skips the last block (no decoder reads
    it). A compiled or FlexAttention GPU run computes the masked T x 2T attention and the encoder
    over the whole row instead (torch would count flex as dense), so for it the count is the work
    the step needs rather than all that its kernels do."""
    c = run.config
    batches = train.load_batches(c, 0, 1)
    corpus = batches.meta["tokens"]["train"]
    passes = c.max_iters * run.tokens_per_iter / corpus
    if passes > 4:
        log(f"note: {run.name} reads the {corpus:,}-token training split {passes:.0f} times; "
            f"expect overfitting there: give a larger corpus with --data")
    model = build_model(c.arch, replace(train.model_config(c), flex=False)).to(c.device).train()
    total = 0
    for _ in range(FLOP_BATCHES):
        batch = train.to_device(batches.get_batch("train"), c.device)
        with flop_counter() as counter:
            with train.autocast(c):
                loss = model(batch)[1]
            loss.backward()
        total += counter.get_total_flops()
        model.zero_grad(set_to_none=True)
    return total / (FLOP_BATCHES * c.batch_size * c.block_size)


def state_config(run, state):
    """The config train() gets: fresh only into a folder without a checkpoint, else resumed."""
    return run.config if state == "new" else train.make_config(**{**run.flags,
                                                                  "init_from": "resume"})


def train_run(run, state, config, log=print):
    """The run's history: read from a finished checkpoint, or from train.train() (resumed)."""
    if state == "done":
        return train.load_checkpoint(train.checkpoint_path(config.out_dir), mmap=True)["history"]
    return train.train(config, log=lambda s: log(f"[{run.name}] {s}"))


def measure_run(run, history, flops_per_token, state):
    """One run's row of sweep.json: its loss, size, tokens, FLOPs and decode cost. KV bytes and
    FLOPs per decoded token are measured on the trained model at half its context."""
    c = run.config
    context = c.block_size // 2
    m = measure_decode(load_checkpoint(c.out_dir, c.device)[0], context,
                       n_tokens=max(1, min(16, context // 2)))
    return {"name": run.name, "size": run.size, "arch": c.arch, "seed": c.seed,
            "n_layer": c.n_layer, "n_dec_layer": None if c.arch == "dec" else c.n_dec_layer,
            "n_embd": c.n_embd, "n_head": c.n_head, "out_dir": c.out_dir,
            "status": {"new": "trained", "resume": "resumed", "done": "finished before"}[state],
            "iters": c.max_iters, "val_loss": history["val_loss"],
            "non_embedding_params": history["non_embedding_params"], "params": history["params"],
            "train_tokens": history["train_tokens"], "train_flops_per_token": flops_per_token,
            "train_flops": flops_per_token * history["train_tokens"],
            "kv_bytes_per_position": m["kv_bytes"] / context, "decode_context_len": context,
            "decode_layer_flops_per_token": m["flops"]["layers"],
            "decode_head_flops_per_token": m["flops"]["head"],
            "wall_time": history["wall_time"],
            "curve": [[p["tokens"], p["cont_loss"]] for p in history["curve"]]}


def execute(runs, log=print):
    """Train (or skip, or resume) every run, then measure it; one row per run. Every folder and
    config is checked before anything trains; progress lines say which run, how many are left
    and the ETA (the counted FLOPs still to train, at the speed of the runs trained so far)."""
    states = [run_state(run) for run in runs]
    configs = [state_config(run, state) for run, (state, _) in zip(runs, states)]
    for config in configs:
        train.check_config(config)
    log(f"== {len(runs)} runs: {sum(s == 'done' for s, _ in states)} finished, "
        f"{sum(s == 'resume' for s, _ in states)} to resume, {sum(s == 'new' for s, _ in states)} "
        f"new; counting training FLOPs ==")
    per_token = {}
    for run in runs:
        if run.shape not in per_token:
            per_token[run.shape] = count_train_flops(run, log)
    todo = [per_token[r.shape] * (r.config.max_iters - it) * r.tokens_per_iter
            for r, (_, it) in zip(runs, states)]
    seconds = flops = 0.0
    rows = []
    for i, (run, (state, it), config) in enumerate(zip(runs, states, configs)):
        left = sum(s != "done" for s, _ in states[i:])
        eta = train.duration(seconds / flops * sum(todo[i:])) if flops else "after the first run"
        what = {"new": "training", "resume": f"resuming at iter {it}",
                "done": "finished, skipped"}[state]
        log(f"== [{i + 1}/{len(runs)}] {run.name} ({what}); runs left to train: {left}, "
            f"ETA {eta} ==")
        t0 = time.time()
        history = train_run(run, state, config, log)
        if state != "done":
            seconds, flops = seconds + time.time() - t0, flops + todo[i]
        rows.append(measure_run(run, history, per_token[run.shape], state))
    return rows


# -----------------------------------------------------------------------------
# what the runs say


def summarize(rows):
    """One point per (size, arch, split): the mean over seeds and its spread (sample std)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["size"], r["arch"], r["n_dec_layer"]), []).append(r)
    points = []
    for rs in groups.values():
        losses = [r["val_loss"] for r in rs]
        points.append({**{k: rs[0][k] for k in (
            "size", "arch", "n_layer", "n_dec_layer", "n_embd", "n_head", "non_embedding_params",
            "train_tokens", "kv_bytes_per_position", "decode_layer_flops_per_token")},
            "train_flops": statistics.fmean(r["train_flops"] for r in rs),
            "loss": statistics.fmean(losses),
            "loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "seeds": len(rs)})
    return points


def sweep_section(rows, fit_mode):
    """Points, power-law fits of loss against non-embedding parameters, and multipliers."""
    points = summarize(rows)
    fits, ranges = {}, {}
    for arch in ARCHS:
        mine = [p for p in points if p["arch"] == arch]
        if mine:
            n = [p["non_embedding_params"] for p in mine]
            fits[arch] = choose_fit(n, [p["loss"] for p in mine], fit_mode)
            ranges[arch] = (min(n), max(n))
    return {"runs": rows, "points": points, "fits": fits,
            "multipliers": multipliers(fits, ranges)}


def splits_section(rows):
    """Points of each split with the decode-time KV fraction n_dec / n_layer (dec: 1) and the
    loss relative to dec."""
    points = summarize(rows)
    dec = next(p["loss"] for p in points if p["arch"] == "dec")
    for p in points:
        n_dec = p["n_dec_layer"] or p["n_layer"]
        p["kv_fraction"] = n_dec / p["n_layer"]
        p["split"] = "dec" if p["arch"] == "dec" else f"{p['n_layer'] - n_dec}:{n_dec}"
        p["loss_vs_dec"] = p["loss"] / dec
    return {"runs": rows, "points": points}


# -----------------------------------------------------------------------------
# figures and tables


def law(fit):
    if "error" in fit:
        return f"no fit ({fit['error']})"
    offset = f"{fit['E']:.3f} + " if fit["form"].startswith("E") else ""
    return f"L = {offset}{fit['A']:.3g} N^-{fit['alpha']:.3f}"


def plot_sweep(doc, path):
    """Three panels, each arch's mean loss over seeds (error bars: std): against non-embedding
    parameters with the fitted laws, against training FLOPs, against decode KV bytes/position."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    panels = [("non_embedding_params", "non-embedding parameters", "Loss against size"),
              ("train_flops", "training FLOPs (counted, forward + backward)",
               "Loss against training compute"),
              ("kv_bytes_per_position", "decode-time KV cache bytes per context position "
               "(float32)",
               "Loss against decode memory (lower left is better)")]
    for ax, (key, label, title) in zip(axes, panels):
        for arch in ARCHS:
            pts = sorted((p for p in doc["points"] if p["arch"] == arch), key=lambda p: p[key])
            if pts:
                ax.errorbar([p[key] for p in pts], [p["loss"] for p in pts],
                            yerr=[p["loss_std"] for p in pts], fmt="o" if ax is axes[0] else "o-",
                            color=ARCH_COLORS[arch], capsize=3, label=arch)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"continuation loss (nats per {doc['recipe']['tokenizer']} token)")
        ax.set_title(title)
    for arch, fit in doc["fits"].items():
        if "error" not in fit:
            n = [p["non_embedding_params"] for p in doc["points"] if p["arch"] == arch]
            grid = np.geomspace(min(n) / 1.3, max(n) * 1.3, 100)
            axes[0].plot(grid, fitted_loss(fit, grid), "--", color=ARCH_COLORS[arch], lw=1,
                         label=f"{arch}: {law(fit)}")
    for ax in axes:
        ax.legend(fontsize=8)
    r = doc["recipe"]
    fig.suptitle(f"nanoBDD scaling sweep: {doc['preset']} preset, {r['n_layer']} layers "
                 f"({r['n_layer'] - r['n_dec_layer']} + {r['n_dec_layer']} for encdec and bdd), "
                 f"{len(doc['seeds'])} seed(s), error bars: std over seeds")
    fig.tight_layout()
    save_figure(fig, path)


def plot_splits(doc, path):
    """bdd's loss against its decode-time KV fraction n_dec / n_layer, dec at 1 as reference."""
    plt = pyplot()
    points = sorted(doc["points"], key=lambda p: p["kv_fraction"])
    fig, ax = plt.subplots(figsize=(7, 5))
    for arch, style in (("bdd", "o-"), ("dec", "s")):
        pts = [p for p in points if p["arch"] == arch]
        ax.errorbar([p["kv_fraction"] for p in pts], [p["loss"] for p in pts],
                    yerr=[p["loss_std"] for p in pts], fmt=style, color=ARCH_COLORS[arch],
                    capsize=3, label=arch)
        for p in pts:
            ax.annotate(p["split"], (p["kv_fraction"], p["loss"]), textcoords="offset points",
                        xytext=(6, 6), fontsize=9)
    dec = next(p for p in points if p["arch"] == "dec")
    ax.axhline(dec["loss"], color=ARCH_COLORS["dec"], ls=":", lw=1)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("decode-time KV fraction n_dec / n_layer (dec: 1)")
    ax.set_ylabel(f"continuation loss (nats per {doc['recipe']['tokenizer']} token)")
    ax.set_title(f"bdd's encoder:decoder split, size {dec['size']} ({dec['n_layer']} layers, "
                 f"n_embd {dec['n_embd']})")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def loss_cell(p):
    return f"{p['loss']:.4f}" + (f" ±{p['loss_std']:.4f}" if p["seeds"] > 1 else "")


def sweep_table(section):
    """Per size the three losses and the ratios to dec; then the fits and the multipliers."""
    by = {(p["size"], p["arch"]): p for p in section["points"]}
    sizes = list(dict.fromkeys(p["size"] for p in section["points"]))
    lines = [["size", "N (dec)", *ARCHS, "bdd/dec", "encdec/dec"]]
    for size in sizes:
        row = {a: by.get((size, a)) for a in ARCHS}
        dec = row["dec"]
        ratios = [f"{row[a]['loss'] / dec['loss']:.3f}" if row[a] and dec else "-"
                  for a in ("bdd", "encdec")]
        lines.append([size, f"{dec['non_embedding_params']:,}" if dec else "-",
                      *(loss_cell(row[a]) if row[a] else "-" for a in ARCHS), *ratios])
    fits = [["arch", "fit of loss against non-embedding parameters N", "alpha", "rms", "why"]]
    for arch, fit in section["fits"].items():
        fits.append([arch, law(fit), f"{fit['alpha']:.3f}" if "alpha" in fit else "-",
                     f"{fit['rms']:.4f}" if "rms" in fit else "-", fit.get("why", "")])
    mult = [["arch", "at loss", "x dec's parameters"]]
    for arch, levels in section["multipliers"].items():
        for m in levels:
            value = "- (a fit never reaches it)" if m["multiplier"] is None else \
                f"{m['multiplier']:.3f}" + (" (extrapolated)" if m["extrapolated"] else "")
            mult.append([arch, f"{m['loss']:.4f}", value])
    return "\n\n".join(format_table(t) for t in (lines, fits, mult) if len(t) > 1)


def splits_table(section):
    lines = [["split", "arch", "KV fraction", "KV bytes/position", "loss", "loss/dec"]]
    for p in sorted(section["points"], key=lambda p: p["kv_fraction"]):
        lines.append([p["split"], p["arch"], f"{p['kv_fraction']:.3f}",
                      f"{p['kv_bytes_per_position']:,.0f}", loss_cell(p),
                      f"{p['loss_vs_dec']:.3f}"])
    return format_table(lines)


# -----------------------------------------------------------------------------
# command line


def parser():
    p = cli.Parser(description="The scaling sweep (--sweep, the default here) or bdd's split "
                   "trade-off (--splits). Any train.py flag overrides the preset.",
                   allow_abbrev=False)
    p.add_argument("--sweep", action="store_true", help="train dec, encdec and bdd at every size "
                   "of the preset (or --sizes)")
    p.add_argument("--splits", action="store_true", help="bdd at 5:1, 2:1 and 1:1 and dec, at "
                   "one size (the preset's split size, or --sizes NAME)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", help="comma-separated size names of the preset (default: all): "
                   + "; ".join(f"{name}: {','.join(pr.sizes)}" for name, pr in PRESETS.items()))
    p.add_argument("--seeds", type=int, default=1, help="runs per size and arch, with seeds "
                   "--seed, --seed + 1, ... (error bars: their std)")
    p.add_argument("--fit", choices=("auto", "offset", "power"), default="auto",
                   help="L = E + A*N^-alpha (offset), L = A*N^-alpha (power), or auto: offset "
                   "where the data pin E")
    p.add_argument("--out_dir", default=os.path.join("out", "sweep"))
    p.add_argument("--skip_train", action="store_true", help=argparse.SUPPRESS)  # to refuse it
    return p


def check_args(args, flags, preset):
    """The sizes to run; one line and exit 2 for the first thing wrong with the command."""
    sizes = [s for s in (args.sizes or "").split(",") if s]
    unknown = [s for s in sizes if s not in preset.sizes]
    set_per_run = [f for f in ("arch", "out_dir", "init_from", "n_embd", "n_head") +
                   (("n_dec_layer",) if args.splits else ()) if f in flags]
    n_layer = flags.get("n_layer", preset.recipe["n_layer"])
    problems = [
        (args.skip_train, "--skip_train does not apply to --sweep or --splits: they train their "
         "runs and skip the finished ones by themselves; drop --skip_train"),
        (args.sweep and args.splits, "--sweep and --splits run separately (they share --out_dir "
         "and its runs): give one of them"),
        (args.seeds < 1, f"--seeds must be at least 1, got {args.seeds}"),
        (args.sizes is not None and not sizes, "--sizes is empty; name sizes of the preset, e.g. "
         f"--sizes {','.join(preset.sizes)}"),
        (unknown, f"--sizes {args.sizes!r}: unknown size(s) {', '.join(unknown)}; the "
         f"{args.preset} preset has {', '.join(preset.sizes)}"),
        (args.splits and len(sizes) > 1, f"--splits trains at one size; give one name, e.g. "
         f"--sizes {preset.split_size}"),
        (args.splits and n_layer % 6, f"--splits needs --n_layer divisible by 6 (for the 5:1, "
         f"2:1 and 1:1 splits), got {n_layer}"),
        (set_per_run, f"{', '.join('--' + f for f in set_per_run)}: set per run by the sweep "
         f"(sizes, archs, splits); use --sizes and --out_dir instead"),
    ]
    for bad, message in problems:
        if bad:
            cli.fail(message)
    if not sizes:
        return [preset.split_size] if args.splits else list(preset.sizes)
    return [s for s in preset.sizes if s in sizes]  # the preset's order, small to large


def document(section_name, section, runs, args, started):
    """A section of sweep.json: what was run, how, and what came out."""
    first = runs[0].config
    per_run = ("arch", "seed", "out_dir", "init_from", "n_embd", "n_head", "max_iters") + \
        (("n_dec_layer",) if section_name == "splits" else ())
    sizes = {r.size: {"n_embd": r.config.n_embd, "n_head": r.config.n_head,
                      "max_iters": r.config.max_iters} for r in runs}
    return {"preset": args.preset, "device": first.device, "torch": torch.__version__,
            "recipe": {k: v for k, v in asdict(first).items() if k not in per_run},
            "sizes": sizes, "seeds": sorted({r.config.seed for r in runs}),
            "wall_time": time.time() - started, **section}


def save(doc, section_name, out_dir):
    """Write the section into sweep.json, keeping the other section if the file has one."""
    path = os.path.join(out_dir, "sweep.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {}
    merged = {**{k: v for k, v in old.items() if k in ("sweep", "splits")}, section_name: doc}
    write_json(merged, path)


def main(argv=None):
    args, rest = parser().parse_known_args(argv)
    flags = vars(train.parser().parse_args(rest))  # exits 2 on an unknown flag
    preset = PRESETS[args.preset]
    sizes = check_args(args, flags, preset)
    started = time.time()
    try:
        runs = plan(args, flags, preset, sizes)
        os.makedirs(args.out_dir, exist_ok=True)
        rows = execute(runs)
    except (train.ConfigError, corpus.DataError) as e:
        cli.fail(str(e))
    except train.LossNotFinite as e:
        cli.fail(str(e), code=1)
    except KeyboardInterrupt:
        cli.fail("interrupted; run the same command again to resume where it stopped", code=130)
    name = "splits" if args.splits else "sweep"
    section = splits_section(rows) if args.splits else sweep_section(rows, args.fit)
    doc = document(name, section, runs, args, started)
    save(doc, name, args.out_dir)
    figure = os.path.join(args.out_dir, f"{name}.png")
    (plot_splits if args.splits else plot_sweep)(doc, figure)
    print((splits_table if args.splits else sweep_table)(section))
    print(f"wrote {os.path.join(args.out_dir, 'sweep.json')} ({name}) and {figure} in "
          f"{train.duration(doc['wall_time'])}")


if __name__ == "__main__":
    main()

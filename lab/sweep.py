"""
The paper's scaling experiment: dec, encdec and bdd trained at several sizes with the same data,
seed and recipe; their loss against non-embedding parameters, training FLOPs and decode cost.

    python -m lab.sweep                          # cpu preset: 4 sizes x 3 archs, about 12 minutes
    python -m lab.sweep --sizes xs,s --seeds 3   # a subset of the sizes, 3 seeds each
    python -m lab.sweep --preset gpu --data corpus/   # the GPU grid: 8+4 layers, 0.6M to 38M
    python -m lab.sweep --splits                 # bdd at 5:1, 2:1 and 1:1 against dec
    python -m lab.sweep --archs dec,bdd,dec:kv1 --lr auto   # variants, at lab/frontier.py's tuned rates

--archs takes lab/frontier.py's variants. The sizes keep their head counts (cpu: 2, 3, 5, 7 heads
of 16 dims), so a kv<N> is refused at a size whose heads it does not divide (kv2 fits xs only).
Each run trains through the experiment runner (lab/experiment.py) in its own folder,
<out_dir>/<size>/<variant>[_<n_enc>+<n_dec>]_s<seed>/ (dec:kv1 -> dec-kv1); running the same
command again skips finished runs and resumes unfinished ones with train.py's exact resume.
Written to --out_dir (default out/sweep):
- sweep.png: continuation loss against non-embedding parameters (with power-law fits), against
  training FLOPs (counted) and against decode-time cache bytes per context position (measured);
- splits.png (--splits): bdd's loss against its decode-time KV fraction n_dec / n_layer;
- sweep.json: every run, the per-size means, the fits and the parameter multipliers, in a "sweep"
  and a "splits" section (each command rewrites its own);
and the tables are printed at the end.
"""

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

import cli
import config as cfg
from lab import experiment as ex
import files
from lab import measure
from lab.fits import choose_fit, fitted_loss, law, multipliers
import train
from model import ARCHS, build_model


@dataclass
class Sizes:
    """The sizes a preset's sweep trains, and how."""
    sizes: dict                # size name -> the train.py flags that make it (width and heads)
    split_size: str            # the size --splits trains at
    overrides: dict            # flags of every run that differ from the preset
    tokens_per_param: Optional[float] = None  # if set: max_iters per size for this many training
    #                                           tokens per (dec) non-embedding parameter


SIZES = {
    # The cpu preset's recipe (6 layers = 4 + 2, 300 steps of 16 x 256 bytes: 1.2M tokens, a
    # quarter of the corpus) at widths 32 to 112 (heads of 16): 74k to 0.90M non-embedding
    # parameters. The same tokens for every size (17 down to 1.4 per parameter): a laptop-scale
    # trend, about 12 minutes for the 12 runs on 2 cores.
    "cpu": Sizes(sizes={"xs": dict(n_embd=32, n_head=2), "s": dict(n_embd=48, n_head=3),
                        "m": dict(n_embd=80, n_head=5), "l": dict(n_embd=112, n_head=7)},
                 split_size="m", overrides={}),
    # The authors' grid on one GPU: the gpu preset's 12 layers (8 + 4), width 64 to 512, 0.59M
    # to 37.8M non-embedding parameters, 20 training tokens per parameter (12M to 755M gpt2
    # tokens: give it a corpus that large with --data); small widths train at a larger learning
    # rate, and so much data needs no dropout.
    "gpu": Sizes(sizes={"xs": dict(n_embd=64, n_head=2), "s": dict(n_embd=128, n_head=2),
                        "m": dict(n_embd=256, n_head=4), "l": dict(n_embd=384, n_head=6),
                        "xl": dict(n_embd=512, n_head=8)},
                 split_size="m", tokens_per_param=20,
                 overrides=dict(dropout=0.0, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
                                eval_interval=250, log_interval=50)),
}
SPLITS = (5, 2, 1)  # encoder:decoder layer ratios of --splits (n_dec = n_layer / (ratio + 1))


# -----------------------------------------------------------------------------
# the plan, and what each run measures


def run_name(size, variant, config):
    """<size>/<variant>[_<n_enc>+<n_dec>]_s<seed>: the run's folder under --out_dir."""
    split = "" if config.arch == "dec" else f"_{config.n_layer - config.n_dec}+{config.n_dec}"
    return f"{size}/{ex.variant_folder(variant)}{split}_s{config.seed}"


def budget_iters(values, recipe, tokens_per_param):
    """Steps that give tokens_per_param training tokens per non-embedding parameter of dec at
    this size (every arch of the size gets the same tokens)."""
    config = cfg.make_config(recipe, **{**values, "arch": "dec"})
    with torch.device("meta"):  # the shapes only, no memory
        n = build_model("dec", cfg.model_config(config)).num_params(non_embedding=True)
    return math.ceil(tokens_per_param * n / ex.tokens_per_iter(config))


def size_flags(args, flags, size):
    """The flags every run of a size shares (over the preset's recipe, SIZES' overrides)."""
    return {**SIZES[args.preset].sizes[size], **flags, "preset": args.preset}


def plan(args, flags, sizes, lrs=None):
    """The runs of this command in training order: seed, then size, then variant (or split).
    lrs: {variant or arch: learning rate} (None: the preset's)."""
    table = SIZES[args.preset]
    base = flags.get("seed", cfg.TrainConfig.seed)
    runs = []
    for seed in range(base, base + args.seeds):
        for size in sizes:
            values, recipe = {**size_flags(args, flags, size), "seed": seed}, table.overrides
            if table.tokens_per_param and "max_iters" not in flags:
                recipe = {**recipe, "max_iters": budget_iters(values, recipe,
                                                              table.tokens_per_param)}
            if args.splits:  # dec as the reference, then bdd at each split
                n_layer = cfg.make_config(recipe, **values).n_layer
                variants = [("dec", {})] + [("bdd", {"n_dec_layer": n_layer // (r + 1)})
                                            for r in SPLITS]
            else:
                variants = [(name, {}) for name in args.archs]
            for name, split in variants:
                v = {**ex.variant_flags(name), **split,
                     **(ex.lr_flags(name, lrs, args.lr) if lrs else {})}
                config = cfg.make_config(recipe, **values, **v)
                runs.append(ex.make_run(run_name(size, name, config), {**values, **v},
                                        args.out_dir, recipe, size=size, variant=name))
    return runs


def measure_run(done):
    """One run's row of sweep.json: its loss, size, tokens, FLOPs and decode cost. Cache bytes
    and FLOPs per decoded token are measured on the trained model at half its context."""
    run, history, c = done.run, done.history, done.run.config
    context = c.block_size // 2
    m = measure.measure_decode(cfg.load_model(c.out_dir, c.device)[0], context)
    return {"name": run.name, "size": run.labels["size"], "variant": run.labels["variant"],
            "arch": c.arch, "seed": c.seed, "n_layer": c.n_layer,
            "n_dec_layer": None if c.arch == "dec" else c.n_dec, "n_embd": c.n_embd,
            "n_head": c.n_head, "n_kv_head": c.n_kv_head or c.n_head, "kv_share": c.kv_share,
            "learning_rate": c.learning_rate, "min_lr": c.min_lr, "out_dir": c.out_dir,
            "status": {"new": "trained", "resume": "resumed", "done": "finished before"}[done.state],
            "iters": c.max_iters, "cont_loss": history["cont_loss"],
            "non_embedding_params": history["non_embedding_params"], "params": history["params"],
            "train_tokens": history["train_tokens"], "train_flops_per_token": done.flops_per_token,
            "train_flops": done.flops_per_token * history["train_tokens"],
            "kv_bytes_per_position": m["kv_bytes"] / context,
            "held_bytes_per_position": m["held_bytes_per_seq"] / context, "decode_context_len": context,
            "decode_layer_flops_per_token": m["flops"]["layers"],
            "decode_head_flops_per_token": m["flops"]["head"],
            "wall_time": history["wall_time"],
            "curve": [[p["tokens"], p["cont_loss"]] for p in history["curve"]]}


# -----------------------------------------------------------------------------
# what the runs say


def summarize(rows):
    """One point per (size, variant, split): the mean over seeds and its spread (sample std)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["size"], r["variant"], r["n_dec_layer"]), []).append(r)
    points = []
    for rs in groups.values():
        losses = [r["cont_loss"] for r in rs]
        points.append({**{k: rs[0][k] for k in (
            "size", "variant", "arch", "n_layer", "n_dec_layer", "n_embd", "n_head", "n_kv_head",
            "kv_share", "learning_rate", "non_embedding_params",
            "train_tokens", "kv_bytes_per_position", "decode_layer_flops_per_token")},
            "train_flops": statistics.fmean(r["train_flops"] for r in rs),
            **dict(zip(("loss", "loss_std"), ex.mean_sd(losses))),
            "seeds": len(rs)})
    return points


def sweep_section(rows, fit_mode):
    """Points, power-law fits of loss against non-embedding parameters, and multipliers."""
    points = summarize(rows)
    fits, ranges = {}, {}
    for name in dict.fromkeys(p["variant"] for p in points):
        mine = [p for p in points if p["variant"] == name]
        n = [p["non_embedding_params"] for p in mine]
        fits[name] = choose_fit(n, [p["loss"] for p in mine], fit_mode)
        ranges[name] = (min(n), max(n))
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


def plot_sweep(doc, path):
    """Three panels, each variant's mean loss over seeds (error bars: std): against
    non-embedding parameters with the fitted laws, against training FLOPs, against decode KV
    bytes/position."""
    plt = ex.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    panels = [("non_embedding_params", "non-embedding parameters", "Loss against size"),
              ("train_flops", "training FLOPs (counted, forward + backward)",
               "Loss against training compute"),
              ("kv_bytes_per_position", "decode-time KV cache bytes per context position "
               "(float32)",
               "Loss against decode memory (lower left is better)")]
    names = list(doc["fits"])
    for ax, (key, label, title) in zip(axes, panels):
        for name in names:
            pts = sorted((p for p in doc["points"] if p["variant"] == name), key=lambda p: p[key])
            color, marker = ex.variant_style(name, names)
            ax.errorbar([p[key] for p in pts], [p["loss"] for p in pts],
                        yerr=[p["loss_std"] for p in pts],
                        fmt=marker if ax is axes[0] else marker + "-", color=color, capsize=3,
                        label=name)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"continuation loss (nats per {doc['recipe']['tokenizer']} token)")
        ax.set_title(title)
    for name, fit in doc["fits"].items():
        if "error" not in fit:
            n = [p["non_embedding_params"] for p in doc["points"] if p["variant"] == name]
            grid = np.geomspace(min(n) / 1.3, max(n) * 1.3, 100)
            axes[0].plot(grid, fitted_loss(fit, grid), "--", color=ex.variant_style(name, names)[0],
                         lw=1, label=f"{name}: {law(fit)}")
    for ax in axes:
        ax.legend(fontsize=8)
    L, n_dec = doc["recipe"]["n_layer"], max(p["n_dec_layer"] or 0 for p in doc["points"])
    fig.suptitle(f"nanoBDD scaling sweep: {doc['preset']} preset, {L} layers "
                 f"({L - n_dec} + {n_dec} for encdec and bdd), "
                 f"{len(doc['seeds'])} seed(s), error bars: std over seeds")
    fig.tight_layout()
    ex.save_figure(fig, path)


def plot_splits(doc, path):
    """bdd's loss against its decode-time KV fraction n_dec / n_layer, dec at 1 as reference."""
    plt = ex.pyplot()
    points = sorted(doc["points"], key=lambda p: p["kv_fraction"])
    fig, ax = plt.subplots(figsize=(7, 5))
    for arch, style in (("bdd", "o-"), ("dec", "s")):
        pts = [p for p in points if p["arch"] == arch]
        ax.errorbar([p["kv_fraction"] for p in pts], [p["loss"] for p in pts],
                    yerr=[p["loss_std"] for p in pts], fmt=style, color=ex.ARCH_COLORS[arch],
                    capsize=3, label=arch)
        for p in pts:
            ax.annotate(p["split"], (p["kv_fraction"], p["loss"]), textcoords="offset points",
                        xytext=(6, 6), fontsize=9)
    dec = next(p for p in points if p["arch"] == "dec")
    ax.axhline(dec["loss"], color=ex.ARCH_COLORS["dec"], ls=":", lw=1)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("decode-time KV fraction n_dec / n_layer (dec: 1)")
    ax.set_ylabel(f"continuation loss (nats per {doc['recipe']['tokenizer']} token)")
    ax.set_title(f"bdd's encoder:decoder split, size {dec['size']} ({dec['n_layer']} layers, "
                 f"n_embd {dec['n_embd']})")
    ax.legend()
    fig.tight_layout()
    ex.save_figure(fig, path)


def loss_cell(p):
    return ex.mean_cell(p["loss"], p["loss_std"], p["seeds"])


def sweep_table(section):
    """Per size each variant's loss and its ratio to dec's; then the fits and the multipliers."""
    by = {(p["size"], p["variant"]): p for p in section["points"]}
    sizes = list(dict.fromkeys(p["size"] for p in section["points"]))
    names = list(section["fits"])
    others = [n for n in names if n != "dec"] if "dec" in names else []
    lines = [["size", "N (dec)", *names, *(f"{n}/dec" for n in others)]]
    for size in sizes:
        row = {n: by.get((size, n)) for n in names}
        dec = row.get("dec")
        ratios = [f"{row[n]['loss'] / dec['loss']:.3f}" if row[n] and dec else "-"
                  for n in others]
        lines.append([size, f"{dec['non_embedding_params']:,}" if dec else "-",
                      *(loss_cell(row[n]) if row[n] else "-" for n in names), *ratios])
    fits = [["variant", "fit of loss against non-embedding parameters N", "alpha", "rms", "why"]]
    for arch, fit in section["fits"].items():
        fits.append([arch, law(fit), f"{fit['alpha']:.3f}" if "alpha" in fit else "-",
                     f"{fit['rms']:.4f}" if "rms" in fit else "-", fit.get("why", "")])
    mult = [["variant", "at loss", "x dec's parameters"]]
    for arch, levels in section["multipliers"].items():
        for m in levels:
            value = "- (a fit never reaches it)" if m["multiplier"] is None else \
                f"{m['multiplier']:.3f}" + (" (extrapolated)" if m["extrapolated"] else "")
            mult.append([arch, f"{m['loss']:.4f}", value])
    return "\n\n".join(ex.format_table(t) for t in (lines, fits, mult) if len(t) > 1)


def splits_table(section):
    lines = [["split", "arch", "KV fraction", "KV bytes/position", "loss", "loss/dec"]]
    for p in sorted(section["points"], key=lambda p: p["kv_fraction"]):
        lines.append([p["split"], p["arch"], f"{p['kv_fraction']:.3f}",
                      f"{p['kv_bytes_per_position']:,.0f}", loss_cell(p),
                      f"{p['loss_vs_dec']:.3f}"])
    return ex.format_table(lines)


# -----------------------------------------------------------------------------
# command line


def parse(argv):
    p = ex.parser("The scaling sweep, or bdd's split trade-off (--splits).", "sweep",
                  per_run={"arch": "use --archs", "n_embd": "use --sizes", "n_head": "use --sizes",
                           "n_kv_head": "use --archs with :kv<N>, e.g. dec:kv1",
                           "kv_share": "use --archs with :cla<K>, e.g. dec:cla3"})
    ex.add_variant_flags(p, ",".join(ARCHS), "the preset's --learning_rate for all", ex.LR_FILE,
                         note=". The sizes keep their head counts (cpu: 2, 3, 5, 7 heads of 16 "
                         "dims, as the published sweep): a kv<N> is refused at a size whose "
                         "heads it does not divide (kv2 fits xs only, kv1 all)")
    p.add_argument("--splits", action="store_true", help="bdd at 5:1, 2:1 and 1:1 and dec, at "
                   "one size (the preset's split size, or --sizes NAME)")
    p.add_argument("--sizes", help="comma-separated size names of the preset (default: all): "
                   + "; ".join(f"{name}: {','.join(t.sizes)}" for name, t in SIZES.items()))
    p.add_argument("--seeds", type=int, default=1, help="runs per size and arch, with seeds "
                   "--seed, --seed + 1, ... (error bars: their std; at most 100)")
    p.add_argument("--fit", choices=("auto", "offset", "power"), default="auto",
                   help="L = E + A*N^-alpha (offset), L = A*N^-alpha (power), or auto: offset "
                   "where the data pin E")
    args = ex.parse_args(p, argv)
    flags = cfg.given_flags(args)
    args.preset = flags.get("preset") or cfg.make_config(**flags).preset
    sizes = check_args(args, flags)
    args.archs = ex.parse_archs(args.archs or ",".join(ARCHS))
    args.lr_file = args.lr_file or ex.LR_FILE
    for name in args.archs:
        check_sizes(args, flags, name, sizes)
    return args, flags, sizes


def check_sizes(args, flags, name, sizes):
    """ConfigError if the variant's options do not fit one of the sizes, naming those they fit."""
    recipe = SIZES[args.preset].overrides
    bad = [s for s in sizes if ex.variant_problem(name, size_flags(args, flags, s), recipe)]
    if bad:
        problem = ex.variant_problem(name, size_flags(args, flags, bad[0]), recipe)[0]
        table = SIZES[args.preset].sizes
        fits = [s for s in table
                if not ex.variant_problem(name, size_flags(args, flags, s), recipe)]
        heads = ", ".join(f"{s} {v['n_head']}" for s, v in table.items())
        raise cfg.ConfigError(f"--archs {name}: {problem} at size {bad[0]}; the {args.preset} "
                              f"sizes keep their heads ({heads}), so {name} fits "
                              + (f"size(s) {', '.join(fits)}: choose them with --sizes "
                                 f"{','.join(fits)}" if fits else "none of them"))


def check_args(args, flags):
    """The sizes to run; ConfigError for the first thing wrong with the command."""
    table = SIZES[args.preset]
    sizes = [s for s in (args.sizes or "").split(",") if s]
    unknown = [s for s in sizes if s not in table.sizes]
    n_layer = flags.get("n_layer", cfg.PRESETS[args.preset].get("n_layer",
                                                                cfg.TrainConfig.n_layer))
    problems = [
        (not 1 <= args.seeds <= 100, f"--seeds must be 1 to 100, got {args.seeds}"),
        (args.sizes is not None and not sizes, "--sizes is empty; name sizes of the preset, e.g. "
         f"--sizes {','.join(table.sizes)}"),
        (unknown, f"--sizes {args.sizes!r}: unknown size(s) {', '.join(unknown)}; the "
         f"{args.preset} preset has {', '.join(table.sizes)}"),
        (args.splits and len(sizes) > 1, f"--splits trains at one size; give one name, e.g. "
         f"--sizes {table.split_size}"),
        (args.splits and n_layer % 6, f"--splits needs --n_layer divisible by 6 (for the 5:1, "
         f"2:1 and 1:1 splits), got {n_layer}"),
        (args.splits and "n_dec_layer" in flags, "--n_dec_layer is set per run by --splits"),
        (args.splits and args.archs is not None, "--splits trains dec and bdd; drop --archs"),
        (args.lr is not None and ("learning_rate" in flags or "min_lr" in flags),
         "--lr sets each run's learning_rate and min_lr; drop --learning_rate and --min_lr"),
        (flags.get("max_iters") == 0, "--max_iters 0 trains nothing to fit; give at least 1"),
    ]
    cfg.refuse(problems)
    if not sizes:
        return [table.split_size] if args.splits else list(table.sizes)
    return [s for s in table.sizes if s in sizes]  # the preset's order, small to large


def document(section, runs, args, started):
    """A section of sweep.json: what was run, how, and what came out."""
    per_run = ("arch", "seed", "out_dir", "init_from", "n_embd", "n_head", "max_iters",
               "n_kv_head", "kv_share") + (("n_dec_layer",) if args.splits else ()) + \
        (("learning_rate", "min_lr") if args.lr else ())
    sizes = {r.labels["size"]: {"n_embd": r.config.n_embd, "n_head": r.config.n_head,
                                "max_iters": r.config.max_iters} for r in runs}
    first = runs[0].config
    return {"preset": args.preset, "device": first.device, "torch": torch.__version__,
            "recipe": {k: v for k, v in asdict(first).items() if k not in per_run},
            "sizes": sizes, "seeds": sorted({r.config.seed for r in runs}),
            "archs": list(dict.fromkeys(r.labels["variant"] for r in runs)),
            "learning_rates": args.lr and {"lr": args.lr, "lr_file": args.lr_file, "rates": {
                r.labels["variant"]: r.config.learning_rate for r in runs}},
            "wall_time": time.time() - started, **section}


def earlier_sections(out_dir):
    """The sections of an earlier sweep.json in out_dir (none if there is none), checked by
    shape: a sweep keeps the splits' section and the other way round."""
    path = os.path.join(out_dir, "sweep.json")
    if not os.path.exists(path):
        return {}
    return files.read_json(path, {"sweep?": dict, "splits?": dict}, "delete it, or fix that "
                           "field")


def main(argv=None):
    with cli.guard("interrupted; run the same command again to resume where it stopped"):
        args, flags, sizes = parse(argv)
        started = time.time()
        lrs = ex.learning_rates(args.lr, args.lr_file)[0] if args.lr else None
        runs = plan(args, flags, sizes, lrs)
        ex.use_threads(runs)
        with files.holding(args.out_dir, "experiment"):
            earlier = earlier_sections(args.out_dir)  # before the runs: a damaged file stops now
            rows = [measure_run(done) for done in ex.execute(runs)]
            name = "splits" if args.splits else "sweep"
            section = splits_section(rows) if args.splits else sweep_section(rows, args.fit)
            doc = document(section, runs, args, started)
            path = os.path.join(args.out_dir, "sweep.json")
            ex.write_json({**{k: v for k, v in earlier.items() if k in ("sweep", "splits")},
                           name: doc}, path)
            figure = os.path.join(args.out_dir, f"{name}.png")
            (plot_splits if args.splits else plot_sweep)(doc, figure)
    print((splits_table if args.splits else sweep_table)(section))
    print(f"wrote {path} ({name}) and {figure} in {train.duration(doc['wall_time'])}")


if __name__ == "__main__":
    main()

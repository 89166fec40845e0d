"""
The memory frontier: dec, the standard ways to make it hold fewer keys and values (grouped-query
and multi-query attention, cross-layer K/V sharing), encdec and bdd, each at its own tuned
learning rate and with several seeds: continuation loss against the cache bytes a decode step
holds per context position. And the learning-rate sweep that tunes those rates.

    python -m lab.frontier --lr_sweep        # each arch at 5 learning rates -> out/frontier/lr.json
    python -m lab.frontier                   # 8 variants x 3 seeds at the tuned rates (--lr auto)
    python -m lab.frontier --archs dec,bdd,dec:kv1 --seeds 2 --lr dec=2e-3,bdd=4e-3

Both train the cpu preset at RECIPE (experiment.QUICK cut to 120 steps, so that each command
fits in about half an hour on 2 cores); any train.py flag overrides it for every run. A variant is
`arch[:option]...`: kv<N> gives every attention N key/value heads (GQA; MQA at kv1), cla<K> lets
each K consecutive layers of dec share the first one's K/V (CLA). Every run trains through the
experiment runner (lab/experiment.py) in its own folder, <out_dir>/<variant>_s<seed> (frontier) or
<out_dir>/lr_sweep/<variant>_lr<rate> (sweep); the same command again skips finished runs and
resumes unfinished ones.

--lr_sweep trains each variant (default dec, encdec, bdd) at every rate of --lrs (min_lr a tenth
of it), one seed, scores each trained model's continuation loss on two disjoint halves of the
validation windows, picks each variant's rate on the "choose" half and reports the loss at that
rate on the "report" half. It writes --lr_file (default <out_dir>/lr.json: the grid, both halves'
losses, the chosen rates) and lr.png beside it; a run that diverges is recorded as such.

The frontier measures per run the continuation loss and the cache bytes held per context position
(measure.measure_decode at half the context, batch 1), and per variant the decode tokens/s at one
memory budget for all (measure.serving_budget: 20 sequences of the variant that holds the most).
It writes frontier.json (every run with its flags; per variant the mean and sd over seeds),
frontier.png (loss against bytes per position, the Pareto frontier drawn) and prints the table.
"""

import math
import os
import statistics
import time
from dataclasses import asdict

import torch

import cli
import config as cfg
from lab import experiment as ex
import files
from lab import measure
import pack
import train
from model import ARCHS

# The recipe of both commands: the cpu preset at experiment.QUICK, cut from 150 to 120 steps so
# that the frontier's 24 runs and the sweep's 21 fit in about half an hour each on 2 cores. The
# rates are tuned at the recipe the frontier trains with.
RECIPE = {"preset": "cpu", **ex.QUICK, "max_iters": 120, "warmup_iters": 12, "eval_interval": 40}
FRONTIER_ARCHS = "dec,dec:kv2,dec:kv1,dec:cla2,dec:cla3,encdec,bdd,bdd:kv1"
LR_GRID = tuple(1e-3 * 2 ** k for k in range(5))  # 1e-3 (the cpu preset's) to 1.6e-2, a factor 2 apart
EVAL_WINDOWS = 256   # validation windows the sweep scores each run on: 128 per half
REPEATS = 2          # serving: timing rounds at the budget (8x at batch 1)
# The flags each run sets, and so left out of the recipe the reports show.
PER_RUN = ("arch", "seed", "out_dir", "init_from", "n_kv_head", "kv_share", "learning_rate",
           "min_lr", "always_save_checkpoint")


# -----------------------------------------------------------------------------
# the learning-rate sweep


def lr_plan(args, flags):
    """One run per rate and variant, rate by rate (an interrupted sweep has every variant at the
    rates it reached). The variants are checked (check_args)."""
    runs = []
    for rate in args.lrs:
        for name in args.archs:
            values = {**flags, "learning_rate": rate, "min_lr": rate / 10}
            folder = os.path.join("lr_sweep", f"{ex.variant_folder(name)}_lr{rate:g}")
            runs.append(ex.make_run(folder, {**values, **ex.variant_flags(name)}, args.out_dir,
                                    RECIPE, variant=name))
    return runs


def half_offsets(batches, n=EVAL_WINDOWS):
    """(choose, report): two disjoint halves of n evaluation windows of the validation split
    (pack.Batches.eval_offsets), alternating, so that each half covers the whole split. Fewer
    when the split holds fewer distinct windows; ConfigError when it holds fewer than two."""
    last = len(batches.data["val"]) - batches.block_size - 1  # offsets 0..last
    n = min(n, last + 1) // 2 * 2  # distinct offsets: linspace steps of at least 1
    if n < 2:
        raise cfg.ConfigError(f"the validation split holds one window of {batches.block_size + 1} "
                              f"tokens; the learning-rate sweep needs two: more data or a smaller "
                              f"--block_size")
    offsets = batches.eval_offsets("val", n)
    return offsets[0::2], offsets[1::2]


@torch.no_grad()
def continuation_loss(model, batches, offsets, config):
    """The mean continuation loss (DESIGN.md 4) of the model over the validation windows at
    offsets, batch_size windows at a time (every window has the same number of targets)."""
    total = 0.0
    with cfg.autocast(config):
        for i in range(0, len(offsets), config.batch_size):
            chunk = offsets[i:i + config.batch_size]
            windows = batches.windows("val", chunk).to(config.device)
            total += model(pack.continuation_batch(config.arch, windows))[1].item() * len(chunk)
    return total / len(offsets)


def lr_row(done):
    """One run of the sweep: its rate, status and continuation loss on both halves."""
    run, c = done.run, done.run.config
    row = {"name": run.name, "variant": run.labels["variant"], "arch": c.arch,
           "lr": c.learning_rate, "min_lr": c.min_lr, "seed": c.seed, "iters": c.max_iters,
           "status": status(done), "out_dir": c.out_dir, "flags": run.flags}
    if done.history is None:
        return {**row, "cont_loss": None, "choose_loss": None, "report_loss": None}
    batches = train.load_batches(c, log=lambda line: None)
    choose, report = half_offsets(batches)
    model = cfg.load_model(c.out_dir, c.device)[0]
    return {**row, "cont_loss": done.history["cont_loss"],
            "choose_loss": continuation_loss(model, batches, choose, c),
            "report_loss": continuation_loss(model, batches, report, c)}


def status(done):
    return {"new": "trained", "resume": "resumed", "done": "finished before",
            "diverged": "diverged"}[done.state]


def pick(rows):
    """The rate with the lowest loss on the choose half among the runs that trained (None if
    none did), its loss on the report half, and whether it is at an end of the grid."""
    trained = [r for r in rows if r["choose_loss"] is not None and math.isfinite(r["choose_loss"])]
    if not trained:
        return None
    best = min(trained, key=lambda r: r["choose_loss"])
    grid = [r["lr"] for r in rows]
    return {"lr": best["lr"], "choose_loss": best["choose_loss"],
            "report_loss": best["report_loss"], "at_edge": best["lr"] in (min(grid), max(grid))}


def lr_document(rows, runs, args, started):
    """lr.json: the recipe, the two halves, every run and each variant's choice."""
    first = runs[0].config
    batches = train.load_batches(first, log=lambda line: None)
    choose, report = half_offsets(batches)
    variants = {}
    for name in args.archs:
        mine = [r for r in rows if r["variant"] == name]
        variants[name] = {"chosen": pick(mine), "runs": mine}
    return {"preset": first.preset, "device": first.device, "torch": torch.__version__,
            "recipe": recipe(first), "seed": first.seed, "grid": list(args.lrs),
            "eval": {"windows": len(choose) + len(report),
                     "choose": "the even-numbered validation windows; picks each rate",
                     "report": "the odd-numbered ones; the loss reported at that rate",
                     "choose_offsets": choose, "report_offsets": report},
            "chosen": {n: v["chosen"]["lr"] for n, v in variants.items() if v["chosen"]},
            "variants": variants, "wall_time": time.time() - started}


def plot_lrs(doc, path):
    """Loss on each half against the learning rate per variant; a star at the chosen rate."""
    plt = ex.pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    names = list(doc["variants"])
    for name, v in doc["variants"].items():
        color, marker = ex.variant_style(name, names)
        rs = [r for r in v["runs"] if r["choose_loss"] is not None]
        ax.plot([r["lr"] for r in rs], [r["choose_loss"] for r in rs], marker + "-", color=color,
                label=f"{name}: choose half")
        ax.plot([r["lr"] for r in rs], [r["report_loss"] for r in rs], marker + "--",
                color=color, mfc="none", label=f"{name}: report half")
        if v["chosen"]:
            ax.plot([v["chosen"]["lr"]], [v["chosen"]["choose_loss"]], "*", ms=16, color=color,
                    mec="k")
    ax.set_xscale("log")
    ax.set_xticks(doc["grid"], [f"{r:g}" for r in doc["grid"]])
    ax.minorticks_off()
    ax.set_xlabel("peak learning rate (min_lr = rate / 10)")
    ax.set_ylabel(f"continuation loss (nats per {doc['recipe']['tokenizer']} token)")
    ax.set_title(f"Learning-rate sweep, {doc['recipe']['max_iters']} steps, seed {doc['seed']}; "
                 f"star: chosen")
    ax.legend(fontsize=7)
    fig.tight_layout()
    ex.save_figure(fig, path)


def lr_table(doc):
    """The grid (choose / report loss per rate and variant), then each variant's choice."""
    names = list(doc["variants"])
    grid = [["lr", *(f"{n} choose / report" for n in names)]]
    for rate in doc["grid"]:
        cells = []
        for n in names:
            r = next(r for r in doc["variants"][n]["runs"] if r["lr"] == rate)
            cells.append("diverged" if r["choose_loss"] is None else
                         f"{r['choose_loss']:.4f} / {r['report_loss']:.4f}")
        grid.append([f"{rate:g}", *cells])
    chosen = [["variant", "chosen lr", "report-half loss", "note"]]
    for n, v in doc["variants"].items():
        c = v["chosen"]
        chosen.append([n, f"{c['lr']:g}" if c else "-", f"{c['report_loss']:.4f}" if c else "-",
                       "none trained" if not c else "at the grid's edge: widen --lrs"
                       if c["at_edge"] else ""])
    return ex.format_table(grid) + "\n\n" + ex.format_table(chosen)


def lr_sweep(args, flags):
    started = time.time()
    runs = lr_plan(args, flags)
    ex.use_threads(runs)
    files.usable_folder(os.path.dirname(args.lr_file) or ".", "lr_file")
    with files.holding(args.out_dir, "experiment"):
        done = ex.execute(runs, allow_diverged=True)
        print("== scoring every run on both halves of the validation windows ==", flush=True)
        doc = lr_document([lr_row(d) for d in done], runs, args, started)
        os.makedirs(os.path.dirname(args.lr_file) or ".", exist_ok=True)
        ex.write_json(doc, args.lr_file)
        figure = os.path.splitext(args.lr_file)[0] + ".png"
        plot_lrs(doc, figure)
    print(lr_table(doc))
    print(f"wrote {args.lr_file} and {figure} in {train.duration(doc['wall_time'])}")


# -----------------------------------------------------------------------------
# the frontier


def plan(args, flags, lrs, source):
    """Every variant at its rate, seed by seed (an interrupted frontier has every variant at the
    seeds it reached). The variants are checked (check_args)."""
    base = flags.get("seed", cfg.TrainConfig.seed)
    runs = []
    for seed in range(base, base + args.seeds):
        for name in args.archs:
            values = {**flags, **ex.lr_flags(name, lrs, source), "seed": seed}
            runs.append(ex.make_run(f"{ex.variant_folder(name)}_s{seed}",
                                    {**values, **ex.variant_flags(name)}, args.out_dir,
                                    RECIPE, variant=name))
    return runs


def recipe(config):
    return {k: v for k, v in asdict(config).items() if k not in PER_RUN}


def recipe_note(lr_doc, config, path):
    """A line if the rates of lr.json were tuned with another recipe than this run's."""
    mine = recipe(config)
    differ = [f"{k} {v!r} (here {mine[k]!r})" for k, v in lr_doc["recipe"].items()
              if k in mine and k not in cfg.MACHINE_FIELDS and mine[k] != v]
    return f"note: the rates in {path} were tuned with {', '.join(differ)}" if differ else None


def measure_run(done):
    """One run's row of frontier.json, and its model: the loss and the cache bytes it holds per
    context position while decoding at half its context."""
    run, c, h = done.run, done.run.config, done.history
    model = cfg.load_model(c.out_dir, c.device)[0]
    context = c.block_size // 2
    m = measure.measure_decode(model, context, count_flops=False)
    return {"name": run.name, "variant": run.labels["variant"], "arch": c.arch, "seed": c.seed,
            "n_kv_head": model.config.n_kv_head, "kv_share": model.config.kv_share,
            "learning_rate": c.learning_rate, "min_lr": c.min_lr, "iters": c.max_iters,
            "status": status(done), "cont_loss": h["cont_loss"],
            "non_embedding_params": h["non_embedding_params"], "params": h["params"],
            "train_tokens": h["train_tokens"], "train_flops_per_token": done.flops_per_token,
            "held_bytes_per_position": m["held_bytes_per_seq"] / context,
            "kv_bytes_per_position": m["kv_bytes"] / context, "decode_context_len": context,
            "wall_time": h["wall_time"], "out_dir": c.out_dir, "flags": run.flags,
            "curve": [[p["tokens"], p["cont_loss"]] for p in h["curve"]]}, model


def serve(models, context, preset, repeats):
    """Decode tokens/s of each variant at one memory budget (measure.serving_budget: the
    preset's budget_sequences of the variant that holds the most), and at batch 1."""
    budget, per_sequence, in_budget = measure.serving_budget(models, context, preset)
    _, served = measure.serving(models, context, in_budget, 1, repeats)
    return {"context_len": context, "decode_tokens": measure.decode_tokens(context),
            "budget_bytes": budget, "repeats": repeats,
            "variants": {n: {"bytes_per_sequence": per_sequence[n],
                             "budget_batch": s["budget_batch"],
                             "budget_tokens_per_sec": s["budget_tokens_per_sec"],
                             "batch1_tokens_per_sec": s["tokens_per_sec"][0]}
                         for n, s in served.items()}}


def pareto(points):
    """For each (x, y), lower being better in both: True unless another point is at least as
    good in both and better in one."""
    return [not any(qx <= px and qy <= py and (qx < px or qy < py) for qx, qy in points)
            for px, py in points]


def summarize(rows, names, serving):
    """One point per variant: the loss's mean and sd over seeds, bytes per position, the ratio
    of those to dec's, the serving numbers, and whether the point is Pareto-optimal."""
    points = []
    for name in names:
        rs = [r for r in rows if r["variant"] == name]
        losses = [r["cont_loss"] for r in rs]
        points.append({**{k: rs[0][k] for k in ("variant", "arch", "n_kv_head", "kv_share",
                                                "learning_rate", "non_embedding_params",
                                                "decode_context_len")},
                       "seeds": len(rs), "losses": losses,
                       **dict(zip(("loss", "loss_sd"), ex.mean_sd(losses))),
                       "held_bytes_per_position": statistics.fmean(
                           r["held_bytes_per_position"] for r in rs),
                       "kv_bytes_per_position": rs[0]["kv_bytes_per_position"],
                       **serving["variants"][name]})
    dec = next((p for p in points if p["variant"] == "dec"), None)
    optimal = pareto([(p["held_bytes_per_position"], p["loss"]) for p in points])
    for p, best in zip(points, optimal):
        p["held_vs_dec"] = p["held_bytes_per_position"] / dec["held_bytes_per_position"] \
            if dec else None
        p["pareto"] = best
    return points


def plot(doc, path):
    """Loss (mean +- sd over seeds) against cache bytes held per position, log x; the Pareto
    frontier dashed."""
    plt = ex.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    names = [p["variant"] for p in doc["variants"]]
    for p in doc["variants"]:
        color, marker = ex.variant_style(p["variant"], names)
        ax.errorbar([p["held_bytes_per_position"]], [p["loss"]], yerr=[p["loss_sd"]],
                    fmt=marker, color=color, capsize=3, ms=7, label=p["variant"])
        ax.annotate(p["variant"], (p["held_bytes_per_position"], p["loss"]),
                    textcoords="offset points", xytext=(6, 5), fontsize=8)
    front = sorted((p["held_bytes_per_position"], p["loss"]) for p in doc["variants"]
                   if p["pareto"])
    ax.plot(*zip(*front), "k--", lw=1, label="Pareto frontier")
    ax.set_xscale("log")
    ax.set_xlabel(f"cache bytes held per context position while decoding (context "
                  f"{doc['variants'][0]['decode_context_len']}, {doc['recipe']['dtype']})")
    ax.set_ylabel(f"continuation loss (nats per {doc['recipe']['tokenizer']} token)")
    r = doc["recipe"]
    ax.set_title(f"Memory frontier: {r['n_layer']} layers, n_embd {r['n_embd']}, "
                 f"{r['n_head']} heads, {r['max_iters']} steps; {len(doc['seeds'])} seed(s), "
                 f"mean +- sd; lower left is better", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    ex.save_figure(fig, path)


def table(doc):
    spread = " ± sd" if len(doc["seeds"]) > 1 else ""
    lines = [["variant", "lr", "non-emb params", f"cont loss{spread}", "bytes/position", "x dec",
              f"batch in {doc['serving']['budget_bytes'] / 1e6:.3g} MB", "tokens/s there",
              "Pareto-optimal"]]
    for p in doc["variants"]:
        lines.append([p["variant"], f"{p['learning_rate']:g}", f"{p['non_embedding_params']:,}",
                      ex.mean_cell(p["loss"], p["loss_sd"], p["seeds"]),
                      f"{p['held_bytes_per_position']:,.0f}",
                      "-" if p["held_vs_dec"] is None else f"{p['held_vs_dec']:.3f}",
                      p["budget_batch"], f"{p['budget_tokens_per_sec']:,.0f}",
                      "yes" if p["pareto"] else "no"])
    return ex.format_table(lines)


def frontier(args, flags):
    started = time.time()
    lrs, source = ex.learning_rates(args.lr, args.lr_file)
    runs = plan(args, flags, lrs, source)
    ex.use_threads(runs)
    first = runs[0].config
    measure.check_measurable(first.block_size)
    if source == args.lr_file:
        note = recipe_note(ex.read_lrs(args.lr_file), first, args.lr_file)
        if note:
            print(note)
    with files.holding(args.out_dir, "experiment"):
        done = ex.execute(runs)
        print("== measuring each run's cache, then decode speed at one memory budget ==",
              flush=True)
        rows, models = [], {}
        for d in done:
            row, model = measure_run(d)
            rows.append(row)
            models.setdefault(row["variant"], model)  # one trained model per variant serves
        context = first.block_size // 2
        serving = serve(models, context, first.preset, args.repeats)
        doc = {"preset": first.preset, "device": first.device, "torch": torch.__version__,
               "recipe": recipe(first), "archs": args.archs,
               "seeds": sorted({r.config.seed for r in runs}),
               "learning_rates": {"source": source, "rates": lrs}, "serving": serving,
               "runs": rows, "variants": summarize(rows, args.archs, serving)}
        written = ex.write_results(doc, args.out_dir, "frontier", plot, started)
    print(table(doc))
    print(written)


# -----------------------------------------------------------------------------
# command line


def parse(argv):
    p = ex.parser("The memory frontier: dec and its variants with fewer keys and values, encdec "
                  "and bdd, each at its tuned learning rate; or (--lr_sweep) the sweep that "
                  "tunes them. Every run: the cpu preset at 120 steps.", "frontier", per_run={
                      "arch": "use --archs", "learning_rate": "use --lr (or --lrs with "
                      "--lr_sweep)", "min_lr": "it is a tenth of each run's learning rate",
                      "n_kv_head": "use --archs with :kv<N>, e.g. dec:kv2",
                      "kv_share": "use --archs with :cla<K>, e.g. dec:cla3"})
    p.add_argument("--lr_sweep", action="store_true", help="tune the learning rates: each "
                   "variant at every rate of --lrs, one seed; writes --lr_file")
    ex.add_variant_flags(p, f"{FRONTIER_ARCHS}; with --lr_sweep {','.join(ARCHS)}",
                         "auto; not with --lr_sweep", "<out_dir>/lr.json; lr.png beside it")
    p.add_argument("--seeds", type=int, help="the frontier's runs per variant, with seeds "
                   "--seed, --seed + 1, ... (default 3, at most 100)")
    p.add_argument("--lrs", help="--lr_sweep: comma-separated learning rates (default "
                   f"{','.join(f'{r:g}' for r in LR_GRID)}: a factor 2 apart around the cpu "
                   "preset's 1e-3)")
    p.add_argument("--repeats", type=int, help="the frontier's serving benchmark: timing rounds "
                   f"(default {REPEATS}; 8x at batch 1)")
    args = ex.parse_args(p, argv)
    flags = cfg.given_flags(args)
    check_args(args, flags)
    return args, flags


def check_args(args, flags):
    """Fill in the defaults; ConfigError for the first thing wrong with the command."""
    sweep = args.lr_sweep
    problems = [
        (sweep and args.lr is not None, "--lr_sweep tunes the learning rates; drop --lr (give "
         "the rates to try with --lrs)"),
        (sweep and args.seeds is not None, "--lr_sweep trains one seed; drop --seeds (choose "
         "it with --seed)"),
        (sweep and args.repeats is not None, "--lr_sweep measures no serving; drop --repeats"),
        (not sweep and args.lrs is not None, "--lrs is the grid of --lr_sweep; give the "
         "frontier's rates with --lr"),
        (args.seeds is not None and not 1 <= args.seeds <= 100,
         f"--seeds must be 1 to 100, got {args.seeds}"),
        (args.repeats is not None and args.repeats < 1,
         f"--repeats must be at least 1, got {args.repeats}"),
        (flags.get("max_iters") == 0, "--max_iters 0 trains nothing; give at least 1"),
        (args.lr_file is not None and os.path.isdir(args.lr_file), f"--lr_file {args.lr_file} "
         f"is a folder; give the path of the lr.json file"),
    ]
    cfg.refuse(problems)
    args.archs = ex.parse_archs(args.archs or (",".join(ARCHS) if sweep else FRONTIER_ARCHS))
    for name in args.archs:  # before the rates: a variant that cannot be built is the first error
        ex.check_variant(name, flags, RECIPE)
    same = ex.same_models(args.archs, flags, RECIPE)
    for name, first in same.items():
        print(f"note: {name} is {first} with these flags (as many key/value heads as heads, "
              f"nothing shared); trained and measured once, as {first}")
    args.archs = [name for name in args.archs if name not in same]
    args.lr, args.seeds = args.lr or "auto", args.seeds or 3
    args.repeats = args.repeats or REPEATS
    args.lr_file = args.lr_file or os.path.join(args.out_dir, "lr.json")
    args.lrs = parse_grid(args.lrs) if args.lrs is not None else LR_GRID


def parse_grid(text):
    """--lrs as sorted rates; ConfigError for a rate that is not positive, or two that name one
    run's folder (<variant>_lr<rate>, 6 significant digits)."""
    rates = [ex.positive_rate(r.strip(), f"--lrs {text!r}") for r in text.split(",") if r.strip()]
    named = {}
    for rate in rates:
        named.setdefault(f"{rate:g}", []).append(rate)
    same = next((both for both in named.values() if len(both) > 1), None)
    cfg.refuse([(not rates, f"--lrs {text!r} gives no rate; e.g. --lrs 5e-4,1e-3,2e-3,4e-3,8e-3"),
                (same, f"--lrs {text!r}: {same and ' and '.join(map(repr, same))} are one rate "
                 f"to 6 digits, which the runs' folders are named by; give each rate once")])
    return tuple(sorted(rates))


def main(argv=None):
    with cli.guard("interrupted (Ctrl-C); run the same command again to resume where it "
                   "stopped"):
        args, flags = parse(argv)
        (lr_sweep if args.lr_sweep else frontier)(args, flags)


if __name__ == "__main__":
    main()

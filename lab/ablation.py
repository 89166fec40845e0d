"""
Where bdd's blocks start, ablated: bdd trained with each boundary strategy (random, logspace,
single, turns: pack.py), dec and encdec alongside, each over several seeds of the experiments'
recipe (experiment.QUICK); every run scored by the continuation loss (the yardstick) and by the
chat loss: held-out dialogue scenes fed speech by speech as `sample.py --chat` runs
(measure.chat_eval). Then a short turn-aligned fine-tune: from the finished random-boundary bdd
run of a seed, --ft_iters steps with --boundaries turns against the same steps of more
random-boundary training (the same start, recipe, seed and learning-rate schedule).

    python -m lab.ablation                      # 18 runs and 2 fine-tunes: about 27 min on 2 cores
    python -m lab.ablation --strategies random,turns --seeds 1 --ft_iters 0

Each run trains through the experiment runner (lab/experiment.py) in its own folder under --out_dir
(default out/ablation): <variant>_s<seed>/ (dec, encdec, bdd_random, bdd_logspace, ...) and the
fine-tunes ft_random_s<seed>/, ft_turns_s<seed>/ (seed: their source's); running the same
command again skips finished runs and resumes unfinished ones (the chat losses are computed
again: about 4 minutes). Written to --out_dir: ablation.json (every run, the means and sds over
seeds, the fine-tune), ablation.png (both losses per variant, the chat loss by speech); the
table is printed at the end.
"""

import os
import time
from dataclasses import asdict

import torch

import cli
import config as cfg
from lab import experiment as ex
import files
from lab import measure
import pack
from lab.experiment import ARCH_COLORS

TURN_GROUPS = ("1", "2", "3+")  # the chat loss by speech of the scene; 3rd and later pooled
FT_ARMS = ("random", "turns")   # the fine-tune's two arms, by --boundaries
STRATEGY_COLORS = {"random": "tab:red", "logspace": "tab:brown", "single": "tab:pink",
                   "turns": "tab:purple"}
# A fine-tune's seed is its source's + FT_SEED: with the source's own seed its batch generator
# would draw the windows (and, for random boundaries, the layouts) its source trained on again.
FT_SEED = 1000
STATUS = {"new": "trained", "resume": "resumed", "done": "finished before"}


def variants(strategies):
    """{variant: the flags that make it}, in the report's order: dec, encdec, bdd per strategy."""
    out = {"dec": {"arch": "dec"}, "encdec": {"arch": "encdec"}}
    out.update({f"bdd_{s}": {"arch": "bdd", "boundaries": s} for s in strategies})
    return out


def plan(args, flags):
    """The runs in training order: every variant of a seed, the seeds in turn, then the
    fine-tunes (each from the bdd_random run of its seed, which is finished by then; labelled
    with that seed)."""
    base = flags.get("seed", cfg.TrainConfig.seed)
    seeds = range(base, base + args.seeds)
    runs = [ex.make_run(f"{variant}_s{seed}", {**flags, **extra, "seed": seed}, args.out_dir,
                        ex.QUICK, variant=variant, seed=seed)
            for seed in seeds for variant, extra in variants(args.strategies).items()]
    for seed in seeds[:args.ft_seeds] if args.ft_iters else ():
        source = os.path.join(args.out_dir, f"bdd_random_s{seed}")
        for arm in FT_ARMS:
            ft = {**flags, "arch": "bdd", "boundaries": arm, "seed": seed + FT_SEED,
                  "max_iters": args.ft_iters, "init_from": source}
            runs.append(ex.make_run(f"ft_{arm}_s{seed}", ft, args.out_dir, ex.QUICK,
                                    variant=f"ft_{arm}", seed=seed))
    return runs


def score(done, scenes):
    """One run's row: its continuation loss and its chat loss on the scenes. seed: the seed of
    the runs it belongs with (a fine-tune's: its source's), train_seed: its own."""
    run, c = done.run, done.run.config
    chat = measure.run_chat_eval(run.name, c, scenes)
    return {"name": run.name, "variant": run.labels["variant"], "arch": c.arch,
            "boundaries": c.boundaries if c.arch == "bdd" else None, "seed": run.labels["seed"],
            "train_seed": c.seed, "init_from": done.history.get("init_from"),
            "status": STATUS[done.state], "iters": c.max_iters,
            "cont_loss": done.history["cont_loss"],
            "chat_loss": chat["loss"], "chat_tokens": chat["tokens"],
            "chat_by_turn": chat["by_turn"], "chat_by_group": by_group(chat["by_turn"]),
            "wall_time": done.history["wall_time"]}


def in_group(turn, group):
    return turn >= int(group[:-1]) if group.endswith("+") else turn == int(group)


def by_group(by_turn):
    """The chat loss of each TURN_GROUPS entry (token-weighted over its turns); None if empty."""
    out = {}
    for g in TURN_GROUPS:
        turns = [t for t in by_turn if in_group(t["turn"], g)]
        n = sum(t["tokens"] for t in turns)
        out[g] = sum(t["loss"] * t["tokens"] for t in turns) / n if n else None
    return out


def summarize(rows):
    """One point per variant, in the rows' order: mean and sd (sample) over its seeds."""
    points = {}
    for r in rows:
        points.setdefault(r["variant"], []).append(r)
    out = []
    for variant, rs in points.items():
        cont, chat = ex.mean_sd([r["cont_loss"] for r in rs]), ex.mean_sd([r["chat_loss"] for r in rs])
        groups = {g: ex.mean_sd([r["chat_by_group"][g] for r in rs])
                  for g in TURN_GROUPS if all(r["chat_by_group"][g] is not None for r in rs)}
        out.append({"variant": variant, "arch": rs[0]["arch"], "boundaries": rs[0]["boundaries"],
                    "seeds": [r["seed"] for r in rs], "cont_loss": cont[0], "cont_sd": cont[1],
                    "chat_loss": chat[0], "chat_sd": chat[1],
                    "chat_by_group": {g: {"loss": m, "sd": sd} for g, (m, sd) in groups.items()}})
    return out


def fine_tune_section(rows, args, runs):
    """The fine-tune's start (its source runs), both arms, and turns - random per seed."""
    arms = [r for r in rows if r["variant"].startswith("ft_")]
    if not arms:
        return None
    seeds = sorted({r["seed"] for r in arms})
    start = [r for r in rows if r["variant"] == "bdd_random" and r["seed"] in seeds]
    by = {(r["variant"], r["seed"]): r for r in arms}
    diff = {k: ex.mean_sd([by["ft_turns", s][k] - by["ft_random", s][k] for s in seeds])
            for k in ("cont_loss", "chat_loss")}
    c = next(r.config for r in runs if r.labels["variant"] == "ft_turns")
    return {"iters": args.ft_iters, "seeds": seeds,
            "schedule": {"learning_rate": c.learning_rate, "min_lr": c.min_lr,
                         "warmup_iters": c.warmup_iters, "lr_decay_iters": cfg.decay_end(c)},
            "start": summarize(start)[0], "arms": summarize(arms),
            "turns_minus_random": {k: {"mean": m, "sd": sd} for k, (m, sd) in diff.items()}}


# -----------------------------------------------------------------------------
# figure and table


def label(variant):
    return {"ft_random": "+ random", "ft_turns": "+ turns"}.get(variant, variant.replace("_", " "))


def color(point):
    """dec and encdec their arch's color; bdd its strategy's (a fine-tune arm: its boundaries')."""
    return STRATEGY_COLORS[point["boundaries"]] if point["arch"] == "bdd" else \
        ARCH_COLORS[point["arch"]]


def entries(doc):
    """(x, label, point, each seed's row) of the loss panels: the variants, then after a gap the
    fine-tune's start (the bdd random runs it starts from) and its arms."""
    out = [(x, label(p["variant"]), p, [r for r in doc["runs"] if r["variant"] == p["variant"]])
           for x, p in enumerate(doc["points"])]
    ft = doc["fine_tune"]
    if ft:
        start = [r for r in doc["runs"]
                 if r["variant"] == "bdd_random" and r["seed"] in ft["seeds"]]
        ft_points = [("ft start", ft["start"], start)] + [
            (label(p["variant"]), p, [r for r in doc["runs"] if r["variant"] == p["variant"]])
            for p in ft["arms"]]
        out += [(len(out) + 0.5 + i, *e) for i, e in enumerate(ft_points)]
    return out


def plot(doc, path):
    """Continuation and chat loss per variant (mean, sd bars, each seed a dot), the fine-tune
    after a gap; and the chat loss by speech of the scene, a line per variant."""
    plt = ex.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    shown = entries(doc)
    for ax, key, title in ((axes[0], "cont", "Continuation loss (the yardstick)"),
                           (axes[1], "chat", "Chat loss: each speech given the scene before it")):
        for x, _, p, rows in shown:
            ax.errorbar([x], [p[f"{key}_loss"]], yerr=[p[f"{key}_sd"]], fmt="o", capsize=4,
                        color=color(p))
            ax.plot([x + 0.15] * len(rows), [r[f"{key}_loss"] for r in rows], ".",
                    color=color(p), alpha=0.5)
        ax.set_xticks([e[0] for e in shown], [e[1] for e in shown], rotation=30, ha="right")
        ax.set_ylabel(f"loss (nats per {doc['recipe']['tokenizer']} token)")
        ax.set_title(title)
    ft = doc["fine_tune"]
    for p in doc["points"] + (ft["arms"] if ft else []):
        groups = [g for g in TURN_GROUPS if g in p["chat_by_group"]]
        axes[2].errorbar(range(len(groups)), [p["chat_by_group"][g]["loss"] for g in groups],
                         yerr=[p["chat_by_group"][g]["sd"] for g in groups], capsize=3,
                         fmt="s--" if p["variant"].startswith("ft_") else "o-", color=color(p),
                         label=label(p["variant"]))
    axes[2].set_xticks(range(len(TURN_GROUPS)), [f"speech {g}" for g in TURN_GROUPS])
    axes[2].set_ylabel("chat loss")
    axes[2].set_title("Chat loss by speech of the scene")
    axes[2].legend(fontsize=8)
    what = (f"; fine-tune: {ft['iters']} steps from bdd random (seed "
            f"{', '.join(map(str, ft['seeds']))})" if ft else "")
    fig.suptitle(f"bdd's boundary strategies: {doc['recipe']['max_iters']} steps, "
                 f"{len(doc['seeds'])} seed(s), mean and sd over seeds, {doc['chat']['scenes']} "
                 f"held-out scenes{what}")
    fig.tight_layout()
    ex.save_figure(fig, path)


def table(doc):
    """The variants, then the fine-tune: both losses and the chat loss by speech."""
    head = ["variant", "seeds", "continuation", "chat", *(f"chat speech {g}"
                                                          for g in TURN_GROUPS)]

    def line(p, name=None):
        n = len(p["seeds"])
        return [name or label(p["variant"]), n, ex.mean_cell(p["cont_loss"], p["cont_sd"], n),
                ex.mean_cell(p["chat_loss"], p["chat_sd"], n),
                *(ex.mean_cell(p["chat_by_group"][g]["loss"], p["chat_by_group"][g]["sd"], n)
                  if g in p["chat_by_group"] else "-" for g in TURN_GROUPS)]

    text = ex.format_table([head] + [line(p) for p in doc["points"]])
    ft = doc["fine_tune"]
    if ft:
        d = ft["turns_minus_random"]
        n = len(ft["seeds"])
        lines = [head, line(ft["start"], "start (bdd random)")] + [line(p) for p in ft["arms"]] + \
            [["turns - random", n, ex.mean_cell(d["cont_loss"]["mean"], d["cont_loss"]["sd"], n),
              ex.mean_cell(d["chat_loss"]["mean"], d["chat_loss"]["sd"], n), "", "", ""]]
        s = ft["schedule"]
        text += (f"\n\nfine-tune: {ft['iters']} more steps from the finished bdd random run, "
                 f"both arms with warmup {s['warmup_iters']} to lr {s['learning_rate']:g}, cosine "
                 f"to {s['min_lr']:g} at step {s['lr_decay_iters']}\n" + ex.format_table(lines))
    return text


# -----------------------------------------------------------------------------
# command line


def parse(argv):
    p = ex.parser("bdd's boundary strategies against dec and encdec, by continuation and chat "
                  "loss, and a turn-aligned fine-tune.", "ablation",
                  per_run={"arch": "the ablation trains every arch",
                           "boundaries": "use --strategies"})
    p.add_argument("--strategies", default=",".join(pack.BOUNDARIES), help="bdd's boundary "
                   f"strategies, comma-separated (default: all, {','.join(pack.BOUNDARIES)})")
    p.add_argument("--seeds", type=int, default=3, help="runs per variant, with seeds --seed, "
                   "--seed + 1, ... (at most 100)")
    p.add_argument("--chat_scenes", type=int, default=32, help="held-out dialogue scenes of "
                   "the chat loss (at least 1)")
    p.add_argument("--ft_iters", type=int, default=200, help="steps of each fine-tune arm (0: "
                   "no fine-tune); needs random among --strategies (the source)")
    p.add_argument("--ft_seeds", type=int, default=1, help="fine-tune from the bdd random runs "
                   "of this many seeds (at most --seeds)")
    args = ex.parse_args(p, argv)
    flags = cfg.given_flags(args)
    args.strategies = parse_strategies(args.strategies)
    check_args(args, flags)
    return args, flags


def parse_strategies(text):
    """--strategies as a list, in pack.BOUNDARIES order; ConfigError for a name not there."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        if name not in pack.BOUNDARIES:
            raise cfg.ConfigError(f"--strategies {text!r}: {name!r} is not a boundary strategy; "
                                  f"choose from {', '.join(pack.BOUNDARIES)} (comma-separated)")
    if not names:
        raise cfg.ConfigError(f"--strategies {text!r} names no strategy; choose from "
                              f"{', '.join(pack.BOUNDARIES)}")
    return [s for s in pack.BOUNDARIES if s in names]


def check_args(args, flags):
    """ConfigError for the first thing wrong with the command."""
    warmup = flags.get("warmup_iters", 0)  # the recipe's is fitted to the fine-tune's length
    problems = [
        (not 1 <= args.seeds <= 100, f"--seeds must be 1 to 100, got {args.seeds}"),
        (args.chat_scenes < 1, f"--chat_scenes must be at least 1, got {args.chat_scenes}"),
        (args.ft_iters < 0, f"--ft_iters must be at least 0, got {args.ft_iters}"),
        (args.ft_iters and not 1 <= args.ft_seeds <= args.seeds, f"--ft_seeds must be 1 to "
         f"--seeds ({args.seeds}), got {args.ft_seeds}"),
        (args.ft_iters and "random" not in args.strategies, "the fine-tune starts from the bdd "
         "random runs: add random to --strategies, or skip the fine-tune with --ft_iters 0"),
        (0 < args.ft_iters < warmup, f"--ft_iters {args.ft_iters} is shorter than the warmup "
         f"(--warmup_iters {warmup}); give more steps or a shorter warmup"),
        (flags.get("max_iters") == 0, "--max_iters 0 trains nothing to compare; give at least 1"),
    ]
    cfg.refuse(problems)


def main(argv=None):
    with cli.guard("interrupted; run the same command again to resume where it stopped"):
        args, flags = parse(argv)
        started = time.time()
        runs = plan(args, flags)
        ex.use_threads(runs)
        with files.holding(args.out_dir, "experiment"):
            scenes = measure.run_dialogue(runs[0].config, args.chat_scenes)
            rows = [score(done, scenes) for done in ex.execute(runs)]
            scratch = [r for r in rows if not r["variant"].startswith("ft_")]
            first = runs[0].config
            doc = {"device": first.device, "torch": torch.__version__,
                   "recipe": {k: v for k, v in asdict(first).items()
                              if k not in ("arch", "boundaries", "seed", "out_dir", "init_from")},
                   "seeds": sorted({r["seed"] for r in scratch}), "strategies": args.strategies,
                   "chat": {"scenes": len(scenes), "tokens": rows[0]["chat_tokens"],
                            "speeches": sum(len(s.starts) for s in scenes)},
                   "runs": rows, "points": summarize(scratch),
                   "fine_tune": fine_tune_section(rows, args, runs)}
            written = ex.write_results(doc, args.out_dir, "ablation", plot, started)
    print(table(doc))
    print(written)


if __name__ == "__main__":
    main()

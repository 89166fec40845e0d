"""
From a trained decoder to a cheaper cache (DESIGN.md section 9): a dec parent converted into each
target (bdd with each --decoder_init, dec:kv1, dec:cla3; lab/convert.py), each conversion
uptrained for fractions of the parent's steps, against each target trained from scratch for the
parent's steps plus the uptraining steps (equal total tokens).

    python -m lab.uptrain             # 3 seeds x (parent, 5 arms x 5 points, 3 from scratch)
    python -m lab.uptrain --seeds 1 --targets bdd --decoder_inits top,fresh --scratch 0.5

The recipe is the memory frontier's at its steadier rate (120 steps, lr 2e-3 for all): the parent
of seed s is then the frontier_2e-3 run dec_s<s>. Any train.py flag overrides it (--max_iters:
the parent's steps). Uptraining continues the parent's pretraining: its data order (a conversion
carries on the parent's batch generator) at its final learning rate, constant, with no re-warmup
(--uptrain_lr and --uptrain_warmup choose others). At a constant rate a longer uptraining is a
shorter one continued, so each point of an arm resumes a copy of the one before it (the runner's
head start): the points cost the steps of the longest.

Each run trains through the experiment runner (lab/experiment.py) in its own folder under
--out_dir (default out/uptrain): parent_s<seed>/, <arm>_up<steps>_s<seed>/ and
<variant>_scratch<steps>_s<seed>/; the same command again skips finished runs and resumes the
others. Every point is scored by its continuation loss and, for bdd and the parent, by the chat
loss (measure.chat_eval). Written to --out_dir: uptrain.json (every run, means and sds over seeds,
the goals' verdicts) and uptrain.png (loss against uptraining steps per target); the tables are
printed at the end, with the frontier's from-scratch losses beside (its frontier.json, if found).
"""
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

import cli
import config as cfg
from lab import convert
from lab import experiment as ex
import files
from lab import measure
import train

RECIPE = {"preset": "cpu", **ex.QUICK, "max_iters": 120, "warmup_iters": 12, "eval_interval": 40,
          "learning_rate": 2e-3, "min_lr": 2e-4}
TARGETS = "bdd,dec:kv1,dec:cla3"
FRACTIONS = "0,0.05,0.1,0.2,0.5"
SCRATCH = "0.2"           # the fractions whose equal-token baselines train from scratch
FRONTIER = os.path.join("out", "frontier_2e-3", "frontier.json")
CHAT_SCENES = 8          # 51 chat evaluations at the defaults: 8 scenes keep them to ~3 minutes
GOAL_GAP, GOAL_FRACTION = 0.01, 0.2  # the goal: bdd within 1% of its parent by 20% of its steps


# -----------------------------------------------------------------------------
# the plan


def arms(targets, inits):
    """[(arm, target variant, decoder_init or None)]: each bdd target once per decoder init."""
    out = []
    for target in targets:
        if ex.variant_flags(target)["arch"] == "bdd":
            out += [(f"{target} {init}", target, init) for init in inits]
        else:
            out.append((target, target, None))
    return out


def steps_of(fraction, parent_steps):
    return round(fraction * parent_steps)


def plan(args, flags):
    """The runs in training order, seed by seed: the parent, each arm's points (each point the
    one before it continued), then the targets from scratch."""
    base, runs = flags.get("seed", cfg.TrainConfig.seed), []
    for seed in range(base, base + args.seeds):
        parent = ex.make_run(f"parent_s{seed}", {**RECIPE, **flags, "arch": "dec", "seed": seed},
                             args.out_dir, kind="parent", arm="dec (parent)", seed=seed,
                             fraction=None, steps=0)
        runs.append(parent)
        runs += uptrain_runs(args, flags, parent, seed)
        for target in args.targets:
            for fraction in args.scratch:
                steps = steps_of(fraction, parent.config.max_iters)
                total = parent.config.max_iters + steps
                runs.append(ex.make_run(
                    f"{ex.variant_folder(target)}_scratch{total}_s{seed}",
                    {**RECIPE, **flags, **ex.variant_flags(target), "seed": seed,
                     "max_iters": total, "eval_interval": total},  # only its end is a point
                    args.out_dir, kind="scratch", arm=target, seed=seed, fraction=fraction,
                    steps=steps))
    return runs


def uptrain_runs(args, flags, parent, seed):
    """Each arm's conversion of the parent, uptrained to each fraction of the parent's steps at
    a constant learning rate (the parent's final one unless --uptrain_lr gives one), after
    --uptrain_warmup steps of warmup (none by default)."""
    rate = args.uptrain_lr or train.get_lr(parent.config.max_iters, parent.config)
    longest = max(1, steps_of(max(args.fractions), parent.config.max_iters))
    runs = []
    for arm, target, init in arms(args.targets, args.decoder_inits):
        for fraction in args.fractions:
            steps = steps_of(fraction, parent.config.max_iters)
            values = {**RECIPE, **flags, **ex.variant_flags(target), "seed": seed,
                      "init_from": parent.config.out_dir, "max_iters": steps,
                      "learning_rate": rate, "min_lr": rate, "warmup_iters": args.uptrain_warmup,
                      "eval_interval": longest, **({"decoder_init": init} if init else {})}
            name = f"{ex.variant_folder(target)}{'-' + init if init else ''}_up{steps}_s{seed}"
            runs.append(ex.make_run(name, values, args.out_dir, kind="uptrain", arm=arm,
                                    seed=seed, fraction=fraction, steps=steps))
    return runs


def head_start(runs):
    """The runner's head start: a new uptraining point starts as a copy of its arm's previous
    point (checkpoint and log), finished, so that it resumes it. At a constant learning rate and
    with the parent's data order, that is the same run as converting anew and uptraining for
    the point's steps (tests/test_convert.py), for the price of the steps in between."""
    arm = lambda run: (run.labels["kind"], run.labels["arm"], run.labels["seed"])  # noqa: E731
    before = {run.name: previous for previous, run in zip(runs, runs[1:])
              if arm(previous) == arm(run) and run.labels["kind"] == "uptrain"}

    def start(run):
        previous = before.get(run.name)
        path = previous and cfg.checkpoint_path(previous.config.out_dir)
        if run.config.overwrite or path is None or not path.exists() or \
                cfg.load_checkpoint(path, mmap=True)["iter_num"] != previous.config.max_iters:
            return False  # nothing finished to start from: the run converts anew
        folder = Path(run.config.out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("log.jsonl", "ckpt.pt"):  # the checkpoint last: a run resumes only whole
            with files.written_whole(folder / name) as tmp:
                shutil.copyfile(path.parent / name, tmp)
        return True

    return start


# -----------------------------------------------------------------------------
# scoring


def score(done, scenes):
    """One run's row: what it is, its continuation loss, and for bdd and the parent its chat
    loss on the scenes (None for the others, or without scenes)."""
    run, c, h = done.run, done.run.config, done.history
    chat = None
    if scenes and (c.arch == "bdd" or run.labels["kind"] == "parent"):
        chat = measure.run_chat_eval(run.name, c, scenes)["loss"]
    return {"name": run.name, **run.labels, "arch": c.arch, "n_kv_head": c.n_kv_head,
            "kv_share": c.kv_share, "decoder_init": c.decoder_init, "iters": c.max_iters,
            "learning_rate": c.learning_rate, "min_lr": c.min_lr,
            "status": {"new": "trained", "resume": "resumed", "done": "finished before"}
            [done.state], "cont_loss": h["cont_loss"], "chat_loss": chat,
            "init_from": h.get("init_from"), "wall_time": h["wall_time"], "out_dir": c.out_dir,
            "flags": run.flags}


def kv_bytes(runs):
    """{variant: K/V bytes a decode step reads per context position} (measure.measure_decode at
    half the context, batch 1) of a fresh model of each variant: they do not depend on weights."""
    out, context = {}, runs[0].config.block_size // 2
    for run in runs:
        model = cfg.fresh_model(run.config).eval()
        name = convert.variant(run.config.arch, asdict(model.config))
        if name not in out:
            out[name] = measure.measure_decode(model, context, count_flops=False)["kv_bytes"] / \
                context
    return out


def mean_sd(values):
    """{mean, sd, n} over the seeds that have the value; None if none has."""
    values = [v for v in values if v is not None]
    return dict(zip(("mean", "sd"), ex.mean_sd(values)), n=len(values)) if values else None


def summarize(rows):
    """One point per (kind, arm, fraction): mean and sd over seeds of both losses, and of the
    gap to each seed's own parent (relative: 0.01 is 1% above it)."""
    parents = {r["seed"]: r for r in rows if r["kind"] == "parent"}
    points = {}
    for r in rows:
        points.setdefault((r["kind"], r["arm"], r["fraction"]), []).append(r)
    out = []
    for (kind, arm, fraction), rs in points.items():
        out.append({"kind": kind, "arm": arm, "fraction": fraction, "steps": rs[0]["steps"],
                    "seeds": [r["seed"] for r in rs],
                    "cont_loss": mean_sd([r["cont_loss"] for r in rs]),
                    "chat_loss": mean_sd([r["chat_loss"] for r in rs]),
                    "gap": mean_sd([r["cont_loss"] / parents[r["seed"]]["cont_loss"] - 1
                                    for r in rs])})
    return out


# -----------------------------------------------------------------------------
# the goals, the frontier beside, figure and tables


def find(points, kind, arm, fraction=None):
    return next((p for p in points if p["kind"] == kind and p["arm"] == arm and
                 (fraction is None or p["fraction"] == fraction)), None)


def verdicts(points, arm_list, scratch, kv):
    """Per arm: the first fraction whose mean gap to the parent is within GOAL_GAP; the gap at
    GOAL_FRACTION, also per KiB of K/V saved per position (which conversion is cheapest per
    byte); and at each from-scratch fraction the uptrained loss minus the scratch loss at equal
    tokens, and whether that is inside the seeds' spread (the larger of the two sds)."""
    out = {}
    for arm, target, _ in arm_list:
        ups = sorted((p for p in points if p["kind"] == "uptrain" and p["arm"] == arm),
                     key=lambda p: p["fraction"])
        within = next((p["fraction"] for p in ups if p["gap"]["mean"] <= GOAL_GAP), None)
        versus = []
        for fraction in scratch:
            up, base = find(points, "uptrain", arm, fraction), find(points, "scratch", target,
                                                                     fraction)
            if up and base:
                diff = up["cont_loss"]["mean"] - base["cont_loss"]["mean"]
                spread = max(up["cont_loss"]["sd"], base["cont_loss"]["sd"])
                versus.append({"fraction": fraction, "uptrained_minus_scratch": diff,
                               "spread": spread, "within_spread": abs(diff) <= spread})
        gap = (find(points, "uptrain", arm, GOAL_FRACTION) or {"gap": None})["gap"]
        saved = kv["dec"] - kv[target]
        out[arm] = {"first_fraction_within_goal": within, "goal_gap": GOAL_GAP,
                    "gap_at_goal_fraction": gap, "kv_bytes_saved_per_position": saved,
                    "gap_per_kib_saved": gap["mean"] / (saved / 1024) if gap and saved else None,
                    "versus_scratch": versus}
    return out


def frontier_column(path, targets):
    """{variant: (mean, sd, seeds, lr)} of the memory frontier's from-scratch runs (its JSON at
    path, if there is one), for the table beside ours; {} if there is none."""
    if not Path(path).is_file():
        return {}
    doc = files.read_json(path, {"variants": [{"variant": str, "loss": float, "loss_sd": float,
                                               "seeds": int, "learning_rate": float}]},
                          "give another --frontier, or delete it (lab/frontier.py writes it)")
    return {v["variant"]: (v["loss"], v["loss_sd"], v["seeds"], v["learning_rate"])
            for v in doc["variants"] if v["variant"] in ("dec", *targets)}


def cell(stat):
    return "-" if stat is None else ex.mean_cell(stat["mean"], stat["sd"], stat["n"], precision=3)


def table(doc):
    """Continuation loss per arm and fraction, rows ordered by K/V bytes (equal bytes side by
    side), the scratch baselines and the frontier's numbers beside; then bdd's chat loss."""
    fr, points, kv = doc["fractions"], doc["points"], doc["kv_bytes_per_position"]
    dec_bytes = kv["dec"]
    head = ["arm", "KV B/pos", "x dec", *(f"up {f:g}" for f in fr),
            *(f"scratch +{f:g}" for f in doc["scratch_fractions"]), "frontier (scratch)"]
    parent = find(points, "parent", "dec (parent)")
    lines = [head, ["dec (parent)", f"{dec_bytes:,.0f}", "1", cell(parent["cont_loss"]),
                    *[""] * (len(fr) - 1 + len(doc["scratch_fractions"])),
                    frontier_cell(doc, "dec")]]
    for arm, target, _ in sorted(doc["arm_list"], key=lambda a: -kv[a[1]]):
        row = [arm, f"{kv[target]:,.0f}", f"{kv[target] / dec_bytes:.3f}"]
        row += [cell((find(points, "uptrain", arm, f) or {}).get("cont_loss")) for f in fr]
        row += [cell((find(points, "scratch", target, f) or {}).get("cont_loss"))
                for f in doc["scratch_fractions"]]
        lines.append(row + [frontier_cell(doc, target)])
    up = doc["uptrain"]
    text = (f"continuation loss (mean ± sd over seeds; up f: converted, then uptrained for f of "
            f"the parent's {doc['parent_steps']} steps at lr {up['learning_rate']:g} ("
            f"{up['source']}, warmup {up['warmup_iters']}); scratch +f: from scratch for 1 + f "
            f"of them)\n" + ex.format_table(lines))
    chat = [[arm, *(cell((find(points, "uptrain", arm, f) or {}).get("chat_loss")) for f in fr)]
            for arm, target, _ in doc["arm_list"] if ex.variant_flags(target)["arch"] == "bdd"]
    if chat and parent["chat_loss"]:
        text += f"\n\nchat loss (the parent: {cell(parent['chat_loss'])})\n" + \
            ex.format_table([["arm", *(f"up {f:g}" for f in fr)], *chat])
    return text + "\n\n" + goals_text(doc)


def frontier_cell(doc, variant):
    v = doc["frontier"]["variants"].get(variant)
    return f"{ex.mean_cell(*v[:3], precision=3)} (lr {v[3]:g})" if v else "-"


def goals_text(doc):
    lines = []
    for arm, v in doc["verdicts"].items():
        first = v["first_fraction_within_goal"]
        gap = v["gap_at_goal_fraction"]
        text = f"{arm}: " + (f"within {GOAL_GAP:.0%} of the parent from {first:g} of its steps"
                             if first is not None else f"never within {GOAL_GAP:.0%} of the "
                             f"parent")
        if gap:
            sd = f" (sd {gap['sd']:.2%})" if gap["n"] > 1 else ""
            text += (f"; at {GOAL_FRACTION:g} {gap['mean']:+.2%}{sd}, "
                     f"{v['gap_per_kib_saved']:+.2%} per KiB of K/V saved per position")
        for s in v["versus_scratch"]:
            text += (f"; at +{s['fraction']:g} uptrained - scratch "
                     f"{s['uptrained_minus_scratch']:+.3f}"
                     f"{' (inside the seed spread)' if s['within_spread'] else ''}")
        lines.append(text)
    return "\n".join(lines)


def plot(doc, path):
    """Per target, continuation loss against uptraining steps; and bdd's chat loss (panel)."""
    plt = ex.pyplot()
    targets = doc["targets"]
    chat = any(ex.variant_flags(t)["arch"] == "bdd" for t in targets) and doc["chat_scenes"]
    panels = [(t, "cont_loss") for t in targets] + ([("bdd", "chat_loss")] if chat else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    for ax, (target, key) in zip(axes[0], panels):
        panel(ax, doc, target, key)
    fig.suptitle(f"Uptraining a dec parent ({doc['parent_steps']} steps) into cheaper caches; "
                 f"{len(doc['seeds'])} seed(s), mean ± sd, each seed a dot")
    fig.tight_layout()
    ex.save_figure(fig, path)


def panel(ax, doc, target, key):
    """One target's (chat: every bdd arm's) loss against uptraining steps: mean ± sd and each
    seed faint, the parent's loss (± sd) and 1% above it, the from-scratch baselines at equal
    tokens. A point more than 0.5 above the parent is drawn at the top edge, its value beside."""
    parent = find(doc["points"], "parent", "dec (parent)")[key]
    top, shown = parent["mean"] + 0.5, [parent["mean"]]
    ax.axhspan(parent["mean"] - parent["sd"], parent["mean"] + parent["sd"], color="0.85")
    ax.axhline(parent["mean"], color="k", lw=1, label="dec parent")
    ax.axhline(parent["mean"] * (1 + GOAL_GAP), color="k", lw=1, ls=":", label="parent + 1%")
    mine = [a for a in doc["arm_list"] if a[1] == target or
            (key == "chat_loss" and ex.variant_flags(a[1])["arch"] == "bdd")]
    for i, (arm, _, _) in enumerate(mine):
        ups = sorted((p for p in doc["points"] if p["kind"] == "uptrain" and p["arm"] == arm
                      and p[key]), key=lambda p: p["steps"])
        line = ax.errorbar([p["steps"] for p in ups], [min(p[key]["mean"], top) for p in ups],
                           yerr=[p[key]["sd"] for p in ups], marker="os^Dv"[i % 5], capsize=3,
                           label=f"{arm} uptrained")
        seeds = [r for r in doc["runs"] if r["kind"] == "uptrain" and r["arm"] == arm]
        ax.plot([r["steps"] for r in seeds], [min(r[key], top) for r in seeds], ".",
                color=line[0].get_color(), alpha=0.4)
        for p in ups:
            shown.append(min(p[key]["mean"], top))
            if p[key]["mean"] > top:
                ax.annotate(f"{p[key]['mean']:.2f}", (p["steps"], top), fontsize=7,
                            textcoords="offset points", xytext=(4, -10))
    for p in doc["points"]:
        if p["kind"] == "scratch" and p["arm"] == target and p[key]:
            shown.append(p[key]["mean"])
            ax.errorbar([p["steps"]], [p[key]["mean"]], yerr=[p[key]["sd"]], fmt="kx",
                        capsize=3, ms=8, label="from scratch, equal tokens")
    ax.set_ylim(min(shown) - 0.05, max(shown) + 0.05)
    what = "chat" if key == "chat_loss" else "continuation"
    ax.set_xlabel(f"uptraining steps (the parent trained {doc['parent_steps']})")
    ax.set_ylabel(f"{what} loss (nats per {doc['recipe']['tokenizer']} token)")
    ax.set_title(f"{target if key == 'cont_loss' else 'bdd'}: {what} loss")
    ax.legend(fontsize=7)


# -----------------------------------------------------------------------------
# command line


def parse(argv):
    p = ex.parser("Convert a dec parent into each target with a smaller cache, uptrain each "
                  "conversion for fractions of the parent's steps, and train each target from "
                  "scratch at equal tokens. --max_iters: the parent's steps.", "uptrain",
                  per_run={"arch": "use --targets", "n_kv_head": "use --targets with "
                           ":kv<N>, e.g. dec:kv1", "kv_share": "use --targets with :cla<K>, "
                           "e.g. dec:cla3", "decoder_init": "use --decoder_inits"})
    p.add_argument("--targets", default=TARGETS, help=f"comma-separated variants to convert "
                   f"into (default {TARGETS}): bdd, bdd:kv<N>, dec:kv<N>, dec:cla<K>, "
                   f"dec:kv<N>:cla<K>")
    p.add_argument("--decoder_inits", default=",".join(convert.DECODER_INITS),
                   help="bdd's decoder inits, comma-separated (default top,bottom,fresh)")
    p.add_argument("--fractions", default=FRACTIONS, help="uptraining steps as fractions of the "
                   f"parent's, comma-separated (default {FRACTIONS})")
    p.add_argument("--scratch", default=SCRATCH, help="the fractions whose targets also train "
                   f"from scratch for 1 + fraction of the parent's steps (default {SCRATCH}; "
                   "each must be one of --fractions)")
    p.add_argument("--uptrain_lr", type=float, help="the uptraining's constant learning rate "
                   "(default: the parent's final one, its min_lr)")
    p.add_argument("--uptrain_warmup", type=int, default=0, help="warmup steps of the "
                   "uptraining (default 0; at most the first point after 0, so that every point "
                   "is the same run continued)")
    p.add_argument("--seeds", type=int, default=3, help="parents (and so arms) with seeds "
                   "--seed, --seed + 1, ... (default 3, at most 100)")
    p.add_argument("--chat_scenes", type=int, default=CHAT_SCENES, help="held-out dialogue "
                   f"scenes of bdd's chat loss (default {CHAT_SCENES}; 0: none)")
    p.add_argument("--frontier", default=FRONTIER, help="a frontier.json whose from-scratch "
                   f"losses the table shows beside (default {FRONTIER}; skipped if absent)")
    args = ex.parse_args(p, argv)
    flags = cfg.given_flags(args)
    check_args(args, flags)
    args.frontier_variants = frontier_column(args.frontier, args.targets)  # read before training
    return args, flags


def parse_fractions(text, flag):
    """Sorted fractions from "0,0.05,0.1"; ConfigError unless each is a number 0 to 100, once."""
    try:
        values = sorted(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = []
    cfg.refuse([(not values, f"{flag} {text!r} is not a comma-separated list of fractions, "
                             f"e.g. {flag} {FRACTIONS}"),
                (any(not 0 <= v <= 100 for v in values), f"{flag} {text!r}: each fraction "
                 f"must be 0 to 100 (of the parent's steps)"),
                (len(set(values)) < len(values), f"{flag} {text!r} gives a fraction twice")])
    return values


def listed(fractions):
    return ",".join(f"{f:g}" for f in fractions)


def check_args(args, flags):
    """Fill in the lists; ConfigError for the first thing wrong with the command."""
    args.targets = ex.parse_archs(args.targets)
    args.decoder_inits = [x.strip() for x in args.decoder_inits.split(",") if x.strip()]
    args.fractions = parse_fractions(args.fractions, "--fractions")
    args.scratch = parse_fractions(args.scratch, "--scratch") if args.scratch.strip() else []
    bad_init = [x for x in args.decoder_inits if x not in convert.DECODER_INITS]
    parent_steps = flags.get("max_iters", RECIPE["max_iters"])
    steps = [steps_of(f, parent_steps) for f in args.fractions]
    first_point = min([n for n in steps if n] or [0])
    cfg.refuse([
        (not 1 <= args.seeds <= 100, f"--seeds must be 1 to 100, got {args.seeds}"),
        (args.chat_scenes < 0, f"--chat_scenes must be at least 0, got {args.chat_scenes}"),
        ("dec" in args.targets, "--targets dec is the parent itself; name variants with fewer "
                                "keys and values (bdd, dec:kv1, dec:cla3)"),
        (any(ex.variant_flags(t)["arch"] == "encdec" for t in args.targets), "--targets: no "
         "conversion into encdec is defined; choose bdd or dec variants"),
        (bad_init, f"--decoder_inits: {', '.join(bad_init)} is not a decoder init; choose from "
                   f"{', '.join(convert.DECODER_INITS)}"),
        (not args.decoder_inits, "--decoder_inits names none; give e.g. top"),
        (any(f not in args.fractions for f in args.scratch), f"--scratch {listed(args.scratch)}:"
         f" each fraction must be one of --fractions ({listed(args.fractions)})"),
        (flags.get("max_iters") == 0, "--max_iters 0 trains no parent; give at least 1"),
        (args.uptrain_lr is not None and not 0 < args.uptrain_lr < math.inf,
         f"--uptrain_lr must be a positive learning rate, got {args.uptrain_lr}"),
        (not 0 <= args.uptrain_warmup <= first_point, f"--uptrain_warmup "
         f"{args.uptrain_warmup} must be 0 to the first point's steps ({first_point}), so that "
         f"each point continues the one before it"),
        (len(set(steps)) < len(steps), f"--fractions {listed(args.fractions)} of a "
         f"{parent_steps}-step parent give the same steps twice ({steps}); give fractions "
         f"further apart"),
    ])
    for target in args.targets:  # a variant that cannot be built is the first error
        ex.check_variant(target, {**RECIPE, **flags})


def document(args, runs, rows, kv, started):
    parent, arm_list, points = runs[0].config, arms(args.targets, args.decoder_inits), \
        summarize(rows)
    return {"device": parent.device, "torch": torch.__version__,
            "recipe": {k: v for k, v in asdict(parent).items()
                       if k not in ("arch", "seed", "out_dir", "init_from")},
            "parent_steps": parent.max_iters, "seeds": sorted({r["seed"] for r in rows}),
            "targets": args.targets, "arm_list": arm_list, "fractions": args.fractions,
            "scratch_fractions": args.scratch, "chat_scenes": args.chat_scenes,
            "uptrain": {"learning_rate": args.uptrain_lr or train.get_lr(parent.max_iters, parent),
                        "warmup_iters": args.uptrain_warmup,
                        "source": "--uptrain_lr" if args.uptrain_lr else "the parent's final"},
            "kv_bytes_per_position": kv, "runs": rows, "points": points,
            "verdicts": verdicts(points, arm_list, args.scratch, kv),
            "frontier": {"path": args.frontier, "variants": args.frontier_variants},
            "wall_time": time.time() - started}


def main(argv=None):
    with cli.guard("interrupted; run the same command again to resume where it stopped"):
        args, flags = parse(argv)
        started = time.time()
        runs = plan(args, flags)
        ex.use_threads(runs)
        measure.check_measurable(runs[0].config.block_size)
        with files.holding(args.out_dir, "experiment"):
            scenes = measure.run_dialogue(runs[0].config, args.chat_scenes,
                                          log=lambda line: None)
            done = ex.execute(runs, head_start=head_start(runs))
            rows = [score(d, scenes) for d in done]
            doc = document(args, runs, rows, kv_bytes(runs), started)
            written = ex.write_results(doc, args.out_dir, "uptrain", plot, started)
    print(table(doc))
    print(written)


if __name__ == "__main__":
    main()

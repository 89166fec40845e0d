"""
The experiment runner that compare.py, lab/sweep.py and lab/frontier.py share: a plan of runs, each
trained through train.train() in its own folder, resumed where it stopped, and skipped once
finished; the variants of --archs (an arch with fewer keys and values: dec:kv2, dec:cla3,
bdd:kv1); per-arch learning rates (--lr); and the JSON, figure and table helpers of the reports.

    runs = [make_run("bdd", {**flags, "arch": "bdd"}, out_dir, QUICK), ...]   # the plan
    done = execute(runs)            # [Done(run, history, flops_per_token, state)], in order

A run's folder that holds a run trained with other settings is refused (one line naming the
setting) unless --overwrite is given, the same rule train.py follows. An experiment holds its
--out_dir while it runs, so a second one into it is refused. A run that diverges stops the
experiment, unless it asks to record it (execute(..., allow_diverged=True), as the learning-rate
sweep does): its folder then keeps a diverged.json, and the run counts as finished.
"""

import json
import math
import os
import statistics
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import cli
import config as cfg
import files
from lab import measure
import train
from model import ARCHS

ARCH_COLORS = {"dec": "tab:blue", "encdec": "tab:green", "bdd": "tab:red"}
# The recipe of the experiments that train many runs (the frontier, the learning-rate sweep, the
# boundary ablation): the cpu preset at half its steps (0.6M tokens, about a minute per run on 2
# cores), so that each fits in half an hour. Its losses are higher than compare.py's.
QUICK = dict(max_iters=150, warmup_iters=15, eval_interval=50)
# Checkpoint fields that may differ from the plan's without changing what a run computes:
# max_iters (a longer run resumes the shorter), logging and evaluation points, the machine.
NOT_COMPARED = (*cfg.MACHINE_FIELDS, "max_iters", "log_interval", "eval_interval",
                "always_save_checkpoint")


@dataclass
class Run:
    name: str                  # its folder under the experiment's out_dir
    flags: dict                # train flags: cfg.make_config(recipe, **flags) == config
    recipe: dict               # the experiment's defaults, below the flags
    config: cfg.TrainConfig
    labels: dict               # what the report groups it by (size, seed, ...)


@dataclass
class Done:
    run: Run
    history: dict              # train.train()'s history (None: the run diverged)
    flops_per_token: float     # counted training FLOPs per token (measure.train_flops_per_token)
    state: str                 # "new", "resume", "done" or "diverged" when the experiment started;
    #                            "diverged" also for a run that diverged now


DIVERGED = "diverged.json"  # in a run's folder: the run's settings and how it diverged


def use_threads(runs, log=print):
    """One torch thread count for every run of an experiment, so that their timings compare
    like with like and their results repeat: the runs' --threads, else train.run_threads' choice
    as the experiment starts, written into every new run's config (a run given its count keeps
    it to the end; a resumed run keeps the count it started with). Set before anything is measured or trained: an experiment counts FLOPs and
    measures before its runs, and after them."""
    if not runs:
        return
    threads, why = train.run_threads(runs[0].config)
    for run in runs:
        run.config.threads = threads
    torch.set_num_threads(threads)
    if why != "--threads":
        log(f"== {threads} thread(s) for every run ({why}); --threads N chooses ==")


def make_run(name, flags, out_root, recipe=None, **labels):
    """A run of the plan: its config from the flags (the user's and the run's own) over the
    experiment's recipe (defaults that fit a shorter run, cfg.make_config), in
    <out_root>/<name>; checkpoints at every evaluation, so that an interrupted experiment loses at
    most one evaluation interval."""
    flags = {"always_save_checkpoint": True, **flags, "out_dir": os.path.join(out_root, name)}
    recipe = recipe or {}
    return Run(name, flags, recipe, cfg.make_config(recipe, **flags), labels)


def run_state(run):
    """("new", 0), ("resume", iter), ("done", iter) or ("diverged", 0) from the run folder's
    checkpoint or diverged.json; ConfigError if the folder holds a run trained with other
    settings (or more steps) than the plan asks. With overwrite every run is "new": what its
    folder holds is replaced."""
    path, marker = cfg.checkpoint_path(run.config.out_dir), Path(run.config.out_dir) / DIVERGED
    if run.config.overwrite or not (path.exists() or marker.exists()):
        return "new", 0
    if marker.exists():
        saved = files.read_json(marker, {"train_config": dict, "n_dec_layer": (int, None)},
                                "delete it (the run trains again), or use --overwrite")
        check_same(run, saved["train_config"], saved["n_dec_layer"], 0)
        return "diverged", 0
    ckpt = cfg.load_checkpoint(path, mmap=True)
    check_same(run, ckpt["train_config"], ckpt["model_config"]["n_dec_layer"], ckpt["iter_num"])
    return ("done" if ckpt["iter_num"] == run.config.max_iters else "resume"), ckpt["iter_num"]


def check_same(run, train_config, n_dec_layer, iter_num):
    """ConfigError naming what differs between the run a folder holds and the plan's."""
    # n_dec_layer None means the 2:1 split: compare the split the model was built with
    saved = {**train_config, "n_dec_layer": n_dec_layer}
    wanted = {**asdict(run.config), "n_dec_layer": run.config.n_dec}
    differ = [f"{k} {saved[k]!r} (this plan: {v!r})" for k, v in wanted.items()
              if k not in NOT_COMPARED and k in saved and saved[k] != v]
    if iter_num > run.config.max_iters:
        differ.append(f"{iter_num} steps (this plan: max_iters {run.config.max_iters})")
    if differ:
        raise cfg.ConfigError(f"{run.config.out_dir} holds a run trained with "
                              f"{', '.join(differ)}; use the same flags, another --out_dir, or "
                              f"--overwrite to replace it")


def execute(runs, log=print, allow_diverged=False, head_start=None):
    """Train (or skip, or resume) every run in order; one Done per run. Every folder is checked
    before anything trains; progress lines say which run, how many are left and the ETA (the
    counted FLOPs still to train, at the speed of the runs trained so far). allow_diverged: a
    run whose loss becomes nan or inf is recorded (diverged.json) and the next one trains;
    otherwise train.LossNotFinite stops the experiment, and a recorded one is refused.
    head_start(run): called when a new run's turn comes; True if it put a checkpoint that the
    run may resume from into its folder (lab/uptrain.py: an earlier point of the same
    uptraining), which the run then resumes."""
    assert len({run.config.out_dir for run in runs}) == len(runs), "two runs share a folder"
    states = [run_state(run) for run in runs]
    for run, (state, _) in zip(runs, states):
        if state == "new":
            cfg.check_folders(cfg.TrainConfig(**{**asdict(run.config), "overwrite": True}))
        if state == "diverged" and not allow_diverged:
            raise cfg.ConfigError(f"{run.config.out_dir} holds a run that diverged; train it "
                                  f"with other flags in another --out_dir, or use --overwrite")
    finished = sum(s in ("done", "diverged") for s, _ in states)
    log(f"== {len(runs)} runs: {finished} finished, {sum(s == 'resume' for s, _ in states)} to "
        f"resume, {sum(s == 'new' for s, _ in states)} new; counting training FLOPs ==")
    per_token = {}
    for run in runs:
        if shape(run) not in per_token:
            per_token[shape(run)] = measure.train_flops_per_token(run.config, log)
    todo = [0 if s == "diverged" else per_token[shape(r)] * (r.config.max_iters - it) *
            tokens_per_iter(r.config) for r, (s, it) in zip(runs, states)]
    seconds = flops = 0.0
    done = []
    for i, (run, (state, it)) in enumerate(zip(runs, states)):
        if state == "new" and head_start is not None and head_start(run):
            state, it = states[i] = run_state(run)
            todo[i] = per_token[shape(run)] * (run.config.max_iters - it) * \
                tokens_per_iter(run.config)
        left = sum(s in ("new", "resume") for s, _ in states[i:])
        eta = train.duration(seconds / flops * sum(todo[i:])) if flops else "after the first run"
        what = {"new": "training", "resume": f"resuming at iter {it}", "done": "finished, skipped",
                "diverged": "diverged before, skipped"}[state]
        log(f"== [{i + 1}/{len(runs)}] {run.name} ({what}); runs left to train: {left}, "
            f"ETA {eta} ==")
        start = time.time()
        try:
            history = train_run(run, state, log)
        except train.LossNotFinite as e:
            if not allow_diverged:
                raise
            record_divergence(run, e, log)
            history, state = None, "diverged"
        if state in ("new", "resume"):
            seconds, flops = seconds + time.time() - start, flops + todo[i]
        done.append(Done(run, history, per_token[shape(run)], state))
    return done


def record_divergence(run, error, log):
    """Write the run's diverged.json: the settings it diverged with, and the message."""
    path = Path(run.config.out_dir) / DIVERGED
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json({"train_config": asdict(run.config), "n_dec_layer": run.config.n_dec,
                "error": str(error)}, path)
    log(f"[{run.name}] diverged: {error}; recorded in {path}, the experiment goes on")


def train_run(run, state, log=print):
    """The run's history: read from its finished checkpoint, or from train.train() (None for a
    run that diverged before)."""
    if state == "diverged":
        return None
    if state == "done":
        return cfg.load_checkpoint(cfg.checkpoint_path(run.config.out_dir), mmap=True)["history"]
    (Path(run.config.out_dir) / DIVERGED).unlink(missing_ok=True)  # --overwrite: trained anew
    config = run.config if state == "new" else cfg.make_config(run.recipe, **{
        **run.flags, "init_from": "resume"})
    return train.train(config, log=lambda s: log(f"[{run.name}] {s}"))


def shape(run):
    """What a run's counted FLOPs per token depend on."""
    c = run.config
    return (c.arch, c.n_layer, c.n_dec, c.n_head, c.n_kv_head, c.kv_share, c.n_embd, c.block_size,
            c.tokenizer, c.objective)


def tokens_per_iter(c):
    return c.batch_size * c.gradient_accumulation_steps * c.block_size


# -----------------------------------------------------------------------------
# command lines


def parser(description, out_dir, per_run):
    """An experiment's command line: --out_dir (default out/<out_dir>), its own flags (add them
    to the parser returned) and every train.py flag, which overrides the preset for all runs;
    per_run: {flag: what to use instead}, the flags the experiment sets for each run (refused
    with that advice). Parse it with parse_args."""
    p = cli.Parser(description=description + " Any train.py flag overrides the preset.",
                   allow_abbrev=False)  # --arch must not pass for --archs
    p.add_argument("--out_dir", default=os.path.join("out", out_dir), help="the experiment's "
                   f"folder: its runs, each in a folder of its own, and its results (default "
                   f"out/{out_dir})")
    return cfg.add_flags(p, per_run={"init_from": "an experiment resumes its runs by itself",
                                     **per_run}, skip=("out_dir",))


def parse_args(parser, argv):
    """The parsed command line of an experiment, its --out_dir checked to be a usable folder
    (files.usable_folder: the check of every entry point) before anything else."""
    args = parser.parse_args(argv)
    files.usable_folder(args.out_dir, "out_dir")
    return args


# -----------------------------------------------------------------------------
# variants: an arch with fewer keys and values


# A variant is `arch[:option]...`; each option sets a train flag.
OPTIONS = {"kv": "n_kv_head", "cla": "kv_share"}
OPTIONS_HELP = ("options are kv<N> (N >= 1 key/value heads, dividing n_head) and cla<K> (dec "
                "only: K >= 2 layers per shared K/V), e.g. dec:kv2, dec:cla3, bdd:kv1")


def parse_archs(text):
    """--archs as a list of variant names: `arch[:option]...` (OPTIONS), comma-separated, each at
    most once, in one spelling (kv before cla); spaces and empty entries are ignored.
    variant_flags(name) gives a variant's train flags, variant_folder(name) its folder name.
    ConfigError for an unknown arch or option, an option given twice, cla for encdec or bdd,
    or cla1 (which shares nothing)."""
    names = []
    for entry in (e.strip() for e in text.split(",")):
        name = variant_name(entry, f"--archs {text!r}") if entry else None
        cfg.refuse([(name in names, f"--archs {text!r}: {name} is listed twice; name each arch "
                                    f"once")])
        names += [name] if name else []
    cfg.refuse([(not names, f"--archs {text!r} names no arch; choose from {', '.join(ARCHS)}, "
                            f"with {OPTIONS_HELP}")])
    return names


def variant_name(entry, where):
    """The variant name of one entry of a list (where: the flag and its text, for errors)."""
    arch, *options = (part.strip() for part in entry.split(":"))
    cfg.refuse([(arch not in ARCHS, f"{where}: {arch!r} is not an arch; choose from "
                                    f"{', '.join(ARCHS)} (lower case, comma-separated), with "
                                    f"{OPTIONS_HELP}")])
    values = {}
    for option in options:
        match = re.fullmatch(r"(kv|cla)([1-9][0-9]*)", option)
        cfg.refuse([(not match, f"{where}: {option!r} in {entry!r} is not an option; "
                                f"{OPTIONS_HELP}"),
                    (match and match[1] in values, f"{where}: {entry!r} gives "
                                                   f"{match and match[1]} twice; give it once")])
        values[match[1]] = int(match[2])
    cfg.refuse([("cla" in values and arch != "dec", f"{where}: {entry!r}: cla (cross-layer K/V "
                 f"sharing) is a dec option; {arch} keeps one K/V per layer: drop "
                 f":cla{values.get('cla')}"),
                (values.get("cla") == 1, f"{where}: {entry!r}: cla1 shares no layer's K/V (it is "
                                         f"dec itself); use dec, or cla2 and up")])
    return ":".join([arch] + [f"{k}{values[k]}" for k in OPTIONS if k in values])


def variant_flags(name):
    """The train flags of a variant name: {"arch": ..., and "n_kv_head", "kv_share" if given}."""
    arch, *options = name.split(":")
    flags = {"arch": arch}
    for option in options:
        kind = option.rstrip("0123456789")
        flags[OPTIONS[kind]] = int(option[len(kind):])
    return flags


def variant_folder(name):
    """The variant in a form for folder names: dec:kv2 -> dec-kv2."""
    return name.replace(":", "-")


def variant_problem(name, flags, recipe=None):
    """(what is wrong, what would fit) if the variant's options do not fit the model the other
    flags (over the recipe) make: kv<N> must divide n_head, cla<K> be at most n_layer; None if
    they fit."""
    own = variant_flags(name)
    config = cfg.make_config(recipe, **{**flags, "arch": own["arch"]})
    kv, share = own.get("n_kv_head"), own.get("kv_share")
    if kv is not None and config.n_head % kv:
        fits = [f"kv{n}" for n in range(1, config.n_head + 1) if config.n_head % n == 0]
        return f"kv{kv} needs n_kv_head {kv} to divide n_head {config.n_head}", \
            f"use {', '.join(fits)}"
    if share is not None and share > config.n_layer:
        return f"cla{share} groups more layers than the model's n_layer {config.n_layer}", \
            f"use cla2 to cla{config.n_layer}"
    return None


def check_variant(name, flags, recipe=None):
    """ConfigError naming the variant if its options do not fit the model (variant_problem)."""
    problem = variant_problem(name, flags, recipe)
    cfg.refuse([(problem, f"--archs {name}: {problem and problem[0]}; {problem and problem[1]}")])


def same_models(names, flags, recipe=None):
    """The variants among names that build the model of an earlier one with these flags (over
    the recipe): {name: the earlier name}. dec:kv2 at --n_head 2 gives every head its own keys
    and values, as dec does: measured twice it would be drawn twice, on top of itself."""
    first, same = {}, {}
    for name in names:
        c = cfg.make_config(recipe, **{**flags, **variant_flags(name)})
        model = (c.arch, c.n_kv_head or c.n_head, c.kv_share)
        same.update({name: first[model]} if model in first else {})
        first.setdefault(model, name)
    return same


def variant_style(name, names):
    """(color, marker) of a variant in a figure of `names`: its arch's color, and a marker of
    its own among that arch's variants."""
    arch = variant_flags(name)["arch"]
    mine = [n for n in names if variant_flags(n)["arch"] == arch]
    return ARCH_COLORS[arch], "os^vDPX*"[mine.index(name) % 8]


# -----------------------------------------------------------------------------
# learning rates per arch (--lr)


LR_FILE = os.path.join("out", "frontier", "lr.json")  # where `lab/frontier.py --lr_sweep` writes
LR_HELP = ("auto (the rates `python -m lab.frontier --lr_sweep` chose, from --lr_file) or "
           "name=rate,... per arch or variant, e.g. dec=3e-3,encdec=2e-3,bdd=2e-3 (a variant "
           "without a rate of its own takes its arch's; min_lr is rate / 10)")


def add_variant_flags(parser, archs, lr, lr_file, note=""):
    """--archs, --lr and --lr_file as lab/sweep.py and lab/frontier.py take them; the defaults (in
    words, for the help) are the caller's to fill in."""
    parser.add_argument("--archs", help=f"comma-separated variants (default {archs}): "
                        f"arch[:option]..., {OPTIONS_HELP}{note}")
    parser.add_argument("--lr", help=f"learning rates (default {lr}): {LR_HELP}")
    parser.add_argument("--lr_file", help=f"the lr.json that `python -m lab.frontier --lr_sweep` "
                        f"writes and --lr auto reads (default {lr_file})")


def parse_lrs(text):
    """--lr: "auto", or {variant name: learning rate} from "dec=3e-3,bdd:kv1=1e-3". ConfigError
    for an entry that is not name=rate, an unknown name, a name given twice, or a rate that is
    not a positive number."""
    if text.strip() == "auto":
        return "auto"
    lrs = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        name, eq, value = (part.strip() for part in entry.partition("="))
        cfg.refuse([(not eq, f"--lr {text!r}: {entry!r} is not name=rate; give e.g. --lr "
                             f"dec=3e-3,bdd=2e-3, or --lr auto")])
        name = variant_name(name, f"--lr {text!r}")
        cfg.refuse([(name in lrs, f"--lr {text!r}: {name} is given twice; give each once")])
        lrs[name] = positive_rate(value, f"--lr {text!r}: {name}")
    cfg.refuse([(not lrs, f"--lr {text!r} gives no rate; {LR_HELP}")])
    return lrs


def positive_rate(value, where):
    """float(value) if it is a positive, finite number; ConfigError otherwise."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = math.nan
    cfg.refuse([(not 0 < rate < math.inf, f"{where}: {value!r} is not a learning rate; give a "
                                          f"positive number such as 2e-3")])
    return rate


def read_lrs(path):
    """The lr.json that `python -m lab.frontier --lr_sweep` wrote at path, checked by shape (its
    "chosen" rates {arch or variant: rate}, the "recipe" they were tuned with) and each rate a
    positive number; ConfigError if there is none, saying how to make one."""
    make = "python -m lab.frontier --lr_sweep" + ("" if path == LR_FILE else f" --lr_file {path}")
    cfg.refuse([(not os.path.exists(path), f"--lr auto: no tuned learning rates at {path}; run "
                 f"`{make}` first, or give them with --lr dec=...,encdec=...,bdd=..."),
                (os.path.isdir(path), f"--lr_file {path} is a folder; give the path of the "
                                      f"lr.json file")])
    try:
        doc = files.read_json(path, {"chosen": {str: float}, "recipe": dict},
                              f"run `{make}` again, or give the rates with --lr")
    except cli.BadInput as e:
        raise cfg.ConfigError(f"--lr auto: {e}") from None
    for name, rate in doc["chosen"].items():
        positive_rate(rate, f"--lr auto: {path}: {variant_name(name, f'--lr auto: {path}')}")
    return doc


def learning_rates(text, path):
    """(rates {name: rate}, where they come from) of --lr text and --lr_file path."""
    lrs = parse_lrs(text)
    return (read_lrs(path)["chosen"], path) if lrs == "auto" else (lrs, "--lr")


def lr_flags(name, lrs, source="--lr"):
    """{learning_rate, min_lr} of variant name: its own rate in lrs, else its arch's; min_lr is
    a tenth of it, so every rate has the same cosine shape. ConfigError if lrs has neither."""
    arch = variant_flags(name)["arch"]
    rate = lrs.get(name, lrs.get(arch))
    cfg.refuse([(rate is None, f"{source} gives no learning rate for {name}"
                               f"{'' if name == arch else f' or its arch {arch}'}; it has "
                               f"{', '.join(lrs) or 'none'}")])
    return {"learning_rate": rate, "min_lr": rate / 10}


# -----------------------------------------------------------------------------
# reports: JSON, figures, tables


def write_results(doc, out_dir, name, plot, started):
    """Stamp doc's wall_time (seconds since started), write it to out_dir/<name>.json and
    plot(doc, out_dir/<name>.png), each whole; returns the line that says so."""
    doc["wall_time"] = time.time() - started
    json_path, figure_path = (os.path.join(out_dir, name + ext) for ext in (".json", ".png"))
    write_json(doc, json_path)
    plot(doc, figure_path)
    return f"wrote {json_path} and {figure_path} in {train.duration(doc['wall_time'])}"


def write_json(obj, path):
    """obj as JSON in path, written whole."""
    with files.written_whole(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=110):
    """Save a matplotlib figure as PNG, written whole, and close it."""
    try:
        with files.written_whole(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        pyplot().close(fig)


def mean_sd(values):
    """(mean, sd) of a quantity over seeds: sd 0 for one seed."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_cell(mean, sd, seeds, precision=4):
    """A table's cell of a mean over seeds: "2.3100 ±0.0040", the spread only where there is one
    (one seed has none)."""
    return f"{mean:.{precision}f}" + (f" ±{sd:.{precision}f}" if seeds > 1 else "")


def format_table(lines):
    """Rows of cells as aligned text: the first column left, the others right."""
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) for row in lines)

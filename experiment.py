"""
The experiment runner that compare.py and sweep.py share: a plan of runs, each trained through
train.train() in its own folder, resumed where it stopped, and skipped once finished; and the
JSON, figure and table helpers their reports use.

    runs = [make_run("bdd", {**flags, "arch": "bdd"}, out_dir), ...]   # the plan
    done = execute(runs)            # [Done(run, history, flops_per_token, state)], in order

A run's folder that holds a run trained with other settings is refused (one line naming the
setting) unless --overwrite is given, the same rule train.py follows. An experiment holds its
--out_dir while it runs, so a second one into it is refused.
"""

import json
import os
import time
from dataclasses import asdict, dataclass

import cli
import config as cfg
import files
import measure
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
    flags: dict                # train flags: cfg.make_config(**flags) == config
    config: cfg.TrainConfig
    labels: dict               # what the report groups it by (size, seed, ...)


@dataclass
class Done:
    run: Run
    history: dict              # train.train()'s history
    flops_per_token: float     # counted training FLOPs per token (measure.train_flops_per_token)
    state: str                 # "new", "resume" or "done" when the experiment started


def make_run(name, flags, out_root, **labels):
    """A run of the plan: its config from the flags, in <out_root>/<name>; checkpoints at every
    evaluation, so that an interrupted experiment loses at most one evaluation interval."""
    flags = {"always_save_checkpoint": True, **flags, "out_dir": os.path.join(out_root, name)}
    return Run(name, flags, cfg.make_config(**flags), labels)


def run_state(run):
    """("new", 0), ("resume", iter) or ("done", iter) from the run folder's checkpoint;
    ConfigError if that checkpoint was trained with other settings (or more steps) than the plan
    asks. With overwrite every run is "new": what its folder holds is replaced."""
    path = cfg.checkpoint_path(run.config.out_dir)
    if run.config.overwrite or not path.exists():
        return "new", 0
    ckpt = cfg.load_checkpoint(path, mmap=True)
    # n_dec_layer None means the 2:1 split: compare the split the model was built with
    saved = {**ckpt["train_config"], "n_dec_layer": ckpt["model_config"]["n_dec_layer"]}
    wanted = {**asdict(run.config), "n_dec_layer": run.config.n_dec}
    differ = [f"{k} {saved[k]!r} (this plan: {v!r})" for k, v in wanted.items()
              if k not in NOT_COMPARED and k in saved and saved[k] != v]
    if ckpt["iter_num"] > run.config.max_iters:
        differ.append(f"{ckpt['iter_num']} steps (this plan: max_iters {run.config.max_iters})")
    if differ:
        raise cfg.ConfigError(f"{run.config.out_dir} holds a run trained with "
                              f"{', '.join(differ)}; use the same flags, another --out_dir, or "
                              f"--overwrite to replace it")
    return ("done" if ckpt["iter_num"] == run.config.max_iters else "resume"), ckpt["iter_num"]


def execute(runs, log=print):
    """Train (or skip, or resume) every run in order; one Done per run. Every folder is checked
    before anything trains; progress lines say which run, how many are left and the ETA (the
    counted FLOPs still to train, at the speed of the runs trained so far)."""
    states = [run_state(run) for run in runs]
    for run, (state, _) in zip(runs, states):
        if state == "new":
            cfg.check_folders(cfg.TrainConfig(**{**asdict(run.config), "overwrite": True}))
    log(f"== {len(runs)} runs: {sum(s == 'done' for s, _ in states)} finished, "
        f"{sum(s == 'resume' for s, _ in states)} to resume, {sum(s == 'new' for s, _ in states)} "
        f"new; counting training FLOPs ==")
    per_token = {}
    for run in runs:
        if shape(run) not in per_token:
            per_token[shape(run)] = measure.train_flops_per_token(run.config, log)
    todo = [per_token[shape(r)] * (r.config.max_iters - it) * tokens_per_iter(r.config)
            for r, (_, it) in zip(runs, states)]
    seconds = flops = 0.0
    done = []
    for i, (run, (state, it)) in enumerate(zip(runs, states)):
        left = sum(s != "done" for s, _ in states[i:])
        eta = train.duration(seconds / flops * sum(todo[i:])) if flops else "after the first run"
        what = {"new": "training", "resume": f"resuming at iter {it}",
                "done": "finished, skipped"}[state]
        log(f"== [{i + 1}/{len(runs)}] {run.name} ({what}); runs left to train: {left}, "
            f"ETA {eta} ==")
        start = time.time()
        history = train_run(run, state, log)
        if state != "done":
            seconds, flops = seconds + time.time() - start, flops + todo[i]
        done.append(Done(run, history, per_token[shape(run)], state))
    return done


def train_run(run, state, log=print):
    """The run's history: read from its finished checkpoint, or from train.train()."""
    if state == "done":
        return cfg.load_checkpoint(cfg.checkpoint_path(run.config.out_dir), mmap=True)["history"]
    config = run.config if state == "new" else cfg.make_config(**{**run.flags,
                                                                  "init_from": "resume"})
    return train.train(config, log=lambda s: log(f"[{run.name}] {s}"))


def shape(run):
    """What a run's counted FLOPs per token depend on."""
    c = run.config
    return c.arch, c.n_layer, c.n_dec, c.n_head, c.n_embd, c.block_size, c.tokenizer, c.objective


def tokens_per_iter(c):
    return c.batch_size * c.gradient_accumulation_steps * c.block_size


# -----------------------------------------------------------------------------
# command lines


def parser(description, out_dir, per_run):
    """An experiment's command line: --out_dir (default out/<out_dir>), its own flags (add them
    to the parser returned) and every train.py flag, which overrides the preset for all runs;
    per_run: {flag: what to use instead}, the flags the experiment sets for each run (refused
    with that advice)."""
    p = cli.Parser(description=description + " Any train.py flag overrides the preset.",
                   allow_abbrev=False)  # --arch must not pass for --archs
    p.add_argument("--out_dir", default=os.path.join("out", out_dir), help="the experiment's "
                   f"folder: its runs, each in a folder of its own, and its results (default "
                   f"out/{out_dir})")
    return cfg.add_flags(p, per_run={"init_from": "an experiment resumes its runs by itself",
                                     **per_run}, skip=("out_dir",))


def parse_archs(text):
    """--archs as a list: arch names in lower case, comma-separated, each at most once; spaces
    around a name and empty entries are ignored. ConfigError otherwise."""
    archs = [a.strip() for a in text.split(",") if a.strip()]
    for i, arch in enumerate(archs):
        if arch not in ARCHS:
            raise cfg.ConfigError(f"--archs {text!r}: {arch!r} is not an arch; choose from "
                                  f"{', '.join(ARCHS)} (lower case, comma-separated)")
        if arch in archs[:i]:
            raise cfg.ConfigError(f"--archs {text!r}: {arch} is listed twice; name each arch once")
    if not archs:
        raise cfg.ConfigError(f"--archs {text!r} names no arch; choose from {', '.join(ARCHS)}")
    return archs


# -----------------------------------------------------------------------------
# reports: JSON, figures, tables


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


def format_table(lines):
    """Rows of cells as aligned text: the first column left, the others right."""
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) for row in lines)

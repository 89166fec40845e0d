"""
The quick start's training speed on a quiet CPU and with a core kept busy by another program,
by how many threads torch computes with and how they wait: the measurement behind train.py's
thread count (docs/RESULTS.md).

    python bench/threads_bench.py                      # 30 steps, every setting and load, twice
    python bench/threads_bench.py --steps 20 --rounds 1 --settings default,1

Each run is `python train.py --arch bdd` (the README's quick start: the cpu preset) for --steps
steps in a fresh process, evaluation off; its speed is the training tokens/s of its last line.
The loads: "quiet"; "busy", one other process (a Python busy loop) keeping a core busy for the
whole run, as a browser or another job would; "busy later", the same loop started --later
seconds into the run. The settings:

- default: train.py as it is (one thread per core idle as the run starts, one thread once its
  steps slow down 3x);
- 2: --threads 2 (one per core: torch's default, and train.py's before it counted idle cores);
- 2 passive: --threads 2 with OMP_WAIT_POLICY=passive (a waiting thread sleeps at once instead
  of spinning for about 3 ms);
- 1: --threads 1.

On a machine shared with other work a run counts only if the rest of the machine (everything
but the run and the bench's own busy loop, from /proc/stat and their CPU times) kept at most
--tolerance cores busy meanwhile; a run that does not is repeated, up to --tries times, and every
run is printed with the load it saw. Rounds alternate the settings, so drift hits them all alike.
"""

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"default": ({}, []), "2": ({}, ["--threads", "2"]),
            "2 passive": ({"OMP_WAIT_POLICY": "passive"}, ["--threads", "2"]),
            "1": ({}, ["--threads", "1"])}
LOADS = ("quiet", "busy", "busy later")
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def busy_ticks():
    """(busy, all) ticks of the machine's cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


class BusyLoop:
    """Another program keeping one core busy, from `after` seconds on, for the block."""

    def __init__(self, after=None):
        self.after, self.process = after, None

    def __enter__(self):
        if self.after is not None:
            self.timer = threading.Timer(self.after, self.start)
            self.timer.start()
        return self

    def start(self):
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def __exit__(self, *exc):
        if self.after is not None:
            self.timer.cancel()
        if self.process:
            self.process.kill()
            self.process.wait()


def measured_run(setting, load, args, out_dir):
    """(training tokens/s, the thread counts it logged, the cores the rest of the machine kept
    busy meanwhile) of one run."""
    env, flags = SETTINGS[setting]
    env = {**{k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}, **env}
    cmd = [sys.executable, "train.py", "--arch", "bdd", "--max_iters", str(args.steps),
           "--eval_interval", str(10 * args.steps), "--out_dir", out_dir, "--overwrite", *flags]
    after = {"quiet": None, "busy": 0.0, "busy later": args.later}[load]
    before, children, started = busy_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN), \
        time.time()
    with BusyLoop(after):
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds, ticks = time.time() - started, busy_ticks()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the run's and the busy loop's CPU time: both are this process's children, waited for
    own = used.ru_utime + used.ru_stime - children.ru_utime - children.ru_stime
    found = re.search(r"\(([\d,]+) tok/s training\)", run.stdout)
    if run.returncode or not found:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    busy = os.cpu_count() * (ticks[0] - before[0]) / max(ticks[1] - before[1], 1)
    threads = "->".join([re.search(r"(\d+) thread\(s\)", run.stdout)[1],
                         *re.findall(r"threads \d+ -> (\d+)", run.stdout)])
    return float(found[1].replace(",", "")), threads, max(busy - own / seconds, 0.0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each setting and load")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of "
                   f"{', '.join(SETTINGS)}")
    p.add_argument("--loads", default=",".join(LOADS), help=f"subset of {', '.join(LOADS)}")
    p.add_argument("--later", type=float, default=8.0, help="seconds into a run the busy loop "
                   "of 'busy later' starts (default 8)")
    p.add_argument("--tolerance", type=float, default=0.15, help="cores the rest of the "
                   "machine may keep busy during a run that counts (default 0.15)")
    p.add_argument("--tries", type=int, default=6, help="runs of a setting and load until one "
                   "counts (default 6)")
    args = p.parse_args()
    settings, loads = args.settings.split(","), args.loads.split(",")
    speeds = {(s, load): [] for s in settings for load in loads}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for load in loads:
                for s in settings:
                    for attempt in range(args.tries):
                        speed, threads, others = measured_run(s, load, args, f"{tmp}/run")
                        counts = others <= args.tolerance
                        print(f"{load:10s} {s:9s} {speed:8,.0f} tok/s, threads {threads:5s} "
                              f"others kept {others:.2f} cores busy"
                              f"{'' if counts else ': not counted'}", flush=True)
                        if counts or attempt == args.tries - 1:
                            speeds[s, load].append((speed, counts))
                            break
    print(f"\nmedian training tokens/s of the runs that counted ({args.rounds} per cell, "
          f"{args.steps} steps, {os.cpu_count()} cores; * a cell with runs that did not count)")
    print("| setting | " + " | ".join(loads) + " |")
    for s in settings:
        cells = [f"{statistics.median(v for v, _ in speeds[s, load]):,.0f}"
                 f"{'' if all(c for _, c in speeds[s, load]) else ' *'}" for load in loads]
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

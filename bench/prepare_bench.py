"""
Benchmark of corpus/prepare.py's prepare() at scale: the three goals of preparing a large corpus.

    python bench/prepare_bench.py                 # 1 GB synthetic corpus, 2 cores (minutes)
    python bench/prepare_bench.py --size_mb 30    # a quick check that it runs

1. Peak resident memory of preparing a synthetic corpus (Shakespeare's lines in random order:
   four text files of size/8 each, and a .jsonl file of about 4 KB documents for the other
   half), for the byte and the gpt2 tokenizer. The prepare runs in a fresh child process that
   first imports corpus (numpy, tiktoken): its memory then is the baseline. Reported: the
   main process's peak RSS above its baseline, and (Linux) the peak of the summed proportional
   set size (PSS) of the main process and its tokenizer workers, sampled 20 times a second,
   above the main process's PSS at the baseline. PSS splits shared pages between the processes
   that share them, so the sum is what the whole prepare holds.
2. gpt2 tokenization throughput of corpus/prepare.py's parallel path (encode_chunks, one process per core)
   against tiktoken's single-threaded encode_ordinary, on the same text in the same chunks, with
   a warm tokenizer: median of --repeats alternating runs, and their ratio.
3. The time to open the already prepared dataset: prepare() again, in a fresh process.

The whole benchmark is pinned to --cores cores (where the OS allows it). It removes its
temporary corpus and datasets when it ends.
"""

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cli  # noqa: E402  (after the path to the repository)
from corpus.documents import Document, shakespeare_documents  # noqa: E402
from corpus.prepare import chunks, cpu_count, encode_chunks, prepare  # noqa: E402
from corpus.tokenizers import get_tokenizer, TOKENIZERS  # noqa: E402



def tree_pss():
    """Proportional set size of this process and its children, in bytes: shared pages are split
    between the processes that share them, so the sum is the memory the tree really holds."""
    me, total = os.getpid(), 0
    pids = [me]
    for entry in os.scandir("/proc"):
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                if entry.name.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                    pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            pass
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total * 1024


def child(data, root, tokenizer):
    """Prepare once, in this fresh interpreter, and print what it cost as one JSON line. The
    baselines are taken after the imports (corpus: numpy, tiktoken) and before prepare."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KB on Linux
    has_proc = os.path.exists("/proc/self/smaps_rollup")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    pss = {"baseline": tree_pss() if has_proc else 0, "peak": 0}
    done = threading.Event()

    def sample():  # the tree's memory, 20 times a second
        while not done.wait(0.05):
            pss["peak"] = max(pss["peak"], tree_pss())

    sampler = threading.Thread(target=sample, daemon=True)
    if has_proc:
        sampler.start()
    start = time.perf_counter()
    meta = prepare(data, tokenizer, root=root)
    seconds = time.perf_counter() - start
    done.set()
    print(json.dumps({
        "seconds": seconds, "tokens": sum(meta["tokens"].values()),
        "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - baseline,
        "tree": pss["peak"] - pss["baseline"] if has_proc else None}))


def pin(cores):
    """Run this process and its children on `cores` cores; returns how many it got."""
    if not hasattr(os, "sched_setaffinity"):
        return cpu_count()
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:cores])
    return len(os.sched_getaffinity(0))


def shakespeare_lines():
    return [line for _, text in shakespeare_documents()
            for line in text.decode().splitlines() if line.strip()]


def write_corpus(folder, size_mb, seed=0):
    """Four text files of size/8 each and a jsonl file of size/2, lines drawn at random."""
    lines, rng = shakespeare_lines(), random.Random(seed)
    folder.mkdir()
    quota = size_mb * 1e6 / 8
    for i in range(4):
        with open(folder / f"part{i}.txt", "w") as f:
            while f.tell() < quota:
                f.write("\n".join(rng.choices(lines, k=5000)) + "\n")
    with open(folder / "web.jsonl", "w") as f:
        while f.tell() < 4 * quota:
            f.write("".join(json.dumps({"text": "\n".join(rng.choices(lines, k=110))}) + "\n"
                            for _ in range(200)))


def run_prepare(data, root, tokenizer):
    """prepare() in a fresh interpreter; returns the child's measurements."""
    run = subprocess.run([sys.executable, __file__, "--child", str(data), str(root), tokenizer],
                         capture_output=True, text=True)
    if run.returncode != 0:
        cli.fail(f"the prepare child failed: {run.stderr.strip().splitlines()[-1:]}", code=1)
    return json.loads(run.stdout.strip().splitlines()[-1])


def cpu_seconds():
    """CPU time of this process and of its finished children (the pool's workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def throughput(folder, size_mb, repeats, workers):
    """{path: (MB/s, cores used)} of encode_ordinary on one thread and of encode_chunks:
    median wall and CPU times of alternating runs on the same chunks. The text is the first
    size_mb of a corpus file (to a line break), read as prepare() reads a file: in pieces, cut
    into chunks of about corpus.documents.CHUNK_BYTES."""
    path = folder / "part0.txt"
    with open(path, "rb") as f:
        head = f.read(int(size_mb * 1e6))
    doc = Document(str(path), head.rindex(b"\n") + 1, path=path)
    pieces = list(chunks([("train", doc)]))
    enc = get_tokenizer("gpt2")

    def single():
        return [t for chunk in pieces for segment, _ in chunk.segments
                for t in enc.encode_ordinary(segment)]

    def parallel():
        return [ids for _, ids in encode_chunks("gpt2", pieces, workers)]

    reference = single()  # warm both paths once, and check that they agree
    tokens = [int(t) for ids in parallel() for t in ids]
    assert tokens == reference + [enc.eot_token], "the parallel path's tokens differ"
    runs = {single: [], parallel: []}
    for _ in range(repeats):
        for f in runs:
            wall, cpu = time.perf_counter(), cpu_seconds()
            f()
            runs[f].append((time.perf_counter() - wall, cpu_seconds() - cpu))
    medians = {f.__name__: [statistics.median(times) for times in zip(*r)] for f, r in runs.items()}
    return {name: (doc.size / 1e6 / wall, cpu / wall) for name, (wall, cpu) in medians.items()}


def main():
    parser = cli.Parser(description="Measure corpus.prepare on a large synthetic corpus.")
    parser.add_argument("--size_mb", type=int, default=1024, help="corpus size (default 1024)")
    parser.add_argument("--throughput_mb", type=float, default=64,
                        help="text of the throughput measurement (default 64, at most size/8)")
    parser.add_argument("--repeats", type=int, default=5, help="throughput runs (median)")
    parser.add_argument("--cores", type=int, default=2, help="cores to run on (default 2)")
    parser.add_argument("--tmp", default=None, help="folder for the temporary corpus "
                        "(default: the system's; needs about 4x --size_mb of disk)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # data, root, tokenizer
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.size_mb < 8 or args.repeats < 1 or args.cores < 1:
        cli.fail("--size_mb must be at least 8, --repeats and --cores at least 1")
    cores = pin(args.cores)
    tmp = Path(tempfile.mkdtemp(prefix="prepare_bench_", dir=args.tmp))
    try:
        write_corpus(tmp / "corpus", args.size_mb)
        mb = sum(f.stat().st_size for f in (tmp / "corpus").iterdir()) / 1e6
        results = {}
        for tokenizer in TOKENIZERS:
            first = run_prepare(tmp / "corpus", tmp / "data", tokenizer)
            results[tokenizer] = (first, run_prepare(tmp / "corpus", tmp / "data", tokenizer))
        speed = throughput(tmp / "corpus", min(args.throughput_mb, args.size_mb / 8),
                           args.repeats, cores)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, mb, cores, speed)


def report(results, mb, cores, speed):
    def row(label, value, goal=""):
        cells = " | ".join(value(*results[t]) for t in TOKENIZERS)
        print(f"| {label} | {cells} | {goal} |")

    def megabytes(value):
        return "n/a" if value is None else f"{value / 1e6:.0f} MB"

    print(f"\nprepare of a {mb:,.0f} MB synthetic corpus on {cores} cores "
          f"({cores} tokenizer processes)\n")
    print("| measured | byte | gpt2 | goal |\n| --- | --- | --- | --- |")
    row("tokens", lambda first, _: f"{first['tokens']:,}")
    row("prepare time (first run)", lambda first, _: f"{first['seconds']:.1f} s")
    row("prepare rate", lambda first, _: f"{mb / first['seconds']:.1f} MB/s")
    row("peak RSS above baseline, main process", lambda first, _: megabytes(first["main"]))
    row(f"peak PSS above baseline, main + {cores} workers", lambda first, _:
        megabytes(first["tree"]), "< 500 MB")
    row("open the prepared dataset (second run)", lambda _, again: f"{again['seconds']:.3f} s",
        "< 1 s")
    (single, single_cores), (parallel, parallel_cores) = speed["single"], speed["parallel"]
    print(f"\ngpt2 throughput on the same text: tiktoken encode_ordinary, 1 thread "
          f"{single:.1f} MB/s; encode_chunks, {cores} processes {parallel:.1f} MB/s; "
          f"ratio {parallel / single:.2f} (goal >= 1.6 on 2 cores)")
    print(f"cores busy (CPU time / wall time): {single_cores:.2f} and {parallel_cores:.2f}" +
          ("; under 0.9 per process: other work shared the cores, rerun on a quiet machine"
           if single_cores < 0.9 or parallel_cores < 0.9 * cores else ""))


if __name__ == "__main__":
    main()

"""
The headline experiment: train dec, encdec and bdd side by side, then measure their inference.

    python compare.py                       # --preset cpu without a GPU: 5 to 12 minutes on 2 cores
    python compare.py --skip_train          # inference only, freshly initialised models (fast)
    python compare.py --preset cpu --max_iters 300 --archs dec,bdd   # any train.py flag overrides
    python compare.py --sweep               # the scaling sweep, and --splits: see sweep.py

Every arch gets the same width, heads, depth, data, tokens, optimiser and seed, trained by
train.py's train() (no copied loop); decoding is sample.py's KV-cached generation (no copied
generation). Written to --out_dir (default out/compare):
- compare.png: continuation loss against training tokens (DESIGN.md section 4), decode-time KV
  bytes against context length, per-token decode cost (FLOPs counted, ms measured), and decode
  throughput against batch size with the largest batch a KV-memory budget holds (serving);
- results.json: the numbers behind it;
and a table with the ratios bdd/dec and encdec/dec is printed at the end.
"""

import math
import os
import statistics
import sys
import time

import torch

import cli
import corpus
import pack
import sweep
import train
from model import ARCHS, build_model
from sample import load_checkpoint, measure_decode
from sweep import ARCH_COLORS, format_table, pyplot, save_figure, write_json

# Presets are ordinary train.py flags; any flag given on the command line wins.
PRESETS = {
    # DESIGN.md section 6's model (byte tokens, 4+2 layers, rows of 256, batch 16), 300 steps
    # (1.2M tokens) each, so that all three train within 15 minutes on 2 cores.
    "cpu": dict(device="cpu", tokenizer="byte", n_layer=6, n_dec_layer=2, n_head=4, n_embd=128,
                block_size=256, dropout=0.0, batch_size=16, gradient_accumulation_steps=1,
                max_iters=300, learning_rate=1e-3, min_lr=1e-4, warmup_iters=30,
                eval_interval=50, eval_iters=4, log_interval=50, dtype="float32",
                compile=False, flex=False),
    # GPT-2-small width, 8+4 layers, gpt2 tokens; 600 steps of 32k tokens each, for one GPU.
    "gpu": dict(device="cuda", tokenizer="gpt2", n_layer=12, n_dec_layer=4, n_head=12,
                n_embd=768, block_size=1024, dropout=0.1, batch_size=16,
                gradient_accumulation_steps=2, max_iters=600, learning_rate=6e-4, min_lr=6e-5,
                warmup_iters=60, beta2=0.95, eval_interval=50, eval_iters=8, log_interval=25,
                dtype="bfloat16", compile=True, flex=True),
}


# The serving benchmark per preset: decode batches 1, 2, 4, ... up to max_batch, and the KV-memory
# budget (MB = 1e6 bytes) that sets how many sequences each arch holds at the benchmark's context.
SERVING = {"cpu": dict(kv_budget_mb=16.0, max_batch=64),
           "gpu": dict(kv_budget_mb=4096.0, max_batch=256)}
MAX_BUDGET_BATCHES = 4  # the budget may hold at most this many times the largest measured batch


def decode_tokens(block_size):
    """Decode steps timed per measurement: 32, fewer for tiny contexts."""
    return max(1, min(32, block_size // 4))


def context_lengths(block_size, n=6):
    """Context lengths (positions held) to measure, from short to block_size - 1."""
    lo = decode_tokens(block_size) + 1
    return sorted({round(lo + (block_size - 1 - lo) * i / (n - 1)) for i in range(n)})


def measure_inference(models, block_size):
    """KV bytes at several context lengths and the FLOPs of one decode step at half the context,
    batch 1. (The time per decoded token there is the serving benchmark's batch 1.)"""
    out = {arch: {"kv_bytes": [], "prefix_cache_bytes": []} for arch in models}
    for n in context_lengths(block_size):
        for arch, model in models.items():
            m = measure_decode(model, n, n_tokens=decode_tokens(block_size), count_flops=False)
            out[arch]["kv_bytes"].append({"context_len": n, "bytes": m["kv_bytes"]})
            out[arch]["prefix_cache_bytes"].append({"context_len": n, "bytes": m["prefix_bytes"]})
    half = block_size // 2
    for arch, model in models.items():
        m = measure_decode(model, half, n_tokens=decode_tokens(block_size))
        out[arch].update(decode_flops_per_token=m["flops"], decode_context_len=half)
    return out


def measured_contexts(block_size):
    """Every context length measure_inference decodes at."""
    return context_lengths(block_size) + [block_size // 2]


def check_measurable(block_size):
    """measure_decode needs every measured context to hold a prompt of at least one token plus
    the decoded tokens, inside the model's context. Checked before any training, so that a
    --block_size too small for it fails at once, not after all the training time."""
    n = decode_tokens(block_size)
    if not all(n < c < block_size for c in measured_contexts(block_size)):
        cli.fail(f"--block_size {block_size} is too small for the decode measurements (a prompt "
                 f"of at least one token and {n} decoded token(s) at context {block_size // 2}); "
                 f"use a larger --block_size")


def budget_batches(configs, kv_budget_mb, max_batch):
    """Before any training: the decode-time KV bytes one sequence holds at the serving context
    (measured on a fresh model of each arch; weights do not change them) and the largest batch
    each arch fits in kv_budget_mb. Refuses a budget that holds no sequence, or so many that the
    benchmark would decode batches far beyond the largest one it measures (a tiny model under
    the GPU preset's budget would try thousands of rows at once)."""
    per_sequence, in_budget = {}, {}
    for arch, config in configs.items():
        torch.manual_seed(config.seed)
        model = build_model(arch, train.model_config(config)).to(config.device).eval()
        per_sequence[arch] = measure_decode(model, config.block_size // 2,
                                            decode_tokens(config.block_size),
                                            count_flops=False)["kv_bytes"]
        in_budget[arch] = int(kv_budget_mb * 1e6 // per_sequence[arch])
        if not 1 <= in_budget[arch] <= MAX_BUDGET_BATCHES * max_batch:
            cli.fail(f"--kv_budget_mb {kv_budget_mb:g} holds {in_budget[arch]:,} {arch} "
                     f"sequences of {per_sequence[arch] / 1e6:.3g} MB at context "
                     f"{config.block_size // 2}: choose a budget that holds 1 to "
                     f"{MAX_BUDGET_BATCHES * max_batch} (--serving_max_batch {max_batch} "
                     f"x {MAX_BUDGET_BATCHES})")
    return per_sequence, in_budget


def measure_serving(models, block_size, per_sequence, in_budget, max_batch, repeats):
    """Decode throughput (tokens/s over all rows) at context block_size // 2 for batches 1, 2, 4,
    ... up to max_batch, and at each arch's largest batch in the KV budget (budget_batches).
    Timing rounds alternate between the archs at each batch; the median round counts. Small
    batches decode for a few milliseconds, so they get more rounds (8x at batch 1). Returns
    (settings, {arch: figures})."""
    context, n_tokens = block_size // 2, decode_tokens(block_size)
    batches = sorted({2 ** i for i in range(max_batch.bit_length())} | {max_batch})

    def throughput(batch_of):  # {arch: batch} -> {arch: (median tokens/s, KV bytes)}
        runs = {arch: [] for arch in models}
        for _ in range(repeats * max(1, 8 // max(batch_of.values()))):
            for arch, model in models.items():
                if batch_of[arch] >= 1:
                    runs[arch].append(measure_decode(model, context, n_tokens, batch_of[arch],
                                                     count_flops=False))
        return {arch: (statistics.median(m["tokens_per_sec"] for m in r), r[0]["kv_bytes"])
                if r else (None, 0) for arch, r in runs.items()}

    by_batch = [throughput(dict.fromkeys(models, b)) for b in batches]
    at_budget = throughput(in_budget)
    out = {arch: {"serving": {
        "bytes_per_sequence": per_sequence[arch],
        "tokens_per_sec": [t[arch][0] for t in by_batch],
        "budget_batch": in_budget[arch], "budget_tokens_per_sec": at_budget[arch][0],
        "budget_kv_bytes": at_budget[arch][1]}} for arch in models}
    return {"context_len": context, "decode_tokens": n_tokens, "batches": batches,
            "repeats": repeats}, out


def measure_training(configs, repeats):
    """ms of one training step (forward and backward) per arch, timed in rounds that alternate
    between the archs: a tokens/s ratio that the machine's drift between the separate training
    runs does not blur. Each round draws fresh random windows, cut into each arch's own batch
    with a fresh draw of its randomness (bdd's block layouts, encdec's split points), as training
    does: a step's cost depends on them. 4 x repeats rounds after a warm-up round; the median."""
    models = {}
    for arch, config in configs.items():
        torch.manual_seed(config.seed)
        models[arch] = build_model(arch, train.model_config(config)).to(config.device).train()
    times = {arch: [] for arch in configs}
    for r in range(4 * repeats + 1):  # round 0 warms up
        for arch, config in configs.items():
            enc = corpus.get_tokenizer(config.tokenizer)
            g = torch.Generator().manual_seed(config.seed + r)
            w = torch.randint(enc.n_vocab, (config.batch_size, config.block_size + 1), generator=g)
            batch = pack.build_batch(arch, w, g, config.objective, config.max_blocks,
                                     enc.n_vocab, enc.eot_token, config.block_layouts)
            batch = {k: v.to(config.device) for k, v in batch.items()}
            t0 = time.perf_counter()
            with train.autocast(config):
                loss = models[arch](batch)[1]
            loss.backward()
            if torch.device(config.device).type == "cuda":
                torch.cuda.synchronize()
            times[arch].append(time.perf_counter() - t0)
            models[arch].zero_grad(set_to_none=True)
    out = {}
    for arch, config in configs.items():
        seconds = statistics.median(times[arch][1:])
        out[arch] = {"train_step_ms": 1000 * seconds,
                     "train_step_tokens_per_sec": config.batch_size * config.block_size / seconds}
    return out


def plot(results, path):
    plt = pyplot()
    archs = results["archs"]
    colors = ARCH_COLORS
    serving = "serving" in results  # its panel comes after the other three, in a 2 x 2 grid
    rows, cols = (2, 2) if serving else (1, 3)
    fig = plt.figure(figsize=(6.5 * cols, 5 * rows))
    ax1, ax2, ax3 = (fig.add_subplot(rows, cols, i) for i in (1, 2, 3))
    for arch, r in archs.items():
        if r["curve"]:
            tokens = [p["tokens"] / 1e6 for p in r["curve"]]
            ax1.plot(tokens, [p["val_loss"] for p in r["curve"]], color=colors[arch], lw=2.2,
                     label=f"{arch}: continuation (val)")
            ax1.plot(tokens, [p["train_loss"] for p in r["curve"]], color=colors[arch], lw=0.8,
                     alpha=0.7, ls="--", label=f"{arch}: own objective (train)")
    later = [p[k] for r in archs.values() for p in r["curve"][1:] for k in ("val_loss", "train_loss")]
    if later:  # zoom on where the archs differ; the initial ~ln(vocab) loss is off the top
        ax1.set_ylim(min(later) - 0.05, min(max(later) + 0.05, min(later) + 1.5))
    ax1.set_xlabel("training tokens (millions)")
    ax1.set_ylabel(f"loss (nats per {results['config']['tokenizer']} token)")
    ax1.set_title("Continuation loss, same held-out targets")
    if any(r["curve"] for r in archs.values()):
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "not trained (--skip_train)", ha="center", transform=ax1.transAxes)

    styles = {"dec": "o-", "encdec": "s--", "bdd": "o-"}  # encdec and bdd coincide at 2:1
    for arch, r in archs.items():
        ax2.plot([p["context_len"] for p in r["kv_bytes"]],
                 [p["bytes"] / 1e6 for p in r["kv_bytes"]], styles[arch], color=colors[arch],
                 label=arch, ms=7 if arch == "encdec" else 5)
    if "dec" in archs:
        cfg = results["config"]
        ratio = cfg["n_dec_layer"] / cfg["n_layer"]
        dec = archs["dec"]["kv_bytes"]
        ax2.plot([p["context_len"] for p in dec], [p["bytes"] / 1e6 * ratio for p in dec], "k:",
                 label=f"dec x n_dec/n_layer = {ratio:.2f}")
    ax2.set_xlabel("context length (positions held)")
    ax2.set_ylabel("decode-time KV cache (MB, batch 1)")
    ax2.set_title("KV cache measured from live tensors")
    ax2.legend(fontsize=8)

    names = list(archs)
    x = range(len(names))
    layers = [archs[a]["decode_flops_per_token"]["layers"] / 1e6 for a in names]
    head = [archs[a]["decode_flops_per_token"]["head"] / 1e6 for a in names]
    ms = [archs[a]["decode_ms_per_token"] for a in names]
    ax3.bar([i - 0.2 for i in x], layers, 0.4, color=[colors[a] for a in names], label="layers")
    ax3.bar([i - 0.2 for i in x], head, 0.4, bottom=layers, color="lightgrey", label="LM head")
    ax3.set_ylabel("MFLOPs per decoded token (counted)")
    ax3b = ax3.twinx()
    ax3b.bar([i + 0.2 for i in x], ms, 0.4, color=[colors[a] for a in names], alpha=0.45,
             hatch="//", label="ms (measured)")
    ax3b.set_ylabel("ms per decoded token (measured, batch 1)")
    ax3.set_xticks(list(x), [f"{a}\nFLOPs | ms" for a in names])
    half = archs[names[0]]["decode_context_len"]
    ax3.set_title(f"Decode cost per token at context {half}")
    ax3.set_ylim(0, 1.3 * max(l + h for l, h in zip(layers, head)))
    ax3b.set_ylim(0, 1.3 * max(ms))
    ax3.legend(loc="upper left", fontsize=8)
    ax3b.legend(loc="upper right", fontsize=8)
    if serving:
        plot_serving(fig.add_subplot(rows, cols, 4), results, colors)
    fig.suptitle(f"nanoBDD: dec vs encdec vs bdd ({results['device']}, "
                 f"{results['config']['n_layer']} layers, n_embd {results['config']['n_embd']})")
    fig.tight_layout()
    save_figure(fig, path)
    return fig  # closed, but its artists can still be read (the tests check the plotted values)


def plot_serving(ax, results, colors):
    """Decode tokens/s against batch per arch; a star at the largest batch the KV budget holds."""
    s = results["serving"]
    for arch, r in results["archs"].items():
        sv = r["serving"]
        ax.plot(s["batches"], sv["tokens_per_sec"], "o-", color=colors[arch], label=arch, ms=4)
        if sv["budget_tokens_per_sec"] is not None:
            ax.plot([sv["budget_batch"]], [sv["budget_tokens_per_sec"]], "*", ms=15,
                    color=colors[arch], mec="k",
                    label=f"{arch}: batch {sv['budget_batch']} fills the budget")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences decoded together)")
    ax.set_ylabel("decode tokens/s (all rows, measured)")
    ax.set_title(f"Serving at context {s['context_len']}; star: {s['kv_budget_mb']:g} MB of KV cache")
    ax.legend(fontsize=8)


def serving_rows(results):
    """Table rows of the serving benchmark: tokens/s at batch 1, at the largest batch measured
    for every arch, and at equal KV memory (each arch at the largest batch its budget holds)."""
    if "serving" not in results:
        return []
    s = results["serving"]
    return [
        ("decode tokens/s, batch 1", lambda r: r["serving"]["tokens_per_sec"][0], "{:,.0f}", True),
        (f"decode tokens/s, batch {s['batches'][-1]}", lambda r: r["serving"]["tokens_per_sec"][-1],
         "{:,.0f}", True),
        (f"sequences in {s['kv_budget_mb']:g} MB of KV cache",
         lambda r: r["serving"]["budget_batch"], "{:,}", True),
        ("decode tokens/s there (equal memory)", lambda r: r["serving"]["budget_tokens_per_sec"],
         "{:,.0f}", True),
    ]


def serving_ratios(results):
    """A line per arch: its decode time per token over dec's at every measured batch."""
    archs, lines = results["archs"], []
    for a in ("bdd", "encdec"):
        if a in archs and "dec" in archs and "serving" in results:
            ratios = [d / x for d, x in zip(archs["dec"]["serving"]["tokens_per_sec"],
                                            archs[a]["serving"]["tokens_per_sec"])]
            lines.append(f"{a}/dec decode time per token, by batch: " + ", ".join(
                f"{b}: {r:.3f}" for b, r in zip(results["serving"]["batches"], ratios)))
    return "\n".join(lines)


def table(results):
    """The figures side by side, with ratios to dec."""
    archs = results["archs"]
    longest = archs[next(iter(archs))]["kv_bytes"][-1]["context_len"]
    rows = [  # name, value, format, whether a ratio to dec means something
        ("non-embedding params", lambda r: r["non_embedding_params"], "{:,}", True),
        ("train tokens", lambda r: r["train_tokens"], "{:,}", True),
        ("supervised fraction", lambda r: r["supervised_fraction"], "{:.3f}", True),
        ("padding fraction", lambda r: r["padding_fraction"], "{:.3f}", False),
        ("train tokens/s", lambda r: r["train_tokens_per_sec"], "{:,.0f}", True),
        ("train tokens/s, interleaved steps", lambda r: r["train_step_tokens_per_sec"],
         "{:,.0f}", True),
        ("val (continuation) loss", lambda r: r["val_loss"], "{:.4f}", True),
        (f"KV bytes at context {longest}", lambda r: r["kv_bytes"][-1]["bytes"], "{:,}", True),
        ("prefix cache bytes there", lambda r: r["prefix_cache_bytes"][-1]["bytes"], "{:,}",
         False),
        ("layer FLOPs per token", lambda r: r["decode_flops_per_token"]["layers"], "{:,}", True),
        ("head FLOPs per token", lambda r: r["decode_flops_per_token"]["head"], "{:,}", True),
        ("decode ms per token", lambda r: r["decode_ms_per_token"], "{:.3f}", True),
    ] + serving_rows(results)
    ratios = [f"{a}/dec" for a in ("bdd", "encdec") if a in archs and "dec" in archs]
    head = ["metric", *archs, *ratios]
    lines = [head]
    for name, get, fmt, comparable in rows:
        vals = {a: get(r) for a, r in archs.items()}
        cells = [name] + ["-" if v is None else fmt.format(v) for v in vals.values()]
        for ratio in ratios:
            a = ratio.split("/")[0]
            ok = comparable and vals[a] is not None and vals["dec"]
            cells.append(f"{vals[a] / vals['dec']:.3f}" if ok else "-")
        lines.append(cells)
    return format_table(lines)


def add_serving_flags(p):
    p.add_argument("--kv_budget_mb", type=float, help="serving: KV-cache memory (MB) each arch "
                   "fills with sequences (default per preset: cpu 16, gpu 4096)")
    p.add_argument("--serving_max_batch", type=int, help="serving: the largest decode batch "
                   "measured (default per preset: cpu 64, gpu 256)")


def serving_settings(args):
    """(KV budget in MB, largest batch) of the serving benchmark: the flags, else the preset's."""
    preset = SERVING[args.preset]
    budget = preset["kv_budget_mb"] if args.kv_budget_mb is None else args.kv_budget_mb
    max_batch = preset["max_batch"] if args.serving_max_batch is None else args.serving_max_batch
    if not (math.isfinite(budget) and budget > 0):
        cli.fail(f"--kv_budget_mb must be a positive number of MB, got {budget}")
    if max_batch < 1:
        cli.fail(f"--serving_max_batch must be at least 1, got {max_batch}")
    return budget, max_batch


def parse_archs(text):
    """--archs as a list: arch names in lower case, comma-separated, each at most once; spaces
    around a name and empty entries are ignored."""
    archs = [a.strip() for a in text.split(",") if a.strip()]
    for i, arch in enumerate(archs):
        if arch not in ARCHS:
            cli.fail(f"--archs {text!r}: {arch!r} is not an arch; choose from "
                     f"{', '.join(ARCHS)} (lower case, comma-separated)")
        if arch in archs[:i]:
            cli.fail(f"--archs {text!r}: {arch} is listed twice; name each arch once")
    if not archs:
        cli.fail(f"--archs {text!r} names no arch; choose from {', '.join(ARCHS)}")
    return archs


def train_all(configs, skip_train):
    """({arch: history}, {arch: model in eval mode}): each arch trained by train.train() and
    loaded back from its checkpoint, or (skip_train) freshly initialised and untrained."""
    histories, models = {}, {}
    for i, (arch, config) in enumerate(configs.items()):
        if skip_train:
            torch.manual_seed(config.seed)
            models[arch] = build_model(arch, train.model_config(config)).to(config.device).eval()
            continue
        print(f"== training {arch} ({i + 1}/{len(configs)}) ==", flush=True)
        try:
            histories[arch] = train.train(config, log=lambda s, a=arch: print(f"[{a}] {s}",
                                                                                 flush=True))
        except (train.ConfigError, ValueError) as e:
            cli.fail(str(e))
        except train.LossNotFinite as e:
            cli.fail(f"{arch}: {e}", code=1)
        models[arch] = load_checkpoint(config.out_dir, config.device)[0]
    return histories, models


def run(argv=None):
    p = cli.Parser(description="Train dec, encdec and bdd side by side and measure "
                   "their inference. Any train.py flag overrides the preset.",
                   allow_abbrev=False)  # --arch must not pass for --archs
    p.add_argument("--preset", choices=sorted(PRESETS),
                   default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of "
                   f"{','.join(ARCHS)}, each at most once")
    p.add_argument("--skip_train", action="store_true", help="measure inference only, on "
                   "freshly initialised models")
    p.add_argument("--out_dir", default=os.path.join("out", "compare"))
    p.add_argument("--repeats", type=int, default=5, help="timing rounds: of the serving "
                   "benchmark (8x at batch 1) and of the training steps (4x)")
    add_serving_flags(p)
    p.add_argument("--sweep", action="store_true", help="the scaling sweep instead (sweep.py; "
                   "compare.py --sweep --help lists its flags)")
    p.add_argument("--splits", action="store_true", help="bdd's split trade-off (sweep.py)")
    args, rest = p.parse_known_args(argv)
    flags = vars(train.parser().parse_args(rest))  # exits 2 on an unknown flag

    archs = parse_archs(args.archs)
    if not args.out_dir:
        cli.fail("--out_dir is empty; give a folder, or leave --out_dir out for out/compare")
    for clash in ("arch", "out_dir", "init_from"):
        if clash in flags:
            cli.fail(f"--{clash} is set by compare.py per arch; use --archs and --out_dir instead")
    if args.repeats < 1:
        cli.fail("--repeats must be at least 1")
    serving = serving_settings(args)
    configs = {}
    for arch in archs:
        values = {**PRESETS[args.preset], **flags, "arch": arch,
                  "out_dir": os.path.join(args.out_dir, arch), "overwrite": True}
        configs[arch] = train.make_config(**values)
        try:
            train.check_config(configs[arch])
        except train.ConfigError as e:
            cli.fail(str(e))
    first = configs[archs[0]]
    check_measurable(first.block_size)
    kv_budget_mb, max_batch = serving
    per_sequence, in_budget = budget_batches(configs, kv_budget_mb, max_batch)
    os.makedirs(args.out_dir, exist_ok=True)
    t_start = time.time()

    histories, models = train_all(configs, args.skip_train)
    print("== measuring inference (KV cache, FLOPs, decode speed) and training steps ==",
          flush=True)
    inference = measure_inference(models, first.block_size)
    steps = measure_training(configs, args.repeats)
    print("== measuring serving: decode throughput by batch and at a KV budget ==", flush=True)
    serving_setup, served = measure_serving(models, first.block_size, per_sequence, in_budget,
                                            max_batch, args.repeats)
    serving_setup["kv_budget_mb"] = kv_budget_mb

    results = {"config": {k: v for k, v in vars(first).items() if k not in ("arch", "out_dir")},
               "preset": args.preset, "device": first.device, "torch": torch.__version__,
               "skip_train": args.skip_train, "serving": serving_setup, "archs": {}}
    for arch in archs:
        h = histories.get(arch, {})
        curve = [{"tokens": p["tokens"], "train_loss": p["train_loss"],
                  "val_loss": p["cont_loss"], "own_val_loss": p["val_loss"]}
                 for p in h.get("curve", [])]
        results["archs"][arch] = {
            "non_embedding_params": models[arch].num_params(non_embedding=True),
            "train_tokens": h.get("train_tokens"),
            "supervised_fraction": h.get("supervised_fraction"),
            "padding_fraction": h.get("padding_fraction"),
            "train_tokens_per_sec": h.get("train_tokens_per_sec"),
            "curve": curve, "val_loss": h.get("val_loss"), **steps[arch], **inference[arch],
            "decode_ms_per_token": 1000 / served[arch]["serving"]["tokens_per_sec"][0],  # batch 1
            **served[arch]}
    results["wall_time"] = time.time() - t_start
    write_json(results, os.path.join(args.out_dir, "results.json"))
    plot(results, os.path.join(args.out_dir, "compare.png"))
    print(table(results))
    print(serving_ratios(results))
    print(f"wrote {args.out_dir}/results.json and {args.out_dir}/compare.png "
          f"in {results['wall_time']:.0f} s")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--sweep" in argv or "--splits" in argv:  # the scaling experiment lives in sweep.py
        return sweep.main(argv)
    try:
        run(argv)
    except KeyboardInterrupt:
        cli.fail("interrupted (Ctrl-C); nothing is half-written: each arch's checkpoint, "
                 "results.json and compare.png are replaced whole or not at all", code=130)


if __name__ == "__main__":
    main()

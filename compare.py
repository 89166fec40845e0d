"""
The headline experiment: train dec, encdec and bdd side by side at one size and one seed, then
measure their inference. It is the one-size case of the experiment runner that lab/sweep.py uses, so
it resumes the same way: run the same command again and finished runs are only measured.

    python compare.py                       # the cpu preset without a GPU: 5 to 10 minutes on 2 cores
    python compare.py --skip_train          # inference only, freshly initialised models (fast)
    python compare.py --archs dec,bdd --max_iters 600   # any train.py flag overrides the preset

Every arch gets the same width, heads, depth, data, tokens, optimiser and seed, trained by
train.py's train(); decoding is sample.py's KV-cached generation (lab/measure.py). Written to
--out_dir (default out/compare), beside each arch's run folder:
- compare.png: continuation loss against training tokens (DESIGN.md section 4), decode-time cache
  bytes against context length, per-token decode cost (FLOPs counted, ms measured), decode
  throughput against batch size with the largest batch a memory budget holds (serving), and the
  multi-turn workload at the same budget: bytes held per conversation and time to first token,
  turn by turn;
- results.json: the numbers behind it;
and two tables are printed at the end: the archs with the ratios bdd/dec and encdec/dec, and the
multi-turn workload (dec, encdec, bdd keep, bdd drop; bdd offload on CUDA) with ratios to dec.
"""

import os
import time

import torch

import cli
import config as cfg
from lab import experiment as ex
import files
from lab import measure
from model import ARCHS
from lab.experiment import ARCH_COLORS


def plan(archs, flags, out_dir):
    """One run per arch, in <out_dir>/<arch>, with the same flags."""
    return [ex.make_run(arch, {**flags, "arch": arch}, out_dir) for arch in archs]


def measure_all(models, configs, args, budget):
    """The inference and training-step measurements of compare.png and results.json."""
    first = next(iter(configs.values()))
    half = first.block_size // 2
    per_arch = {arch: {} for arch in models}
    for arch, points in measure.kv_by_context(models, first.block_size).items():
        per_arch[arch]["kv_bytes"] = points
    for arch, model in models.items():
        m = measure.measure_decode(model, half)
        per_arch[arch].update(decode_flops_per_token=m["flops"], decode_context_len=half)
    for arch, timing in measure.step_times(configs, args.repeats).items():
        per_arch[arch].update(timing)
    print("== measuring serving: decode throughput by batch and at a memory budget ==", flush=True)
    batches, served = measure.serving(models, half, budget["in_budget"], budget["max_batch"],
                                      args.repeats)
    for arch, s in served.items():
        per_arch[arch]["serving"] = {**s, "bytes_per_sequence": budget["per_sequence"][arch]}
        per_arch[arch]["decode_ms_per_token"] = 1000 / s["tokens_per_sec"][0]  # batch 1
    setup = {"context_len": half, "decode_tokens": measure.decode_tokens(half),
             "batches": batches, "repeats": args.repeats, "budget_bytes": budget["bytes"],
             "budget_given": args.kv_budget_mb is not None}
    turns, n_in, n_out = budget["multi_turn"]["shape"]
    print(f"== measuring multi-turn serving: conversations of {turns} turns ({n_in} tokens in, "
          f"{n_out} out) at the same budget ==", flush=True)
    multi_turn = measure.multi_turn(models, budget["multi_turn"], multi_turn_rounds(args))
    return per_arch, setup, multi_turn


def multi_turn_rounds(args):
    """Rounds of the multi-turn workload: half the timing rounds, rounded up (a round serves
    every conversation of every case: about 5 s on the cpu preset)."""
    return (args.repeats + 1) // 2


def results_of(done, models, measured, configs, args, t_start):
    per_arch, setup, multi_turn = measured
    first = next(iter(configs.values()))
    out = {"config": {k: v for k, v in vars(first).items() if k not in ("arch", "out_dir")},
           "preset": first.preset, "device": first.device, "torch": torch.__version__,
           "skip_train": args.skip_train, "serving": setup, "multi_turn": multi_turn,
           "archs": {}}
    histories = {d.run.config.arch: d for d in done}
    for arch, config in configs.items():
        d = histories.get(arch)
        h = d.history if d else {}
        out["archs"][arch] = {
            "non_embedding_params": models[arch].num_params(),
            "n_dec_layer": None if arch == "dec" else config.n_dec,
            **{k: h.get(k) for k in ("train_tokens", "supervised_fraction", "padding_fraction",
                                     "train_tokens_per_sec", "cont_loss")},
            "train_flops_per_token": d.flops_per_token if d else None,
            "curve": [{k: p[k] for k in ("iter", "tokens", "train_loss", "val_loss", "cont_loss")}
                      for p in h.get("curve", [])],
            **per_arch[arch]}
    out["wall_time"] = time.time() - t_start
    return out


# -----------------------------------------------------------------------------
# the figure


def plot(results, path):
    plt = ex.pyplot()
    archs = results["archs"]
    fig = plt.figure(figsize=(13, 15))
    ax1, ax2, ax3, ax4, ax5, ax6 = (fig.add_subplot(3, 2, i) for i in range(1, 7))
    plot_losses(ax1, results)
    styles = {"dec": "o-", "encdec": "s--", "bdd": "o-"}  # encdec and bdd coincide at 2:1
    for arch, r in archs.items():
        ax2.plot([p["context_len"] for p in r["kv_bytes"]],
                 [p["held_bytes"] / 1e6 for p in r["kv_bytes"]], styles[arch],
                 color=ARCH_COLORS[arch], label=arch, ms=7 if arch == "encdec" else 5)
    if "dec" in archs and "bdd" in archs:
        ratio = archs["bdd"]["n_dec_layer"] / results["config"]["n_layer"]
        dec = archs["dec"]["kv_bytes"]
        ax2.plot([p["context_len"] for p in dec], [p["held_bytes"] / 1e6 * ratio for p in dec],
                 "k:", label=f"dec x n_dec/n_layer = {ratio:.2f}")
    ax2.set_xlabel("context length (positions held)")
    ax2.set_ylabel("cache bytes held while decoding (MB, batch 1)")
    ax2.set_title("Cache held, measured from live tensors")
    ax2.legend(fontsize=8)
    plot_decode_cost(ax3, results)
    plot_serving(ax4, results)
    plot_multi_turn(ax5, ax6, results)
    fig.suptitle(f"nanoBDD: dec vs encdec vs bdd ({results['device']}, "
                 f"{results['config']['n_layer']} layers, n_embd {results['config']['n_embd']})")
    fig.tight_layout()
    ex.save_figure(fig, path)
    return fig  # closed, but its artists can still be read (the tests check the plotted values)


def plot_losses(ax, results):
    archs = results["archs"]
    for arch, r in archs.items():
        tokens = [p["tokens"] / 1e6 for p in r["curve"]]
        ax.plot(tokens, [p["cont_loss"] for p in r["curve"]], color=ARCH_COLORS[arch], lw=2.2,
                label=f"{arch}: continuation (val)")
        ax.plot(tokens, [p["train_loss"] for p in r["curve"]], color=ARCH_COLORS[arch], lw=0.8,
                alpha=0.7, ls="--", label=f"{arch}: own objective (train)")
    later = [p[k] for r in archs.values() for p in r["curve"][1:] for k in ("cont_loss",
                                                                            "train_loss")]
    if later:  # zoom on where the archs differ; the initial ~ln(vocab) loss is off the top
        ax.set_ylim(min(later) - 0.05, min(max(later) + 0.05, min(later) + 1.5))
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel(f"loss (nats per {results['config']['tokenizer']} token)")
    ax.set_title("Continuation loss, same held-out targets")
    if any(r["curve"] for r in archs.values()):
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not trained (--skip_train)", ha="center", transform=ax.transAxes)


def plot_decode_cost(ax, results):
    """Bars: layer and LM-head FLOPs per decoded token (counted), ms per token (measured)."""
    archs = results["archs"]
    names = list(archs)
    x = range(len(names))
    layers = [archs[a]["decode_flops_per_token"]["layers"] / 1e6 for a in names]
    head = [archs[a]["decode_flops_per_token"]["head"] / 1e6 for a in names]
    ms = [archs[a]["decode_ms_per_token"] for a in names]
    colors = [ARCH_COLORS[a] for a in names]
    ax.bar([i - 0.2 for i in x], layers, 0.4, color=colors, label="layers")
    ax.bar([i - 0.2 for i in x], head, 0.4, bottom=layers, color="lightgrey", label="LM head")
    ax.set_ylabel("MFLOPs per decoded token (counted)")
    twin = ax.twinx()
    twin.bar([i + 0.2 for i in x], ms, 0.4, color=colors, alpha=0.45, hatch="//",
             label="ms (measured)")
    twin.set_ylabel("ms per decoded token (measured, batch 1)")
    ax.set_xticks(list(x), [f"{a}\nFLOPs | ms" for a in names])
    ax.set_title(f"Decode cost per token at context {archs[names[0]]['decode_context_len']}")
    ax.set_ylim(0, 1.3 * max(l + h for l, h in zip(layers, head)))
    twin.set_ylim(0, 1.3 * max(ms))
    ax.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)


def plot_serving(ax, results):
    """Decode tokens/s against batch per arch; a star at the largest batch the budget holds."""
    s = results["serving"]
    for arch, r in results["archs"].items():
        sv = r["serving"]
        ax.plot(s["batches"], sv["tokens_per_sec"], "o-", color=ARCH_COLORS[arch], label=arch,
                ms=4)
        ax.plot([sv["budget_batch"]], [sv["budget_tokens_per_sec"]], "*", ms=15,
                color=ARCH_COLORS[arch], mec="k",
                label=f"{arch}: batch {sv['budget_batch']} fills the budget")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences decoded together)")
    ax.set_ylabel("decode tokens/s (all rows, measured)")
    ax.set_title(f"Serving at context {s['context_len']}; star: {s['budget_bytes'] / 1e6:.3g} MB "
                 f"held")
    ax.legend(fontsize=8)


CASE_STYLES = {"keep": "o-", "drop": "s--", "offload": "^:"}  # bdd's prefix-cache policies


def plot_multi_turn(held_ax, ttft_ax, results):
    """Per case of the multi-turn workload, turn by turn: the bytes a conversation holds after
    the turn (its peak is what the budget divides by), and the time to the turn's first token."""
    m = results["multi_turn"]
    turns = range(1, m["turns"] + 1)
    for name, c in m["cases"].items():
        style = dict(color=ARCH_COLORS[c["arch"]], ms=5)
        fmt = CASE_STYLES[c["policy"]] if c["arch"] == "bdd" else "o-"
        held_ax.plot(turns, [b / 1e6 for b in c["held_bytes_per_conv_by_turn"]], fmt, **style,
                     label=f"{name}: {c['conversations']} conversations in the budget")
        ttft_ax.plot(turns, c["ttft_ms_per_turn"], fmt, **style,
                     label=f"{name}: {c['decode_tokens_per_sec']:,.0f} decode tokens/s")
    for ax in (held_ax, ttft_ax):
        ax.set_xticks(list(turns))
        ax.set_xlabel(f"turn ({m['tokens_in']} tokens in, {m['tokens_out']} out)")
        ax.legend(fontsize=8)
    held_ax.set_ylabel("bytes held per conversation after the turn (MB)")
    held_ax.set_title(f"Multi-turn: held per conversation; budget {m['budget_bytes'] / 1e6:.3g} MB")
    ttft_ax.set_ylabel("time to first token (ms, the turn's prefill)")
    ttft_ax.set_title("Multi-turn: time to first token, all conversations at once")


# -----------------------------------------------------------------------------
# the table


def rows(results):
    """(name, value of an arch's results, format, whether a ratio to dec means something)."""
    s, archs = results["serving"], results["archs"]
    longest = next(iter(archs.values()))["kv_bytes"][-1]["context_len"]
    return [
        ("non-embedding params", lambda r: r["non_embedding_params"], "{:,}", True),
        ("train tokens", lambda r: r["train_tokens"], "{:,}", True),
        ("supervised fraction", lambda r: r["supervised_fraction"], "{:.3f}", True),
        ("padding fraction", lambda r: r["padding_fraction"], "{:.3f}", False),
        ("train tokens/s", lambda r: r["train_tokens_per_sec"], "{:,.0f}", True),
        ("train tokens/s, interleaved steps", lambda r: r["train_step_tokens_per_sec"],
         "{:,.0f}", True),
        ("continuation loss", lambda r: r["cont_loss"], "{:.4f}", True),
        (f"K/V bytes at context {longest}", lambda r: r["kv_bytes"][-1]["kv_bytes"], "{:,}", True),
        ("cache bytes held there", lambda r: r["kv_bytes"][-1]["held_bytes"], "{:,.0f}", True),
        ("prefix cache bytes there", lambda r: r["kv_bytes"][-1]["prefix_bytes"], "{:,}", False),
        ("layer FLOPs per token", lambda r: r["decode_flops_per_token"]["layers"], "{:,}", True),
        ("head FLOPs per token", lambda r: r["decode_flops_per_token"]["head"], "{:,}", True),
        ("decode ms per token", lambda r: r["decode_ms_per_token"], "{:.3f}", True),
        ("decode tokens/s, batch 1", lambda r: r["serving"]["tokens_per_sec"][0], "{:,.0f}", True),
        (f"decode tokens/s, batch {s['batches'][-1]}", lambda r: r["serving"]["tokens_per_sec"][-1],
         "{:,.0f}", True),
        (f"bytes held per sequence at context {s['context_len']}",
         lambda r: r["serving"]["bytes_per_sequence"], "{:,.0f}", True),
        (f"sequences in {s['budget_bytes'] / 1e6:.3g} MB held", lambda r: r["serving"]["budget_batch"],
         "{:,}", True),
        ("decode tokens/s there (equal memory)", lambda r: r["serving"]["budget_tokens_per_sec"],
         "{:,.0f}", True),
    ]


def table(results):
    """The archs' figures side by side, with ratios to dec."""
    archs = results["archs"]
    return ratio_table(archs, rows(results), [a for a in ("bdd", "encdec")
                                              if a in archs and "dec" in archs])


def multi_turn_rows(results):
    """(name, value of a multi-turn case's results, format, whether a ratio to dec means
    something), as rows()."""
    m = results["multi_turn"]
    per_turn = [(f"time to first token, turn {k + 1} (ms)", lambda c, k=k: c["ttft_ms_per_turn"][k],
                 "{:.2f}", True) for k in range(m["turns"])]
    encoded = [(f"tokens encoded, turn {k + 1} (dec: prefilled)",
                lambda c, k=k: c["encoded_per_turn"][k], "{:,}", False) for k in range(m["turns"])]
    on_gpu = [  # host bytes: offload's encoder cache; the peak: activations and logits too
        ("host bytes per conversation (peak)", lambda c: max(c["host_bytes_per_conv_by_turn"]),
         "{:,.0f}", False),
        ("peak of memory_allocated() per conversation", lambda c: c["cuda_peak_bytes_per_conv"],
         "{:,.0f}", True)] if any(c["cuda_peak_bytes_per_conv"] for c in m["cases"].values()) else []
    return [
        ("bytes held per conversation (peak)", lambda c: c["held_bytes_per_conv"], "{:,.0f}", True),
        *on_gpu,
        (f"conversations in {m['budget_bytes'] / 1e6:.3g} MB held", lambda c: c["conversations"],
         "{:,}", True),
        ("decode tokens/s, all conversations", lambda c: c["decode_tokens_per_sec"], "{:,.0f}",
         True),
        ("mean time to first token (ms)", lambda c: c["mean_ttft_ms"], "{:.2f}", True),
        *per_turn, *encoded]


def multi_turn_heading(results):
    m = results["multi_turn"]
    return (f"multi-turn: conversations of {m['turns']} turns ({m['tokens_in']} tokens in, "
            f"{m['tokens_out']} out, greedy), as many as fit in {m['budget_bytes'] / 1e6:.3g} MB "
            f"held, served together; time to first token: the turn's prefill")


def multi_turn_table(results):
    """The multi-turn cases side by side, with ratios to dec."""
    cases = results["multi_turn"]["cases"]
    return ratio_table(cases, multi_turn_rows(results),
                       [c for c in cases if c != "dec"] if "dec" in cases else [])


def ratio_table(columns, rows, ratios):
    """Each row's value in each column ({name: results}), then each column of `ratios` over dec's
    where the row is comparable."""
    lines = [["metric", *columns, *(f"{c}/dec" for c in ratios)]]
    for name, get, fmt, comparable in rows:
        vals = {c: get(r) for c, r in columns.items()}
        cells = [name] + ["-" if v is None else fmt.format(v) for v in vals.values()]
        for c in ratios:
            ok = comparable and vals[c] is not None and vals["dec"]
            cells.append(f"{vals[c] / vals['dec']:.3f}" if ok else "-")
        lines.append(cells)
    return ex.format_table(lines)


def serving_ratios(results):
    """A line per arch: its decode time per token over dec's at every measured batch."""
    archs, lines = results["archs"], []
    for a in ("bdd", "encdec"):
        if a in archs and "dec" in archs:
            ratios = [d / x for d, x in zip(archs["dec"]["serving"]["tokens_per_sec"],
                                            archs[a]["serving"]["tokens_per_sec"])]
            lines.append(f"{a}/dec decode time per token, by batch: " + ", ".join(
                f"{b}: {r:.3f}" for b, r in zip(results["serving"]["batches"], ratios)))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# command line


def parse(argv):
    p = ex.parser("Train dec, encdec and bdd side by side and measure their inference.",
                  "compare", per_run={"arch": "use --archs"})
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of "
                   f"{','.join(ARCHS)}, each at most once")
    p.add_argument("--skip_train", action="store_true", help="measure inference only, on "
                   "freshly initialised models")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds: of the serving "
                   "benchmark (8x at batch 1), of the training steps (4x) and of the multi-turn "
                   "workload (half, rounded up)")
    p.add_argument("--kv_budget_mb", type=float, help="serving: the memory (MB = 1e6 bytes) each "
                   "arch fills with sequences (default: what holds 20 dec sequences on the cpu "
                   "preset, 64 on the gpu preset)")
    p.add_argument("--serving_max_batch", type=int, help="serving: the largest decode batch "
                   "measured (default: cpu preset 64, gpu 256)")
    args = ex.parse_args(p, argv)
    args.archs = ex.parse_archs(args.archs)
    variants = [name for name in args.archs if ":" in name]
    cfg.refuse([(args.repeats < 1, f"--repeats must be at least 1, got {args.repeats}"),
                (args.kv_budget_mb is not None and not 0 < args.kv_budget_mb < float("inf"),
                 f"--kv_budget_mb must be a positive number of MB, got {args.kv_budget_mb}"),
                (args.serving_max_batch is not None and args.serving_max_batch < 1,
                 f"--serving_max_batch must be at least 1, got {args.serving_max_batch}"),
                (variants, f"--archs {','.join(variants)}: compare.py trains the three archs as "
                 f"they are; their variants with fewer keys and values are lab.frontier's "
                 f"(python -m lab.frontier --archs dec,{','.join(variants)})")])
    return args, cfg.given_flags(args)


def main(argv=None):
    with cli.guard("interrupted (Ctrl-C); nothing is half-written: each arch's checkpoint, "
                   "results.json and compare.png are replaced whole or not at all; run the same "
                   "command again to resume"):
        args, flags = parse(argv)
        runs = plan(args.archs, flags, args.out_dir)
        ex.use_threads(runs)
        budget = serving_budget(runs, args)  # before any training: a budget that cannot work
        with files.holding(args.out_dir, "experiment"):
            compare(runs, budget, args)


def serving_budget(runs, args):
    """The serving benchmark's memory budget, and what it holds of each arch (one-turn
    sequences) and of each case of the multi-turn workload (conversations), measured on fresh
    models of each arch."""
    first = runs[0].config
    measure.check_measurable(first.block_size)
    fresh = {r.config.arch: cfg.fresh_model(r.config).eval() for r in runs}
    max_batch = args.serving_max_batch or measure.SERVING[first.preset]["max_batch"]
    budget, per_sequence, in_budget = measure.serving_budget(
        fresh, first.block_size // 2, first.preset, args.kv_budget_mb, max_batch)
    return {"bytes": budget, "per_sequence": per_sequence, "in_budget": in_budget,
            "max_batch": max_batch, "fresh": fresh,
            "multi_turn": measure.multi_turn_plan(fresh, budget)}


def compare(runs, budget, args):
    configs = {r.config.arch: r.config for r in runs}
    t_start = time.time()
    done = [] if args.skip_train else ex.execute(runs)
    models = budget["fresh"] if args.skip_train else \
        {d.run.config.arch: cfg.load_model(d.run.config.out_dir, d.run.config.device)[0]
         for d in done}
    print("== measuring inference (cache bytes, FLOPs, decode speed) and training steps ==",
          flush=True)
    measured = measure_all(models, configs, args, budget)
    results = results_of(done, models, measured, configs, args, t_start)
    ex.write_json(results, os.path.join(args.out_dir, "results.json"))
    plot(results, os.path.join(args.out_dir, "compare.png"))
    print(table(results))
    print(serving_ratios(results))
    print(multi_turn_heading(results))
    print(multi_turn_table(results))
    print(f"wrote {args.out_dir}/results.json and {args.out_dir}/compare.png in "
          f"{results['wall_time']:.0f} s")


if __name__ == "__main__":
    main()

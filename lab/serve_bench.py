"""
The serving benchmark: request traces replayed against serve/engine.py for every
variant at the same memory budget, as `vllm bench serve` and `sglang.bench_serving` replay theirs.

    python -m lab.serve_bench                             # the six variants, fresh models
    python -m lab.serve_bench --checkpoints out/frontier  # trained: <dir>/<variant>[_s<seed>]
    python -m lab.serve_bench --quick                     # a smoke run: fewer rates, requests

Three workloads, each from the corpus's own held-out dialogue scenes (lab/measure.dialogue_scenes):

- single turn: requests arrive as a Poisson process at each rate of a sweep (inf: all at once,
  saturating); a request's prompt is a speech and its output as long as the speech that answers
  it;
- multi-turn: each scene is a conversation: its first speech is the prompt, the reply is generated
  as long as the next speech, then the speech after is appended to the history (the reply
  included) and the next turn sent after a think time, and so on; at light load (a few
  conversations) and busy (many at once);
- shared prefix: every request starts with one of a few long preambles (held-out text, whole
  pages) and ends with a short question (the start of a speech).

Outputs are as long as the trace says (no stop token), so fresh and trained weights serve the
same lengths: timing and memory do not depend on weights. Time is the engine's own, with the idle
time between arrivals skipped (the clock jumps to the next arrival), so a light load costs only
its steps. Reported per variant: output tokens/s and requests/s (from the first arrival to the
last finish), and "saturated" tokens/s over the steps that left a request waiting for pages (the
steady state of a full pool, without the ramp and the drain); time to first token (TTFT) and time
per output token after it (TPOT) at p50 and p99; peak pages held of the pool's; the mean decode
batch, over all decode steps and over those with a full pool (the requests it holds at once);
prefix-cache hit tokens of prompt tokens, evictions, preemptions; then the issue's goals as
measured. Written to --out_dir: serve_bench.json and serve_bench.png (throughput against
latency), the tables printed.
"""

import glob
import heapq
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

import cli
import config as cfg
import files
from corpus.download import DataError
from corpus.prepare import prepare
from lab import experiment as ex
from lab.measure import dialogue_scenes
from serve.engine import Engine, EngineConfig
from serve.scheduler import SamplingParams
import train

ARCHS = "dec,dec:kv1,dec:cla3,encdec,bdd,bdd:kv1"
QUICK = dict(budget_mb=2.0, rates="4,inf", requests=12, saturate=24, light=3, busy=12,
             shared=12)
SCENES = 400    # held-out scenes read (the val split holds about 200 of 256 tokens)
QUESTION = 16   # shared prefix: the most tokens of a question after the preamble
ANSWER = 32     # shared prefix: tokens generated per request


@dataclass
class BenchConfig:
    """lab/serve_bench.py's flags, their help and what they allow (config.setting)."""
    archs: str = cli.setting(ARCHS, f"comma-separated variants: arch[:option]..., "
                             f"{ex.OPTIONS_HELP}")
    checkpoints: str = cli.setting(None, "a folder with a trained run per variant "
                                   "(<dir>/<variant>, e.g. dec-kv1, or the lowest seed's "
                                   "<dir>/<variant>_s<seed>); fresh models if unset")
    budget_mb: float = cli.setting(8.0, "the page pool of every variant, MB", "(0, inf)")
    rates: str = cli.setting("1,2,4,8,16,inf", "single turn: arrival rates (requests/s), "
                             "comma-separated; inf sends --saturate requests at once")
    requests: int = cli.setting(48, "single turn: requests per finite rate", "[1, inf)")
    saturate: int = cli.setting(192, "single turn: requests sent at once at rate inf (enough to "
                                "fill every variant's pool)", "[1, inf)")
    light: int = cli.setting(8, "multi-turn: conversations at light load, starting "
                             "--light_gap s apart on average", "[1, inf)")
    light_gap: float = cli.setting(4.0, "multi-turn: mean time between the starts of light "
                                   "load's conversations, s", "[0, inf)")
    busy: int = cli.setting(64, "multi-turn: conversations at busy load, all starting in the "
                            "first think time", "[1, inf)")
    think: float = cli.setting(1.0, "multi-turn: mean think time between turns, s", "[0, inf)")
    shared: int = cli.setting(48, "shared prefix: requests", "[1, inf)")
    preambles: int = cli.setting(4, "shared prefix: distinct preambles", "[1, inf)")
    shared_rate: float = cli.setting(2.0, "shared prefix: arrival rate, requests/s", "(0, inf)")
    seed: int = cli.setting(0, "the traces' randomness", "[0, inf)")
    threads: int = cli.setting(None, "torch CPU threads (unset: one per core idle as it starts, "
                               "as train.py)", cfg.allowed("threads"))
    quick: bool = cli.setting(False, "a smoke run: " + ", ".join(
        f"--{k} {v}" for k, v in QUICK.items()) + " (unless given)")
    out_dir: str = cli.setting(os.path.join("out", "serve_bench"), "where the JSON and the "
                               "figure go")

    def __post_init__(self):
        cfg.check_fields(self)
        self.archs = ex.parse_archs(self.archs)
        self.rates = parse_rates(self.rates)


def parse_rates(text):
    """"1,2,inf" -> [1.0, 2.0, inf], sorted, each once; ConfigError unless each is > 0."""
    try:
        rates = sorted({float(r) for r in text.split(",") if r.strip()})
    except ValueError:
        rates = []
    cfg.refuse([(not rates or rates[0] <= 0, f"--rates {text!r}: give comma-separated positive "
                 f"request rates per second, inf for all at once, e.g. --rates 1,4,inf")])
    return rates


# -----------------------------------------------------------------------------
# models and traces


def run_folder(root, name):
    """The variant's run under root: <root>/<variant>, else the run of its lowest seed,
    <root>/<variant>_s<seed> (as lab/frontier.py names its runs)."""
    folder = os.path.join(root, ex.variant_folder(name))
    seeds = [int(s) for s in (f.rpartition("_s")[2] for f in glob.glob(glob.escape(folder) + "_s*"))
             if s.isdigit()]
    return folder if os.path.isdir(folder) or not seeds else f"{folder}_s{min(seeds)}"


def load_models(args):
    """({variant: model}, their tokenizer): each trained run of --checkpoints, or a fresh model
    of the cpu preset (timing and memory do not depend on weights). ConfigError for a missing
    run, or runs of different tokenizers (the traces are tokens)."""
    models, tokenizers = {}, set()
    for name in args.archs:
        if args.checkpoints:
            models[name], ckpt = cfg.load_model(run_folder(args.checkpoints, name))
            tokenizers.add(ckpt["tokenizer"])
        else:
            config = cfg.make_config(device="cpu", **ex.variant_flags(name))
            models[name] = cfg.fresh_model(config).eval()
            tokenizers.add(config.tokenizer)
    cfg.refuse([(len(tokenizers) > 1, f"--checkpoints {args.checkpoints}: the runs use "
                 f"different tokenizers ({', '.join(sorted(tokenizers))}); the traces need one")])
    return models, tokenizers.pop()


def check_budget(models, budget_mb):
    """ConfigError unless the budget's pool holds, for every model, a request as long as its
    context (the longest a trace can send)."""
    for name, model in models.items():
        try:
            Engine(model, EngineConfig(budget_mb=budget_mb)).add(
                [0] * (model.config.block_size - 1), SamplingParams(max_new_tokens=2))
        except ValueError as e:
            raise cfg.ConfigError(f"--budget_mb {budget_mb:g} is too small for {name}: {e}") \
                from None


def held_out_scenes(tokenizer, block_size):
    """Held-out dialogue scenes of the prepared Shakespeare corpus (prepared if need be)."""
    try:
        return dialogue_scenes(prepare(tokenizer=tokenizer), block_size, SCENES)
    except DataError as e:
        raise cfg.ConfigError(str(e)) from None


def speech_pairs(scenes):
    """(prompt speech, answer length) of every two speeches in a row."""
    return [(scene.tokens[s:e].tolist(), f - e) for scene in scenes
            for (s, e), (_, f) in zip(scene.speeches(), scene.speeches()[1:])]


def single_turn_trace(scenes, n, rate, rng):
    """n (arrival, prompt, new tokens): speech pairs, Poisson arrivals at rate (inf: all at 0)."""
    pairs, t, trace = speech_pairs(scenes), 0.0, []
    for _ in range(n):
        prompt, new = rng.choice(pairs)
        trace.append((t, prompt, new))
        t += 0.0 if rate == float("inf") else rng.expovariate(rate)
    return trace


def conversations(scenes, n, rng):
    """n conversations, each a scene's speeches as turns [(user speech, reply length)]: drawn
    from the scenes of two turns or more (all scenes if none has), each once while they last."""
    convs = []
    for scene in scenes:
        speech = [scene.tokens[s:e].tolist() for s, e in scene.speeches()]
        convs.append([(speech[i], len(speech[i + 1])) for i in range(0, len(speech) - 1, 2)])
    convs = [c for c in convs if len(c) > 1] or convs
    order = [i for _ in range(-(-n // len(convs))) for i in rng.sample(range(len(convs)),
                                                                        len(convs))]
    return [convs[i] for i in order[:n]]


def shared_prefix_trace(scenes, args, block_size, page_size, rng):
    """(arrival, prompt, new tokens, which preamble): one of --preambles preambles of whole pages
    (held-out text), a question of up to QUESTION tokens, ANSWER new tokens."""
    length = (block_size - QUESTION - ANSWER) // page_size * page_size
    text = [t for scene in scenes for t in scene.tokens.tolist()]
    preambles = [text[i * length:(i + 1) * length] for i in range(args.preambles)]
    pairs, t, trace = speech_pairs(scenes), 0.0, []
    for _ in range(args.shared):
        question = rng.choice(pairs)[0][:rng.randint(4, QUESTION)]
        k = rng.randrange(len(preambles))
        trace.append((t, preambles[k] + question, ANSWER, k))
        t += rng.expovariate(args.shared_rate)
    return trace


# -----------------------------------------------------------------------------
# replaying a trace


class SkipClock:
    """perf_counter with the idle time between arrivals skipped."""

    def __init__(self):
        self.skipped = 0.0

    def __call__(self):
        return time.perf_counter() + self.skipped

    def skip_to(self, t):
        self.skipped += max(0.0, t - self())


@dataclass
class Served:
    done: list             # the finished requests
    engine: Engine
    tags: dict             # request id -> the tag its arrival carried
    queued_seconds: float  # time in steps that left a request waiting (the pool was full)
    queued_tokens: int     # tokens those steps wrote
    queued_decodes: int    # decode steps among them
    queued_rows: int       # rows of those decode steps


def replay(model, budget_mb, arrivals, follow_up=None):
    """Serve arrivals [(time, prompt, new tokens, tag)] (times from 0) on a new engine;
    follow_up(request, tag) -> the next (delay, prompt, new tokens, tag) after a request
    finishes, or None. Returns what was Served."""
    clock = SkipClock()
    engine = Engine(model, EngineConfig(budget_mb=budget_mb), clock=clock)
    pending = [(clock() + t, i, prompt, new, tag) for i, (t, prompt, new, tag) in
               enumerate(arrivals)]
    heapq.heapify(pending)
    served, n = Served([], engine, {}, 0.0, 0, 0, 0), len(pending)
    while pending or engine.busy():
        while pending and pending[0][0] <= clock():
            t, _, prompt, new, tag = heapq.heappop(pending)
            served.tags[engine.add(prompt, SamplingParams(max_new_tokens=new), arrival=t).id] = tag
        if not engine.busy():
            clock.skip_to(pending[0][0])
            continue
        t0, tokens, prefills = clock(), engine.tokens_out, engine.prefill_steps
        for req in engine.step():
            served.done.append(req)
            nxt = follow_up and follow_up(req, served.tags[req.id])
            if nxt:
                delay, prompt, new, tag = nxt
                heapq.heappush(pending, (req.finished_at + delay, n, prompt, new, tag))
                n += 1
        if engine.scheduler.blocked:  # a request was left waiting: the pool was full
            served.queued_seconds += clock() - t0
            served.queued_tokens += engine.tokens_out - tokens
            if engine.prefill_steps == prefills:
                served.queued_decodes += 1
                served.queued_rows += engine.tokens_out - tokens
    return served


def percentile(values, q):
    """The q-th percentile (0..100) of values, nearest rank; None of none."""
    return sorted(values)[max(0, math.ceil(q / 100 * len(values)) - 1)] if values else None


def summarize(served):
    """What a replay reports (the module docstring), times in ms. saturated_tokens_per_sec and
    saturated_batch: the output tokens/s of the steps that left a request waiting for pages, and
    the mean rows of those that decoded: what the pool holds at once (None: none waited)."""
    done, engine = served.done, served.engine
    ttft = [1000 * (r.first_token_at - r.arrival) for r in done]
    tpot = [1000 * (r.finished_at - r.first_token_at) / (len(r.output) - 1) for r in done
            if len(r.output) > 1]
    span = max(r.finished_at for r in done) - min(r.arrival for r in done)
    m = engine.metrics()
    return {"requests": len(done), "output_tokens": sum(len(r.output) for r in done),
            "seconds": span, "tokens_per_sec": sum(len(r.output) for r in done) / span,
            "requests_per_sec": len(done) / span,
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
            "tpot_p50_ms": percentile(tpot, 50), "tpot_p99_ms": percentile(tpot, 99),
            "saturated_tokens_per_sec": served.queued_tokens / served.queued_seconds
            if served.queued_seconds else None,
            "saturated_batch": served.queued_rows / served.queued_decodes
            if served.queued_decodes else None,
            "hit_rate": m["hit_tokens"] / max(1, m["prompt_tokens"]), **m}


def warm_up(model, budget_mb):
    """A first request through the engine: the first calls of torch's kernels are slower."""
    replay(model, budget_mb, [(0.0, list(range(1, 40)), 8, None)] * 2)


# -----------------------------------------------------------------------------
# the workloads: the same trace for every variant, the variants in turn at each point


def single_turn(models, scenes, args):
    """{rates: labels, variants: {name: [summary per rate]}}."""
    out = {name: [] for name in models}
    for rate in args.rates:
        n = args.saturate if rate == float("inf") else args.requests
        trace = single_turn_trace(scenes, n, rate, random.Random(args.seed))
        for name, model in models.items():
            out[name].append(summarize(replay(model, args.budget_mb,
                                              [(*a, None) for a in trace])))
    return {"rates": [f"{r:g}" for r in args.rates], "variants": out}


def multi_turn(models, scenes, args, n, gap):
    """Each variant serves the same n conversations, starting `gap` s apart on average (Poisson;
    0: all in the first think time), a think time before each turn: {name: summary, with the
    TTFT p50 of the later turns (whose history may be cached)}."""
    rng = random.Random(args.seed)
    convs = conversations(scenes, n, rng)

    def draw(mean):
        return rng.expovariate(1 / mean) if mean else 0.0
    thinks = [[draw(args.think) for _ in c] for c in convs]
    starts = [0.0]
    for _ in convs[1:]:
        starts.append(starts[-1] + draw(gap))
    first = [(starts[c] + thinks[c][0], conv[0][0], conv[0][1], (c, 0))
             for c, conv in enumerate(convs)]

    def follow_up(req, tag):
        c, turn = tag
        if turn + 1 < len(convs[c]):
            speech, new = convs[c][turn + 1]
            return thinks[c][turn + 1], req.tokens + speech, new, (c, turn + 1)
        return None
    out = {}
    for name, model in models.items():
        served = replay(model, args.budget_mb, first, follow_up)
        later = [1000 * (r.first_token_at - r.arrival) for r in served.done
                 if served.tags[r.id][1] > 0]
        out[name] = {**summarize(served), "conversations": len(convs),
                     "later_ttft_p50_ms": percentile(later, 50)}
    return out


def shared_prefix(models, scenes, args):
    """Each variant serves the same shared-prefix trace: {name: summary, with the prefix hit
    rate after warm-up (every request but the first of its preamble) and the TTFT p50 of the
    requests that hit the cache and of those that missed it}."""
    block_size = min(m.config.block_size for m in models.values())
    trace = shared_prefix_trace(scenes, args, block_size, EngineConfig.page_size,
                                random.Random(args.seed))
    out = {}
    for name, model in models.items():
        served = replay(model, args.budget_mb, trace)
        seen, warm = set(), []
        for r in sorted(served.done, key=lambda r: r.arrival):
            if served.tags[r.id] in seen:
                warm.append(r)
            seen.add(served.tags[r.id])
        ttft = {hit: [1000 * (r.first_token_at - r.arrival) for r in served.done
                      if (r.cached_tokens > 0) == hit] for hit in (True, False)}
        out[name] = {**summarize(served),
                     "warm_hit_rate": sum(r.cached_tokens for r in warm)
                     / max(1, sum(len(r.prompt) for r in warm)),
                     "ttft_hit_p50_ms": percentile(ttft[True], 50),
                     "ttft_miss_p50_ms": percentile(ttft[False], 50)}
    return out


# -----------------------------------------------------------------------------
# the goals, tables, figure


def goals(doc):
    """The issue's goals as measured: [(goal, value, target, met)], value and met None where a
    variant is missing or a value is undefined. Single turn at the last (highest) rate."""
    single = {n: v[-1] for n, v in doc["single_turn"]["variants"].items()}
    light, busy = doc["multi_turn"]["light"], doc["multi_turn"]["busy"]
    rate = doc["single_turn"]["rates"][-1]

    def ratio(table, a, b, key, b_key=None):
        x, y = (table.get(a) or {}).get(key), (table.get(b) or {}).get(b_key or key)
        return x / y if x is not None and y else None
    rows = [(f"bdd / dec saturated output tokens/s, rate {rate}",
             ratio(single, "bdd", "dec", "saturated_tokens_per_sec"), ">=", 3),
            (f"bdd:kv1 / dec:kv1 saturated output tokens/s, rate {rate}",
             ratio(single, "bdd:kv1", "dec:kv1", "saturated_tokens_per_sec"), ">=", 2),
            ("multi-turn light: bdd / dec TTFT p50", ratio(light, "bdd", "dec", "ttft_p50_ms"),
             "<=", 1.3),
            ("multi-turn busy: bdd / dec conversations decoded at once, pool full",
             ratio(busy, "bdd", "dec", "saturated_batch"), ">=", 2.5),
            ("multi-turn busy: bdd / dec TPOT p99", ratio(busy, "bdd", "dec", "tpot_p99_ms"),
             "<=", 1)]
    for name, r in doc["shared_prefix"].items():
        rows += [(f"shared prefix: {name} hit rate after warm-up", r["warm_hit_rate"], ">", 0.9),
                 (f"shared prefix: {name} TTFT hit / miss", ratio(
                     doc["shared_prefix"], name, name, "ttft_hit_p50_ms", "ttft_miss_p50_ms"),
                  "<=", 0.5)]
    meets = {">=": lambda v, t: v >= t, ">": lambda v, t: v > t, "<=": lambda v, t: v <= t}
    return [(g, v, f"{op} {t:g}", None if v is None else meets[op](v, t)) for g, v, op, t in rows]


def fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def summary_row(label, r):
    return [label, fmt(r["tokens_per_sec"], ".0f"), fmt(r["saturated_tokens_per_sec"], ".0f"),
            fmt(r["requests_per_sec"], ".2f"),
            f"{fmt(r['ttft_p50_ms'])} / {fmt(r['ttft_p99_ms'])}",
            f"{fmt(r['tpot_p50_ms'])} / {fmt(r['tpot_p99_ms'])}",
            f"{r['peak_pages']} / {r['pages']}",
            f"{fmt(r['mean_decode_batch'])} / {fmt(r['saturated_batch'])}",
            fmt(100 * r["hit_rate"], ".0f"), r["evictions"], r["preemptions"]]


HEADER = ["variant", "out tok/s", "saturated", "req/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms",
          "peak pages", "batch / saturated", "hit %", "evict", "preempt"]


def tables(doc):
    """The report as text: a table per workload, then the goals."""
    single = doc["single_turn"]
    lines = [HEADER] + [summary_row(f"{name} @ {rate}/s", r) for name, rs in
                        single["variants"].items() for rate, r in zip(single["rates"], rs)]
    out = ["single turn, Poisson arrivals", ex.format_table(lines)]
    for load, results in doc["multi_turn"].items():
        lines = [HEADER + ["later TTFT p50"]] + [
            summary_row(name, r) + [fmt(r["later_ttft_p50_ms"])] for name, r in results.items()]
        out += [f"multi-turn, {load} ({next(iter(results.values()))['conversations']} "
                f"conversations)", ex.format_table(lines)]
    lines = [HEADER + ["warm hit %", "TTFT hit/miss ms"]] + [
        summary_row(name, r) + [fmt(100 * r["warm_hit_rate"], ".0f"),
                                f"{fmt(r['ttft_hit_p50_ms'])} / {fmt(r['ttft_miss_p50_ms'])}"]
        for name, r in doc["shared_prefix"].items()]
    out += ["shared prefix", ex.format_table(lines)]
    lines = [["goal", "measured", "target", "met"]] + [
        [g, fmt(v, ".3g"), t, "-" if met is None else "yes" if met else "no"]
        for g, v, t, met in doc["goals"]]
    return "\n\n".join(out + ["goals", ex.format_table(lines)])


def plot(doc, path):
    """serve_bench.png: single-turn output tokens/s against TTFT and TPOT p50, a point per rate."""
    plt = ex.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    names = list(doc["single_turn"]["variants"])
    for name, rs in doc["single_turn"]["variants"].items():
        color, marker = ex.variant_style(name, names)
        for ax, key in zip(axes, ("ttft_p50_ms", "tpot_p50_ms")):
            ax.plot([r["tokens_per_sec"] for r in rs], [r[key] for r in rs], marker + "-",
                    color=color, label=name)
    for ax, what in zip(axes, ("time to first token", "time per output token")):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{what}, p50 (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{what} against throughput, {doc['budget_mb']:g} MB of pages")
        ax.legend(fontsize=7)
    fig.tight_layout()
    ex.save_figure(fig, path)


# -----------------------------------------------------------------------------
# command line


def parse(argv):
    p = cli.Parser(description="Replay request traces against the serving engine, every variant "
                   "at the same memory budget.", allow_abbrev=False)
    given = cli.given_flags(cli.add_flags(p, BenchConfig).parse_args(argv), BenchConfig)
    config = BenchConfig(**{**(QUICK if given.get("quick") else {}), **given})
    files.usable_folder(config.out_dir, "out_dir")
    return config


def run(args, log=print):
    """The benchmark's document (what serve_bench.json holds)."""
    models, tokenizer = load_models(args)
    check_budget(models, args.budget_mb)
    scenes = held_out_scenes(tokenizer, min(m.config.block_size for m in models.values()))
    for model in models.values():
        warm_up(model, args.budget_mb)
    doc = {"settings": {**asdict(args), "rates": [f"{r:g}" for r in args.rates]},
           "budget_mb": args.budget_mb, "threads": torch.get_num_threads()}
    log(f"single turn: {len(args.rates)} rates x {args.requests} requests")
    doc["single_turn"] = single_turn(models, scenes, args)
    log(f"multi-turn: {args.light} and {args.busy} conversations")
    doc["multi_turn"] = {"light": multi_turn(models, scenes, args, args.light, args.light_gap),
                         "busy": multi_turn(models, scenes, args, args.busy, 0.0)}
    log(f"shared prefix: {args.shared} requests, {args.preambles} preambles")
    doc["shared_prefix"] = shared_prefix(models, scenes, args)
    doc["goals"] = goals(doc)
    return doc


def main(argv=None):
    with cli.guard("interrupted (Ctrl-C); serve_bench.json and serve_bench.png are written "
                   "whole or not at all"):
        started = time.time()
        args = parse(argv)
        threads, why = train.run_threads(cfg.make_config(threads=args.threads))
        torch.set_num_threads(threads)  # as train.py chooses: one per idle core
        print(f"{threads} thread(s) ({why}); --threads N chooses")
        with files.holding(args.out_dir, "experiment"):
            doc = run(args)
            print(tables(doc))
            print(ex.write_results(doc, args.out_dir, "serve_bench", plot, started))


if __name__ == "__main__":
    main()

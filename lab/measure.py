"""
What a model costs, measured on the live process: the experiments' measurements, each taken one
way for every experiment.

- measure_decode: greedy generation through generate.py's prefill and decode steps from
  random prompts; the cache bytes it holds, the time per decoded token, the FLOPs of one step;
- kv_by_context: decode-time cache bytes at several context lengths;
- serving: decode throughput by batch, and at a memory budget that each arch fills with as
  many sequences as the bytes it holds allow;
- multi_turn: conversations of several turns (serve.session.Session, the code path of --chat) served
  at the same budget, as many as each arch and prefix-cache policy holds: time to first token
  of each turn, decode throughput, held bytes, encoder tokens per turn;
- step_times: training steps timed in rounds that alternate between the archs;
- train_flops_per_token: a training step's FLOPs counted on a run's own batches;
- chat_eval: the loss on each speech of held-out dialogue scenes (dialogue_scenes), fed turn by
  turn through serve.session.Session as `sample.py --chat` runs, by turn position and overall.

Timings alternate between the archs round by round and report medians, so that the machine's
drift does not become a difference between archs.
"""

import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import config as cfg
import pack
import train
from corpus.download import DataError
from corpus.tokenizers import get_tokenizer
from lab.flops import decode_flops, step_flops
from generate import decode_steps
from serve.memory import held_bytes, nbytes
from serve.session import Session

DECODE_TOKENS = 32   # decode steps timed per measurement, fewer for short contexts
FLOP_BATCHES = 4     # real batches whose counted FLOPs are averaged (shapes vary for encdec)
# The serving benchmark per preset: decode batches 1, 2, 4, ... up to max_batch; by default the
# memory budget holds budget_sequences sequences of the arch that holds the most bytes per
# sequence (dec), so it fits any model; a budget given in MB may hold at most MAX_BUDGET_BATCHES
# times max_batch sequences of any arch.
SERVING = {"cpu": dict(budget_sequences=20, max_batch=64),
           "gpu": dict(budget_sequences=64, max_batch=256)}
MAX_BUDGET_BATCHES = 4
TURNS = 4  # turns per conversation of the multi-turn workload (fewer when block_size < 16)


def decode_tokens(context_len):
    """Tokens decoded (and timed) when a measurement holds context_len positions."""
    return max(1, min(DECODE_TOKENS, context_len // 4))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure_decode(model, context_len, batch_size=1, seed=0, count_flops=True):
    """Generate one turn (generate.py's prefill and decode steps, the code path a user runs) after random prompts of
    batch_size rows, so that context_len positions are fed after decode_tokens(context_len)
    greedy decode steps, and report from the live cache:
    held_bytes_per_seq: the bytes of every tensor the cache holds on the model's device, per
        row: what a server's batch is limited by (held_bytes: {device: bytes} of all rows);
    kv_bytes: the filled K/V bytes that decode steps read, all rows;
    prefix_bytes: the filled K/V bytes of bdd's encoder cache that a `keep` session would hold
        as well (measured on a prefill of the same prompts; generate() frees it);
    and the ms per decode step, the decoded tokens per second (all rows) and the FLOPs of one
    more step (unless count_flops is False)."""
    device = next(model.parameters()).device
    n_tokens = decode_tokens(context_len)
    assert 1 <= context_len - n_tokens and context_len < model.config.block_size, context_len
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(model.config.vocab_size, (batch_size, context_len - n_tokens),
                           generator=g).to(device)
    kept = nbytes(Session(model).turn(prompt, 1, temperature=0).cache)["prefix"]
    cache = model.new_cache()
    logits = model.prefill(prompt, cache)
    sync(device)
    t0 = time.perf_counter()
    tokens = decode_steps(model.decode, logits, cache, n_tokens + 1, dict(temperature=0))
    sync(device)
    seconds = time.perf_counter() - t0
    held = nbytes(cache)
    flops = decode_flops(model, tokens[:, -1:], cache) if count_flops else None
    return {"context_len": context_len, "kv_bytes": held["decode"], "prefix_bytes": kept,
            "held_bytes": held["held"],
            "held_bytes_per_seq": held["held"].get(str(device), 0) / batch_size,
            "flops": flops, "ms_per_token": 1000 * seconds / n_tokens,
            "tokens_per_sec": batch_size * n_tokens / seconds}


def context_lengths(block_size, n=6):
    """Context lengths (positions held) to measure, from short to block_size - 1."""
    lo = decode_tokens(block_size // 2) + 1
    return sorted({round(lo + (block_size - 1 - lo) * i / (n - 1)) for i in range(n)})


def check_measurable(block_size):
    """Every context the experiments measure at must hold a prompt of at least one token plus
    the decoded tokens, inside the model's context; ConfigError otherwise (checked before any
    training)."""
    contexts = context_lengths(block_size) + [block_size // 2]
    if not all(1 <= c - decode_tokens(c) and c < block_size for c in contexts):
        raise cfg.ConfigError(f"--block_size {block_size} is too small for the decode "
                              f"measurements (each context must hold a prompt of at least one "
                              f"token and the decoded tokens); use a larger --block_size")


def kv_by_context(models, block_size):
    """{arch: [{context_len, kv_bytes, prefix_bytes, held_bytes}]}, batch 1, at several contexts."""
    out = {arch: [] for arch in models}
    for n in context_lengths(block_size):
        for arch, model in models.items():
            m = measure_decode(model, n, count_flops=False)
            out[arch].append({"context_len": n, "kv_bytes": m["kv_bytes"],
                              "prefix_bytes": m["prefix_bytes"],
                              "held_bytes": m["held_bytes_per_seq"]})
    return out


# -----------------------------------------------------------------------------
# serving


def serving_budget(models, context_len, preset, kv_budget_mb=None, max_batch=None):
    """(budget in bytes, {arch: bytes held per sequence}, {arch: sequences in the budget}).
    Held bytes per sequence are measured at batch 1 (fresh or trained weights hold the same).
    Without kv_budget_mb the budget is the preset's budget_sequences of the arch that holds the
    most, so it fits any model; a given budget that holds no sequence, or far more than the
    benchmark's largest batch, is refused."""
    per_sequence = {arch: measure_decode(m, context_len, count_flops=False)["held_bytes_per_seq"]
                    for arch, m in models.items()}
    held = per_sequence.values()
    max_batch = max_batch or SERVING[preset]["max_batch"]
    limit = MAX_BUDGET_BATCHES * max_batch
    if kv_budget_mb is None:  # budget_sequences of the largest, within what the benchmark decodes
        budget = max(max(held), min(SERVING[preset]["budget_sequences"] * max(held),
                                    limit * min(held)))
    else:
        budget = kv_budget_mb * 1e6
    in_budget = {arch: int(budget // b) for arch, b in per_sequence.items()}
    for arch, n in in_budget.items():
        if kv_budget_mb is not None and not 1 <= n <= limit:
            raise cfg.ConfigError(
                f"--kv_budget_mb {kv_budget_mb:g} holds {n:,} {arch} sequences of "
                f"{per_sequence[arch] / 1e6:.3g} MB at context {context_len}: choose a budget "
                f"that holds 1 to {limit} (--serving_max_batch {max_batch} x "
                f"{MAX_BUDGET_BATCHES}), or leave it out to fit the model")
    return budget, per_sequence, in_budget


def serving(models, context_len, in_budget, max_batch, repeats):
    """Decode throughput (tokens/s over all rows) at context_len for batches 1, 2, 4, ... up to
    max_batch, and at each arch's largest batch in the budget (in_budget). Small batches decode
    for a few milliseconds, so they get more rounds (8x at batch 1). Returns ({batches},
    {arch: {tokens_per_sec (by batch), budget_batch, budget_tokens_per_sec}})."""
    batches = sorted({2 ** i for i in range(max_batch.bit_length())} | {max_batch})

    def throughput(batch_of):  # {arch: batch} -> {arch: median tokens/s}
        runs = {arch: [] for arch in models}
        for _ in range(repeats * max(1, 8 // max(batch_of.values()))):
            for arch, model in models.items():
                runs[arch].append(measure_decode(model, context_len, batch_of[arch],
                                                 count_flops=False)["tokens_per_sec"])
        return {arch: statistics.median(r) for arch, r in runs.items()}

    by_batch = [throughput(dict.fromkeys(models, b)) for b in batches]
    at_budget = throughput(in_budget)
    return batches, {arch: {"tokens_per_sec": [t[arch] for t in by_batch],
                            "budget_batch": in_budget[arch],
                            "budget_tokens_per_sec": at_budget[arch]} for arch in models}


# -----------------------------------------------------------------------------
# multi-turn serving


def conversation_shape(block_size):
    """(turns, tokens in, tokens out) of each conversation of the multi-turn workload: TURNS
    turns (fewer when block_size < 16), each n new tokens in and n out, n = block_size /
    (2 x turns), so that a conversation fills the context: 4 x (32 in + 32 out) at block_size
    256 (the cpu preset), 4 x (128 + 128) at 1024. Of the n out, the first comes from the
    turn's prefill, the others from n - 1 decode steps."""
    turns = max(1, min(TURNS, block_size // 4))
    n = block_size // (2 * turns)
    return turns, n, n


def multi_turn_cases(archs, device):
    """{name: (arch, prefix-cache policy)} that the workload serves: dec (one cache across the
    turns) and encdec (re-encodes the history each turn): the policy changes nothing for
    them; bdd keep and bdd drop, and bdd offload on CUDA."""
    offload = ("offload",) if torch.device(device).type == "cuda" else ()
    cases = {}
    for arch in archs:
        for policy in (("keep", "drop", *offload) if arch == "bdd" else ("keep",)):
            cases[f"bdd {policy}" if arch == "bdd" else arch] = (arch, policy)
    return cases


def session_held(session):
    """{device: bytes} of every tensor storage a Session holds: its cache, each row's tokens of
    the conversation, and the tokens sampled last (not yet fed)."""
    return held_bytes(session.cache.tensors() + session.rows + [session.pending])


@torch.no_grad()
def converse(model, policy, conversations, shape, seed=0):
    """Serve `conversations` greedy conversations of shape (turns, in, out) as one batched
    Session (the code path of sample.py --chat), from random prompts (the same ones for every
    model of a vocabulary). Returns (turns, cuda_peak). turns: per turn, ttft (seconds of its
    prefill: the time to its first token), decode_seconds, decoded (tokens from decode steps,
    all rows), encoded (columns its prefill ran through the encoder; dec: through all its
    layers) and held ({device: bytes} the session holds after the turn's decoding: the most it
    holds during the turn, since caches only grow while decoding, and what it holds until the
    next turn). cuda_peak: on CUDA, the most memory_allocated() rose above its start during
    the conversations (activations and logits included); None elsewhere."""
    turns, n_in, n_out = shape
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(seed)
    session = Session(model, prefix_cache=policy)
    out = []
    for _ in range(turns):
        prompts = torch.randint(model.config.vocab_size, (conversations, n_in), generator=g)
        gen = session.turn(prompts.to(device), n_out, temperature=0)
        out.append({"ttft": gen.prefill_seconds, "decode_seconds": gen.decode_seconds,
                    "decoded": conversations * (n_out - 1), "encoded": gen.encoded,
                    "held": session_held(session)})
    cuda_peak = torch.cuda.max_memory_allocated() - start if cuda else None
    return out, cuda_peak


def multi_turn_plan(models, budget):
    """The multi-turn workload at a held-bytes budget (the one-turn benchmark's): {shape,
    budget_bytes, cases: {name: {arch, policy, held_bytes_per_conv, conversations}}}. Each case's
    held bytes per conversation are the most one conversation alone holds on the model's device
    after any of its turns (greedy, no stop token: fresh or trained weights hold the same); the
    budget holds budget // that of them. ConfigError when a case fits none."""
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    shape = conversation_shape(first.config.block_size)
    cases = {}
    for name, (arch, policy) in multi_turn_cases(models, device).items():
        turns, _ = converse(models[arch], policy, 1, shape)
        held = max(t["held"].get(str(device), 0) for t in turns)
        cases[name] = {"arch": arch, "policy": policy, "held_bytes_per_conv": held,
                       "conversations": int(budget // held)}
        if not cases[name]["conversations"]:
            raise cfg.ConfigError(
                f"the serving budget of {budget / 1e6:.3g} MB holds no {name} conversation of "
                f"{shape[0]} turns ({held / 1e6:.3g} MB held at its peak): give a larger "
                f"--kv_budget_mb")
    return {"shape": shape, "budget_bytes": budget, "cases": cases}


def multi_turn(models, plan, repeats):
    """The multi-turn workload of `plan` (multi_turn_plan): each case's conversations served
    together as one batch, `repeats` rounds alternating between the cases. Returns {turns,
    tokens_in, tokens_out, budget_bytes, rounds, cases: {name: the plan's case and what its
    batch measured}}: held and host bytes per conversation after each turn (the first round;
    host: in host memory while the model is on a GPU, offload's encoder cache), the encoder
    tokens of each turn, the time to first token of each turn (median of the rounds, ms), their
    mean, and decode tokens/s over all conversations and turns (median of the rounds); on CUDA
    the peak of memory_allocated() per conversation."""
    device = str(next(next(iter(models.values())).parameters()).device)
    rounds = {name: [] for name in plan["cases"]}
    for _ in range(repeats):
        for name, case in plan["cases"].items():
            rounds[name].append(converse(models[case["arch"]], case["policy"],
                                         case["conversations"], plan["shape"]))
    turns, n_in, n_out = plan["shape"]
    return {"turns": turns, "tokens_in": n_in, "tokens_out": n_out,
            "budget_bytes": plan["budget_bytes"], "rounds": repeats,
            "cases": {name: {**case, **summary(rounds[name], case["conversations"], device)}
                      for name, case in plan["cases"].items()}}


def summary(rounds, conversations, device):
    """What multi_turn reports of one case's rounds [(turns, cuda_peak)] of `conversations`."""
    (first, cuda_peak), per_conv = rounds[0], lambda n: n / conversations
    ttft = [1000 * statistics.median(turns[k]["ttft"] for turns, _ in rounds)
            for k in range(len(first))]
    on_host = [0 if device == "cpu" else t["held"].get("cpu", 0) for t in first]
    return {"held_bytes_per_conv_by_turn": [per_conv(t["held"].get(device, 0)) for t in first],
            "host_bytes_per_conv_by_turn": [per_conv(n) for n in on_host],
            "encoded_per_turn": [t["encoded"] for t in first],
            "ttft_ms_per_turn": ttft, "mean_ttft_ms": statistics.mean(ttft),
            "decode_tokens_per_sec": statistics.median(
                sum(t["decoded"] for t in turns) / sum(t["decode_seconds"] for t in turns)
                for turns, _ in rounds),
            "cuda_peak_bytes_per_conv": None if cuda_peak is None else per_conv(cuda_peak)}


# -----------------------------------------------------------------------------
# training


def random_batch(config, gen):
    """A training batch of config's arch from random tokens (its randomness from gen)."""
    enc = get_tokenizer(config.tokenizer)
    w = torch.randint(enc.n_vocab, (config.batch_size, config.block_size + 1), generator=gen)
    batch = pack.build_batch(config.arch, w, gen, config.objective, config.max_blocks,
                             enc.n_vocab, enc.eot_token, config.block_layouts, config.boundaries)
    return {k: v.to(config.device) for k, v in batch.items()}


def step_times(configs, repeats):
    """{arch: {train_step_ms, train_step_tokens_per_sec}}: one forward and backward per arch,
    timed in rounds that alternate between the archs (4 x repeats rounds after a warm-up round;
    the median). Each round draws fresh windows and a fresh draw of each arch's randomness
    (bdd's block layouts, encdec's split points), as training does: a step's cost depends on
    them."""
    models = {arch: cfg.fresh_model(c).train() for arch, c in configs.items()}
    times = {arch: [] for arch in configs}
    for r in range(4 * repeats + 1):  # round 0 warms up
        for arch, c in configs.items():
            batch = random_batch(c, torch.Generator().manual_seed(c.seed + r))
            t0 = time.perf_counter()
            with cfg.autocast(c):
                loss = models[arch](batch)[1]
            loss.backward()
            sync(c.device)
            times[arch].append(time.perf_counter() - t0)
            models[arch].zero_grad(set_to_none=True)
    return {arch: {"train_step_ms": 1000 * statistics.median(times[arch][1:]),
                   "train_step_tokens_per_sec": c.batch_size * c.block_size /
                   statistics.median(times[arch][1:])} for arch, c in configs.items()}


def train_flops_per_token(config, log=print):
    """FLOPs per training token of one step, forward and backward, counted on the run's first
    FLOP_BATCHES real batches (its data, shape and seed; encdec's padded lengths and bdd's
    blocks vary per batch, so the mean).

    Counted on the eager step without FlexAttention, as CPU runs train: bdd attends block by
    block to the keys each block may see, and its encoder skips the last block (no decoder reads
    it). A compiled or FlexAttention GPU run computes the masked T x 2T attention and the encoder
    over the whole row instead (torch would count flex as dense), so for it the count is the work
    the step needs rather than all that its kernels do."""
    batches = train.load_batches(config, log=lambda line: None)
    size = batches.meta["tokens"]["train"]
    tokens_per_iter = config.batch_size * config.gradient_accumulation_steps * config.block_size
    passes = config.max_iters * tokens_per_iter / size
    if passes > 4:
        log(f"note: {config.out_dir} reads the {size:,}-token training split {passes:.0f} times; "
            f"expect overfitting there: give a larger corpus with --data")
    model = cfg.fresh_model(replace(config, flex=False)).train()
    total = sum(step_flops(model, train.to_device(batches.get_batch("train"), config.device),
                           cfg.autocast(config)) for _ in range(FLOP_BATCHES))
    return total / (FLOP_BATCHES * config.batch_size * config.block_size)


# -----------------------------------------------------------------------------
# multi-turn chat, measured turn by turn


@dataclass
class Scene:
    """A held-out dialogue: tokens (L,) and its turn starts, starts[0] == 0. Speech k is
    tokens[starts[k]:starts[k + 1]] (the last one runs to the end), at least 2 tokens long."""
    tokens: torch.Tensor
    starts: list

    def speeches(self):
        """(start, end) of each speech."""
        return list(zip(self.starts, self.starts[1:] + [len(self.tokens)]))


def dialogue_scenes(meta, block_size, n, split="val"):
    """Up to n dialogue scenes of a prepared dataset's split (its turn starts, corpus/prepare.py): each
    starts at a turn start and holds as many whole speeches as fit in block_size + 1 tokens (a
    chat feeds every token but the last), at least 2, inside one document, each at least 2
    tokens long. The scenes start at evenly spaced ones of the turn starts that begin such a run,
    so every run, seed and arch is scored on the same scenes. DataError if there is none."""
    folder = Path(meta["dir"])
    data = np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r")
    counts = meta.get("turns") or {}
    turns = (np.memmap(folder / f"{split}.turns", dtype=np.int64, mode="r") if counts.get(split)
             else np.empty(0, dtype=np.int64))
    ends = np.flatnonzero(data == meta["eot"])  # documents end at their eot
    runs = []  # (index of a scene's first turn start, of the turn start that ends it)
    for i, start in enumerate(turns.tolist()):
        last = int(np.searchsorted(turns, start + block_size + 1, "right")) - 1
        after = np.searchsorted(ends, start)  # the eot that ends the speech's document
        doc_end = ends[after] if after < len(ends) else len(data)
        last = min(last, int(np.searchsorted(turns, doc_end, "right")) - 1)
        short = np.flatnonzero(np.diff(turns[i:last + 1]) < 2)
        if short.size:
            last = i + int(short[0])
        if last - i >= 2:
            runs.append((i, last))
    if not runs:
        why = ("it has no turn starts there" if not len(turns) else
               f"no two whole speeches in a row fit in block_size {block_size} + 1 tokens")
        raise DataError(f"the chat evaluation needs dialogue scenes from the {split} split of "
                        f"{meta['name']}, but {why}; give a corpus with turns (--turn_regex) or "
                        f"a larger --block_size")
    picked = sorted({round(x) for x in np.linspace(0, len(runs) - 1, min(n, len(runs)))})
    scenes = []
    for i, last in (runs[p] for p in picked):
        begin = int(turns[i])
        tokens = torch.from_numpy(data[begin:int(turns[last])].astype(np.int64))
        scenes.append(Scene(tokens, [int(t) - begin for t in turns[i:last]]))
    return scenes


class ForcedSession(Session):
    """A Session whose replies are given (teacher forcing): turn() runs as `sample.py --chat`
    runs it, the same prefill and cache handling, and each decode step feeds the given reply's
    next token where Session feeds a sampled one. Each turn's logits (B, G, vocab), the model's
    predictions of its reply, are kept in `logits`."""

    def __init__(self, model, prefix_cache="keep"):
        super().__init__(model, prefix_cache=prefix_cache)
        self.reply, self.logits = None, []

    def forced_turn(self, prompt, reply):
        """Feed prompt (B, n), then reply (B, G) as if sampled: the reply's losses (B, G), nats
        per token."""
        self.reply = reply
        self.turn(prompt, reply.shape[1])
        return F.cross_entropy(self.logits[-1].double().transpose(1, 2), reply, reduction="none")

    def _sample(self, logits, max_new_tokens, stop_tokens, sampling):
        """Session._sample's decode loop with the reply in place of samples (no stop tokens)."""
        steps = [logits]
        for i in range(max_new_tokens - 1):
            steps.append(self.model.decode(self.reply[:, i:i + 1], self.cache.decoder))
        self.logits.append(torch.stack(steps, 1))
        return self.reply, [max_new_tokens] * self.reply.shape[0]


def chat_losses(model, scene, prefix_cache="keep"):
    """The loss (nats) of each token of each speech of a scene given the whole history, one
    tensor (end - start - 1,) per speech: each speech is a turn of a ForcedSession, as in
    `sample.py --chat`. A turn's prompt is the speech's first token, so bdd's decoder block
    starts there (at the turn start, where `--boundaries turns` trains one), dec extends its cache
    and encdec re-encodes the history before it; the rest of the speech is the reply, each token
    scored from the logits of the step before it. The first token of a speech is the prompt:
    not scored (its logits belong to the previous turn, which Session never computes)."""
    assert not model.training, "dropout would make the losses random: call model.eval()"
    x = scene.tokens.to(next(model.parameters()).device)
    session = ForcedSession(model, prefix_cache)
    return [session.forced_turn(x[s:s + 1].view(1, 1), x[s + 1:e].view(1, -1))[0]
            for s, e in scene.speeches()]


def chat_eval(model, scenes, prefix_cache="keep"):
    """The chat loss of a model on dialogue scenes (chat_losses): {"loss": nats per scored token
    over all speeches, "tokens", "scenes", "by_turn": [{"turn": k, "loss", "speeches", "tokens"}]
    for the k-th speech of the scenes that have one, k = 1, 2, ...}. Means are over tokens.
    An encdec model trained with span corruption is scored in the prefix form, as the
    continuation loss scores it (`--chat` would prompt it T5-style, with a sentinel)."""
    by_turn = []  # [sum of the losses, tokens, speeches] of the k-th speeches
    for scene in scenes:
        for k, losses in enumerate(chat_losses(model, scene, prefix_cache)):
            if k == len(by_turn):
                by_turn.append([0.0, 0, 0])
            by_turn[k][0] += losses.double().sum().item()
            by_turn[k][1] += losses.numel()
            by_turn[k][2] += 1
    return {"loss": sum(t[0] for t in by_turn) / sum(t[1] for t in by_turn),
            "tokens": sum(t[1] for t in by_turn), "scenes": len(scenes),
            "by_turn": [{"turn": k + 1, "loss": total / n, "speeches": count, "tokens": n}
                        for k, (total, n, count) in enumerate(by_turn)]}


def run_dialogue(config, n, log=print):
    """The n held-out dialogue scenes an experiment's runs are scored on ([] for n = 0), their
    data prepared (or found) with a `turns` run's checks, so that a corpus without turns is
    refused before anything trains."""
    if not n:
        return []
    probe = cfg.TrainConfig(**{**asdict(config), "arch": "bdd", "boundaries": "turns"})
    return dialogue_scenes(train.load_batches(probe, log=log).meta, config.block_size, n)


def run_chat_eval(name, config, scenes):
    """chat_eval of the model a finished run saved, under the run's autocast."""
    print(f"== chat loss of {name} on {len(scenes)} scenes ==", flush=True)
    model = cfg.load_model(config.out_dir, config.device)[0]
    with cfg.autocast(config):
        return chat_eval(model, scenes)

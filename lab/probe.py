"""
Probes of what a smaller KV cache costs: in-context copying and multi-query associative recall
(MQAR; Arora et al. 2023, "Zoology: measuring and improving recall in efficient language
models"), for every arch. bdd's decoder sees earlier blocks only through the encoder's final
states; these probes ask what that costs where a model must find an earlier token.

    python -m lab.probe --mqar               # dec, encdec, bdd trained per length; accuracy by pairs
    python -m lab.probe --mqar --variants    # also dec with kv_share 2, bdd with n_kv_head 1
    python -m lab.probe --copy out/compare/dec out/compare/bdd    # checkpoints' copy probe

MQAR: a row of L + 1 tokens (inputs L, targets L) holds D key-value pairs, filler, then the D keys
again in a random order, each followed by its value. The loss is on those values only (the
answers), as in Zoology: every other token is random. One model per arch and length is trained
from scratch on an even mix of the pair counts, through train.train() on the task's rows (a
prepared dataset of fixed-length rows, corpus/rows.py); accuracy is top-1 over the whole
vocabulary on held-out rows (the val split), per pair count. bdd trains with the default random
boundaries and is evaluated twice: with its block starting at the first query (prompt = the pairs
and filler, answers generated) and with random boundaries (1 to 7 per row).

Copy: random strings A of n ordinary tokens of a checkpoint's tokenizer (no eot, no sentinels),
fed as A A through the KV-cached inference path (model.prefill, then model.decode of each true
next token: teacher forcing); loss and top-1 accuracy on the second copy from its second token
(its first cannot be known), by n and by offset in the copy (offset j: the target is the j-th
token of the copy and its source n tokens back). bdd and encdec are prefilled with their block
(encdec: its decoder) starting at the first copy's last token ("end": the prompt is A, then A is
generated) and, separately, at the middle of the first copy ("inside"); dec's logits do not
depend on where its prefill stops ("end" only).

Written to --out_dir (default out/probes): probes.json and probes.png (each mode replaces its own
section and keeps the other's), the tables printed. The task's rows and the runs live beside them.
"""

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cli
import config as cfg
from lab import experiment as ex
import files
import pack
from corpus.rows import is_rows, write_rows
from corpus.tokenizers import get_tokenizer
from mask import block_ids
from model import ARCHS

# The task (see the module docstring). Byte tokens: keys, values and filler are byte ids below
# VOCAB. A tiny model learns recall here only after a plateau (it first learns to copy some value
# of the row, or to rule out the values already answered): the one-pair rows of the mix are its
# stepping stone, and rows of 64 tokens need several times the steps that fit in the budget.
VOCAB = 64
PAIRS = (1, 2, 3, 4)
LENGTHS = (16, 32)
EVAL_ROWS = 256  # held-out rows per pair count and length
SEED = 1234      # of the task's rows; the val split draws from its own stream
# The tiny model and its training, the same for every arch and length; any train.py flag
# overrides it. Recall appears after about 500 steps at length 16 and 2,000 at length 32.
RECIPE = dict(tokenizer="byte", n_layer=2, n_head=2, n_embd=64, dropout=0.0, batch_size=64,
              gradient_accumulation_steps=1, max_iters=3000, learning_rate=3e-3, min_lr=3e-4,
              warmup_iters=50, weight_decay=0.1, beta2=0.99, eval_interval=500, eval_iters=4,
              log_interval=100)
# --variants: the model's cache-cutting options on the archs that take them
VARIANTS = {"dec_kv_share2": ("dec", {"kv_share": 2}), "bdd_n_kv_head1": ("bdd", {"n_kv_head": 1})}
COPY_SAMPLES = 64
COPY_BATCH = 64  # strings scored at a time: memory holds one batch's cache and one step's logits


# -----------------------------------------------------------------------------
# MQAR: the task


def check_task(vocab, pairs, lengths):
    """ConfigError unless every pair count fits every length and the vocabulary holds enough
    distinct keys."""
    pair, length = next(((d, n) for n in lengths for d in pairs if 4 * d > n + 1), (None, None))
    cfg.refuse([(pair is not None, f"--pairs {pair} does not fit --lengths {length}: D pairs and "
                 f"their D queries take 4 D tokens of the L + 1; use at most "
                 f"{((length or 0) + 1) // 4} pairs, or a longer length"),
                (max(pairs) > vocab // 2, f"--vocab {vocab} has {vocab // 2} keys, too few for "
                 f"{max(pairs)} distinct keys per row; raise --vocab to {2 * max(pairs)} or use "
                 f"fewer --pairs")])


def mqar_rows(n, length, pairs, vocab, rng):
    """n rows of the task, (tokens, loss) arrays (n, length + 1): `pairs` key-value pairs, then
    filler in which the keys come again in a random order, each followed by its value, at random
    places (queries in `pairs` of the (length + 1 - 2 pairs) // 2 two-token slots after the
    pairs, as in Zoology); loss True at those values (the answers). Keys are distinct within a
    row, from [0, vocab/2); values (with repeats) and filler from [vocab/2, vocab)."""
    half = vocab // 2
    keys = rng.random((n, half)).argsort(1)[:, :pairs]  # a random `pairs`-subset, in random order
    values = rng.integers(half, vocab, (n, pairs))
    order = rng.random((n, pairs)).argsort(1)
    slots = (length + 1 - 2 * pairs) // 2
    chosen = np.sort(rng.random((n, slots)).argsort(1)[:, :pairs], axis=1)
    queries = 2 * pairs + 2 * chosen  # (n, pairs) positions, increasing
    tokens = rng.integers(half, vocab, (n, length + 1))
    tokens[:, 0:2 * pairs:2], tokens[:, 1:2 * pairs:2] = keys, values
    np.put_along_axis(tokens, queries, np.take_along_axis(keys, order, 1), 1)
    np.put_along_axis(tokens, queries + 1, np.take_along_axis(values, order, 1), 1)
    loss = np.zeros(tokens.shape, dtype=bool)
    np.put_along_axis(loss, queries + 1, True, 1)
    return tokens, loss


def task_splits(length, pairs, vocab, train_rows, eval_rows, seed):
    """{"train": an even mix of the pair counts, shuffled; "val": eval_rows per pair count, in
    the order of `pairs`}, each (tokens, loss); train and val from independent streams."""
    train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(
        [seed, length, vocab, *pairs]).spawn(2))
    per = -(-train_rows // len(pairs))
    parts = [mqar_rows(per, length, d, vocab, train_rng) for d in pairs]
    order = train_rng.permutation(per * len(pairs))
    train = tuple(np.concatenate(a)[order] for a in zip(*parts))
    val = tuple(np.concatenate(a) for a in zip(*(mqar_rows(eval_rows, length, d, vocab, val_rng)
                                                  for d in pairs)))
    return {"train": train, "val": val}


def write_task(folder, about):
    """The task's rows in folder (write_rows), unless it already holds these; returns the
    held-out rows {pairs: (tokens, loss)}."""
    splits = task_splits(about["length"], about["pairs"], about["vocab"], about["train_rows"],
                         about["eval_rows"], about["seed"])
    meta = Path(folder) / "meta.json"
    if not (is_rows(folder) and json.loads(meta.read_text()).get("about") == about):
        write_rows(folder, splits, "byte", f"mqar_L{about['length']}", about)
    n, (tokens, loss) = about["eval_rows"], splits["val"]
    return {d: (tokens[i * n:(i + 1) * n], loss[i * n:(i + 1) * n])
            for i, d in enumerate(about["pairs"])}


# -----------------------------------------------------------------------------
# MQAR: evaluation


@torch.no_grad()
def answer_accuracy(model, arch, tokens, loss, boundaries="prompt", batch=256):
    """Top-1 accuracy over the answers of rows (tokens, loss) (n, T+1), uncached forward. bdd:
    its block starting at the first query ("prompt") or random boundaries ("random", 1 to 7 per
    row from a fixed generator); encdec encodes the prompt and decodes the queries."""
    gen = torch.Generator().manual_seed(pack.EVAL_SEED)
    hits = total = 0
    for i in range(0, len(tokens), batch):
        w = torch.from_numpy(tokens[i:i + batch].astype(np.int64))
        b = pack.row_batch(arch, w, torch.from_numpy(loss[i:i + batch]), gen, max_blocks=8,
                           eot=get_tokenizer("byte").eot_token, boundaries="random")
        if arch == "bdd" and boundaries == "prompt":
            b["block_ids"] = prompt_blocks(b["y"])
        device = next(model.parameters()).device
        logits = model({k: v.to(device) for k, v in b.items()})[0]
        y = b["y"].to(device)
        answers = y != -1
        hits += (logits.argmax(-1)[answers] == y[answers]).sum().item()
        total += answers.sum().item()
    return hits / total


def prompt_blocks(y):
    """bdd block ids (B, T): one block for the prompt, the next from the first query on."""
    return block_ids(y.shape[1], [[p] for p in pack.prompt_lengths(y).tolist()])


# -----------------------------------------------------------------------------
# the copy probe


def copy_strings(n, samples, tokenizer, gen):
    """(samples, 2n): random strings A of n ordinary tokens (any id of the tokenizer but eot),
    each as A A."""
    enc = get_tokenizer(tokenizer)
    a = torch.randint(enc.n_vocab - 1, (samples, n), generator=gen)
    a += (a >= enc.eot_token).long()  # the ids after eot move up one: eot is never drawn
    return torch.cat([a, a], dim=1)


@torch.no_grad()
def cached_steps(model, seq, start):
    """Next-token logits (B, vocab) at positions start..T-2 of seq (B, T), one position at a time,
    through the KV cache: prefill seq[:, :start+1] (bdd's block and encdec's decoder start at
    `start`), then decode each true next token."""
    cache = model.new_cache()
    yield model.prefill(seq[:, :start + 1], cache)
    for t in range(start + 1, seq.shape[1] - 1):
        yield model.decode(seq[:, t:t + 1], cache)


def cached_logits(model, seq, start):
    """All of cached_steps, stacked: (B, T-1-start, vocab)."""
    return torch.stack(list(cached_steps(model, seq, start)), dim=1)


@torch.no_grad()
def uncached_logits(model, arch, seq, start):
    """What cached_logits returns, from the training forward with the same split."""
    x = seq[:, :-1]
    if arch == "encdec":
        return model({"enc_x": x[:, :start], "dec_x": x[:, start:]})[0]
    batch = {"x": x} if arch == "dec" else {"x": x, "block_ids": block_ids(x.shape[1], [start])}
    return model(batch)[0][:, start:]


def copy_scores(logits, seq, start):
    """Loss and top-1 accuracy of the second copy of seq (B, 2n) from its second token, from
    logits at positions start..2n-2; and both by offset 1..n-1 in the copy."""
    n = seq.shape[1] // 2
    pred, target = logits[:, n - start:].float(), seq[:, n + 1:]  # positions n..2n-2
    nll = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")  # (B, n-1)
    return scores(nll, (pred.argmax(-1) == target).float())


def scores(nll, hit):
    """copy_scores from the loss and the hits (B, n-1) of the second copy."""
    return {"n": nll.shape[1] + 1, "loss": nll.mean().item(), "accuracy": hit.mean().item(),
            "loss_by_offset": nll.mean(0).tolist(), "accuracy_by_offset": hit.mean(0).tolist()}


def streamed_scores(model, seq, start):
    """copy_scores of seq through cached_steps, each step scored as it comes, so that memory
    holds one step's logits, not the whole copy's: (nll, hit), each (B, n-1)."""
    n, nll, hit = seq.shape[1] // 2, [], []
    for position, logits in enumerate(cached_steps(model, seq, start), start):
        if position >= n:  # the second copy from its second token: targets n+1..2n-1
            target = seq[:, position + 1]
            nll.append(F.cross_entropy(logits.float(), target, reduction="none"))
            hit.append((logits.argmax(-1) == target).float())
    return torch.stack(nll, 1), torch.stack(hit, 1)


def copy_starts(arch, n):
    """Where the prefill stops: {split: start position}."""
    return {"end": n - 1} if arch == "dec" else {"end": n - 1, "inside": n // 2}


def copy_probe(out_dir, lengths, samples, device):
    """The copy probe of one checkpoint: {dir, arch, tokenizer, block_size, splits: {split:
    [scores per n]}}. Strings go through the model COPY_BATCH at a time, each step scored as it
    comes, so that memory does not grow with --copy_samples (a slice of the same draws)."""
    model, ckpt = cfg.load_model(out_dir, device)
    lengths = copy_lengths(lengths, model.config.block_size, out_dir)
    gen = torch.Generator().manual_seed(SEED)
    splits = {}
    for n in lengths:
        starts = copy_starts(ckpt["arch"], n)
        parts = {split: [] for split in starts}
        for done in range(0, samples, COPY_BATCH):
            count = min(COPY_BATCH, samples - done)
            seq = copy_strings(n, count, ckpt["tokenizer"], gen).to(device)
            for split, start in starts.items():
                parts[split].append(streamed_scores(model, seq, start))
        for split, batches in parts.items():
            splits.setdefault(split, []).append(scores(*(torch.cat(b) for b in zip(*batches))))
    return {"dir": str(out_dir), "arch": ckpt["arch"], "tokenizer": ckpt["tokenizer"],
            "block_size": model.config.block_size, "iter_num": ckpt["iter_num"],
            "splits": splits}


def copy_lengths(lengths, block_size, out_dir):
    """The string lengths n to probe a model of block_size with (strings A A: 2n tokens): the
    given ones, else 8, 16, ... up to half the context (half of a context under 16); ConfigError
    if one does not fit, or the context holds no copy of two tokens."""
    default = [2 ** k for k in range(3, 20) if 2 ** (k + 1) <= block_size] or [block_size // 2]
    lengths = lengths or default
    too_long = [n for n in lengths if 2 * n > block_size]
    cfg.refuse([(block_size < 4, f"--copy {out_dir} holds a model of block_size {block_size}, "
                 f"too short for the copy probe (strings A A of at least 2 tokens each)"),
                (too_long, f"--copy_lengths {too_long and too_long[0]}: {out_dir} holds a "
                 f"model of block_size {block_size}, which reads strings A A of at most "
                 f"{block_size // 2} tokens each")])
    return lengths


# -----------------------------------------------------------------------------
# MQAR: the runs


def plan(args, flags):
    """({length: (task folder, about)}, runs): per length, the task's rows and one run per arch
    (and variant), L<length>_<name> in out_dir, trained on them with RECIPE and the flags."""
    names = {arch: (arch, {}) for arch in ex.parse_archs(args.archs)}
    if args.variants:
        names.update({v: spec for v, spec in VARIANTS.items() if spec[0] in names})
    tasks, runs = {}, []
    for length in args.lengths:
        folder = os.path.join(args.out_dir, f"task_L{length}")
        runs += [ex.make_run(f"L{length}_{name}", {**flags, **options, "arch": arch,
                                                   "data": folder, "block_size": length},
                             args.out_dir, RECIPE, length=length, variant=name)
                 for name, (arch, options) in names.items()]
        # about one pass over the training rows in the longest run
        train_rows = max(r.config.max_iters * r.config.batch_size *
                         r.config.gradient_accumulation_steps for r in runs)
        tasks[length] = folder, {"length": length, "pairs": list(args.pairs), "vocab": args.vocab,
                                 "train_rows": train_rows, "eval_rows": args.eval_rows, "seed": SEED}
    return tasks, runs


def mqar(args, flags):
    """Write the tasks, train (or resume, or skip) every run, and score each on the held-out
    rows: the MQAR section of probes.json."""
    t_start = time.time()
    tasks, runs = plan(args, flags)
    held_out = {length: write_task(*task) for length, task in tasks.items()}
    done = ex.execute(runs)
    print("== scoring the answers of the held-out rows ==", flush=True)
    scored = []
    for d in done:
        c, length = d.run.config, d.run.labels["length"]
        model = cfg.load_model(c.out_dir, c.device)[0]
        accuracy = {str(p): answer_accuracy(model, c.arch, *rows)
                    for p, rows in held_out[length].items()}
        scored.append({"name": d.run.name, "arch": c.arch, "variant": d.run.labels["variant"],
                       "length": length, "n_kv_head": model.config.n_kv_head,
                       "kv_share": model.config.kv_share,
                       "non_embedding_params": d.history["non_embedding_params"],
                       "train_tokens": d.history["train_tokens"],
                       "train_time": d.history["train_time"],
                       "val_loss": d.history["curve"][-1]["val_loss"], "accuracy": accuracy})
        if c.arch == "bdd":
            scored[-1]["accuracy_random_boundaries"] = {
                str(p): answer_accuracy(model, c.arch, *rows, boundaries="random")
                for p, rows in held_out[length].items()}
    first = runs[0].config
    return {"task": {k: v for k, v in tasks[args.lengths[0]][1].items() if k != "length"} |
            {"lengths": list(args.lengths)},
            "recipe": {k: getattr(first, k) for k in RECIPE},
            "bdd_training_boundaries": first.boundaries, "runs": scored,
            "wall_time": time.time() - t_start}


# -----------------------------------------------------------------------------
# report: tables, figure


def mqar_table(section):
    """Accuracy by pair count, one block of rows per length."""
    pairs = section["task"]["pairs"]
    lines = [["run", *[f"{p} pairs" for p in pairs]]]
    for r in section["runs"]:
        label = f"L{r['length']} {r['variant']}" + (", block at the queries"
                                                     if r["arch"] == "bdd" else "")
        lines.append([label, *[f"{r['accuracy'][str(p)]:.3f}" for p in pairs]])
        if "accuracy_random_boundaries" in r:
            lines.append([f"L{r['length']} {r['variant']}, random blocks",
                          *[f"{r['accuracy_random_boundaries'][str(p)]:.3f}" for p in pairs]])
    return ex.format_table(lines)


def copy_table(section):
    """Loss / accuracy of the second copy by n, a row per checkpoint and split."""
    entries = [(c, split, scores) for c in section["checkpoints"]
               for split, scores in c["splits"].items()]
    ns = sorted({s["n"] for _, _, scores in entries for s in scores})
    lines = [["checkpoint, prefill", *[f"n={n}" for n in ns]]]
    for c, split, scores in entries:
        by_n = {s["n"]: f"{s['loss']:.2f} / {s['accuracy']:.2f}" for s in scores}
        lines.append([f"{c['dir']} ({c['arch']}), {split}", *[by_n.get(n, "-") for n in ns]])
    return ex.format_table(lines) + "\n(loss in nats / top-1 accuracy, second copy from its " \
                                    "second token)"


def plot(results, path):
    """probes.png: MQAR accuracy against pairs, a panel per length; copy loss against n."""
    plt = ex.pyplot()
    lengths = results["mqar"]["task"]["lengths"] if "mqar" in results else []
    panels = len(lengths) + ("copy" in results)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        plot_mqar(ax, results["mqar"], length)
    if "copy" in results:
        plot_copy(axes[0][-1], results["copy"])
    fig.tight_layout()
    ex.save_figure(fig, path)
    return fig


def plot_mqar(ax, section, length):
    pairs = section["task"]["pairs"]
    for r in (r for r in section["runs"] if r["length"] == length):
        color = ex.ARCH_COLORS[r["arch"]]
        ls = "-" if r["variant"] == r["arch"] else ":"
        ax.plot(pairs, [r["accuracy"][str(p)] for p in pairs], "o" + ls, color=color,
                label=r["variant"] + (" (block at the queries)" if r["arch"] == "bdd" else ""))
        if "accuracy_random_boundaries" in r:
            ax.plot(pairs, [r["accuracy_random_boundaries"][str(p)] for p in pairs], "x--",
                    color=color, alpha=0.6, label=f"{r['variant']} (random blocks)")
    ax.axhline(2 / section["task"]["vocab"], color="grey", lw=0.8, ls="--",
               label="guessing a value")
    ax.set_xscale("log", base=2)
    ax.set_xticks(pairs, [str(p) for p in pairs])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("key-value pairs in the row")
    ax.set_ylabel("answer accuracy (held-out rows)")
    ax.set_title(f"MQAR, rows of {length} tokens")
    ax.legend(fontsize=7)


def plot_copy(ax, section):
    for c in section["checkpoints"]:
        for split, scores in c["splits"].items():
            ax.plot([s["n"] for s in scores], [s["loss"] for s in scores],
                    "o-" if split == "end" else "s:", color=ex.ARCH_COLORS[c["arch"]],
                    label=f"{Path(c['dir']).name} ({c['arch']}), {split}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (tokens in A; A A fed)")
    ax.set_ylabel("loss on the second copy (nats)")
    ax.set_title("Copy probe, KV-cached inference")
    ax.legend(fontsize=7)


# -----------------------------------------------------------------------------
# command line


@dataclass
class ProbeConfig:
    """lab/probe.py's own flags (--copy aside), their help and what they allow (config.setting, as in
    TrainConfig): the parser is made from them, and a ProbeConfig checks itself when it is made,
    turning the comma-separated lists into sorted lists of ints."""
    mqar: bool = cli.setting(False, "train and score multi-query associative recall")
    archs: str = cli.setting(",".join(ARCHS), "MQAR: the archs to train")
    variants: bool = cli.setting(False, "MQAR: also " + ", ".join(
        f"{a} with {' '.join(f'{k} {v}' for k, v in o.items())}" for a, o in VARIANTS.values()))
    pairs: str = cli.setting(",".join(map(str, PAIRS)), "MQAR: key-value pair counts, "
                             "comma-separated (each trained in an even mix, scored apart)")
    lengths: str = cli.setting(",".join(map(str, LENGTHS)), "MQAR: row lengths, comma-separated "
                               "(tokens in; one model per arch and length)")
    vocab: int = cli.setting(VOCAB, "MQAR: byte ids used; keys are the lower half, values and "
                             "filler the upper half", "[4, 256]")
    eval_rows: int = cli.setting(EVAL_ROWS, "MQAR: held-out rows per pair count and length",
                                 "[1, inf)")
    copy_lengths: str = cli.setting(None, "copy: string lengths n, comma-separated (unset: 8, "
                                    "16, ... up to half a checkpoint's block_size)")
    copy_samples: int = cli.setting(COPY_SAMPLES, "copy: strings per n", "[1, inf)")

    def __post_init__(self):
        cfg.check_fields(self)
        self.pairs, self.lengths = int_list(self.pairs, "pairs", 1), int_list(self.lengths,
                                                                              "lengths", 4)
        self.copy_lengths = self.copy_lengths and int_list(self.copy_lengths, "copy_lengths", 2)
        if self.mqar:
            check_task(self.vocab, self.pairs, self.lengths)


def int_list(text, flag, least):
    """"4,8,16" -> [4, 8, 16], sorted and each once; ConfigError unless all are ints >= least."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    cfg.refuse([(not values or values[0] < least, f"--{flag} {text!r}: give comma-separated "
                 f"whole numbers of at least {least}, e.g. --{flag} {least},{2 * least}")])
    return values


def parse(argv):
    """(args: the ProbeConfig's fields with out_dir and copy, flags: the train.py flags given)."""
    p = ex.parser("Probe recall: MQAR for every arch, trained from scratch, and a copy probe of "
                  "checkpoints.", "probes",
                  per_run={"arch": "use --archs", "data": "lab/probe.py writes the task's rows",
                           "block_size": "use --lengths", "tokenizer": "the task is byte ids"})
    p.add_argument("--copy", nargs="+", metavar="RUN_DIR", default=[], help="run folders (each "
                   "holding a ckpt.pt) to give the copy probe")
    args = ex.parse_args(cli.add_flags(p, ProbeConfig), argv)
    flags = cfg.given_flags(args)
    training = next((k for k in flags if k not in ("device", "out_dir", "threads")), None)
    probe = ProbeConfig(**cli.given_flags(args, ProbeConfig))
    cfg.refuse([(not (probe.mqar or args.copy),
                 "nothing to probe: give --mqar, --copy RUN_DIR ..., or both"),
                (training and not probe.mqar, f"--{training} is a training flag, for "
                 f"--mqar's runs; the copy probe reads trained checkpoints")])
    return argparse.Namespace(**vars(probe), out_dir=args.out_dir, copy=args.copy), flags


# What plot() and the tables read of each section of probes.json, checked when an earlier one is
# read back: a mode keeps the other mode's section.
SECTIONS = {"copy?": {"samples": int, "checkpoints": [{"dir": str, "arch": str, "splits": {
               str: [{"n": int, "loss": float, "accuracy": float}]}}]},
            "mqar?": {"task": {"pairs": [int], "lengths": [int], "vocab": int}, "runs": [{
               "length": int, "arch": str, "variant": str, "accuracy": {str: float},
               "accuracy_random_boundaries?": {str: float}}], "wall_time": float}}


def earlier_results(path):
    """The sections of an earlier probes.json (none if there is none), checked by shape."""
    if not os.path.exists(path):
        return {}
    return files.read_json(path, SECTIONS, "delete it, or fix that field (the probes write it "
                           "again)")


def main(argv=None):
    with cli.guard("interrupted (Ctrl-C); probes.json and probes.png are replaced whole or not "
                   "at all; run the same command again to resume the MQAR runs"):
        args, flags = parse(argv)
        if "threads" in flags:  # checked as train.py checks it, set before anything runs
            torch.set_num_threads(cfg.make_config(threads=flags["threads"]).threads)
        with files.holding(args.out_dir, "experiment"):
            path = os.path.join(args.out_dir, "probes.json")
            results = earlier_results(path)
            if args.copy:
                device = flags.get("device", "cpu")
                results["copy"] = {"samples": args.copy_samples, "checkpoints": [
                    copy_probe(d, args.copy_lengths, args.copy_samples, device)
                    for d in args.copy]}
            if args.mqar:
                results["mqar"] = mqar(args, flags)
            ex.write_json(results, path)
            plot(results, os.path.join(args.out_dir, "probes.png"))
            if args.copy:
                print(copy_table(results["copy"]))
            if args.mqar:
                print(mqar_table(results["mqar"]))
                print(f"MQAR in {results['mqar']['wall_time']:.0f} s")
            print(f"wrote {path} and {os.path.join(args.out_dir, 'probes.png')}")


if __name__ == "__main__":
    main()

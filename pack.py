"""Batches for nanoBDD: prepared token streams (corpus/prepare.py) -> a batch dict for `model(batch)`.

Seeded training batches and seed-independent evaluation batches for the three architectures and
encdec's two pretraining objectives (prefix-LM, T5 span corruption), plus continuation_batch(),
the one yardstick shared by all three (DESIGN.md 4), and supervision_stats(): how much of a batch
trains and how much is padding. A task's fixed-length rows with loss on some targets only
(corpus/rows.py: lab/probe.py's associative recall) are drawn whole (row_batch).

bdd's block boundaries follow one of four strategies (BOUNDARIES, DESIGN.md 2):
    random:   1 to max_blocks - 1 boundaries (count uniform) at uniformly random positions
    logspace: block lengths log-uniform in 1..T-1, drawn from the row's start until the row is
              full or has max_blocks blocks; the last block takes the rest
    single:   one boundary, uniform in 1..T-1: the prompt-then-reply shape (max_blocks unused)
    turns:    a boundary at each turn start in the window (corpus/prepare.py's turn streams), at most
              max_blocks - 1 of them (a random subset when there are more); a row without one
              gets random boundaries. One layout per row: `layouts` does not apply.

Batch contract (all int64 except enc_mask; y == -1 means no loss):
    dec:    x (B,T), y (B,T)
    bdd:    x (B,T), y (B,T), block_ids (G,T) non-decreasing per row, starting at 0: G block
            layouts, each shared by B/G consecutive rows (G = B: one per row; the evaluation
            gives (T,), one layout for every row)
    encdec: enc_x (B,Te), enc_mask (B,Te) bool, True = real token (right-padded),
            dec_x (B,Td), y (B,Td); decoder padding at the right end, dec_x = eot and y = -1 there
"""

import functools
from pathlib import Path

import numpy as np
import torch

from corpus.download import DataError
from corpus.prepare import load_meta
from corpus.tokenizers import get_tokenizer
from mask import block_ids
from model import ARCHS

# encdec pretraining objectives; dec and bdd always predict every next token
OBJECTIVES = ("prefix_lm", "span")
# bdd block boundary strategies (module docstring)
BOUNDARIES = ("random", "logspace", "single", "turns")

# T5 span corruption. Sentinel k has id n_vocab + k: appended after the tokenizer's vocabulary so it
# never collides with a real token; a model trained on spans needs vocab_size() embeddings.
N_SENTINELS = 100
NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0

# randomness of evaluation batches (boundaries, prefix splits, spans): the same for every run
EVAL_SEED = 1234


def vocab_size(tokenizer_name, objective=None):
    """Embedding rows a model needs: the tokenizer's ids, plus the sentinels for span corruption.
    objective is encdec's; dec and bdd pass None."""
    n_vocab = get_tokenizer(tokenizer_name).n_vocab
    return n_vocab + N_SENTINELS if objective == "span" else n_vocab


# ---------------------------------------------------------------------------------------------
# batch builders: windows (B, T+1) -> batch dicts. Randomness only from the generator passed in.


def lm_batch(w):
    """dec: every position predicts the next token."""
    return {"x": w[:, :-1].contiguous(), "y": w[:, 1:].contiguous()}  # (B,T), (B,T)


def random_boundaries(B, T, max_blocks, gen):
    """B layouts, each 1..max_blocks-1 block starts (count uniform) at distinct positions in
    (0, T)."""
    n = torch.randint(1, max_blocks, (B, 1), generator=gen).clamp(max=T - 1)  # (B,1)
    # the ranks of i.i.d. uniforms are a random permutation; the n smallest are a uniform n-subset
    rank = torch.rand(B, T - 1, generator=gen).argsort(dim=1).argsort(dim=1)  # (B,T-1)
    return [(row.nonzero().view(-1) + 1).tolist() for row in rank < n]  # sorted, in 1..T-1


def logspace_boundaries(B, T, max_blocks, gen):
    """B layouts whose block lengths are log-uniform: floor(T ** u) tokens, u uniform in [0, 1),
    so 1..T-1 with P(length < k) = ln k / ln T. Blocks are drawn from the row's start until the
    row is full or has max_blocks blocks; the last takes the rest. The first always fits, so a row
    has 1 to max_blocks - 1 boundaries."""
    lengths = (T ** torch.rand(B, max_blocks - 1, generator=gen)).floor().clamp(1, T - 1)
    starts = lengths.long().cumsum(dim=1)  # (B, max_blocks - 1)
    return [[s for s in row if s < T] for row in starts.tolist()]


def single_boundary(B, T, gen):
    """B layouts of one boundary each, uniform in 1..T-1: a prompt, then its reply."""
    return [[p] for p in torch.randint(1, T, (B,), generator=gen).tolist()]


def turn_boundaries(turns, T, max_blocks, gen):
    """A layout per row from its turn starts (sorted positions in (0, T)): all of them, or
    max_blocks - 1 chosen uniformly when there are more. Rows without a turn start get
    random_boundaries, drawn together after the others."""
    layouts, fallback = [], []
    for row, starts in enumerate(turns):
        if len(starts) > max_blocks - 1:
            keep = torch.randperm(len(starts), generator=gen)[:max_blocks - 1].sort().values
            starts = [starts[i] for i in keep.tolist()]
        layouts.append(list(starts))
        if not starts:
            fallback.append(row)
    for row, layout in zip(fallback, random_boundaries(len(fallback), T, max_blocks, gen)):
        layouts[row] = layout
    return layouts


def layout_groups(rows, layouts):
    """How many block layouts `rows` rows get: the most, up to `layouts`, that share them out
    evenly (16 rows, 4 layouts: 4 of 4 rows each; 6 rows, 4 layouts: 3 of 2 rows each)."""
    return max(g for g in range(1, min(rows, layouts) + 1) if rows % g == 0)


def bdd_batch(w, max_blocks, gen, layouts=None, boundaries="random", turns=None):
    """bdd: every position predicts the next token. G = layout_groups(B, layouts) block layouts
    of the `boundaries` strategy, each shared by B / G consecutive rows (layouts None: one per
    row); block_ids (G, T). Rows that share a layout run block by block together (model.py):
    fewer, larger kernel calls. "turns" takes turns: each row's turn starts, sorted positions in
    (0, T) (None: no row has one, all fall back to random); its layouts are one per row."""
    B, T = w.shape[0], w.shape[1] - 1
    G = B if layouts is None or boundaries == "turns" else layout_groups(B, layouts)
    if boundaries == "random":
        bounds = random_boundaries(G, T, max_blocks, gen)
    elif boundaries == "logspace":
        bounds = logspace_boundaries(G, T, max_blocks, gen)
    elif boundaries == "single":
        bounds = single_boundary(G, T, gen)
    else:
        assert boundaries == "turns", boundaries
        bounds = turn_boundaries([[]] * B if turns is None else turns, T, max_blocks, gen)
    return {**lm_batch(w), "block_ids": block_ids(T, bounds)}


def prefix_lm_batch(w, eot, gen):
    """encdec prefix-LM: split each row at a random p in [1, T-1] (split_batch)."""
    B, T = w.shape[0], w.shape[1] - 1
    return split_batch(w[:, :-1], w[:, 1:], torch.randint(1, T, (B, 1), generator=gen), eot)


def split_batch(x, y, p, eot):
    """encdec: the encoder reads x[:p] of each row, the decoder gets x[p:T] and predicts y[p:T];
    p (B,1) in [1, T-1]. Rows are right-padded to the batch's longest."""
    T = x.shape[1]
    Te, Td = int(p.max()), int(T - p.min())
    enc_mask = torch.arange(Te) < p  # (B,Te)
    idx = p + torch.arange(Td)  # (B,Td) source position of each decoder slot
    dec_real = idx < T
    idx = idx.clamp(max=T - 1)  # padding slots read any valid position, then get overwritten
    return {
        "enc_x": x[:, :Te].masked_fill(~enc_mask, eot),
        "enc_mask": enc_mask,
        "dec_x": x.gather(1, idx).masked_fill(~dec_real, eot),
        "y": y.gather(1, idx).masked_fill(~dec_real, -1),
    }


def span_counts(T):
    """T5's counts for a row of T tokens: (noise tokens, spans), the same for every row.
    Capped at N_SENTINELS spans (then spans get longer), and at one span per kept segment."""
    n_noise = min(max(round(T * NOISE_DENSITY), 1), T - 1)
    n_spans = min(max(round(n_noise / MEAN_SPAN), 1), N_SENTINELS, T - n_noise)
    return n_noise, n_spans


def random_lengths(n, k, gen):
    """k positive lengths summing to n, uniformly among all such compositions."""
    cuts = (torch.randperm(n - 1, generator=gen)[: k - 1] + 1).sort().values
    return torch.diff(cuts, prepend=torch.tensor([0]), append=torch.tensor([n])).tolist()


def corrupt_spans(row, n_vocab, eot, gen):
    """T5 span corruption of one row (T,): returns (encoder input, decoder targets).
    Like T5, the row alternates kept / noise segments, starting with kept and ending with noise:
        enc = keep0 s0 keep1 s1 ...      targets = s0 span0 s1 span1 ... eot"""
    n_noise, n_spans = span_counts(len(row))
    keep = random_lengths(len(row) - n_noise, n_spans, gen)
    noise = random_lengths(n_noise, n_spans, gen)
    enc, tgt, i = [], [], 0
    for k, (a, b) in enumerate(zip(keep, noise)):
        sentinel = torch.tensor([n_vocab + k])
        enc += [row[i:i + a], sentinel]
        tgt += [sentinel, row[i + a:i + a + b]]
        i += a + b
    return torch.cat(enc), torch.cat(tgt + [torch.tensor([eot])])


def reconstruct_span(enc_x, y, n_vocab):
    """Inverse of corrupt_spans: the original row from an unpadded encoder row (enc_x[enc_mask])
    and its targets (-1 padding is ignored)."""
    spans, tokens = {}, None
    for t in y[y != -1].tolist()[:-1]:  # the last target is the closing eot
        if t >= n_vocab:
            tokens = spans[t] = []
        else:
            tokens.append(t)
    out = []
    for t in enc_x.tolist():
        out += spans[t] if t >= n_vocab else [t]
    return torch.tensor(out)


def span_batch(w, n_vocab, eot, gen):
    """encdec span corruption of rows w[:, :T]; decoder input = [eot] + targets[:-1]."""
    pairs = [corrupt_spans(row, n_vocab, eot, gen) for row in w[:, :-1]]
    enc = [e for e, _ in pairs]
    tgt = [t for _, t in pairs]
    dec = [torch.cat([torch.tensor([eot]), t[:-1]]) for t in tgt]
    pad = functools.partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)
    enc_len = torch.tensor([len(e) for e in enc])
    enc_x = pad(enc, padding_value=eot)  # (B,Te)
    return {
        "enc_x": enc_x,
        "enc_mask": torch.arange(enc_x.shape[1]) < enc_len[:, None],
        "dec_x": pad(dec, padding_value=eot),  # (B,Td)
        "y": pad(tgt, padding_value=-1),  # (B,Td)
    }


def continuation_batch(arch, windows, s=None):
    """The shared yardstick (DESIGN.md 4): windows (B, T+1); condition on x[:, :s+1] and score the
    same targets w[:, s+1:T+1] for every arch. encdec always uses this prefix form, also when it
    was trained with span corruption."""
    x, y = windows[:, :-1], windows[:, 1:]  # (B,T), (B,T)
    T = x.shape[1]
    s = T // 2 if s is None else s
    if arch == "encdec":
        enc_x = x[:, :s].contiguous()  # (B,s)
        return {"enc_x": enc_x, "enc_mask": torch.ones_like(enc_x, dtype=torch.bool),
                "dec_x": x[:, s:].contiguous(), "y": y[:, s:].contiguous()}  # (B,T-s)
    before = torch.arange(T, device=x.device) < s
    batch = {"x": x, "y": y.masked_fill(before, -1)}
    if arch == "bdd":
        batch["block_ids"] = block_ids(T, [s])  # (T,) one boundary, at s, for every row
    return {k: v.contiguous() for k, v in batch.items()}


def build_batch(arch, w, gen, objective, max_blocks, n_vocab, eot, layouts=None,
                boundaries="random", turns=None):
    """The training batch of `arch` (and, for encdec, `objective`; for bdd, `boundaries`, with
    `turns` as bdd_batch takes them) from windows w (B, T+1)."""
    if arch == "dec":
        return lm_batch(w)
    if arch == "bdd":
        return bdd_batch(w, max_blocks, gen, layouts, boundaries, turns)
    if objective == "prefix_lm":
        return prefix_lm_batch(w, eot, gen)
    return span_batch(w, n_vocab, eot, gen)


def supervision_stats(batch, n_vocab, block_size):
    """How much of a batch trains and how much is waste, as fractions in [0, 1]:

    supervised: loss-carrying targets that are vocabulary tokens (sentinels not counted),
        divided by rows * block_size, the tokens of the packed rows the batch was cut from.
        dec and bdd 1.0; prefix-LM about 0.5 ((T - p) / T); span corruption about 0.15 (the
        corrupted tokens plus one closing eot per row).
    padding: padded slots / all token slots the model computes (encoder + decoder slots for
        encdec). 0 for dec and bdd; the decoder's padded slots are those with y == -1.
    """
    y = batch["y"]
    supervised = ((y >= 0) & (y < n_vocab)).sum().item() / (y.shape[0] * block_size)
    if "enc_x" not in batch:
        return {"supervised": supervised, "padding": 0.0}
    padded = (~batch["enc_mask"]).sum().item() + (y == -1).sum().item()
    return {"supervised": supervised, "padding": padded / (batch["enc_x"].numel() + y.numel())}


# ---------------------------------------------------------------------------------------------
# task rows: a prepared dataset of fixed-length rows whose loss is on some targets only, such as
# lab/probe.py's associative recall. Batches draws whole rows from it instead of random windows.

def row_batch(arch, w, loss, gen, max_blocks, eot, layouts=None, boundaries="random"):
    """The training batch of `arch` from a task's rows w (B, T+1) and loss (B, T+1) bool (True:
    this token is a target that carries loss): y = -1 at every other target. dec and bdd: their
    batch (bdd's blocks from `boundaries`); encdec: the encoder reads each row's prompt, x up to
    its first supervised target (prompt_lengths), the decoder the rest."""
    y = w[:, 1:].masked_fill(~loss[:, 1:], -1)  # (B,T)
    if arch == "encdec":
        return split_batch(w[:, :-1], y, prompt_lengths(y)[:, None], eot)
    batch = bdd_batch(w, max_blocks, gen, layouts, boundaries) if arch == "bdd" else lm_batch(w)
    return {**batch, "y": y}


def prompt_lengths(y):
    """(B,) the position of each row's first target that carries loss (y (B, T), -1: none): the
    length of the prompt before it. Every row has one, and a prompt of at least one token."""
    supervised = y != -1
    assert supervised.any(1).all() and not supervised[:, 0].any(), "a row without a prompt"
    return supervised.int().argmax(1)


# ---------------------------------------------------------------------------------------------
# batch source


class Batches:
    """Batches of one prepared dataset for one architecture (and, for encdec, one objective; for
    bdd, one boundary strategy).

    get_batch(split) draws random windows from its own seeded generator: the same seed gives the
    same batches. Evaluation (eval_windows, eval_batches) ignores the seed: fixed offsets and a
    fixed generator, so every call, run and arch sees the same data. objective is only used by
    encdec, max_blocks, layouts and boundaries by bdd. The settings are the caller's to check
    (asserted here); what depends on the data raises DataError. notes: lines for the caller to
    show, such as how many windows hold no turn start and fall back to random boundaries.

    Task rows (meta from load_rows): every batch row is a whole row of the task, drawn at random
    for training and evenly spaced for evaluation, with y = -1 at the targets that carry no loss
    (row_batch); block_size must be the rows' length less one.
    """

    def __init__(self, meta, arch, block_size, batch_size, objective="prefix_lm", max_blocks=8,
                 seed=0, device="cpu", layouts=None, boundaries="random"):
        assert arch in ARCHS and objective in OBJECTIVES and boundaries in BOUNDARIES
        assert block_size >= 2 and batch_size >= 1 and max_blocks >= 2
        self.meta = meta if isinstance(meta, dict) else load_meta(meta)
        self.arch, self.objective, self.max_blocks = arch, objective, max_blocks
        self.layouts, self.boundaries = layouts, boundaries
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.n_vocab, self.eot = self.meta["n_vocab"], self.meta["eot"]
        self.data, self.turns, self.notes = {}, {}, []
        for split in ("train", "val"):
            n = self.meta["tokens"][split]
            if n < block_size + 1:
                raise DataError(f"block_size {block_size} needs windows of {block_size + 1} "
                                f"tokens but the {split} split of {self.meta['name']} has {n}; "
                                f"use a smaller block_size or more data")
            self.data[split] = np.memmap(Path(self.meta["dir"]) / f"{split}.bin",
                                         dtype=self.meta["dtype"], mode="r")
        self.row_len = self.meta["rows"]["length"] if "rows" in self.meta else None
        if self.row_len:
            self.load_loss()
        elif arch == "bdd" and boundaries == "turns":
            self.load_turns()
        self.gen = torch.Generator().manual_seed(seed)

    def load_loss(self):
        """The loss bytes of a task's rows; DataError for settings the rows cannot take."""
        name, T = self.meta["name"], self.row_len - 1
        if self.block_size != T:
            raise DataError(f"{name} holds rows of {T} tokens (and their last target); use "
                            f"--block_size {T}")
        if self.arch == "bdd" and self.boundaries == "turns":
            raise DataError(f"--boundaries turns: the rows of {name} have no turns; use other "
                            f"--boundaries")
        if self.arch == "encdec" and self.objective == "span":
            raise DataError(f"--objective span: the rows of {name} say what encdec encodes (the "
                            f"prompt before the first answer); drop --objective")
        self.loss = {split: np.memmap(Path(self.meta["dir"]) / f"{split}.loss", dtype=np.uint8,
                                      mode="r") for split in ("train", "val")}

    def load_turns(self):
        """The turn starts of both splits (sorted token offsets); DataError if the training split
        has none, as every row would fall back to random boundaries."""
        counts, name = self.meta.get("turns"), self.meta["name"]
        if not counts or not counts["train"]:
            why = ("no turn starts were found in its training split" if counts else
                   "it was prepared without a turn regex")
            raise DataError(f"--boundaries turns: {name} has no turns ({why}); give --turn_regex "
                            f"(a regex whose matches start the turns), or other --boundaries")
        for split in ("train", "val"):
            path = Path(self.meta["dir"]) / f"{split}.turns"
            self.turns[split] = (np.memmap(path, dtype=np.int64, mode="r") if counts[split]
                                 else np.empty(0, dtype=np.int64))
            share = self.fallback_share(split)
            if share > 0:
                self.notes.append(f"--boundaries turns: {share:.0%} of the {split} windows of "
                                  f"{self.block_size} tokens hold no turn start; their rows get "
                                  f"random boundaries")

    def fallback_share(self, split):
        """The share of the split's window offsets o whose rows hold no turn start, none in
        o+1 .. o+T-1 (a turn at o would be a boundary at 0, which is no boundary)."""
        T, last = self.block_size, len(self.data[split]) - self.block_size - 1  # offsets 0..last
        # offsets between turns a < b with none in o+1..o+T-1: a <= o <= b - T
        edges = np.concatenate([[0], self.turns[split], [last + T]])
        return float(np.maximum(edges[1:] - edges[:-1] - T + 1, 0).sum()) / (last + 1)

    def row_turns(self, split, offsets):
        """Each window's turn starts, as positions in (0, T) of its row."""
        turns, T = self.turns[split], self.block_size
        return [(turns[np.searchsorted(turns, o, "right"):np.searchsorted(turns, o + T)] - o)
                .tolist() for o in offsets]

    def windows(self, split, offsets):
        """(len(offsets), T+1) int64 token windows starting at the given offsets."""
        data, n = self.data[split], self.block_size + 1
        return torch.from_numpy(np.stack([data[o:o + n] for o in offsets]).astype(np.int64))

    def build(self, split, offsets, gen):
        """The arch's own training batch from the windows at offsets."""
        if self.row_len:
            loss = np.stack([self.loss[split][o:o + self.row_len] for o in offsets])
            return row_batch(self.arch, self.windows(split, offsets), torch.from_numpy(loss > 0),
                             gen, self.max_blocks, self.eot, self.layouts, self.boundaries)
        turns = self.row_turns(split, offsets) if self.turns else None
        return build_batch(self.arch, self.windows(split, offsets), gen, self.objective,
                           self.max_blocks, self.n_vocab, self.eot, self.layouts, self.boundaries,
                           turns)

    def to_device(self, batch):
        return {k: v.to(self.device) for k, v in batch.items()}

    def get_batch(self, split):
        """A training batch of batch_size random windows of block_size + 1 tokens (whole rows of
        a task's rows)."""
        if self.row_len:
            rows = torch.randint(len(self.data[split]) // self.row_len, (self.batch_size,),
                                 generator=self.gen)
            offsets = (rows * self.row_len).tolist()
        else:
            high = len(self.data[split]) - self.block_size  # starts 0 .. n-T-1 leave T+1 tokens
            offsets = torch.randint(high, (self.batch_size,), generator=self.gen).tolist()
        return self.to_device(self.build(split, offsets, self.gen))

    def eval_offsets(self, split, n):
        """n offsets evenly spaced over the split (a task's: of whole rows): the same for every
        seed."""
        if self.row_len:
            rows = np.linspace(0, len(self.data[split]) // self.row_len - 1, n).round()
            return (rows.astype(np.int64) * self.row_len).tolist()
        last = len(self.data[split]) - self.block_size - 1
        return np.linspace(0, last, n).round().astype(np.int64).tolist()

    def eval_windows(self, split, n):
        """(n, T+1) windows at eval_offsets(split, n)."""
        return self.windows(split, self.eval_offsets(split, n)).to(self.device)

    def eval_batches(self, split, n):
        """Batches of the arch's own objective over eval_windows(split, n), batch_size rows each;
        their randomness (boundaries, splits, spans) comes from the fixed EVAL_SEED."""
        gen = torch.Generator().manual_seed(EVAL_SEED)
        offsets = self.eval_offsets(split, n)
        return [self.to_device(self.build(split, offsets[i:i + self.batch_size], gen))
                for i in range(0, n, self.batch_size)]

    def supervision_stats(self, batch):
        return supervision_stats(batch, self.n_vocab, self.block_size)

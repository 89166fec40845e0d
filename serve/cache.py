"""
The caches of the serving layer (DESIGN.md section 3): a batch of rows of different lengths, and
what a conversation keeps between its turns. They answer model.Cache's interface (next, source,
each layer's update, cross), so model.py runs on them unchanged; here each row gets its own
positions and every attention masks the padding.

- Columns: every token column a batch of rows has fed, and which are padding;
- RaggedCache: a stack of layer caches over a batch's columns (the layers that run at decode
  time, or bdd's encoder): next(n) gives each row the positions of its real tokens and a mask of
  its real columns;
- SessionCache: a conversation's caches: the decode layers, bdd's encoder cache and what becomes
  of it after a prefill (keep, drop, offload), the columns;
- left_pad: token rows of any lengths to one left-padded batch.

Left padding puts every row's last prompt token in the same column, so bdd's block boundary is one
column for the whole batch. A padding query also sees its own column, so no mask row is empty.
"""

import torch

from mask import causal_mask, materialize
from model import EncoderDecoder, KVCache

PREFIX_POLICIES = ("keep", "drop", "offload")


def left_pad(rows):
    """Token rows of any lengths (1-D tensors) -> idx (B, n) and valid (B, n) bool (False =
    padding), or None when no row is padded: each row right-aligned in the last column."""
    n = max(len(r) for r in rows)
    if all(len(r) == n for r in rows):
        return torch.stack(rows), None
    idx = rows[0].new_zeros(len(rows), n)
    valid = torch.zeros(len(rows), n, dtype=torch.bool, device=idx.device)
    for b, r in enumerate(rows):
        idx[b, n - len(r):] = r
        valid[b, n - len(r):] = True
    return idx, valid


def padded_rule(valid, past=0, causal=True):
    """Keys that hold a real token (valid (B, Tk) bool), and the query's own column past + q;
    causal: nothing after it. `past` columns come before the queries."""
    def rule(b, q, k):
        own = k == q + past
        allowed = valid[b, k] | own
        return allowed & (k <= q + past) if causal else allowed
    return rule


class Columns:
    """Every token column a batch of B rows has fed: tokens (B, W), kept where a next turn reads
    them (history), and valid (B, W) bool, None while no column of any row is padding. `live`
    (B,) bool: the rows whose decoded columns are real (a row that wrote a stop token feeds
    padding until the batch is done); None: all."""

    def __init__(self, rows, device, history=True):
        self.rows, self.device, self.history = rows, device, history
        self.tokens = self.valid = self.live = None
        self.width = 0

    def record(self, idx, valid=None):
        """A prefill's token columns idx (B, n), valid (B, n) bool (None: all real)."""
        self.add_tokens(idx)
        self.add_valid(idx.shape[1], valid)

    def add_tokens(self, idx):
        """Keep idx (B, n) as history (a copy: a view would hold all of the caller's tensor)."""
        if self.history:
            self.tokens = idx.clone() if self.tokens is None else torch.cat([self.tokens, idx], 1)

    def add_valid(self, n, valid=None):
        if valid is not None or self.valid is not None:
            old = self.valid if self.valid is not None else \
                torch.ones(self.rows, self.width, dtype=torch.bool, device=self.device)
            new = valid if valid is not None else old.new_ones(self.rows, n)
            self.valid = torch.cat([old, new], 1)
        self.width += n

    def since(self, start):
        """(tokens, valid) of the columns from start on."""
        return self.tokens[:, start:], None if self.valid is None else self.valid[:, start:]

    def tensors(self):
        return [t for t in (self.tokens, self.valid) if t is not None]


class RaggedCache:
    """A stack of layer caches over a batch's Columns, its own stream from column `offset` on
    (encdec's decoder after its source; 0 otherwise). next(n) claims the next n columns: decode
    steps claim columns not yet recorded, which are real in the live rows."""

    def __init__(self, n_layers, columns, offset=0):
        self.layers = [KVCache() for _ in range(n_layers)]
        self.columns, self.offset, self.length = columns, offset, 0
        self.cross = self.cross_mask = None

    def next(self, n):
        start, end = self.length, self.length + n
        c, device = self.columns, self.columns.device
        missing = self.offset + end - c.width
        if missing > 0:  # decode steps: their columns are real in the live rows
            c.add_valid(missing, None if c.live is None else c.live[:, None].expand(-1, missing))
        self.length = end
        if c.valid is None:
            mask = None if n == 1 else "causal" if start == 0 else causal_mask(n, device, past=start)
            return torch.arange(start, end, device=device), mask
        valid = c.valid[:, self.offset:self.offset + end]  # (B, end)
        positions = (valid.long().cumsum(1)[:, start:] - 1).clamp(min=0)
        return positions, materialize(padded_rule(valid, start), c.rows, n, end, device)

    def source(self, n):
        """encdec: the first n columns as a source: each row's positions, its real columns
        (bidirectional) as the encoder's mask, and as cross_mask (B, 1, n) for the decoder."""
        valid = self.columns.valid
        if valid is None:
            return torch.arange(n, device=self.columns.device), None
        valid = valid[:, :n]
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        self.cross_mask = valid[:, None, :]
        return positions, materialize(padded_rule(valid, causal=False), len(valid), n, n,
                                      valid.device)

    def truncate(self, n):
        """Forget every column from n on (the buffers stay, for the appends that follow)."""
        for layer in self.layers:
            layer.length = min(layer.length, n)
        self.length = min(self.length, n)

    def tensors(self):
        return self.kv_tensors() + self.columns.tensors()

    def kv_tensors(self):
        kv = [t for c in self.layers if c.k is not None for t in (c.k, c.v)]
        return kv + [t for pair in self.cross or () for t in pair] + \
            [t for t in (self.cross_mask,) if t is not None]


class SessionCache:
    """A conversation's caches for a batch of rows (DESIGN.md section 3):

    decoder: the layers that run at decode time (dec: each K/V-projecting layer; bdd: the decoder
             layers, each [the encoder states' K/V | the current block's]; encdec: its decoder,
             the source's K/V in `cross`): what model.decode is given;
    encoder: bdd's encoder cache, read only by a next turn's prefill (prefix caching); what a
             prefill leaves of it is the policy: keep, drop or offload (store_encoder);
    columns: every column fed; block_start: bdd, where the current block starts (the columns its
             encoder cache can cover); encoded: the columns the last prefill ran through the
             encoder (dec: through all its layers).
    """

    def __init__(self, decoder_layers, encoder_layers, rows, device, history=True, offset=0):
        self.columns = Columns(rows, device, history)
        self.decoder = RaggedCache(decoder_layers, self.columns, offset)
        self.encoder = RaggedCache(encoder_layers, self.columns) if encoder_layers else None
        self.block_start = self.encoded = 0

    def store_encoder(self, policy):
        """keep: the encoder cache stays (the next turn encodes only its new columns); drop:
        freed (the next turn re-encodes the whole history); offload: moved from the GPU to
        pinned host memory, brought back by the next prefill (restore_encoder)."""
        if self.encoder is None or policy == "keep":
            return
        if policy == "drop":
            self.encoder = RaggedCache(len(self.encoder.layers), self.columns)
        else:
            for layer in self.encoder.layers:
                move(layer, torch.device("cpu"))

    def restore_encoder(self, device):
        for layer in self.encoder.layers if self.encoder is not None else ():
            move(layer, device)

    def forget_history(self):
        """No turn follows: keep only what decode steps read."""
        self.columns.history, self.columns.tokens, self.encoder = False, None, None

    def tensors(self):
        return self.decoder.tensors() + self.encoder_tensors()

    def encoder_tensors(self):
        return [] if self.encoder is None else self.encoder.kv_tensors()


def move(layer, device):
    """A layer cache holding exactly its filled columns, on device: in pinned host memory when
    they leave a GPU, so that the copy back is fast and asynchronous."""
    if layer.k is None or layer.k.device == device:
        return
    pin = layer.k.is_cuda and device.type == "cpu"

    def moved(t):
        t = t[:, :, :layer.length]
        return torch.empty(t.shape, dtype=t.dtype, device=device,
                           pin_memory=pin).copy_(t, non_blocking=True)
    layer.k, layer.v = moved(layer.k), moved(layer.v)


def padded_batch(model, rows):
    """Token rows of any lengths (1-D tensors) as one batch for generate.generate(): idx (B, P),
    left-padded, and a new cache over its columns that knows which of them are padding."""
    idx, valid = left_pad(rows)
    columns = Columns(len(rows), idx.device, history=False)
    columns.record(idx, valid)
    offset = idx.shape[1] - 1 if isinstance(model, EncoderDecoder) else 0  # its decoder's start
    return idx, RaggedCache(len(model.cached_layers()), columns, offset)

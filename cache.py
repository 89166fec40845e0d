"""
The KV caches of nanoBDD's models: what a model keeps between its prefill and decode calls, and
the bytes it holds (DESIGN.md section 3).

- KVCache: one attention layer's keys and values, grown in chunks as they fill;
- Cache: all of a model's KV caches for one batch of rows, with the token columns a next turn
  reads, and what becomes of bdd's encoder cache after a prefill (keep, drop, offload);
- nbytes(): every byte of tensor storage the cache holds, per device, read from the live tensors.

It imports nothing of the project: model.py builds and fills these.
"""

import math

import torch

# Columns a growing KV cache adds at a time (DESIGN.md section 3). Few enough that the empty ones
# stay a small part of what is held (at most 15 per layer: under 12% at context 128); enough
# that the copy on growth, of what the layer holds, comes once per 16 decode steps.
CHUNK = 16
# What a prefill leaves of bdd's encoder cache for the next turn (Cache.store_prefix).
PREFIX_POLICIES = ("keep", "drop", "offload")


class KVCache:
    """One attention layer's keys and values, (B, nh_kv, capacity, hs) buffers filled up to `length`
    columns. They grow as they fill, `chunk` columns at a time (copying the filled ones), so fewer
    than `chunk` columns are ever empty; chunk=1 allocates exactly what is appended (encdec's
    cross K/V, written once)."""

    def __init__(self, chunk=CHUNK):
        self.chunk, self.length = chunk, 0
        self.k = self.v = None

    @property
    def capacity(self):
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k, v):
        """Add k, v (B, nh, n, hs); return every cached k, v (B, nh, length, hs)."""
        end = self.length + k.shape[2]
        if self.k is None or end > self.capacity:
            self._reserve(k, math.ceil(end / self.chunk) * self.chunk)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.view()

    def _reserve(self, like, capacity):
        """Buffers for `capacity` columns shaped like `like`, holding the filled ones (the others
        are never read before they are written: no need to zero them)."""
        B, nh, _, hs = like.shape
        k, v = like.new_empty(B, nh, capacity, hs), like.new_empty(B, nh, capacity, hs)
        if self.length:
            k[:, :, :self.length], v[:, :, :self.length] = self.view()
        self.k, self.v = k, v

    def view(self):
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def truncate(self, length):
        """Forget every column from `length` on (the buffers stay, for the appends that follow)."""
        self.length = min(self.length, length)

    def repeat_rows(self, n):
        """Each row copied n times, in place (row b becomes rows b*n .. b*n + n - 1)."""
        if self.k is not None:
            self.k, self.v = (_pinned_as(t, t.repeat_interleave(n, 0)) for t in (self.k, self.v))

    def move_to(self, device):
        """Hold exactly the filled columns, on `device`: in pinned host memory when they leave a
        GPU, so that the copy back is fast and asynchronous."""
        if self.k is None or self.k.device == device:
            return
        pin = self.k.is_cuda and device.type == "cpu"

        def moved(t):
            t = t[:, :, :self.length]
            return torch.empty(t.shape, dtype=t.dtype, device=device,
                               pin_memory=pin).copy_(t, non_blocking=True)
        self.k, self.v = moved(self.k), moved(self.v)

    def tensors(self):
        return [] if self.k is None else [self.k, self.v]

    def filled_bytes(self):
        return 0 if self.k is None else 2 * self.k[:, :, :self.length].numel() * self.k.element_size()


class SharedKV:
    """Training's stand-in for a KV cache under cross-layer attention: the K/V the first layer
    of a group projected, handed as they are to the layers after it (nothing is copied)."""

    def append(self, k, v):
        self.k, self.v = k, v
        return k, v

    def view(self):
        return self.k, self.v


def _pinned_as(source, t):
    """t, in pinned memory if source is."""
    return t.pin_memory() if source.is_pinned() else t


class Cache:
    """What a model keeps between prefill and decode calls; nbytes() counts it.

    layers: K/V of each layer that runs at decode time (dec: all n_layer; bdd: the n_dec decoder
            layers, each holding [cross part | self part] in one buffer; encdec: decoder self K/V)
    cross:  encdec only, each decoder layer's cross K/V of the source, allocated exactly
    prefix: bdd only, the encoder's per-layer K/V: read by the next turn's prefill, never by a
            decode step; a prefill keeps, drops or offloads it (store_prefix)
    tokens: (B, L) every token column fed so far (bdd: the layers' cache columns; encdec: the
            source's, then the decoder stream's), for the next turn's prefill; None where nothing
            will read them: dec's prefill does not, nor does anything after forget_history()
    valid:  (B, L) bool, False where a column is padding; None when no column of any row is;
    width:  L, the columns fed so far;
    pos: column of the next token in its stream (its position when nothing is padded);
    block_start: bdd, where the current decoder block starts (= length of the cross part);
    encoded: columns the last prefill ran through the encoder (dec: through all its layers);
    cross_mask, source_rows: encdec with a padded source, its real columns (B, 1, Te) and the
            rows that have any (B, 1, 1) (None: every row does).
    """

    def __init__(self, layers, cross=(), prefix=(), history=True):
        self.layers, self.cross, self.prefix = list(layers), list(cross), list(prefix)
        self.history = history
        self.tokens = self.valid = self.cross_mask = self.source_rows = None
        self.width = self.pos = self.block_start = self.encoded = 0

    def record(self, idx, valid=None):
        """Note token columns idx (B, n) as fed; valid (B, n) bool marks padding (None: all real).
        The new tokens and valid are always new tensors: a view would keep all of the caller's."""
        B, n = idx.shape
        if valid is not None or self.valid is not None:
            old = self.valid if self.valid is not None else \
                idx.new_ones(B, self.width, dtype=torch.bool)
            new = valid if valid is not None else idx.new_ones(B, n, dtype=torch.bool)
            self.valid = torch.cat([old, new], 1)
        if self.history:
            self.tokens = idx.clone() if self.tokens is None else torch.cat([self.tokens, idx], 1)
        self.width += n

    def columns(self, start):
        """(tokens, valid) of the columns from start on."""
        assert self.history, "this cache keeps no token history (dec's, or after a last turn)"
        valid = None if self.valid is None else self.valid[:, start:]
        return self.tokens[:, start:], valid

    def truncate(self, n):
        """Forget every column from n on (copied: a view would keep the forgotten ones)."""
        self.tokens, self.valid = (None if t is None else t[:, :n].clone()
                                   for t in (self.tokens, self.valid))
        self.width = min(self.width, n)

    def forget_history(self):
        """No turn follows: keep only what decode steps read (the token columns go)."""
        self.history, self.tokens = False, None

    def store_prefix(self, policy):
        """What becomes of bdd's encoder cache once a prefill has projected its states into the
        decoder layers (DESIGN.md section 3). keep: it stays (the next turn encodes only its new
        tokens); drop: freed (the next turn re-encodes the whole history); offload: moved off a
        GPU to pinned host memory, brought back by the next prefill (restore_prefix); a cache in
        host memory already stays where it is. dec and encdec have no encoder cache: the policy
        changes nothing for them."""
        assert policy in PREFIX_POLICIES, policy
        if policy == "drop":
            self.prefix = [KVCache() for _ in self.prefix]
        elif policy == "offload":
            for c in self.prefix:
                c.move_to(torch.device("cpu"))

    def restore_prefix(self, device):
        for c in self.prefix:
            c.move_to(device)

    def repeat_rows(self, n):
        """Each row copied n times (row b becomes rows b*n .. b*n + n - 1): n continuations of one
        prefill. Every copy is held, and counted by nbytes()."""
        for c in self.layers + self.cross + self.prefix:
            c.repeat_rows(n)
        for name in ("tokens", "valid", "cross_mask", "source_rows"):
            t = getattr(self, name)
            setattr(self, name, None if t is None else t.repeat_interleave(n, 0))

    def tensors(self):
        """Every tensor the cache holds."""
        return ([t for c in self.layers + self.cross + self.prefix for t in c.tensors()]
                + [t for t in (self.tokens, self.valid, self.cross_mask, self.source_rows)
                   if t is not None])

    def nbytes(self):
        """Bytes the cache holds, read from its live tensors:

        held:        {device: bytes} of every tensor storage reachable from the cache, each
                     counted once and whole (a view holds all of its base; empty columns are
                     held): what a server's batch is limited by;
        prefix_held: {device: bytes}, the part of held that is bdd's encoder cache (on "cpu"
                     once offloaded; {} once dropped, and for dec and encdec);
        decode:      filled K/V bytes that decode steps read (padding columns included);
        prefix:      filled K/V bytes of bdd's encoder cache (0 once dropped).
        """
        return {"held": held_bytes(self.tensors()),
                "prefix_held": held_bytes(t for c in self.prefix for t in c.tensors()),
                "decode": sum(c.filled_bytes() for c in self.layers + self.cross),
                "prefix": sum(c.filled_bytes() for c in self.prefix)}


def held_bytes(tensors):
    """{device: bytes} of the storages under tensors, each counted once and whole."""
    storages = {(str(t.device), t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
                for t in tensors}
    held = {}
    for (device, _), n in storages.items():
        held[device] = held.get(device, 0) + n
    return held


def joined(a, b):
    """Two groups of token columns side by side, each (tokens (B, n), valid (B, n) or None)."""
    (ta, va), (tb, vb) = a, b
    if va is None and vb is None:
        return torch.cat([ta, tb], 1), None
    va = torch.ones_like(ta, dtype=torch.bool) if va is None else va
    vb = torch.ones_like(tb, dtype=torch.bool) if vb is None else vb
    return torch.cat([ta, tb], 1), torch.cat([va, vb], 1)


def bytes_after(model, rows, prompt_len, new_tokens, element_size, span=False):
    """Bytes the KV cache of a one-turn request holds after its last decode step (DESIGN.md
    section 3), from the model's shape alone: for each layer cache the decode steps read (dec:
    one per K/V-projecting layer; bdd: each decoder layer's [cross | self] buffer; encdec: each
    decoder layer's self and cross K/V), its columns rounded up to the chunk it grows by, x rows
    x 2 (K and V) x n_kv_head x head size x element_size."""
    c = model.config
    cache = model.new_cache()  # empty: which layer caches there are and how each grows
    if cache.cross:  # encdec: the decoder starts at the last prompt token (span: [eot, sentinel])
        stream, source = (2 if span else 1) + new_tokens - 1, prompt_len + (1 if span else -1)
    else:
        stream, source = prompt_len + new_tokens - 1, 0
    columns = sum(math.ceil(stream / kv.chunk) * kv.chunk for kv in cache.layers) + \
        sum(math.ceil(source / kv.chunk) * kv.chunk for kv in cache.cross)
    return columns * rows * 2 * c.n_kv_head * (c.n_embd // c.n_head) * element_size

"""
The three architectures of nanoBDD over one set of building blocks (see DESIGN.md section 2).

- dec:    decoder-only. n_layer causal layers.
- encdec: encoder-decoder (T5-like). n_enc bidirectional encoder layers; n_dec decoder layers
          with causal self-attention, cross-attention to the encoder output, and an MLP.
- bdd:    block-based double decoder. n_enc *causal* encoder layers over the whole row; n_dec
          decoder layers whose queries come from the decoder stream and whose keys/values come
          from the encoder's final states in strictly earlier blocks and from the decoder stream
          causally inside its own block, through the layer's one K/V projection, in one softmax.

All share: token embedding tied to the LM head, rotary position embeddings (RoPE), pre-norm
blocks with RMSNorm, a 4x GELU MLP. `n_layer` is the total depth; encdec and bdd split it into
n_enc = n_layer - n_dec_layer encoder and n_dec_layer decoder layers.

Every attention of every layer goes through `attention()` below. The masks come from mask.py.

Inference (DESIGN.md section 3) uses the same blocks with a KV cache: `model.prefill(idx)` starts a
turn from prompt tokens, `model.decode(idx_next, cache)` feeds one token per row; both return the
next-token logits (B, vocab) and the cache, whose `nbytes()` is counted from the live tensors.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mask import BlockLayout, bdd_block_masks, bdd_masks, causal_mask, encoder_masks

ARCHS = ("dec", "encdec", "bdd")


@dataclass
class ModelConfig:
    vocab_size: int = 257
    block_size: int = 256        # longest row (context) the model handles
    n_layer: int = 6             # total depth
    n_dec_layer: int = None      # decoder layers of encdec and bdd; default n_layer // 3 (2:1 split)
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False           # bias in Linear layers
    flex: bool = False           # FlexAttention block masks instead of dense masks (for CUDA)

    def __post_init__(self):
        if self.n_dec_layer is None:
            self.n_dec_layer = max(1, self.n_layer // 3)
        if not 1 <= self.n_dec_layer < self.n_layer:
            raise ValueError(f"n_dec_layer must be in [1, n_layer); got n_dec_layer="
                             f"{self.n_dec_layer} with n_layer={self.n_layer}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                             f"into an even head size (RoPE rotates pairs)")
        for name in ("vocab_size", "block_size", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def n_enc_layer(self):
        return self.n_layer - self.n_dec_layer


# -----------------------------------------------------------------------------
# the one attention


def attention(q, k, v, mask, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs) + mask) v for every layer of every architecture.

    q (B, nh, Tq, hs); k, v (B, nh, Tk, hs); mask: bool (Tq, Tk) or (B, Tq, Tk), True = may attend,
    or a FlexAttention BlockMask, or None (attend to every key), or a BlockLayout (BDD decoder
    layers whose keys are [memory (Tk - Tq) | stream (Tq)]: each block's queries meet only the
    keys it may see). FlexAttention has no attention dropout: with a BlockMask, dropout_p is not
    applied (the residual dropouts still are).
    """
    if isinstance(mask, BlockLayout):
        Tm = k.shape[2] - q.shape[2]

        def visible(t, s, e):  # (B, nh, s + e - s, hs): memory before the block, then the block
            return torch.cat([t[:, :, :s], t[:, :, Tm + s:Tm + e]], dim=2)
        return torch.cat([attention(q[:, :, s:e], visible(k, s, e), visible(v, s, e), m, dropout_p)
                          for (s, e), m in zip(mask.spans, mask.masks)], dim=2)
    if mask is not None and not isinstance(mask, torch.Tensor):
        return flex_attention(q, k, v, block_mask=mask)
    if mask is not None and mask.dim() == 3:
        mask = mask[:, None]  # (B, 1, Tq, Tk): the same mask for every head
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def flex_attention(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention as flex
    # Compiled, flex skips the masked tiles; eager (the CPU fallback) it materializes the scores.
    return (_compiled_flex() if q.is_cuda else flex)(q, k, v, block_mask=block_mask)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as flex
    return torch.compile(flex, dynamic=False)


# -----------------------------------------------------------------------------
# building blocks


class Rotary(nn.Module):
    """RoPE tables for absolute positions 0..block_size-1."""

    def __init__(self, head_size, block_size, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2).float() / head_size)
        angles = torch.outer(torch.arange(block_size).float(), inv_freq)  # (block_size, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start, length):
        """cos, sin for positions start..start+length-1, each (length, hs/2)."""
        if start + length > len(self.cos):
            raise ValueError(f"position {start + length - 1} is past the model's context "
                             f"(block_size {len(self.cos)})")
        return self.cos[start:start + length], self.sin[start:start + length]


def rotate(x, rope):
    """Apply RoPE to x (B, nh, T, hs); rope = (cos, sin) for x's T positions, or None."""
    if rope is None:
        return x
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value projections, so the same K/V
    projection can read a second source (BDD's encoder states, encdec's encoder output)."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x):  # (B, T, C) -> (B, nh, T, hs)
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def queries(self, h, rope):
        return rotate(self._heads(self.c_q(h)), rope)

    def keys_values(self, h, rope, cache=None):
        """k, v (B, nh, T, hs) of h; with a KV cache, h's are appended and all cached ones returned."""
        k, v = self.c_kv(h).chunk(2, dim=-1)
        k, v = rotate(self._heads(k), rope), self._heads(v)
        return (k, v) if cache is None else cache.append(k, v)

    def forward(self, q, k, v, mask):
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, nh, Tq, hs)
        B, nh, T, hs = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, nh * hs)))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm self-attention + MLP. With `memory` it is a BDD decoder layer: the memory (encoder
    final states) goes through the same K/V projection and its keys are placed before the
    stream's own, so one softmax spans both sources under the (Tq, Tm + Tq) mask."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd)
        self.attn = Attention(config)
        self.ln_2 = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, memory=None, memory_rope=None, cache=None):
        h = self.ln_1(x)
        q = self.attn.queries(h, rope)
        if memory is not None:  # training: [encoder | decoder] keys side by side
            km, vm = self.attn.keys_values(memory, memory_rope)
            k, v = self.attn.keys_values(h, rope)
            k, v = torch.cat([km, k], dim=2), torch.cat([vm, v], dim=2)  # (B, nh, Tm + T, hs)
        else:  # with a cache, the memory's keys are already in it (remember() below)
            k, v = self.attn.keys_values(h, rope, cache)
        x = x + self.attn(q, k, v, mask)
        return x + self.mlp(self.ln_2(x))

    def remember(self, memory, memory_rope, cache):
        """BDD inference: project encoder states to this layer's K/V once, into the cache."""
        self.attn.keys_values(memory, memory_rope, cache)


class CrossBlock(Block):
    """Encoder-decoder decoder layer: causal self-attention, cross-attention to the encoder
    output (no RoPE across the two streams, as in T5), MLP. The cross-attention is the 4*d^2
    parameters per layer that dec and bdd do not have."""

    def __init__(self, config):
        super().__init__(config)
        self.ln_cross = nn.RMSNorm(config.n_embd)
        self.cross = Attention(config)

    def forward(self, x, rope, mask, memory, cross_mask, cache=None, cross_cache=None):
        """With caches, `memory` is given once (prefill) and its K/V kept in cross_cache;
        memory=None reads them back. An empty source (no memory) adds nothing."""
        h = self.ln_1(x)
        x = x + self.attn(self.attn.queries(h, rope), *self.attn.keys_values(h, rope, cache), mask)
        if memory is not None:
            k, v = self.cross.keys_values(memory, None, cross_cache)
        else:
            k, v = cross_cache.view()
        if k.shape[2]:
            x = x + self.cross(self.cross.queries(self.ln_cross(x), None), k, v, cross_mask)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# KV caches


class KVCache:
    """One attention layer's keys and values, preallocated for `capacity` positions at the first
    append (then shape, dtype and device are known) and filled up to `length`."""

    def __init__(self, capacity):
        self.capacity, self.length = capacity, 0
        self.k = self.v = None

    def append(self, k, v):
        """Add k, v (B, nh, n, hs); return every cached k, v (B, nh, length, hs)."""
        if self.k is None:
            B, nh, _, hs = k.shape
            self.k = k.new_zeros(B, nh, self.capacity, hs)
            self.v = v.new_zeros(B, nh, self.capacity, hs)
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions asked, {self.capacity} allocated")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.view()

    def view(self):
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def truncate(self, length):
        self.length = min(self.length, length)

    def filled_bytes(self):
        return 0 if self.k is None else 2 * self.k[:, :, :self.length].numel() * self.k.element_size()

    def allocated_bytes(self):
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


class Cache:
    """What a model keeps between prefill and decode calls.

    layers: K/V of each layer that runs at decode time (dec: all n_layer; bdd: the n_dec decoder
            layers, each holding [cross part | self part] in one buffer; encdec: decoder self K/V)
    cross:  encdec only, each decoder layer's cross K/V of the source
    prefix: bdd only, the encoder's per-layer K/V, kept for prefix reuse (the next turn), not
            needed to decode this one
    tokens: (B, L) every token fed so far; pos: position of the next token in its stream;
    block_start: bdd, where the current decoder block starts (= length of the cross part);
    encoded: tokens the last prefill ran through the encoder (dec: through all its layers).
    """

    def __init__(self, layers, cross=(), prefix=()):
        self.layers, self.cross, self.prefix = list(layers), list(cross), list(prefix)
        self.tokens = None
        self.pos = self.block_start = self.encoded = 0

    def feed(self, idx):
        self.tokens = idx if self.tokens is None else torch.cat([self.tokens, idx], dim=1)

    def nbytes(self):
        """Bytes of K/V: `decode` needed to keep decoding, `prefix` kept only for prefix reuse,
        `allocated` everything preallocated."""
        decode = sum(c.filled_bytes() for c in self.layers + self.cross)
        prefix = sum(c.filled_bytes() for c in self.prefix)
        allocated = sum(c.allocated_bytes() for c in self.layers + self.cross + self.prefix)
        return {"decode": decode, "prefix": prefix, "allocated": allocated}


# -----------------------------------------------------------------------------
# the three language models


class LM(nn.Module):
    """What the three share: tied embedding/head, RoPE tables, final norm, loss, init, counts."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size)
        self.ln_f = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying

    def init_weights(self):
        """GPT-2 init; residual projections scaled by 1/sqrt(2 * depth)."""
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def embed(self, idx):
        return self.drop(self.wte(idx))

    def head(self, x, targets):
        """Logits (B, T, vocab) and mean cross-entropy over targets != -1 (None without targets)."""
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding=True):
        """Parameter count; the tied embedding counted once, or not at all if non_embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def next_logits(self, h):
        """Inference head: logits (B, vocab) of the last position of h (B, T, C)."""
        return self.head(h[:, -1:], None)[0][:, -1]

    def feed(self, blocks, caches, idx, cache):
        """Run tokens idx (B,) or (B, n) through blocks with their KV caches: next-token logits."""
        idx = idx.view(idx.shape[0], -1)
        h = self.run_cached(blocks, caches, self.embed(idx), cache.pos)
        cache.feed(idx)
        cache.pos += idx.shape[1]
        return self.next_logits(h), cache

    def run_cached(self, blocks, caches, x, past):
        """Run the stream x (B, n, C) at positions past..past+n-1 through blocks, each appending
        to its KV cache: causal over the cache and the n new positions."""
        n = x.shape[1]
        rope = self.rotary(past, n)
        mask = causal_mask(n, x.device, past=past) if n > 1 else None  # one token sees it all
        for block, cache in zip(blocks, caches):
            x = block(x, rope, mask, cache=cache)
        return x

    def _check_length(self, *lengths):
        for T in lengths:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size "
                                 f"{self.config.block_size}")


class DecoderOnly(LM):
    """batch: x (B, T), y (B, T) or None."""

    def __init__(self, config):
        super().__init__(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.init_weights()

    def forward(self, batch):
        x = batch["x"]
        T = x.shape[1]
        self._check_length(T)
        rope, mask = self.rotary(0, T), causal_mask(T, x.device, self.config.flex)
        h = self.embed(x)  # (B, T, C)
        for block in self.blocks:
            h = block(h, rope, mask)
        return self.head(h, batch.get("y"))

    def new_cache(self):
        return Cache(KVCache(self.config.block_size) for _ in self.blocks)

    def prefill(self, idx, cache=None):
        """Feed prompt tokens idx (B, n), appending to `cache` if given (a new chat turn)."""
        cache = cache or self.new_cache()
        cache.encoded = idx.shape[1]
        return self.decode(idx, cache)

    def decode(self, idx_next, cache):
        """Feed one token per row, idx_next (B,) or (B, 1); or several, (B, n)."""
        return self.feed(self.blocks, cache.layers, idx_next, cache)


class BlockDoubleDecoder(LM):
    """batch: x (B, T), y (B, T) or None, block_ids (B, T) or (T,)."""

    def __init__(self, config):
        super().__init__(config)
        self.encoder = nn.ModuleList(Block(config) for _ in range(config.n_enc_layer))
        self.ln_enc = nn.RMSNorm(config.n_embd)  # the one parameter vector dec does not have
        self.decoder = nn.ModuleList(Block(config) for _ in range(config.n_dec_layer))
        self.init_weights()

    def forward(self, batch):
        x, ids = batch["x"], batch["block_ids"]
        T = x.shape[1]
        self._check_length(T)
        if ids.shape[-1] != T:
            raise ValueError(f"block_ids has length {ids.shape[-1]}, x has length {T}")
        ids = ids.to(x.device)
        # One layout for the batch: block by block. Its loop has data-dependent shapes that a
        # compiled graph would recompile for at every new layout, so compiled code takes the mask.
        if ids.dim() == 1 and not self.config.flex and not torch.compiler.is_compiling():
            enc_mask, dec_mask = bdd_block_masks(ids)
            Tm = dec_mask.memory_len  # the last block's encoder states are never read
        else:  # a layout per row: the dense T x 2T mask (or flex's tile-skipping BlockMask)
            enc_mask, dec_mask = bdd_masks(ids, self.config.flex)
            Tm = T
        rope, memory_rope = self.rotary(0, T), self.rotary(0, Tm)
        e = self.embed(x[:, :Tm])  # encoder stream (B, Tm, C)
        for block in self.encoder:
            e = block(e, memory_rope, enc_mask)
        memory = self.ln_enc(e)
        h = self.embed(x)  # decoder stream (B, T, C)
        for block in self.decoder:
            h = block(h, rope, dec_mask, memory=memory, memory_rope=memory_rope)
        return self.head(h, batch.get("y"))

    def new_cache(self):
        bs = self.config.block_size
        return Cache(layers=(KVCache(bs) for _ in self.decoder),
                     prefix=(KVCache(bs) for _ in self.encoder))

    def prefill(self, idx, cache=None):
        """Start a new block at the last token of idx (B, n) (DESIGN.md section 3).

        Every token fed before that one and not yet encoded (the previous block: last turn's
        prompt token and reply) goes through the causal encoder, extending its cache; each decoder
        layer appends their K/V to its cross part and drops its self part; then the decoder runs
        the block's first token. The first prefill encodes idx[:, :-1]."""
        cache = cache or self.new_cache()
        start = cache.block_start
        pending = idx if cache.tokens is None else torch.cat([cache.tokens[:, start:], idx], 1)
        enc_in = pending[:, :-1]  # (B, n_enc_in) positions start..start+n_enc_in-1
        memory = self.ln_enc(self.run_cached(self.encoder, cache.prefix, self.embed(enc_in), start))
        memory_rope = self.rotary(start, enc_in.shape[1])
        for block, layer_cache in zip(self.decoder, cache.layers):
            layer_cache.truncate(start)  # keep the cross part, drop the last block's self part
            block.remember(memory, memory_rope, layer_cache)
        cache.block_start = cache.pos = start + enc_in.shape[1]
        cache.encoded = enc_in.shape[1]
        cache.tokens = None if cache.tokens is None else cache.tokens[:, :start]
        cache.feed(enc_in)
        return self.decode(pending[:, -1:], cache)

    def decode(self, idx_next, cache):
        """Feed one token per row into the current block: n_dec layers only."""
        return self.feed(self.decoder, cache.layers, idx_next, cache)


class EncoderDecoder(LM):
    """batch: enc_x (B, Te), enc_mask (B, Te) bool (True = real token, optional),
    dec_x (B, Td), y (B, Td) or None. Encoder and decoder positions each start at 0."""

    def __init__(self, config):
        super().__init__(config)
        self.encoder = nn.ModuleList(Block(config) for _ in range(config.n_enc_layer))
        self.ln_enc = nn.RMSNorm(config.n_embd)
        self.decoder = nn.ModuleList(CrossBlock(config) for _ in range(config.n_dec_layer))
        self.init_weights()

    def forward(self, batch):
        enc_x, dec_x = batch["enc_x"], batch["dec_x"]
        (B, Te), Td = enc_x.shape, dec_x.shape[1]
        self._check_length(Te, Td)
        valid = batch.get("enc_mask")
        if valid is None:
            valid = torch.ones(B, Te, dtype=torch.bool, device=enc_x.device)
        enc_mask, cross_mask, dec_mask = encoder_masks(valid.to(enc_x.device), Td, self.config.flex)
        memory = self.encode(enc_x, enc_mask)
        h = self.embed(dec_x)  # (B, Td, C)
        for block in self.decoder:
            h = block(h, self.rotary(0, Td), dec_mask, memory, cross_mask)
        return self.head(h, batch.get("y"))

    def encode(self, enc_x, enc_mask=None):
        """Bidirectional encoder: final states (B, Te, C) after its final norm."""
        e = self.embed(enc_x)
        for block in self.encoder:
            e = block(e, self.rotary(0, enc_x.shape[1]), enc_mask)
        return self.ln_enc(e)

    def new_cache(self):
        bs = self.config.block_size
        return Cache(layers=(KVCache(bs) for _ in self.decoder),
                     cross=(KVCache(bs) for _ in self.decoder))

    def prefill(self, idx, cache=None):
        """The whole history up to the last token of idx (B, n) is the source; the decoder starts
        from that last token, as in training (source x[:s], decoder from x[s]). A bidirectional
        encoder's states change when its source grows, so each turn re-encodes everything."""
        history = idx if cache is None else torch.cat([cache.tokens, idx], dim=1)
        return self.start(history[:, :-1], history[:, -1:])

    def start(self, source, dec_start):
        """Encode source (B, Te) and run the decoder over dec_start (B, n): a fresh cache.
        (Span-corruption models start from [prompt, sentinel] and [eot, sentinel]; see sample.py.)"""
        cache = self.new_cache()
        memory = self.encode(source)
        n = dec_start.shape[1]
        rope = self.rotary(0, n)
        mask = causal_mask(n, dec_start.device) if n > 1 else None
        h = self.embed(dec_start)
        for block, self_cache, cross_cache in zip(self.decoder, cache.layers, cache.cross):
            h = block(h, rope, mask, memory, None, self_cache, cross_cache)
        cache.feed(torch.cat([source, dec_start], dim=1))
        cache.pos, cache.encoded = n, source.shape[1]
        return self.next_logits(h), cache

    def decode(self, idx_next, cache):
        """Feed one token per row to the decoder; the source's cross K/V are read from the cache."""
        idx_next = idx_next.view(idx_next.shape[0], -1)
        h = self.embed(idx_next)
        rope = self.rotary(cache.pos, 1)
        for block, self_cache, cross_cache in zip(self.decoder, cache.layers, cache.cross):
            h = block(h, rope, None, None, None, self_cache, cross_cache)
        cache.feed(idx_next)
        cache.pos += 1
        return self.next_logits(h), cache


MODELS = {"dec": DecoderOnly, "encdec": EncoderDecoder, "bdd": BlockDoubleDecoder}


def build_model(arch, config):
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return MODELS[arch](config)

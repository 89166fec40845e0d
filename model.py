"""
The three language models of nanoBDD (DESIGN.md sections 2 and 3), read top to bottom:

- dec:    decoder-only, n_layer causal layers;
- bdd:    block-based double decoder: n_enc causal encoder layers over the whole row, and n_dec
          decoder layers that attend, in one softmax through their own K/V projection, to the
          encoder's final states in strictly earlier blocks and to their own stream causally in
          their block (the doubly-causal block mask, mask.py);
- encdec: encoder-decoder (T5-like): a bidirectional encoder; decoder layers with causal
          self-attention, cross-attention to the encoder output, and an MLP.

All three: tied embeddings, RoPE, pre-norm RMSNorm blocks, a 4x GELU MLP; n_layer is the total
depth. Options (the memory frontier's baselines): n_kv_head K/V heads (GQA, MQA at 1) and
kv_share (dec: cross-layer attention). Training: model(batch) -> (logits, loss). Inference:
prefill(idx, cache), then decode(idx, cache), each returning the next-token logits (B, vocab),
through one small cache interface (Cache below); serve/'s caches answer it too.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mask import BlockLayout, bdd_mask, causal_mask, encoder_masks

CHUNK = 16  # columns a KV cache grows by (DESIGN.md section 3)


@dataclass
class ModelConfig:
    vocab_size: int = 257
    block_size: int = 256        # the context: the longest row
    n_layer: int = 6             # total depth (encdec, bdd: encoder + decoder layers)
    n_dec_layer: int = None      # decoder layers of encdec and bdd; default n_layer // 3 (2:1)
    n_head: int = 4
    n_kv_head: int = None        # K/V heads, each read by n_head / n_kv_head query heads (GQA;
                                 # 1 = MQA); default n_head
    kv_share: int = 1            # dec: consecutive layers that share their first one's K/V (CLA)
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False           # biases in Linear layers
    flex: bool = False           # FlexAttention block masks (CUDA) instead of dense masks

    def __post_init__(self):  # the defaults that depend on other fields (config.py checks them)
        self.n_dec_layer = self.n_dec_layer or max(1, self.n_layer // 3)
        self.n_kv_head = self.n_kv_head or self.n_head

    @property
    def n_enc_layer(self):
        return self.n_layer - self.n_dec_layer


# -----------------------------------------------------------------------------
# the layers


def attention(q, k, v, mask, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs) + mask) v: every attention of every layer goes through here.

    q (B, nh, Tq, hs); k, v (B, nh_kv, Tk, hs), K/V head i // (nh / nh_kv) read by query head i
    (grouped-query attention). mask, True where a query may attend:
      "causal"     key <= query (Tq == Tk), SDPA's causal kernel without a mask tensor;
      None         every key (one new token after a KV cache);
      a bool tensor (Tq, Tk) or (B, Tq, Tk); a query with no key gets zeros;
      a FlexAttention BlockMask (the same rule; on CUDA it skips the masked tiles);
      a BlockLayout: bdd's decoder in training, the fast path below.
    """
    if isinstance(mask, BlockLayout):
        return blockwise_attention(q, k, v, mask, dropout_p)
    gqa = k.shape[1] != q.shape[1]
    if mask is not None and not isinstance(mask, (str, torch.Tensor)):
        return flex_attention(q, k, v, mask, gqa)
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:
        mask = mask[:, None]  # (B, 1, Tq, Tk): the same for every head
    causal = isinstance(mask, str)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask,
                                          dropout_p=dropout_p, is_causal=causal, enable_gqa=gqa)


def blockwise_attention(q, k, v, layout, dropout_p):
    """The fast path of bdd's doubly-causal mask, the same function as the dense T x 2T mask
    (tests/test_model.py checks values and gradients). The keys are [memory (Tm) | stream (T)];
    block (s, e) sees memory[:s] and its own stream causally, so the queries of each layout's
    rows run block by block against exactly [memory[:s] | stream[s:e]] (the mask of a KV-cached
    prefill), and the masked work of the dense mask is never done: at most one T x T attention."""
    Tm, rows = k.shape[2] - q.shape[2], q.shape[0] // len(layout.layouts)
    out = []
    for qg, kg, vg, (spans, masks) in zip(q.split(rows), k.split(rows), v.split(rows),
                                          layout.layouts):
        blocks = []
        for (s, e), block_mask in zip(spans, masks):
            ks = torch.cat([kg[:, :, :s], kg[:, :, Tm + s:Tm + e]], dim=2)  # (rows, nh_kv, e, hs)
            vs = torch.cat([vg[:, :, :s], vg[:, :, Tm + s:Tm + e]], dim=2)
            blocks.append(attention(qg[:, :, s:e], ks, vs, block_mask, dropout_p))
        out.append(torch.cat(blocks, dim=2))  # (rows, nh, T, hs)
    return torch.cat(out)


def flex_attention(q, k, v, block_mask, gqa):
    from torch.nn.attention.flex_attention import flex_attention as flex
    # compiled, flex skips the masked tiles; eager (the CPU fallback) it materializes the scores
    return (compiled_flex() if q.is_cuda else flex)(q, k, v, block_mask=block_mask,
                                                   enable_gqa=gqa)


@functools.cache
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as flex
    return torch.compile(flex, dynamic=False)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm, with a fast path on the CPU, where torch composes it of many small kernels (a
    quarter of a training step at the CPU preset, a quarter of a decode step): the same math in
    fewer passes, and for training an autograd function whose backward is written by hand. The
    same function (tests/test_model.py)."""

    def forward(self, x):
        if not x.is_cpu or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
            return super().forward(x)  # the plain path (fused on CUDA, traced when compiled)
        eps = self.eps or torch.finfo(x.dtype).eps
        if torch.is_grad_enabled():
            return RMSNormFunction.apply(x, self.weight, eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.weight


class RMSNormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # 1 / rms, (..., 1)
        normed = x * r
        ctx.save_for_backward(normed, weight, r)
        return normed * weight

    @staticmethod
    def backward(ctx, grad):
        normed, weight, r = ctx.saved_tensors
        grad_normed = grad * normed
        # normed = x * r, r = 1/rms(x): the gradient at x is r * (g - normed * mean(g * normed)),
        # g = grad * weight; mean(g * normed) is one matrix-vector product with the weight
        mean = (grad_normed @ weight).unsqueeze(-1) / normed.shape[-1]
        grad_x = torch.addcmul(grad * weight, normed, mean, value=-1).mul_(r)
        return grad_x, grad_normed.flatten(0, -2).sum(0), None


class Rotary(nn.Module):
    """RoPE: cos and sin tables for positions 0..block_size-1."""

    def __init__(self, head_size, block_size, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2).float() / head_size)
        angles = torch.outer(torch.arange(block_size).float(), inv_freq)  # (block_size, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions):
        """cos, sin of positions (T,): (T, hs/2) each; of per-row ones (B, T): (B, 1, T, hs/2)."""
        cos, sin = self.cos[positions], self.sin[positions]
        return (cos, sin) if positions.dim() == 1 else (cos[:, None], sin[:, None])


def rotate(x, rope):
    """RoPE on x (B, nh, T, hs): each pair (x[i], x[i + hs/2]) turned by its position's angle.
    For training, an autograd function whose backward turns the gradient back by the same angle
    (the fast path: fewer passes than autograd's; the same function)."""
    if rope is None:
        return x
    cos, sin = (t.to(x.dtype) for t in rope)
    return Rotate.apply(x, cos, sin) if torch.is_grad_enabled() else turned(x, cos, sin)


def turned(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Rotate(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return turned(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):  # a rotation's transpose is the rotation back
        cos, sin = ctx.saved_tensors
        return turned(grad, cos, -sin), None, None


class Attention(nn.Module):
    """Multi-head attention whose one input projection c_attn makes queries, keys and values in
    one matrix product; its K/V rows alone project a second source (bdd: the encoder's states;
    encdec: the encoder output). n_kv_head K/V heads (GQA). project_kv=False: a cross-layer
    attention follower (query rows only)."""

    def __init__(self, config, project_kv=True):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_size = config.n_embd // config.n_head
        kv_width = 2 * self.n_kv_head * self.head_size if project_kv else 0
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + kv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def project(self, x, rope):
        """The queries (B, nh, T, hs) of x and, unless a follower, its keys and values
        (B, nh_kv, T, hs): one matrix product, then RoPE on the queries and keys at once."""
        B, T, _ = x.shape
        n = self.c_attn.out_features // self.head_size  # heads: nh queries (+ nh_kv K and V)
        heads = self.c_attn(x).view(B, T, n, self.head_size).transpose(1, 2)
        if n == self.n_head:
            return rotate(heads, rope), None
        qk, v = heads.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
        q, k = rotate(qk, rope).split([self.n_head, self.n_kv_head], dim=1)
        return q, (k, v)

    def queries(self, x, rope):
        """The queries of x alone (encdec's cross-attention), through the query rows."""
        return rotate(self.rows(x, 0, self.n_head), rope)

    def keys_values(self, x, rope):
        """k, v (B, nh_kv, T, hs) of a second source, through the K/V rows."""
        k, v = self.rows(x, self.n_head, self.n_head + 2 * self.n_kv_head).chunk(2, dim=1)
        return rotate(k, rope), v

    def rows(self, x, first, end):
        """Heads first..end-1 of c_attn's output, (B, end - first, T, hs)."""
        B, T, _ = x.shape
        rows = slice(first * self.head_size, end * self.head_size)
        bias = None if self.c_attn.bias is None else self.c_attn.bias[rows]
        y = F.linear(x, self.c_attn.weight[rows], bias)
        return y.view(B, T, end - first, self.head_size).transpose(1, 2)

    def forward(self, q, k, v, mask):
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
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
    """Pre-norm self-attention and MLP (every layer but encdec's decoder's). Returns the new
    stream and the K/V it attended to."""

    def __init__(self, config, project_kv=True):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd)
        self.attn = Attention(config, project_kv)
        self.ln_2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, cache=None, kv=None):
        x, kv = self.self_attention(x, rope, mask, cache, kv)
        return x + self.mlp(self.ln_2(x)), kv

    def self_attention(self, x, rope, mask, cache=None, kv=None):
        """cache: this layer's KV cache (or bdd training's MemoryKV): its K/V are appended, all
        attended to; kv: its cross-layer-attention group's K/V, attended to instead."""
        q, own = self.attn.project(self.ln_1(x), rope)
        if kv is None:
            kv = own if cache is None else cache.update(*own)
        return x + self.attn(q, *kv, mask), kv


class CrossBlock(Block):
    """encdec's decoder layer: causal self-attention, cross-attention to the encoder output
    (without RoPE across the two streams, as in T5: 4 d^2 parameters dec and bdd lack), MLP."""

    def __init__(self, config):
        super().__init__(config)
        self.ln_cross = RMSNorm(config.n_embd)
        self.cross = Attention(config)

    def forward(self, x, rope, mask, source_kv, source_mask, cache=None):
        """source_kv: (k, v) of the source; source_mask: the source keys each query may see
        (None: all). Attention over no key (an empty source) is zeros."""
        x, _ = self.self_attention(x, rope, mask, cache)
        x = x + self.cross(self.cross.queries(self.ln_cross(x), None), *source_kv, source_mask)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# the KV cache a cached step talks to


class KVCache:
    """One layer's keys and values, (B, nh_kv, capacity, hs) buffers filled up to `length`
    columns, grown CHUNK columns at a time: a cache holds what its rows need, not the context."""

    def __init__(self):
        self.k = self.v = None
        self.length = 0

    def update(self, k, v):
        """Append k, v (B, nh_kv, n, hs); return every cached k, v (B, nh_kv, length, hs)."""
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            self.k, self.v = self.grown(self.k, k, end), self.grown(self.v, v, end)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def grown(self, buffer, like, end):
        """A buffer of enough CHUNKs for `end` columns, holding the filled ones of `buffer`."""
        B, nh, _, hs = like.shape
        new = like.new_empty(B, nh, math.ceil(end / CHUNK) * CHUNK, hs)
        if self.length:
            new[:, :, :self.length] = buffer[:, :, :self.length]
        return new


class Cache:
    """What a model keeps between prefill and decode for a batch of rows of one length: a KVCache
    per layer that runs at decode time (bdd: each decoder layer's [encoder states | block]; encdec:
    the decoder's own, and its source's K/V in `cross`), and the next position."""

    def __init__(self, n_layers, device):
        self.layers = [KVCache() for _ in range(n_layers)]
        self.cross, self.cross_mask = None, None  # encdec: [(k, v)] of the source; all visible
        self.pos, self.device = 0, device

    def next(self, n):
        """Positions (n,) of the next n columns, and the mask of their queries over every cached
        key: causal, after the pos columns already cached (one new column sees them all)."""
        positions = torch.arange(self.pos, self.pos + n, device=self.device)
        mask = None if n == 1 else "causal" if self.pos == 0 else \
            causal_mask(n, self.device, past=self.pos)
        self.pos += n
        return positions, mask

    def source(self, n):
        """encdec: positions (n,) of a source of n columns; its encoder's mask (None: all)."""
        return torch.arange(n, device=self.device), None

    def tensors(self):
        """Every tensor the cache holds (serve/memory.py counts their bytes)."""
        kv = [t for c in self.layers if c.k is not None for t in (c.k, c.v)]
        return kv + [t for pair in self.cross or () for t in pair]


class MemoryKV:
    """bdd training: a decoder layer's K/V of the encoder states before the stream's own, as its
    KV cache holds them at inference: the keys [memory | stream] of the doubly-causal mask."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def update(self, k, v):
        return torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)


# -----------------------------------------------------------------------------
# the three language models


class LM(nn.Module):
    """What the three share: tied embedding and head, RoPE tables, final norm, loss, init."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size)
        self.ln_f = RMSNorm(config.n_embd)
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

    def num_params(self, non_embedding=True):
        """Parameters, the tied embedding counted once, or not at all if non_embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def embed(self, idx):
        return self.drop(self.wte(idx))

    def head(self, x, targets=None):
        """Logits (B, T, vocab), and the mean cross-entropy over targets != -1 (or None)."""
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def next_logits(self, h):
        """Inference: the logits (B, vocab) after the last column of h (B, n, C)."""
        return self.lm_head(self.ln_f(h[:, -1]))

    def new_cache(self):
        return Cache(len(self.cached_layers()), self.wte.weight.device)


class DecoderOnly(LM):
    """batch: x (B, T), y (B, T) or None."""

    def __init__(self, config):
        super().__init__(config)
        self.blocks = nn.ModuleList(Block(config, project_kv=i % config.kv_share == 0)
                                    for i in range(config.n_layer))
        self.init_weights()

    def forward(self, batch):
        x = batch["x"]
        rope = self.rotary(torch.arange(x.shape[1], device=x.device))
        return self.head(self.layers(self.embed(x), rope, "causal"), batch.get("y"))

    def layers(self, x, rope, mask, cache=None):
        """x (B, T, C) through the n_layer layers. The first layer of each group of kv_share
        projects K/V (into its cache, if any); the others attend to the K/V it attended to."""
        kv = None
        for i, block in enumerate(self.blocks):
            first = i % self.config.kv_share == 0
            layer = None if cache is None or not first else cache.layers[i // self.config.kv_share]
            x, kv = block(x, rope, mask, layer, None if first else kv)
        return x

    def cached_layers(self):
        return self.blocks[::self.config.kv_share]

    def prefill(self, idx, cache):
        """A prompt idx (B, P) runs like any new tokens: through every layer, into the cache."""
        return self.decode(idx, cache)

    def decode(self, idx, cache):
        """New tokens idx (B, n) (one per row while generating): the logits after the last."""
        positions, mask = cache.next(idx.shape[1])
        return self.next_logits(self.layers(self.embed(idx), self.rotary(positions), mask, cache))


class BlockDoubleDecoder(LM):
    """batch: x (B, T), y (B, T) or None, block_ids: (T,) one layout for the batch, (B, T) one per
    row, or (G, T), G layouts each shared by B/G consecutive rows (mask.block_ids)."""

    def __init__(self, config):
        super().__init__(config)
        self.encoder = nn.ModuleList(Block(config) for _ in range(config.n_enc_layer))
        self.ln_enc = RMSNorm(config.n_embd)  # the one parameter vector dec does not have
        self.decoder = nn.ModuleList(Block(config) for _ in range(config.n_dec_layer))
        self.init_weights()

    def forward(self, batch):
        x = batch["x"]
        B, T = x.shape
        layouts = batch["block_ids"].to(x.device).view(-1, T)  # (G, T)
        assert B % len(layouts) == 0, f"{len(layouts)} block layouts do not split {B} rows evenly"
        if self.config.flex or torch.compiler.is_compiling():
            # The reference path: the dense T x 2T doubly-causal mask of each row, which
            # FlexAttention turns into a tile-skipping block mask on CUDA (and which has the fixed
            # shapes a compiled graph needs).
            per_row = layouts.repeat_interleave(B // len(layouts), dim=0)
            h = self.stream(x, bdd_mask(per_row, self.config.flex))
        else:
            # The fast path, the same function (tests/test_model.py): each layout's rows run
            # block by block against only the keys each block may see, and their encoder stops
            # where their last block starts, as no block reads the states after it.
            h = self.stream(x, BlockLayout(layouts))
        return self.head(h, batch.get("y"))

    def stream(self, x, dec_mask):
        """The decoder stream's final states (B, T, C) of rows x (B, T): the encoder, then each
        decoder layer over [encoder states | stream]."""
        rope = self.rotary(torch.arange(x.shape[1], device=x.device))
        memory = self.memory(x, dec_mask, rope)  # (B, Tm, C)
        memory_rope = tuple(t[:memory.shape[1]] for t in rope)
        h = self.embed(x)  # (B, T, C)
        for block in self.decoder:
            h, _ = block(h, rope, dec_mask, MemoryKV(*block.attn.keys_values(memory, memory_rope)))
        return h

    def memory(self, x, dec_mask, rope):
        """The encoder states the decoder reads: all T (the dense mask), or (the fast path) each
        layout's rows up to where its last block starts, as no block reads the states after it
        (zeros up to the latest such start)."""
        if not isinstance(dec_mask, BlockLayout):
            return self.encode(x, rope, "causal")
        ends = dec_mask.memory_lens
        parts = [self.encode(rows[:, :n], tuple(t[:n] for t in rope), "causal")
                 for rows, n in zip(x.split(x.shape[0] // len(ends)), ends)]
        return torch.cat([F.pad(p, (0, 0, 0, max(ends) - p.shape[1])) for p in parts])

    def encode(self, idx, rope, mask, caches=None):
        """The causal encoder's final states (B, n, C) of idx (B, n) at RoPE rope under mask.
        caches: its layers' KV caches (a session's prefix cache, serve/), appended to."""
        e = self.embed(idx)
        for block, layer in zip(self.encoder, caches or [None] * len(self.encoder)):
            e, _ = block(e, rope, mask, layer)
        return self.ln_enc(e)

    def cached_layers(self):
        return self.decoder

    def prefill(self, idx, cache):
        """A prompt idx (B, P) into a new cache, its decoder block starting at its last token
        (DESIGN.md section 3); the next-token logits (B, vocab)."""
        positions, mask = cache.next(idx.shape[1] - 1)  # the columns of x[0:P-1]
        rope = self.rotary(positions)
        # 1. the encoder runs causally over x[0:P-1]
        memory = self.encode(idx[:, :-1], rope, mask)
        # 2. each decoder layer projects the encoder's states to its K/V, once
        self.remember(memory, rope, cache)
        # 3. the decoder runs x[P-1], as decode() then runs each new token: n_dec layers only
        return self.decode(idx[:, -1:], cache)

    def remember(self, memory, rope, cache):
        """Append the K/V of encoder states memory (B, n, C) to each decoder layer's cache."""
        for block, layer in zip(self.decoder, cache.layers):
            layer.update(*block.attn.keys_values(memory, rope))

    def decode(self, idx, cache):
        """New tokens idx (B, n) of the current block: the logits after the last."""
        positions, mask = cache.next(idx.shape[1])
        rope, h = self.rotary(positions), self.embed(idx)
        for block, layer in zip(self.decoder, cache.layers):
            h, _ = block(h, rope, mask, layer)
        return self.next_logits(h)


class EncoderDecoder(LM):
    """batch: enc_x (B, Te), enc_mask (B, Te) bool (True = real token; optional), dec_x (B, Td),
    y (B, Td) or None. Encoder and decoder positions each start at 0."""

    def __init__(self, config):
        super().__init__(config)
        self.encoder = nn.ModuleList(Block(config) for _ in range(config.n_enc_layer))
        self.ln_enc = RMSNorm(config.n_embd)
        self.decoder = nn.ModuleList(CrossBlock(config) for _ in range(config.n_dec_layer))
        self.init_weights()

    def forward(self, batch):
        enc_x, dec_x = batch["enc_x"], batch["dec_x"]
        enc_mask = cross_mask = None  # every source token is real
        if batch.get("enc_mask") is not None:
            enc_mask, cross_mask = encoder_masks(batch["enc_mask"].to(enc_x.device),
                                                 dec_x.shape[1], self.config.flex)
        memory = self.encode(enc_x, enc_mask)
        rope = self.rotary(torch.arange(dec_x.shape[1], device=dec_x.device))
        h = self.embed(dec_x)  # (B, Td, C)
        for block in self.decoder:
            h = block(h, rope, "causal", block.cross.keys_values(memory, None), cross_mask)
        return self.head(h, batch.get("y"))

    def encode(self, source, mask=None, positions=None):
        """The bidirectional encoder's final states (B, Te, C) of source (B, Te). mask: which
        keys each position sees (None: all); positions: 0..Te-1 unless given (a padded batch's
        per-row positions, serve/)."""
        if positions is None:
            positions = torch.arange(source.shape[1], device=source.device)
        rope, e = self.rotary(positions), self.embed(source)
        for block in self.encoder:
            e, _ = block(e, rope, mask)
        return self.ln_enc(e)

    def cached_layers(self):
        return self.decoder

    def prefill(self, idx, cache):
        """A prompt idx (B, P) into a new cache: x[0:P-1] is the source and the decoder starts
        at x[P-1], as in training (source x[:s], decoder from x[s]); the next-token logits."""
        positions, mask = cache.source(idx.shape[1] - 1)
        self.remember(self.encode(idx[:, :-1], mask, positions), cache)
        return self.decode(idx[:, -1:], cache)

    def remember(self, memory, cache):
        """Each decoder layer projects the encoder output memory (B, Te, C) to its cross K/V."""
        cache.cross = [block.cross.keys_values(memory, None) for block in self.decoder]

    def decode(self, idx, cache):
        """New tokens idx (B, n) of the decoder stream: the logits after the last."""
        positions, mask = cache.next(idx.shape[1])
        rope, h = self.rotary(positions), self.embed(idx)
        for block, layer, source_kv in zip(self.decoder, cache.layers, cache.cross):
            h = block(h, rope, mask, source_kv, cache.cross_mask, layer)
        return self.next_logits(h)


MODELS = {"dec": DecoderOnly, "encdec": EncoderDecoder, "bdd": BlockDoubleDecoder}
ARCHS = tuple(MODELS)


def build_model(arch, config):
    return MODELS[arch](config)

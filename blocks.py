"""
The building blocks of nanoBDD's three architectures (model.py assembles them), and the one place
where attention is computed:

- attention(): softmax(q k^T / sqrt(hs) + mask) v for every layer of every architecture, on a
  dense mask, a FlexAttention block mask, or a bdd block layout (block by block);
- Rotary: RoPE tables; positions() and rotate() for rows with padding;
- Attention, MLP, Block (pre-norm self-attention + MLP, or a bdd decoder layer when given the
  encoder's states as memory), CrossBlock (an encoder-decoder decoder layer).

A layer's K/V projection can read a second source (bdd's encoder states, encdec's encoder
output), and with a KV cache (cache.py) it appends to it. The masks come from mask.py.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from mask import BlockLayout

# -----------------------------------------------------------------------------
# the one attention


def attention(q, k, v, mask, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs) + mask) v for every layer of every architecture.

    q (B, nh, Tq, hs); k, v (B, nh_kv, Tk, hs), each K/V head shared by nh / nh_kv query heads
    (grouped-query attention: query head i reads K/V head i // (nh / nh_kv));
    mask: bool (Tq, Tk) or (B, Tq, Tk), True = may attend,
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
    gqa = k.shape[1] != q.shape[1]
    if mask is not None and not isinstance(mask, torch.Tensor):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if mask is not None and mask.dim() == 3:
        mask = mask[:, None]  # (B, 1, Tq, Tk): the same mask for every head
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          enable_gqa=gqa)


def flex_attention(q, k, v, block_mask, enable_gqa=False):
    from torch.nn.attention.flex_attention import flex_attention as flex
    # Compiled, flex skips the masked tiles; eager (the CPU fallback) it materializes the scores.
    return (_compiled_flex() if q.is_cuda else flex)(q, k, v, block_mask=block_mask,
                                                     enable_gqa=enable_gqa)


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
        self._check(start + length - 1)
        return self.cos[start:start + length], self.sin[start:start + length]

    def at(self, positions):
        """cos, sin (B, 1, n, hs/2) for per-row positions (B, n) (the rows of a padded batch)."""
        if positions.numel():
            self._check(int(positions.max()))
        return self.cos[positions][:, None], self.sin[positions][:, None]

    def _check(self, last):
        if last >= len(self.cos):
            raise ValueError(f"position {last} is past the model's context "
                             f"(block_size {len(self.cos)})")


def positions(valid, n):
    """Positions (B, n) of the last n of L columns, valid (B, L) bool (False = padding): the real
    tokens before each column in its row. A padding column gets its neighbour's (never read)."""
    L = valid.shape[1]
    return (valid.long().cumsum(1)[:, L - n:] - 1).clamp(min=0)


def rotate(x, rope):
    """Apply RoPE to x (B, nh, T, hs); rope = (cos, sin) for x's T positions, or None."""
    if rope is None:
        return x
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value projections, so the same K/V
    projection can read a second source (BDD's encoder states, encdec's encoder output).
    n_kv_head K/V heads, each read by n_head / n_kv_head query heads (GQA; MQA at 1): the KV cache
    holds only those. project_kv=False: a layer that attends to the K/V an earlier layer
    projected (cross-layer attention) and has no K/V projection of its own."""

    def __init__(self, config, project_kv=True):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_size = config.n_embd // config.n_head
        kv_width = 2 * self.n_kv_head * self.head_size
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_kv = nn.Linear(config.n_embd, kv_width, bias=config.bias) if project_kv else None
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x, n):  # (B, T, n * hs) -> (B, n, T, hs)
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_size).transpose(1, 2)

    def queries(self, h, rope):
        return rotate(self._heads(self.c_q(h), self.n_head), rope)

    def keys_values(self, h, rope, cache=None):
        """k, v (B, nh_kv, T, hs) of h; with a KV cache, h's are appended and all cached ones
        returned."""
        k, v = self.c_kv(h).chunk(2, dim=-1)
        k, v = rotate(self._heads(k, self.n_kv_head), rope), self._heads(v, self.n_kv_head)
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
    stream's own, so one softmax spans both sources under the (Tq, Tm + Tq) mask. A block
    without a K/V projection (project_kv=False, cross-layer attention) attends to the K/V that
    the first layer of its group put in the cache they share."""

    def __init__(self, config, project_kv=True):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd)
        self.attn = Attention(config, project_kv)
        self.ln_2 = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, memory=None, memory_rope=None, cache=None):
        h = self.ln_1(x)
        q = self.attn.queries(h, rope)
        if memory is not None:  # training: [encoder | decoder] keys side by side
            km, vm = self.attn.keys_values(memory, memory_rope)
            k, v = self.attn.keys_values(h, rope)
            k, v = torch.cat([km, k], dim=2), torch.cat([vm, v], dim=2)  # (B, nh, Tm + T, hs)
        elif self.attn.c_kv is None:  # cross-layer attention: the group's first layer's K/V
            k, v = cache.view()
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

    def forward(self, x, rope, mask, memory, cross_mask, cache=None, cross_cache=None,
                source_rows=None):
        """With caches, `memory` is given once (prefill) and its K/V kept in cross_cache;
        memory=None reads them back. An empty source (no memory) adds nothing, and neither does
        it in a padded batch for the rows whose source is all padding: source_rows (B, 1, 1) bool
        says which rows have a source (None: all)."""
        h = self.ln_1(x)
        x = x + self.attn(self.attn.queries(h, rope), *self.attn.keys_values(h, rope, cache), mask)
        if memory is not None:
            k, v = self.cross.keys_values(memory, None, cross_cache)
        else:
            k, v = cross_cache.view()
        if k.shape[2]:
            y = self.cross(self.cross.queries(self.ln_cross(x), None), k, v, cross_mask)
            x = x + (y if source_rows is None else y.where(source_rows, 0.0))
        return x + self.mlp(self.ln_2(x))

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
n_enc = n_layer - n_dec_layer encoder and n_dec_layer decoder layers. Options: n_kv_head < n_head
K/V heads in every attention (GQA, MQA at 1); kv_share (dec only) layers per group that attend to
the K/V of the group's first layer (cross-layer attention).

The blocks (and `attention()`, through which every attention of every layer goes) are in
blocks.py, the KV caches in cache.py, the masks in mask.py.

Inference (DESIGN.md section 3) uses the same blocks with a KV cache: `model.prefill(idx)` starts a
turn from prompt tokens, `model.decode(idx_next, cache)` feeds one token per row; both return the
next-token logits (B, vocab) and the cache, whose `nbytes()` counts every byte it holds. Caches
grow in chunks as they fill; bdd's encoder cache, which only a next turn reads, is kept, dropped
or offloaded after each prefill (`prefix_cache`).
A batch of prompts of different lengths is left-padded (`valid=` marks the padding): every row's
last prompt token sits in the same column, so bdd's block boundary is one column for the batch;
the cache keeps which of its columns are real, every layer masks the padding and RoPE counts each
row's own tokens, so each row gets the logits it would get alone.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from blocks import Block, CrossBlock, Rotary, positions
from cache import Cache, KVCache, SharedKV, joined
from mask import (bdd_block_masks, bdd_masks, causal_mask, encoder_masks,
                  padded_causal_mask, padded_source_masks)

ARCHS = ("dec", "encdec", "bdd")


@dataclass
class ModelConfig:
    vocab_size: int = 257
    block_size: int = 256        # longest row (context) the model handles
    n_layer: int = 6             # total depth
    n_dec_layer: int = None      # decoder layers of encdec and bdd; default n_layer // 3 (2:1 split)
    n_head: int = 4
    n_kv_head: int = None        # K/V heads, each shared by n_head / n_kv_head query heads (GQA;
                                 # 1 = MQA); default n_head
    kv_share: int = 1            # dec: each group of kv_share consecutive layers attends to the
                                 # K/V its first layer projects (cross-layer attention)
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False           # bias in Linear layers
    flex: bool = False           # FlexAttention block masks instead of dense masks (for CUDA)

    def __post_init__(self):
        """Defaults that depend on other fields. The config layer refuses bad values with a
        message for the user; these asserts only catch a caller that skipped it."""
        if self.n_dec_layer is None:
            self.n_dec_layer = max(1, self.n_layer // 3)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        assert min(self.vocab_size, self.block_size, self.n_head, self.n_embd) >= 1, self
        assert 1 <= self.n_dec_layer < self.n_layer, self
        assert self.n_embd % self.n_head == 0 and (self.n_embd // self.n_head) % 2 == 0, self
        assert 1 <= self.n_kv_head and self.n_head % self.n_kv_head == 0, self
        assert 1 <= self.kv_share <= self.n_layer, self

    @property
    def n_enc_layer(self):
        return self.n_layer - self.n_dec_layer


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

    def run_tokens(self, blocks, caches, idx, cache, valid=None):
        """Run token columns idx (B,) or (B, n) through blocks, each appending to its KV cache:
        next-token logits (B, vocab). valid (B, n) bool marks padding among them (None: all
        real)."""
        idx = idx.view(idx.shape[0], -1)
        cache.record(idx, valid)
        rope, mask = self.rope_and_mask(cache.pos, idx.shape[1], cache.valid, idx.device)
        h = self.run_cached(blocks, caches, self.embed(idx), rope, mask)
        cache.pos += idx.shape[1]
        return self.next_logits(h), cache

    def rope_and_mask(self, past, n, valid=None, device=None):
        """RoPE and mask of n new columns after `past` cached ones: positions past..past+n-1,
        causal (one token sees it all: no mask). With valid (B, past + n) (padding somewhere in
        the batch): each row's own positions, and only its real columns as keys."""
        if valid is None:
            return self.rotary(past, n), causal_mask(n, device, past=past) if n > 1 else None
        return self.rotary.at(positions(valid, n)), padded_causal_mask(valid, n)

    def run_cached(self, blocks, caches, x, rope, mask):
        """Run the stream x (B, n, C) through blocks, each appending to its KV cache (or reading
        it: a block without K/V projection)."""
        for block, cache in zip(blocks, caches):
            x = block(x, rope, mask, cache=cache)
        return x

    def _check_length(self, *lengths):
        for T in lengths:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size "
                                 f"{self.config.block_size}")


class DecoderOnly(LM):
    """batch: x (B, T), y (B, T) or None. With kv_share = k, only the first layer of each group of
    k consecutive layers projects K/V, and the group attends to them (cross-layer attention)."""

    def __init__(self, config):
        super().__init__(config)
        self.blocks = nn.ModuleList(Block(config, project_kv=i % config.kv_share == 0)
                                    for i in range(config.n_layer))
        self.n_kv_layers = math.ceil(config.n_layer / config.kv_share)
        self.init_weights()

    def forward(self, batch):
        x = batch["x"]
        T = x.shape[1]
        self._check_length(T)
        rope, mask = self.rotary(0, T), causal_mask(T, x.device, self.config.flex)
        shared = self.layer_caches([SharedKV() for _ in range(self.n_kv_layers)])
        h = self.run_cached(self.blocks, shared, self.embed(x), rope, mask)  # (B, T, C)
        return self.head(h, batch.get("y"))

    def layer_caches(self, caches):
        """The cache of each layer, from one per K/V-projecting layer: a group shares its
        first layer's."""
        return [caches[i // self.config.kv_share] for i in range(self.config.n_layer)]

    def new_cache(self):
        return Cache((KVCache() for _ in range(self.n_kv_layers)),
                     history=False)  # no prefill reads the tokens

    def prefill(self, idx, cache=None, valid=None, prefix_cache="keep"):
        """Feed prompt tokens idx (B, n), appending to `cache` if given (a new chat turn);
        valid (B, n) bool marks left padding (False). dec has no encoder cache: prefix_cache
        changes nothing."""
        cache = cache or self.new_cache()
        cache.encoded = idx.shape[1]
        return self.decode(idx, cache, valid)

    def decode(self, idx_next, cache, valid=None):
        """Feed one token per row, idx_next (B,) or (B, 1); or several, (B, n). valid (B,) or
        (B, n) bool: False feeds a padding column (a row that has stopped)."""
        return self.run_tokens(self.blocks, self.layer_caches(cache.layers), idx_next, cache,
                               _columns(valid, idx_next))


class BlockDoubleDecoder(LM):
    """batch: x (B, T), y (B, T) or None, block_ids (G, T): G block layouts, each shared by B/G
    consecutive rows ((T,) for one layout, (B, T) for one per row)."""

    def __init__(self, config):
        super().__init__(config)
        assert config.kv_share == 1, "kv_share (cross-layer attention) is a dec option"
        self.encoder = nn.ModuleList(Block(config) for _ in range(config.n_enc_layer))
        self.ln_enc = nn.RMSNorm(config.n_embd)  # the one parameter vector dec does not have
        self.decoder = nn.ModuleList(Block(config) for _ in range(config.n_dec_layer))
        self.init_weights()

    def forward(self, batch):
        x, ids = batch["x"], batch["block_ids"]
        B, T = x.shape
        self._check_length(T)
        layouts = ids.to(x.device).view(-1, ids.shape[-1])  # (G, T): each for B/G rows in a row
        G = layouts.shape[0]
        if layouts.shape[1] != T or B % G:
            raise ValueError(f"block_ids {tuple(ids.shape)} does not fit x {tuple(x.shape)}: give "
                             f"(T,), (B, T), or (G, T) with G dividing B")
        # Block by block, each group of rows with its own layout. The loop has data-dependent
        # shapes that a compiled graph would recompile for at every layout, so compiled code (and
        # flex, whose block mask skips the masked tiles itself) takes the mask instead.
        if self.config.flex or torch.compiler.is_compiling():
            per_row = layouts[0] if G == 1 else layouts.repeat_interleave(B // G, dim=0)
            h = self.stream(x, *bdd_masks(per_row, self.config.flex), T)
        else:
            h = torch.cat([self.stream(rows, *bdd_block_masks(layout))
                           for rows, layout in zip(x.split(B // G), layouts)])
        return self.head(h, batch.get("y"))

    def stream(self, x, enc_mask, dec_mask, Tm=None):
        """The decoder stream's final states (B, T, C) of rows x under the masks; the encoder runs
        over the first Tm positions (default: the block layout's memory_len, as no block reads
        the encoder states of the last one)."""
        T = x.shape[1]
        Tm = dec_mask.memory_len if Tm is None else Tm
        rope, memory_rope = self.rotary(0, T), self.rotary(0, Tm)
        e = self.embed(x[:, :Tm])  # encoder stream (B, Tm, C)
        for block in self.encoder:
            e = block(e, memory_rope, enc_mask)
        memory = self.ln_enc(e)
        h = self.embed(x)  # decoder stream (B, T, C)
        for block in self.decoder:
            h = block(h, rope, dec_mask, memory=memory, memory_rope=memory_rope)
        return h

    def new_cache(self):
        return Cache(layers=(KVCache() for _ in self.decoder),
                     prefix=(KVCache() for _ in self.encoder))

    def prefill(self, idx, cache=None, valid=None, prefix_cache="keep"):
        """Start a new block at the last token of idx (B, n) (DESIGN.md section 3).

        The tokens fed since the encoder's cache ends (the last block: its first token and reply;
        the whole history if the cache was dropped) and idx but its last token go through the
        causal encoder, extending its cache; each decoder layer drops its self part and appends
        the K/V of the new encoder states to its cross part; the encoder's cache is then kept,
        dropped or offloaded (prefix_cache: Cache.store_prefix); then the decoder runs the
        block's first token. The first prefill encodes idx[:, :-1]. valid (B, n) bool marks left
        padding (False): the last column, the block's first token, is real in every row."""
        cache = cache or self.new_cache()
        cache.restore_prefix(idx.device)
        start, encoded = cache.block_start, cache.prefix[0].length  # encoded: start, or 0 (dropped)
        pending, pending_valid = (idx, valid) if cache.width == 0 else \
            joined(cache.columns(encoded), (idx, valid))
        enc_in = pending[:, :-1]  # (B, n_enc_in) columns encoded..encoded+n_enc_in-1
        cache.truncate(encoded)
        cache.record(enc_in, None if pending_valid is None else pending_valid[:, :-1])
        rope, mask = self.rope_and_mask(encoded, enc_in.shape[1], cache.valid, idx.device)
        states = self.ln_enc(self.run_cached(self.encoder, cache.prefix, self.embed(enc_in),
                                             rope, mask))
        new = enc_in.shape[1] - (start - encoded)  # the states not yet in the cross parts
        memory = states[:, states.shape[1] - new:]
        memory_rope = tuple(t[..., t.shape[-2] - new:, :] for t in rope)
        for block, layer_cache in zip(self.decoder, cache.layers):
            layer_cache.truncate(start)  # keep the cross part, drop the last block's self part
            block.remember(memory, memory_rope, layer_cache)
        cache.store_prefix(prefix_cache)
        cache.block_start = cache.pos = start + new
        cache.encoded = enc_in.shape[1]
        return self.decode(pending[:, -1:], cache,
                           None if pending_valid is None else pending_valid[:, -1:])

    def decode(self, idx_next, cache, valid=None):
        """Feed one token per row into the current block: n_dec layers only. valid (B,) bool:
        False feeds a padding column (a row that has stopped)."""
        return self.run_tokens(self.decoder, cache.layers, idx_next, cache,
                               _columns(valid, idx_next))


class EncoderDecoder(LM):
    """batch: enc_x (B, Te), enc_mask (B, Te) bool (True = real token, optional),
    dec_x (B, Td), y (B, Td) or None. Encoder and decoder positions each start at 0."""

    def __init__(self, config):
        super().__init__(config)
        assert config.kv_share == 1, "kv_share (cross-layer attention) is a dec option"
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

    def encode(self, enc_x, enc_mask=None, rope=None):
        """Bidirectional encoder: final states (B, Te, C) after its final norm. rope: the
        source's positions (default 0..Te-1)."""
        rope = self.rotary(0, enc_x.shape[1]) if rope is None else rope
        e = self.embed(enc_x)
        for block in self.encoder:
            e = block(e, rope, enc_mask)
        return self.ln_enc(e)

    def new_cache(self):
        return Cache(layers=(KVCache() for _ in self.decoder),
                     cross=(KVCache(chunk=1) for _ in self.decoder))

    def prefill(self, idx, cache=None, valid=None, prefix_cache="keep"):
        """The whole history up to the last token of idx (B, n) is the source; the decoder starts
        from that last token, as in training (source x[:s], decoder from x[s]). A bidirectional
        encoder's states change when its source grows, so each turn re-encodes everything: there
        is no encoder cache, and prefix_cache changes nothing. valid (B, n) bool marks left
        padding (False); the last column is real in every row."""
        history, valid = (idx, valid) if cache is None else joined(cache.columns(0), (idx, valid))
        return self.start(history[:, :-1], history[:, -1:], None if valid is None else valid[:, :-1])

    def start(self, source, dec_start, source_valid=None):
        """Encode source (B, Te) and run the decoder over dec_start (B, n): a fresh cache.
        source_valid (B, Te) bool marks padding in the source (anywhere; a row may have no real
        token); dec_start is real in every row.
        (Span-corruption models start from [prompt, sentinel] and [eot, sentinel]; see sample.py.)"""
        cache = self.new_cache()
        enc_mask = enc_rope = None
        if source_valid is not None:
            enc_mask, cache.cross_mask = padded_source_masks(source_valid)
            enc_rope = self.rotary.at(positions(source_valid, source.shape[1]))
            has_source = source_valid.any(1)
            cache.source_rows = None if bool(has_source.all()) else has_source[:, None, None]
        memory = self.encode(source, enc_mask, enc_rope)
        n = dec_start.shape[1]
        rope, mask = self.rope_and_mask(0, n, device=dec_start.device)
        h = self.embed(dec_start)
        for block, self_cache, cross_cache in zip(self.decoder, cache.layers, cache.cross):
            h = block(h, rope, mask, memory, cache.cross_mask, self_cache, cross_cache,
                      cache.source_rows)
        cache.record(source, source_valid)
        cache.record(dec_start)
        cache.pos, cache.encoded = n, source.shape[1]
        return self.next_logits(h), cache

    def decode(self, idx_next, cache, valid=None):
        """Feed one token per row to the decoder; the source's cross K/V are read from the cache.
        valid (B,) bool: False feeds a padding column (a row that has stopped)."""
        idx_next = idx_next.view(idx_next.shape[0], -1)
        cache.record(idx_next, _columns(valid, idx_next))
        dec_valid = None if cache.valid is None else cache.valid[:, cache.encoded:]
        rope, mask = self.rope_and_mask(cache.pos, 1, dec_valid, idx_next.device)
        h = self.embed(idx_next)
        for block, self_cache, cross_cache in zip(self.decoder, cache.layers, cache.cross):
            h = block(h, rope, mask, None, cache.cross_mask, self_cache, cross_cache,
                      cache.source_rows)
        cache.pos += 1
        return self.next_logits(h), cache


def _columns(valid, idx):
    """valid (B,) or (B, n) shaped like the token columns idx; None stays None (all real)."""
    return None if valid is None else valid.view(idx.shape[0], -1)


MODELS = {"dec": DecoderOnly, "encdec": EncoderDecoder, "bdd": BlockDoubleDecoder}


def build_model(arch, config):
    assert arch in MODELS, f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}"
    return MODELS[arch](config)

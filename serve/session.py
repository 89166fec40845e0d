"""
Conversations: a Session keeps a model's caches across turns, for one row or a batch of rows of
any lengths (sample.py --chat, the lab's multi-turn workload and chat loss). DESIGN.md section 3.

- dec extends one cache over the whole conversation;
- bdd starts a new decoder block at each turn's last prompt token: only the columns since the last
  block (the previous reply and the new text) go through its causal encoder, whose cache is kept
  (prefix_cache="keep"; "drop" frees it and re-encodes the history each turn; "offload" parks it in
  host memory between turns), and the decoder layers' last block is dropped;
- encdec re-encodes the whole history each turn (its encoder is bidirectional).

Each turn's new columns are left-padded (padding may then sit between turns in a row); a row that
writes a stop token feeds padding until the batch is done, so every row gets what it gets alone.
The model is driven through model.py's interface on serve/cache.py's caches.
"""

import time
from dataclasses import dataclass

import torch

from generate import decode_steps
from model import BlockDoubleDecoder, EncoderDecoder
from serve.cache import PREFIX_POLICIES, SessionCache, left_pad


@dataclass
class Generation:
    tokens: torch.Tensor    # (B, G) the new tokens; a row that stopped early repeats its stop token
    cache: object           # the session's cache after the turn (a SessionCache)
    encoded: int            # columns the turn's prefill ran through the encoder (dec: all layers)
    prefill_seconds: float
    decode_seconds: float   # spent in decode steps, G - 1 of them
    lengths: list           # per row, its new tokens up to and including its stop token


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Session:
    """A conversation with one model, its cache kept across turns.

    span_sentinel (span-corruption encdec checkpoints): such a model was trained to fill a
    sentinel, so each turn is generated T5-style: the encoder reads the history plus the sentinel,
    the decoder starts from [eot, sentinel] and writes the span until the next sentinel or eot.
    prefix_cache (bdd): what each turn's prefill leaves of the encoder's cache (keep, drop,
    offload; every policy gives the same tokens and logits). dec and encdec keep none.
    """

    def __init__(self, model, span_sentinel=None, eot=None, prefix_cache="keep"):
        assert prefix_cache in PREFIX_POLICIES, prefix_cache
        self.model, self.span_sentinel, self.eot = model, span_sentinel, eot
        self.prefix_cache = prefix_cache
        self.ended = False    # a last turn was taken: the cache kept nothing for another
        self.cache = None
        self.pending = None   # (B,) each row's last sampled token, not yet fed to the model
        self.rows = None      # per row, every token of the conversation (1-D tensors)

    @property
    def history(self):
        """(B, L) every token of the conversation, rows left-padded with zeros."""
        return None if self.rows is None else left_pad(self.rows)[0]

    def room(self, row=None):
        """Positions left in the model's context, in one row or in the fullest one. A span model
        keeps one for the sentinel its encoder reads after the history."""
        used = 0 if self.rows is None else (max(len(r) for r in self.rows) if row is None
                                            else len(self.rows[row]))
        return self.model.config.block_size - used - (self.span_sentinel is not None)

    @torch.no_grad()
    def turn(self, prompts, max_new_tokens, temperature=1.0, top_k=None, generator=None,
             stop_tokens=(), last=False):
        """Feed a new turn, then sample up to max_new_tokens per row. prompts: a (B, n) tensor or
        B token sequences of any lengths. last: no turn follows, so the cache keeps only what
        decode steps read (no encoder cache, whatever the policy, and no token history)."""
        assert not self.ended, "this session's last turn was taken"
        device = (prompts.device if isinstance(prompts, torch.Tensor)
                  else next(self.model.parameters()).device)
        rows = [torch.as_tensor(r, dtype=torch.long).view(-1).to(device) for r in prompts]
        self.check(rows, max_new_tokens)
        fresh = rows if self.pending is None else [torch.cat([p.view(1), r])
                                                   for p, r in zip(self.pending, rows)]
        self.rows = rows if self.rows is None else [torch.cat(h) for h in zip(self.rows, rows)]
        t0 = time.perf_counter()
        if self.span_sentinel is not None:
            logits = self.span_prefill()
            stop_tokens = (*stop_tokens, self.span_sentinel + 1, self.eot)
        elif isinstance(self.model, EncoderDecoder):
            logits = self.encdec_prefill()
        else:
            logits = self.prefill(*left_pad(fresh), "drop" if last else self.prefix_cache)
        if last:
            self.cache.forget_history()
            self.ended = True
        _sync(device)
        t1 = time.perf_counter()
        tokens, lengths = self._sample(logits, max_new_tokens, stop_tokens,
                                       dict(temperature=temperature, top_k=top_k,
                                            generator=generator))
        _sync(device)
        t2 = time.perf_counter()
        self.cache.columns.add_tokens(tokens[:, :-1])  # the columns the decode steps fed
        self.pending = tokens[:, -1]
        self.rows = [torch.cat([h, t[:n]]) for h, t, n in zip(self.rows, tokens, lengths)]
        return Generation(tokens, self.cache, self.cache.encoded, t1 - t0, t2 - t1, lengths)

    def check(self, rows, max_new_tokens):
        if self.rows is not None and len(rows) != len(self.rows):
            raise ValueError(f"this session has {len(self.rows)} rows; a turn needs a prompt for "
                             f"each, got {len(rows)}")
        if not rows:
            raise ValueError("a turn needs at least one prompt")
        for b, r in enumerate(rows):
            if len(r) == 0:
                raise ValueError(f"prompt {b} is empty")
            if len(r) + max_new_tokens - 1 > self.room(b):
                raise ValueError(f"context full: {len(r)} prompt tokens (row {b}) and "
                                 f"{max_new_tokens} new tokens do not fit in the {self.room(b)} "
                                 f"positions left of block_size {self.model.config.block_size}")

    def new_cache(self, rows, device, offset=0):
        """bdd keeps the token columns, which a next turn's encoder reads, and an encoder cache."""
        bdd = isinstance(self.model, BlockDoubleDecoder)
        return SessionCache(len(self.model.cached_layers()), len(self.model.encoder) if bdd else 0,
                            rows, device, history=bdd, offset=offset)

    def prefill(self, idx, valid, policy):
        """dec and bdd: feed the new columns idx (B, n) (valid marks padding) into the session's
        cache; the next-token logits (B, vocab)."""
        if self.cache is None:
            self.cache = self.new_cache(idx.shape[0], idx.device)
        cache = self.cache
        cache.columns.live = None
        cache.columns.record(idx, valid)
        if not isinstance(self.model, BlockDoubleDecoder):
            cache.encoded = idx.shape[1]
            return self.model.decode(idx, cache.decoder)
        return self.bdd_prefill(cache, policy)

    def bdd_prefill(self, cache, policy):
        """A new block at the last column fed: the columns the encoder cache has not seen (all
        of them, once it was dropped) go through the encoder, extending its cache; each decoder
        layer drops the last block and appends the new encoder states' K/V; the encoder cache is
        then kept, dropped or offloaded; the decoder runs the block's first token."""
        model, width = self.model, cache.columns.width
        cache.restore_encoder(cache.columns.device)
        encoder = cache.encoder
        tokens, _ = cache.columns.since(encoder.length)
        positions, mask = encoder.next(tokens.shape[1] - 1)
        memory = model.encode(tokens[:, :-1], model.rotary(positions), mask, encoder.layers)
        new = width - 1 - cache.block_start  # encoder states not yet in the decoder layers
        cache.decoder.truncate(cache.block_start)
        positions, _ = cache.decoder.next(new)
        model.remember(memory[:, memory.shape[1] - new:], model.rotary(positions), cache.decoder)
        cache.store_encoder(policy)
        cache.block_start, cache.encoded = width - 1, tokens.shape[1] - 1
        return model.decode(tokens[:, -1:], cache.decoder)

    def encdec_prefill(self):
        """The whole history but its last token is the source, re-encoded (bidirectional), and
        the decoder starts at that last token: a new cache each turn."""
        history, valid = left_pad(self.rows)
        return self.encdec_start(history[:, :-1], None if valid is None else valid[:, :-1],
                                 history[:, -1:])

    def span_prefill(self):
        """T5-style: the source is the history and a sentinel, the decoder starts [eot, sentinel]."""
        device = self.rows[0].device
        sentinel = torch.tensor([self.span_sentinel], device=device)
        source, valid = left_pad([torch.cat([h, sentinel]) for h in self.rows])
        start = torch.tensor([[self.eot, self.span_sentinel]], device=device)
        return self.encdec_start(source, valid, start.expand(len(self.rows), 2))

    def encdec_start(self, source, valid, start):
        """A new encdec cache: encode source (B, Te) (valid marks padding), then run the decoder
        over start (B, n), real in every row."""
        model, (B, Te) = self.model, source.shape
        self.cache = self.new_cache(B, source.device, offset=Te)
        self.cache.columns.record(source, valid)
        positions, mask = self.cache.decoder.source(Te)
        model.remember(model.encode(source, mask, positions), self.cache.decoder)
        self.cache.columns.record(start)
        self.cache.encoded = Te
        return model.decode(start, self.cache.decoder)

    def _sample(self, logits, max_new_tokens, stop_tokens, sampling):
        """Up to max_new_tokens per row from the prefill's logits (B, vocab), each fed back by a
        decode step; a row that has written a stop token feeds padding from then on (its cache
        stays what it would be alone). Returns tokens (B, G), a stopped row repeating its stop
        token, and each row's length."""
        columns = self.cache.columns

        def feed_padding(stopped):
            columns.live = ~stopped
        tokens = decode_steps(self.model.decode, logits, self.cache.decoder, max_new_tokens,
                              sampling, stop_tokens, feed_padding)
        n = lengths(tokens, stop_tokens) if stop_tokens else [tokens.shape[1]] * len(tokens)
        ends = torch.tensor(n, device=tokens.device)
        last = tokens.gather(1, (ends - 1)[:, None])
        after = torch.arange(tokens.shape[1], device=tokens.device) >= ends[:, None]
        return torch.where(after, last, tokens), n


def lengths(tokens, stop_tokens):
    """Each row's new tokens up to and including its first stop token: a list of B ints."""
    hit = torch.isin(tokens, torch.tensor(stop_tokens, dtype=torch.long, device=tokens.device))
    return torch.where(hit.any(1), hit.int().argmax(1) + 1, tokens.shape[1]).tolist()

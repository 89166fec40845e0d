"""
KV-cached generation for dec, encdec and bdd: one turn (generate) or a conversation (Session),
for one prompt or a batch of prompts of any lengths.

The model's prefill/decode (model.py) keep real KV caches; a Session drives them turn by turn:
- dec extends one cache over the whole conversation;
- bdd starts a new decoder block at each turn's last prompt token: only the tokens since the last
  block (the previous reply and the new text) go through its causal encoder, whose cache is kept
  (prefix_cache="keep"; "drop" frees it and re-encodes the history each turn; "offload" parks it
  in host memory between turns);
- encdec re-encodes the whole history each turn (its encoder is bidirectional).
One-turn generation keeps only what its decode steps read (bdd's encoder cache is freed).
A batch of prompts of different lengths is left-padded and each row gets what it would get alone;
num_samples prefills a prompt once and copies its cache into each sample's row.
"""

import time
from dataclasses import dataclass

import torch

from cache import PREFIX_POLICIES


@dataclass
class Generation:
    tokens: torch.Tensor    # (B, G) the new tokens; a row that stopped early repeats its stop token
    cache: object           # the model's cache after the turn
    encoded: int            # columns the turn's prefill ran through the encoder (dec: all layers)
    prefill_seconds: float
    decode_seconds: float   # spent in decode steps, G - 1 of them
    lengths: list           # per row, its new tokens up to and including its stop token


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Next token (B,) from logits (B, vocab): argmax when temperature is 0."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def left_pad(rows):
    """Token rows of any lengths (1-D tensors) -> idx (B, n), valid (B, n) bool (False = padding)
    or None when no row is padded: each row right-aligned, so that every row's last token sits in
    the last column (bdd's block boundary is then one column for the whole batch)."""
    n = max(len(r) for r in rows)
    if all(len(r) == n for r in rows):
        return torch.stack(rows), None
    idx = rows[0].new_zeros(len(rows), n)
    valid = torch.zeros(len(rows), n, dtype=torch.bool, device=idx.device)
    for b, r in enumerate(rows):
        idx[b, n - len(r):] = r
        valid[b, n - len(r):] = True
    return idx, valid


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Session:
    """A conversation with one model, one cache across turns, for one row or a batch of rows.

    A turn's prompts may have different lengths: each turn's new tokens are left-padded (padding
    may then sit between turns in a row's cache; the model masks it everywhere), and each row gets
    what it would get alone. A row that writes a stop token feeds padding until the batch is done.

    `span_sentinel` (span-corruption encdec checkpoints): such a model was trained to fill a
    sentinel, so each turn is generated T5-style: the encoder reads the history plus the sentinel,
    the decoder starts from [eot, sentinel] and writes the span until the next sentinel or eot.

    `prefix_cache` (bdd): what each turn's prefill leaves of the encoder's cache for the next turn
    (DESIGN.md section 3). keep: it stays with the session (the next turn encodes only its new
    tokens; memory about dec's); drop: freed once its states are in the decoder layers (the next
    turn re-encodes the whole history, like encdec: less memory, more compute); offload (CUDA):
    moved to pinned host memory, brought back for the next prefill. Every policy gives the same
    tokens and logits. dec and encdec keep no encoder cache: the policy changes nothing for them.
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
             stop_tokens=(), num_samples=1, last=False):
        """Feed a new turn, then sample up to max_new_tokens per row. prompts: a (B, n) tensor or
        B token sequences of any lengths. num_samples: the turn is prefilled once, then each row's
        cache is copied into that many rows (B * num_samples rows from then on). last: no turn
        follows, so the cache keeps only what decode steps read (no encoder cache, whatever the
        policy, and no token history)."""
        assert not self.ended, "this session's last turn was taken"
        device = (prompts.device if isinstance(prompts, torch.Tensor)
                  else next(self.model.parameters()).device)
        rows = [torch.as_tensor(r, dtype=torch.long).view(-1).to(device) for r in prompts]
        self._check(rows, max_new_tokens, num_samples)
        fresh = rows if self.pending is None else [torch.cat([p.view(1), r])
                                                   for p, r in zip(self.pending, rows)]
        self.rows = rows if self.rows is None else [torch.cat(h) for h in zip(self.rows, rows)]
        t0 = time.perf_counter()
        if self.span_sentinel is None:
            idx, valid = left_pad(fresh)
            logits, self.cache = self.model.prefill(idx, self.cache, valid=valid, prefix_cache=
                                                    "drop" if last else self.prefix_cache)
        else:
            sentinel = torch.tensor([self.span_sentinel], device=device)
            source, source_valid = left_pad([torch.cat([h, sentinel]) for h in self.rows])
            start = torch.tensor([[self.eot, self.span_sentinel]], device=device).expand(len(rows), 2)
            logits, self.cache = self.model.start(source, start, source_valid)
            stop_tokens = (*stop_tokens, self.span_sentinel + 1, self.eot)
        if last:
            self.cache.forget_history()
            self.ended = True
        if num_samples > 1:
            logits = logits.repeat_interleave(num_samples, 0)
            self.cache.repeat_rows(num_samples)
            self.rows = [h for h in self.rows for _ in range(num_samples)]
        _sync(device)
        t1 = time.perf_counter()
        tokens, lengths = self._sample(logits, max_new_tokens, stop_tokens,
                                       dict(temperature=temperature, top_k=top_k, generator=generator))
        _sync(device)
        t2 = time.perf_counter()
        self.pending = tokens[:, -1]
        self.rows = [torch.cat([h, t[:n]]) for h, t, n in zip(self.rows, tokens, lengths)]
        return Generation(tokens, self.cache, self.cache.encoded, t1 - t0, t2 - t1, lengths)

    def _check(self, rows, max_new_tokens, num_samples):
        if self.rows is not None and len(rows) != len(self.rows):
            raise ValueError(f"this session has {len(self.rows)} rows; a turn needs a prompt for "
                             f"each, got {len(rows)}")
        assert num_samples >= 1, num_samples
        if not rows:
            raise ValueError("a turn needs at least one prompt")
        for b, r in enumerate(rows):
            if len(r) == 0:
                raise ValueError(f"prompt {b} is empty")
            if len(r) + max_new_tokens - 1 > self.room(b):
                raise ValueError(f"context full: {len(r)} prompt tokens (row {b}) and "
                                 f"{max_new_tokens} new tokens do not fit in the {self.room(b)} "
                                 f"positions left of block_size {self.model.config.block_size}")

    def _sample(self, logits, max_new_tokens, stop_tokens, sampling):
        """Up to max_new_tokens per row from the prefill's logits (B, vocab). A row that has
        written a stop token feeds padding from then on: its cache stays what it would be alone,
        its stop token pending. Returns tokens (B, G) and each row's length."""
        B, device = logits.shape[0], logits.device
        stops = torch.tensor(stop_tokens, dtype=torch.long, device=device)
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for i in range(max_new_tokens):
            nxt = sample_next(logits, **sampling)  # (B,)
            out.append(nxt)
            if i == max_new_tokens - 1:
                break
            valid = None
            if stop_tokens:
                stopped |= torch.isin(nxt, stops)
                n_stopped = int(stopped.sum())
                if n_stopped == B:
                    break
                valid = ~stopped if n_stopped else None
            logits, self.cache = self.model.decode(nxt, self.cache, valid=valid)
        tokens = torch.stack(out, 1)  # (B, G)
        hit = torch.isin(tokens, stops)
        lengths = torch.where(hit.any(1), hit.int().argmax(1) + 1, tokens.shape[1])
        last = tokens.gather(1, (lengths - 1)[:, None])
        after = torch.arange(tokens.shape[1], device=device) >= lengths[:, None]
        return torch.where(after, last, tokens), lengths.tolist()


def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, generator=None,
             stop_tokens=(), span_sentinel=None, eot=None, num_samples=1):
    """Sample max_new_tokens after each prompt (a (B, P) tensor, or B sequences of any lengths)
    with a KV cache: a one-turn Session, whose cache keeps only what its decode steps read (bdd's
    encoder cache is freed as soon as its states are in the decoder layers). num_samples:
    continuations per prompt, from one prefill whose cache is copied into each (rows
    b * num_samples .. b * num_samples + num_samples - 1)."""
    return Session(model, span_sentinel, eot).turn(prompts, max_new_tokens, temperature, top_k,
                                                    generator, stop_tokens, num_samples, last=True)

"""
A serving engine in the spirit of nano-vllm: requests join and leave at every step
(continuous batching), their K/V live in pages of a pool sized from a memory budget (paged KV), a
prompt's full pages are shared by their chained hashes and stay cached until the pool needs them
(prefix caching), and a request that cannot get a page is preempted and recomputed. Every request
gets exactly the tokens it gets alone from generate.generate.

    engine = Engine(model, EngineConfig(budget_mb=8))
    outputs = engine.generate([prompt_ids, ...], SamplingParams(max_new_tokens=64))  # token lists
    req = engine.add(prompt_ids, params); finished = engine.step()   # or step by step

Each arch's rules say what it holds (its groups, serve/block_manager.py) and how its prefill
fills them. dec: its K/V-projecting layers, every full page a prefix block. bdd: the decoder
layers' K/V ([the encoder states' before the block boundary | the block's own], one table) and
the encoder's K/V, read only when a later prompt that starts the same is encoded; the full pages
before the boundary (the prompt's last token) are prefix blocks in both. A prefill encodes the
columns after its hits on their cached encoder pages (as Session's prefix_cache="keep") and
projects them into the decoder's pages; then its encoder blocks go to the prefix cache: kept while
the pool has room (a next turn hits them), the first to go under pressure (like "drop"). encdec:
the decoder's self and cross K/V; its encoder is bidirectional, so a cross page depends on the
whole source and is no other prompt's prefix: encdec caches none. A prefill step feeds its
requests as one left-padded batch (serve/paged.py), a decode step a token for every running one.
"""

import time
from dataclasses import dataclass

import torch

from generate import sample_next
from model import BlockDoubleDecoder, EncoderDecoder
from serve.block_manager import PAGE_SIZE, BlockManager, Group, Pool
from serve.cache import left_pad
from serve.memory import held_bytes
from serve.paged import PagedCache
from serve.scheduler import Request, SamplingParams, Scheduler


@dataclass
class EngineConfig:
    budget_mb: float = 16.0        # the page pool: every K/V the engine holds (MB = 1e6 bytes)
    page_size: int = PAGE_SIZE     # columns per page
    max_batch_tokens: int = 1024   # a prefill step's rows x its longest (one may exceed it)
    max_seqs: int = 256            # running requests at most


# -----------------------------------------------------------------------------
# what each arch holds, and its prefill


class DecRules:
    decode_group, transient = "kv", ()   # the group decode steps append to; released after prefill

    def __init__(self, model):
        self.model, self.groups = model, {"kv": Group("kv", len(model.cached_layers()))}

    def columns(self, P, T):
        """{group: columns} after a prefill of T tokens, of which the prompt's P."""
        return {"kv": T}

    def prefix(self, req):
        """{group: columns whose full pages are prefix blocks}."""
        return {"kv": len(req.tokens)}

    def prefill(self, batch, cache_of):
        """The next-token logits (B, vocab) of each request, the tokens after its hits fed."""
        cache = cache_of(batch, "kv")
        new, counts = padded([r.tokens[r.lengths["kv"]:] for r in batch], cache.device)
        cache.expect(counts)
        return self.model.decode(new, cache)

    def decode_cache(self, batch, cache_of):
        return cache_of(batch, self.decode_group)


class BddRules(DecRules):
    decode_group, transient = "dec", ("enc",)

    def __init__(self, model):
        c, self.model = model.config, model
        self.groups = {"dec": Group("dec", c.n_dec_layer), "enc": Group("enc", c.n_enc_layer)}

    def columns(self, P, T):
        return {"dec": T, "enc": P - 1}

    def prefix(self, req):
        return {"dec": req.boundary, "enc": req.boundary}

    def prefill(self, batch, cache_of):
        """serve/session.py's bdd_prefill with a boundary per row: the columns from the hits to
        the boundary through the encoder (on its cached pages), their states into the decoder's
        pages; then the block: the prompt's last token (after a preemption, and those since)."""
        model, enc, dec = self.model, cache_of(batch, "enc"), cache_of(batch, "dec")
        todo = [r.tokens[r.lengths["enc"]:r.boundary] for r in batch]
        if any(todo):
            src, counts = padded(todo, enc.device)
            enc.expect(counts)
            positions, mask = enc.next(src.shape[1])
            memory = model.encode(src, model.rotary(positions), mask, enc.layers)
            dec.expect(counts)
            positions, _ = dec.next(src.shape[1])
            model.remember(memory, model.rotary(positions), dec)
        block, counts = padded([r.tokens[r.boundary:] for r in batch], dec.device)
        dec.expect(counts)
        return model.decode(block, dec)


class EncDecRules(DecRules):
    decode_group, transient = "self", ()

    def __init__(self, model):
        n, self.model = model.config.n_dec_layer, model
        self.groups = {"self": Group("self", n), "cross": Group("cross", n)}

    def columns(self, P, T):
        return {"self": T - (P - 1), "cross": P - 1}

    def prefix(self, req):
        return {}

    def prefill(self, batch, cache_of):
        """model.prefill with a source per row: encoded, its K/V into the cross pages; then the
        decoder from the prompt's last token (after a preemption, and the tokens since)."""
        model, cache = self.model, self.decode_cache(batch, cache_of)
        src, counts = padded([r.tokens[:r.boundary] for r in batch], cache.device)
        cache.source_cache.expect(counts)
        positions, mask = cache.source(src.shape[1])
        model.remember(model.encode(src, mask, positions), cache)
        stream, counts = padded([r.tokens[r.boundary:] for r in batch], cache.device)
        cache.expect(counts)
        return model.decode(stream, cache)

    def decode_cache(self, batch, cache_of):
        return cache_of(batch, "self", source=cache_of(batch, "cross"))


def rules_of(model):
    if isinstance(model, BlockDoubleDecoder):
        return BddRules(model)
    return EncDecRules(model) if isinstance(model, EncoderDecoder) else DecRules(model)


def padded(rows, device):
    """Token lists -> (B, n) left-padded on device, and each row's length."""
    idx, _ = left_pad([torch.tensor(r, dtype=torch.long) for r in rows])
    return idx.to(device), [len(r) for r in rows]


# -----------------------------------------------------------------------------
# the engine


class Engine:
    """add() requests at any time, step() until none is left (or run()). clock: what events are
    stamped with (a benchmark may skip the idle time between arrivals)."""

    def __init__(self, model, config=None, clock=time.perf_counter):
        self.model, self.config, self.clock = model.eval(), config or EngineConfig(), clock
        c, weight = model.config, model.wte.weight
        self.rules = rules_of(model)
        self.pool = Pool.for_budget(self.config.budget_mb * 1e6, self.config.page_size,
                                    c.n_kv_head, c.n_embd // c.n_head, weight.dtype, weight.device)
        self.manager = BlockManager(self.pool.num_pages)
        self.scheduler = Scheduler(self.manager, self.rules, self.config.page_size,
                                   self.config.max_batch_tokens, self.config.max_seqs)
        self.requests, self.steps = [], 0
        self.prefill_steps = self.decode_rows = self.tokens_out = self.peak_running = 0

    def add(self, prompt, params=None, arrival=None):
        """Queue a request (prompt token ids, SamplingParams); ValueError if it does not fit the
        context, or could never fit the pool."""
        params, prompt = params or SamplingParams(), [int(t) for t in prompt]
        req = Request(len(self.requests), prompt, params,
                      self.clock() if arrival is None else arrival)
        room, n = self.model.config.block_size, params.max_new_tokens
        if not prompt or n < 1:
            raise ValueError("a request needs a prompt and at least one new token")
        if len(prompt) + n - 1 > room:
            raise ValueError(f"{len(prompt)} prompt tokens and {n} new tokens do not fit in the "
                             f"context of {room}")
        if self.scheduler.pages_at_most(req) > self.pool.num_pages:
            raise ValueError(f"a request of {len(prompt)} + {n} tokens needs more than the "
                             f"pool's {self.pool.num_pages} pages")
        self.requests.append(req)
        self.scheduler.waiting.append(req)
        return req

    @torch.no_grad()
    def step(self):
        """One forward: a prefill of the requests admitted, or a decode step of the running
        ones. Returns the requests that finished."""
        batch, prefill = self.scheduler.schedule()
        if not batch:
            return []
        forward = self.rules.prefill if prefill else self.decode
        tokens = sample(forward(batch, self.cache_of), batch)
        self.steps += 1
        self.prefill_steps += prefill
        self.decode_rows += 0 if prefill else len(batch)
        self.tokens_out += len(batch)
        self.peak_running = max(self.peak_running, len(self.scheduler.running))
        return self.scheduler.postprocess(batch, tokens, prefill, self.clock())

    def decode(self, batch, cache_of):  # each request's last token, fed
        last = torch.tensor([[r.output[-1]] for r in batch], device=self.pool.k.device)
        return self.model.decode(last, self.rules.decode_cache(batch, cache_of))

    def cache_of(self, batch, group, source=None):
        """The batch's pages in group, as a cache the model can use."""
        return PagedCache(self.pool, self.rules.groups[group].layers,
                          [r.tables[group] for r in batch], [r.lengths[group] for r in batch],
                          source)

    def busy(self):
        return bool(self.scheduler.waiting or self.scheduler.running)

    def run(self):
        """Step until every request has finished; the finished ones in finishing order."""
        done = []
        while self.busy():
            done += self.step()
        return done

    def generate(self, prompts, params=None):
        """The new tokens of each prompt (token lists), in order."""
        reqs = [self.add(p, params) for p in prompts]
        self.run()
        return [r.output for r in reqs]

    def tensors(self):
        """Every tensor the engine holds between steps: its pool."""
        return self.pool.tensors()

    def metrics(self):
        m, s = self.manager, self.scheduler
        return {"pages": m.num_pages, "peak_pages": m.peak_used,
                "pool_bytes": sum(held_bytes(self.tensors()).values()), "steps": self.steps,
                "prefill_steps": self.prefill_steps, "peak_running": self.peak_running,
                "mean_decode_batch": self.decode_rows / max(1, self.steps - self.prefill_steps),
                "preemptions": s.preemptions, "evictions": m.evictions,
                "prompt_tokens": s.prompt_tokens, "hit_tokens": s.hit_tokens}


def sample(logits, batch):
    """Each request's next token from its row of logits (B, vocab): greedy rows by one argmax,
    the others each with its own generator, so that its samples do not depend on its batch."""
    tokens = logits.argmax(-1).tolist()
    for i, req in enumerate(batch):
        p = req.params
        if p.temperature:
            if req.generator is None:
                req.generator = torch.Generator(logits.device).manual_seed(p.seed)
            tokens[i] = int(sample_next(logits[i:i + 1], p.temperature, p.top_k, req.generator))
    return tokens

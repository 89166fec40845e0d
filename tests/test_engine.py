"""The serving engine (serve/engine.py): every request gets exactly the tokens it gets
alone from generate(), for every arch and variant, whatever its arrival, its batch, its
preemptions and its prefix hits, in a pool so small that preemption and eviction happen; the
pages held never exceed the pool, and the pool is the budget; bdd's encoder pages are released
after each prefill, hit by the next turn while they stay, evicted under pressure."""

import random

import pytest
import torch

from generate import generate
from model import ModelConfig, build_model
from serve.block_manager import PAGE_SIZE, Pool
from serve.engine import Engine, EngineConfig, rules_of
from serve.memory import held_bytes
from serve.scheduler import SamplingParams

V = 41
VARIANTS = [("dec", {}), ("dec", {"n_kv_head": 1}), ("dec", {"kv_share": 3}), ("encdec", {}),
            ("bdd", {}), ("bdd", {"n_kv_head": 1})]


def model_of(arch, sharp, **kw):
    """A tiny float64 model with sharp attention (conftest.sharpen): a wrong column or position
    changes its greedy tokens."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=V, block_size=96, n_layer=4, n_dec_layer=2, n_head=2,
                         n_embd=16, bias=True, **kw)
    return sharp(build_model(arch, config)).eval()


def alone(model, prompt, new_tokens):
    return generate(model, torch.tensor([prompt]), new_tokens, temperature=0)[0].tolist()


def pool_bytes(model, pages):
    """The budget (bytes) of a pool of `pages` pages for model."""
    c = model.config
    one = Pool(1, PAGE_SIZE, c.n_kv_head, c.n_embd // c.n_head, torch.float64, "cpu")
    return pages * sum(held_bytes(one.tensors()).values())


def books_balance(manager):
    """Every page is free, in a cached block, or held by a request; none is in two places."""
    cached = {p for b in manager.cached.values() for p in b.pages}
    assert len(manager.free) == len(set(manager.free)) and not cached & set(manager.free)
    assert manager.lru_pages == sum(len(b.pages) for b in manager.lru.values())
    assert 0 <= manager.used <= manager.num_pages and manager.peak_used <= manager.num_pages


def serve(engine, arrivals, budget):
    """Add arrivals [(step, prompt, new tokens)] at their steps and step until all are done,
    checking after every step that the books balance and that the pages held and the bytes the
    engine holds stay within the pool and the budget. Returns the requests, in order."""
    reqs, step = [], 0
    pending = sorted(arrivals, key=lambda a: a[0])
    while pending or engine.busy():
        while pending and pending[0][0] <= step:
            _, prompt, new = pending.pop(0)
            reqs.append(engine.add(prompt, SamplingParams(max_new_tokens=new)))
        engine.step()
        books_balance(engine.manager)
        assert engine.manager.used <= engine.pool.num_pages
        assert sum(held_bytes(engine.tensors()).values()) <= budget
        step += 1
    return reqs


def workload(rng):
    """A burst of short prompts with long answers (admitted together, they outgrow the pool:
    preemptions), then prompts of 1 to 40 tokens, half of them after one of two shared preambles
    (prefix hits), at random steps, each with up to 24 new tokens."""
    preambles = [[rng.randrange(V) for _ in range(n)] for n in (35, 21)]
    arrivals = [(0, [rng.randrange(V) for _ in range(rng.randint(3, 8))], rng.randint(50, 60))
                for _ in range(4)]
    for i in range(12):
        own = [rng.randrange(V) for _ in range(rng.randint(1, 20 if i % 2 else 40))]
        prompt = rng.choice(preambles) + own if i % 2 else own
        arrivals.append((rng.randint(0, 30), prompt, rng.randint(1, 24)))
    return arrivals


@pytest.mark.parametrize("arch, kw", VARIANTS)
def test_every_request_gets_its_tokens_alone(arch, kw, sharp):
    """Two rounds of requests (the second: each first request's tokens and a new message, a
    next turn) through a pool of 7 blocks of every group (a block of the context's 96 columns
    needs 6): preemptions and evictions happen, prefix hits too (dec and bdd), and every request
    gets its tokens alone."""
    model, rng = model_of(arch, sharp, **kw), random.Random(0)
    pages = 7 * sum(g.layers for g in rules_of(model).groups.values())
    budget = pool_bytes(model, pages)
    engine = Engine(model, EngineConfig(budget_mb=budget / 1e6, max_batch_tokens=64))
    first = serve(engine, workload(rng), budget)
    turns = []
    for r in first:
        prompt = r.tokens + [rng.randrange(V) for _ in range(rng.randint(1, 8))]
        turns.append((rng.randint(0, 20), prompt, min(rng.randint(1, 16), 97 - len(prompt))))
    second = serve(engine, turns, budget)
    for req in first + second:
        assert req.output == alone(model, req.prompt, req.params.max_new_tokens), req.id
    m = engine.metrics()
    assert m["pages"] == pages and m["peak_pages"] <= pages
    assert m["preemptions"] > 0
    if arch != "encdec":  # encdec caches no prefix: its cross K/V depend on the whole source
        assert m["evictions"] > 0 and m["hit_tokens"] > 0


def test_bdd_encoder_pages_are_released_after_the_prefill_and_hit_by_the_next_turn(
        sharp, monkeypatch):
    """After a prefill bdd holds only its decoder pages; its encoder pages are cached, so the
    next turn encodes only the columns after the full pages of the last turn's encoder cache."""
    model, rng = model_of("bdd", sharp), random.Random(1)
    engine = Engine(model, EngineConfig(budget_mb=1.0))
    encoded = []
    real_encode = model.encode
    monkeypatch.setattr(model, "encode", lambda idx, *a: encoded.append(idx.shape[1]) or
                        real_encode(idx, *a))
    prompt = [rng.randrange(V) for _ in range(40)]
    first = engine.add(prompt, SamplingParams(max_new_tokens=10))
    engine.step()
    assert "enc" not in first.tables and encoded == [39]
    assert engine.manager.used == len(first.tables["dec"]) * model.config.n_dec_layer
    assert sum(key[0] == "enc" for key in engine.manager.lru) == 39 // PAGE_SIZE
    engine.run()
    second = engine.add(first.tokens + [1, 2, 3], SamplingParams(max_new_tokens=10))
    engine.run()
    hit = 39 // PAGE_SIZE * PAGE_SIZE
    assert second.cached_tokens == hit and encoded[-1] == len(second.prompt) - 1 - hit
    assert second.output == alone(model, second.prompt, 10)


def test_bdd_encoder_pages_are_evicted_under_pressure(sharp):
    """A pool of 16 pages holds one request's prefill (12 pages) and little else: the first
    request's encoder pages, the oldest cached ones, go when the next request needs room, so its
    next turn misses, and still gets its tokens alone."""
    model, rng = model_of("bdd", sharp), random.Random(2)
    budget = pool_bytes(model, 16)
    engine = Engine(model, EngineConfig(budget_mb=budget / 1e6))
    first = engine.add([rng.randrange(V) for _ in range(40)], SamplingParams(max_new_tokens=8))
    engine.run()
    others = [engine.add([rng.randrange(V) for _ in range(40)], SamplingParams(max_new_tokens=8))
              for _ in range(3)]
    engine.run()
    assert not any(key[0] == "enc" and key in engine.manager.cached
                   for key in [("enc", d) for d in first.digests])
    again = engine.add(first.tokens + [5], SamplingParams(max_new_tokens=8))
    engine.run()
    assert engine.manager.evictions > 0 and again.cached_tokens == 0
    for req in [first, *others, again]:
        assert req.output == alone(model, req.prompt, 8)


def test_a_next_turn_hits_when_its_admission_must_evict(sharp):
    """A pool of 18 pages: after a first request (its encoder and decoder prefix blocks cached,
    the oldest in the LRU) and a second one that leaves only 2 pages free, the first one's next
    turn shares its 4 cached blocks, whose pages the new blocks it needs must not evict."""
    model, rng = model_of("bdd", sharp), random.Random(3)
    engine = Engine(model, EngineConfig(budget_mb=pool_bytes(model, 18) / 1e6))
    first = engine.add([rng.randrange(V) for _ in range(40)], SamplingParams(max_new_tokens=8))
    engine.run()
    engine.add([rng.randrange(V) for _ in range(33)], SamplingParams(max_new_tokens=1))
    engine.run()
    assert len(engine.manager.free) == 2 and engine.manager.lru_pages == 16
    again = engine.add(first.tokens + [5], SamplingParams(max_new_tokens=8))
    engine.run()
    assert again.cached_tokens == 32 and engine.manager.evictions > 0
    assert again.output == alone(model, again.prompt, 8)


def test_the_pool_is_the_budget_and_requests_that_cannot_fit_are_refused(sharp):
    model = model_of("dec", sharp)
    budget = pool_bytes(model, 10) + 100  # not quite 11 pages
    engine = Engine(model, EngineConfig(budget_mb=budget / 1e6))
    assert engine.pool.num_pages == 10 and engine.metrics()["pool_bytes"] == pool_bytes(model, 10)
    with pytest.raises(ValueError, match="context"):
        engine.add([1] * 90, SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="pool"):  # 3 blocks x 4 layers > 10 pages
        engine.add([1] * 40, SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="holds no page"):
        Engine(model, EngineConfig(budget_mb=1e-4))


def test_sampling_depends_on_the_request_not_its_batch(sharp):
    """A sampled request (its own seed) writes the same tokens alone and among others."""
    model = model_of("bdd", sharp)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=10, seed=7)
    prompt = list(range(1, 20))
    by_itself = Engine(model).generate([prompt], params)[0]
    engine = Engine(model)
    engine.add([3] * 30, SamplingParams(max_new_tokens=20))
    mine = engine.add(prompt, params)
    engine.add([4] * 5, SamplingParams(max_new_tokens=5, temperature=0.5, seed=1))
    engine.run()
    assert mine.output == by_itself

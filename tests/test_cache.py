"""What the caches hold (DESIGN.md section 3): every prefix-cache policy gives the uncached
forward's logits, nbytes() is every storage reachable from a cache, one-turn generation holds
only what its decode steps read, caches grow in chunks, and bdd holds a third of dec."""

import pytest
import torch

from generate import generate
from lab.measure import measure_decode
from model import ARCHS, CHUNK, ModelConfig, build_model
from serve.cache import padded_batch
from serve.memory import nbytes
from serve.session import Session
from test_model import OPTIONS
from test_sample import V, forward_logits

POLICIES = ("keep", "drop")  # offload needs CUDA: tests/test_gpu_paths.py


def tiny(**kw):
    cfg = dict(vocab_size=V, block_size=64, n_layer=3, n_dec_layer=1, n_head=2, n_embd=16)
    return ModelConfig(**{**cfg, **kw})


def three_turns(session, lengths, G, logged, seed=0):
    """Greedy turns of G tokens after random prompts, lengths[t][b] tokens for row b in turn t.
    Returns per turn (its Generation, the logits (G, B, V) it sampled from, and what the cache
    was after it: (block_start, nbytes()))."""
    g = torch.Generator().manual_seed(seed)
    turns = []
    for row_lengths in lengths:
        logged.clear()
        prompts = [torch.randint(0, V, (n,), generator=g) for n in row_lengths]
        gen = session.turn(prompts, G, temperature=0)
        turns.append((gen, torch.stack(logged), (gen.cache.block_start, nbytes(gen.cache))))
    return turns


@pytest.mark.parametrize("lengths", [[[5, 5], [3, 3], [4, 4]],          # no padding
                                     [[5, 1, 8], [3, 6, 1], [2, 4, 7]]])  # padded every turn
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch, kw", OPTIONS)
def test_every_policy_equals_the_uncached_forward(arch, kw, policy, lengths, sharp, logged):
    """Each row of a batched three-turn session gets the logits of one training forward over its
    own conversation (bdd: block boundaries at the turn starts). Sharp attention in float64
    (conftest.sharpen): a wrong position or a lost column moves logits by more than 1. bdd with
    drop re-encodes the whole history each turn; with keep, only the tokens since the last block."""
    torch.manual_seed(0)
    model = sharp(build_model(arch, tiny(**{"n_layer": 4, "n_dec_layer": 2, **kw}))).eval()
    session = Session(model, prefix_cache=policy)
    G = 3
    turns = three_turns(session, lengths, G, logged)
    for b, row in enumerate(session.rows):
        starts, end = [], 0
        for t in range(len(lengths)):
            end += lengths[t][b]
            starts.append(end - 1)
            end += G
        ref = forward_logits(arch, model, row[None], starts)[0]
        for (_, logits, _), s in zip(turns, starts):
            assert (logits[:, b] - ref[s:s + G]).abs().max() < 1e-9, (b, s)
    if arch == "bdd":
        for t, (gen, _, (block_start, held)) in enumerate(turns):
            whole = gen.encoded == block_start  # every column before the block
            assert whole == (t == 0 or policy == "drop"), (t, gen.encoded, block_start)
            assert bool(held["prefix_held"]) == (policy == "keep")


def reachable_storages(root):
    """{(device, data_ptr): bytes} of every tensor storage reachable from root through
    attributes, lists, tuples and dicts: an independent count of what nbytes() says."""
    seen, storages, todo = set(), {}, [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            storages[(str(s.device), s.data_ptr())] = s.nbytes()
        elif isinstance(obj, (list, tuple, set)):
            todo.extend(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif hasattr(obj, "__dict__"):
            todo.extend(vars(obj).values())
    return storages


def per_device(storages):
    out = {}
    for (device, _), n in storages.items():
        out[device] = out.get(device, 0) + n
    return out


def caches_to_check(arch, **kw):
    """(name, cache) after one-turn generation (equal and padded prompts), and after a padded
    session of two turns under each policy."""
    torch.manual_seed(0)
    model = build_model(arch, tiny(**kw)).eval()
    prompts = [torch.randint(0, V, (n,)) for n in (6, 2, 9)]
    plain = model.new_cache()
    generate(model, torch.stack([prompts[0]] * 2), 5, temperature=0, cache=plain)
    idx, padded = padded_batch(model, prompts)
    generate(model, idx, 5, temperature=0, cache=padded)
    out = [("generate", plain), ("generate, padded", padded)]
    for policy in POLICIES:
        session = Session(model, prefix_cache=policy)
        session.turn(prompts, 4, temperature=0)
        out.append((policy, session.turn([p[:3] for p in prompts], 7, temperature=0).cache))
    return out


@pytest.mark.parametrize("arch, kw", OPTIONS)
def test_nbytes_counts_every_reachable_storage(arch, kw):
    for name, cache in caches_to_check(arch, **kw):
        held = nbytes(cache)
        assert held["held"] == per_device(reachable_storages(cache)), name
        encoder = getattr(cache, "encoder", None)  # a session's: its layers' K/V
        assert held["prefix_held"] == per_device(reachable_storages(encoder and encoder.layers))
        assert held["held"]["cpu"] >= held["decode"] + held["prefix"] > 0, name


def test_nbytes_counts_a_view_with_its_whole_base():
    """A cache that kept a view (here: the first column of its token history) holds the whole
    tensor under it; that is what nbytes() counts, once."""
    cache = caches_to_check("bdd")[2][1]
    before = nbytes(cache)["held"]["cpu"]
    cache.columns.tokens = cache.columns.tokens[:, :1]
    assert nbytes(cache)["held"]["cpu"] == before == per_device(reachable_storages(cache))["cpu"]


@pytest.mark.parametrize("arch, kw", OPTIONS)
def test_one_turn_generation_holds_only_what_decoding_reads(arch, kw):
    """generate()'s cache holds no encoder cache (bdd's encoder runs once over the prompt,
    without one), no token history, no view of either: what is reachable from it is the K/V the
    decode steps read (and, for a padded batch, which columns are padding)."""
    for name, cache in caches_to_check(arch, **kw)[:2]:
        read = [cache.layers, cache.cross, getattr(cache, "cross_mask", None)]
        if name.endswith("padded"):
            assert cache.columns.tokens is None
            read.append(cache.columns.valid)
        assert set(reachable_storages(cache)) == set(reachable_storages(read)), name


def test_caches_grow_in_chunks():
    """Every growing buffer holds fewer than CHUNK empty columns at every step, encdec's cross
    K/V exactly its columns; a session's encoder cache too, turn after turn."""
    torch.manual_seed(0)
    for arch in ARCHS:
        model = build_model(arch, tiny(block_size=80)).eval()
        for n in (3, 20):
            cache = model.new_cache()
            logits = model.prefill(torch.randint(0, V, (2, n)), cache)
            for _ in range(17):
                for c in cache.layers:
                    assert 0 <= c.k.shape[2] - c.length < CHUNK, (arch, c.k.shape, c.length)
                assert all(k.shape[2] == n - 1 for k, _ in cache.cross or ())
                logits = model.decode(logits.argmax(-1, keepdim=True), cache)
    session = Session(build_model("bdd", tiny(block_size=80)).eval())
    for n in (3, 20, 1):
        session.turn(torch.randint(0, V, (2, n)), 5, temperature=0)
        for c in session.cache.encoder.layers + session.cache.decoder.layers:
            assert 0 <= c.k.shape[2] - c.length < CHUNK


@pytest.mark.parametrize("arch, kw", OPTIONS)
def test_held_is_within_15_percent_of_filled_at_context_128(arch, kw):
    torch.manual_seed(0)
    model = build_model(arch, tiny(block_size=256, **kw)).eval()
    m = measure_decode(model, 128, batch_size=4, count_flops=False)
    assert m["held_bytes_per_seq"] * 4 <= 1.15 * m["kv_bytes"]


SPLIT = dict(n_layer=6, n_dec_layer=2, n_head=2, n_embd=32, block_size=160)  # 2:1, as the paper


def test_bdd_holds_a_third_of_dec_per_sequence():
    """One turn at context 128, batch 4: everything a bdd cache holds is at most 0.36x dec's."""
    held = {}
    for arch in ("dec", "bdd"):
        torch.manual_seed(0)
        model = build_model(arch, tiny(**SPLIT)).eval()
        held[arch] = measure_decode(model, 128, batch_size=4,
                                    count_flops=False)["held_bytes_per_seq"]
    assert held["bdd"] <= 0.36 * held["dec"]


def test_multi_turn_bdd_with_drop_holds_a_third_of_dec(logged):
    """Three padded turns: after each turn's decoding, a bdd session that drops its encoder cache
    holds at most 0.36x of what a dec session holds; one that keeps it holds about dec's."""
    lengths = [[40, 31, 22, 35], [20, 13, 30, 8], [25, 9, 17, 33]]
    held = {}
    for arch, policy in (("dec", "keep"), ("bdd", "drop"), ("bdd", "keep")):
        torch.manual_seed(0)
        model = build_model(arch, tiny(**SPLIT)).eval()
        turns = three_turns(Session(model, prefix_cache=policy), lengths, 8, logged)
        held[arch, policy] = [nbytes["held"]["cpu"] for _, _, (_, nbytes) in turns]
    for dec, drop, keep in zip(held["dec", "keep"], held["bdd", "drop"], held["bdd", "keep"]):
        assert drop <= 0.36 * dec
        assert 0.8 * dec < keep < 1.1 * dec

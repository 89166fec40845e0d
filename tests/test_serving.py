"""Serving: a batch of prompts of different lengths gives each row what it gets alone (tokens and
logits, one turn and two), cache bytes follow DESIGN.md section 3 for batches and are known
before a request is allocated."""

from types import SimpleNamespace

import pytest
import torch

from generate import generate
from model import ARCHS, ModelConfig, build_model
from serve import memory
from serve.cache import padded_batch
from serve.session import Session, lengths

V = 41
SPAN = V - 5  # span models: the last ids play the sentinels, eot just before them
CASES = [(arch, None) for arch in ARCHS] + [("encdec", "span")]


def tiny(**kw):
    cfg = dict(vocab_size=V, block_size=40, n_layer=4, n_dec_layer=1, n_head=2, n_embd=16, bias=True)
    return ModelConfig(**{**cfg, **kw})


def model_of(arch, **kw):
    """A tiny random model with weights larger than the init's (a fresh model repeats its last
    token, so rows would all stop alike) and non-zero biases (a row without any source must get
    nothing from encdec's cross-attention, not its output bias)."""
    torch.manual_seed(0)
    model = build_model(arch, tiny(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
            elif p.dim() == 2:
                p.normal_(std=0.3)
    return model


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SPAN - 1, (n,), generator=g) for n in lengths]


def turn_and_logits(session, prompts, logged, **kw):
    """session.turn, and the logits each of its steps sampled from (steps, B, V)."""
    logged.clear()
    gen = session.turn(prompts, temperature=0, **kw)
    return gen, torch.stack(logged)


def assert_rows_equal_alone(batched, alone):
    """batched: (gen, logits) of the batch; alone: one (gen, logits) per row."""
    gen, logits = batched
    for b, (g1, l1) in enumerate(alone):
        n = g1.lengths[0]
        assert gen.lengths[b] == n, b
        assert torch.equal(gen.tokens[b, :n], g1.tokens[0, :n]), b
        assert (logits[:n, b] - l1[:n, 0]).abs().max() < 1e-5, b


def one_turn(model, prompts, span, logged, **kw):
    """One greedy turn for a batch of prompts of any lengths, the way sample.py generates it:
    generate.generate on a cache that knows the padding (serve.cache.padded_batch), or T5-style
    through a Session for a span model. Returns (tokens and each row's length, the logits of
    every step (steps, B, V))."""
    logged.clear()
    if span:
        gen = Session(model, **span).turn(prompts, temperature=0, last=True, **kw)
        tokens, n, cache = gen.tokens, gen.lengths, gen.cache
    else:
        idx, cache = padded_batch(model, prompts)
        stops = kw.get("stop_tokens", ())
        tokens = generate(model, idx, kw["max_new_tokens"], temperature=0, cache=cache,
                          stop_tokens=stops)
        n = lengths(tokens, stops) if stops else [tokens.shape[1]] * len(tokens)
    return SimpleNamespace(tokens=tokens, lengths=n, cache=cache), \
        torch.stack(logged) if logged else None


def stops_for(model, prompts, span):
    """A stop token that some rows write (then go on or feed padding while the others go on) and
    some do not."""
    alone = [one_turn(model, [p], span, [], max_new_tokens=8)[0].tokens[0].tolist()
             for p in prompts]
    for t in sorted({t for row in alone for t in row}):
        if any(t in row[:-1] for row in alone) and not all(t in row for row in alone):
            return (t,)
    raise AssertionError(f"no token stops some rows and not others in {alone}")


@pytest.mark.parametrize("arch, objective", CASES)
def test_batch_of_different_lengths_equals_each_alone(arch, objective, logged):
    model = model_of(arch)
    span = dict(span_sentinel=SPAN, eot=SPAN - 1) if objective else {}
    prompts = prompts_of([5, 1, 9, 3])
    stops = stops_for(model, prompts, span)
    batched = one_turn(model, prompts, span, logged, max_new_tokens=8, stop_tokens=stops)
    alone = [one_turn(model, [p], span, logged, max_new_tokens=8, stop_tokens=stops)
             for p in prompts]
    assert_rows_equal_alone(batched, alone)
    assert min(batched[0].lengths) < 8 == max(batched[0].lengths)  # some rows stopped early


@pytest.mark.parametrize("first_lengths", [[8, 1, 4], [5, 5, 5]], ids=["padded", "unpadded"])
@pytest.mark.parametrize("arch, objective", CASES)
def test_two_turn_batched_session_equals_per_row_sessions(arch, objective, first_lengths, logged):
    """Left padding of the second turn sits in the middle of the rows; the rows' columns run past
    block_size (the cache grows) while each row's positions stay inside it. A row that stopped
    feeds padding, so that its next turn starts where it would alone. unpadded: the second turn
    is the first to bring padding into the batch; the columns fed before it stay real."""
    model = model_of(arch, block_size=20)
    span = dict(span_sentinel=SPAN, eot=SPAN - 1) if objective else {}
    first, second = prompts_of(first_lengths), prompts_of([1, 8, 3], seed=2)
    stops = stops_for(model, first, span)
    batch = Session(model, **span)
    batch.turn(first, 4, temperature=0, stop_tokens=stops)
    batched = turn_and_logits(batch, second, logged, max_new_tokens=4, stop_tokens=stops)
    alone = []
    for p, q in zip(first, second):
        s = Session(model, **span)
        s.turn([p], 4, temperature=0, stop_tokens=stops)
        alone.append(turn_and_logits(s, [q], logged, max_new_tokens=4, stop_tokens=stops))
    assert_rows_equal_alone(batched, alone)
    if objective is None and arch != "encdec" and len(set(first_lengths)) > 1:
        # dec and bdd keep one cache across the turns, its columns padded past block_size
        assert batch.cache.columns.width > 20 and batch.cache.decoder.layers[0].k.shape[2] > 20


@pytest.mark.parametrize("arch", ARCHS)
def test_prompts_of_one_length_need_no_padding_mask(arch):
    """Equal lengths (a (B, P) tensor, or a list of equal rows) need no padding mask at all."""
    model = model_of(arch)
    assert Session(model).turn(torch.stack(prompts_of([6, 6])), 5, temperature=0) \
        .cache.columns.valid is None
    assert Session(model).turn(prompts_of([6, 3]), 5, temperature=0).cache.columns.valid \
        is not None


def positions_held(arch, cfg, P, G):
    """DESIGN.md section 3, one row: positions x layers held after prefill(P) and G decode steps."""
    return cfg.n_layer * (P + G) if arch == "dec" else cfg.n_dec_layer * ((P - 1) + (1 + G))


@pytest.mark.parametrize("arch, objective, kw", [(arch, None, {}) for arch in ARCHS] + [
    ("encdec", "span", {}), ("dec", None, dict(n_layer=5, kv_share=2, n_head=4, n_kv_head=2)),
    ("bdd", None, dict(n_head=4, n_kv_head=1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cache_a_request_needs_is_known_before_it_is_allocated(arch, objective, kw, dtype):
    """serve.memory.bytes_after, from the model's shape alone, is every byte of K/V that the
    cache of a one-turn request holds after its last step, its 16-column growth included: what
    sample.py weighs against its memory limit before it allocates anything. (The rest a cache
    holds is a byte per column and row saying which are real, where some row stopped: span
    models.)"""
    model = model_of(arch, **kw)
    span = dict(span_sentinel=SPAN, eot=SPAN - 1) if objective else {}
    for P, G, rows in ((1, 1, 1), (7, 10, 6), (16, 17, 4), (29, 11, 2)):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            gen, _ = one_turn(model, prompts_of([P] * rows), span, [], max_new_tokens=G)
        need = memory.bytes_after(model, rows, P, G, dtype.itemsize, span=bool(objective))
        valid = sum(t.numel() for t in gen.cache.tensors() if t.dtype == torch.bool)
        assert memory.nbytes(gen.cache)["held"] == {"cpu": need + valid}, (P, G, rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_bytes_of_a_padded_batch_follow_the_formula(arch):
    """DESIGN.md section 3 for a batch: every row holds the longest prompt's columns (padding is
    held memory): rows x the one-row formula. bdd's encoder cache is held by a session that
    keeps it, not by one-turn generation."""
    cfg = tiny()
    model = model_of(arch)
    per_position = 2 * cfg.n_embd * 4  # K and V, float32
    for row_lengths in ([4, 9, 1], [4, 9, 4, 9, 4, 9], [6] * 5):
        rows, P, G = len(row_lengths), max(row_lengths), 4  # 5 new tokens: 4 decode steps
        prefix = cfg.n_enc_layer * (P - 1) if arch == "bdd" else 0
        for gen, kept in ((one_turn(model, prompts_of(row_lengths), {}, [],
                                    max_new_tokens=5)[0], 0),
                          (Session(model, prefix_cache="keep").turn(
                              prompts_of(row_lengths), 5, temperature=0), prefix)):
            held = memory.nbytes(gen.cache)
            assert held["decode"] == rows * positions_held(arch, cfg, P, G) * per_position
            assert held["prefix"] == rows * kept * per_position

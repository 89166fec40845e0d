"""pack.py: batches keep the batch contract for every arch and objective, are seeded, and score
the same continuation targets for all three."""

import pytest
import torch

import pack
from test_corpus import stream, write_corpus
from corpus.download import DataError
from corpus.prepare import prepare
from model import ARCHS

T = 64  # block size of the batch tests
CONFIGS = [("dec", "prefix_lm"), ("bdd", "prefix_lm"), ("encdec", "prefix_lm"), ("encdec", "span")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """meta of a 20-document random corpus with byte tokens (val: documents 9 and 19)."""
    tmp = tmp_path_factory.mktemp("corpus")
    write_corpus(tmp / "docs")
    return prepare(tmp / "docs", root=tmp / "data")


def joined(ids):
    return "," + ",".join(map(str, ids)) + ","


def in_stream(row, haystack):
    """Whether the tokens of row occur contiguously in the stream (haystack = joined(stream))."""
    return joined(row.tolist()) in haystack


def test_vocab_size_adds_sentinels_for_span_only():
    assert pack.vocab_size("byte") == pack.vocab_size("byte", "prefix_lm") == 257
    assert pack.vocab_size("byte", "span") == 257 + pack.N_SENTINELS


def test_a_split_too_short_for_block_size_is_a_one_line_error(prepared):
    """Settings are the config layer's to check; what depends on the data is a DataError."""
    with pytest.raises(DataError, match="the val split") as e:
        pack.Batches(prepared, "dec", prepared["tokens"]["val"], 4)
    assert "\n" not in str(e.value)


def test_default_corpus_batches(shakespeare):
    batches = pack.Batches(shakespeare, "bdd", 256, 4)
    assert batches.get_batch("train")["block_ids"].shape == (4, 256)


# ---------------------------------------------------------------------------------------------
# batches


def test_dec_batch(prepared):
    haystack = joined(stream(prepared, "train").tolist())
    batch = pack.Batches(prepared, "dec", T, 16).get_batch("train")
    assert set(batch) == {"x", "y"}
    assert all(v.shape == (16, T) and v.dtype == torch.long for v in batch.values())
    assert torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    for x, y in zip(batch["x"], batch["y"]):
        assert in_stream(torch.cat([x, y[-1:]]), haystack)


def test_bdd_block_ids(prepared):
    """A random layout per row: the count uniform in 1..max_blocks-1 and the positions a uniform
    subset of 1..T-1, drawn for each row on its own."""
    batch = pack.Batches(prepared, "bdd", T, 256, max_blocks=8).get_batch("train")
    assert set(batch) == {"x", "y", "block_ids"}
    ids = batch["block_ids"]
    assert ids.shape == (256, T) and ids.dtype == torch.long
    assert torch.equal(batch["x"][:, 1:], batch["y"][:, :-1])
    assert (ids[:, 0] == 0).all()
    steps = ids.diff(dim=1)
    assert ((steps == 0) | (steps == 1)).all()  # distinct boundaries, so ids rise by one at each
    layouts = [tuple((row.nonzero().view(-1) + 1).tolist()) for row in steps]
    assert sorted({len(b) for b in layouts}) == list(range(1, 8))
    # not one random ordering of positions shared by the rows and cut at different counts:
    # rows with the same count differ, and every position of 1..T-1 starts a block in some row
    for n in range(1, 8):
        same_count = [b for b in layouts if len(b) == n]
        assert len(set(same_count)) > len(same_count) // 2, n
    assert set().union(*layouts) == set(range(1, T))
    first = [b[0] for b in layouts if len(b) == 1]  # a lone boundary: uniform over 1..T-1
    assert min(first) < T // 4 and max(first) > 3 * T // 4


def test_bdd_layouts_shared_by_groups_of_rows(prepared):
    """block_layouts: G layouts per batch, each for B/G consecutive rows, drawn afresh per batch;
    as many as share the rows out evenly."""
    batches = pack.Batches(prepared, "bdd", T, 16, max_blocks=8, layouts=4)
    seen = set()
    for _ in range(20):
        ids = batches.get_batch("train")["block_ids"]
        assert ids.shape == (4, T) and (ids[:, 0] == 0).all()
        seen |= {tuple(row.tolist()) for row in ids}
    assert len(seen) > 60  # 80 layouts drawn, hardly any twice
    assert [pack.layout_groups(rows, 4) for rows in (1, 2, 3, 4, 6, 8, 16, 7)] == \
        [1, 2, 3, 4, 3, 4, 4, 1]
    assert pack.Batches(prepared, "bdd", T, 6, layouts=4).get_batch("train")["block_ids"].shape == \
        (3, T)


def test_prefix_lm_batch(prepared):
    haystack = joined(stream(prepared, "train").tolist())
    batch = pack.Batches(prepared, "encdec", T, 64, objective="prefix_lm").get_batch("train")
    assert set(batch) == {"enc_x", "enc_mask", "dec_x", "y"}
    assert batch["enc_mask"].dtype == torch.bool
    assert all(batch[k].dtype == torch.long for k in ("enc_x", "dec_x", "y"))
    Te, Td = batch["enc_x"].shape[1], batch["dec_x"].shape[1]
    n_enc, n_dec = batch["enc_mask"].sum(dim=1), (batch["y"] != -1).sum(dim=1)
    assert (n_enc + n_dec == T).all() and n_enc.min() >= 1 and n_dec.min() >= 1
    assert Te == n_enc.max() and Td == n_dec.max()
    rows = zip(batch["enc_x"], batch["enc_mask"], batch["dec_x"], batch["y"], n_enc, n_dec)
    for enc_x, mask, dec_x, y, e, d in rows:
        assert torch.equal(mask, torch.arange(Te) < e)  # right-padded encoder
        assert (y[d:] == -1).all() and (dec_x[d:] == prepared["eot"]).all()  # right-padded decoder
        assert torch.equal(dec_x[1:d], y[:d - 1])  # decoder input = targets shifted by one
        assert in_stream(torch.cat([enc_x[:e], dec_x[:d], y[d - 1:d]]), haystack)


def test_span_batch_reconstructs_rows(prepared):
    haystack = joined(stream(prepared, "train").tolist())
    n_vocab, eot = prepared["n_vocab"], prepared["eot"]
    batch = pack.Batches(prepared, "encdec", T, 64, objective="span").get_batch("train")
    n_noise, n_spans = pack.span_counts(T)
    assert (n_noise, n_spans) == (10, 3)
    sentinels = list(range(n_vocab, n_vocab + n_spans))
    for enc_x, mask, dec_x, y in zip(batch["enc_x"], batch["enc_mask"], batch["dec_x"], batch["y"]):
        enc, targets = enc_x[mask], y[y != -1]
        assert [t for t in enc.tolist() if t >= n_vocab] == sentinels
        assert [t for t in targets.tolist() if t >= n_vocab] == sentinels
        assert max(enc.max(), targets.max()) < pack.vocab_size("byte", "span")
        assert len(targets) == n_noise + n_spans + 1 and targets[-1] == eot
        assert dec_x[0] == eot and torch.equal(dec_x[1:len(targets)], targets[:-1])
        row = pack.reconstruct_span(enc, y, n_vocab)
        assert len(row) == T and in_stream(row, haystack)


def test_span_count_is_capped_by_sentinels():
    assert pack.span_counts(4096) == (614, pack.N_SENTINELS)


@pytest.mark.parametrize("arch,objective,supervised,padding", [
    ("dec", "prefix_lm", 1.0, (0.0, 0.0)),
    ("bdd", "prefix_lm", 1.0, (0.0, 0.0)),
    ("encdec", "prefix_lm", 0.5, (0.3, 0.55)),
    ("encdec", "span", 0.15, (0.0, 0.0)),  # T5's counts are equal for every row: no padding
])
def test_supervision_stats(prepared, arch, objective, supervised, padding):
    # 256 rows: the prefix-LM mean of (T - p) / T has a standard error of about 0.018
    batches = pack.Batches(prepared, arch, 128, 256, objective=objective)
    stats = batches.supervision_stats(batches.get_batch("train"))
    assert stats["supervised"] == pytest.approx(supervised, abs=0.06)
    assert padding[0] <= stats["padding"] <= padding[1]


def test_continuation_batches_score_the_same_targets(prepared):
    w = pack.Batches(prepared, "dec", T, 8).eval_windows("val", 8)  # (8, T+1)
    for s in (T // 2, 10):
        batches = {arch: pack.continuation_batch(arch, w, s=s) for arch in ARCHS}
        for arch, batch in batches.items():
            y = batch["y"]
            targets = [row[row != -1].tolist() for row in y]
            assert targets == w[:, s + 1:].tolist(), arch
        assert torch.equal(batches["dec"]["x"], w[:, :T])
        assert torch.equal(batches["bdd"]["block_ids"], (torch.arange(T) >= s).long())
        encdec = batches["encdec"]
        assert torch.equal(encdec["enc_x"], w[:, :s]) and encdec["enc_mask"].all()
        assert torch.equal(encdec["dec_x"], w[:, s:T])
    assert torch.equal(pack.continuation_batch("dec", w)["y"][:, T // 2 - 1:T // 2 + 1],
                       torch.stack([torch.full((8,), -1), w[:, T // 2 + 1]], dim=1))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch,objective", CONFIGS)
def test_batches_are_seeded(prepared, arch, objective):
    a, b, other = (pack.Batches(prepared, arch, T, 8, objective=objective, seed=seed)
                   for seed in (0, 0, 1))
    first_a = a.get_batch("train")
    evals = a.eval_batches("val", 20)  # evaluation must not disturb the training stream
    assert same(first_a, b.get_batch("train")) and same(a.get_batch("train"), b.get_batch("train"))
    assert not same(first_a, other.get_batch("train"))
    assert [len(e["y"]) for e in evals] == [8, 8, 4]
    for again in (a.eval_batches("val", 20), other.eval_batches("val", 20)):
        assert all(same(e, f) for e, f in zip(evals, again))


def test_eval_windows_are_evenly_spaced_and_shared(prepared):
    val = stream(prepared, "val")
    w = pack.Batches(prepared, "bdd", T, 8, seed=5).eval_windows("val", 5)
    assert torch.equal(w, pack.Batches(prepared, "encdec", T, 3).eval_windows("val", 5))
    assert torch.equal(w[0], torch.from_numpy(val[:T + 1]))
    assert torch.equal(w[-1], torch.from_numpy(val[-T - 1:]))

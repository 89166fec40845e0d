"""bdd's block boundary strategies (pack.BOUNDARIES): each puts its boundaries where it says,
`turns` exactly at the turn starts of the text, no strategy lets a position see its future
(block by block and through the dense mask), and bad or old data gets one clear line."""

import json
import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mask
import pack
from model import build_model
from test_corpus import stream
from test_model import V, tiny
from corpus.download import DataError
from corpus.prepare import FORMAT, load_meta, main as prepare_main, prepare
from corpus.turns import SHAKESPEARE_TURNS

T = 64  # block size of the batch tests
MAX_BLOCKS = 4  # small, so that windows with more turn starts than max_blocks - 1 occur
NAMES = ["JULIET", "ROMEO", "First Lord", "Hor. and Mar", "NURSE", "KING HENRY"]
WORDS = "love death night sweet é fair thee thou—come ünto 中 my lord".split()


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def play(rng, speeches):
    """A play's text as the Shakespeare corpus has it: speaker lines after blank lines, stage
    directions in brackets, headings followed by a blank line (no turns)."""
    parts = ["A PLAY\n\nby Nobody\n\n\n\nACT I.\n\nSCENE I. A room.\n\n[Enter ROMEO.]"]
    for _ in range(speeches):
        lines = "\n".join(words(rng, rng.choice([1, 1, 2, 5, 8]))
                          for _ in range(rng.choice([1, 1, 2, 6])))
        parts.append(f"{rng.choice(NAMES)}.\n{lines}")
        if rng.random() < 0.1:
            parts.append("[Exit.]")
    return "\n\n".join(parts) + "\n"


def poem(rng, lines):
    return "\n".join(words(rng, rng.randint(3, 9)) for _ in range(lines)) + "\n"


@pytest.fixture(scope="module")
def plays(tmp_path_factory):
    """(meta, {split: turn starts as token offsets, found here from the text}) of 20 plays and
    poems in byte tokens, prepared with the Shakespeare corpus's turn regex."""
    folder = tmp_path_factory.mktemp("plays")
    rng = random.Random(0)
    texts = {}
    for i in range(20):
        text = poem(rng, 30) if i % 5 == 2 else play(rng, 40)  # val: 9, 19
        path = folder / "docs" / f"doc{i:02d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(text.encode())
        texts[str(path.resolve())] = text
    meta = prepare(folder / "docs", root=folder / "data",
                          turn_regex=SHAKESPEARE_TURNS)
    expected = {}
    for split in ("train", "val"):
        starts, at = [], 0
        for name in meta["names"][split]:
            text = texts[name]
            starts += [at + len(text[:m.start()].encode())
                       for m in re.finditer(r"(?<=\n\n)[A-Z][^\n]*\.\n(?=\S)", text)
                       if m.group().startswith(tuple(NAMES))]
            at += len(text.encode()) + 1  # the document's bytes, then eot
        expected[split] = np.array(starts)
    return meta, expected


def boundaries_of(ids):
    """The block starts of each row of block ids (G, T)."""
    return [(row.diff().nonzero().view(-1) + 1).tolist() for row in ids.view(-1, ids.shape[-1])]


def draw(strategy, rows, T, max_blocks=8, layouts=None, turns=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(rows, T + 1, dtype=torch.long)
    batch = pack.bdd_batch(w, max_blocks, gen, layouts, strategy, turns)
    return boundaries_of(batch["block_ids"]), batch["block_ids"]


# ---------------------------------------------------------------------------------------------
# where each strategy puts its boundaries


def test_random_is_one_to_max_blocks_minus_one_uniform_positions():
    layouts, _ = draw("random", 2000, T, max_blocks=MAX_BLOCKS)
    assert {len(b) for b in layouts} == set(range(1, MAX_BLOCKS))
    assert set().union(*layouts) == set(range(1, T))


def test_single_has_one_boundary_uniform_over_the_row():
    layouts, ids = draw("single", 4000, T)
    assert all(len(b) == 1 for b in layouts)
    counts = np.bincount([b[0] for b in layouts], minlength=T)
    assert counts[0] == 0 and counts[1:].min() > 0.5 * 4000 / (T - 1)  # every position, evenly
    _, grouped = draw("single", 16, T, layouts=4)
    assert grouped.shape == (4, T)  # shared by groups of rows, like random


def test_logspace_block_lengths_are_log_uniform():
    """P(block length < k) = ln k / ln T. The first block is drawn with nothing before it, so its
    length follows the law exactly (uniform positions would give it length 1 in about 1 row of
    T / 4, not 1 in 8)."""
    rows, T_long = 4000, 256
    layouts, _ = draw("logspace", rows, T_long)
    first = np.array([b[0] for b in layouts])
    for k in (2, 4, 16, 64, 128):
        assert abs((first < k).mean() - math.log(k) / math.log(T_long)) < 0.03, k
    assert all(1 <= len(b) <= 7 for b in layouts)
    # a later block is drawn the same way and kept when it fits: short blocks throughout the row
    later = np.array([b2 - b1 for b in layouts for b1, b2 in zip(b, b[1:])])
    assert (later < 2).mean() > 0.1
    few, _ = draw("logspace", rows, T_long, max_blocks=3)
    assert max(len(b) for b in few) == 2
    _, grouped = draw("logspace", 16, T_long, layouts=4)
    assert grouped.shape == (4, T_long)


def row_offset(row, data):
    """Where a row's tokens occur in the stream (the random text makes it unique)."""
    return data.tobytes().find(row.numpy().astype(data.dtype).tobytes()) // data.itemsize


def test_turns_are_the_turn_starts_of_the_text(plays):
    """Every row's boundaries are exactly the turn starts inside its window (found here by a
    regex of its own over the documents), max_blocks - 1 of them when there are more; a row
    with none gets random boundaries. Checked on windows at every 5th offset and on a batch."""
    meta, expected = plays
    batches = pack.Batches(meta, "bdd", T, 16, max_blocks=MAX_BLOCKS, boundaries="turns")
    data = stream(meta, "train")
    offsets = list(range(0, len(data) - T - 1, 5))
    gen = torch.Generator().manual_seed(0)
    ids = batches.build("train", offsets, gen)["block_ids"]
    get = batches.get_batch("train")
    offsets += [row_offset(row, data) for row in get["x"]]
    rows = boundaries_of(ids) + boundaries_of(get["block_ids"])
    assert len(rows) == len(offsets)
    seen = {"exact": 0, "capped": 0, "fallback": []}
    for o, bounds in zip(offsets, rows):
        inside = [int(t) - o for t in expected["train"] if o < t < o + T]
        if not inside:
            seen["fallback"].append(tuple(bounds))
        elif len(inside) < MAX_BLOCKS:
            assert bounds == inside, o
            seen["exact"] += 1
        else:
            assert len(bounds) == MAX_BLOCKS - 1 and set(bounds) <= set(inside), o
            seen["capped"] += 1
        for b in bounds if inside else []:  # the text at a boundary is a speaker's line
            assert bytes(data[o + b - 2:o + b + 16].astype(np.uint8)).decode(errors="ignore") \
                .startswith(tuple(f"\n\n{n}." for n in NAMES))
    assert seen["exact"] > 100 and seen["capped"] > 10 and len(seen["fallback"]) > 100
    fallback = seen["fallback"]  # random: counts 1..MAX_BLOCKS-1, layouts varied
    assert {len(b) for b in fallback} == set(range(1, MAX_BLOCKS))
    assert len(set(fallback)) > len(fallback) // 2


def test_turns_in_evaluation_batches_too(plays):
    meta, expected = plays
    batches = pack.Batches(meta, "bdd", T, 8, max_blocks=MAX_BLOCKS, boundaries="turns")
    offsets = batches.eval_offsets("val", 20)
    rows = [b for batch in batches.eval_batches("val", 20) for b in
            boundaries_of(batch["block_ids"])]
    for o, bounds in zip(offsets, rows):
        inside = [int(t) - o for t in expected["val"] if o < t < o + T]
        if 0 < len(inside) < MAX_BLOCKS:
            assert bounds == inside


def test_fallback_share_counts_windows_without_a_turn(plays):
    meta, _ = plays
    batches = pack.Batches(meta, "bdd", T, 8, boundaries="turns")
    for split in ("train", "val"):
        turns = batches.turns[split]
        offsets = np.arange(len(batches.data[split]) - T)
        held = np.searchsorted(turns, offsets + T) - np.searchsorted(turns, offsets, "right")
        assert batches.fallback_share(split) == pytest.approx((held == 0).mean())
        assert 0 < (held == 0).mean() < 1
    assert len(batches.notes) == 2 and all("\n" not in n for n in batches.notes)
    assert batches.notes[0].startswith("--boundaries turns: ") and "random boundaries" in \
        batches.notes[0]


# ---------------------------------------------------------------------------------------------
# nothing leaks, for any strategy, block by block and through the dense mask


def strategy_batch(strategy, B=4, T=24, seed=0):
    """A bdd batch of random tokens with the strategy's layouts: 2 groups of rows for the
    shared strategies, one per row for turns (a row without a turn, one with more than
    max_blocks - 1)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(0, V, (B, T + 1), generator=gen)
    rng = random.Random(seed)
    turns = [sorted(rng.sample(range(1, T), k)) for k in (0, 1, 3, 12)][:B]
    return pack.build_batch("bdd", w, gen, "prefix_lm", 8, V, 0, layouts=2, boundaries=strategy,
                            turns=turns if strategy == "turns" else None)


def logits(model, x, ids, dense):
    """The block-by-block path (ids (G, T) as the batch has them), or the dense T x 2T mask of
    every row (the path of flex and compiled code)."""
    if not dense:
        return model({"x": x, "block_ids": ids})[0]
    per_row = ids.repeat_interleave(x.shape[0] // ids.shape[0], dim=0)
    return model.lm_head(model.ln_f(model.stream(x, mask.bdd_mask(per_row))))


def leaked_positions(model, batch, dense):
    """Positions i whose logits moved when every token after i changed."""
    x, ids = batch["x"], batch["block_ids"]
    base = logits(model, x, ids, dense)
    leaked = []
    for i in range(x.shape[1] - 1):
        x2 = x.clone()
        x2[:, i + 1:] = (x2[:, i + 1:] + 1 + torch.randint(0, V - 1, x2[:, i + 1:].shape)) % V
        if not torch.allclose(base[:, :i + 1], logits(model, x2, ids, dense)[:, :i + 1],
                              atol=1e-9, rtol=0):
            leaked.append(i)
    return leaked


@pytest.fixture(scope="module")
def sharp_bdd():
    from conftest import sharpen
    torch.manual_seed(0)
    return sharpen(build_model("bdd", tiny(n_layer=4, n_dec_layer=2))).eval()


@pytest.mark.parametrize("dense", [False, True], ids=["block_by_block", "dense_mask"])
@pytest.mark.parametrize("strategy", pack.BOUNDARIES)
def test_no_strategy_leaks_the_future(sharp_bdd, strategy, dense):
    batch = strategy_batch(strategy)
    assert batch["block_ids"].shape[0] == (4 if strategy == "turns" else 2)
    with torch.no_grad():
        assert leaked_positions(sharp_bdd, batch, dense) == []
        assert (logits(sharp_bdd, batch["x"], batch["block_ids"], False) -
                logits(sharp_bdd, batch["x"], batch["block_ids"], True)).abs().max() < 1e-9


@pytest.mark.parametrize("strategy", pack.BOUNDARIES)
def test_the_leak_check_catches_a_leaky_mask(sharp_bdd, leaky_masks, strategy):
    """Let each block see all of itself (block by block) or every row see its whole row (dense):
    the check above reports leaks, for every strategy's layouts."""
    batch = strategy_batch(strategy)
    with torch.no_grad():
        for dense in (False, True):
            assert leaked_positions(sharp_bdd, batch, dense) != []


# ---------------------------------------------------------------------------------------------
# bad or old data


def test_turns_without_turns_in_the_data_is_a_one_line_error(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    rng = random.Random(1)
    for i in range(3):
        (folder / f"p{i}.txt").write_text(play(rng, 30))
    cases = [(prepare(folder, root=tmp_path / "a"), "prepared without a turn regex"),
             (prepare(folder, root=tmp_path / "b", turn_regex="NEVER THERE"),
              "no turn starts were found")]
    for meta, message in cases:
        with pytest.raises(DataError, match=message) as e:
            pack.Batches(meta, "bdd", T, 4, boundaries="turns")
        assert "\n" not in str(e.value) and "--turn_regex" in str(e.value)
        pack.Batches(meta, "bdd", T, 4, boundaries="logspace")  # other strategies need no turns
        pack.Batches(meta, "dec", T, 4, boundaries="turns")  # only bdd reads them


def test_old_format_folder_is_re_prepared_or_refused(tmp_path, capsys):
    """A folder prepared before turns (FORMAT 1: no turn streams, no "turns" in meta.json):
    prepare() re-prepares it; opened directly (load_meta, Batches) it is refused in one line."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(play(random.Random(2), 60))
    meta = prepare(folder, root=tmp_path / "data")
    out = Path(meta["dir"])
    old = json.loads((out / "meta.json").read_text())
    old["format"] = 1
    del old["turns"], old["turn_regex"]
    (out / "meta.json").write_text(json.dumps(old))
    for opener in (load_meta, lambda d: pack.Batches(d, "bdd", T, 4)):
        with pytest.raises(DataError, match="prepared in format 1.*prepare it again") as e:
            opener(out)
        assert "\n" not in str(e.value)
    capsys.readouterr()
    again = prepare(folder, root=tmp_path / "data")
    assert "tokenizing" in capsys.readouterr().out
    assert again["format"] == FORMAT and again["tokens"] == meta["tokens"]


def test_turn_regex_that_does_not_compile_exits_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text("text\n")
    for regex, message in (("(", "does not compile"), ("x*", "matches the empty text")):
        monkeypatch.setattr(sys, "argv", ["corpus/prepare.py", "--data", str(tmp_path / "a.txt"),
                                          "--turn_regex", regex])
        with pytest.raises(SystemExit) as e:
            prepare_main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1
        assert err.startswith(f"error: --turn_regex {regex!r} {message}")

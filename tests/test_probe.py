"""lab/probe.py: the MQAR rows hold what they say (an oracle that reads a row answers every query, a
guesser scores chance; keys are distinct), the accuracy counts the answers and nothing else, bdd's
block starts at the first query, pack's row mode draws whole rows and puts the loss on the answers
only, the copy probe's cached logits equal the training forward's, a tiny run of both probes
writes its results, and bad input gets one line."""

import json

import numpy as np
import pytest
import torch

import config as cfg
import pack
from lab import probe
from model import ARCHS, ModelConfig, build_model
from corpus.rows import load_rows, write_rows
from corpus.download import DataError

PNG = b"\x89PNG\r\n\x1a\n"


def rows(pairs=8, length=64, vocab=64, n=200, seed=0):
    return probe.mqar_rows(n, length, pairs, vocab, np.random.default_rng(seed))


def oracle(row, answer_at):
    """The value that follows the query's first occurrence in the row: read from the row alone."""
    key = row[answer_at - 1]
    first = int(np.flatnonzero(row == key)[0])
    return row[first + 1]


@pytest.mark.parametrize("pairs,length", [(1, 8), (4, 64), (16, 64), (32, 128)])
def test_an_oracle_that_reads_the_row_answers_every_query(pairs, length):
    tokens, loss = rows(pairs, length)
    assert (loss.sum(1) == pairs).all() and not loss[:, :2 * pairs + 1].any()
    assert all(oracle(row, p) == row[p] for row, mask in zip(tokens, loss)
               for p in np.flatnonzero(mask))


def test_a_guesser_scores_about_one_in_the_value_range():
    vocab = 64
    tokens, loss = rows(pairs=8, vocab=vocab, n=2000)
    guesses = np.random.default_rng(1).integers(vocab // 2, vocab, loss.sum())
    assert abs((guesses == tokens[loss]).mean() - 2 / vocab) < 0.006


def test_keys_are_distinct_and_apart_from_values_and_filler():
    vocab, pairs, length = 64, 32, 128
    tokens, loss = rows(pairs, length, vocab)
    keys, values = tokens[:, 0:2 * pairs:2], tokens[:, 1:2 * pairs:2]
    assert all(len(set(row)) == pairs for row in keys)
    assert (keys < vocab // 2).all() and (values >= vocab // 2).all()
    asked = np.zeros_like(loss)
    asked[:, :-1] = loss[:, 1:]  # the queries: the tokens before the answers
    queries = tokens[asked].reshape(len(tokens), pairs)
    assert all(sorted(q) == sorted(k) for q, k in zip(queries, keys))
    assert (queries != keys).any(axis=1).mean() > 0.9  # in a random order
    filler = ~(asked | loss)
    filler[:, :2 * pairs] = False
    assert (tokens[filler] >= vocab // 2).all()


def test_queries_land_anywhere_after_the_pairs():
    tokens, loss = rows(pairs=1, length=64, n=400)
    answers = loss.argmax(1)
    assert answers.min() == 3 and answers.max() == 63 and len(set(answers)) == 31  # 31 slots


def test_bdd_block_and_encdec_source_start_at_the_first_query():
    pairs, length = 4, 32
    tokens, loss = rows(pairs, length, n=16)
    w = torch.from_numpy(tokens)
    first = loss.argmax(1) - 1  # each row's first query
    assert len(set(first)) > 1
    batch = pack.row_batch("bdd", w, torch.from_numpy(loss), torch.Generator(), 8, 256)
    ids = probe.prompt_blocks(batch["y"])
    encdec = pack.row_batch("encdec", w, torch.from_numpy(loss), torch.Generator(), 8, 256)
    for i, f in enumerate(first.tolist()):
        assert (ids[i, :f] == 0).all() and (ids[i, f:] == 1).all()
        assert w[i, f] < 32 and batch["y"][i, f] == w[i, f + 1]
        assert encdec["enc_mask"][i].sum() == f and torch.equal(encdec["enc_x"][i, :f], w[i, :f])
        assert torch.equal(encdec["dec_x"][i, :length - f], w[i, f:-1])



class KnowsTheRows(torch.nn.Module):
    """A model that has seen the held-out rows (tokens, right) (n, T+1): its prediction of a
    row's next token is the true one where `right` is True at that target, and an id outside
    the task's vocabulary elsewhere. It reads any arch's batch (encdec's: the source, then the
    decoder's inputs) and finds the row by its tokens."""

    def __init__(self, tokens, right, vocab):
        super().__init__()
        self.device_of = torch.nn.Parameter(torch.zeros(()))  # where answer_accuracy puts batches
        self.tokens, self.right, self.wrong = torch.from_numpy(tokens), torch.from_numpy(right), vocab
        self.row_of = {tuple(row[:-1].tolist()): i for i, row in enumerate(self.tokens)}

    def forward(self, batch):
        T = self.tokens.shape[1] - 1
        if "enc_x" in batch:  # the source x[:p], then the decoder's x[p:]; its outputs from p on
            p = batch["enc_mask"].sum(1)
            rows = [torch.cat([e[:q], d[:T - q]]) for e, d, q in zip(batch["enc_x"], batch["dec_x"], p)]
            at = (p[:, None] + torch.arange(batch["dec_x"].shape[1])).clamp(max=T - 1)
        else:
            rows, at = batch["x"], torch.arange(T).expand(len(batch["x"]), T)
        i = torch.tensor([self.row_of[tuple(r.tolist())] for r in rows])[:, None]
        pick = torch.where(self.right[i, at + 1], self.tokens[i, at + 1], self.wrong)
        return torch.nn.functional.one_hot(pick, self.wrong + 1).float(), None


@pytest.mark.parametrize("arch, boundaries", [("dec", "prompt"), ("encdec", "prompt"),
                                              ("bdd", "prompt"), ("bdd", "random")])
def test_answer_accuracy_counts_the_answers_only(arch, boundaries):
    """The MQAR figure is the share of answers predicted right: 1 for a model right at every
    answer and wrong elsewhere, 0 for one right everywhere but at the answers, and 1/2 for one
    right at the answers of every other row."""
    vocab = 64
    tokens, loss = rows(pairs=4, length=32, vocab=vocab, n=50)
    every_other_row = np.arange(len(tokens))[:, None] % 2 == 0
    for right, accuracy in ((loss, 1.0), (~loss, 0.0), (loss & every_other_row, 0.5)):
        model = KnowsTheRows(tokens, right, vocab)
        assert probe.answer_accuracy(model, arch, tokens, loss, boundaries, batch=16) == accuracy

# ---------------------------------------------------------------------------------------------
# pack's row mode


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A folder of 40 + 12 rows of 17 tokens whose first token numbers the row."""
    tokens, loss = rows(pairs=2, length=16, n=52)
    tokens[:, 0] = np.arange(52)  # row ids (keys no longer distinct: only pack reads these)
    folder = tmp_path_factory.mktemp("task")
    write_rows(folder, {"train": (tokens[:40], loss[:40]), "val": (tokens[40:], loss[40:])},
                    "byte", "tiny", {"what": "test"})
    return load_rows(folder, "byte"), tokens, loss


@pytest.mark.parametrize("arch", ARCHS)
def test_row_mode_draws_whole_rows_and_masks_exactly_the_other_targets(task, arch):
    meta, tokens, loss = task
    batches = pack.Batches(meta, arch, 16, 8, seed=3)
    for batch in [batches.get_batch("train"), *batches.eval_batches("val", 12)]:
        x = batch["enc_x"][:, :1] if arch == "encdec" else batch["x"][:, :1]
        for i, row in enumerate(x[:, 0].tolist()):
            target, answers = torch.from_numpy(tokens[row, 1:]), torch.from_numpy(loss[row, 1:])
            y = batch["y"][i]
            if arch == "encdec":  # the decoder's targets are the row's from the prompt on
                first = int(batch["enc_mask"][i].sum())
                target, answers, y = target[first:], answers[first:], y[:len(target) - first]
                assert torch.equal(batch["enc_x"][i, :first], torch.from_numpy(tokens[row, :first]))
            else:
                assert torch.equal(batch["x"][i], torch.from_numpy(tokens[row, :-1]))
            assert torch.equal(y, target.masked_fill(~answers, -1))


def test_row_mode_refuses_settings_its_rows_cannot_take(task):
    meta = task[0]
    with pytest.raises(DataError, match="--block_size 16") as e:
        pack.Batches(meta, "dec", 32, 4)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="--tokenizer byte"):
        load_rows(meta["dir"], "gpt2")


# ---------------------------------------------------------------------------------------------
# the copy probe


def test_copy_strings_hold_ordinary_tokens_only():
    seq = probe.copy_strings(64, 300, "byte", torch.Generator().manual_seed(0))
    assert torch.equal(seq[:, :64], seq[:, 64:])
    assert seq.max() == 255 and seq.min() == 0  # every byte, never eot (256)


@pytest.mark.parametrize("arch", ARCHS)
def test_copy_probe_cached_logits_equal_the_training_forward(arch, sharp):
    torch.manual_seed(0)
    model = sharp(build_model(arch, ModelConfig(vocab_size=257, block_size=32, n_layer=3,
                                                n_head=2, n_embd=16))).eval()
    n = 8
    seq = probe.copy_strings(n, 3, "byte", torch.Generator().manual_seed(1))
    for start in probe.copy_starts(arch, n).values():
        cached = probe.cached_logits(model, seq, start)
        uncached = probe.uncached_logits(model, arch, seq, start)
        assert cached.shape == uncached.shape == (3, 2 * n - 1 - start, 257)
        torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-9)
        a, b = probe.copy_scores(cached, seq, start), probe.copy_scores(uncached, seq, start)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-9) and len(a["loss_by_offset"]) == n - 1


# ---------------------------------------------------------------------------------------------
# the command


TINY = ["--lengths", "16,24", "--pairs", "1,2,4", "--vocab", "16", "--eval_rows", "8",
        "--n_embd", "16", "--batch_size", "4", "--max_iters", "3", "--eval_interval", "3",
        "--eval_iters", "1", "--warmup_iters", "1", "--log_interval", "3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny MQAR run of the three archs and their variants, then the copy probe of two of its
    runs into the same folder; returns the folder."""
    out = tmp_path_factory.mktemp("probes")
    probe.main(["--mqar", "--variants", *TINY, "--out_dir", str(out)])
    probe.main(["--copy", str(out / "L16_dec"), str(out / "L16_bdd"), "--copy_lengths", "2,4,8",
                "--copy_samples", "4", "--threads", "1", "--out_dir", str(out)])
    return out


def test_tiny_probes_write_both_sections_and_the_figure(tiny, capsys):
    results = json.loads((tiny / "probes.json").read_text())
    runs = results["mqar"]["runs"]
    assert {(r["length"], r["variant"]) for r in runs} == {
        (l, v) for l in (16, 24) for v in ["dec", "encdec", "bdd", *probe.VARIANTS]}
    for r in runs:
        assert set(r["accuracy"]) == {"1", "2", "4"}
        assert all(0 <= a <= 1 for a in r["accuracy"].values())
        assert ("accuracy_random_boundaries" in r) == (r["arch"] == "bdd")
    assert results["mqar"]["bdd_training_boundaries"] == "random"
    ckpts = results["copy"]["checkpoints"]
    assert [c["arch"] for c in ckpts] == ["dec", "bdd"]
    assert set(ckpts[0]["splits"]) == {"end"} and set(ckpts[1]["splits"]) == {"end", "inside"}
    assert [s["n"] for s in ckpts[1]["splits"]["inside"]] == [2, 4, 8]
    assert (tiny / "probes.png").read_bytes().startswith(PNG)
    meta = json.loads((tiny / "task_L16" / "meta.json").read_text())
    assert meta["rows"]["length"] == 17 and meta["about"]["pairs"] == [1, 2, 4]


def test_a_second_mqar_run_trains_nothing_and_keeps_the_copy_section(tiny, capsys):
    probe.main(["--mqar", "--variants", *TINY, "--out_dir", str(tiny)])
    out = capsys.readouterr().out
    assert "10 runs: 10 finished, 0 to resume, 0 new" in out and "2 pairs" in out
    assert "copy" in json.loads((tiny / "probes.json").read_text())


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """The folder of a bdd run of block_size 8 (one MQAR run of one step)."""
    out = tmp_path_factory.mktemp("short")
    probe.main(["--mqar", "--archs", "bdd", "--lengths", "8", "--pairs", "1", *TINY[4:],
                "--out_dir", str(out)])
    return out / "L8_bdd"


def test_the_copy_probe_of_a_short_context_probes_what_fits(short_context, tmp_path, capsys):
    """A model of block_size 8 got an empty table and exit 0: the default lengths started at 8."""
    probe.main(["--copy", str(short_context), "--out_dir", str(tmp_path)])
    splits = json.loads((tmp_path / "probes.json").read_text())["copy"]["checkpoints"][0]["splits"]
    assert [s["n"] for s in splits["end"]] == [4] and "n=4" in capsys.readouterr().out


def test_the_copy_probe_scores_any_number_of_strings_a_batch_at_a_time(short_context):
    """--copy_samples 20000000 would have held every string's logits at once; strings now go
    through COPY_BATCH at a time, each step scored as it comes, with the scores of all at once."""
    samples = 2 * probe.COPY_BATCH + 3
    batched = probe.copy_probe(short_context, [2, 4], samples, "cpu")["splits"]
    model, ckpt = cfg.load_model(short_context)
    gen = torch.Generator().manual_seed(probe.SEED)
    for i, n in enumerate([2, 4]):
        seq = probe.copy_strings(n, samples, "byte", gen)
        for split, start in probe.copy_starts("bdd", n).items():
            whole = probe.copy_scores(probe.cached_logits(model, seq, start), seq, start)
            assert {k: pytest.approx(v) for k, v in whole.items()} == batched[split][i]


@pytest.mark.parametrize("argv,message", [
    (["--mqar", "--pairs", "4,17", "--lengths", "64"], "--pairs 17 does not fit --lengths 64"),
    (["--mqar", "--pairs", "16", "--lengths", "64", "--vocab", "16"], "too few for 16 distinct"),
    (["--mqar", "--pairs", "4,x"], "--pairs '4,x'"),
    (["--mqar", "--vocab", "300"], "--vocab 300"),
    (["--copy", "NOWHERE"], "no checkpoint at NOWHERE"),
    (["--copy", "GARBAGE"], "not a readable checkpoint"),
    (["--copy", "NOWHERE", "--max_iters", "5"], "--max_iters is a training flag"),
    (["--copy", "NOWHERE", "--threads", "0"], "--threads 0 is out of range"),
    ([], "nothing to probe"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "ckpt.pt").write_bytes(b"not a checkpoint")
    argv = [a.replace("NOWHERE", str(tmp_path / "nowhere"))
            .replace("GARBAGE", str(tmp_path / "garbage")) for a in argv]
    with pytest.raises(SystemExit) as e:
        probe.main([*argv, "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and message.replace("NOWHERE", str(tmp_path / "nowhere")) \
        in err, err

"""lab/frontier.py and the variants and learning rates of lab/experiment.py: variant names parse (and
bad ones get one line, exit 2, nothing trained); the learning-rate sweep picks on one half of the
validation windows and reports on the other; lr.json round trips and --lr auto without it says
how to make it; a tiny frontier trains every run once, a second invocation trains nothing, and
its JSON has every field; the Pareto marking."""

import json
import math
import random

import pytest

import config as cfg
from lab import experiment as ex
from lab import frontier
import train

TINY = ["--block_size", "32", "--batch_size", "4", "--max_iters", "4", "--eval_interval", "2",
        "--eval_iters", "1", "--warmup_iters", "1", "--log_interval", "2", "--n_layer", "3",
        "--n_head", "2", "--n_embd", "16"]
PNG = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {"name", "variant", "arch", "seed", "n_kv_head", "kv_share", "learning_rate", "min_lr",
            "iters", "status", "cont_loss", "non_embedding_params", "params", "train_tokens",
            "train_flops_per_token", "held_bytes_per_position", "kv_bytes_per_position",
            "decode_context_len", "wall_time", "out_dir", "flags", "curve"}
VARIANT_KEYS = {"variant", "arch", "n_kv_head", "kv_share", "learning_rate",
                "non_embedding_params", "decode_context_len", "seeds", "losses", "loss", "loss_sd",
                "held_bytes_per_position", "kv_bytes_per_position", "bytes_per_sequence",
                "budget_batch", "budget_tokens_per_sec", "batch1_tokens_per_sec", "held_vs_dec",
                "pareto"}


class Trained:
    """Counts train.train's calls (their configs)."""

    def __init__(self, monkeypatch):
        self.configs = []
        real = train.train

        def counted(config, **kw):
            self.configs.append(config)
            return real(config, **kw)

        monkeypatch.setattr(train, "train", counted)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, data flags, the LR sweep's train calls): a tiny corpus and an LR sweep of dec and
    bdd at two rates into folder/out (lr.json there)."""
    folder = tmp_path_factory.mktemp("frontier")
    words = "to be or not that is the question whether tis nobler".split()
    text = "\n".join(" ".join(random.Random(i).choice(words) for _ in range(8)) for i in range(300))
    (folder / "tiny.txt").write_text(text + "\n")
    data = ["--data", str(folder / "tiny.txt"), "--data_root", str(folder / "data")]
    with pytest.MonkeyPatch.context() as mp:
        calls = Trained(mp)
        frontier.main(["--lr_sweep", "--archs", "dec,bdd", "--lrs", "4e-3,1e-3", *TINY, *data,
                       "--out_dir", str(folder / "out")])
    return folder, data, calls


@pytest.fixture(scope="module")
def tiny_frontier(tiny):
    """The tiny frontier, dec and bdd:kv1 at 2 seeds each at the swept rates (--lr auto), and
    the train calls it made."""
    folder, data, _ = tiny
    with pytest.MonkeyPatch.context() as mp:
        calls = Trained(mp)
        frontier.main(["--archs", "dec,bdd:kv1", "--seeds", "2", "--repeats", "1", *TINY, *data,
                       "--out_dir", str(folder / "out")])
    return json.loads((folder / "out" / "frontier.json").read_text()), calls


def bad(argv, capsys, monkeypatch, out):
    """The one error line of frontier.main(argv) with --out_dir out; asserts exit 2, that
    nothing trained and that out was not made."""
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as e:
        frontier.main([*argv, "--out_dir", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()
    return err


# -----------------------------------------------------------------------------
# variant names


def test_variant_names_parse_to_their_flags_and_folders():
    assert ex.parse_archs(" dec, dec:kv2 ,dec:cla3,bdd:kv1,encdec:kv1, dec:cla2:kv1,") == [
        "dec", "dec:kv2", "dec:cla3", "bdd:kv1", "encdec:kv1", "dec:kv1:cla2"]
    assert ex.variant_flags("dec") == {"arch": "dec"}
    assert ex.variant_flags("dec:kv1:cla2") == {"arch": "dec", "n_kv_head": 1, "kv_share": 2}
    assert ex.variant_flags("bdd:kv12") == {"arch": "bdd", "n_kv_head": 12}
    assert ex.variant_folder("dec:kv1:cla2") == "dec-kv1-cla2"


@pytest.mark.parametrize("text, message", [
    ("", "names no arch"),
    ("gpt", "'gpt' is not an arch; choose from dec, encdec, bdd"),
    ("Dec", "'Dec' is not an arch"),
    ("dec:kv", "'kv' in 'dec:kv' is not an option; options are kv<N>"),
    ("dec:kv0", "'kv0' in 'dec:kv0' is not an option"),
    ("dec:gqa2", "'gqa2' in 'dec:gqa2' is not an option"),
    ("dec:kv2:kv1", "'dec:kv2:kv1' gives kv twice"),
    ("bdd:cla2", "'bdd:cla2': cla (cross-layer K/V sharing) is a dec option; bdd keeps one K/V "
                 "per layer: drop :cla2"),
    ("encdec:cla3", "cla (cross-layer K/V sharing) is a dec option"),
    ("dec:cla1", "cla1 shares no layer's K/V"),
    ("dec,dec:kv1,dec", "dec is listed twice"),
    ("dec:cla2:kv1,dec:kv1:cla2", "dec:kv1:cla2 is listed twice"),
])
def test_bad_variant_names(text, message):
    with pytest.raises(cfg.ConfigError, match="^--archs") as e:
        ex.parse_archs(text)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--archs", "dec,bdd:cla2"], "'bdd:cla2': cla (cross-layer K/V sharing) is a dec option"),
    (["--archs", "dec:kv3"], "--archs dec:kv3: kv3 needs n_kv_head 3 to divide n_head 2; use "
                             "kv1, kv2"),
    (["--archs", "dec:cla4"], "--archs dec:cla4: cla4 groups more layers than the model's "
                              "n_layer 3; use cla2 to cla3"),
    (["--lr", "dec=1e-3,bdd=0"], "--lr 'dec=1e-3,bdd=0': bdd: '0' is not a learning rate"),
    (["--lr", "dec=-2e-3"], "'-2e-3' is not a learning rate"),
    (["--lr", "dec=fast"], "'fast' is not a learning rate"),
    (["--lr", "dec=1e-3"], "--lr gives no learning rate for encdec"),
    (["--lr", "dec=1e-3", "--archs", "dec:kv1,bdd"], "--lr gives no learning rate for bdd"),
    (["--lr_sweep", "--lrs", "1e-3,0"], "--lrs '1e-3,0': '0' is not a learning rate"),
    # both trained into one folder, and the sweep stopped advising a flag frontier.py refuses
    (["--lr_sweep", "--lrs", "1e-3,1.0000001e-3"], "0.001 and 0.0010000001 are one rate to 6 "
                                                   "digits"),
    (["--lr_sweep", "--lr", "auto"], "--lr_sweep tunes the learning rates; drop --lr"),
    (["--lrs", "1e-3"], "--lrs is the grid of --lr_sweep"),
    (["--learning_rate", "1e-3"], "--learning_rate is set per run here; use --lr"),
    (["--n_kv_head", "1"], "--n_kv_head is set per run here; use --archs with :kv<N>"),
    (["--seeds", "0"], "--seeds must be 1 to 100, got 0"),
    (["--seeds", "x"], "argument --seeds: invalid int value: 'x'"),
])
def test_bad_input_one_line_exit_2_nothing_trained(argv, message, capsys, monkeypatch, tmp_path):
    err = bad([*TINY, *argv], capsys, monkeypatch, tmp_path / "out")
    assert message in err, err


def test_lr_auto_without_lr_json_says_which_command_makes_it(capsys, monkeypatch, tmp_path):
    err = bad(TINY, capsys, monkeypatch, tmp_path / "out")
    assert f"--lr auto: no tuned learning rates at {tmp_path / 'out' / 'lr.json'}" in err
    assert "python -m lab.frontier --lr_sweep --lr_file" in err and "or give them with --lr" in err


# -----------------------------------------------------------------------------
# learning rates


def test_a_variant_takes_its_archs_rate_unless_given_its_own():
    lrs = ex.parse_lrs("dec=3e-3, bdd=2e-3, bdd:kv1=1e-3")
    assert lrs == {"dec": 3e-3, "bdd": 2e-3, "bdd:kv1": 1e-3}
    assert ex.lr_flags("dec:kv2", lrs) == {"learning_rate": 3e-3, "min_lr": 3e-3 / 10}
    assert ex.lr_flags("bdd:kv1", lrs) == {"learning_rate": 1e-3, "min_lr": 1e-3 / 10}
    assert ex.parse_lrs(" auto ") == "auto"


def test_the_choice_reads_the_choose_half_and_reports_the_other():
    """Constructed so that the two halves disagree: the best rate on the choose half is 2e-3,
    on the report half 4e-3; 8e-3 diverged."""
    rows = [{"lr": 1e-3, "choose_loss": 2.30, "report_loss": 2.40},
            {"lr": 2e-3, "choose_loss": 2.10, "report_loss": 2.35},
            {"lr": 4e-3, "choose_loss": 2.20, "report_loss": 2.05},
            {"lr": 8e-3, "choose_loss": None, "report_loss": None}]
    assert frontier.pick(rows) == {"lr": 2e-3, "choose_loss": 2.10, "report_loss": 2.35,
                                   "at_edge": False}
    assert frontier.pick(rows[:2])["at_edge"]
    assert frontier.pick(rows[3:]) is None


def test_the_halves_are_disjoint_and_cover_the_evaluation_windows(tiny):
    folder, data, _ = tiny
    config = cfg.make_config(preset="cpu", data=data[1], data_root=data[3], block_size=32)
    batches = train.load_batches(config, log=lambda line: None)
    choose, report = frontier.half_offsets(batches, 64)
    assert len(choose) == len(report) == 32 and not set(choose) & set(report)
    assert sorted(choose + report) == batches.eval_offsets("val", 64)


def test_each_half_takes_every_other_window_of_the_whole_split(tiny):
    """The rate is chosen on one half and its loss reported on the other, so the two must read
    the same kind of text: lr.json's halves are the even- and odd-numbered of the windows evenly
    spaced over the validation split, each reaching from its start to its end (not the split's
    first and second halves: the end of a corpus need not read like its start)."""
    folder, data, _ = tiny
    e = json.loads((folder / "out" / "lr.json").read_text())["eval"]
    config = cfg.make_config(preset="cpu", data=data[1], data_root=data[3], block_size=32)
    windows = train.load_batches(config, log=lambda line: None).eval_offsets("val", e["windows"])
    assert e["choose_offsets"] == windows[0::2] and e["report_offsets"] == windows[1::2]
    middle = (windows[0] + windows[-1]) / 2
    for half in (e["choose_offsets"], e["report_offsets"]):
        assert min(half) < middle < max(half)

def test_lr_sweep_scores_both_halves_and_chooses_on_one(tiny):
    folder, data, calls = tiny
    doc = json.loads((folder / "out" / "lr.json").read_text())
    assert [(c.arch, c.learning_rate, c.min_lr) for c in calls.configs] == [
        ("dec", 1e-3, 1e-4), ("bdd", 1e-3, 1e-4), ("dec", 4e-3, 4e-4), ("bdd", 4e-3, 4e-4)]
    assert doc["grid"] == [1e-3, 4e-3] and set(doc["variants"]) == {"dec", "bdd"}
    e = doc["eval"]
    assert not set(e["choose_offsets"]) & set(e["report_offsets"])
    assert len(e["choose_offsets"]) == len(e["report_offsets"]) == e["windows"] // 2
    for name, v in doc["variants"].items():
        best = min(v["runs"], key=lambda r: r["choose_loss"])
        assert v["chosen"]["lr"] == best["lr"] == doc["chosen"][name]
        assert v["chosen"]["report_loss"] == best["report_loss"] and v["chosen"]["at_edge"]
        for r in v["runs"]:
            assert r["status"] == "trained" and r["choose_loss"] != r["report_loss"]
    # the losses are the trained model's on exactly those windows
    run = doc["variants"]["bdd"]["runs"][0]
    config = cfg.make_config(**run["flags"])
    batches = train.load_batches(config, log=lambda line: None)
    model = cfg.load_model(config.out_dir)[0]
    for half in ("choose", "report"):
        loss = frontier.continuation_loss(model, batches, e[f"{half}_offsets"], config)
        assert loss == pytest.approx(run[f"{half}_loss"], rel=1e-6)
    # ... measured as training measures its own (eval_iters x batch_size windows)
    training = frontier.continuation_loss(model, batches, batches.eval_offsets("val", 4), config)
    assert training == pytest.approx(run["cont_loss"], rel=1e-6)
    assert (folder / "out" / "lr.png").read_bytes()[:8] == PNG


def test_lr_json_round_trip(tiny, tmp_path):
    folder = tiny[0]
    path = str(folder / "out" / "lr.json")
    chosen = json.loads((folder / "out" / "lr.json").read_text())["chosen"]
    assert ex.learning_rates("auto", path) == (chosen, path)
    assert ex.learning_rates("dec=5e-3", path) == ({"dec": 5e-3}, "--lr")
    (tmp_path / "lr.json").write_text(json.dumps({"chosen": {"dec": -1}, "recipe": {}}))
    with pytest.raises(cfg.ConfigError, match="dec: -1 is not a learning rate"):
        ex.read_lrs(str(tmp_path / "lr.json"))
    (tmp_path / "lr.json").write_text("{not json")
    with pytest.raises(cfg.ConfigError, match="lr.json is not JSON"):
        ex.read_lrs(str(tmp_path / "lr.json"))


def test_a_diverged_run_is_recorded_and_skipped_next_time(tiny, monkeypatch, tmp_path, capsys):
    """A rate whose loss becomes nan is recorded in the sweep (diverged.json), the sweep goes on,
    and a second invocation does not train it again."""
    folder, data, _ = tiny
    real = train.train

    def nan_at_high_rates(config, **kw):
        if config.learning_rate > 1:
            raise train.LossNotFinite("the training loss is nan at iter 3: training diverged")
        return real(config, **kw)

    monkeypatch.setattr(train, "train", nan_at_high_rates)
    argv = ["--lr_sweep", "--archs", "dec", "--lrs", "1e-3,10", *TINY, *data,
            "--out_dir", str(tmp_path)]
    frontier.main(argv)
    doc = json.loads((tmp_path / "lr.json").read_text())
    assert [r["status"] for r in doc["variants"]["dec"]["runs"]] == ["trained", "diverged"]
    assert doc["chosen"] == {"dec": 1e-3} and "diverged" in capsys.readouterr().out
    calls = Trained(monkeypatch)
    frontier.main(argv)
    assert calls.configs == []
    doc = json.loads((tmp_path / "lr.json").read_text())
    assert [r["status"] for r in doc["variants"]["dec"]["runs"]] == ["finished before", "diverged"]


# -----------------------------------------------------------------------------
# the frontier


def test_tiny_frontier_trains_each_run_once_and_writes_every_field(tiny, tiny_frontier):
    folder = tiny[0]
    doc, calls = tiny_frontier
    lr = json.loads((folder / "out" / "lr.json").read_text())["chosen"]
    assert [(c.arch, c.n_kv_head, c.seed, c.learning_rate, c.min_lr) for c in calls.configs] == [
        ("dec", None, 1337, lr["dec"], lr["dec"] / 10), ("bdd", 1, 1337, lr["bdd"], lr["bdd"] / 10),
        ("dec", None, 1338, lr["dec"], lr["dec"] / 10), ("bdd", 1, 1338, lr["bdd"], lr["bdd"] / 10)]
    assert [r["name"] for r in doc["runs"]] == ["dec_s1337", "bdd-kv1_s1337", "dec_s1338",
                                                "bdd-kv1_s1338"]
    assert {"preset", "device", "torch", "recipe", "archs", "seeds", "learning_rates", "serving",
            "runs", "variants", "wall_time"} <= set(doc)
    assert doc["learning_rates"]["source"] == str(folder / "out" / "lr.json")
    for r in doc["runs"]:
        assert RUN_KEYS <= set(r) and r["status"] == "trained"
        assert cfg.make_config(**r["flags"]).out_dir == r["out_dir"]  # its flags make the run
    dec, bdd = doc["variants"]
    assert [p["variant"] for p in doc["variants"]] == ["dec", "bdd:kv1"]
    for p in doc["variants"]:
        assert VARIANT_KEYS <= set(p) and p["seeds"] == 2
        assert p["loss"] == pytest.approx(sum(p["losses"]) / 2)
        assert p["loss_sd"] == pytest.approx(abs(p["losses"][0] - p["losses"][1]) / math.sqrt(2))
        assert p["budget_tokens_per_sec"] > 0
    # 3 layers of 2 K/V heads of 8 dims, float32, K and V: 3 * 2 * 2 * 8 * 4 bytes per position;
    # bdd:kv1 holds 1 decoder layer of 1 head: 1/6 of it
    assert dec["held_bytes_per_position"] == 3 * 2 * 2 * 8 * 4 and dec["held_vs_dec"] == 1.0
    assert bdd["held_bytes_per_position"] == dec["held_bytes_per_position"] / 6
    assert bdd["budget_batch"] == 6 * dec["budget_batch"] and bdd["pareto"]
    assert dec["pareto"] == (dec["loss"] < bdd["loss"])
    assert (folder / "out" / "frontier.png").read_bytes()[:8] == PNG


def test_a_second_frontier_trains_nothing(tiny, tiny_frontier, monkeypatch, capsys):
    folder, data, _ = tiny
    before, _ = tiny_frontier
    calls = Trained(monkeypatch)
    frontier.main(["--archs", "dec,bdd:kv1", "--seeds", "2", "--repeats", "1", *TINY, *data,
                   "--out_dir", str(folder / "out")])
    assert calls.configs == []
    out = capsys.readouterr().out
    assert "4 runs: 4 finished, 0 to resume, 0 new" in out and "Pareto-optimal" in out
    after = json.loads((folder / "out" / "frontier.json").read_text())
    assert {r["status"] for r in after["runs"]} == {"finished before"}
    assert [r["cont_loss"] for r in after["runs"]] == [r["cont_loss"] for r in before["runs"]]


def test_a_variant_that_is_its_arch_with_these_flags_is_measured_once(capsys, tmp_path):
    """dec:kv2 at --n_head 2 is dec (a key/value head per head): it was trained, measured and
    drawn on top of dec, and both were marked Pareto-optimal."""
    args, _ = frontier.parse([*TINY, "--archs", "dec,dec:kv2,bdd:kv1", "--lr",
                              "dec=1e-3,bdd=1e-3", "--out_dir", str(tmp_path)])
    assert args.archs == ["dec", "bdd:kv1"]
    assert "note: dec:kv2 is dec with these flags" in capsys.readouterr().out


def test_one_seed_shows_no_spread():
    """"± 0.0000" for one seed read as a measured spread of zero."""
    point = {"variant": "dec", "learning_rate": 1e-3, "non_embedding_params": 1, "loss": 2.0,
             "loss_sd": 0.0, "seeds": 1, "held_bytes_per_position": 8.0, "held_vs_dec": 1.0,
             "budget_batch": 1, "budget_tokens_per_sec": 1.0, "pareto": True}
    table = frontier.table({"serving": {"budget_bytes": 1e6}, "seeds": [1337],
                            "variants": [point]})
    assert "±" not in table and "2.0000" in table


def test_pareto_marks_the_points_nothing_beats():
    points = [(100, 2.0),   # the most bytes and the lowest loss: optimal
              (50, 2.1),    # optimal
              (50, 2.2),    # beaten by (50, 2.1): as few bytes, lower loss
              (60, 2.1),    # beaten by (50, 2.1): fewer bytes, as low a loss
              (25, 2.5),    # optimal: the fewest bytes
              (30, 2.5)]    # beaten by (25, 2.5)
    assert frontier.pareto(points) == [True, True, False, False, True, False]
    assert frontier.pareto([(1, 1), (1, 1)]) == [True, True]  # a tie beats neither

"""lab/uptrain.py: a tiny experiment trains the parent, each conversion's points as one run
continued (each point resumes the one before it, at the parent's final learning rate), and the
targets from scratch at equal tokens; its last point is the conversion trained for those steps at
once; it writes every field, a second invocation trains nothing, and bad input is one line, exit
2, with nothing trained. A tiny dialogue corpus written here, so that bdd's chat loss is scored."""

import json
import random

import pytest

import config as cfg
from lab import uptrain
import train
from conftest import Calls

NAMES = ["Ann", "Bob", "Cyril"]
WORDS = "to be or not so I am here go now yes no".split()
TINY = ["--block_size", "32", "--batch_size", "4", "--max_iters", "4", "--warmup_iters", "1",
        "--eval_interval", "2", "--eval_iters", "1", "--log_interval", "2", "--n_layer", "3",
        "--n_head", "2", "--n_embd", "16", "--turn_regex", r"(?m)^[A-Z][a-z]+: "]
ARGS = ["--seeds", "1", "--targets", "bdd,dec:kv1", "--decoder_inits", "top,fresh",
        "--fractions", "0,0.5,1", "--scratch", "1", "--chat_scenes", "2"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uptrain")
    rng = random.Random(0)
    speeches = [f"{rng.choice(NAMES)}: {' '.join(rng.choice(WORDS) for _ in range(4))}\n"
                for _ in range(600)]
    (folder / "talk.txt").write_text("".join(speeches))
    return folder, ["--data", str(folder / "talk.txt"), "--data_root", str(folder / "data")]


@pytest.fixture(scope="module")
def tiny(data):
    """(the experiment's folder, its uptrain.json, the train calls and steps it made)."""
    folder, flags = data
    with pytest.MonkeyPatch.context() as mp:
        calls = Calls(mp)
        uptrain.main([*ARGS, *TINY, *flags, "--out_dir", str(folder / "out")])
    return folder / "out", json.loads((folder / "out" / "uptrain.json").read_text()), calls


def test_tiny_uptrain_trains_each_step_once_and_writes_every_field(data, tiny):
    out, doc, calls = tiny
    names = [r["name"] for r in doc["runs"]]
    assert names == ["parent_s1337", "bdd-top_up0_s1337", "bdd-top_up2_s1337",
                     "bdd-top_up4_s1337", "bdd-fresh_up0_s1337", "bdd-fresh_up2_s1337",
                     "bdd-fresh_up4_s1337", "dec-kv1_up0_s1337", "dec-kv1_up2_s1337",
                     "dec-kv1_up4_s1337", "bdd_scratch8_s1337", "dec-kv1_scratch8_s1337"]
    # each arm's points are one run continued: 4 parent steps, 4 per arm, 8 per scratch target
    assert calls.steps == 4 + 3 * 4 + 2 * 8
    parent = calls.configs[0]
    for c in calls.configs:
        if "_up" in c.out_dir:
            first = c.out_dir.endswith("_up0_s1337")
            assert c.init_from == (parent.out_dir if first else "resume")
            assert c.learning_rate == c.min_lr == parent.min_lr and c.warmup_iters == 0
    rows = {r["name"]: r for r in doc["runs"]}
    assert rows["bdd-fresh_up4_s1337"]["init_from"]["conversion"]["decoder_init"] == "fresh"
    assert all((r["chat_loss"] is not None) == (r["arch"] == "bdd" or r["kind"] == "parent")
               for r in doc["runs"])
    kv = doc["kv_bytes_per_position"]  # 3 layers of 2 heads of 8 dims; bdd keeps 1 layer
    assert kv["dec"] == 3 * 2 * 2 * 8 * 4 and kv["bdd"] == kv["dec"] / 3
    assert kv["dec:kv1"] == kv["dec"] / 2
    assert set(doc["verdicts"]) == {"bdd top", "bdd fresh", "dec:kv1"}
    for point in doc["points"]:
        assert point["gap"]["mean"] == pytest.approx(point["cont_loss"]["mean"] /
                                                     rows["parent_s1337"]["cont_loss"] - 1)
    assert (out / "uptrain.png").read_bytes()[:8] == PNG
    # the last point is the conversion trained for its 4 steps at once
    direct = train.train(cfg.make_config(**{**rows["bdd-top_up4_s1337"]["flags"],
                                            "out_dir": str(out / "direct")}), log=lambda s: None)
    assert direct["cont_loss"] == rows["bdd-top_up4_s1337"]["cont_loss"]


def test_a_second_uptrain_trains_nothing(data, tiny, monkeypatch, capsys):
    folder, flags = data
    out, before, _ = tiny
    calls = Calls(monkeypatch)
    uptrain.main([*ARGS, *TINY, *flags, "--out_dir", str(out)])
    assert calls.configs == [] and calls.steps == 0
    assert "12 runs: 12 finished" in capsys.readouterr().out
    after = json.loads((out / "uptrain.json").read_text())
    assert [r["cont_loss"] for r in after["runs"]] == [r["cont_loss"] for r in before["runs"]]
    assert [r["chat_loss"] for r in after["runs"]] == [r["chat_loss"] for r in before["runs"]]


def test_a_killed_uptrain_resumes_where_it_stopped(data, tiny, tmp_path, monkeypatch, capsys):
    folder, flags = data
    argv = [*ARGS, *TINY, *flags, "--out_dir", str(tmp_path)]
    Calls(monkeypatch, die_at=4 + 2 + 1)  # in bdd top's first step from 2 to 4
    with pytest.raises(SystemExit) as e:
        uptrain.main(argv)
    assert e.value.code == 130 and "run the same command again" in capsys.readouterr().err
    calls = Calls(monkeypatch)
    uptrain.main(argv)
    assert calls.configs[0].out_dir == str(tmp_path / "bdd-top_up4_s1337")
    assert calls.configs[0].init_from == "resume"  # from the copy of the point before it
    assert calls.steps == 2 + 4 + 4 + 2 * 8
    runs = json.loads((tmp_path / "uptrain.json").read_text())["runs"]
    assert [r["cont_loss"] for r in runs] == [r["cont_loss"] for r in tiny[1]["runs"]]


@pytest.mark.parametrize("argv, message", [
    (["--targets", "dec,bdd"], "--targets dec is the parent itself"),
    (["--targets", "encdec"], "no conversion into encdec is defined"),
    (["--decoder_inits", "middle"], "middle is not a decoder init"),
    (["--fractions", "0,x"], "is not a comma-separated list of fractions"),
    (["--scratch", "0.3"], "each fraction must be one of --fractions"),
    (["--n_kv_head", "1"], "--n_kv_head is set per run here; use --targets with :kv<N>"),
    (["--decoder_init", "top"], "--decoder_init is set per run here; use --decoder_inits"),
    (["--targets", "dec:kv3"], "kv3 needs n_kv_head 3 to divide n_head 2"),
    (["--fractions", "0,0.1", "--scratch", "0.1"], "give the same steps twice ([0, 0])"),
    (["--uptrain_warmup", "3"], "--uptrain_warmup 3 must be 0 to the first point's steps (2)"),
    (["--uptrain_lr", "-1"], "--uptrain_lr must be a positive learning rate"),
])
def test_bad_input_is_one_line_exit_2_nothing_trained(data, tmp_path, capsys, monkeypatch,
                                                      argv, message):
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as e:
        uptrain.main([*TINY, *data[1], "--fractions", "0,0.5,1", "--scratch", "1", *argv,
                      "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and not (tmp_path / "out").exists(), err


def test_an_out_dir_that_is_a_file_is_refused_nothing_trained(data, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit) as e:
        uptrain.main([*TINY, *data[1], "--out_dir", str(tmp_path / "taken")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "is a file, not a folder" in err, err


def test_a_damaged_frontier_file_is_refused_before_anything_trains(data, tmp_path, capsys,
                                                                   monkeypatch):
    """--frontier's numbers sit beside the table: a file that is not the frontier's JSON stops
    the experiment at once, not after its runs (and not silently)."""
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "frontier.json").write_text('{"variants": [{"variant": "dec"}]}')
    with pytest.raises(SystemExit) as e:
        uptrain.main([*TINY, *data[1], "--fractions", "0,0.5,1", "--scratch", "1", "--frontier",
                      str(tmp_path / "frontier.json"), "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "frontier.json" in err, err
    assert "loss" in err and not (tmp_path / "out").exists(), err

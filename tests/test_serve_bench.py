"""The serving benchmark (lab/serve_bench.py): a tiny run replays every workload and
writes its JSON and figure; bad flags are refused with one line and exit 2."""

import json

import pytest
import torch

from lab import serve_bench
from model import ModelConfig, build_model


@pytest.fixture
def tiny_models(monkeypatch):
    """The benchmark's fresh models, tiny: a context of 64 byte tokens, width 16."""
    def fresh_model(config, device=None, seed=None):
        torch.manual_seed(0)
        return build_model(config.arch, ModelConfig(
            vocab_size=257, block_size=64, n_layer=3, n_dec_layer=1, n_head=2,
            n_kv_head=config.n_kv_head, kv_share=config.kv_share, n_embd=16))
    monkeypatch.setattr(serve_bench.cfg, "fresh_model", fresh_model)


TINY_BENCH = ["--archs", "dec,bdd", "--rates", "8,inf", "--requests", "3", "--saturate", "4",
              "--light", "2", "--busy", "2", "--shared", "3", "--preambles", "1", "--threads",
              "1"]


def test_the_benchmark_writes_its_json_and_figure(tmp_path, shakespeare, tiny_models, capsys):
    serve_bench.main([*TINY_BENCH, "--out_dir", str(tmp_path)])
    doc = json.loads((tmp_path / "serve_bench.json").read_text())
    assert (tmp_path / "serve_bench.png").stat().st_size > 0
    assert doc["single_turn"]["rates"] == ["8", "inf"]
    for name in ("dec", "bdd"):
        runs = doc["single_turn"]["variants"][name]
        assert [r["requests"] for r in runs] == [3, 4]
        assert all(r["peak_pages"] <= r["pages"] for r in runs)
        assert doc["multi_turn"]["busy"][name]["conversations"] == 2
        assert doc["shared_prefix"][name]["requests"] == 3
    assert any("bdd / dec" in goal[0] for goal in doc["goals"])
    assert "goals" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--rates", "0,inf"], "--rates"),
    (["--archs", "dec,gpt"], "not an arch"),
    (["--budget_mb", "0"], "--budget_mb 0.0 is out of range"),
    (["--checkpoints", "no_such_folder"], "no checkpoint"),
    (["--budget_mb", "0.001"], "too small for dec"),
    (["--no_such_flag"], "unrecognized arguments"),
])
def test_bad_benchmark_flags_are_one_line_exit_2(argv, message, tmp_path, tiny_models, capsys):
    with pytest.raises(SystemExit) as e:
        serve_bench.main([*TINY_BENCH, *argv, "--out_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and message in err, err


def test_an_out_dir_that_is_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit) as e:
        serve_bench.main([*TINY_BENCH, "--out_dir", str(tmp_path / "taken")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "is a file, not a folder" in err, err


def test_checkpoints_of_an_experiment_are_its_runs_of_the_lowest_seed(tmp_path):
    """`--checkpoints out/frontier` finds the frontier's runs, which it names <variant>_s<seed>;
    a folder named for the variant itself comes first."""
    for run in ("dec-kv1_s1338", "dec-kv1_s1337", "dec-kv1_s99x", "bdd_s7", "bdd"):
        (tmp_path / run).mkdir()
    assert serve_bench.run_folder(str(tmp_path), "dec:kv1") == str(tmp_path / "dec-kv1_s1337")
    assert serve_bench.run_folder(str(tmp_path), "bdd") == str(tmp_path / "bdd")
    assert serve_bench.run_folder(str(tmp_path), "encdec") == str(tmp_path / "encdec")


def test_unset_threads_are_one_per_idle_core_as_train_py_chooses(tmp_path, shakespeare,
                                                                 tiny_models, capsys,
                                                                 monkeypatch):
    """With another program busy on one of 2 cores, torch's 2 threads would wait for each other
    at every step (RESULTS.md section 8): the benchmark takes one, and says so."""
    import train
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(train, "TORCH_THREADS", 2)
    monkeypatch.setattr(train, "idle_cores", lambda: 1.0)
    argv = [a for a in TINY_BENCH[:-2]] + ["--out_dir", str(tmp_path)]
    assert "--threads" not in argv
    before = torch.get_num_threads()
    try:
        serve_bench.main(argv)
    finally:
        torch.set_num_threads(before)
    assert json.loads((tmp_path / "serve_bench.json").read_text())["threads"] == 1
    assert "1 thread(s) (1.0 of 2 cores idle as it started)" in capsys.readouterr().out

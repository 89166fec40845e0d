"""lab/sweep.py: a tiny sweep runs end to end and writes every field; a second run trains nothing; a
killed run resumes where it stopped; --splits reuses the sweep's runs; the fit recovers a known
law; bad input gets one line and exit 2."""

import json
import random

import numpy as np
import pytest
import torch

import files
from lab import fits
from lab import flops
from lab import sweep
from conftest import Calls

RUN_KEYS = {"name", "size", "arch", "seed", "n_layer", "n_dec_layer", "n_embd", "n_head",
            "out_dir", "status", "iters", "cont_loss", "non_embedding_params", "params",
            "train_tokens", "train_flops_per_token", "train_flops", "kv_bytes_per_position",
            "decode_context_len", "decode_layer_flops_per_token", "decode_head_flops_per_token",
            "wall_time", "curve", "held_bytes_per_position"}
POINT_KEYS = {"size", "arch", "n_layer", "n_dec_layer", "n_embd", "non_embedding_params",
              "train_tokens", "train_flops", "kv_bytes_per_position",
              "decode_layer_flops_per_token", "loss", "loss_std", "seeds"}
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_sizes(folder):
    """Two tiny sizes in place of the cpu preset's, and the flags of a tiny recipe on a tiny
    corpus written into folder."""
    text = "\n".join(" ".join(random.Random(i).choice("to be or not that is the question "
                                                       "whether tis nobler".split())
                              for _ in range(8)) for i in range(300))
    (folder / "tiny.txt").write_text(text + "\n")
    sizes = sweep.Sizes(sizes={"a": dict(n_embd=16, n_head=2), "b": dict(n_embd=32, n_head=2)},
                        split_size="b", overrides={})
    flags = ["--preset", "cpu", "--block_size", "32", "--batch_size", "4", "--max_iters", "4",
             "--eval_interval", "2", "--eval_iters", "1", "--warmup_iters", "1",
             "--log_interval", "2", "--data", str(folder / "tiny.txt"),
             "--data_root", str(folder / "data")]
    return sizes, flags


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, calls, flags): the tiny sizes installed, and a first sweep of them (2 sizes x 3
    archs) already run into folder/out."""
    folder = tmp_path_factory.mktemp("sweep")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sizes, flags = tiny_sizes(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sweep.SIZES, "cpu", sizes)
        calls = Calls(mp)
        sweep.main([*flags, "--out_dir", str(folder / "out")])
        yield folder, calls, flags
    torch.set_num_threads(threads)


@pytest.fixture
def sizes(tiny, monkeypatch):
    """The tiny sizes, installed for one test."""
    monkeypatch.setitem(sweep.SIZES, "cpu", tiny_sizes(tiny[0])[0])


def sweep_json(folder):
    return json.loads((folder / "out" / "sweep.json").read_text())


def test_tiny_sweep_writes_every_field(tiny):
    folder, calls, _ = tiny
    assert len(calls.configs) == 6 and calls.steps == 6 * 4
    doc = sweep_json(folder)["sweep"]
    assert {"preset", "device", "torch", "recipe", "sizes", "seeds", "wall_time", "runs",
            "points", "fits", "multipliers"} <= set(doc)
    assert [r["name"] for r in doc["runs"]] == ["a/dec_s1337", "a/encdec_4+2_s1337",
                                                "a/bdd_4+2_s1337", "b/dec_s1337",
                                                "b/encdec_4+2_s1337", "b/bdd_4+2_s1337"]
    for r in doc["runs"]:
        assert RUN_KEYS <= set(r), r["name"]
        assert r["status"] == "trained" and r["train_tokens"] == 4 * 4 * 32
        assert r["cont_loss"] == r["curve"][-1][1] and [p[0] for p in r["curve"]] == [0, 256, 512]
        assert r["train_flops"] == r["train_flops_per_token"] * r["train_tokens"]
        if r["arch"] == "dec":  # every product counted: 6 per weight (forward and backward) of
            L, d, T = r["n_layer"], r["n_embd"], 32  # the layers and LM head, 4 + 10 per layer,
            embedding = r["params"] - r["non_embedding_params"]  # query and key of attention
            assert r["train_flops_per_token"] == 6 * (12 * d * d * L + embedding) + 14 * L * T * d
    by = {r["name"]: r for r in doc["runs"]}
    dec, bdd = by["b/dec_s1337"], by["b/bdd_4+2_s1337"]
    assert bdd["kv_bytes_per_position"] * 3 == dec["kv_bytes_per_position"] == 6 * 2 * 32 * 4
    assert bdd["train_flops_per_token"] != dec["train_flops_per_token"]  # its own step counted
    assert len(doc["points"]) == 6 and all(POINT_KEYS <= set(p) for p in doc["points"])
    for arch, fit in doc["fits"].items():  # 2 sizes: the 2-parameter law, exact through them
        assert fit["form"] == "A*N^-alpha" and fit["rms"] < 1e-9, arch
    assert set(doc["multipliers"]) == {"encdec", "bdd"}
    assert all(m["multiplier"] > 0 for m in doc["multipliers"]["bdd"])
    assert (folder / "out" / "sweep.png").read_bytes()[:8] == PNG
    assert not list((folder / "out").rglob("*.tmp.*"))


def test_second_run_trains_nothing(tiny, sizes, monkeypatch, capsys):
    folder, _, flags = tiny
    before = sweep_json(folder)["sweep"]
    calls = Calls(monkeypatch)
    sweep.main([*flags, "--out_dir", str(folder / "out")])
    assert calls.configs == [] and calls.steps == 0
    assert "6 runs: 6 finished, 0 to resume, 0 new" in capsys.readouterr().out
    after = sweep_json(folder)["sweep"]
    assert {r["status"] for r in after["runs"]} == {"finished before"}
    assert [r["cont_loss"] for r in after["runs"]] == [r["cont_loss"] for r in before["runs"]]


def test_a_second_sweep_into_a_held_folder_is_refused(tiny, sizes, capsys):
    folder, calls, flags = tiny
    trained = len(calls.configs)
    with files.holding(folder / "out", "experiment"):
        with pytest.raises(SystemExit) as e:
            sweep.main([*flags, "--out_dir", str(folder / "out")])
    assert e.value.code == 2 and "is in use by another experiment" in capsys.readouterr().err
    assert len(calls.configs) == trained


def test_killed_run_resumes_where_it_stopped(tiny, sizes, tmp_path, monkeypatch, capsys):
    folder, _, flags = tiny
    argv = [*flags, "--sizes", "a", "--out_dir", str(tmp_path)]
    Calls(monkeypatch, die_at=3)  # dec dies in its third step; its checkpoint holds iter 2
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    assert e.value.code == 130 and "run the same command again" in capsys.readouterr().err
    assert torch.load(tmp_path / "a" / "dec_s1337" / "ckpt.pt")["iter_num"] == 2
    calls = Calls(monkeypatch)
    sweep.main(argv)
    assert [c.init_from for c in calls.configs] == ["resume", "scratch", "scratch"]
    assert calls.steps == 2 + 4 + 4  # dec went on from iter 2, not from the start
    runs = json.loads((tmp_path / "sweep.json").read_text())["sweep"]["runs"]
    first = {r["name"]: r for r in sweep_json(folder)["sweep"]["runs"]}
    assert runs[0]["status"] == "resumed"
    for r in runs:  # the same losses as the uninterrupted sweep: train.py's exact resume
        assert r["cont_loss"] == first[r["name"]]["cont_loss"], r["name"]


def test_splits_reuse_the_sweeps_runs(tiny, sizes, monkeypatch):
    folder, _, flags = tiny
    calls = Calls(monkeypatch)
    sweep.main([*flags, "--splits", "--out_dir", str(folder / "out")])
    assert [(c.arch, c.n_dec_layer) for c in calls.configs] == [("bdd", 1), ("bdd", 3)]
    doc = sweep_json(folder)
    assert "sweep" in doc  # kept beside the new section
    points = {p["split"]: p for p in doc["splits"]["points"]}
    assert set(points) == {"dec", "5:1", "4:2", "3:3"}
    assert [points[s]["kv_fraction"] for s in ("5:1", "4:2", "3:3", "dec")] == [1 / 6, 2 / 6,
                                                                                3 / 6, 1.0]
    assert points["dec"]["loss_vs_dec"] == 1.0
    assert (folder / "out" / "splits.png").read_bytes()[:8] == PNG


def test_counted_step_includes_attention_backward():
    """The training FLOPs count attention forward (2 products) and backward (5) on the CPU."""
    B, h, T, d = 2, 3, 8, 4
    q = torch.randn(B, h, T, d, requires_grad=True)
    mask = torch.ones(T, 2 * T, dtype=torch.bool).tril(T)  # T queries over 2T keys, as bdd's
    kv = torch.randn(B, h, 2 * T, d)
    with flops.flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, attn_mask=mask).sum().backward()
    assert counter.get_total_flops() == (2 + 5) * 2 * B * h * T * (2 * T) * d


def test_fit_recovers_a_known_law():
    n = np.geomspace(1e5, 3e7, 6)
    fit = fits.fit_power_law(n, 1.7 + 40 * n ** -0.3)
    assert fit["form"] == "E + A*N^-alpha"
    assert fit["E"] == pytest.approx(1.7, rel=1e-6) and fit["A"] == pytest.approx(40, rel=1e-5)
    assert fit["alpha"] == pytest.approx(0.3, rel=1e-6)
    pure = fits.fit_power_law(n[:2], 12 * n[:2] ** -0.1, offset=False)
    assert pure["A"] == pytest.approx(12) and pure["alpha"] == pytest.approx(0.1)
    # auto: E is pinned by a law with an offset, not by one without
    assert fits.choose_fit(n, 1.7 + 40 * n ** -0.3)["form"] == "E + A*N^-alpha"
    assert fits.choose_fit(n, 12 * n ** -0.1)["form"] == "A*N^-alpha"
    assert fits.params_for_loss(fit, 1.7 + 40 * 1e6 ** -0.3) == pytest.approx(1e6)
    assert fits.params_for_loss(fit, 1.6) is None  # below E: never reached


def test_multiplier_of_a_law_shifted_in_size():
    """bdd's law equals dec's at 1.5x the parameters: the multiplier is 1.5 at every loss."""
    n = np.geomspace(1e5, 1e7, 5)
    dec = fits.fit_power_law(n, 2 + 30 * n ** -0.25)
    bdd = fits.fit_power_law(n, 2 + 30 * (n / 1.5) ** -0.25)
    out = fits.multipliers({"dec": dec, "bdd": bdd}, {"dec": (1e5, 1e7), "bdd": (1e5, 1e7)})
    assert [m["multiplier"] for m in out["bdd"]] == pytest.approx([1.5] * 3, rel=1e-5)
    assert not out["bdd"][0]["extrapolated"]


@pytest.mark.parametrize("n_points, offset", [(2, True), (1, False)])
def test_fit_refuses_too_few_points(n_points, offset):
    n = np.geomspace(1e5, 1e6, n_points)
    with pytest.raises(ValueError, match=f"{n_points} distinct sizes cannot fit"):
        fits.fit_power_law(n, 3 * n ** -0.1, offset=offset)
    assert "error" in fits.choose_fit(list(n), list(3 * n ** -0.1), "power" if not offset
                                       else "offset")


def test_sweep_takes_variants(tiny, sizes, tmp_path, monkeypatch, capsys):
    """dec:kv1 beside dec: its own runs, folders and fits; at n_head 2 it holds half the K/V."""
    folder, _, flags = tiny
    calls = Calls(monkeypatch)
    sweep.main([*flags, "--archs", "dec,dec:kv1", "--out_dir", str(tmp_path)])
    assert [(c.arch, c.n_kv_head, c.n_embd) for c in calls.configs] == [
        ("dec", None, 16), ("dec", 1, 16), ("dec", None, 32), ("dec", 1, 32)]
    doc = json.loads((tmp_path / "sweep.json").read_text())["sweep"]
    assert [r["name"] for r in doc["runs"]] == ["a/dec_s1337", "a/dec-kv1_s1337", "b/dec_s1337",
                                                "b/dec-kv1_s1337"]
    assert doc["archs"] == ["dec", "dec:kv1"] and set(doc["fits"]) == {"dec", "dec:kv1"}
    by = {(p["size"], p["variant"]): p for p in doc["points"]}
    for size in ("a", "b"):
        dec, kv1 = by[(size, "dec")], by[(size, "dec:kv1")]
        assert kv1["n_kv_head"] == 1 and dec["n_kv_head"] == 2
        assert kv1["kv_bytes_per_position"] * 2 == dec["kv_bytes_per_position"]
        assert kv1["non_embedding_params"] < dec["non_embedding_params"]
    runs = {r["name"]: r for r in doc["runs"]}  # its own step counted: a narrower K/V projection
    assert runs["a/dec-kv1_s1337"]["train_flops_per_token"] < \
        runs["a/dec_s1337"]["train_flops_per_token"]
    assert "dec:kv1/dec" in capsys.readouterr().out


def test_a_variant_is_refused_at_sizes_it_does_not_fit(tiny, tmp_path, monkeypatch, capsys):
    """Sizes of 2 and 3 heads: kv2 fits the first only, and is refused (naming it) at the second,
    before anything trains."""
    _, flags = tiny_sizes(tmp_path)
    monkeypatch.setitem(sweep.SIZES, "cpu", sweep.Sizes(
        sizes={"two": dict(n_embd=16, n_head=2), "three": dict(n_embd=24, n_head=3)},
        split_size="two", overrides={}))
    monkeypatch.setattr(sweep.train, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as e:
        sweep.main([*flags, "--archs", "dec,dec:kv2", "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert ("error: --archs dec:kv2: kv2 needs n_kv_head 2 to divide n_head 3 at size three; the "
            "cpu sizes keep their heads (two 2, three 3), so dec:kv2 fits size(s) two: choose "
            "them with --sizes two") in err


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "a,q"], "--sizes 'a,q': unknown size(s) q; the cpu preset has a, b"),
    (["--archs", "dec:kv3"], "--archs dec:kv3: kv3 needs n_kv_head 3 to divide n_head 2 at size "
                             "a; the cpu sizes keep their heads (a 2, b 2), so dec:kv3 fits "
                             "none of them"),
    (["--archs", "dec,bdd:cla2"], "'bdd:cla2': cla (cross-layer K/V sharing) is a dec option"),
    (["--archs", "dec,gpt"], "'gpt' is not an arch"),
    (["--splits", "--archs", "dec"], "--splits trains dec and bdd; drop --archs"),
    (["--lr", "dec=1e-3,bdd=-1"], "--lr 'dec=1e-3,bdd=-1': bdd: '-1' is not a learning rate"),
    (["--lr", "dec=1e-3", "--learning_rate", "1e-3"], "--lr sets each run's learning_rate"),
    (["--lr", "auto", "--lr_file", "nowhere/lr.json"], "--lr auto: no tuned learning rates at "
                                                       "nowhere/lr.json; run `python -m lab.frontier "
                                                       "--lr_sweep --lr_file nowhere/lr.json`"),
    (["--n_kv_head", "1"], "--n_kv_head is set per run here; use --archs with :kv<N>"),
    (["--seeds", "0"], "--seeds must be 1 to 100, got 0"),
    (["--seeds", "100000"], "--seeds must be 1 to 100, got 100000"),
    (["--max_iters", "0"], "--max_iters 0 trains nothing to fit"),
    (["--skip_train"], "unrecognized arguments: --skip_train"),
    (["--n_embd", "64"], "--n_embd is set per run here; use --sizes"),
    (["--arch", "dec"], "--arch is set per run here"),
    (["--splits", "--sizes", "a,b"], "--splits trains at one size"),
    (["--splits", "--n_layer", "8"], "--splits needs --n_layer divisible by 6"),
    (["--splits", "--n_dec_layer", "2"], "--n_dec_layer is set per run by --splits"),
    (["--learning_rate", "0.002"],  # the folders hold runs of another recipe
     "holds a run trained with learning_rate 0.001 (this plan: 0.002)"),
])
def test_bad_input_exits_2_with_one_line(tiny, sizes, argv, message, capsys):
    folder, _, flags = tiny
    with pytest.raises(SystemExit) as e:
        sweep.main([*flags, *argv, "--out_dir", str(folder / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_every_run_of_an_experiment_trains_with_the_count_chosen_as_it_starts(tmp_path,
                                                                                monkeypatch):
    """Without --threads, train.py picks a count per run from the cores idle as it starts; an
    experiment picks once, so that its runs' timings and last bits compare like with like."""
    from lab import experiment as ex
    import train
    idle = iter([2.0, 1.0, 1.0])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(train, "TORCH_THREADS", 2)
    monkeypatch.setattr(train, "idle_cores", lambda: next(idle))
    runs = [ex.make_run(arch, {"arch": arch, "max_iters": 2}, str(tmp_path))
            for arch in ("dec", "encdec", "bdd")]
    lines, before = [], torch.get_num_threads()
    try:
        ex.use_threads(runs, log=lines.append)
        assert [run.config.threads for run in runs] == [2, 2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert lines == ["== 2 thread(s) for every run (2.0 of 2 cores idle as it started); "
                     "--threads N chooses =="]
    assert train.run_threads(runs[2].config) == (2, "--threads")  # not asked again per run

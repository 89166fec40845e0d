"""compare.py: a tiny side-by-side run writes every result and the figure; the KV ratios it
measures follow DESIGN.md section 3."""

import json
import random

import pytest

import compare

KEYS = ("non_embedding_params", "train_tokens", "supervised_fraction", "padding_fraction",
        "train_tokens_per_sec", "curve", "val_loss", "kv_bytes", "prefix_cache_bytes",
        "decode_flops_per_token", "decode_ms_per_token", "train_step_ms",
        "train_step_tokens_per_sec")
TINY = ["--n_layer", "3", "--n_dec_layer", "1", "--n_head", "2", "--n_embd", "32",
        "--block_size", "32", "--batch_size", "4", "--eval_iters", "1", "--repeats", "1",
        "--kv_budget_mb", "0.05", "--serving_max_batch", "4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(300))
    (folder / "tiny.txt").write_text(text + "\n")
    return folder


def test_tiny_run_writes_results_and_figure(corpus, capsys):
    out = corpus / "out"
    compare.main(["--preset", "cpu", "--archs", "dec,bdd,encdec", "--out_dir", str(out),
                  "--data", str(corpus / "tiny.txt"), "--data_root", str(corpus / "data"),
                  "--max_iters", "6", "--eval_interval", "3", "--warmup_iters", "2", *TINY])
    printed = capsys.readouterr().out
    for line in ("== training dec (1/3) ==", "== training encdec (3/3) ==", "bdd/dec", "encdec/dec"):
        assert line in printed
    results = json.loads((out / "results.json").read_text())
    assert {"config", "device", "torch", "wall_time"} <= set(results)
    assert list(results["archs"]) == ["dec", "bdd", "encdec"]
    for arch, r in results["archs"].items():
        assert set(KEYS) <= set(r), arch
        assert [p["tokens"] for p in r["curve"]] == [0, 3 * 4 * 32, 6 * 4 * 32]
        assert set(r["curve"][0]) >= {"tokens", "train_loss", "val_loss"}
        assert r["train_tokens"] == 6 * 4 * 32 and r["val_loss"] == r["curve"][-1]["val_loss"]
        assert r["decode_ms_per_token"] > 0 and r["decode_flops_per_token"]["layers"] > 0
    assert results["archs"]["dec"]["supervised_fraction"] == 1.0
    assert 0.2 < results["archs"]["encdec"]["supervised_fraction"] < 0.8
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_skip_train_kv_ratios_equal_the_formula(tmp_path):
    compare.main(["--skip_train", "--out_dir", str(tmp_path), "--n_layer", "6",
                  "--n_dec_layer", "2", *TINY[4:]])
    archs = json.loads((tmp_path / "results.json").read_text())["archs"]
    n_embd, n_enc, n_dec, n_layer = 32, 4, 2, 6
    for i, point in enumerate(archs["dec"]["kv_bytes"]):
        L = point["context_len"]  # positions fed: prompt P plus decoded tokens
        per_position = 2 * n_embd * 4  # K and V, float32, batch 1
        assert point["bytes"] == n_layer * L * per_position
        assert archs["bdd"]["kv_bytes"][i]["bytes"] == n_dec * L * per_position
        assert archs["encdec"]["kv_bytes"][i]["bytes"] == n_dec * L * per_position
        P = L - compare.decode_tokens(32)
        assert archs["bdd"]["prefix_cache_bytes"][i]["bytes"] == n_enc * (P - 1) * per_position
    ratio = archs["bdd"]["decode_flops_per_token"]["layers"] / archs["dec"]["decode_flops_per_token"]["layers"]
    assert ratio <= 0.34


@pytest.mark.parametrize("argv, message", [
    (["--archs", "dec,gpt"], "--archs 'dec,gpt': choose from dec, encdec, bdd"),
    (["--arch", "bdd"], "--arch is set by compare.py per arch"),
    (["--n_dec_layer", "6"], "--n_dec_layer 6 must be at least 1 and smaller than --n_layer 6"),
])
def test_bad_flags_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        compare.main(["--skip_train", "--out_dir", str(tmp_path), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_serving_section_table_and_panel(tmp_path, capsys, monkeypatch):
    """Throughput by batch and at a KV budget: the largest batch each arch holds follows from
    DESIGN.md section 3's bytes per sequence; the figure gets a fourth panel, after the others."""
    from matplotlib.figure import Figure
    titles = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (
        titles.extend(ax.get_title() for ax in fig.axes), real(fig, *a, **k))[1])
    compare.main(["--skip_train", "--archs", "dec,bdd", "--out_dir", str(tmp_path),
                  "--n_layer", "6", "--n_dec_layer", "2", *TINY[4:]])
    results = json.loads((tmp_path / "results.json").read_text())
    serving = results["serving"]
    assert serving["batches"] == [1, 2, 4] and serving["context_len"] == 16
    per_position = 2 * 32 * 4  # K and V, n_embd 32, float32
    for arch, layers in (("dec", 6), ("bdd", 2)):
        s = results["archs"][arch]["serving"]
        assert s["bytes_per_sequence"] == layers * 16 * per_position
        assert s["budget_batch"] == 50_000 // s["bytes_per_sequence"]
        assert s["budget_kv_bytes"] == s["budget_batch"] * s["bytes_per_sequence"] <= 50_000
        assert len(s["tokens_per_sec"]) == 3 and min(s["tokens_per_sec"]) > 0
    budget = {a: results["archs"][a]["serving"]["budget_batch"] for a in ("dec", "bdd")}
    assert budget == {"dec": 2, "bdd": 6}  # a third of the bytes: three times the sequences
    printed = capsys.readouterr().out
    for row in ("decode tokens/s, batch 1", "decode tokens/s, batch 4", "batch in 0.05 MB of KV",
                "decode tokens/s there (equal memory)", "bdd/dec decode time per token, by batch"):
        assert row in printed
    assert len(titles) == 5 and titles[4].startswith("Serving at context 16")
    assert titles[:3] == ["Continuation loss, same held-out targets",
                          "KV cache measured from live tensors", "Decode cost per token at context 16"]

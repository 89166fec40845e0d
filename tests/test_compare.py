"""compare.py: a tiny side-by-side run writes every result and the figure; the KV ratios it
measures follow DESIGN.md section 3."""

import io
import json
import random
import re
from contextlib import redirect_stdout

import pytest

import compare
from model import ARCHS, ModelConfig, build_model

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


@pytest.fixture(scope="module")
def tiny_run(corpus):
    """(out_dir, what was printed) of a side-by-side run of the three archs, 6 iterations each."""
    out, printed = corpus / "out", io.StringIO()
    (out / "dec").mkdir(parents=True)
    (out / "dec" / "ckpt.pt").write_bytes(b"an earlier run")  # compare replaces its own runs
    with redirect_stdout(printed):
        compare.main(["--preset", "cpu", "--archs", "dec,bdd,encdec", "--out_dir", str(out),
                      "--data", str(corpus / "tiny.txt"), "--data_root", str(corpus / "data"),
                      "--max_iters", "6", "--eval_interval", "3", "--warmup_iters", "2", *TINY])
    return out, printed.getvalue()


def test_tiny_run_writes_results_and_figure(tiny_run):
    out, printed = tiny_run
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


def printed_table(printed, archs):
    """{metric: [cells]} of the table printed at the end of a run (columns split by 2+ spaces)."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["metric"])
    head = re.split(r"\s{2,}", lines[start].strip())
    assert head == ["metric", *archs, "bdd/dec", "encdec/dec"]
    rows = {}
    for line in lines[start + 1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(head):
            break
        rows[cells[0]] = cells[1:]
    return rows


def printed_as(cell, value):
    """Whether a table cell such as '1,234' or '0.333' is `value` rounded to the cell's digits."""
    decimals = len(cell.partition(".")[2])
    return abs(float(cell.replace(",", "")) - value) <= 0.5 * 10 ** -decimals * (1 + 1e-9)


def test_printed_table_matches_results_json(tiny_run):
    """Each value the table prints is the arch's own in results.json, each ratio its arch's
    value over dec's; only bdd holds a prefix cache."""
    out, printed = tiny_run
    archs = json.loads((out / "results.json").read_text())["archs"]
    names = list(archs)
    rows = printed_table(printed, names)
    longest = archs["dec"]["kv_bytes"][-1]["context_len"]
    values = {  # metric: value of an arch's results
        "non-embedding params": lambda r: r["non_embedding_params"],
        "val (continuation) loss": lambda r: r["val_loss"],
        "train tokens/s, interleaved steps": lambda r: r["train_step_tokens_per_sec"],
        f"KV bytes at context {longest}": lambda r: r["kv_bytes"][-1]["bytes"],
        "layer FLOPs per token": lambda r: r["decode_flops_per_token"]["layers"],
        "decode ms per token": lambda r: r["decode_ms_per_token"],
    }
    for metric, value in values.items():
        cells = rows[metric]
        for arch, cell in zip(names, cells):
            assert printed_as(cell, value(archs[arch])), (metric, arch, cell)
        for a, cell in zip(("bdd", "encdec"), cells[len(names):]):
            assert printed_as(cell, value(archs[a]) / value(archs["dec"])), (metric, a, cell)
    prefix = dict(zip(names, rows["prefix cache bytes there"]))
    assert prefix["dec"] == prefix["encdec"] == "0" and int(prefix["bdd"].replace(",", "")) > 0
    assert rows["prefix cache bytes there"][len(names):] == ["-", "-"]


def test_plot_draws_the_results(tiny_run, tmp_path):
    """The figure's lines and bars carry results.json's numbers; the reference line is dec's KV
    bytes times n_dec / n_layer, which is bdd's at any split (DESIGN.md section 3)."""
    out, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    fig = compare.plot(results, str(tmp_path / "compare.png"))
    loss_ax, kv_ax, flops_ax, ms_ax = fig.axes[:4]  # the serving panel comes after them
    lines = {ax: {line.get_label(): line for line in ax.get_lines()} for ax in fig.axes}
    for arch, r in results["archs"].items():
        for label, key in (("continuation (val)", "val_loss"), ("own objective (train)",
                                                                "train_loss")):
            line = lines[loss_ax][f"{arch}: {label}"]
            assert list(line.get_xdata()) == [p["tokens"] / 1e6 for p in r["curve"]]
            assert list(line.get_ydata()) == [p[key] for p in r["curve"]]
        line = lines[kv_ax][arch]
        assert list(line.get_xdata()) == [p["context_len"] for p in r["kv_bytes"]]
        assert list(line.get_ydata()) == [p["bytes"] / 1e6 for p in r["kv_bytes"]]
    [reference] = [line for label, line in lines[kv_ax].items() if label.startswith("dec x")]
    cfg = results["config"]
    dec = [p["bytes"] / 1e6 for p in results["archs"]["dec"]["kv_bytes"]]
    assert list(reference.get_ydata()) == pytest.approx(
        [b * cfg["n_dec_layer"] / cfg["n_layer"] for b in dec])
    assert list(reference.get_ydata()) == pytest.approx(list(lines[kv_ax]["bdd"].get_ydata()))
    flops = [r["decode_flops_per_token"] for r in results["archs"].values()]
    heights = [bar.get_height() for bar in flops_ax.patches]
    assert heights == pytest.approx([f["layers"] / 1e6 for f in flops] +
                                    [f["head"] / 1e6 for f in flops])
    assert [bar.get_height() for bar in ms_ax.patches] == pytest.approx(
        [r["decode_ms_per_token"] for r in results["archs"].values()])


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
        # only bdd keeps its encoder's cache for prefix reuse
        assert archs["dec"]["prefix_cache_bytes"][i]["bytes"] == 0
        assert archs["encdec"]["prefix_cache_bytes"][i]["bytes"] == 0
    ratio = archs["bdd"]["decode_flops_per_token"]["layers"] / archs["dec"]["decode_flops_per_token"]["layers"]
    assert ratio <= 0.34


@pytest.mark.parametrize("argv, message", [
    (["--archs", "dec,gpt"], "--archs 'dec,gpt': 'gpt' is not an arch; choose from dec, encdec, "
                             "bdd (lower case, comma-separated)"),
    (["--archs", "dec,dec"], "--archs 'dec,dec': dec is listed twice; name each arch once"),
    (["--archs", "bdd, dec,bdd "], "bdd is listed twice"),
    (["--archs", "DEC"], "'DEC' is not an arch"),
    (["--archs", ","], "--archs ',' names no arch"),
    (["--block_size", "3"], "--block_size 3 is too small for the decode measurements"),
    (["--block_size", "2"], "--block_size 2 is too small for the decode measurements"),
    (["--arch", "bdd"], "--arch is set by compare.py per arch"),
    (["--n_dec_layer", "6"], "--n_dec_layer 6 must be at least 1 and smaller than --n_layer 6"),
    (["--kv_budget_mb", "0.1"], "--kv_budget_mb 0.1 holds 0 dec sequences"),
    (["--out_dir="], "--out_dir is empty"),
])
def test_bad_flags_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        compare.main(["--skip_train", "--out_dir", str(tmp_path), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_oversized_kv_budget_fails_before_any_training(corpus, capsys):
    """The GPU preset's 4 GB budget on a tiny model would decode thousands of rows at once: it
    is refused up front, before a step is trained."""
    out = corpus / "budget"
    with pytest.raises(SystemExit) as e:
        compare.main(["--preset", "cpu", "--out_dir", str(out), "--data", str(corpus / "tiny.txt"),
                      "--data_root", str(corpus / "data"), *TINY[:-4], "--kv_budget_mb", "4096"])
    assert e.value.code == 2
    assert "sequences of" in capsys.readouterr().err and not out.exists()


def test_archs_accept_spaces_around_names():
    assert compare.parse_archs(" dec, bdd ,") == ["dec", "bdd"]


@pytest.mark.parametrize("block_size", [2, 3, 4, 5])
def test_check_measurable_agrees_with_the_measurements(block_size):
    """check_measurable refuses exactly the block sizes the measurements cannot run at."""
    models = {a: build_model(a, ModelConfig(vocab_size=11, block_size=block_size, n_layer=2,
                                            n_dec_layer=1, n_head=1, n_embd=8)).eval()
              for a in ARCHS}
    try:
        compare.measure_inference(models, block_size)
        runs = True
    except ValueError:
        runs = False
    try:
        compare.check_measurable(block_size)
        accepted = True
    except SystemExit:
        accepted = False
    assert accepted == runs


def test_bad_block_size_fails_before_any_training(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare.train, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as e:
        compare.main(["--out_dir", str(tmp_path), "--data", str(corpus / "tiny.txt"),
                      "--data_root", str(corpus / "data"), *TINY[:8], "--block_size", "3"])
    assert e.value.code == 2 and "too small" in capsys.readouterr().err


def test_ctrl_c_exits_130_with_one_line(corpus, tmp_path, capsys, monkeypatch):
    """Interrupted in the second arch's training: one line, exit 130, no partial file."""
    steps = []

    def step(*args):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return step_for_real(*args)

    step_for_real = compare.train.train_step
    monkeypatch.setattr(compare.train, "train_step", step)
    with pytest.raises(SystemExit) as e:
        compare.main(["--archs", "dec,bdd", "--out_dir", str(tmp_path), "--data",
                      str(corpus / "tiny.txt"), "--data_root", str(corpus / "data"),
                      "--max_iters", "2", *TINY])
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: interrupted (Ctrl-C); nothing is half-written") and \
        len(err.splitlines()) == 1
    assert (tmp_path / "dec" / "ckpt.pt").exists() and not (tmp_path / "bdd" / "ckpt.pt").exists()
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "results.json").exists()


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
    for row in ("decode tokens/s, batch 1", "decode tokens/s, batch 4", "sequences in 0.05 MB of KV cache",
                "decode tokens/s there (equal memory)", "bdd/dec decode time per token, by batch"):
        assert row in printed
    assert len(titles) == 5 and titles[4].startswith("Serving at context 16")
    assert titles[:3] == ["Continuation loss, same held-out targets",
                          "KV cache measured from live tensors", "Decode cost per token at context 16"]

"""compare.py: a tiny side-by-side run writes every result and the figure; the KV ratios it
measures follow DESIGN.md section 3; each arch's cache figures are its own, and the sequences a
serving budget holds fit in it."""

import io
import json
import random
import re
from contextlib import redirect_stdout

import pytest

import compare
import config as cfg
import files
from lab import measure
from model import ARCHS, ModelConfig, build_model

KEYS = ("non_embedding_params", "train_tokens", "supervised_fraction", "padding_fraction",
        "train_tokens_per_sec", "curve", "cont_loss", "kv_bytes", "train_flops_per_token",
        "decode_flops_per_token", "decode_ms_per_token", "train_step_ms",
        "train_step_tokens_per_sec", "serving")
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
    with redirect_stdout(printed):
        compare.main(["--preset", "cpu", "--archs", "dec,bdd,encdec", "--out_dir", str(out),
                      "--data", str(corpus / "tiny.txt"), "--data_root", str(corpus / "data"),
                      "--max_iters", "6", "--eval_interval", "3", "--warmup_iters", "2", *TINY])
    return out, printed.getvalue()


def test_tiny_run_writes_results_and_figure(tiny_run):
    out, printed = tiny_run
    for line in ("== [1/3] dec (training)", "== [3/3] encdec (training)", "bdd/dec", "encdec/dec"):
        assert line in printed
    results = json.loads((out / "results.json").read_text())
    assert {"config", "device", "torch", "wall_time"} <= set(results)
    assert list(results["archs"]) == ["dec", "bdd", "encdec"]
    for arch, r in results["archs"].items():
        assert set(KEYS) <= set(r), arch
        assert [p["tokens"] for p in r["curve"]] == [0, 3 * 4 * 32, 6 * 4 * 32]
        assert set(r["curve"][0]) == {"iter", "tokens", "train_loss", "val_loss", "cont_loss"}
        assert r["train_tokens"] == 6 * 4 * 32 and r["cont_loss"] == r["curve"][-1]["cont_loss"]
        assert r["decode_ms_per_token"] > 0 and r["decode_flops_per_token"]["layers"] > 0
    assert results["archs"]["dec"]["supervised_fraction"] == 1.0
    assert 0.2 < results["archs"]["encdec"]["supervised_fraction"] < 0.8
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not files.leftovers(out)


def printed_table(printed, archs, ratios=("bdd", "encdec"), nth=0):
    """{metric: [cells]} of the nth table printed at the end of a run (columns split by 2+
    spaces), whose columns are archs, then each of ratios over dec."""
    lines = printed.splitlines()
    start = [i for i, line in enumerate(lines) if line.split()[:1] == ["metric"]][nth]
    head = re.split(r"\s{2,}", lines[start].strip())
    assert head == ["metric", *archs, *(f"{r}/dec" for r in ratios)]
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
        "continuation loss": lambda r: r["cont_loss"],
        "train tokens/s, interleaved steps": lambda r: r["train_step_tokens_per_sec"],
        f"K/V bytes at context {longest}": lambda r: r["kv_bytes"][-1]["kv_bytes"],
        "cache bytes held there": lambda r: r["kv_bytes"][-1]["held_bytes"],
        "decode tokens/s, batch 1": lambda r: r["serving"]["tokens_per_sec"][0],
        "layer FLOPs per token": lambda r: r["decode_flops_per_token"]["layers"],
        "decode ms per token": lambda r: r["decode_ms_per_token"],
    }
    for metric, value in values.items():
        cells = rows[metric]
        for arch, cell in zip(names, cells):
            assert printed_as(cell, value(archs[arch])), (metric, arch, cell)
        for a, cell in zip(("bdd", "encdec"), cells[len(names):]):
            assert printed_as(cell, value(archs[a]) / value(archs["dec"])), (metric, a, cell)
    assert rows["prefix cache bytes there"][len(names):] == ["-", "-"]
    # the time per token is the serving benchmark's at batch 1, not another measurement
    for arch in names:
        assert archs[arch]["decode_ms_per_token"] == 1000 / archs[arch]["serving"]["tokens_per_sec"][0]


def test_multi_turn_table_matches_results_json(tiny_run):
    """The multi-turn table prints each case's numbers of results.json and their ratios to dec;
    each case's conversations are the budget over the bytes one of them holds at its peak."""
    out, printed = tiny_run
    m = json.loads((out / "results.json").read_text())["multi_turn"]
    assert (m["turns"], m["tokens_in"], m["tokens_out"], m["rounds"]) == (4, 4, 4, 1)
    assert m["budget_bytes"] == 50_000
    cases = m["cases"]
    assert list(cases) == ["dec", "bdd keep", "bdd drop", "encdec"]
    rows = printed_table(printed, list(cases), ["bdd keep", "bdd drop", "encdec"], nth=1)
    values = {  # metric: value of a case's results
        "bytes held per conversation (peak)": lambda c: c["held_bytes_per_conv"],
        "conversations in 0.05 MB held": lambda c: c["conversations"],
        "decode tokens/s, all conversations": lambda c: c["decode_tokens_per_sec"],
        "mean time to first token (ms)": lambda c: c["mean_ttft_ms"],
        **{f"time to first token, turn {k + 1} (ms)": lambda c, k=k: c["ttft_ms_per_turn"][k]
           for k in range(4)},
    }
    for metric, value in values.items():
        cells = rows[metric]
        for name, cell in zip(cases, cells):
            assert printed_as(cell, value(cases[name])), (metric, name, cell)
        for name, cell in zip(list(cases)[1:], cells[len(cases):]):
            assert printed_as(cell, value(cases[name]) / value(cases["dec"])), (metric, name, cell)
    for k in range(4):
        cells = rows[f"tokens encoded, turn {k + 1} (dec: prefilled)"]
        assert cells == [f"{c['encoded_per_turn'][k]:,}" for c in cases.values()] + ["-"] * 3
    for name, c in cases.items():
        assert c["conversations"] == 50_000 // c["held_bytes_per_conv"] >= 1, name
        assert max(c["held_bytes_per_conv_by_turn"]) == c["held_bytes_per_conv"], name
    assert "multi-turn: conversations of 4 turns (4 tokens in, 4 out, greedy)" in printed


def test_multi_turn_rows_of_a_gpu_run(tiny_run):
    """Host bytes (offload's encoder cache) and the peak of memory_allocated() are rows only
    where the workload measured them (on CUDA)."""
    out, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    names = [row[0] for row in compare.multi_turn_rows(results)]
    assert not [n for n in names if "memory_allocated" in n or n.startswith("host bytes")]
    for i, c in enumerate(results["multi_turn"]["cases"].values()):
        c["cuda_peak_bytes_per_conv"] = 1000.0 * (i + 1)
        c["host_bytes_per_conv_by_turn"] = [0, 7, 3, 0]
    rows = {name: get for name, get, _, _ in compare.multi_turn_rows(results)}
    cases = results["multi_turn"]["cases"].values()
    assert [rows["peak of memory_allocated() per conversation"](c) for c in cases] == [
        1000.0 * (i + 1) for i in range(len(cases))]
    assert [rows["host bytes per conversation (peak)"](c) for c in cases] == [7] * len(cases)


def test_plot_draws_the_results(tiny_run, tmp_path):
    """The figure's lines and bars carry results.json's numbers; the reference line is dec's
    held bytes times n_dec / n_layer (DESIGN.md section 3)."""
    out, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    fig = compare.plot(results, str(tmp_path / "compare.png"))
    # ms: the twin of the FLOPs panel
    loss_ax, kv_ax, flops_ax, serving_ax, held_ax, ttft_ax, ms_ax = fig.axes
    lines = {ax: {line.get_label(): line for line in ax.get_lines()} for ax in fig.axes}
    for arch, r in results["archs"].items():
        for label, key in (("continuation (val)", "cont_loss"), ("own objective (train)",
                                                                 "train_loss")):
            line = lines[loss_ax][f"{arch}: {label}"]
            assert list(line.get_xdata()) == [p["tokens"] / 1e6 for p in r["curve"]]
            assert list(line.get_ydata()) == [p[key] for p in r["curve"]]
        line = lines[kv_ax][arch]
        assert list(line.get_xdata()) == [p["context_len"] for p in r["kv_bytes"]]
        assert list(line.get_ydata()) == [p["held_bytes"] / 1e6 for p in r["kv_bytes"]]
        line = lines[serving_ax][arch]
        assert list(line.get_ydata()) == r["serving"]["tokens_per_sec"]
    [reference] = [line for label, line in lines[kv_ax].items() if label.startswith("dec x")]
    ratio = results["archs"]["bdd"]["n_dec_layer"] / results["config"]["n_layer"]
    dec = [p["held_bytes"] / 1e6 for p in results["archs"]["dec"]["kv_bytes"]]
    assert list(reference.get_ydata()) == pytest.approx([b * ratio for b in dec])
    flops = [r["decode_flops_per_token"] for r in results["archs"].values()]
    heights = [bar.get_height() for bar in flops_ax.patches]
    assert heights == pytest.approx([f["layers"] / 1e6 for f in flops] +
                                    [f["head"] / 1e6 for f in flops])
    assert [bar.get_height() for bar in ms_ax.patches] == pytest.approx(
        [r["decode_ms_per_token"] for r in results["archs"].values()])
    for name, c in results["multi_turn"]["cases"].items():
        held = lines[held_ax][f"{name}: {c['conversations']} conversations in the budget"]
        assert list(held.get_xdata()) == [1, 2, 3, 4]
        assert list(held.get_ydata()) == [b / 1e6 for b in c["held_bytes_per_conv_by_turn"]]
        ttft = lines[ttft_ax][f"{name}: {c['decode_tokens_per_sec']:,.0f} decode tokens/s"]
        assert list(ttft.get_ydata()) == c["ttft_ms_per_turn"]


def test_skip_train_kv_ratios_equal_the_formula(tmp_path):
    compare.main(["--skip_train", "--out_dir", str(tmp_path), "--n_layer", "6",
                  "--n_dec_layer", "2", *TINY[4:]])
    archs = json.loads((tmp_path / "results.json").read_text())["archs"]
    n_embd, n_dec, n_layer = 32, 2, 6
    for i, point in enumerate(archs["dec"]["kv_bytes"]):
        L = point["context_len"]  # positions fed: prompt P plus decoded tokens
        per_position = 2 * n_embd * 4  # K and V, float32, batch 1
        assert point["kv_bytes"] == n_layer * L * per_position
        assert archs["bdd"]["kv_bytes"][i]["kv_bytes"] == n_dec * L * per_position
        assert archs["encdec"]["kv_bytes"][i]["kv_bytes"] == n_dec * L * per_position
        for arch in ARCHS:
            assert archs[arch]["kv_bytes"][i]["held_bytes"] >= archs[arch]["kv_bytes"][i]["kv_bytes"]
    ratio = archs["bdd"]["decode_flops_per_token"]["layers"] / archs["dec"]["decode_flops_per_token"]["layers"]
    assert ratio <= 0.34



@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    """(results.json, {arch: a fresh model of the run's shape}) of a --skip_train comparison of
    the three at the 2:1 split, where bdd's and encdec's decode K/V are equal and the bytes their
    caches hold are not (encdec's self part grows in chunks of its own)."""
    out = tmp_path_factory.mktemp("fresh")
    with redirect_stdout(io.StringIO()):
        compare.main(["--skip_train", "--out_dir", str(out), "--n_layer", "6", "--n_dec_layer", "2",
                      *TINY[4:]])
    results = json.loads((out / "results.json").read_text())
    shape = ModelConfig(block_size=32, n_layer=6, n_dec_layer=2, n_head=2, n_embd=32)
    return results, {arch: build_model(arch, shape).eval() for arch in ARCHS}


def test_each_arch_is_shown_its_own_cache(fresh_run):
    """The cache figures under an arch's name (results.json, from which the table and the
    figure are drawn) are those of that arch's model, measured here on it alone."""
    results, models = fresh_run
    archs = results["archs"]
    for arch, r in archs.items():
        for point in r["kv_bytes"]:
            m = measure.measure_decode(models[arch], point["context_len"], count_flops=False)
            assert point == {"context_len": point["context_len"], "kv_bytes": m["kv_bytes"],
                             "prefix_bytes": m["prefix_bytes"],
                             "held_bytes": m["held_bytes_per_seq"]}, arch
        m = measure.measure_decode(models[arch], results["serving"]["context_len"], count_flops=False)
        assert r["serving"]["bytes_per_sequence"] == m["held_bytes_per_seq"], arch
    # the two archs a swap would confuse can be told apart
    assert [p["held_bytes"] for p in archs["bdd"]["kv_bytes"]] != \
        [p["held_bytes"] for p in archs["encdec"]["kv_bytes"]]


def test_the_sequences_a_budget_holds_fit_in_it(fresh_run):
    """The row "sequences in 0.05 MB held": that many sequences, decoded together to the
    serving context, hold at most the budget, and one more would hold more; the bytes are all
    that their cache holds (a chunk's empty columns too), not only the K/V it has filled."""
    results, models = fresh_run
    budget, context = results["serving"]["budget_bytes"], results["serving"]["context_len"]
    for arch, r in results["archs"].items():
        n = r["serving"]["budget_batch"]

        def held(batch):
            return measure.measure_decode(models[arch], context, batch_size=batch,
                                          count_flops=False)["held_bytes"]["cpu"]
        assert held(n) <= budget < held(n + 1), arch
    # where filled and held bytes differ enough to change the count
    encdec = measure.measure_decode(models["encdec"], context, count_flops=False)
    assert budget // encdec["kv_bytes"] != budget // encdec["held_bytes_per_seq"]

@pytest.mark.parametrize("argv, message", [
    (["--archs", "dec,gpt"], "--archs 'dec,gpt': 'gpt' is not an arch; choose from dec, encdec, "
                             "bdd (lower case, comma-separated)"),
    (["--archs", "dec,dec"], "--archs 'dec,dec': dec is listed twice; name each arch once"),
    (["--archs", "bdd, dec,bdd "], "bdd is listed twice"),
    (["--archs", "DEC"], "'DEC' is not an arch"),
    (["--archs", ","], "--archs ',' names no arch"),
    (["--block_size", "3"], "--block_size 3 is too small for the decode measurements"),
    (["--block_size", "2"], "--block_size 2 is too small for the decode measurements"),
    (["--arch", "bdd"], "--arch is set per run here; use --archs"),
    (["--init_from", "resume"], "--init_from is set per run here"),
    (["--n_dec_layer", "6"], "--n_dec_layer 6 must be smaller than --n_layer 6"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--kv_budget_mb", "0.1"], "--kv_budget_mb 0.1 holds 0 dec sequences"),
    (["--out_dir="], "--out_dir is empty"),
    (["--archs", "dec,dec:kv1"], "--archs dec:kv1: compare.py trains the three archs as they are"),
])
def test_bad_flags_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        compare.main(["--skip_train", "--out_dir", str(tmp_path), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


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
    assert compare.ex.parse_archs(" dec, bdd ,") == ["dec", "bdd"]


@pytest.mark.parametrize("block_size", [4, 7, 8, 9, 12])
def test_check_measurable_agrees_with_the_measurements(block_size):
    """check_measurable refuses exactly the block sizes the measurements cannot run at."""
    models = {a: build_model(a, ModelConfig(vocab_size=11, block_size=block_size, n_layer=2,
                                            n_dec_layer=1, n_head=1, n_embd=8)).eval()
              for a in ARCHS}
    try:
        measure.kv_by_context(models, block_size)
        for model in models.values():
            measure.measure_decode(model, block_size // 2)
        runs = True
    except (AssertionError, ValueError):
        runs = False
    try:
        measure.check_measurable(block_size)
        accepted = True
    except cfg.ConfigError:
        accepted = False
    assert accepted == runs


def test_a_finished_compare_is_measured_again_without_training(tiny_run, monkeypatch, capsys):
    """Run again, the same command trains nothing: its runs are finished (as in the sweep)."""
    out, _ = tiny_run
    corpus = out.parent
    monkeypatch.setattr(compare.ex.train, "train", lambda *a, **k: pytest.fail("trained"))
    compare.main(["--preset", "cpu", "--archs", "dec,bdd,encdec", "--out_dir", str(out),
                  "--data", str(corpus / "tiny.txt"), "--data_root", str(corpus / "data"),
                  "--max_iters", "6", "--eval_interval", "3", "--warmup_iters", "2", *TINY])
    assert "3 runs: 3 finished, 0 to resume, 0 new" in capsys.readouterr().out


def test_a_train_run_in_the_folder_is_not_replaced_silently(corpus, tmp_path, capsys):
    """A folder holding a run of other settings (here train.py's, of another width) is refused
    with one line unless --overwrite is given, the same rule as train.py's."""
    import train
    base = ["--data", str(corpus / "tiny.txt"), "--data_root", str(corpus / "data")]
    train.main([*base, "--arch", "bdd", "--out_dir", str(tmp_path / "bdd"), "--max_iters", "2",
                "--warmup_iters", "1", "--n_layer", "3", "--n_embd", "16", "--n_head", "2",
                "--block_size", "32", "--batch_size", "2"])
    capsys.readouterr()
    before = (tmp_path / "bdd" / "ckpt.pt").read_bytes()
    argv = ["--archs", "bdd", "--out_dir", str(tmp_path), *base, "--max_iters", "2",
            "--warmup_iters", "1", *TINY]
    with pytest.raises(SystemExit) as e:
        compare.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds a run trained with" in err and "--overwrite" in err
    assert (tmp_path / "bdd" / "ckpt.pt").read_bytes() == before
    compare.main([*argv, "--overwrite"])
    assert (tmp_path / "bdd" / "ckpt.pt").read_bytes() != before


def test_a_second_experiment_into_a_held_folder_is_refused(tmp_path, capsys):
    with files.holding(tmp_path, "experiment"):
        with pytest.raises(SystemExit) as e:
            compare.main(["--skip_train", "--out_dir", str(tmp_path), *TINY[4:]])
    assert e.value.code == 2 and "is in use by another experiment" in capsys.readouterr().err


def test_bad_block_size_fails_before_any_training(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare.ex.train, "train", lambda *a, **k: pytest.fail("trained"))
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

    step_for_real = compare.ex.train.train_step
    monkeypatch.setattr(compare.ex.train, "train_step", step)
    with pytest.raises(SystemExit) as e:
        compare.main(["--archs", "dec,bdd", "--out_dir", str(tmp_path), "--data",
                      str(corpus / "tiny.txt"), "--data_root", str(corpus / "data"),
                      "--max_iters", "2", "--warmup_iters", "1", *TINY])
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: interrupted (Ctrl-C); nothing is half-written") and \
        len(err.splitlines()) == 1
    assert (tmp_path / "dec" / "ckpt.pt").exists() and not (tmp_path / "bdd" / "ckpt.pt").exists()
    assert not list(tmp_path.rglob("*.tmp.*")) and not (tmp_path / "results.json").exists()


def test_serving_section_table_and_panel(tmp_path, capsys, monkeypatch):
    """Throughput by batch and at a memory budget: the largest batch each arch holds is the
    budget over the bytes one of its sequences holds; the figure's fourth panel shows it."""
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
    assert serving["budget_bytes"] == 50_000 and serving["budget_given"]
    for arch in ("dec", "bdd"):
        s = results["archs"][arch]["serving"]
        assert s["budget_batch"] == 50_000 // s["bytes_per_sequence"]
        assert len(s["tokens_per_sec"]) == 3 and min(s["tokens_per_sec"]) > 0
    printed = capsys.readouterr().out
    dec, bdd = (results["archs"][a]["serving"]["bytes_per_sequence"] for a in ("dec", "bdd"))
    assert printed_table(printed, ["dec", "bdd"], ["bdd"])["bytes held per sequence at context 16"] \
        == [f"{dec:,.0f}", f"{bdd:,.0f}", f"{bdd / dec:.3f}"]
    for row in ("decode tokens/s, batch 1", "decode tokens/s, batch 4", "sequences in 0.05 MB held",
                "decode tokens/s there (equal memory)", "bdd/dec decode time per token, by batch"):
        assert row in printed
    assert len(titles) == 7 and titles[3].startswith("Serving at context 16")
    assert titles[4:6] == ["Multi-turn: held per conversation; budget 0.05 MB",
                           "Multi-turn: time to first token, all conversations at once"]
    assert titles[:3] == ["Continuation loss, same held-out targets",
                          "Cache held, measured from live tensors", "Decode cost per token at context 16"]


def test_the_default_budget_fits_a_tiny_model(tmp_path, capsys):
    """A budget the user did not give is sized to the model, never refused."""
    compare.main(["--skip_train", "--out_dir", str(tmp_path), "--n_embd", "16", "--n_head", "2",
                  "--block_size", "16", "--repeats", "1", "--serving_max_batch", "2"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["serving"]["budget_given"]
    in_budget = [r["serving"]["budget_batch"] for r in results["archs"].values()]
    assert 1 <= min(in_budget) and max(in_budget) <= measure.MAX_BUDGET_BATCHES * 2


def test_threads_apply_before_anything_is_measured(tmp_path, monkeypatch):
    """--threads is the process's setting: a --skip_train comparison (which trains nothing, so
    train() never sets it) measures with it."""
    import torch
    seen = []
    real = compare.measure.kv_by_context
    monkeypatch.setattr(compare.measure, "kv_by_context",
                        lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    before = torch.get_num_threads()
    try:
        compare.main(["--skip_train", "--out_dir", str(tmp_path), "--threads", "2", *TINY[4:]])
    finally:
        torch.set_num_threads(before)
    assert seen == [2]

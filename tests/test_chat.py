"""Chat measured turn by turn (measure.chat_eval), the turn-aligned fine-tune (train.py
--init_from a run's folder) and the boundary ablation (lab/ablation.py): the chat losses equal the
uncached forward with the same boundaries for every arch, each turn position gets its own
speeches, the scenes are whole speeches at the corpus's turn starts inside one document, a
fine-tune starts from its source's weights and leaves the source as it was, and the ablation runs
end to end, resumes without training again and refuses bad input with one line. Tiny models on
tiny dialogue corpora written here, whose turns a --turn_regex finds."""

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lab import ablation
import config as cfg
import mask
from lab import measure
import train
from conftest import Calls
from model import ModelConfig, build_model
from corpus.download import DataError
from corpus.prepare import prepare

NAMES = ["Ann", "Bob", "Cyril"]
WORDS = "to be or not so I am here go now yes no".split()
TURN_REGEX = r"(?m)^[A-Z][a-z]+: "  # a speaker's name at the start of a line
PNG = b"\x89PNG\r\n\x1a\n"


def dialogue_text(rng, speeches):
    """Speeches of three speakers, "Name: words\\n", some of two lines (the second one starts in
    lower case: no turn)."""
    out = []
    for i in range(speeches):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
        second = rng.random() < 0.2
        more = "\n" + " ".join(rng.choice(WORDS[:6]) for _ in range(2)) if second else ""
        out.append(f"{NAMES[rng.randrange(3)]}: {line}{more}\n")
    return "".join(out)


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    """(folder, meta): a one-file dialogue corpus (its last tenth is the val split), prepared in
    byte tokens with TURN_REGEX."""
    folder = tmp_path_factory.mktemp("talk")
    (folder / "talk.txt").write_text(dialogue_text(random.Random(0), 600))
    meta = prepare(folder / "talk.txt", root=folder / "data", turn_regex=TURN_REGEX)
    assert meta["turns"]["val"] > 20
    return folder, meta


def tiny_model(arch, sharp):
    """A tiny model with sharp attention in float64 (conftest.sharpen): a block that starts one
    token off, or a history that is not all there, moves the losses by far more than rounding."""
    config = ModelConfig(vocab_size=257, block_size=64, n_layer=3, n_dec_layer=1, n_head=2,
                         n_embd=16)
    torch.manual_seed(0)
    return sharp(build_model(arch, config)).eval()


def uncached_losses(arch, model, scene):
    """Each speech's per-token losses from the training forward, no cache: dec causal over the
    scene; bdd with its blocks starting at the turn starts; encdec once per speech, the history
    before the speech as the source and the decoder from the speech's first token."""
    x = scene.tokens
    spans = scene.speeches()
    if arch == "encdec":
        return [F.cross_entropy(model({"enc_x": x[None, :s], "dec_x": x[None, s:e - 1]})[0][0],
                                x[s + 1:e], reduction="none") for s, e in spans]
    batch = {"x": x[None, :-1]}
    if arch == "bdd":
        batch["block_ids"] = mask.block_ids(len(x) - 1, scene.starts[1:])
    losses = F.cross_entropy(model(batch)[0][0], x[1:], reduction="none")  # position p: x[p + 1]
    return [losses[s:e - 1] for s, e in spans]


# -----------------------------------------------------------------------------
# the chat evaluation


@pytest.mark.parametrize("arch, policy", [("dec", "keep"), ("encdec", "keep"), ("bdd", "keep"),
                                          ("bdd", "drop")])
def test_chat_losses_equal_the_uncached_forward(talk, sharp, arch, policy):
    model = tiny_model(arch, sharp)
    scenes = measure.dialogue_scenes(talk[1], 64, 6)
    assert len(scenes) == 6 and max(len(s.starts) for s in scenes) >= 4
    for scene in scenes:
        got = measure.chat_losses(model, scene, policy)
        want = uncached_losses(arch, model, scene)
        assert [len(g) for g in got] == [e - s - 1 for s, e in scene.speeches()]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


def test_chat_eval_scores_each_turn_position(talk, sharp):
    """by_turn[k] holds the k-th speech of every scene that has one: its tokens, speeches and
    their mean loss; the overall loss is the mean over every scored token."""
    model = tiny_model("bdd", sharp)
    scenes = measure.dialogue_scenes(talk[1], 64, 8)
    result = measure.chat_eval(model, scenes)
    per_scene = [uncached_losses("bdd", model, s) for s in scenes]
    longest = max(len(s.starts) for s in scenes)
    assert [t["turn"] for t in result["by_turn"]] == list(range(1, longest + 1))
    for k, t in enumerate(result["by_turn"]):
        losses = torch.cat([speeches[k] for speeches in per_scene if len(speeches) > k])
        assert t["speeches"] == sum(len(s.starts) > k for s in scenes)
        assert t["tokens"] == len(losses)
        assert t["loss"] == pytest.approx(losses.mean().item(), abs=1e-9)
    everything = torch.cat([l for speeches in per_scene for l in speeches])
    assert result["tokens"] == len(everything) and result["scenes"] == 8
    assert result["loss"] == pytest.approx(everything.mean().item(), abs=1e-9)


def test_scenes_are_whole_speeches_at_the_turn_starts(talk):
    meta = talk[1]
    tokens = np.fromfile(Path(meta["dir"]) / "val.bin", dtype=np.uint16)
    assert tokens[-1] == meta["eot"] and meta["eot"] not in tokens[:-1]  # one document
    text = bytes(tokens[:-1].astype(np.uint8)).decode()  # ASCII: a byte token per character
    block_size = 48
    scenes = measure.dialogue_scenes(meta, block_size, 10)
    assert len(scenes) == 10
    offsets = [m.start() for m in re.finditer(TURN_REGEX, text)]
    for scene in scenes:
        assert scene.starts[0] == 0 and len(scene.starts) >= 2
        assert len(scene.tokens) <= block_size + 1 and 256 not in scene.tokens.tolist()
        speeches = [bytes(scene.tokens[s:e].tolist()).decode() for s, e in scene.speeches()]
        for speech in speeches:  # "Name: words\n", whole
            assert speech.split(":")[0] in NAMES and speech.endswith("\n"), speech
        begin = text.index("".join(speeches))
        assert [begin + s for s in scene.starts] == [o for o in offsets
                                                     if begin <= o < begin + len(scene.tokens)]
        end = begin + len(scene.tokens)
        assert end in offsets  # the scene ends where the next speech starts,
        after = next((o for o in offsets if o > end), None)
        assert after is None or after - begin > block_size + 1  # which would not have fit
    assert measure.dialogue_scenes(meta, block_size, 10)[3].starts == scenes[3].starts


def test_scenes_stay_inside_one_play(tmp_path):
    """Plays shorter than the context, one document each: a scene runs from a turn start to
    where its play ends at the latest, never on into the next play's speeches."""
    rng = random.Random(1)
    plays = [dialogue_text(rng, rng.randint(3, 5)) for _ in range(60)]
    (tmp_path / "plays.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in plays))
    meta = prepare(tmp_path / "plays.jsonl", root=tmp_path / "data", turn_regex=TURN_REGEX)
    held_out = plays[9::10]  # every 10th document is the val split's
    scenes = measure.dialogue_scenes(meta, 64, 100)
    assert len(scenes) >= 6
    for scene in scenes:
        tokens = scene.tokens.tolist()
        assert meta["eot"] not in tokens, "a scene runs across the end of a play"
        assert any(bytes(tokens).decode() in play for play in held_out)

def test_a_corpus_without_turns_has_no_scenes(talk):
    folder = talk[0]
    meta = prepare(folder / "talk.txt", root=folder / "plain")
    with pytest.raises(DataError, match="it has no turn starts there; give a corpus "
                       "with turns"):
        measure.dialogue_scenes(meta, 64, 4)


# -----------------------------------------------------------------------------
# the fine-tune


def run_config(talk, out_dir, **kw):
    folder = talk[0]
    flags = dict(data=str(folder / "talk.txt"), data_root=str(folder / "data"),
                 turn_regex=TURN_REGEX, out_dir=str(out_dir), n_layer=3, n_dec_layer=1, n_head=2,
                 n_embd=16, block_size=32, batch_size=4, max_iters=4, warmup_iters=1,
                 eval_interval=2, eval_iters=1, log_interval=2, seed=0)
    return cfg.TrainConfig(**{**flags, **kw})


def quiet(*args):
    pass


@pytest.fixture(scope="module")
def source(talk, tmp_path_factory):
    """out_dir of a finished 4-step bdd run with random boundaries."""
    out = tmp_path_factory.mktemp("source")
    train.train(run_config(talk, out), log=quiet)
    return out


def fingerprint(folder):
    """{file: (sha256, mtime_ns)} of every file under folder."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fine_tune_starts_from_its_source_and_leaves_it_as_it_was(talk, source, tmp_path,
                                                                    monkeypatch):
    before = fingerprint(source)
    first = {}
    real_step = train.train_step

    def step(model, optimizer, *args):
        if not first:
            first["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
            first["optimizer"] = dict(optimizer.state)
        return real_step(model, optimizer, *args)

    monkeypatch.setattr(train, "train_step", step)
    history = train.train(run_config(talk, tmp_path, boundaries="turns", init_from=str(source),
                                     max_iters=3), log=quiet)
    saved = torch.load(source / "ckpt.pt", weights_only=True)
    assert first["weights"].keys() == saved["model"].keys()
    for name, value in saved["model"].items():
        assert torch.equal(first["weights"][name], value), name
    assert len(first["optimizer"]) == 0  # weights only: AdamW starts afresh
    assert history["init_from"] == {"out_dir": str(source), "iter": 4}
    assert history["curve"][0]["cont_loss"] == saved["history"]["cont_loss"]  # the same model
    assert [p["iter"] for p in history["curve"]] == [0, 2, 3]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 3 and ckpt["train_config"]["boundaries"] == "turns"
    assert fingerprint(source) == before


def error_line(capsys):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def argv(config):
    out = []
    for k, v in vars(config).items():
        if v is not None and not isinstance(v, bool):
            out += [f"--{k}", str(v)]
    return out


@pytest.mark.parametrize("flags, message", [
    (["--init_from", "{source}", "--out_dir", "{source}"], "is this run's own --out_dir: a "
     "fine-tune trains into a folder of its own"),
    (["--init_from", "{empty}"], "there is no checkpoint at"),
    (["--init_from", "resum"], "--init_from resum: there is no checkpoint at resum/ckpt.pt; give "
     "scratch, resume, or the folder of a trained run"),
    (["--init_from", ""], "--init_from is empty"),
    (["--init_from", "{source}", "--n_embd", "32"], "n_embd 16 (this run: 32); give this run "
     "the same shape"),
    (["--init_from", "{source}", "--arch", "dec"], "holds a bdd model, not dec; give --arch bdd"),
])
def test_bad_fine_tunes_exit_2_with_one_line(talk, source, tmp_path, capsys, flags, message):
    places = {"{source}": str(source), "{empty}": str(tmp_path / "empty")}
    base = argv(run_config(talk, tmp_path / "out", max_iters=1))
    with pytest.raises(SystemExit) as e:
        train.main(base + [places.get(f, f) for f in flags])
    assert e.value.code == 2 and message in error_line(capsys)


# -----------------------------------------------------------------------------
# the ablation


def ablation_flags(talk):
    folder = talk[0]
    return ["--preset", "cpu", "--strategies", "turns,random", "--seeds", "1", "--ft_iters", "3",
            "--chat_scenes", "4", "--n_layer", "3", "--n_head", "2", "--n_embd", "16",
            "--block_size", "32", "--batch_size", "4", "--max_iters", "4", "--warmup_iters", "1",
            "--eval_interval", "2", "--eval_iters", "1", "--log_interval", "2",
            "--data", str(folder / "talk.txt"), "--data_root", str(folder / "data"),
            "--turn_regex", TURN_REGEX]


@pytest.fixture(scope="module")
def tiny_ablation(talk, tmp_path_factory):
    """(out folder, calls): the ablation of 2 strategies and 1 seed, run once."""
    out = tmp_path_factory.mktemp("ablation")
    with pytest.MonkeyPatch.context() as mp:
        calls = Calls(mp)
        ablation.main([*ablation_flags(talk), "--out_dir", str(out)])
    return out, calls


def test_the_ablation_runs_end_to_end(tiny_ablation):
    out, calls = tiny_ablation
    doc = json.loads((out / "ablation.json").read_text())
    names = ["dec_s1337", "encdec_s1337", "bdd_random_s1337", "bdd_turns_s1337",
             "ft_random_s1337", "ft_turns_s1337"]
    assert [r["name"] for r in doc["runs"]] == names
    assert [c.out_dir for c in calls.configs] == [str(out / n) for n in names]
    assert calls.steps == 4 * 4 + 2 * 3
    for r in doc["runs"]:
        assert r["status"] == "trained" and r["chat_tokens"] == doc["chat"]["tokens"] > 0
        assert r["chat_loss"] > 0 and r["cont_loss"] > 0
        assert sum(t["tokens"] for t in r["chat_by_turn"]) == r["chat_tokens"]
    assert [p["variant"] for p in doc["points"]] == ["dec", "encdec", "bdd_random", "bdd_turns"]
    assert doc["chat"]["scenes"] == 4 and doc["strategies"] == ["random", "turns"]
    # the fine-tune: both arms from the random run, with one schedule
    ft = doc["fine_tune"]
    source = str(out / "bdd_random_s1337")
    arms = {c.boundaries: c for c in calls.configs if c.init_from == source}
    assert set(arms) == {"random", "turns"}
    differ = {k for k, v in vars(arms["random"]).items() if vars(arms["turns"])[k] != v}
    assert differ == {"boundaries", "out_dir"} and arms["turns"].max_iters == 3
    assert arms["turns"].seed == 1337 + ablation.FT_SEED  # not the batches the source saw
    assert {r["name"]: r["init_from"] for r in doc["runs"] if r["init_from"]} == {
        "ft_random_s1337": {"out_dir": source, "iter": 4},
        "ft_turns_s1337": {"out_dir": source, "iter": 4}}
    assert ft["start"]["cont_loss"] == doc["runs"][2]["cont_loss"]
    by = {r["name"]: r for r in doc["runs"]}
    assert ft["turns_minus_random"]["chat_loss"]["mean"] == pytest.approx(
        by["ft_turns_s1337"]["chat_loss"] - by["ft_random_s1337"]["chat_loss"])
    assert (out / "ablation.png").read_bytes()[:8] == PNG
    assert not list(out.rglob("*.tmp.*"))


def test_a_second_ablation_trains_nothing(talk, tiny_ablation, monkeypatch, capsys):
    out, _ = tiny_ablation
    before = json.loads((out / "ablation.json").read_text())
    calls = Calls(monkeypatch)
    ablation.main([*ablation_flags(talk), "--out_dir", str(out)])
    assert calls.configs == [] and calls.steps == 0
    printed = capsys.readouterr().out
    assert "6 runs: 6 finished, 0 to resume, 0 new" in printed and "turns - random" in printed
    after = json.loads((out / "ablation.json").read_text())
    assert {r["status"] for r in after["runs"]} == {"finished before"}
    for a, b in zip(before["runs"], after["runs"]):
        assert (a["cont_loss"], a["chat_loss"]) == (b["cont_loss"], b["chat_loss"]), a["name"]


@pytest.mark.parametrize("flags, message", [
    (["--strategies", "random,diagonal"], "'diagonal' is not a boundary strategy"),
    (["--strategies", ","], "names no strategy"),
    (["--strategies", "turns"], "add random to --strategies, or skip the fine-tune"),
    (["--seeds", "0"], "--seeds must be 1 to 100"),
    (["--ft_seeds", "2"], "--ft_seeds must be 1 to --seeds (1), got 2"),
    (["--ft_iters", "1", "--warmup_iters", "2"], "--ft_iters 1 is shorter than the warmup"),
    (["--chat_scenes", "0"], "--chat_scenes must be at least 1"),
    (["--arch", "bdd"], "--arch is set per run here"),
    (["--boundaries", "turns"], "--boundaries is set per run here; use --strategies"),
    (["--init_from", "resume"], "--init_from is set per run here"),
    (["--turn_regex", "("], "--turn_regex '(' does not compile"),
])
def test_bad_ablation_input_exits_2_with_one_line(talk, tmp_path, monkeypatch, capsys, flags,
                                                  message):
    calls = Calls(monkeypatch)
    with pytest.raises(SystemExit) as e:
        ablation.main([*ablation_flags(talk), *flags, "--out_dir", str(tmp_path)])
    assert e.value.code == 2 and message in error_line(capsys)
    assert calls.steps == 0


def test_an_ablation_on_a_corpus_without_turns_trains_nothing(talk, tmp_path, monkeypatch,
                                                              capsys):
    (tmp_path / "plain.txt").write_text((talk[0] / "talk.txt").read_text().replace(":", ""))
    flags = ablation_flags(talk)
    flags[flags.index("--data") + 1] = str(tmp_path / "plain.txt")
    calls = Calls(monkeypatch)
    with pytest.raises(SystemExit) as e:
        ablation.main([*flags, "--out_dir", str(tmp_path / "out")])
    assert e.value.code == 2 and "has no turns" in error_line(capsys)
    assert calls.steps == 0

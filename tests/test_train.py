"""train.py: every arch learns, a resumed run equals an uninterrupted one, a crash while saving
keeps the good checkpoint, bad input exits 2 with one line, a diverging loss exits 1, and DDP keeps
two ranks in sync. Tiny models on a tiny corpus written here."""

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import default_sigint, user_visible_warnings, word_salad

import config as cfg
import files
import model as M
import train
from model import ModelConfig, build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return word_salad(tmp_path_factory.mktemp("train"))


def tiny(corpus, out_dir, **kw):
    config = dict(data=str(corpus / "tiny.txt"), data_root=str(corpus / "data"), out_dir=str(out_dir),
               n_layer=2, n_dec_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8,
               max_iters=30, learning_rate=3e-3, min_lr=3e-4, warmup_iters=2, eval_interval=10,
               eval_iters=2, log_interval=10, seed=0)
    return cfg.TrainConfig(**{**config, **kw})


def flags(config):
    """The command line of a TrainConfig."""
    argv = []
    for k, v in vars(config).items():
        if isinstance(v, bool):
            argv.append(f"--{k}" if v else f"--no-{k}")
        elif v is not None:
            argv += [f"--{k}", str(v)]
    return argv


def quiet(*args):
    pass


def load(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """out_dir of a finished 4-iteration bdd run."""
    out = tmp_path_factory.mktemp("trained")
    train.train(tiny(corpus, out, max_iters=4), log=quiet)
    return out


# -----------------------------------------------------------------------------
# learning, history and checkpoint contract


@pytest.mark.parametrize("arch,objective", [("dec", "prefix_lm"), ("bdd", "prefix_lm"),
                                            ("encdec", "prefix_lm"), ("encdec", "span")])
def test_each_arch_learns(corpus, tmp_path, arch, objective):
    config = tiny(corpus, tmp_path, arch=arch, objective=objective)
    h = train.train(config, log=quiet)
    curve = h["curve"]
    assert [p["iter"] for p in curve] == [0, 10, 20, 30]
    assert curve[-1]["train_loss"] < curve[0]["train_loss"] - 1.0
    assert curve[-1]["cont_loss"] < curve[0]["cont_loss"] - 1.0
    assert h["cont_loss"] == curve[-1]["cont_loss"]
    assert h["train_tokens"] == 30 * 8 * 32 == curve[-1]["tokens"]
    assert len(h["iter_losses"]) == 30 and h["train_tokens_per_sec"] > 0
    assert h["wall_time"] >= h["train_time"] > 0
    supervised = {"dec": 1.0, "bdd": 1.0}.get(arch, 0.5 if objective == "prefix_lm" else 0.15)
    assert h["supervised_fraction"] == pytest.approx(supervised, abs=0.1)
    assert (h["padding_fraction"] > 0) == (objective == "prefix_lm" and arch == "encdec")
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 4

    ckpt = load(tmp_path)  # the contract sample.py reads
    assert set(ckpt) == set(cfg.CHECKPOINT_KEYS)
    assert ckpt["arch"] == arch and ckpt["objective"] == objective and ckpt["iter_num"] == 30
    assert ckpt["train_config"] == h["config"] and ckpt["history"]["curve"] == curve
    model = build_model(arch, ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert model.num_params() == h["non_embedding_params"]


def test_lr_schedule():
    config = cfg.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=100)
    lrs = [train.get_lr(it, config) for it in range(120)]
    assert lrs[0] < lrs[9] < lrs[10] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.55) and lrs[100] == lrs[119] == 0.1


class FixedBatches:
    """The training batches train_step reads, in order: a stand-in for pack.Batches."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_batch(self, split):
        return next(self.batches)

    def supervision_stats(self, batch):
        return {"supervised": 1.0, "padding": 0.0}


def test_accumulated_gradient_is_the_gradient_of_the_mean_loss():
    """train_step over 3 micro-batches hands the optimizer the gradient of the mean of their 3
    losses: not 3 times it, not a third of it. AdamW and clipping would hide a constant scale,
    so the optimizer here only records what it is given."""
    torch.manual_seed(0)
    model = build_model("dec", ModelConfig(vocab_size=37, block_size=16, n_layer=2,
                                           n_dec_layer=1, n_head=2, n_embd=16))
    micro = [{"x": torch.randint(37, (4, 16)), "y": torch.randint(37, (4, 16))} for _ in range(3)]

    class Recorder:
        def step(self):
            self.grads = [p.grad.clone() for p in model.parameters()]

        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=set_to_none)

    config = cfg.TrainConfig(gradient_accumulation_steps=3, grad_clip=0.0)
    optimizer, history = Recorder(), train.new_history(config, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = train.train_step(model, optimizer, scaler, FixedBatches(micro), config, nullcontext(),
                            "cpu", history)
    mean = torch.stack([model(b)[1] for b in micro]).mean()
    mean.backward()
    assert loss.item() == pytest.approx(mean.item(), rel=1e-6)
    for p, got in zip(model.parameters(), optimizer.grads):
        assert torch.allclose(got, p.grad, rtol=1e-5, atol=1e-9)
    assert history["train_batches"] == 3


# -----------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("arch, stop", [("bdd", 10), ("encdec", 12)])
def test_resume_equals_uninterrupted(corpus, tmp_path, arch, stop):
    """Stopped at iteration `stop` and resumed from the command line with only --max_iters, a run
    reaches exactly the losses, evaluations and weights of one that ran 20 iterations straight.
    Dropout makes the torch RNG matter; bdd's block boundaries and encdec's split points the batch
    generator. bdd stops on an evaluation iteration (10), which the resumed run must not evaluate
    again; encdec between two (its last evaluation, at 12, is the only extra point)."""
    kw = dict(arch=arch, dropout=0.1, max_iters=20, lr_decay_iters=20, eval_interval=5)
    straight = train.train(tiny(corpus, tmp_path / "a", **kw), log=quiet)
    train.train(tiny(corpus, tmp_path / "b", **{**kw, "max_iters": stop}), log=quiet)
    assert load(tmp_path / "b")["iter_num"] == stop
    train.main(["--init_from", "resume", "--arch", arch, "--out_dir", str(tmp_path / "b"),
                "--max_iters", "20"])
    resumed = load(tmp_path / "b")
    assert resumed["history"]["iter_losses"] == straight["iter_losses"]
    straight_iters = [p["iter"] for p in straight["curve"]]
    curve = resumed["history"]["curve"]
    assert [p["iter"] for p in curve] == sorted({*straight_iters, stop})
    assert [p for p in curve if p["iter"] in straight_iters] == straight["curve"]
    assert resumed["history"]["train_tokens"] == straight["train_tokens"]
    for k, v in load(tmp_path / "a")["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


def test_resume_takes_unset_flags_from_checkpoint(trained):
    config = cfg.make_config(init_from="resume", out_dir=str(trained), max_iters=8)
    saved = load(trained)["train_config"]
    assert (config.n_embd, config.block_size, config.data) == (32, 32, saved["data"])
    # lr_decay_iters unset stays None: the cosine follows the new max_iters ...
    assert config.max_iters == 8 and config.lr_decay_iters is saved["lr_decay_iters"] is None
    assert train.get_lr(6, config) > config.min_lr
    # ... unless it is given
    config = cfg.make_config(init_from="resume", out_dir=str(trained), max_iters=8,
                               lr_decay_iters=4)
    assert train.get_lr(6, config) == config.min_lr


def logged(out_dir):
    """log.jsonl's records without their wall-clock train_time."""
    lines = (Path(out_dir) / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "train_time"} for line in lines]


def test_resume_after_a_kill_during_a_save_equals_uninterrupted(corpus, tmp_path, monkeypatch):
    """A 20-iteration run killed while saving at iteration 10 (ckpt.pt still holds iteration 5,
    log.jsonl already has iteration 10 and half a line more), resumed with no flags but
    --init_from resume, ends with the weights and the log of a run that was never stopped."""
    kw = dict(dropout=0.1, max_iters=20, eval_interval=5, always_save_checkpoint=True)
    train.train(tiny(corpus, tmp_path / "a", **kw), log=quiet)
    saves, save = [], cfg.save_checkpoint

    def killed_at_the_second_save(path, state):
        saves.append(state["iter_num"])
        if len(saves) == 2:
            raise KeyboardInterrupt
        save(path, state)

    monkeypatch.setattr(cfg, "save_checkpoint", killed_at_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny(corpus, tmp_path / "b", **kw), log=quiet)
    monkeypatch.undo()
    assert saves == [5, 10] and load(tmp_path / "b")["iter_num"] == 5
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write('{"iter": 15, "tok')
    train.main(["--init_from", "resume", "--out_dir", str(tmp_path / "b")])
    assert logged(tmp_path / "b") == logged(tmp_path / "a")
    assert [p["iter"] for p in logged(tmp_path / "b")] == [0, 5, 10, 15, 20]
    for k, v in load(tmp_path / "a")["model"].items():
        assert torch.equal(v, load(tmp_path / "b")["model"][k]), k


def test_resume_with_a_larger_max_iters_decays_to_the_new_end(corpus, tmp_path):
    """A finished 12-iteration run extended to 20 (lr_decay_iters unset) runs iterations 12 to
    19 at the learning rates of a 20-iteration run; its first 12 iterations decayed to 12, so it
    does not end with the weights of a run planned for 20 (test_resume_equals_uninterrupted
    shows the way to get those: --lr_decay_iters 20 from the start)."""
    kw = dict(max_iters=20, eval_interval=5)
    train.train(tiny(corpus, tmp_path / "a", **kw), log=quiet)
    train.train(tiny(corpus, tmp_path / "b", **{**kw, "max_iters": 12}), log=quiet)
    train.main(["--init_from", "resume", "--out_dir", str(tmp_path / "b"), "--max_iters", "20"])
    lr_a = {p["iter"]: p["lr"] for p in logged(tmp_path / "a")}
    lr_b = {p["iter"]: p["lr"] for p in logged(tmp_path / "b")}
    assert list(lr_b) == [0, 5, 10, 12, 15, 20]
    assert lr_b[15] == lr_a[15] > 3e-4  # on the cosine of 20 iterations, not at min_lr
    assert lr_b[12] == 3e-4  # the first run's own end
    a, b = load(tmp_path / "a")["model"], load(tmp_path / "b")["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# failures


def test_a_failed_save_keeps_the_good_checkpoint_and_exits_3(corpus, tmp_path, monkeypatch,
                                                              capsys):
    """A checkpoint write that fails (a full disk) stops the run with one line naming the file
    and the cause, exit 3; ckpt.pt still holds the last whole save. A temporary file that a
    writer killed mid-write left behind is removed by the next run that holds the folder."""
    train.train(tiny(corpus, tmp_path, max_iters=10), log=quiet)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(SystemExit) as exit:
        train.main(["--init_from", "resume", "--out_dir", str(tmp_path), "--max_iters", "20",
                    "--always_save_checkpoint"])
    assert exit.value.code == 3
    line = error_line(capsys)
    assert f"cannot write {tmp_path / 'ckpt.pt'} (No space left on device)" in line
    assert "the previous version is kept" in line
    assert sorted(p.name for p in tmp_path.glob("ckpt*")) == ["ckpt.pt"]
    assert load(tmp_path)["iter_num"] == 10

    monkeypatch.undo()
    leftover = tmp_path / "ckpt.pt.tmp.99999.deadbeef"  # as a kill -9 mid-write leaves it
    leftover.write_bytes(b"garbage")
    h = train.train(tiny(corpus, tmp_path, max_iters=12, init_from="resume"), log=quiet)
    assert len(h["iter_losses"]) == 12 and load(tmp_path)["iter_num"] == 12
    assert not leftover.exists()


def test_a_full_disk_exits_3_with_one_line(corpus, tmp_path):
    """The real thing: a file size limit (as ulimit -f sets) that the first checkpoint exceeds."""
    config = tiny(corpus, tmp_path / "out", max_iters=4, eval_interval=2)
    limit = 64_000  # bytes: the data and the log fit, a checkpoint (about 400 KB) does not
    child = subprocess.run(
        [sys.executable, "train.py", *flags(config)], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert child.returncode == 3, child.stderr
    assert child.stderr.strip().splitlines() == [child.stderr.strip()]
    assert child.stderr.startswith(f"error: cannot write {tmp_path / 'out' / 'ckpt.pt'}")
    assert not list((tmp_path / "out").glob("ckpt*"))


def error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def corrupt(trained, tmp_path, how):
    out = tmp_path / how
    out.mkdir()
    data = (trained / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x80garbage",
                                   "empty": b""}[how])
    return str(out)


BAD = [  # (flags, what the error line must say)
    (["--n_layer", "4", "--n_dec_layer", "4"], "--n_dec_layer 4 must be"),
    (["--n_embd", "30", "--n_head", "4"], "--n_embd 30 must split"),
    (["--arch", "dec", "--objective", "span"], "encoder-decoder objective"),
    (["--arch", "encdec", "--objective", "span", "--block_size", "2"],  # was a ValueError
     "--objective span needs --block_size 3 or more"),
    (["--device", "banana"], "'banana' is not a device"),
    (["--data", "/nonexistent/corpus.txt"], "no such file"),
    (["--block_size", "100000"], "block_size 100000 needs windows"),
    (["--init_from", "resume", "--out_dir", "{folder}"], "no checkpoint at"),
    (["--init_from", "resume", "--out_dir", "{truncated}"], "not a readable checkpoint"),
    (["--init_from", "resume", "--out_dir", "{garbage}"],
     "ckpt.pt is not a readable checkpoint: torch.load cannot read its 8 bytes, so it was cut "
     "short or not written by train.py; delete it, or use another --out_dir"),
    (["--init_from", "resume", "--out_dir", "{empty}"],
     "ckpt.pt is not a readable checkpoint: it is empty, so it was cut short"),
    (["--init_from", "resume", "--out_dir", "{dirckpt}"], "ckpt.pt is a folder, not a "
     "checkpoint file; remove it, or point --out_dir at a run's folder"),
    (["--init_from", "resume", "--out_dir", "{list}"], "ckpt.pt holds a list, not a train.py "
     "checkpoint"),
    (["--init_from", "resume", "--out_dir", "{trained}", "--arch", "dec"], "holds a bdd model"),
    (["--init_from", "resume", "--out_dir", "{trained}", "--n_embd", "64"],
     "n_embd 32 (this run: 64)"),
    (["--init_from", "resume", "--out_dir", "{trained}", "--decoder_init", "bottom",
      "--max_iters", "4"],
     "ckpt.pt was not converted from a dec run; a resumed run keeps its weights: drop "
     "--decoder_init"),
    (["--init_from", "resume", "--out_dir", "{trained}", "--max_iters", "3"],
     "ckpt.pt is at iteration 4, past --max_iters 3; resume with --max_iters 4 or more"),
    # a fresh run into a folder holding another run
    (["--out_dir", "{trained}"], "ckpt.pt already holds a run: continue it with --init_from "
     "resume, train into another --out_dir, or replace it with --overwrite"),
    # folders that cannot be written
    (["--out_dir", "{file}"], "afile is a file, not a folder; choose another --out_dir"),
    (["--out_dir", "{file}/run"], "afile is a file, not a folder; choose another --out_dir"),
    (["--data_root", "{file}"], "afile is a file, not a folder; choose another --data_root"),
    # empty paths would mean the current folder
    (["--data", ""], "--data is empty; give a path, or leave --data out for its default"),
    (["--out_dir", ""], "--out_dir is empty"),
    (["--data_root", ""], "--data_root is empty"),
    # numbers out of their range (RANGES)
    (["--min_lr", "-0.01"], "--min_lr -0.01 is out of range: it must be at least 0"),
    (["--grad_clip", "-1"], "--grad_clip -1.0 is out of range: it must be at least 0"),
    (["--weight_decay", "-1"], "--weight_decay -1.0 is out of range"),
    (["--learning_rate", "-1"], "--learning_rate -1.0 is out of range: it must be above 0"),
    (["--learning_rate", "nan"], "--learning_rate nan is out of range: it must be above 0"),
    (["--learning_rate", "inf"], "--learning_rate inf is out of range: it must be above 0 and "
     "finite"),  # "above 0" alone did not say what was wrong with inf
    (["--beta1", "2"], "--beta1 2.0 is out of range: it must be at least 0 and below 1"),
    (["--dropout", "1.5"], "--dropout 1.5 is out of range: it must be at least 0 and below 1"),
    (["--dropout", "nan"], "--dropout nan is out of range"),
    # a finite exclusive bound is refused at its edge (dropout 1 drops everything, beta 1 never
    # forgets)
    (["--dropout", "1"], "--dropout 1.0 is out of range: it must be at least 0 and below 1"),
    (["--beta1", "1"], "--beta1 1.0 is out of range: it must be at least 0 and below 1"),
    (["--beta2", "1"], "--beta2 1.0 is out of range: it must be at least 0 and below 1"),
    (["--threads", "0"], "--threads 0 is out of range: it must be at least 1 and at most 1024"),
    (["--lr_decay_iters", "-5"], "--lr_decay_iters -5 is out of range"),
    (["--max_iters", "-1"], "--max_iters -1 is out of range"),
    (["--n_head", "0"], "--n_head 0 is out of range: it must be at least 1"),
    (["--seed", "-1"], "--seed -1 is out of range: it must be at least 0 and at most 1e+18"),
    # fields that must agree with each other (AGREE)
    (["--min_lr", "0.01"], "--min_lr 0.01 is above --learning_rate 0.003: the schedule would "
     "rise; lower --min_lr"),
    (["--warmup_iters", "5"], "--warmup_iters 5 is longer than the run (--max_iters 2)"),
    (["--max_iters", "10", "--warmup_iters", "5", "--lr_decay_iters", "3"], "--lr_decay_iters 3 "
     "ends the decay before the warmup ends (--warmup_iters 5)"),
]


def placeholder(arg, trained, tmp_path):
    """The path a {name} in BAD stands for."""
    if arg == "{folder}":
        return str(tmp_path)
    if arg == "{trained}":
        return str(trained)
    if arg.startswith("{file}"):
        (tmp_path / "afile").write_text("not a folder")
        return arg.replace("{file}", str(tmp_path / "afile"))
    if arg in ("{truncated}", "{garbage}", "{empty}"):
        return corrupt(trained, tmp_path, arg.strip("{}"))
    if arg == "{dirckpt}":
        (tmp_path / "dirckpt" / "ckpt.pt").mkdir(parents=True)
        return str(tmp_path / "dirckpt")
    if arg == "{list}":
        (tmp_path / "list").mkdir()
        torch.save([1, 2], tmp_path / "list" / "ckpt.pt")
        return str(tmp_path / "list")
    return arg


def test_zero_iterations_with_the_default_warmup_are_accepted():
    """--max_iters 0 evaluates the fresh model: its warmup never starts, so it cannot be too long
    (it was refused with "--lr_decay_iters None ends the decay before the warmup ends")."""
    assert cfg.TrainConfig(max_iters=0).warmup_iters == cfg.TrainConfig.warmup_iters > 0


SHORT = ["--n_layer", "2", "--n_dec_layer", "1", "--n_head", "2", "--n_embd", "32",
         "--block_size", "32", "--batch_size", "4", "--eval_iters", "1"]


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_a_short_run_fits_the_defaults_it_did_not_set_and_says_so(corpus, tmp_path, capsys,
                                                                    steps):
    """`train.py --max_iters 20` with the preset's warmup of 30 was refused ("--warmup_iters 30
    is longer than the run"); the defaults the user did not set now follow the run's length, and
    the run's first line says which."""
    out = tmp_path / "out"
    train.main(["--data", str(corpus / "tiny.txt"), "--data_root", str(corpus / "data"),
                "--out_dir", str(out), "--max_iters", str(steps), *SHORT])
    lines = capsys.readouterr().out.splitlines()
    first = next(line for line in lines if not line.startswith("tokeniz"))
    assert first.startswith(f"defaults fitted to this run of {steps} steps") and \
        "warmup_iters" in first, first
    config = load(out)["train_config"]
    assert load(out)["iter_num"] == steps and config["warmup_iters"] <= steps
    assert config["eval_interval"] <= steps and config["log_interval"] <= steps


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_defaults_follow_the_length_and_what_the_user_sets_is_kept(preset):
    full = cfg.make_config(preset=preset, device="cpu")
    assert full.adapted is None  # the preset's own length: its values as they are
    longer = cfg.make_config(preset=preset, device="cpu", max_iters=5 * full.max_iters)
    assert (longer.warmup_iters, longer.eval_interval) == (full.warmup_iters, full.eval_interval)
    short = cfg.make_config(preset=preset, device="cpu", max_iters=4)
    assert (short.warmup_iters, short.eval_interval, short.log_interval) == (0, 1, 1)
    assert cfg.make_config(preset=preset, device="cpu", max_iters=4,
                           eval_interval=3).eval_interval == 3
    decays = cfg.make_config(preset=preset, device="cpu", lr_decay_iters=full.warmup_iters // 2)
    assert decays.warmup_iters <= decays.lr_decay_iters
    with pytest.raises(cfg.ConfigError, match="--warmup_iters 5 is longer than the run"):
        cfg.make_config(preset=preset, device="cpu", max_iters=4, warmup_iters=5)


def test_a_resumed_run_keeps_the_schedule_it_started_with(corpus, tmp_path):
    """A short run's fitted warmup is part of its schedule: resumed for longer, it keeps it."""
    base = dict(data=str(corpus / "tiny.txt"), data_root=str(corpus / "data"),
                out_dir=str(tmp_path / "r"), n_layer=2, n_head=2, n_embd=32, block_size=32,
                batch_size=4, eval_iters=1)
    train.train(cfg.make_config(**base, max_iters=20), log=quiet)
    resumed = cfg.make_config(init_from="resume", out_dir=base["out_dir"], max_iters=300)
    assert resumed.warmup_iters == 2 and resumed.adapted is None


def test_every_numeric_field_has_a_range():
    numeric = {f.name for f in fields(cfg.TrainConfig) if f.type in (int, float)}
    assert numeric == {f.name for f in fields(cfg.TrainConfig)
                       if isinstance(f.metadata["allowed"], str)}


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_exits_2_with_one_line(corpus, trained, tmp_path, capsys, argv, message):
    base = flags(tiny(corpus, tmp_path / "out", max_iters=2))  # later flags win in argparse
    with pytest.raises(SystemExit) as exit:
        train.main(base + [placeholder(a, trained, tmp_path) for a in argv])
    assert exit.value.code == 2
    assert message in error_line(capsys)


def test_folders_are_checked_before_the_data_is_prepared(corpus, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    config = tiny(corpus, tmp_path / "afile", data_root=str(tmp_path / "fresh_data"))
    with pytest.raises(SystemExit) as exit:
        train.main(flags(config))
    assert exit.value.code == 2 and "afile is a file, not a folder" in error_line(capsys)
    assert not (tmp_path / "fresh_data").exists()


@pytest.mark.parametrize("flag", ["out_dir", "data_root"])
def test_unwritable_folder_exits_2(corpus, tmp_path, capsys, monkeypatch, flag):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root may write anyway; os.access answers as for another user
        monkeypatch.setattr(train.os, "access", lambda path, mode: Path(path) != locked)
    config = tiny(corpus, tmp_path / "out")
    setattr(config, flag, str(locked / "sub"))
    with pytest.raises(SystemExit) as exit:
        train.main(flags(config))
    assert exit.value.code == 2 and f"is not writable; choose another --{flag}" in error_line(capsys)


def interrupt_at_the_first_step(monkeypatch):
    def ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train_step", ctrl_c)


def test_overwrite_removes_the_old_run_before_the_new_one_logs(corpus, trained, tmp_path,
                                                                monkeypatch, capsys):
    """--overwrite: stopped before its first save, the new run leaves its own log and no
    checkpoint, never its log beside the old run's checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    interrupt_at_the_first_step(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        train.main(flags(tiny(corpus, out, arch="dec", max_iters=4, overwrite=True)))
    assert exit.value.code == 130
    assert error_line(capsys) == (f"error: interrupted (Ctrl-C); there is no readable checkpoint "
                                  f"at {out / 'ckpt.pt'}, so nothing to resume")
    assert not (out / "ckpt.pt").exists()
    assert [p["iter"] for p in logged(out)] == [0]  # the new run's first evaluation


def test_interrupt_names_the_checkpoint_it_keeps(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    interrupt_at_the_first_step(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        train.main(["--init_from", "resume", "--out_dir", str(out), "--max_iters", "8"])
    assert exit.value.code == 130
    assert error_line(capsys) == (f"error: interrupted (Ctrl-C); {out / 'ckpt.pt'} (iteration 4) "
                                  f"is kept: continue with --init_from resume")
    assert [p["iter"] for p in logged(out)] == [0, 4]


def test_real_sigint_before_any_checkpoint(corpus, tmp_path):
    """A real SIGINT, sent once the child has logged its first step: no checkpoint can exist
    yet (the first evaluation after iteration 0 is at 100000), and the line says so."""
    config = tiny(corpus, tmp_path, max_iters=100000, eval_interval=100000, log_interval=1)
    child = subprocess.Popen([sys.executable, "-u", "train.py", *flags(config)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"},
                             preexec_fn=default_sigint)
    try:
        for line in child.stdout:
            if line.startswith("iter 1/"):
                child.send_signal(signal.SIGINT)
                break
        err = child.communicate(timeout=60)[1]
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert err.splitlines() == [f"error: interrupted (Ctrl-C); there is no readable checkpoint "
                                f"at {tmp_path / 'ckpt.pt'}, so nothing to resume"]


def test_a_second_run_into_a_held_folder_is_refused(corpus, tmp_path, capsys):
    """Two runs into one --out_dir would interleave one log and keep one checkpoint: while a
    run holds the folder, another is refused before it writes anything."""
    with files.holding(tmp_path):
        with pytest.raises(SystemExit) as exit:
            train.main(flags(tiny(corpus, tmp_path, max_iters=2)))
    assert exit.value.code == 2 and "is in use by another run" in error_line(capsys)
    assert not (tmp_path / "log.jsonl").exists()


def test_threads_sets_torchs_thread_count_and_the_start_line_shows_it(corpus, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    lines = []
    try:
        train.train(tiny(corpus, tmp_path, max_iters=2, log_interval=1, threads=1),
                    log=lines.append)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    first_progress = next(i for i, line in enumerate(lines) if line.startswith("iter "))
    assert any(line.endswith("1 process(es) on cpu, 1 thread(s) (--threads)")
               for line in lines[:first_progress])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_run_shows_no_library_warnings(corpus, tmp_path, dtype):
    """The user's screen shows the run's own lines, no warning of torch, numpy or Python."""
    with user_visible_warnings() as caught:
        train.train(tiny(corpus, tmp_path, max_iters=2, dtype=dtype), log=quiet)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_cuda_without_gpu_exits_2(corpus, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit:
        train.main(["--device", "cuda", "--out_dir", str(tmp_path)])
    assert exit.value.code == 2 and "no CUDA GPU" in error_line(capsys)


def test_cli_error_has_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--n_layer", "3", "--n_dec_layer", "3",
                          "--out_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    """The 13th training forward (iteration 12) returns nan; evaluation forwards do not count."""
    head, calls = M.LM.head, []

    def poisoned(self, x, targets):
        logits, loss = head(self, x, targets)
        if self.training:
            calls.append(1)
            if len(calls) == 13:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(M.LM, "head", poisoned)
    config = tiny(corpus, tmp_path, eval_interval=5, always_save_checkpoint=True)
    with pytest.raises(SystemExit) as exit:
        train.main(flags(config))
    assert exit.value.code == 1
    line = error_line(capsys)
    assert "nan at iter 12" in line and "(iter 10) is kept" in line
    ckpt = load(tmp_path)
    assert ckpt["iter_num"] == 10
    assert all(v.isfinite().all() for v in ckpt["model"].values())


# -----------------------------------------------------------------------------
# DDP


# train.py's main under torchrun, then the names of the threads still running in each rank, a
# line each, written at once (the ranks share stderr)
LAUNCH = """
import os, sys
sys.path.insert(0, os.getcwd())
import train
train.main(sys.argv[1:])
tasks = "/proc/self/task"
if os.path.isdir(tasks):
    names = sorted(open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks))
    os.write(2, f"threads left: {names}\\n".encode())
"""


def test_ddp_two_cpu_processes_stay_in_sync(corpus, tmp_path):
    """torchrun with 2 gloo processes and 2 accumulation micro-steps (no_sync on the first).
    Once train() returns, no thread of the process group is left in either rank: one still
    running when the interpreter exits aborts it now and then ("terminate called without an
    active exception")."""
    out = tmp_path / "out"
    config = tiny(corpus, out, max_iters=6, gradient_accumulation_steps=2, eval_interval=3)
    (tmp_path / "launch.py").write_text(LAUNCH)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(tmp_path / "launch.py"), *flags(config)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    left = re.findall(r"threads left: (\[.*?\])", run.stderr)
    assert len(left) == (2 if Path("/proc/self/task").is_dir() else 0), run.stderr[-3000:]
    assert not [names for names in left if "gloo" in names], left
    h = load(out)["history"]
    ddp = h["ddp"]
    assert ddp["world_size"] == 2
    assert ddp["param_checksums"][0] == ddp["param_checksums"][1]  # the same weights
    assert ddp["last_losses"][0] != ddp["last_losses"][1]  # from different batches
    assert h["train_tokens"] == 6 * 8 * 32 * 2 * 2
    ckpt = load(out)
    model = build_model("bdd", ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert train.param_checksum(model).item() == ddp["param_checksums"][0]


@pytest.mark.parametrize("idle, threads", [(1.0, 1), (1.9, 2), (0.2, 1)])
def test_a_run_computes_with_one_thread_per_idle_core_and_resumes_with_its_own(
        corpus, tmp_path, monkeypatch, idle, threads):
    """With one of two cores kept busy by another program, torch's two threads trained 21x
    slower than one (docs/RESULTS.md); a run now takes one thread per idle core, and a resumed
    run the count it started with, so that it still ends bit for bit as one never stopped."""
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(train, "TORCH_THREADS", 2)
    monkeypatch.setattr(train, "idle_cores", lambda: idle)
    out = tmp_path / "run"
    history = train.train(tiny(corpus, out, max_iters=2, threads=None), log=quiet)
    assert history["threads"] == threads == torch.get_num_threads()
    monkeypatch.setattr(train, "idle_cores", lambda: 2.0 if threads == 1 else 0.0)
    train.main(["--init_from", "resume", "--out_dir", str(out), "--max_iters", "3"])
    assert load(out)["history"]["threads"] == threads == torch.get_num_threads()
    torch.set_num_threads(1)


@pytest.mark.parametrize("given", [None, 2])
def test_a_run_whose_steps_slow_down_drops_to_one_thread_unless_told(corpus, tmp_path,
                                                                     monkeypatch, given):
    """A core taken by another program after the run started: its chosen threads drop to one
    (the log says so); a count the user gave is kept."""
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(train, "TORCH_THREADS", 2)
    monkeypatch.setattr(train, "idle_cores", lambda: 2.0)
    step, lines = train.train_step, []

    def slowed_from_the_sixth(*args, **kw):
        if len(lines) and sum("iter " in line for line in lines) >= 5:
            time.sleep(0.5)  # the other program's share of the core
        return step(*args, **kw)

    monkeypatch.setattr(train, "train_step", slowed_from_the_sixth)
    config = tiny(corpus, tmp_path / "run", max_iters=9, log_interval=1, eval_interval=100,
                  threads=given)
    history = train.train(config, log=lines.append)
    dropped = [line for line in lines if line.startswith("threads 2 -> 1")]
    assert (history["threads"], len(dropped)) == ((1, 1) if given is None else (2, 0)), lines
    torch.set_num_threads(1)


def test_idle_cores_counts_the_cores_this_process_may_use():
    idle = train.idle_cores(0.05)
    assert idle is None or 0 <= idle <= len(os.sched_getaffinity(0)) + 1e-9


EXPERIMENTS = {  # an experiment's command and how it plans its runs
    "frontier": (["--lr", "dec=1e-3,encdec=1e-3,bdd=1e-3"],
                 lambda m, a: m.plan(*a, *m.ex.learning_rates(a[0].lr, a[0].lr_file))),
    "ablation": ([], lambda m, a: m.plan(*a)),
    "probe": (["--mqar"], lambda m, a: m.plan(*a)[1]),
    "sweep": (["--preset", "gpu", "--device", "cpu"], lambda m, a: m.plan(*a)),
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_fits_its_recipe_to_a_short_run(name, tmp_path):
    """The experiments' recipes (a warmup of 12 to 100 steps) were refused with --max_iters 5,
    which the user set, for a warmup the user did not set."""
    import importlib
    module = importlib.import_module(f"lab.{name}")
    argv, plan = EXPERIMENTS[name]
    runs = plan(module, module.parse([*argv, "--max_iters", "5", "--out_dir", str(tmp_path)]))
    assert runs and all(r.config.max_iters == 5 and r.config.warmup_iters <= 5 and
                        r.config.eval_interval <= 5 for r in runs if "ft_" not in r.name)

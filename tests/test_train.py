"""train.py: every arch learns, a resumed run equals an uninterrupted one, a crash while saving
keeps the good checkpoint, bad input exits 2 with one line, a diverging loss exits 1, and DDP keeps
two ranks in sync. Tiny models on a tiny corpus written here."""

import os
import random
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import model as M
import train
from model import ModelConfig, build_model

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the king queen lord lady speaks and to of my thy good night sweet love death is "
         "not with what shall come here now").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 15 KB of word salad from a small vocabulary: easy to learn fast."""
    folder = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "."
             for _ in range(400)]
    (folder / "tiny.txt").write_text("\n".join(lines) + "\n")
    return folder


def tiny(corpus, out_dir, **kw):
    cfg = dict(data=str(corpus / "tiny.txt"), data_root=str(corpus / "data"), out_dir=str(out_dir),
               n_layer=2, n_dec_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8,
               max_iters=30, learning_rate=3e-3, min_lr=3e-4, warmup_iters=5, eval_interval=10,
               eval_iters=2, log_interval=10, seed=0)
    return train.TrainConfig(**{**cfg, **kw})


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
    assert h["val_loss"] == curve[-1]["cont_loss"]
    assert h["train_tokens"] == 30 * 8 * 32 == curve[-1]["tokens"]
    assert len(h["iter_losses"]) == 30 and h["train_tokens_per_sec"] > 0
    assert h["wall_time"] >= h["train_time"] > 0
    supervised = {"dec": 1.0, "bdd": 1.0}.get(arch, 0.5 if objective == "prefix_lm" else 0.15)
    assert h["supervised_fraction"] == pytest.approx(supervised, abs=0.1)
    assert (h["padding_fraction"] > 0) == (objective == "prefix_lm" and arch == "encdec")
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 4

    ckpt = load(tmp_path)  # the contract sample.py reads
    assert set(ckpt) == set(train.CHECKPOINT_KEYS)
    assert ckpt["arch"] == arch and ckpt["objective"] == objective and ckpt["iter_num"] == 30
    assert ckpt["train_config"] == h["config"] and ckpt["history"]["curve"] == curve
    model = build_model(arch, ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert model.num_params() == h["non_embedding_params"]


def test_lr_schedule():
    config = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=100)
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

    config = train.TrainConfig(gradient_accumulation_steps=3, grad_clip=0.0)
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
    config = train.make_config(init_from="resume", out_dir=str(trained), max_iters=8)
    saved = load(trained)["train_config"]
    assert (config.n_embd, config.block_size, config.data) == (32, 32, saved["data"])
    assert config.max_iters == 8 and config.lr_decay_iters == saved["lr_decay_iters"] == 4


# -----------------------------------------------------------------------------
# failures


def test_interrupted_save_keeps_the_good_checkpoint(corpus, tmp_path, monkeypatch):
    train.train(tiny(corpus, tmp_path, max_iters=10), log=quiet)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        train.train(tiny(corpus, tmp_path, max_iters=20, init_from="resume",
                         always_save_checkpoint=True), log=quiet)
    assert list(tmp_path.glob("ckpt*")) == [tmp_path / "ckpt.pt"]
    assert load(tmp_path)["iter_num"] == 10

    # a kill -9 mid-write leaves the temporary file behind: it is never read, only overwritten
    monkeypatch.undo()
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"garbage")
    h = train.train(tiny(corpus, tmp_path, max_iters=12, init_from="resume"), log=quiet)
    assert len(h["iter_losses"]) == 12 and load(tmp_path)["iter_num"] == 12


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
    (out / "ckpt.pt").write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x80garbage")
    return str(out)


BAD = [  # (flags, what the error line must say)
    (["--n_layer", "4", "--n_dec_layer", "4"], "--n_dec_layer 4 must be"),
    (["--n_embd", "30", "--n_head", "4"], "--n_embd 30 must split"),
    (["--arch", "dec", "--objective", "span"], "encoder-decoder objective"),
    (["--device", "banana"], "'banana' is not a device"),
    (["--data", "/nonexistent/corpus.txt"], "no such file"),
    (["--block_size", "100000"], "block_size 100000 needs windows"),
    (["--init_from", "resume", "--out_dir", "{empty}"], "no checkpoint at"),
    (["--init_from", "resume", "--out_dir", "{truncated}"], "not a readable checkpoint"),
    (["--init_from", "resume", "--out_dir", "{garbage}"], "not a readable checkpoint"),
    (["--init_from", "resume", "--out_dir", "{trained}", "--arch", "dec"], "holds a bdd model"),
    (["--init_from", "resume", "--out_dir", "{trained}", "--n_embd", "64"],
     "n_embd 32 (this run: 64)"),
]


def placeholder(arg, trained, tmp_path):
    """The folder a {name} in BAD stands for."""
    if arg == "{empty}":
        return str(tmp_path)
    if arg == "{trained}":
        return str(trained)
    if arg in ("{truncated}", "{garbage}"):
        return corrupt(trained, tmp_path, arg.strip("{}"))
    return arg


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_exits_2_with_one_line(corpus, trained, tmp_path, capsys, argv, message):
    base = flags(tiny(corpus, tmp_path / "out", max_iters=2))  # later flags win in argparse
    with pytest.raises(SystemExit) as exit:
        train.main(base + [placeholder(a, trained, tmp_path) for a in argv])
    assert exit.value.code == 2
    assert message in error_line(capsys)


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


def test_ddp_two_cpu_processes_stay_in_sync(corpus, tmp_path):
    """torchrun with 2 gloo processes and 2 accumulation micro-steps (no_sync on the first)."""
    config = tiny(corpus, tmp_path, max_iters=6, gradient_accumulation_steps=2, eval_interval=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "train.py", *flags(config)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    h = load(tmp_path)["history"]
    ddp = h["ddp"]
    assert ddp["world_size"] == 2
    assert ddp["param_checksums"][0] == ddp["param_checksums"][1]  # the same weights
    assert ddp["last_losses"][0] != ddp["last_losses"][1]  # from different batches
    assert h["train_tokens"] == 6 * 8 * 32 * 2 * 2
    ckpt = load(tmp_path)
    model = build_model("bdd", ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert train.param_checksum(model).item() == ddp["param_checksums"][0]

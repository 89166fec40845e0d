"""
Files on disk that stay whole, and folders that one run holds at a time.

- written_whole(path): write to a temporary name beside `path` (unique to this writer), flush
  it to the disk, rename it over path, then flush the folder, so a crash, a kill, a full disk or
  a power cut leaves the old file whole or no file, and a finished write stays written;
- holding(folder): a lock on a run's folder for as long as the run lives. The lock is an
  flock on `<folder>/.lock`, which the kernel releases when the process ends however it ends,
  so a lock left by a killed run is never mistaken for a live one;
- leftovers(folder): the temporary files that a killed writer left there, for the next holder
  to remove;
- cut_log(path, iteration): a JSON-lines log cut back to the records up to an iteration.

It imports nothing of the project except cli.py (the error types).
"""

import errno
import fcntl
import json
import math
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

import cli

TMP = ".tmp."  # the mark of a temporary name: <name>.tmp.<pid>.<random>


@contextmanager
def written_whole(path):
    """Yield a temporary name beside `path` to write to (close what you open on it inside the
    block); once the block ends it is renamed over path (os.replace is atomic), and if the block
    fails it is removed: path is then untouched, whole as before, or absent as before. An OSError
    while writing (a full disk) becomes cli.CannotWrite, naming the folder and the cause.

    The bytes reach the disk before the rename (else a power cut could leave path renamed but
    empty or short: the kernel may write the new name before the data), and the folder after it
    (else the rename itself may be lost, and the old file come back)."""
    tmp = f"{path}{TMP}{os.getpid()}.{secrets.token_hex(4)}"
    try:
        yield tmp
        flush_to_disk(tmp)
        os.replace(tmp, path)
        flush_to_disk(Path(path).absolute().parent)
    except OSError as e:
        kept = "the previous version is kept" if Path(path).exists() else "nothing was written"
        raise cli.CannotWrite(f"cannot write {path} ({e.strerror or e}); {kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def flush_to_disk(path):
    """Wait until the kernel has written a file's bytes, or a folder's names, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def leftovers(folder):
    """Temporary files a killed writer left in folder (never the file of a live writer, as long
    as the caller holds the folder)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if TMP in p.name) if folder.is_dir() else []


@contextmanager
def holding(folder, what="run"):
    """Hold `folder` (created if need be) for the block: a second process that asks for it
    meanwhile gets cli.BadInput naming the holder. Leftover temporary files are removed on
    entry: nobody else can be writing them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise cli.BadInput(f"{folder} is in use by another {what} (process {holder}); wait "
                               f"for it to end, or choose another --out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        for tmp in leftovers(folder):
            tmp.unlink(missing_ok=True)
        yield folder
    finally:
        os.close(fd)  # releases the flock


def cut_log(path, iteration):
    """Keep the lines of the JSON-lines log at path whose "iter" is at most iteration (none for
    -1; a line that is not a whole record goes too), written whole."""
    def logged_iter(line):
        try:
            return json.loads(line)["iter"]
        except (ValueError, KeyError, TypeError):
            return math.inf
    path = Path(path)
    kept = [line for line in path.read_text().splitlines() if logged_iter(line) <= iteration] \
        if path.exists() else []
    with written_whole(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in kept))

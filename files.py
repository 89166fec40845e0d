"""
Files on disk that stay whole, and folders that one run holds at a time.

- written_whole(path): write to a temporary name beside `path` (unique to this writer), flush
  it to the disk, rename it over path, then flush the folder, so a crash, a kill, a full disk or
  a power cut leaves the old file whole or no file, and a finished write stays written;
- usable_folder(path, flag): whether a folder given by a flag can be written (or created), in
  one line naming the flag: every entry point asks it before it starts;
- holding(folder): a lock on a run's folder for as long as the run lives. The lock is an
  flock on `<folder>/.lock`, which the kernel releases when the process ends however it ends,
  so a lock left by a killed run is never mistaken for a live one; waiting_for(folder): such a
  lock that a second process waits for (two preparations of data in one folder);
- leftovers(folder): the temporary files that a killed writer left there, for the next holder
  to remove;
- read_json(path, shape): a JSON file the project wrote, checked by shape and type as it is read,
  one line naming the file and the field when it does not fit (a hand edit, a damaged file);
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


def usable_folder(path, flag):
    """cli.BadInput, one line naming --flag, unless path can be a folder this process writes:
    given, a name the file system takes, no file where a folder must be, and writable as far as
    os.access can tell (what it cannot tell, such as a mount that refuses even root, holding()
    finds when it creates the folder)."""
    path = str(path)
    too_long = path and name_too_long(path)
    existing = Path(path).absolute() if path and not too_long else None
    while existing and not existing.exists():  # the nearest existing folder: where it is made
        existing = existing.parent
    cli.refuse([(not path, f"--{flag} is empty; give a folder, or leave --{flag} out for its "
                           f"default"),
                (too_long, f"--{flag} {cli.shown(path)}: {too_long}; give a shorter path"),
                (existing and not existing.is_dir(), f"--{flag} {path}: {existing} is a file, "
                                                     f"not a folder; choose another --{flag}"),
                (existing and not os.access(existing, os.W_OK | os.X_OK),
                 f"--{flag} {path}: {existing} is not writable; choose another --{flag}")])


def name_too_long(path):
    """Why the file system cannot take path as a name (a name in it, or the whole, over its
    limits), or None."""
    try:
        name_max, path_max = os.pathconf("/", "PC_NAME_MAX"), os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf here: POSIX's usual limits
        name_max, path_max = 255, 4096
    longest = max((len(os.fsencode(part)) for part in Path(path).parts), default=0)
    whole = len(os.fsencode(os.path.abspath(path)))
    if longest > name_max:
        return f"a name in it is {longest} bytes long, over the {name_max} a file system takes"
    return f"it is {whole} bytes long, over the {path_max} a path may be" \
        if whole >= path_max else None


@contextmanager
def holding(folder, what="run", flag="out_dir"):
    """Hold `folder` (created if need be) for the block: a second process that asks for it
    meanwhile gets cli.BadInput naming the holder; a folder that cannot be created or written
    (a read-only mount), cli.CannotWrite. Leftover temporary files are removed on entry: nobody
    else can be writing them."""
    folder = Path(folder)
    fd = opened(folder, flag, ".lock")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise cli.BadInput(f"{folder} is in use by another {what} (process {holder}); wait "
                               f"for it to end, or choose another --{flag}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        for tmp in leftovers(folder):
            tmp.unlink(missing_ok=True)
        yield folder
    finally:
        os.close(fd)  # releases the flock


def opened(folder, flag, name=None):
    """A file descriptor of folder/name, or of folder itself (name None), the folder created if
    need be; cli.CannotWrite if it cannot be (a read-only mount), naming --flag."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644) if name else \
            os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise cli.CannotWrite(f"cannot write into {cli.shown(folder)} ({e.strerror}); make it "
                              f"writable, or choose another --{flag}") from None


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


@contextmanager
def waiting_for(folder, waiting, flag):
    """An flock on folder itself (created if need be, nothing written in it) for the block; a
    process that finds it taken prints `waiting` and waits, so that two processes doing the same
    work there (preparing one dataset) do it one after the other, and the second finds it done."""
    folder = Path(folder)
    fd = opened(folder, flag)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------------------------
# JSON the project wrote, read back


JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
              bool: "boolean", type(None): "null"}


def read_json(path, shape, advice):
    """The JSON document at path, checked against shape as it is read; cli.BadInput, one line
    naming the file and the first field that does not fit, and what to do (advice). A shape is
    a type (dict, list, str, bool, object: anything; int: a whole number; float: any number; no
    boolean passes for a number), None (null), a tuple (any of them), a list [item shape] or a
    dict {key: shape} (the keys it must have; a key ending in "?" may be missing; the key str:
    every value of an object of any keys)."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise cli.BadInput(f"{cli.shown(path)} cannot be read ({e.strerror}); {advice}") from None
    except (ValueError, RecursionError) as e:
        raise cli.BadInput(f"{path} is not JSON ({json_error(e)}); {advice}") from None
    problem = misfit(doc, shape, "")
    if problem:
        raise cli.BadInput(f"{path}: {problem}; {advice}")
    return doc


def json_error(e):
    """Why json.loads failed, in a few words: the first clause of its message (a number of
    thousands of digits raises a ValueError of its own), or the nesting it could not follow."""
    if isinstance(e, RecursionError):
        return "brackets nested too deeply to read"
    return getattr(e, "msg", None) or str(e).split(":")[0]


def misfit(value, shape, where):
    """What about value (at the field `where`; "" for the document) does not fit shape
    (read_json), or None."""
    if isinstance(shape, tuple):
        problems = [misfit(value, s, where) for s in shape]
        return None if None in problems else problems[0]
    if shape is None or isinstance(shape, type):
        return None if fits_type(value, shape) else \
            f"{named(where)} is a JSON {json_type(value)}, not {type_name(shape)}"
    kind = list if isinstance(shape, list) else dict
    if not isinstance(value, kind):
        return f"{named(where)} is a JSON {json_type(value)}, not {type_name(kind)}"
    if kind is list:
        return next(filter(None, (misfit(v, shape[0], f"{where or 'the document'}[{i}]")
                                  for i, v in enumerate(value))), None)
    for key, sub in shape.items():
        items = value.items() if key is str else \
            [(key.rstrip("?"), value[key.rstrip("?")])] if key.rstrip("?") in value else []
        if not items and not (key is str or key.endswith("?")):
            return f"{named(where)} has no field {key.rstrip('?')!r}"
        problem = next(filter(None, (misfit(v, sub, f'{where}["{k}"]' if where else str(k))
                                     for k, v in items)), None)
        if problem:
            return problem
    return None


def fits_type(value, shape):
    if shape is None:
        return value is None
    if shape in (int, float):
        return not isinstance(value, bool) and isinstance(value, (int, float) if shape is float
                                                          else int)
    return shape is object or isinstance(value, shape)


def json_type(value):
    """The JSON name of a parsed value's type: object, array, string, number, boolean, null."""
    return JSON_TYPES.get(type(value), "value")


def type_name(shape):
    return {None: "null", int: "a whole number", float: "a number", str: "a string",
            bool: "a boolean", dict: "an object", list: "an array"}.get(shape, "a value")


def named(where):
    return f"the field {where}" if where else "the document"

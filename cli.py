"""
The promises every nanoBDD script keeps to its user when something goes wrong: one line on
stderr, `error: <what is wrong and how to fix it>`, and an exit code that says which kind:

    2    bad input: a flag, a file, a folder, a checkpoint (argparse's own errors too: its
         usage block becomes a pointer to --help)
    1    training diverged (the loss became nan or inf)
    3    a file could not be written (a full disk, a lost permission); what was whole stays whole
    130  interrupted (Ctrl-C)

The library raises a Stop (BadInput, or a subclass with its own code); an entry point runs its
work under `guard`, which turns a Stop into its line and code. It also catches the two things
that are never a bug: a path too long for the file system wherever it is first used (bad
input, 2), and a reader that stopped reading (`python mask.py | head`: quiet, like any Unix
tool). Nothing else is caught: any other exception is a bug, and its traceback is what a bug
report needs.

It is the bottom row of the imports: it imports nothing of the project.
"""

import argparse
import errno
import os
import sys
from contextlib import contextmanager


class Stop(Exception):
    """A reason to stop that the user can act on; its message says what to do."""
    code = 2


class BadInput(Stop, ValueError):
    """A bad flag, file, folder or checkpoint."""


class CannotWrite(Stop):
    """A file could not be written (disk full, permissions); the previous version is whole."""
    code = 3


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: ... (see <prog> --help)`, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def refuse(problems, error=BadInput):
    """Checks written as a table: raise error(message) for the first (bad, message) pair whose
    bad is true (a message that is a Stop already is raised as it is)."""
    for bad, message in problems:
        if bad:
            raise message if isinstance(message, Stop) else error(message)


def fail(message, code=2):
    """Print `error: message` on stderr and exit (2: bad input)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextmanager
def guard(interrupted="interrupted (Ctrl-C)"):
    """Run an entry point's work: a Stop exits with its line and code, Ctrl-C with 130 and the
    line `interrupted` (a string, or a function that returns one, asked only then), a name too
    long with 2, and a closed stdout quietly with 141 (as SIGPIPE ends a Unix tool)."""
    try:
        yield
        sys.stdout.flush()  # here, where a reader that stopped reading is caught
    except Stop as e:
        fail(str(e), e.code)
    except KeyboardInterrupt:
        fail(interrupted() if callable(interrupted) else interrupted, code=130)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        sys.exit(141)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        fail(f"{shown(e.filename)}: a name too long for the file system "
             f"({len(os.fsencode(str(e.filename)))} bytes); give a shorter path")


def shown(path, keep=60):
    """A path as an error line shows it: a long one cut in the middle."""
    path = str(path)
    return path if len(path) <= keep else f"{path[:keep // 2]}...{path[-keep // 2:]}"

"""
The promises every nanoBDD script keeps to its user when something goes wrong: one line on
stderr, `error: <what is wrong and how to fix it>`, and an exit code that says which kind:

    2    bad input: a flag, a file, a folder, a checkpoint (argparse's own errors too: its
         usage block becomes a pointer to --help)
    1    training diverged (the loss became nan or inf)
    3    a file could not be written (a full disk, a lost permission); what was whole stays whole
    130  interrupted (Ctrl-C)

The library raises a Stop (BadInput, or a subclass with its own code); an entry point runs its
work under `guard`, which turns a Stop into its line and code. Nothing else is caught: any other
exception is a bug, and its traceback is what a bug report needs.

It is the bottom row of the imports: it imports nothing of the project.
"""

import argparse
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
    bad is true."""
    for bad, message in problems:
        if bad:
            raise error(message)


def fail(message, code=2):
    """Print `error: message` on stderr and exit (2: bad input)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextmanager
def guard(interrupted="interrupted (Ctrl-C)"):
    """Run an entry point's work: a Stop exits with its line and code, Ctrl-C with 130 and the
    line `interrupted` (a string, or a function that returns one, asked only then)."""
    try:
        yield
    except Stop as e:
        fail(str(e), e.code)
    except KeyboardInterrupt:
        fail(interrupted() if callable(interrupted) else interrupted, code=130)

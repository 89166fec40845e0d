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

Flags are made from a dataclass of settings (TrainConfig, sample.py's SampleConfig, ...): each
field's default, --help and allowed range in one place (setting, add_flags).

It is the bottom row of the imports: it imports nothing of the project.
"""

import argparse
import errno
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import field, fields


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


# -----------------------------------------------------------------------------
# flags made from a dataclass of settings


def setting(default, help, allowed=None):
    """A field of settings: its default, its --help, and what it allows (an interval like
    "[0, 1)", where "[" and "]" include the bound; or a tuple of choices; None: anything)."""
    return field(default=default, metadata={"help": help, "allowed": allowed})


def add_flags(parser, settings, per_run=None, skip=(), notes=None):
    """One flag per field of settings, its help and range from the field's metadata. Unset flags
    stay out of the namespace (SUPPRESS), so that a flag given with its default value can be
    told from one not given. per_run: {field: what to use instead}, fields an experiment sets
    for each of its runs: giving one is refused with that advice. skip: fields the caller
    defines a flag of its own for. notes: {field: more words for its help}."""
    per_run, notes = per_run or {}, notes or {}
    for f in fields(settings):
        allowed = f.metadata["allowed"]
        if f.name in skip:
            continue
        if f.name in per_run:
            parser.add_argument(f"--{f.name}", action=Refused, advice=per_run[f.name],
                                help=argparse.SUPPRESS, default=argparse.SUPPRESS)
            continue
        said = ([] if "default" in f.metadata["help"] else [f"default {f.default}"]) + \
            ([notes[f.name]] if f.name in notes else []) + \
            ([f"allowed {allowed}"] if isinstance(allowed, str) else [])
        kw = dict(help=f.metadata["help"] + (" (" + ", ".join(said) + ")" if said else ""),
                  default=argparse.SUPPRESS)
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(f"--{f.name}", type=f.type,
                                choices=allowed if isinstance(allowed, tuple) else None, **kw)
    return parser


class Refused(argparse.Action):
    """A flag an experiment sets per run: giving it is an error that says what to use."""

    def __init__(self, option_strings, dest, advice, **kw):
        super().__init__(option_strings, dest, nargs="?", **kw)
        self.advice = advice

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is set per run here; {self.advice}")


def given_flags(args, settings):
    """The fields of settings in a parsed namespace: the flags given."""
    names = {f.name for f in fields(settings)}
    return {k: v for k, v in vars(args).items() if k in names}


def interval_bounds(interval):
    """"[0, 1)" -> (0.0, True, 1.0, False): lowest, whether included, highest, whether included."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    return lo, interval[0] == "[", hi, interval[-1] == "]"


def in_interval(value, interval):
    lo, lo_in, hi, hi_in = interval_bounds(interval)
    return (lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)


def describe_interval(interval):
    """"[0, 1)" -> "at least 0 and below 1"; "(0, inf)" -> "above 0 and finite"."""
    lo, lo_in, hi, hi_in = interval_bounds(interval)
    text = f"{'at least' if lo_in else 'above'} {lo:g}"
    if hi == math.inf:
        return text if hi_in else f"{text} and finite"
    return f"{text} and {'at most' if hi_in else 'below'} {hi:g}"

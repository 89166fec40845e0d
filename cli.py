"""
The promises every nanoBDD script keeps to its user when something goes wrong:

- bad input (a flag, a file, a checkpoint): one line on stderr, `error: <what is wrong and how to
  fix it>`, exit 2; argparse's own errors too (its usage block becomes a pointer to --help);
- never a half-written file: checkpoints, logs, results and figures are written to a temporary
  name beside their place and renamed over it once whole (written_whole).

It is the bottom row of the imports, below mask.py (it imports nothing of the project), so every
script can use it, mask.py included.
"""

import argparse
import os
import sys
from contextlib import contextmanager


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: ... (see <prog> --help)`, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(message, code=2):
    """Print `error: message` on stderr and exit (2: bad input)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextmanager
def written_whole(path):
    """Yield a temporary name beside `path` to write to; once the block ends it is renamed over
    path (os.replace is atomic), and if the block fails it is removed: path is then untouched,
    whole as before, or absent as before."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

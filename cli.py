"""
How every nanoBDD script tells its user that something went wrong: one line on stderr.

- bad input (a flag, a file, a checkpoint): `error: <what is wrong and how to fix it>`, exit 2;
- argparse's own errors follow the same rule: its usage block is replaced by a pointer to --help.

It is the bottom row of the imports, below mask.py (it imports nothing of the project), so every
script can use it, mask.py included.
"""

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: ... (see <prog> --help)`, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(message, code=2):
    """Print `error: message` on stderr and exit (2: bad input)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)

"""What the two commands share: one-line errors with exit code 2 (standard library only)."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, ``prog: error: ... (see --help)``, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse(parser: argparse.ArgumentParser, argv):
    """``(args, None)``, or ``(None, exit code)`` for --help (0) and bad flags (2, already reported),
    so that ``main(argv) -> int`` returns instead of raising SystemExit."""
    try:
        return parser.parse_args(argv), None
    except SystemExit as exc:
        return None, exc.code if isinstance(exc.code, int) else 2


def fail(prog: str, message: str, code: int = 2) -> int:
    """Report ``message`` as one line on stderr; returns ``code`` for ``main`` to return."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code

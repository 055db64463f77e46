"""One exception type for every mistake a user can make (bad path, bad file, bad option).

CLIs catch `UserError`, print its one-line message and exit with status 2; anything else
is a bug and keeps its traceback. The argparse types shared by the CLIs live here too (argparse
itself reports their errors in one line with exit status 2).
"""

import argparse
import math
import sys
from collections.abc import Callable


class UserError(Exception):
    """A one-line message that names the input, what was wrong, and what to do."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run `main(argv)`; turn a UserError into `error: ...` on stderr and exit code 2."""
    try:
        return int(main(argv) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def guidance_scale(text: str) -> float:
    """argparse type: a CFG scale w, finite and >= 0 (1 = no guidance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (1 = no guidance)")
    return value

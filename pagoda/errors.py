"""One exception type for every mistake a user can make (bad path, bad file, bad option).

CLIs catch `UserError`, print its one-line message and exit with status 2; anything else
is a bug and keeps its traceback.
"""

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

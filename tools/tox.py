"""Set-up from nothing, then tox: `python3 tools/tox.py [tox arguments]`.

    python3 tools/tox.py -e demo   # the main job on the bundled default
    python3 tools/tox.py           # the tests

Needs only Python 3.10+ (with its standard `venv`) and bash. Builds the one shared environment `.venv/`
(tools/venv.sh: torch and every dependency, tox included, from the package index; a few minutes, once,
rebuilt only when pyproject.toml's install tables change), then runs `.venv/bin/python -m tox` with the
arguments given, from the repository root. No tox on PATH is needed, and none on PATH is used.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 (this script may be run by an older python3)
        print(f"error: pagoda needs Python 3.10 or newer; this is {sys.version.split()[0]}: run the command with "
              "python3.11", file=sys.stderr)
        return 2
    code = subprocess.call(["bash", str(ROOT / "tools" / "venv.sh")], cwd=ROOT)
    if code != 0:
        print(f"error: building {ROOT / '.venv'} failed (exit {code}; see the pip output above): check the network "
              "access to the package index, then run the command again", file=sys.stderr)
        return code
    python = ROOT / ".venv" / "bin" / "python"
    os.chdir(ROOT)
    return subprocess.call([str(python), "-m", "tox", "-c", str(ROOT / "tox.ini"), *argv])


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)

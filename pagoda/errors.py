"""One exception type for every mistake a user can make (bad path, bad file, bad option).

CLIs catch `UserError`, print its one-line message and exit with status 2; anything else
is a bug and keeps its traceback. The argparse types shared by the CLIs live here too (argparse
itself reports their errors in one line with exit status 2).
"""

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


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
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a shell tool does
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one line `error: ...` on stderr and exit status 2 (through
    run_cli), like every other mistake, instead of a usage block."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def writable_dir(folder: Path) -> bool:
    """Whether a file can be created in `folder`, tried (os.access says yes for root on read-only mounts and
    pseudo file systems such as /sys and /proc)."""
    if not os.access(folder, os.W_OK):
        return False
    try:
        fd, tmp = tempfile.mkstemp(prefix=".pagoda-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def check_output(path, what: str = "-o") -> None:
    """UserError unless `path` can be written as a file: not a directory, not inside a file, and when it
    exists a regular file (a device or fifo would be read whole or replaced by the atomic rename)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {p} is a directory: give a file name inside it, e.g. {p / 'results.jsonl'}")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {p}: {parent} is a file, not a directory: choose another path")
            if not writable_dir(parent):
                raise UserError(f"{what} {p}: directory {parent} is not writable: choose another path")
            break
    if p.exists() and not p.resolve().is_file():
        raise UserError(f"{what} {p} exists and is not a regular file: choose another path")


MAX_SEEDS = 1_000_000


def int_list(text: str) -> list[int]:
    """`0-63` or `1,5,7` or `0-9,20` -> a list of non-negative integers (ranges are inclusive)."""
    out = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            lo, hi = int(lo), int(hi if sep else lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list like 0-63 or 1,5,7") from None
        if lo < 0 or hi < lo:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} in {text!r} must be a range a-b with 0 <= a <= b")
        if len(out) + hi - lo + 1 > MAX_SEEDS:
            raise argparse.ArgumentTypeError(f"{text!r} lists more than {MAX_SEEDS} values")
        out += range(lo, hi + 1)
    return out


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


MAX_SAMPLES = 100_000_000


def sample_count(text: str) -> int:
    """argparse type: a number of samples, 1 .. 100,000,000."""
    value = positive_int(text)
    if value > MAX_SAMPLES:
        raise argparse.ArgumentTypeError(f"{text} is more than {MAX_SAMPLES:,} samples")
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


# ---------------------------------------------------------------------------------------------
# Files written whole or not at all.

def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's file-creation mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temp path beside `path`, fsync it, then os.replace it over `path` (over the file a
    symlink `path` points to, so that the link survives)."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would give (some writers, e.g. safetensors, make it 0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path

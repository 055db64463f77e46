"""Result-row files without torch: read, check and append JSONL rows (ARCHITECTURE "Result row").

pagoda's own row writers (`pagoda drift --out`) and eval / bench share these, so every writer checks what a
rows file holds before it appends (a model file given by mistake is refused, not appended to).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pagoda.errors import UserError, check_output, write_atomic

REQUIRED = ("model", "metric", "value")  # keys every row has


def append_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append rows atomically: the old content plus the new lines go to a temp file that replaces `path`."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    new = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows).encode()
    write_atomic(path, lambda tmp: tmp.write_bytes(old + new))


def check_rows_output(path: str | os.PathLike, what: str = "-o") -> None:
    """UserError unless rows can be appended to `path`: a writable new file, or a JSONL file of rows (anything
    else there, an npz say, would be damaged by the append)."""
    check_output(path, what)
    if Path(path).exists() and Path(path).stat().st_size:
        try:
            read_rows(path, f"{what} file")
        except UserError as e:
            raise UserError(f"{e} -- {what} appends rows to an existing file only if it holds rows: choose "
                            "another file") from None


def read_rows(path: str | os.PathLike, what: str = "results file") -> list[dict]:
    """All rows of a JSONL file; a malformed line is a UserError naming `what`, the file and line number."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"{what} {path} does not exist or is not a file: check the path") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text: give a .jsonl file of result rows") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg}): fix or delete that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: a row must be a JSON object, got {type(row).__name__}: fix that line")
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise UserError(f"{path}:{n}: row lacks key(s) {missing}: fix that line or regenerate the file")
        if not isinstance(row["value"], (int, float)) or isinstance(row["value"], bool):
            raise UserError(f"{path}:{n}: 'value' must be a number, got {row['value']!r}: fix that line")
        rows.append(row)
    return rows

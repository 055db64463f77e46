"""Result rows for the report: find the JSONL files, read and check every row, keep the latest measurement.

A row is one JSON object per line; its schema, check and reader are pagoda.rows', which (like pagoda.errors)
imports only the standard library: reports/ imports nothing else of pagoda, and never eval or bench.
"""

from __future__ import annotations

import json
from pathlib import Path

from pagoda.errors import UserError
from pagoda.rows import COST_METRICS, MATCH_KEYS, read_rows

# What a row measures for the report: two rows with equal keys measure the same thing, and the later one (by
# `time`) is shown. Coarser than eval.gate's pagoda.rows.row_key: a re-measurement on another device model or
# with another attention layout replaces the older row here.
LATEST_EXTRA = ("class", "factor", "kind", "source")


def read_file(path: Path) -> list[dict]:
    """The rows of one JSONL file (pagoda.rows.read_rows: every row checked); a relative extra.samples_png is
    made relative to the file's folder. UserError if the file cannot be read, holds a bad line, or holds no rows."""
    rows = read_rows(path, "rows file")
    if not rows:
        raise UserError(f"{path} holds no rows: delete the empty file or rerun the command that writes it")
    for row in rows:
        png = (row.get("extra") or {}).get("samples_png")
        if png:
            row["extra"] = dict(row["extra"], samples_png=str(path.parent / png))  # an absolute one stays
    return rows


def find_files(paths: list[str]) -> list[Path]:
    """The JSONL files named by `paths`: a directory gives all its *.jsonl files (recursively, sorted), a
    file itself; each file once. UserError for a path that does not exist or a directory without
    *.jsonl files."""
    files = {}
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.jsonl") if f.is_file())
            if not found:
                raise UserError(f"directory {p} holds no *.jsonl files: give the folder that eval/bench "
                                  "wrote rows to, or the .jsonl files themselves")
        elif p.is_file():
            found = [p]
        else:
            raise UserError(f"{p} does not exist: give a directory of *.jsonl result files or .jsonl files")
        files.update((f.resolve(), f) for f in found)
    return list(files.values())


def load(paths: list[str]) -> tuple[list[dict], list[Path]]:
    """(all rows, the files read) for the inputs `paths` (see find_files); UserError on any bad input."""
    files = find_files(paths)
    return [row for f in files for row in read_file(f)], files


def is_cost(row: dict) -> bool:
    """True for a sampling- or training-cost row (its value depends on batch, device, dtype, compilation)."""
    return row["metric"] in COST_METRICS


def latest_key(row: dict) -> tuple:
    """What a row measures for the report: MATCH_KEYS, the LATEST_EXTRA entries of `extra`, whether it is a published row, and
    for a cost row also batch, device, dtype and extra.compile."""
    extra = row.get("extra") or {}
    key = tuple(row.get(k) for k in MATCH_KEYS) + (json.dumps([extra.get(k) for k in LATEST_EXTRA]),
                                                   bool(row.get("published")))
    if is_cost(row):
        key += (row.get("batch"), row.get("device"), row.get("dtype"), extra.get("compile"))
    return key


def latest(rows: list[dict]) -> list[dict]:
    """One row per latest_key: the one with the latest `time` (ISO 8601 strings; a row without time counts as
    oldest, and among equal times the later in `rows` wins), in the order of first appearance."""
    order = {latest_key(r): None for r in rows}
    for r in sorted(rows, key=lambda r: r.get("time") or ""):  # stable: file order breaks ties
        order[latest_key(r)] = r
    return list(order.values())

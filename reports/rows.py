"""Result rows for the report: find the JSONL files, read and check every row, keep the latest measurement.

A row is one JSON object per line; its schema, check and reader are pagoda.rows', which (like pagoda.errors)
imports only the standard library: reports/ imports nothing else of pagoda, and never eval or bench.
"""

from __future__ import annotations

import json
from pathlib import Path

from pagoda.errors import UserError
from pagoda.rows import COST_METRICS, MATCH_KEYS, PROTOCOL_NOTES, protocol, read_rows

# What a row measures for the report: two rows with equal keys and the same protocol measure the same thing, and
# the later one (by `time`) is shown. Coarser than eval.gate's pagoda.rows.row_key: a re-measurement on another
# device model or with another attention layout replaces the older row here. The selection rule and the range of
# eval.run --repeat are part of it: a mean-of-3 row, a min-of-3 row and each range's row are all shown.
LATEST_EXTRA = ("class", "factor", "kind", "source", "selection", "repeat")
# Protocol fields in which a re-measurement may differ and still replace the older row: the reference's last bits
# and package versions (as eval.gate notes them), and what the checkpoint itself says of its model (a retrained
# checkpoint of the same name replaces the old one's rows).
SAME_MEASUREMENT = PROTOCOL_NOTES + ("trained_on_evaluator", "space", "guidance_cost")


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
    key = tuple(row.get(k) for k in MATCH_KEYS) + (json.dumps([extra.get(k) for k in LATEST_EXTRA if not (
        k == "selection" and extra.get(k) == "single")]), bool(row.get("published")))
    if is_cost(row):
        key += (row.get("batch"), row.get("device"), row.get("dtype"), extra.get("compile"))
    return key


def other_protocol(a: dict, b: dict) -> bool:
    """True when rows `a` and `b` record different values of a protocol field (pagoda.rows.protocol) other than
    SAME_MEASUREMENT: the same model measured another way (labels balanced instead of per seed, another N or seed
    range, another resize). A field one of them leaves unknown (an older row) is no difference."""
    pa, pb = protocol(a), protocol(b)
    return any(k not in SAME_MEASUREMENT and pa[k] is not None and pb.get(k) is not None and pa[k] != pb[k]
               for k in pa)


def latest(rows: list[dict]) -> list[dict]:
    """The rows to show: per latest_key and protocol the one with the latest `time` (ISO 8601 strings; a row
    without time counts as oldest, and among equal times the later in `rows` wins). A row measured under another
    protocol than every newer row of its key (other_protocol) is kept beside them: the report shows it on a line
    of its own, marked. Kept rows come in the order of their key's first appearance, then newest first."""
    first = {}
    for r in rows:
        first.setdefault(latest_key(r), len(first))
    kept = {}
    newest = sorted(enumerate(rows), key=lambda ir: (ir[1].get("time") or "", ir[0]), reverse=True)
    for _, r in newest:  # stable: file order breaks ties
        same_key = kept.setdefault(latest_key(r), [])
        if all(other_protocol(r, k) for k in same_key):
            same_key.append(r)
    return [r for key in sorted(kept, key=first.get) for r in kept[key]]

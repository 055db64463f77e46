"""Result rows for the report: find the JSONL files, read and check every row, keep the latest measurement.

A row is one JSON object per line (ARCHITECTURE.md, "Result row"). reports/ never imports pagoda, eval or
bench, so the few schema facts it relies on are stated here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

REQUIRED = ("model", "metric", "value")
# What a row measures: two rows with equal keys measure the same thing, and the later one (by `time`) wins.
MATCH_KEYS = ("model", "method", "resolution", "guidance", "sampler", "steps", "metric")
# Entries of `extra` that are part of what was measured: a per-class row's class, a training row's factor,
# the kind of a cost ratio.
MATCH_EXTRA = ("class", "factor", "kind", "source")
# Cost metrics (bench) and training-cost metrics; a cost also depends on batch, device, dtype and compilation.
COST_METRICS = ("nfe", "latency_ms", "img_per_s", "peak_mem_mb", "gflops_per_image", "params")
TRAIN_METRICS = ("train_step_ms", "train_step_gflops", "pairs_cost_ratio")


class ReportError(Exception):
    """A mistake in the input or the output path: one line naming the input, the fault and the fix."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_INT, _NUM = (_is_int, "an integer"), (_is_num, "a finite number")
_STR, _BOOL = (lambda v: isinstance(v, str), "a string"), (lambda v: isinstance(v, bool), "true or false")
# The type of every field the report reads; a row field or `extra` entry of another type is refused, so no
# table or plot meets a value it cannot format.
FIELDS = {"model": _STR, "metric": _STR, "value": _NUM, "method": _STR, "sampler": _STR, "device": _STR,
          "dtype": _STR, "time": _STR, "reference": _STR, "extractor": _STR, "resolution": _INT,
          "steps": _INT, "batch": _INT, "num_samples": _INT, "guidance": _NUM, "nfe": _NUM, "ci_low": _NUM,
          "ci_high": _NUM, "extra": (lambda v: isinstance(v, dict), "a JSON object")}
EXTRA_FIELDS = {"p90_ms": _NUM, "reps": _INT, "factor": _NUM, "compile": _BOOL, "samples_png": _STR,
                "device_name": _STR, "mem_kind": _STR, "kind": _STR, "class_name": _STR,
                "source": _STR}
# Bounds of the numeric fields that have them: a size or count is never negative, a resolution or batch is
# at least 1 (a row of resolution -8 is a fault, not a measurement).
LOWER = {"resolution": 1, "batch": 1, "steps": 0, "nfe": 0, "num_samples": 0, "extra.reps": 1}


def check_row(row, where: str) -> dict:
    """`row` (a parsed JSON line) if it is a valid result row; else ReportError naming `where` (file:line)."""
    if not isinstance(row, dict):
        raise ReportError(f"{where}: a row must be a JSON object, got {type(row).__name__}: fix that line")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise ReportError(f"{where}: row lacks {', '.join(map(repr, missing))}: fix that line or regenerate "
                          "the file")
    for fields, values, prefix in ((FIELDS, row, ""), (EXTRA_FIELDS, row.get("extra") or {}, "extra.")):
        for name, (ok, what) in fields.items():  # FIELDS first: `extra` is a dict before its entries are read
            v, null, low = values.get(name), "" if name in REQUIRED else " or null", LOWER.get(prefix + name)
            if (v is not None or name in REQUIRED) and not ok(v):
                raise ReportError(f"{where}: '{prefix}{name}' must be {what}{null}, got {v!r}: fix that line")
            if v is not None and low is not None and v < low:
                raise ReportError(f"{where}: '{prefix}{name}' must be {what} >= {low}{null}, got {v!r}: fix "
                                  "that line")
    return row


def read_file(path: Path) -> list[dict]:
    """The rows of one JSONL file (blank lines skipped), each checked by check_row; a relative
    extra.samples_png is made relative to the file's folder. ReportError if the file cannot be read, is not
    UTF-8, holds a bad line, or holds no rows."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not UTF-8 text: give a .jsonl file of result rows") from None
    except OSError as e:
        raise ReportError(f"{path} cannot be read ({e.strerror}): check the path and its permissions") \
            from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(check_row(json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}:{n}: not valid JSON ({e.msg}): fix or delete that line") from None
    if not rows:
        raise ReportError(f"{path} holds no rows: delete the empty file or rerun the command that writes it")
    for row in rows:
        png = (row.get("extra") or {}).get("samples_png")
        if png:
            row["extra"] = dict(row["extra"], samples_png=str(path.parent / png))  # an absolute one stays
    return rows


def find_files(paths: list[str]) -> list[Path]:
    """The JSONL files named by `paths`: a directory gives all its *.jsonl files (recursively, sorted), a
    file itself; each file once. ReportError for a path that does not exist or a directory without
    *.jsonl files."""
    files = {}
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.jsonl") if f.is_file())
            if not found:
                raise ReportError(f"directory {p} holds no *.jsonl files: give the folder that eval/bench "
                                  "wrote rows to, or the .jsonl files themselves")
        elif p.is_file():
            found = [p]
        else:
            raise ReportError(f"{p} does not exist: give a directory of *.jsonl result files or .jsonl files")
        files.update((f.resolve(), f) for f in found)
    return list(files.values())


def load(paths: list[str]) -> tuple[list[dict], list[Path]]:
    """(all rows, the files read) for the inputs `paths` (see find_files); ReportError on any bad input."""
    files = find_files(paths)
    return [row for f in files for row in read_file(f)], files


def is_cost(row: dict) -> bool:
    """True for a sampling- or training-cost row (its value depends on batch, device, dtype, compilation)."""
    return row["metric"] in COST_METRICS + TRAIN_METRICS


def row_key(row: dict) -> tuple:
    """What a row measures: MATCH_KEYS, the MATCH_EXTRA entries of `extra`, whether it is a published row, and
    for a cost row also batch, device, dtype and extra.compile."""
    extra = row.get("extra") or {}
    key = tuple(row.get(k) for k in MATCH_KEYS) + (json.dumps([extra.get(k) for k in MATCH_EXTRA]),
                                                   bool(row.get("published")))
    if is_cost(row):
        key += (row.get("batch"), row.get("device"), row.get("dtype"), extra.get("compile"))
    return key


def latest(rows: list[dict]) -> list[dict]:
    """One row per row_key: the one with the latest `time` (ISO 8601 strings; a row without time counts as
    oldest, and among equal times the later in `rows` wins), in the order of first appearance."""
    order = {row_key(r): None for r in rows}
    for r in sorted(rows, key=lambda r: r.get("time") or ""):  # stable: file order breaks ties
        order[row_key(r)] = r
    return list(order.values())

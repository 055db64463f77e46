"""Result rows, declared once: the schema, the check every reader applies, JSONL I/O, what a row measures.

One JSON object per measurement, appended to a JSONL file (ARCHITECTURE.md, "Result row"). Every producer
(eval, bench, `pagoda drift --out`) writes this schema, and eval.gate and reports/ read nothing else. Optional
detail outside the fixed schema (the IS style, the class of a per-class FID, the bootstrap size) goes into
`extra`, a flat dict. This module and pagoda.errors import only the standard library, so reports/ (which
never needs torch) shares them with eval and bench.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pagoda.errors import UserError, check_output, write_atomic

REQUIRED = ("model", "metric", "value")  # keys every row has
# The fixed schema, in the order a table shows it.
ROW_KEYS = ("run", "model", "method", "resolution", "guidance", "sampler", "steps", "nfe", "metric", "value",
            "ci_low", "ci_high", "num_samples", "reference", "extractor", "extractor_sha256", "batch", "dtype",
            "device", "torch", "commit", "seed", "time")
# Keys that say WHAT was measured (two rows with equal keys measure the same thing); eval.gate matches on them.
MATCH_KEYS = ("model", "method", "resolution", "guidance", "sampler", "steps", "metric")
# Entries of `extra` that are part of what was measured (the class of a per-class metric; a cost row's scale
# factor, attention layout, pairs kind, compile flag, device model); the others are
# estimator parameters (below) or results (e.g. `std`) and never take part in matching.
MATCH_EXTRA = ("class", "factor", "attention", "guided", "kind", "compile", "device_name", "source")
# Cost rows (bench) also measure a batch size on a device in a dtype: those are part of what they measure.
SAMPLING_COST_METRICS = ("nfe", "latency_ms", "img_per_s", "peak_mem_mb", "gflops_per_image", "params")  # bench.compare
TRAIN_METRICS = ("train_step_ms", "train_step_gflops", "pairs_cost_ratio")  # bench.train_cost
COST_METRICS = SAMPLING_COST_METRICS + TRAIN_METRICS
COST_KEYS = ("batch", "dtype", "device", "nfe")
# Counts of a setting (counted NFE, parameters, FLOPs per image) are the same on any machine: they match across
# device models (extra.device_name), so a gate on them holds on another CPU or GPU.
COUNT_METRICS = ("nfe", "params", "gflops_per_image")
# Entries of `extra` that are estimator parameters or image conventions: two rows that differ in one of
# them measured the same thing differently, and eval.gate refuses to compare them.
ESTIMATOR_EXTRA = ("subset_size", "subsets", "kid_seed", "splits", "style", "k", "bootstrap", "resize", "labels",
                   "sigma", "scale", "layer")


# ---------------------------------------------------------------------------------------------
# The check: the type of every field a reader relies on.

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


def check_row(row, where: str, *, nonfinite: bool = False) -> dict:
    """`row` (a parsed JSON line) if it is a valid result row; else UserError naming `where` (file:line). With
    `nonfinite` a NaN or infinite `value` passes (a measurement that failed: eval.gate counts it a regression; a
    report refuses it)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object, got {type(row).__name__}: fix that line")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise UserError(f"{where}: row lacks {', '.join(map(repr, missing))}: fix that line or regenerate "
                        "the file")
    for fields, values, prefix in ((FIELDS, row, ""), (EXTRA_FIELDS, row.get("extra") or {}, "extra.")):
        for name, (ok, what) in fields.items():  # FIELDS first: `extra` is a dict before its entries are read
            v, null, low = values.get(name), "" if name in REQUIRED else " or null", LOWER.get(prefix + name)
            failed = nonfinite and name == "value" and not prefix and isinstance(v, float) and not math.isfinite(v)
            if (v is not None or name in REQUIRED) and not ok(v) and not failed:
                raise UserError(f"{where}: '{prefix}{name}' must be {what}{null}, got {v!r}: fix that line")
            if v is not None and low is not None and v < low:
                raise UserError(f"{where}: '{prefix}{name}' must be {what} >= {low}{null}, got {v!r}: fix "
                                "that line")
    return row


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
            read_rows(path, f"{what} file", nonfinite=True)
        except UserError as e:
            raise UserError(f"{e} -- {what} appends rows to an existing file only if it holds rows: choose "
                            "another file") from None


def read_rows(path: str | os.PathLike, what: str = "results file", *, nonfinite: bool = False) -> list[dict]:
    """All rows of a JSONL file (blank lines skipped), each checked by check_row (`nonfinite`: see there); a
    malformed line is a UserError naming the file and line number, a missing or unreadable file one naming `what`."""
    path, rows = Path(path), []
    for n, line in enumerate(_text(path, what).splitlines(), 1):
        if line.strip():
            try:
                rows.append(check_row(json.loads(line), f"{path}:{n}", nonfinite=nonfinite))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}): fix or delete that line") from None
    return rows


def _text(path: Path, what: str) -> str:
    """The UTF-8 text of a rows file; UserError naming `what` when it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"{what} {path} does not exist or is not a file: check the path") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text: give a .jsonl file of result rows") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror}): check the path and its permissions") \
            from None


# ---------------------------------------------------------------------------------------------
# What a row measures, and rows as text.

def row_key(row: dict) -> tuple:
    """What a row measures: the MATCH_KEYS plus the MATCH_EXTRA entries of its `extra`."""
    machine_free = row.get("metric") in COUNT_METRICS
    extra = json.dumps({k: v for k, v in (row.get("extra") or {}).items()
                        if k in MATCH_EXTRA and not (machine_free and k == "device_name")}, sort_keys=True)
    cost = tuple(row.get(k) for k in COST_KEYS) if row.get("metric") in COST_METRICS else ()
    return tuple(row.get(k) for k in MATCH_KEYS) + (extra,) + cost


def estimator_params(row: dict) -> dict:
    """The estimator parameters recorded in a row's `extra` (ESTIMATOR_EXTRA entries present)."""
    return {k: v for k, v in (row.get("extra") or {}).items() if k in ESTIMATOR_EXTRA}


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    if isinstance(v, dict):
        return ",".join(f"{k}={_cell(x)}" for k, x in sorted(v.items())) or "-"
    return str(v)


def text_table(records: list[dict], columns, cell=None) -> str:
    """Plain-text table of `records` (dicts) over `columns`, each value rendered by `cell` (default _cell)."""
    cell = cell or _cell
    cells = [[cell(r.get(c)) for c in columns] for r in records]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*columns), fmt.format(*("-" * w for w in widths))] + [fmt.format(*c) for c in cells])


def format_table(rows: list[dict], columns: tuple[str, ...] = ("model", "resolution", "guidance", "sampler",
                                                                "steps", "nfe", "metric", "value", "ci_low",
                                                                "ci_high", "num_samples", "extra")) -> str:
    """A plain-text table of rows for stdout (columns with no value in any row are dropped)."""
    return text_table(rows, [c for c in columns if any(r.get(c) not in (None, {}) for r in rows)])

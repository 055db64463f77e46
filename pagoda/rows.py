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
# factor, attention layout, pairs kind, compile flag, device model; the selection rule and the range index of
# eval.run --repeat, so a mean-of-3 row never stands in for a single run); the others are
# estimator parameters (below) or results (e.g. `std`) and never take part in matching.
MATCH_EXTRA = ("class", "factor", "attention", "guided", "kind", "compile", "device_name", "source", "selection",
               "repeat")
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

# The protocol of a measurement: everything besides the model that moves its number (ISSUE 27; the published
# rows of reports/paper.py use the same names). Each entry: field -> what it records. A row field when the
# name is a ROW_KEY, else an `extra` entry; a field a row leaves out is unknown (None), never assumed.
PROTOCOL = {
    "reference": "the reference statistics, by name (a catalog name, a data-set spec, or the file's name)",
    "reference_sha256": "SHA-256 of the reference's float64 mean and covariance (the numbers, not the file)",
    "extractor": "the feature network",
    "extractor_sha256": "SHA-256 of its weights file",
    "resize": "how images are brought to the extractor's input (its image convention)",
    "uint8": "how float images became uint8: round (EDM), floor (ADM), or stored (given as uint8)",
    "feature_dtype": "the dtype of the features the statistics are summed from",
    "num_samples": "N, the number of samples",
    "seeds": "the seeds of generated samples (or indices of stored ones), first-last inclusive",
    "labels": "class labels: seed (drawn per sample), balanced (equal counts) or given",
    "estimator": "the estimator parameters (KID subsets, IS splits and style, k, bootstrap rounds, ...)",
    "selection": "how the number was chosen: single, min-of-K, mean-of-K, max-of-K or best-checkpoint",
    "guidance_cost": "how guidance is paid for: none, x2 (CFG: two network rows per step) or in-1 (built into "
                     "one call)",
    "space": "where the generator works: pixel or latent",
    "dtype": "the dtype the samples were made in",
    "trained_on_evaluator": "the model was trained on this extractor's features (its score is not a held-out test)",
    "versions": "package versions that decide the numbers",
}
# Protocol fields eval.gate reports but does not refuse on: a reference rebuilt on another machine differs in
# its last bits (the gate's references are rebuilt by the run), and package upgrades are what a gate checks.
PROTOCOL_NOTES = ("reference_sha256", "versions")


# +1: lower is better (a rise is a regression); -1: higher is better.
LOWER_IS_BETTER = ("fid", "sfid", "kid", "fd_", "fdr", "cmmd", "latency", "memory", "nfe")
HIGHER_IS_BETTER = ("is", "precision", "recall", "density", "coverage", "clip", "img_per_s", "throughput")


def known_direction(metric: str) -> int | None:
    """+1 if a larger value of `metric` is worse, -1 if a smaller one is worse, None if unknown."""
    m = metric.lower()
    if any(m == p or m.startswith(p) for p in LOWER_IS_BETTER):
        return +1
    if any(m == p or m.startswith(p + "_") for p in HIGHER_IS_BETTER):
        return -1
    return None


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
                "source": _STR, "selection": _STR, "repeat": _INT, "seeds": _STR, "uint8": _STR, "space": _STR,
                "guidance_cost": _STR, "feature_dtype": _STR, "trained_on_evaluator": _BOOL,
                "versions": (lambda v: isinstance(v, dict), "a JSON object")}
# Bounds of the numeric fields that have them: a size or count is never negative, a resolution or batch is
# at least 1 (a row of resolution -8 is a fault, not a measurement).
LOWER = {"resolution": 1, "batch": 1, "steps": 0, "nfe": 0, "num_samples": 0, "extra.reps": 1, "extra.repeat": 0}


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
    extra = json.dumps({k: v for k, v in (row.get("extra") or {}).items()  # a single run is the default selection
                        if k in MATCH_EXTRA and not (machine_free and k == "device_name")
                        and not (k == "selection" and v == "single")}, sort_keys=True)
    cost = tuple(row.get(k) for k in COST_KEYS) if row.get("metric") in COST_METRICS else ()
    return tuple(row.get(k) for k in MATCH_KEYS) + (extra,) + cost


def estimator_params(row: dict) -> dict:
    """The estimator parameters recorded in a row's `extra` (ESTIMATOR_EXTRA entries present)."""
    return {k: v for k, v in (row.get("extra") or {}).items() if k in ESTIMATOR_EXTRA}


def protocol(row: dict) -> dict:
    """The protocol of a row, flat: {PROTOCOL field: value, None where the row does not say}, with the estimator
    parameters (ESTIMATOR_EXTRA entries other than resize and labels, which are fields of their own) each under
    its own name in place of `estimator`."""
    extra = row.get("extra") or {}
    out = {k: row.get(k) if k in ROW_KEYS else extra.get(k) for k in PROTOCOL if k != "estimator"}
    return {**out, **{k: v for k, v in estimator_params(row).items() if k not in PROTOCOL}}


def protocol_diff(a: dict, b: dict) -> dict[str, tuple]:
    """{field: (value in a, value in b)} for every protocol field (protocol()) both rows record, with different
    values; a field one of them leaves out is unknown there and not a difference."""
    pa, pb = protocol(a), protocol(b)
    return {k: (pa[k], pb[k]) for k in pa if k in pb and None not in (pa[k], pb[k]) and pa[k] != pb[k]}


def protocol_unknown(row: dict) -> list[str]:
    """The PROTOCOL fields `row` leaves unknown (`estimator` when it records no estimator parameter)."""
    known = protocol(row)
    return [k for k in PROTOCOL if (k == "estimator" and not estimator_params(row)) or known.get(k, 0) is None]


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


def shared_protocol(rows: list[dict]) -> dict:
    """The protocol fields (protocol()) every row records with one value: what a table of `rows` states once."""
    if not rows:
        return {}
    each = [protocol(r) for r in rows]
    return {k: v for k, v in each[0].items() if v is not None and all(p.get(k) == v for p in each[1:])}


def field_text(field: str, value) -> str:
    """One protocol value as text: a digest cut to 12 hex digits, versions ({name: version}) as `name version, ...`."""
    if field.endswith("sha256") and isinstance(value, str):
        return value[:12]
    if isinstance(value, dict):
        return ", ".join(f"{n} {x}" for n, x in sorted(value.items()))
    return str(value)


def protocol_text(fields: dict) -> str:
    """`field value; ...` of protocol fields (field_text)."""
    return "; ".join(f"{k} {field_text(k, v)}" for k, v in fields.items())


def format_table(rows: list[dict], columns: tuple[str, ...] = ("model", "resolution", "guidance", "sampler",
                                                                "steps", "nfe", "metric", "value", "ci_low",
                                                                "ci_high", "num_samples", "extra")) -> str:
    """A plain-text table of rows for stdout (columns with no value in any row are dropped), then the protocol
    every row shares, once (its fields are left out of the `extra` column)."""
    shared = shared_protocol(rows)
    quiet = set(shared) | {"versions", "weights_trust", "reference_trust", "val_reference_sha256"}
    shown = [dict(r, extra={k: v for k, v in (r.get("extra") or {}).items() if k not in quiet}) for r in rows]
    table = text_table(shown, [c for c in columns if any(r.get(c) not in (None, {}) for r in shown)])
    return table + (f"\nprotocol of every row: {protocol_text(shared)}" if shared else "")

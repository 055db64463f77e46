"""Result rows: one JSON object per measurement, appended to a JSONL file (ARCHITECTURE.md).

Every producer (eval.fid, eval.run, bench) writes rows of the same schema, and reports/ and
eval.gate read nothing else. Optional per-row detail that is not part of the fixed schema (the
IS style, the class of a per-class FID, the bootstrap size) goes into `extra`, a flat dict.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import torch

from pagoda.rows import REQUIRED, append_rows, check_rows_output, read_rows  # noqa: F401 (the rows API is here)
from pagoda.version import git_commit

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
COST_METRICS = ("nfe", "latency_ms", "img_per_s", "peak_mem_mb", "gflops_per_image", "params", "train_step_ms",
                "train_step_gflops", "pairs_cost_ratio")
COST_KEYS = ("batch", "dtype", "device", "nfe")
# Counts of a setting (counted NFE, parameters, FLOPs per image) are the same on any machine: they match across
# device models (extra.device_name), so a gate on them holds on another CPU or GPU.
COUNT_METRICS = ("nfe", "params", "gflops_per_image")
# Entries of `extra` that are estimator parameters or image conventions: two rows that differ in one of
# them measured the same thing differently, and eval.gate refuses to compare them.
ESTIMATOR_EXTRA = ("subset_size", "subsets", "kid_seed", "splits", "style", "k", "bootstrap", "resize", "labels",
                   "sigma", "scale", "layer")


def run_id() -> str:
    """One id per process (start time + host) so the rows of one invocation can be grouped."""
    return _RUN_ID


_RUN_ID = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + socket.gethostname()


def make_row(*, model: str, metric: str, value: float, **fields: Any) -> dict:
    """A complete row: the given fields, environment fields filled in, every schema key present."""
    unknown = set(fields) - set(ROW_KEYS) - {"extra"}
    if unknown:
        raise TypeError(f"make_row: unknown row field(s) {sorted(unknown)}")
    row = dict.fromkeys(ROW_KEYS)
    row.update(run=run_id(), torch=torch.__version__, commit=git_commit(),
               time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    row.update(fields, model=model, metric=metric, value=float(value))
    row["extra"] = dict(fields.get("extra") or {})
    return row


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

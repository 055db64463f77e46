"""`python -m eval.gate`: compare result rows with a baseline and fail on a regression.

    python -m eval.gate --results new.jsonl --baseline base.jsonl --tolerance fid=+0.05,is=-1%
    python -m eval.gate --results runs/smoke/results --baseline base.jsonl --metrics fid,precision,recall
    python -m eval.gate --results runs/smoke/results --metrics fid,precision,recall --write-baseline base.jsonl

--results and --baseline are JSONL files or folders (every *.jsonl in them, sorted by name), repeatable.
--metrics keeps only those metrics of both sides (e.g. leave out latencies, which depend on the machine).
--write-baseline FILE writes the (filtered) results as a new baseline, atomically, and compares nothing: the
way to update a committed baseline on purpose.

Rows are matched on (model, method, resolution, guidance, sampler, steps, metric) and the class of a
per-class row; two matched rows measured under different protocols (pagoda.rows.PROTOCOL: the reference,
the extractor and its weights, resize and uint8 conventions, N and seeds, labels, estimator parameters such as
KID subsets or IS splits, the selection rule, how guidance is paid for) are refused (exit 2) rather than
compared; a reference whose statistics differ only in their bits (rebuilt on another machine) and other package
versions are noted, not refused. When a
file holds the same key twice the last row wins (the latest measurement). A tolerance names the
direction that is worse and how far a value may move that way: `fid=+0.05` = FID may rise by at
most 0.05 (absolute), `is=-1%` = IS may fall by at most 1% of the baseline (relative). Without a
sign (`fid=0.05`) the metric's known direction is used. Metrics not named in --tolerance get
tolerance 0 in their known direction (any worsening fails); metrics of unknown direction that are
not named are shown as `unchecked` and never fail.

Exit status: 0 all pass; 1 a regression, or a baseline row missing from the results (unless
--allow-missing); 2 malformed input: a bad JSONL line, a tolerance that does not parse, or a
tolerance for a metric that appears in neither file (most likely a typo), or rows measured with
different protocols.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pagoda.errors import ArgumentParser, UserError, run_cli, write_atomic
from pagoda.rows import (
    MATCH_KEYS,
    PROTOCOL,
    PROTOCOL_NOTES,
    check_rows_output,
    known_direction,
    protocol_diff,
    read_rows,
    row_key,
    text_table,
)


@dataclass(frozen=True)
class Tolerance:
    """How far `metric` may move in its worse direction: `amount` absolute, or a fraction if relative."""

    direction: int  # +1: may rise by at most amount; -1: may fall by at most amount
    amount: float
    relative: bool

    def bound(self, base: float) -> float:
        """The worst value still accepted for a baseline value `base`."""
        step = self.amount * abs(base) if self.relative else self.amount
        return base + self.direction * step

    def accepts(self, base: float, new: float) -> bool:
        if not math.isfinite(new):
            return False
        limit = self.bound(base)
        slack = 1e-12 * max(1.0, abs(limit))  # float noise of the JSON round trip is not a regression
        return new <= limit + slack if self.direction > 0 else new >= limit - slack

    def text(self) -> str:
        return f"{'+' if self.direction > 0 else '-'}{self.amount * 100:g}%" if self.relative else \
            f"{'+' if self.direction > 0 else '-'}{self.amount:g}"


_TOL = re.compile(r"^([A-Za-z0-9_./@-]+)=([+-]?)(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?(%?)$")


def parse_tolerances(text: str) -> dict[str, Tolerance]:
    """`fid=+0.05,is=-1%` -> {metric: Tolerance}; anything else is a UserError."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = _TOL.match(item)
        if not m:
            raise UserError(f"--tolerance item {item!r} does not parse: write metric=+ABS or metric=-REL% "
                            "(e.g. fid=+0.05,is=-1%)")
        metric, sign, num, exp, pct = m.groups()
        if metric in out:
            raise UserError(f"--tolerance names {metric} twice ({text!r}): give one tolerance per metric")
        try:
            amount = float(num) * 10 ** int(exp or 0)
        except OverflowError:
            amount = math.inf
        if not math.isfinite(amount):
            raise UserError(f"--tolerance item {item!r}: the amount is not a finite number: give one such as "
                            f"{metric}=+0.05 (or drop the metric from --tolerance)")
        out[metric] = Tolerance(_direction(item, metric, sign, num + pct), amount / 100 if pct else amount, bool(pct))
    return out


def _direction(item: str, metric: str, sign: str | None, amount: str) -> int:
    """+1 when a rise of `metric` is a regression, -1 for a fall: the item's sign, else the metric's known one;
    UserError for a sign against the metric's known direction, or no sign for a metric of unknown direction."""
    direction = {"+": 1, "-": -1}.get(sign) or known_direction(metric)
    if sign and known_direction(metric) not in (None, direction):
        better = "lower" if known_direction(metric) > 0 else "higher"
        raise UserError(f"--tolerance {item!r}: {better} {metric} is better, so a regression is a "
                        f"{'rise' if better == 'lower' else 'fall'}: write {metric}="
                        f"{'+' if better == 'lower' else '-'}{amount} (or no sign)")
    if direction is None:
        raise UserError(f"--tolerance {item!r}: the better direction of {metric!r} is unknown: "
                        f"give a sign ({metric}=+{amount} if lower is better, -{amount} if higher)")
    return direction


def _latest(rows: list[dict]) -> dict[tuple, dict]:
    return {row_key(r): r for r in rows}


def compare(results: list[dict], baseline: list[dict], tolerances: dict[str, Tolerance], *,
            allow_missing: bool = False) -> list[dict]:
    """One verdict per key of either file: baseline, new, delta, allowed bound and status."""
    new, base = _latest(results), _latest(baseline)
    for what, rows, kept in (("--results", results, new), ("--baseline", baseline, base)):
        if len(rows) > len(kept):  # eval.run -o appends: a file may hold several runs of one setting
            print(f"note: {what} holds {len(rows) - len(kept)} row(s) measured again by a later row of the same "
                  "setting: the last of each is compared", file=sys.stderr)
    for note in check_protocol(new, base):
        print(note, file=sys.stderr)
    verdicts = []
    for key in list(base) + [k for k in new if k not in base]:
        b, n = base.get(key), new.get(key)
        row = dict(zip(MATCH_KEYS, key), setting=",".join(f"{k}={v}" for k, v in json.loads(key[len(MATCH_KEYS)]).items()))
        metric = row["metric"]
        tol = tolerances.get(metric)
        if tol is None and known_direction(metric) is not None:
            tol = Tolerance(known_direction(metric), 0.0, False)
        bv, nv = (b or {}).get("value"), (n or {}).get("value")
        row.update(baseline=bv, new=nv, delta=None if b is None or n is None else nv - bv,
                   allowed=None if tol is None or b is None else tol.bound(bv))
        if n is None:
            row["status"] = "missing (allowed)" if allow_missing else "MISSING"
        elif b is None:
            row["status"] = "new"
        elif tol is None:
            row["status"] = "unchecked"
        else:
            row["status"] = "ok" if tol.accepts(bv, nv) else "REGRESSION"
        row["tolerance"] = tol.text() if tol is not None else "-"
        verdicts.append(row)
    return verdicts


def check_protocol(new: dict[tuple, dict], base: dict[tuple, dict]) -> list[str]:
    """UserError when a row and its baseline were measured under different protocols (pagoda.rows.protocol_diff:
    reference, extractor and its weights, image conventions, N, seeds, labels, estimator parameters, selection,
    guidance cost, ...); a field one side does not record (an older baseline) is not compared. The notes: rows
    whose PROTOCOL_NOTES fields differ (a reference rebuilt on another machine, other package versions)."""
    notes = set()
    for key in base.keys() & new.keys():
        b, n = base[key], new[key]
        diff = protocol_diff(b, n)
        refused = {k: v for k, v in diff.items() if k not in PROTOCOL_NOTES}
        if refused:
            what = ", ".join(f"{k} {vb!r} in the baseline vs {vn!r} in the results" for k, (vb, vn) in refused.items())
            raise UserError(f"{b['metric']} of {b['model']} was measured under a different protocol ({what}): "
                            "measure both the same way, or update the baseline on purpose")
        notes.update(diff)
    _check_selection(new, base)
    return [f"note: {k} differs between baseline and results for some rows ({PROTOCOL[k]}); compared anyway"
            for k in sorted(notes)]


def _check_selection(new: dict[tuple, dict], base: dict[tuple, dict]) -> None:
    """UserError when a baseline row has no match in the results only because the two were selected differently
    (extra.selection: single, mean-of-K, min-of-K, ...; extra.repeat: one range of eval.run --repeat): without it
    the gate would show the baseline's row MISSING and the results' new, and not say why."""
    def coarse(key: tuple) -> tuple:
        extra = {k: v for k, v in json.loads(key[len(MATCH_KEYS)]).items() if k not in ("selection", "repeat")}
        return key[:len(MATCH_KEYS)] + (json.dumps(extra, sort_keys=True),) + key[len(MATCH_KEYS) + 1:]

    def how(row: dict) -> str:
        extra = row.get("extra") or {}
        return repr(extra.get("selection") or "single") + (f" (range {extra['repeat']} of --repeat)"
                                                            if extra.get("repeat") is not None else "")

    results = {}
    for key in (k for k in new if k not in base):  # file order, not set order: the same message every run
        results.setdefault(coarse(key), []).append(new[key])
    for key in (k for k in base if k not in new):
        theirs = results.get(coarse(key))
        if theirs:
            b = base[key]
            raise UserError(f"{b['metric']} of {b['model']} was selected differently: {how(b)} in the baseline vs "
                            f"{', '.join(sorted(how(r) for r in theirs))} in the results: measure both the same way "
                            "(eval.run --repeat K writes the mean-of-K and min-of-K rows), or update the baseline on "
                            "purpose")


def failed(verdicts: list[dict]) -> bool:
    return any(v["status"] in ("REGRESSION", "MISSING") for v in verdicts)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:+.4g}" if isinstance(v, float) and v != 0 and abs(v) < 1e-2 else \
        (f"{v:.6g}" if isinstance(v, float) else str(v))


def format_diff(verdicts: list[dict]) -> str:
    """The diff table: which cell, baseline, new, delta, allowed bound, tolerance, status."""
    cols = ("model", "method", "resolution", "guidance", "sampler", "steps", "metric", "baseline", "new",
            "delta", "allowed", "tolerance", "status")
    if any(v["setting"] for v in verdicts):  # what else tells rows apart: --repeat range, selection, class, ...
        cols = cols[:7] + ("setting",) + cols[7:]
    return text_table(verdicts, cols, _fmt)


def read_all(paths: list[str], what: str) -> list[dict]:
    """The rows of every file named, and of every *.jsonl in every folder named (sorted), in that order. A NaN or
    infinite value passes (a failed measurement in the results is a regression; `finite` refuses it elsewhere)."""
    rows = []
    for path in paths:
        files = sorted(Path(path).glob("*.jsonl")) if Path(path).is_dir() else [path]
        if not files:
            raise UserError(f"{what} {path} is a folder without .jsonl files: give a file or folder of result rows")
        for f in files:
            rows += read_rows(f, what, nonfinite=True)
    return rows


def finite(rows: list[dict], what: str) -> list[dict]:
    """`rows` if every value is finite, else a UserError naming the first row that is not: a baseline of inf would let
    every result pass, one of NaN fail them all."""
    for r in rows:
        if not math.isfinite(r["value"]):
            at = f" at {r['resolution']} px" if r.get("resolution") is not None else ""
            raise UserError(f"{what}: the {r['metric']} row of {r['model']}{at} has value {r['value']}: a failed "
                            "measurement is no baseline; write the baseline from a run whose values are all finite")
    return rows


def write_baseline(rows: list[dict], path: str) -> None:
    """`rows` as a JSONL baseline at `path`, written atomically (pagoda.checkpoint.write_atomic)."""
    check_rows_output(path, "--write-baseline")  # never replaces a file that holds anything but rows
    write_atomic(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m eval.gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, action="append", help="JSONL rows of the new measurement (a file "
                   "or a folder of .jsonl files; repeatable)")
    p.add_argument("--baseline", action="append", default=[], help="JSONL rows to compare against (file or "
                   "folder; repeatable)")
    p.add_argument("--metrics", default=None, help="compare only these metrics (comma list), e.g. fid,precision")
    p.add_argument("--write-baseline", metavar="FILE", default=None, help="write the (filtered) results to FILE as "
                   "the new baseline and exit")
    p.add_argument("--tolerance", default="", help="per-metric tolerances, e.g. fid=+0.05,is=-1%%")
    p.add_argument("--allow-missing", action="store_true", help="a baseline row absent from the results is not a failure")
    args = p.parse_args(argv)
    tolerances = parse_tolerances(args.tolerance)
    if (args.write_baseline is None) == (not args.baseline):
        raise UserError("give --baseline FILE to compare with, or --write-baseline FILE to write one (not both)")
    results = read_all(args.results, "--results")
    no_rows = UserError(f"--results {', '.join(args.results)} holds no rows: the run wrote none; rerun it, or name "
                        "the file or folder its rows went to")
    keep = None
    if args.metrics is not None:
        keep = {m.strip() for m in args.metrics.split(",") if m.strip()}
        unknown = sorted(keep - {r["metric"] for r in results})
        if not keep:
            raise UserError(f"--metrics {args.metrics!r} names no metric: give a comma list such as fid,is (metrics "
                            f"present: {sorted({r['metric'] for r in results})})")
        if unknown:
            raise UserError(f"--metrics {args.metrics!r}: {unknown} not in the results; metrics present: "
                            f"{sorted({r['metric'] for r in results})}")
        results = [r for r in results if r["metric"] in keep]
    if args.write_baseline is not None:
        if not results:
            raise no_rows
        latest = finite(list(_latest(results).values()), f"--write-baseline from {', '.join(args.results)}")
        write_baseline(latest, args.write_baseline)
        print(f"gate: wrote {len(latest)} baseline rows to {args.write_baseline}")
        return 0
    baseline = read_all(args.baseline, "--baseline")
    if keep is not None:
        baseline = [r for r in baseline if r["metric"] in keep]
    finite(baseline, f"--baseline {', '.join(args.baseline)}")
    if not baseline:
        raise UserError(f"--baseline {', '.join(args.baseline)} holds no rows{' of --metrics' if keep else ''}: "
                        "nothing to compare against; give the rows of a reference measurement")
    if not results:
        raise no_rows
    present = {r["metric"] for r in results + baseline}
    absent = sorted(set(tolerances) - present)
    if absent:
        raise UserError(f"--tolerance names metric(s) {absent} found in neither --results nor --baseline; "
                        f"metrics present: {sorted(present)}")
    verdicts = compare(results, baseline, tolerances, allow_missing=args.allow_missing)
    print(format_diff(verdicts))
    bad = failed(verdicts)
    print(f"gate: {'FAIL' if bad else 'pass'} ({sum(v['status'] == 'ok' for v in verdicts)} ok, "
          f"{sum(v['status'] == 'REGRESSION' for v in verdicts)} regressed, "
          f"{sum(v['status'] == 'MISSING' for v in verdicts)} missing)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

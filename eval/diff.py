"""`python -m eval.diff A B`: why two numbers differ. Lists every protocol field two rows differ in, and with
--measure scores the same samples under each differing field of B in turn, so each field's share of the gap is
measured rather than guessed.

    python -m eval.diff runs/a.jsonl runs/b.jsonl --metric fid
    python -m eval.diff results/eval.jsonl:3 published:DMD2@64/nfe1/fid
    python -m eval.diff a.jsonl b.jsonl --metric fd_dinov2 --measure samples.npz --ref dino-pil.npz --ref dino-torch.npz
    python -m eval.diff --published            # the published rows' names

A and B are each a row file (the one row of --metric, narrowed by --model where it holds several), `FILE:LINE`
(that line's row), or `published:NAME` (reports/paper.py: a published row with the protocol its source states).
The protocol is pagoda.rows.PROTOCOL: the reference (name and SHA-256 of its statistics), the extractor and its
weights, the resize and uint8 conventions, the feature dtype, N, the seeds, the label policy, the estimator
parameters, the selection rule, how guidance is paid for, pixel or latent space, the sampling dtype, training on
the evaluator's features and the package versions. A field one row does not record is unknown there and listed
as such (a published row leaves most of them unknown), never counted as a difference.

--measure SAMPLES (the checkpoint or sample set both rows scored; --ref the reference files, found by the names
the rows give) re-measures A's row, then A's protocol with one field set to B's value, for each field that can be
switched on data at hand: resize (with both conventions' references given), N, seeds, labels, the reference, the
estimator parameters and the sampling dtype. Each effect is printed with its share of the gap B - A; what the
single-field effects leave is printed as unexplained (the model, the fields that cannot be switched here, and
their interactions).

Exit status: 0 when the two rows share their protocol (every field both record is equal), 1 when a field differs,
2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pagoda.errors import ArgumentParser, UserError, positive_int, run_cli
from pagoda.rows import check_row, field_text, protocol, protocol_diff, protocol_unknown, text_table

# A row's metric -> the registry metric that makes it.
MAKER = {"precision": "pr", "recall": "pr", "density": "dc", "coverage": "dc"}


# ---------------------------------------------------------------------------------------------
# Reading the two rows.


def _file_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of every row in a JSONL file, each checked by pagoda.rows.check_row."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read as a UTF-8 rows file ({type(e).__name__}): give a .jsonl of result "
                        "rows, FILE:LINE or published:NAME") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, check_row(json.loads(line), f"{path}:{n}")))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}): fix or delete that line") from None
    return out


def _published(name: str, metric: str | None) -> dict:
    """The published row named `name` (reports.paper.published_key; a unique prefix will do, case-insensitive)."""
    from reports.paper import paper_rows, published_key

    rows = {published_key(r): r for r in paper_rows()}
    hits = [k for k in rows if k.lower() == name.lower()] or \
           [k for k in rows if k.lower().startswith(name.lower()) and (metric is None or rows[k]["metric"] == metric)]
    if len(hits) != 1:
        shown = ", ".join(hits[:8]) or "none"
        raise UserError(f"published:{name} matches {len(hits)} published rows ({shown}): name one exactly "
                        "(python -m eval.diff --published lists them)")
    return dict(rows[hits[0]], where=f"published:{hits[0]}")


def pick(spec: str, metric: str | None, model: str | None) -> dict:
    """The row `spec` names (module docstring); UserError naming the candidates when it names several or none."""
    if spec.startswith("published:"):
        return _published(spec.removeprefix("published:"), metric)
    path, line = Path(spec), None
    if not path.exists() and ":" in spec and spec.rpartition(":")[2].isdigit():
        path, line = Path(spec.rpartition(":")[0]), int(spec.rpartition(":")[2])
    if not path.is_file():
        raise UserError(f"{spec} is not a rows file, FILE:LINE or published:NAME: check the path")
    rows = _file_rows(path)
    if line is not None:
        found = [r for n, r in rows if n == line]
        if not found:
            lines = [n for n, _ in rows]
            shown = ", ".join(map(str, lines[:20])) + (f", ... ({len(lines)} rows, the last on line {lines[-1]})"
                                                       if len(lines) > 20 else "")
            raise UserError(f"{path} has no row on line {line}: it has rows on lines {shown or 'none'}")
        return dict(found[0], where=f"{path}:{line}")
    hits = [(n, r) for n, r in rows if "class" not in (r.get("extra") or {})
            and (metric is None or r["metric"] == metric) and (model is None or model in str(r["model"]))]
    if not rows:
        raise UserError(f"{path} holds no rows: give a rows file that eval.run (or bench) wrote, FILE:LINE or "
                        "published:NAME")
    if not hits:
        have = sorted({f"{r['metric']} of {r['model']}" for _, r in rows if "class" not in (r.get("extra") or {})})
        raise UserError(f"{path} holds no row{f' of {metric}' if metric else ''}{f' of model {model}' if model else ''}"
                        f": it holds {', '.join(have[:8]) or 'per-class rows only'}; name one with --metric / "
                        f"--model or {path}:LINE")
    if len(hits) != 1:
        shown = "; ".join(f"line {n}: {r['model']} {r['metric']} {(r.get('extra') or {}).get('selection', '')}"
                          + (f" range {r['extra']['repeat']}" if (r.get("extra") or {}).get("repeat") is not None
                             else "") for n, r in hits[:8])
        narrow = " or ".join(o for o, v in (("--metric", metric), ("--model (it applies to both sides)", model))
                             if v is None)
        raise UserError(f"{path} holds {len(hits)} rows{f' of {metric}' if metric else ''}"
                        f"{f' of model {model}' if model else ''} ({shown}): pick one with {path}:LINE"
                        + (f" or narrow with {narrow}" if narrow else ""))
    return dict(hits[0][1], where=f"{path}:{hits[0][0]}")


# ---------------------------------------------------------------------------------------------
# The comparison.


def field_value(v, field: str = "") -> str:
    """pagoda.rows.field_text of a protocol value; "unknown" for None."""
    return "unknown" if v is None else field_text(field, v)


def _cell_note(a: dict, b: dict) -> list[str]:
    """Notes on what the two rows measure beside their protocol: another data set, resolution or guidance scale
    is another task, model or sampling cell, so the gap is partly that. A side that does not state its guidance
    (a published row) is said to, not called different."""
    out = []
    if None not in (a.get("extractor"), b.get("extractor")) and named(a) != named(b):
        out.append(f"note: the numbers are in different feature spaces (A {named(a)}, B {named(b)}): not on one "
                   "scale, so the gap is not a difference in quality")
    from reports.protocol import dataset_of

    da, db = dataset_of(a), dataset_of(b)
    if None not in (da, db) and da != db:
        out.append(f"note: the rows are of different data sets (A {da}, B {db}): the gap is between two tasks, not "
                   "the protocol's or the models' on one")
    for key, unit in (("resolution", " px"), ("guidance", "")):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if None in (va, vb):
            side, other = ("A", vb) if va is None else ("B", va)
            out.append(f"note: {side} does not state its {key} (the other is at {other:g}{unit}): if they differ, "
                       "part of the gap is that")
        else:
            out.append(f"note: the rows are at different {key} (A {va:g}{unit}, B {vb:g}{unit}): part of the gap "
                       "is that, not protocol")
    return out


def named(row: dict) -> str:
    """The row's metric with the name of its feature space where that differs (`fid (FD-domain)`; reports.protocol:
    FID is Inception's)."""
    from reports.protocol import metric_label
    from reports.tables import NAMES

    label = metric_label(row["metric"], row.get("extractor"), NAMES)
    if label == metric_label(row["metric"], None, NAMES):  # the metric's usual network
        return row["metric"]
    return f"{row['metric']} ({label.removesuffix(' ↓').removesuffix(' ↑')})"


def unknown_fields(row: dict) -> list[str]:
    """pagoda.rows.protocol_unknown without the reference fields for a metric that reads no reference (IS, CLIP
    score: eval.registry)."""
    from eval.registry import METRICS

    metric = METRICS.get(MAKER.get(row["metric"], row["metric"].removesuffix("_class")))
    free = metric is not None and metric.ref is None
    return [k for k in protocol_unknown(row) if not (free and k in ("reference", "reference_sha256"))]


def differing(a: dict, b: dict) -> tuple[dict, dict]:
    """(fields that differ, fields that follow another): {field: (a, b)} from pagoda.rows.protocol_diff, and the
    reference statistics' digest when only it changed beside resize (the same data set, featurised under each
    convention) as following resize."""
    diff = protocol_diff(a, b)
    follows = {}
    if "resize" in diff and "reference_sha256" in diff and a.get("reference") == b.get("reference"):
        follows["reference_sha256"] = diff.pop("reference_sha256")
    return diff, follows


def report(a: dict, b: dict) -> tuple[str, int]:
    """The printed comparison of rows a and b, and the exit status (0: same protocol, 1: a field differs)."""
    lines = [f"A  {a['where']}: {a['model']} {named(a)} = {a['value']:.6g}",
             f"B  {b['where']}: {b['model']} {named(b)} = {b['value']:.6g}",
             f"gap B - A: {b['value'] - a['value']:+.6g}"]
    lines += _cell_note(a, b)
    diff, follows = differing(a, b)
    if diff:
        cells = [dict(field=k, A=field_value(va, k), B=field_value(vb, k)) for k, (va, vb) in diff.items()]
        cells += [dict(field=k, A=field_value(va, k), B=field_value(vb, k) + "  (follows resize: the same data, each convention)")
                  for k, (va, vb) in follows.items()]
        lines += ["", f"{len(diff)} protocol field(s) differ:", text_table(cells, ("field", "A", "B"), str)]
    else:
        lines += ["", "the protocol is the same in every field both rows record: the gap is the models' (and the "
                      "samples')"]
    pa, pb = protocol(a), protocol(b)
    same = [f"{k} {field_value(pa[k], k)}" for k in pa if pa[k] is not None and pa[k] == pb.get(k)]
    if same:
        lines += ["", "same: " + "; ".join(same)]
    for side, row in (("A", a), ("B", b)):
        unknown = unknown_fields(row)
        if unknown:
            lines.append(f"unknown in {side} ({'its source does not state them' if row.get('published') else 'not recorded'}"
                         f"): {', '.join(unknown)}")
    if a.get("published") or b.get("published"):
        for row in (r for r in (a, b) if r.get("published")):
            lines.append(f"published row: {row['source']} (conf {row['extra'].get('conf')})"
                         + (f"; {row['extra']['note']}" if row["extra"].get("note") else ""))
    return "\n".join(lines), 1 if diff else 0


# ---------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m eval.diff`."""
    p = ArgumentParser(prog="python -m eval.diff", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", nargs="?", help="a rows file, FILE:LINE or published:NAME")
    p.add_argument("b", nargs="?", help="a rows file, FILE:LINE or published:NAME")
    p.add_argument("--metric", default=None, help="the metric to compare (picks the row of a file; default: the "
                   "metric of a side that names one row)")
    p.add_argument("--model", default=None, help="pick the row of a file whose model contains this text")
    p.add_argument("--published", action="store_true", help="list the published rows' names and exit")
    p.add_argument("--measure", metavar="SAMPLES", default=None, help="the checkpoint or sample set both rows "
                   "scored: measure each differing field's effect on it")
    p.add_argument("--ref", action="append", default=[], help="reference files the rows name (repeatable; with "
                   "--measure)")
    p.add_argument("--val-ref", action="append", default=[], help="validation references (fdr; with --measure)")
    p.add_argument("--weights-dir", default=None, help="folder of extractor weights (with --measure)")
    p.add_argument("--batch", type=positive_int, default=250, help="images per batch (no effect on results)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_intermixed_args(argv)  # A --model X B: options between the two rows
    if args.published and (args.a or args.b):
        p.error("--published lists the published rows and compares none: drop A B, or drop --published and name "
                "one as published:NAME")
    if args.published:
        from reports.paper import paper_rows, published_key
        print("\n".join(f"published:{published_key(r)}  {r['value']:g}  conf {r['extra']['conf']}"
                        for r in paper_rows()))
        return 0
    if args.a is None or args.b is None:
        p.error("give two rows: A B (rows files, FILE:LINE or published:NAME), or --published")
    if (args.ref or args.val_ref) and not args.measure:
        p.error("--ref / --val-ref are read by --measure only: add --measure SAMPLES or drop them")
    metric = args.metric
    if metric is None:  # the metric of a side that holds one row, else FID
        metric = next((m for m in (_only_metric(spec, args.model) for spec in (args.a, args.b)) if m), None)
    a, b = pick(args.a, metric or "fid", args.model), pick(args.b, metric or "fid", args.model)
    if metric is None:  # said once both rows are found (a bad input is one error line)
        print("note: no --metric, and neither side is a single row: comparing fid (--metric picks another)",
              file=sys.stderr)
    if a["metric"] != b["metric"]:
        raise UserError(f"A ({a['where']}) is {a['metric']} but B ({b['where']}) is {b['metric']}: compare rows of one "
                        "metric (name it with --metric, or pick the lines with FILE:LINE)")
    text, status = report(a, b)
    print(text)
    if args.measure:
        if a.get("published"):
            raise UserError(f"--measure re-measures A's protocol, but A ({a['where']}) is a published row: put "
                            "your own row first")
        from eval.gap import measure  # it imports this module

        print("\n" + measure(a, b, args.measure, args.ref, args.val_ref, weights_dir=args.weights_dir,
                             batch=args.batch))
    return status


def _only_metric(spec: str, model: str | None) -> str | None:
    """The metric of the one row `spec` names or holds, None when it holds several (or is not readable: pick says)."""
    try:
        return pick(spec, None, model)["metric"]
    except UserError:
        return None


if __name__ == "__main__":
    sys.exit(run_cli(main))

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
from dataclasses import replace
from pathlib import Path

from pagoda.errors import ArgumentParser, UserError, positive_int, run_cli
from pagoda.rows import check_row, field_text, protocol, protocol_diff, protocol_unknown, text_table

# A row's metric -> the registry metric that makes it.
MAKER = {"precision": "pr", "recall": "pr", "density": "dc", "coverage": "dc"}
# Fields --measure can switch on the same samples (the others are properties of a model or of another run).
MEASURABLE = ("resize", "num_samples", "seeds", "labels", "reference", "dtype", "subset_size", "subsets",
              "kid_seed", "splits", "style", "k", "bootstrap")
# Row `extra` estimator entries -> eval.registry.Estimators fields (k: pr_k or dc_k by the metric).
ESTIMATOR_FIELDS = {"subset_size": "kid_subset", "subsets": "kid_subsets", "kid_seed": "kid_seed",
                    "splits": "is_splits", "style": "is_style", "bootstrap": "bootstrap"}


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


def _text(v, field: str = "") -> str:
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


def dataset_of(row: dict) -> str | None:
    """The data set a row was measured on: what a published row states (extra.dataset), ImageNet for a catalog
    reference (eval.catalog), photos for the bundled set's (photos:SPLIT:RES), else None (a file of its own)."""
    from eval.catalog import NAMED

    ref = str(row.get("reference") or "")
    return (row.get("extra") or {}).get("dataset") or ("ImageNet" if ref in NAMED else
                                                       "photos" if ref.split(":")[0] == "photos" else None)


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
        cells = [dict(field=k, A=_text(va, k), B=_text(vb, k)) for k, (va, vb) in diff.items()]
        cells += [dict(field=k, A=_text(va, k), B=_text(vb, k) + "  (follows resize: the same data, each convention)")
                  for k, (va, vb) in follows.items()]
        lines += ["", f"{len(diff)} protocol field(s) differ:", text_table(cells, ("field", "A", "B"), str)]
    else:
        lines += ["", "the protocol is the same in every field both rows record: the gap is the models' (and the "
                      "samples')"]
    pa, pb = protocol(a), protocol(b)
    same = [f"{k} {_text(pa[k], k)}" for k in pa if pa[k] is not None and pa[k] == pb.get(k)]
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
# --measure: the effect of each field on the same samples.


def setting_of(row: dict) -> dict:
    """What a re-measurement needs of a row's protocol: the metric, extractor, resize, estimators, N, first seed,
    labels, reference name, dtype and the sampling cell."""
    p = protocol(row)
    seeds = p.get("seeds")
    start = int(seeds.split("-")[0]) if isinstance(seeds, str) and seeds.split("-")[0].isdigit() else 0
    return dict(p, start=start, metric=row["metric"], guidance=row.get("guidance"), sampler=row.get("sampler"),
                steps=row.get("steps"))


def _estimators(s: dict):
    from eval.registry import Estimators

    est, maker = Estimators(), MAKER.get(s["metric"], s["metric"])
    values = {ESTIMATOR_FIELDS[k]: s[k] for k in ESTIMATOR_FIELDS if s.get(k) is not None}
    if s.get("k") is not None and maker in ("pr", "dc"):
        values[f"{maker}_k"] = s["k"]
    return replace(est, **values)


def value_of(s: dict, samples: str, refs: dict, val_refs: list[str], *, weights_dir, batch: int) -> float:
    """The row metric of `samples` measured under setting `s` (setting_of, a field possibly switched)."""
    import torch

    from eval.api import Evaluator
    from eval.extractors import EXTRACTORS
    from eval.registry import METRICS
    from eval.run import run
    from eval.sources import Window, open_source

    maker, name = MAKER.get(s["metric"], s["metric"]), s["extractor"]
    files = refs.get(s["reference"]) if s.get("reference") else []
    if files is None:
        raise UserError(f"--measure needs the reference {s['reference']!r} a row names: pass its file with --ref")
    fdr = name.split("+") if maker == "fdr" else None
    offers = fdr is None and s.get("resize") and "resize" in EXTRACTORS[name].options
    ev = Evaluator(files, [maker], extractor=None if fdr else {METRICS[maker].role: name},
                   resize=s["resize"] if offers else None,
                   estimator=_estimators(s), batch=batch, allow_small=True, weights_dir=weights_dir,
                   val_ref=val_refs if fdr else (), fdr_extractors=fdr)
    if samples.endswith(".safetensors"):
        rows = run(ev, ckpts=[samples], images=[], num_samples=s["num_samples"], seed=s["start"],
                   labels=s.get("labels") or "seed", guidance=[s["guidance"]], samplers=[s["sampler"]],
                   steps=[s["steps"]], dtype=getattr(torch, s.get("dtype") or "float32"))
    else:
        store = open_source(samples)
        n = s["num_samples"] or store.num_samples
        if s["start"] + n > store.num_samples:
            raise UserError(f"--measure {samples} holds {store.num_samples} images, fewer than the {s['start'] + n} "
                            f"that N = {n} from image {s['start']} needs: give the sample set behind the rows")
        rows = ev.measure(Window(store, s["start"], n))
    return next(r["value"] for r in rows if r["metric"] == s["metric"] and "class" not in r["extra"])


def measure(a: dict, b: dict, samples: str, ref_files: list[str], val_refs: list[str], *, weights_dir,
            batch: int) -> str:
    """The --measure table: A re-measured, then each switchable differing field set to B's value."""
    from eval.measure import References

    if None not in (a.get("resolution"), b.get("resolution")) and a["resolution"] != b["resolution"]:
        raise UserError(f"--measure scores A's samples under B's protocol, but B ({b['where']}) is at "
                        f"{b['resolution']} px and A at {a['resolution']} px: B's reference cannot score A's "
                        "samples; compare rows of one resolution")
    refs = References(ref_files, weights_dir=weights_dir)
    by_name: dict[str, list[str]] = {}
    for path in ref_files:
        by_name.setdefault(refs.name(path), []).append(path)
    diff, _ = differing(a, b)
    sa, sb = setting_of(a), setting_of(b)
    if (a.get("extra") or {}).get("selection", "single") != "single":
        raise UserError(f"--measure re-measures one run, but A ({a['where']}) is a {a['extra']['selection']} row: "
                        "compare single rows (extra.selection single, e.g. one --repeat range)")
    for name in {sa.get("reference")} | ({sb.get("reference")} if "reference" in diff else set()):
        if name is not None and name not in by_name:
            raise UserError(f"--measure needs the reference {name!r} a row names: pass its file with --ref (given: "
                            f"{', '.join(sorted(by_name)) or 'none'})")
    if samples.endswith((".safetensors", ".npz")) and not Path(samples).is_file():  # before any weights load
        raise UserError(f"--measure {samples} does not exist: give the checkpoint or sample set both rows scored")
    if not samples.endswith(".safetensors"):  # a sample set must hold what A and B's N and seeds ask of it
        from eval.sources import open_source

        held = open_source(samples).num_samples
        need = {side: s["start"] + s["num_samples"] for side, s in (("A", setting_of(a)), ("B", setting_of(b)))
                if s.get("num_samples")}
        short = {side: n for side, n in need.items() if n > held}
        if short:
            raise UserError(f"--measure {samples} holds {held} images, but "
                            + " and ".join(f"{side}'s N and seeds need {n}" for side, n in short.items())
                            + ": give the sample set behind the rows")
    if samples.endswith(".safetensors") and a.get("resolution") is not None:
        from pagoda.checkpoint import read_meta  # the header only

        made = read_meta(samples).get("resolution")
        if made is not None and made != a["resolution"]:
            raise UserError(f"--measure {samples} makes {made} px images, but A ({a['where']}) is at "
                            f"{a['resolution']} px: give the checkpoint A was measured on")
    base = value_of(sa, samples, by_name, val_refs, weights_dir=weights_dir, batch=batch)
    if abs(base - a["value"]) > 1e-6 * max(1.0, abs(a["value"])):
        raise UserError(f"--measure {samples} under A's protocol gives {base:.6g}, but A ({a['where']}) says "
                        f"{a['value']:.6g}: these are not the samples behind A; give the checkpoint or sample set A "
                        "was measured on")
    gap, cells, total = b["value"] - a["value"], [], 0.0
    for field in diff:
        if field not in MEASURABLE:
            cells.append(dict(field=field, change=f"{_text(diff[field][0], field)} -> {_text(diff[field][1], field)}",
                              effect="not measurable here", share="-"))
            continue
        value = value_of(dict(sa, **{field: sb[field]}, start=sb["start"] if field == "seeds" else sa["start"]),
                         samples, by_name, val_refs, weights_dir=weights_dir, batch=batch)
        total += value - base
        cells.append(dict(field=field, change=f"{_text(diff[field][0], field)} -> {_text(diff[field][1], field)}",
                          effect=f"{value - base:+.6g}", share=_share(value - base, gap)))
    lines = [f"measured on {samples}: A's protocol gives {base:.6g} (the row says {a['value']:.6g})"]
    if cells:
        lines.append(text_table(cells, ("field", "change", "effect", "share"), str))
    lines.append(f"unexplained by the fields above: {gap - total:+.6g} ({_share(gap - total, gap)} of the gap "
                 f"{gap:+.6g}): the models, fields not measurable here, and interactions")
    return "\n".join(lines)


def _share(effect: float, gap: float) -> str:
    return f"{100 * effect / gap + 0.0:.1f}%" if gap else "- (no gap)"  # + 0.0: no "-0.0%"


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

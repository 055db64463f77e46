"""What the report says about protocol: metric names by feature space, the data set behind a row, the protocol a
table's rows share, the rows that differ from it, and the footnote of a published row.

FID is Inception's name: a Frechet distance in another feature space is `FD-<space>` (FD-domain, FD-DINOv2 for
EDM2's ViT-L/14), and any other metric measured outside its usual network names that network. Columns are keyed by
(metric, space), so a photos-domain FD never shares a column with an ImageNet FID. Imports only pagoda.rows.
"""

from __future__ import annotations

from collections import Counter

from pagoda.rows import PROTOCOL, field_text, protocol

# The network each metric is named after when no space is written (METHOD.md section 5).
USUAL = {"fid": "inception", "sfid": "inception", "kid": "inception", "is": "inception", "precision": "inception",
         "recall": "inception", "density": "inception", "coverage": "inception", "fd_dinov2": "dinov2",
         "clip": "clip", "cmmd": "clip-vitl14-336"}
FRECHET = ("fid", "fd_dinov2")
# Fields left out of the comparisons that mark a row: they vary from row to row by design, have a column of their
# own (Guid., Sel., Space) or say nothing of how the number was measured. An FDr row's references are its own
# (training and validation statistics), stated in the FDr note.
NOT_MARKED = ("versions", "trained_on_evaluator", "guidance_cost", "selection", "space")
FDR_OWN = ("reference", "reference_sha256")
NOT_STATED = ("versions",)
# Fields that follow from the feature network: a row of another network than the table's stands in a column of its
# own (headed by its space), so these are no difference of protocol there; within one network they are.
OF_EXTRACTOR = ("extractor", "extractor_sha256", "resize", "feature_dtype")
# A row that aggregates several runs (mean-of-K, min-of-K of eval.run --repeat) records the union of their seed
# ranges: its Sel. cell says so, and it neither sets the table's seeds nor is marked for them.
OF_RUNS = ("seeds",)


def _aggregate(row: dict) -> bool:
    return (row.get("extra") or {}).get("selection") not in (None, "single")


def space_of(row: dict) -> str | None:
    """The feature space a row's number lives in: its extractor (`a+b` for FDr over several)."""
    return row.get("extractor")


def metric_label(metric: str, space: str | None, names: dict) -> str:
    """The column head of `metric` measured in `space`: NAMES' head when the space is the metric's usual network (or
    unknown), FD-<space> for a Frechet distance elsewhere, else the head with the space in parentheses; FDr_k with
    its k."""
    if metric == "fdr":
        return f"FDr_{len(space.split('+')) if space else 'k'}"
    head = names.get(metric, metric)
    if space in (None, USUAL.get(metric)) or (metric == "fid" and space.startswith("inception")):
        return head
    arrow = " ↓" if head.endswith("↓") else " ↑" if head.endswith("↑") else ""
    if metric in FRECHET:
        return f"FD-{'DINOv2' if space == 'dinov2' else space}{arrow}"
    return f"{head.removesuffix(arrow)} ({space}){arrow}"


def dataset_of(row: dict) -> str | None:
    """The data set a row is measured on: a published row's `extra.dataset`, else its reference's (the first part
    of a data-set spec such as photos:heldout:16; ImageNet for the catalog's ADM and EDM2 references); None for a
    reference file of the user's own, whose data set is not known (eval.diff says nothing of it)."""
    if row.get("published"):
        return (row.get("extra") or {}).get("dataset") or "?"
    ref = str(row.get("reference") or "")
    if ref.startswith(("imagenet", "edm2-img")):
        return "ImageNet"
    return ref.split(":")[0] if ":" in ref else None


def table_protocol(rows: list[dict]) -> dict:
    """{resolution: {field: the value most of `rows` at that resolution record}}: the protocol a table states, from
    which a row is marked when it differs (ties: _mode). FDr rows do not vote on the reference, nor
    aggregate rows (mean-of-K, ...) on the seeds."""
    out = {}
    for r in rows:
        skip = (FDR_OWN if r["metric"] == "fdr" else ()) + (OF_RUNS if _aggregate(r) else ())
        out.setdefault(r.get("resolution"), []).append({k: v for k, v in protocol(r).items() if k not in skip})
    return {res: {k: _mode(Counter(_key(p[k]) for p in ps if p.get(k) is not None))
                  for k in {k for p in ps for k, v in p.items() if v is not None}}
            for res, ps in out.items()}


def _mode(counts: Counter):
    """The most frequent value; of several as frequent, the first in sorted text order (not the first met: the
    table states the same protocol whatever order its files were read in)."""
    top = max(counts.values())
    return min((v for v, c in counts.items() if c == top), key=str)


def _key(v):
    """A hashable form of a protocol value (versions is a dict)."""
    return tuple(sorted(v.items())) if isinstance(v, dict) else v


def differs(row: dict, modes: dict, skip=NOT_MARKED) -> dict:
    """{field: (the row's value, the table's)} where `row` records another value than its resolution's mode; the
    OF_EXTRACTOR fields only where the row's extractor is the mode's, the seeds only of a single run's row."""
    mode, skip = modes.get(row.get("resolution"), {}), skip + (FDR_OWN if row.get("metric") == "fdr" else ())
    skip += OF_RUNS if _aggregate(row) else ()
    if row.get("extractor") is not None and mode.get("extractor") not in (None, row.get("extractor")):
        skip += OF_EXTRACTOR
    return {k: (v, mode[k]) for k, v in protocol(row).items()
            if k not in skip and v is not None and k in mode and _key(v) != mode[k]}


def stated(modes: dict) -> str:
    """The table's protocol as one line: each field once if every resolution has one value, else per resolution."""
    fields = {k for m in modes.values() for k in m if k not in NOT_STATED}
    parts = []
    for k in sorted(fields, key=_order):
        values = {res: m.get(k) for res, m in modes.items()}
        if len(set(values.values())) == 1:
            parts.append(f"{k} {value_text(k, next(iter(values.values())))}")
        else:
            parts.append(f"{k} " + " | ".join(f"{value_text(k, v)} ({res} px)" for res, v in sorted(
                values.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)) if v is not None))
    return "; ".join(parts)


def _order(k: str) -> tuple:
    keys = list(PROTOCOL)
    return (keys.index(k) if k in keys else len(keys), k)


def value_text(k: str, v) -> str:
    """pagoda.rows.field_text of a protocol value, also in the hashable form the modes keep (_key: versions as a
    tuple of pairs)."""
    return field_text(k, dict(v) if isinstance(v, tuple) else v)


def published_note(row: dict, modes: dict) -> str:
    """A published row's footnote: its source and grade, its note, the protocol fields where it differs from our rows
    at its resolution (or, where we have none there, at any), and what its source leaves unknown."""
    extra = row.get("extra") or {}
    ours = modes.get(row.get("resolution")) or next(iter(modes.values()), {})
    theirs = protocol(row)
    diff = [f"{k} {value_text(k, v)} (ours {value_text(k, ours[k])})" for k, v in theirs.items()
            if v is not None and k in ours and _key(v) != ours[k] and k not in NOT_MARKED]
    unknown = [k for k, v in theirs.items() if v is None and k not in NOT_STATED]
    conf = extra.get("conf")
    text = f"{row['model']}: {row['source']}; conf {conf}" + (" (unconfirmed)" if conf == "C" else "")
    if extra.get("note"):
        text += f"; {extra['note']}"
    if diff:
        text += "; differs from ours in " + ", ".join(diff)
    if unknown:
        text += "; not stated: " + ", ".join(unknown)
    return text

"""The report's tables, in the papers' layouts, built from rows and rendered as Markdown and LaTeX (booktabs).

A Table holds text cells only; every number cell carries its sample count (`n=`) and, where the row has one,
its confidence interval. Cells: MISSING = a metric the table asks for that no row measured; blank = the
model has no row at that resolution. Rows are expected deduplicated (rows.latest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pagoda.rows import SAMPLING_COST_METRICS, TRAIN_METRICS
from reports.protocol import (
    FRECHET,
    dataset_of,
    differs,
    metric_label,
    published_note,
    space_of,
    stated,
    table_protocol,
    value_text,
)

MISSING = "—"
QUALITY = ("fid", "fdr", "is", "precision", "recall")
OTHER_QUALITY = ("sfid", "kid", "density", "coverage", "clip", "cmmd")
NAMES = {"fid": "FID ↓", "is": "IS ↑", "precision": "Prec. ↑", "recall": "Rec. ↑", "fd_dinov2": "FD-DINOv2 ↓",
         "sfid": "sFID ↓", "kid": "KID ↓", "density": "Dens. ↑", "coverage": "Cov. ↑", "clip": "CLIP ↑",
         "cmmd": "CMMD ↓", "fdr": "FDr_k", "nfe": "NFE", "latency_ms": "Latency ms (p90)", "img_per_s": "img/s",
         "params": "Params", "gflops_per_image": "GFLOPs/img", "peak_mem_mb": "Peak MB",
         "drift_rms": "Drift RMS ↓", "drift_psnr_db": "Drift PSNR dB ↑", "frame_rms": "Frame RMS ↓",
         "train_step_ms": "Step ms", "train_step_gflops": "Step GFLOPs/img", "pairs_cost_ratio": "Cost ratio"}
METHOD_ORDER = ("pagoda", "pd", "dpmpp2m", "heun", "ddim", "samples")
BATCH_FREE = ("nfe", "params", "gflops_per_image")  # cost metrics that do not depend on the batch
TIMED_IMAGES = ("latency_ms", "img_per_s")  # timed rows whose num_samples = images timed = batch x reps
NOTE_IMAGES = "n= images timed for the latency and img/s (batch × timed repetitions)"
NOTE_STEPS = "n= timed training steps (each of `batch` images)"
NOTE_MISSING = f"{MISSING} not measured (published rows: not reported)"
NOTE_UNMEASURED = f"{MISSING} not measured"  # a table without published rows


@dataclass
class Table:
    """A titled table of text cells: `sections` = [(label or None, body lines)], each line one cell per
    column; `groups` = [(label, span)] spanning header cells above `columns`; the first `label_cols`
    columns are text, the rest numbers. `unavailable` (the reason) replaces the body of a table that no row
    feeds; `published` counts the published reference rows the table shows."""

    title: str
    columns: list[str] = field(default_factory=list)
    sections: list[tuple[str | None, list[list[str]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    groups: list[tuple[str, int]] | None = None
    label_cols: int = 0
    unavailable: str | None = None
    published: int = 0
    grey: list[tuple[str | None, int]] = field(default_factory=list)  # (section label, line index): greyed lines

    def cells(self) -> list[str]:
        """Every body cell (for notes that depend on what the table shows)."""
        return [c for _, body in self.sections for line in body for c in line]


# ---------------------------------------------------------------------------------------------
# Cells.


def num(v: float, digits: int | None = None) -> str:
    """`v` with `digits` decimals, else by size: 1 decimal from 100, 2 from 0.1, else 3 significant digits."""
    if digits is not None:
        return f"{v:.{digits}f}"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"


def count(n: float) -> str:
    """A count in short form: 250, 1k, 1.5k, 50k, 296M, 1.2G."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def label(v) -> str:
    """A label cell: '' for None, numbers as %g (1.0 -> '1'), the rest as str."""
    return "" if v is None else f"{v:g}" if isinstance(v, (int, float)) else str(v)


def cell(row: dict | None, with_n: bool = True) -> str:
    """The cell of one row: value (with the quoted decimals and ≈ of a published row; latency with its p90,
    params in short form), then [ci_low, ci_high] and (if `with_n`) n=; MISSING for None."""
    if row is None:
        return MISSING
    v, extra, metric = row["value"], row.get("extra") or {}, row["metric"]
    text = count(v) if metric == "params" else label(v) if metric == "nfe" else \
        ("≈" if extra.get("approx") else "") + num(v, extra.get("digits"))
    if metric == "latency_ms" and extra.get("p90_ms") is not None:
        text += f" ({num(extra['p90_ms'])})"
    if row.get("ci_low") is not None and row.get("ci_high") is not None:
        text += f" [{num(row['ci_low'])}, {num(row['ci_high'])}]"
    return text + (f" n={n_cell(row)}" if sample_count(row) and with_n else "")


def n_cell(row: dict) -> str:
    """sample_count in short form; for a row aggregated over K ranges (eval.run --repeat: selection mean-of-K,
    min-of-K, max-of-K) "Kx" before it, so 3x200 says 600 samples stand behind one value of 200 each."""
    n, selection = sample_count(row), (row.get("extra") or {}).get("selection") or ""
    k = selection.rsplit("-of-", 1)[-1] if "-of-" in selection else ""
    return (f"{k}x" if k.isdigit() else "") + count(n) if n else ""


def sample_count(row: dict) -> int | None:
    """What a cell's n= counts: for latency and img/s the images timed (num_samples, else batch x extra.reps:
    bench rows without num_samples), for a training step the steps timed (extra.reps), else num_samples
    (or extra.reps)."""
    extra = row.get("extra") or {}
    if row["metric"] in TIMED_IMAGES:
        if row.get("num_samples"):
            return row["num_samples"]
        return row["batch"] * extra["reps"] if row.get("batch") and extra.get("reps") else None
    if row["metric"] in TRAIN_METRICS:
        return extra.get("reps")
    return row.get("num_samples") or extra.get("reps")


def field_of(row: dict, key: str):
    """A row field, or else the `extra` entry of that name (factor, kind, compile)."""
    return row[key] if key in row else (row.get("extra") or {}).get(key)


def sort_key(method, *rest) -> tuple:
    """Order of table lines: METHOD_ORDER first, then the other fields with None first."""
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, method or "") + tuple((v is not None, v) for v in rest)


def with_cfg(row: dict) -> bool:
    """True for a row sampled with classifier-free guidance (guidance not None or 1)."""
    return row.get("guidance") not in (None, 1)


def res_text(r) -> str:
    """'64 px' ('res. ?' for a row without resolution)."""
    return f"{r} px" if r is not None else "res. ?"


# ---------------------------------------------------------------------------------------------
# Quality tables: one line per (model, method, sampler, steps, guidance), metric columns per resolution.

LINE = ("model", "method", "sampler", "steps", "guidance")
LINE_COLS = ["Source", "Model", "Method", "Sampler", "Steps", "w", "NFE", "Space", "Guid.", "Sel.", "Trained", "n"]
TRAINED_ON = "‡"  # a cell whose model was trained on that metric's own features


def trained(row: dict) -> str:
    """What training a row's model had, from its `extra`: optimizer steps and the RMS weight change from the start
    in lr units (pagoda.schedule.displacement_lr), e.g. "256 / 29.6"; "" where the row does not say."""
    extra = row.get("extra") or {}
    step, disp = extra.get("train_step"), extra.get("displacement_lr")
    if step is None:
        return ""
    return f"{step:g}" + (f" / {disp:.1f}" if isinstance(disp, (int, float)) else "")


@dataclass
class _Quality:
    """What quality_table collects while it lays out lines: sections, marks and footnotes."""

    modes: dict
    val_names: set
    sections: dict = field(default_factory=dict)
    grey: list = field(default_factory=list)
    marks: list = field(default_factory=list)  # our lines' "differs from the table's protocol" notes
    sources: list = field(default_factory=list)  # published footnotes, deduplicated


def quality_table(rows: list[dict], paper: list[dict], metrics: tuple[str, ...], title: str) -> Table:
    """Our rows of `metrics` beside the published rows at the resolutions we measured: one column per (resolution,
    metric, feature space) headed by the space's name (reports.protocol.metric_label), our lines without / with
    CFG, the published ones in a section of their own, greyed where their protocol differs from ours. Unavailable
    when no row of ours has one of `metrics`."""
    ours = [r for r in rows if r["metric"] in metrics]
    if not ours:
        return Table(title, unavailable=f"no {'/'.join(metrics)} rows")
    res = sorted({r.get("resolution") for r in ours}, key=lambda r: (r is None, r or 0))
    pub = [r for r in paper if r["metric"] in metrics and r.get("resolution") in res]
    cols = list(dict.fromkeys(_column(r) for r in sorted(  # one column per head: an unknown space reads as usual
        ours + pub, key=lambda r: (metrics.index(r["metric"]), bool(r.get("published"))))))
    cols += [(m, metric_label(m, None, NAMES)) for m in metrics if m not in {c[0] for c in cols}]  # unmeasured: —
    cols.sort(key=lambda c: metrics.index(c[0]))
    q = _Quality(table_protocol(ours), {v for r in ours if r["metric"] == "fdr"
                                        for v in ((r.get("extra") or {}).get("val_reference") or {}).values()})
    by_line = {}
    for r in ours + pub:  # a published model's NFE variants are lines of their own (no sampler to tell them apart)
        key = (bool(r.get("published")),) + tuple(r.get(k) for k in LINE)
        variant = (r.get("nfe") or 0,) if r.get("published") else _variant(r, q.modes)
        by_line.setdefault(key + (variant,), []).append(r)
    # A resolution shows the heads some row has there, and a metric no row has there (as —): the published
    # ImageNet FID column stands at 64 px only, where published rows are, not empty beside a 16 px FD-domain.
    shown = {R: {_column(r) for r in ours + pub if r.get("resolution") == R} for R in res}
    cols_at = {R: [c for c in cols if c in shown[R] or c[0] not in {m for m, _ in shown[R]}] for R in res}
    for line in sorted(by_line, key=lambda line: _line_order(line, by_line[line])):
        _add_line(q, by_line[line], res, cols_at, _pub_section(ours, pub))
    table = Table(title, LINE_COLS + [head for R in res for _, head in cols_at[R]],
                  [(k, v) for k, v in q.sections.items() if v], groups=[("", len(LINE_COLS))] +
                  [(res_text(R), len(cols_at[R])) for R in res], label_cols=len(LINE_COLS), published=len(pub),
                  grey=q.grey)
    table.notes = _quality_notes(table, ours, pub, q, cols)
    return table


def _variant(row: dict, modes: dict) -> tuple:
    """What sets a line of ours apart from another of the same model and sampling setup: the selection rule, the
    range of eval.run --repeat, and each protocol field in which the row differs from the table's (marked *k)."""
    extra = row.get("extra") or {}
    found = differs(row, modes)
    return (extra.get("selection") not in (None, "single"), str(extra.get("selection")), extra.get("repeat", -1),
            tuple(sorted((k, value_text(k, v)) for k, (v, _) in found.items())))


def _selection(extra: dict) -> str:
    """The Sel. cell: the selection rule, with the range of eval.run --repeat ("single, range 2")."""
    sel = extra.get("selection") or ""
    return sel + (f", range {extra['repeat']}" if extra.get("repeat") is not None else "")


def _pub_section(ours: list[dict], pub: list[dict]) -> str:
    """The published section's label: the data set, and a warning when it is not ours."""
    theirs, mine = {dataset_of(r) for r in pub}, {dataset_of(r) for r in ours}
    if theirs <= mine:
        return "published"
    return f"published: {', '.join(sorted(theirs))} (another data set than ours: not comparable with the lines above)"


def _add_line(q: _Quality, lr: list[dict], res: list, cols_at: dict, pub_section: str) -> None:
    """Lay out one table line (the rows `lr` of one model and sampling setup) into q.sections, under the columns
    `cols_at` {resolution: [(metric, head)]}."""
    first, published = lr[0], bool(lr[0].get("published"))
    at = {(r.get("resolution"), *_column(r)): r for r in lr}
    has = {r.get("resolution") for r in lr}
    if published:
        note = published_note(first, q.modes)
        q.sources += [note] if note not in q.sources else []
        src = f"published [{q.sources.index(note) + 1}]" + (" C" if first["extra"].get("conf") == "C" else "")
        section = pub_section
    else:
        found = {k: v for r in lr for k, v in differs(r, q.modes).items()}
        src = "validation" if first["model"] in q.val_names else "ours"
        if found:
            q.marks.append(", ".join(f"{k} {value_text(k, v)} (table: {value_text(k, t)})" for k, (v, t) in found.items()))
            src += f" *{len(q.marks)}"
        section = "with CFG" if with_cfg(first) else "without CFG"
    nfe = next((r["nfe"] for r in lr if r.get("nfe") is not None), None)
    ns = {n_cell(r) if r.get("num_samples") else None for r in lr}
    n = next(iter(ns)) if len(ns) == 1 and None not in ns else ""  # one n per line, else per cell
    body = [_cell(at.get((R, m, sp)), not n) if R in has else "" for R in res for m, sp in cols_at[R]]
    extra = first.get("extra") or {}
    line = [src] + [label(first.get(k)) for k in LINE] + [label(nfe), extra.get("space") or "",
                                                          extra.get("guidance_cost") or "", _selection(extra),
                                                          trained(first), n] + body
    lines = q.sections.setdefault(section, [])
    if published and any(k in note for k in ("differs from ours",)):
        q.grey.append((section, len(lines)))
    lines.append(line)


def _column(row: dict) -> tuple[str, str]:
    """(metric, head) of the column a row's number stands in: its metric named by its feature space."""
    return row["metric"], metric_label(row["metric"], space_of(row), NAMES)


def _cell(row: dict | None, with_n: bool) -> str:
    """cell(), with TRAINED_ON where the row's model was trained on that metric's features."""
    text = cell(row, with_n)
    return text + TRAINED_ON if row is not None and (row.get("extra") or {}).get("trained_on_evaluator") else text


def _line_order(line: tuple, rows: list[dict]) -> tuple:
    """Ours before published, then by method, lowest resolution, model, sampler, steps, guidance."""
    published, model, method, *rest = line
    return (published,) + sort_key(method, min(r.get("resolution") or 0 for r in rows), model, *rest)


def _quality_notes(table: Table, ours: list[dict], pub: list[dict], q: _Quality, cols: list) -> list[str]:
    cells, notes = table.cells(), ["n: number of samples behind every number of the line (a line without one "
                                   "gives n= in each cell); [lo, hi]: the row's confidence interval; "
                                   "↓ lower is better, ↑ higher is better; w: guidance scale; Guid.: how guidance "
                                   "is paid for (x2: CFG, two network rows per step; in-1: inside one call); Sel.: "
                                   "how the number was chosen (single run, min-of-K, mean-of-K, best-checkpoint)"]
    if MISSING in cells:
        notes.append(NOTE_MISSING if pub else NOTE_UNMEASURED)
    if "" in cells:
        notes.append("blank: the model has no rows at that resolution")
    if any(trained(r) for r in ours):
        notes.append("Trained: the checkpoint's optimizer steps (a PD student's: its last round's) / how far training "
                     "moved its weights, RMS of (theta - theta_0) / lr in lr units (a model near 0 is barely trained)")
    spaces = sorted({head.removesuffix(" ↓") for m, head in cols if m in FRECHET and head.startswith("FD-")})
    if spaces:
        notes.append(f"{', '.join(spaces)}: the Frechet distance in that network's features (FID is Inception's; "
                     "a number in another space is not an FID)")
    fdr = [r for r in ours if r["metric"] == "fdr"]
    if fdr:
        train = sorted({r.get("reference") for r in fdr if r.get("reference")})
        val = sorted({v for r in fdr for v in ((r.get("extra") or {}).get("val_reference") or {}).values()})
        notes.append("FDr_k: FD(model, training set) / FD(validation set, training set), averaged over k feature "
                     f"spaces (arXiv 2604.28190); {'the validation line' if any(r['model'] in q.val_names for r in ours) else 'the validation set'} "
                     "scores 1; below 1, a model is closer to the "
                     f"training images than unseen real images are; training statistics {', '.join(train)}, "
                     f"validation statistics {', '.join(val)}")
    notes.append("protocol of our rows (the value most rows record, per resolution where it varies): "
                 + stated(q.modes))
    notes += [f"*{i}: differs from that protocol in {text}" for i, text in enumerate(q.marks, 1)]
    if TRAINED_ON in "".join(cells):
        notes.append(f"{TRAINED_ON}: the model was trained on this metric's own features: not a held-out test")
    if any(r.get("resolution") is not None for r in ours if r.get("extractor") == "domain") and len(
            {r.get("resolution") for r in ours}) > 1:
        notes.append("the domain extractor resizes every image to its own input size (32 px for the bundled "
                     "classifier) before featurising: each resolution is scored against photos of its own size, "
                     "but all of them at that one scoring size")
    if pub:
        notes.append("published: shown at the resolutions measured here, in their own section; grey: its protocol "
                     "differs from ours (the footnote says where); C: unconfirmed from its authors' own text; "
                     "≈ approximate")
    return notes + [f"[{i}] {s}" for i, s in enumerate(q.sources, 1)]


# ---------------------------------------------------------------------------------------------
# Cost tables: never mixing devices, dtypes or compilation in one table.

COST_LINE = ("model", "method", "sampler", "steps", "guidance", "resolution", "batch")
TRAIN_LINE = ("model", "method", "resolution", "factor", "batch")
RATIO_LINE = ("model", "method", "kind", "device", "dtype")
COLS = {"model": "Model", "method": "Method", "sampler": "Sampler", "steps": "Steps", "guidance": "w",
        "resolution": "Res.", "batch": "Batch", "factor": "Factor", "kind": "Kind", "device": "Device",
        "dtype": "dtype", "source": "Grown from"}


def pivot(rows: list[dict], line_of: tuple[str, ...], metrics: tuple[str, ...], title: str) -> Table:
    """One line per distinct values of the `line_of` fields (model and method first, batch last), one column
    per metric. A BATCH_FREE metric without a row at a line's batch shows the row of the same line at its
    smallest other batch."""
    def key(r: dict) -> tuple:
        return tuple(field_of(r, k) for k in line_of)

    at = {(key(r), r["metric"]): r for r in rows}
    free = {}
    for r in sorted(rows, key=lambda r: -(r.get("batch") or 0)):  # the smallest batch is written last
        if r["metric"] in BATCH_FREE:
            free[key(r)[:-1], r["metric"]] = r
    own = {key(r) for r in rows if r["metric"] not in BATCH_FREE}
    lines = own | {key(r) for r in rows if key(r)[:-1] not in {k[:-1] for k in own}}
    res = line_of.index("resolution") if "resolution" in line_of else None
    lines = sorted(lines, key=lambda line: sort_key(line[1], None if res is None else line[res], *line))
    body = [[label(v) for v in line] + [cell(at.get((line, m)) or free.get((line[:-1], m))) for m in metrics]
            for line in lines]
    return Table(title, [COLS[k] for k in line_of] + [NAMES[m] for m in metrics], [(None, body)],
                 label_cols=len(line_of))


def setting_of(row: dict) -> tuple:
    """What a cost depends on besides the model: (device, dtype, extra.compile)."""
    return row.get("device"), row.get("dtype"), field_of(row, "compile")


def setting_text(setting: tuple) -> str:
    """'cuda:0, bfloat16, eager' for a setting_of tuple."""
    device, dtype, compiled = setting
    return f"{device or 'device ?'}, {dtype or 'dtype ?'}, " + \
        {True: "compiled", False: "eager"}.get(compiled, "compile not recorded")


def split_tables(rows: list[dict], line_of: tuple[str, ...], metrics: tuple[str, ...], title: str,
                 notes: Callable[[list[dict]], list[str]]) -> list[Table]:
    """One pivot table per (device, dtype, compile) of `rows`, each saying how many groups there are, with
    the `notes(rows of the group)`; one unavailable table when `rows` is empty."""
    if not rows:
        return [Table(title, unavailable=f"no {'/'.join(metrics)} rows")]
    groups = {}
    for r in rows:
        groups.setdefault(setting_of(r), []).append(r)
    tables = []
    for i, setting in enumerate(sorted(groups, key=lambda s: tuple((v is not None, v) for v in s)), 1):
        t = pivot(groups[setting], line_of, metrics, f"{title}: {setting_text(setting)}")
        names = sorted({n for r in groups[setting] if (n := (r.get("extra") or {}).get("device_name"))})
        n = len(groups)
        t.notes = [f"split by device/dtype/compile: {n} group{'s' * (n > 1)}; this is group {i} of {n}"
                   + (f" ({', '.join(names)})" if names else "")] + notes(groups[setting])
        t.notes += [NOTE_UNMEASURED] if MISSING in t.cells() else []
        tables.append(t)
    return tables


def cost_tables(rows: list[dict]) -> list[Table]:
    """The sampling-cost tables (one per device/dtype/compile) of the SAMPLING_COST_METRICS rows."""
    def notes(group: list[dict]) -> list[str]:
        kinds = sorted({(r.get("extra") or {}).get("mem_kind") or "kind not recorded" for r in group
                        if r["metric"] == "peak_mem_mb"})
        return [NOTE_IMAGES, "latency: median (p90) ms of one sampling call of `batch` images; img/s at that "
                "batch", "NFE counted through a wrapper; GFLOPs: forward, per image, 2 FLOPs per "
                "multiply-add; NFE, params and GFLOPs do not depend on the batch: a line without its own row "
                "shows that of another batch"] + ([f"peak memory: {', '.join(kinds)}"] if kinds else [])

    cost = [r for r in rows if r["metric"] in SAMPLING_COST_METRICS]
    return split_tables(cost, COST_LINE, ("nfe", "latency_ms", "img_per_s", "params", "gflops_per_image",
                                          "peak_mem_mb"), "Sampling cost", notes)


def train_tables(rows: list[dict]) -> list[Table]:
    """The training-step tables (one per device/dtype/compile) and the inversion-pair cost table."""
    step = [r for r in rows if r["metric"] in ("train_step_ms", "train_step_gflops")]
    ratio = [r for r in rows if r["metric"] == "pairs_cost_ratio"]
    notes = [NOTE_STEPS, "factor: resolution as a multiple of the base resolution; step ms: median of one "
                         "training step of `batch` images; step GFLOPs/img: the FLOPs of one training step "
                         "per image (forward + backward, 2 FLOPs per multiply-add), not of the whole batch"]
    tables = split_tables(step, TRAIN_LINE, ("train_step_ms", "train_step_gflops"), "Training cost",
                          lambda group: notes)
    if not ratio:
        return tables + [Table("Inversion-pair cost", unavailable="no pairs_cost_ratio rows")]
    t = pivot(ratio, RATIO_LINE, ("pairs_cost_ratio",), "Inversion-pair cost")
    t.notes = ["cost ratio: cost of the inversion pairs / cost of the teacher's training run, in the kind "
               "named"]
    return tables + [t]


def drift_table(rows: list[dict]) -> Table:
    """Stage 3's drift between a grown G and its source (`pagoda drift`), one line per grown model."""
    t = pivot([r for r in rows if r["metric"] in DRIFT_METRICS], DRIFT_LINE, DRIFT_METRICS,
              "Growth: drift between resolutions")
    t.notes = ["drift: area-downsample(G_grown(z)) against G_source(z) on the same seeds and labels (paper Fig. 3); "
               "RMS in uint8 levels (0-255; unrelated images score ~60-90), PSNR in dB; frame: RMS of G_grown(z) - "
               "nearest-up(G_source(z)) over the outermost pixel ring (a one-pixel frame shows there); n = seeds"]
    return t


DRIFT_METRICS = ("drift_rms", "drift_psnr_db", "frame_rms")
DRIFT_LINE = ("model", "method", "resolution", "source")
# Every metric some table shows (plots also show fid_class).
TABLE_METRICS = QUALITY + ("fd_dinov2",) + OTHER_QUALITY + SAMPLING_COST_METRICS + TRAIN_METRICS + DRIFT_METRICS


def all_tables(rows: list[dict], paper: list[dict]) -> list[Table]:
    """Every table of the report, in order (unavailable ones included, so the report says what is absent)."""
    other = tuple(m for m in OTHER_QUALITY if any(r["metric"] == m for r in rows))
    tables = [quality_table(rows, paper, QUALITY, "Sample quality (FD / FID, FDr, IS, precision, recall)"),
              quality_table(rows, paper, ("fd_dinov2",), "FD-DINOv2")]
    if other:
        tables.append(quality_table(rows, paper, other, "Other quality metrics"))
    if any(r["metric"] in DRIFT_METRICS for r in rows):
        tables.append(drift_table(rows))
    return tables + cost_tables(rows) + train_tables(rows)


# ---------------------------------------------------------------------------------------------
# Rendering.


def _header(t: Table) -> list[str]:
    """Column names, each prefixed by its group label (for formats without spanning headers)."""
    spans = [g for g, span in t.groups or [] for _ in range(span)] or [""] * len(t.columns)
    return [f"{g} {c}".strip() for g, c in zip(spans, t.columns)]


def to_markdown(t: Table) -> str:
    """One table as Markdown: a heading, a pipe table (section labels as bold lines, greyed lines in italics), notes
    as a list."""
    if t.unavailable:
        return f"### {t.title}\n\n*not available: {t.unavailable}*\n"

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [f"### {t.title}", "", line(_header(t)),
           "|" + "|".join(":--" if i < t.label_cols else "--:" for i in range(len(t.columns))) + "|"]
    for name, body in t.sections:
        out += [line([f"**{name}**"] + [""] * (len(t.columns) - 1))] if name else []
        out += [line([f"*{x}*" if x else x for x in c] if (name, i) in t.grey else c) for i, c in enumerate(body)]
    return "\n".join(out + [""] + [f"- {n}" for n in t.notes]) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "—": "---", "–": "--",
        "≈": r"$\approx$", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "§": r"\S{}", "·": r"$\cdot$",
        "×": r"$\times$"}


def tex(text: str) -> str:
    """`text` with LaTeX's special characters escaped and the report's few symbols as LaTeX."""
    return "".join(_TEX.get(c, c) for c in text)


def to_latex(t: Table) -> str:
    """One table as a LaTeX float: booktabs rules, spanning group headers with \\cmidrule, section labels as
    italic lines, greyed lines in grey (xcolor), notes below in footnote size; wide tables are scaled to the line
    width (graphicx)."""
    if t.unavailable:
        return f"\\noindent\\textit{{{tex(t.title)}: not available: {tex(t.unavailable)}.}}\\par\n"
    n = len(t.columns)
    out = ["\\begin{table}[htbp]", "\\centering", f"\\caption{{{tex(t.title)}}}", "\\small"]
    wide = n > 9
    out += ["\\resizebox{\\linewidth}{!}{%"] if wide else []
    out += [f"\\begin{{tabular}}{{{'l' * t.label_cols}{'r' * (n - t.label_cols)}}}", "\\toprule"]
    if t.groups:
        out.append(" & ".join(f"\\multicolumn{{{span}}}{{c}}{{{tex(g)}}}" for g, span in t.groups) + " \\\\")
        starts = [sum(s for _, s in t.groups[:i]) + 1 for i in range(len(t.groups))]
        out.append(" ".join(f"\\cmidrule(lr){{{a}-{a + s - 1}}}" for a, (g, s) in zip(starts, t.groups) if g))
    out += [" & ".join(map(tex, t.columns)) + " \\\\", "\\midrule"]
    for i, (name, body) in enumerate(t.sections):
        out += ["\\midrule"] if i else []
        out += [f"\\multicolumn{{{n}}}{{l}}{{\\textit{{{tex(name)}}}}} \\\\"] if name else []
        out += [" & ".join(f"\\textcolor{{gray}}{{{tex(x)}}}" if (name, j) in t.grey and x else tex(x) for x in c)
                + " \\\\" for j, c in enumerate(body)]
    out += ["\\bottomrule", "\\end{tabular}"] + (["}"] if wide else [])
    out += ["\\par\\smallskip", "{\\footnotesize"] + [tex(note) + "\\par" for note in t.notes] + ["}"]
    return "\n".join(out + ["\\end{table}"]) + "\n"


def markdown(tables: list[Table], summary: str) -> str:
    """tables.md: a heading, the summary line, every table."""
    return "\n".join([f"# Report tables\n\n{summary}\n"] + [to_markdown(t) for t in tables])


def latex(tables: list[Table], summary: str) -> str:
    """tables.tex: to \\input into a document that loads booktabs, graphicx and xcolor (greyed published lines)."""
    head = ("% Report tables, made by `python -m reports.build`; needs \\usepackage{booktabs,graphicx,xcolor}.\n"
            f"% {summary}\n")
    return "\n".join([head] + [to_latex(t) for t in tables])

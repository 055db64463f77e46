"""The report's figures (matplotlib, Agg), each saved as PNG and PDF.

Every plot function takes (rows, paper): our deduplicated rows and the published rows, and returns a Figure,
or raises Unavailable saying which rows it lacks. Subtitles name the sample counts; cost plots name the
device, dtype and compilation of each panel and never mix two of them on one axis.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from reports.tables import count, label, res_text, setting_of, setting_text, with_cfg

matplotlib.use("Agg")  # no display; pyplot is never used (figures are plain Figure objects)

JOIN = ("model", "method", "resolution", "guidance", "sampler", "steps")  # one sampling setup of one model
SERIES = ("model", "method", "sampler", "guidance")  # a curve: one setup, several steps (or resolutions)
SOLVERS = ("heun", "ddim", "dpmpp2m", "pd")  # the bars set against the one-step generator's latency
YLABEL = {"fid": "FID (lower is better)", "is": "IS (higher is better)",
          "precision": "precision (higher is better)", "recall": "recall (higher is better)"}


class Unavailable(Exception):
    """Raised by a plot whose rows are absent; the message says which rows (e.g. 'no fid_class rows')."""


def _join(row: dict) -> tuple:
    return tuple(row.get(k) for k in JOIN)


def name(row: dict, *, steps: bool = True, w: bool = True, res: bool = False) -> str:
    """A legend label: model, sampler-steps, w (with CFG only), resolution (if `res`), '(published)'."""
    text = row["model"]
    if row.get("sampler"):
        text += f" {row['sampler']}" + (f"-{row['steps']}" if steps and row.get("steps") else "")
    if w and with_cfg(row):
        text += f" w={row['guidance']:g}"
    text += f" {res_text(row.get('resolution'))}" if res else ""
    return text + " (published)" * bool(row.get("published"))


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both x and y (lower is better on both), sorted by x."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def n_text(rows: list[dict]) -> str:
    """'n = 1k samples per point' (or a range) for the rows' num_samples."""
    ns = sorted({r["num_samples"] for r in rows if r.get("num_samples")})
    if not ns:
        return "sample count not recorded"
    return f"n = {count(ns[0]) if len(ns) == 1 else f'{count(ns[0])}–{count(ns[-1])}'} samples per point"


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.3)) -> tuple[Figure, list]:
    """A figure of n panels in rows of at most `ncols`, each `size` inches."""
    ncols = min(n, ncols)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _resolutions(rows: list[dict]) -> list:
    return sorted({r.get("resolution") for r in rows}, key=lambda r: (r is None, r or 0))


def _curves(ax, rows: list[dict], x: str, key: tuple[str, ...] = SERIES, **label_opts) -> None:
    """One line per distinct `key` of `rows` (x = the field `x`, y = value); published rows hollow, dashed."""
    groups = {}
    for r in rows:
        groups.setdefault((bool(r.get("published")),) + tuple(r.get(k) for k in key), []).append(r)
    for i, k in enumerate(sorted(groups, key=str)):
        rs = sorted(groups[k], key=lambda r: r[x])
        style = dict(ls="--", marker="s", mfc="none") if k[0] else dict(ls="-", marker="o^Dv"[i // 10 % 4])
        ax.plot([r[x] for r in rs], [r["value"] for r in rs], label=name(rs[0], **label_opts), ms=4, lw=1,
                color=f"C{i % 10}", **style)  # 10 colours x 4 markers tell 40 curves apart


def _front(ax, points: list[tuple[float, float]], text: str = "Pareto front (ours)") -> None:
    front = pareto(points)
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="k", ls=":", lw=1.2, label=text)


def _logx(ax, label: str) -> None:
    """A log x axis labelled at 1, 2, 5 x 10^k in plain numbers (no crowded minor labels)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)


def fid_vs_nfe(rows: list[dict], paper: list[dict]) -> Figure:
    """FID against NFE (log x), one panel per resolution, published rows beside ours, our Pareto front."""
    fid = [r for r in rows if r["metric"] == "fid" and r.get("nfe")]
    pub = [r for r in paper if r["metric"] == "fid"]
    at = {R: [r for r in fid + pub if r.get("resolution") == R] for R in _resolutions(fid)}
    res = [R for R in at if len(at[R]) > 1]
    if not res:
        raise Unavailable("no fid rows with an nfe at two or more NFE values of one resolution")
    fig, axes = _grid(len(res))
    for ax, R in zip(axes, res):
        _curves(ax, at[R], "nfe", steps=False)
        _front(ax, [(r["nfe"], r["value"]) for r in at[R] if not r.get("published")])
        _logx(ax, "NFE per image (log scale)")
        ax.set(ylabel=YLABEL["fid"], title=res_text(R))
        ax.legend(fontsize=6)
    single = ", ".join(res_text(R) for R in at if R not in res)
    fig.suptitle(f"FID vs NFE\n{n_text(fid)}; hollow, dashed: published (ImageNet, n = 50k)\n"
                 "dotted: Pareto front of ours" + (f"; one point only, not drawn: {single}" * bool(single)),
                 fontsize=10)
    return fig


def fid_vs_latency(rows: list[dict], paper: list[dict]) -> Figure:
    """FID against the latency of the same model and sampling setup (log x), at the smallest batch measured,
    one panel per (device, dtype, compile), with the Pareto front of each resolution."""
    fid = {_join(r): r for r in rows if r["metric"] == "fid"}
    lat = {}
    for r in sorted((r for r in rows if r["metric"] == "latency_ms"), key=lambda r: -(r.get("batch") or 0)):
        lat[setting_of(r), _join(r)] = r  # the smallest batch is written last
    points = [dict(fid[k], latency=r["value"], lat_batch=r.get("batch"), setting=s, device_name=
                   (r.get("extra") or {}).get("device_name")) for (s, k), r in lat.items() if k in fid]
    if not points:
        raise Unavailable("no fid rows with a latency_ms row of the same model, resolution and sampling "
                          "setup")
    settings = sorted({p["setting"] for p in points}, key=str)
    fig, axes = _grid(len(settings), ncols=2, size=(5.6, 4.2))
    for ax, setting in zip(axes, settings):
        ps = [p for p in points if p["setting"] == setting]
        _curves(ax, ps, "latency", SERIES + ("resolution",), res=True)
        for R in _resolutions(ps):
            _front(ax, [(p["latency"], p["value"]) for p in ps if p.get("resolution") == R],
                   f"Pareto front {res_text(R)}")
        batches = ", ".join(sorted({label(p["lat_batch"]) for p in ps}))
        device = ", ".join(sorted({p["device_name"] for p in ps if p["device_name"]}))
        _logx(ax, f"latency of one call (ms, median, log scale), batch {batches}")
        ax.set(ylabel=YLABEL["fid"], title=setting_text(setting) + (f"\n{device}" if device else ""))
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    fig.suptitle(f"FID vs latency\n{n_text(points)}; latency at the smallest batch measured; "
                 "dotted: Pareto front", fontsize=10)
    return fig


def guidance_curves(rows: list[dict], paper: list[dict]) -> Figure:
    """FID, IS, precision and recall against the guidance scale w, one row of panels per resolution, one line
    per model and sampling setup measured at two or more scales."""
    metrics = tuple(YLABEL)
    key = ("model", "method", "sampler", "steps", "resolution")
    rs = [r for r in rows if r["metric"] in metrics and r.get("guidance") is not None]
    scales = {}
    for r in rs:
        scales.setdefault(tuple(r.get(k) for k in key), set()).add(r["guidance"])
    rs = [r for r in rs if len(scales[tuple(r.get(k) for k in key)]) > 1]
    if not rs:
        raise Unavailable("no fid/is/precision/recall rows at two or more guidance scales")
    res = _resolutions(rs)
    fig, axes = _grid(len(res) * len(metrics), ncols=len(metrics), size=(3.4, 2.9))
    for i, R in enumerate(res):
        for j, m in enumerate(metrics):
            ax = axes[i * len(metrics) + j]
            at = [r for r in rs if r.get("resolution") == R and r["metric"] == m]
            _curves(ax, at, "guidance", key[:4], w=False)
            ax.set(xlabel="guidance scale w (1 = no CFG)", ylabel=YLABEL[m], title=f"{res_text(R)}: {m}")
            if j == 0:
                ax.legend(fontsize=6)
    fig.suptitle(f"Quality vs guidance scale\n{n_text(rs)}", fontsize=10)
    return fig


def fid_vs_resolution(rows: list[dict], paper: list[dict]) -> Figure:
    """FID against resolution (log2 x) for each method and sampling setup measured at two or more resolutions
    (a grown generator lineage: the pagoda rows), ours beside the published ones; the line joins the best FID
    at each resolution."""
    key = ("method", "sampler", "steps", "guidance", "published")
    series = {}
    for r in rows + paper:
        if r["metric"] == "fid" and r.get("resolution"):
            series.setdefault(tuple(r.get(k) for k in key) + ((r["model"],) if r.get("published") else ()),
                              []).append(r)
    series = {k: v for k, v in series.items() if len({r["resolution"] for r in v}) > 1}
    if not any(not k[4] for k in series):
        raise Unavailable("no fid rows of one method and sampling setup at two or more resolutions")
    fig, (ax,) = _grid(1, size=(6.0, 4.2))
    for k in sorted(series, key=str):
        rs = series[k]
        best = {}
        for r in sorted(rs, key=lambda r: -r["value"]):
            best[r["resolution"]] = r["value"]
        text = (rs[0]["model"] + " (published)") if k[4] else k[0] + (f" ({k[1]}-{k[2]})" if k[1] else "") + \
            (f" w={k[3]:g}" if with_cfg(rs[0]) else "")
        xs = sorted(best)
        line = ax.plot(xs, [best[x] for x in xs], ls="--" if k[4] else "-", lw=1, label=text)
        ax.plot([r["resolution"] for r in rs], [r["value"] for r in rs], ls="none", color=line[0].get_color(),
                marker="s" if k[4] else "o", mfc="none" if k[4] else None, ms=5)
    ticks = sorted({r["resolution"] for v in series.values() for r in v})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set(xlabel="resolution (px, log scale)", ylabel=YLABEL["fid"])
    ax.legend(fontsize=7)
    ours = [r for k, v in series.items() if not k[4] for r in v]
    fig.suptitle(f"FID vs resolution\n{n_text(ours)}; dashed: published (ImageNet, n = 50k)", fontsize=10)
    return fig


def latency_stack(rows: list[dict], paper: list[dict]) -> Figure:
    """Per (device, dtype, compile): one stacked bar for the one-step generator (the base resolution's
    latency, then each growth stage's increment) beside the teacher solvers' and PD students' bars, all at
    the smallest batch the pagoda rows were timed at, without CFG."""
    lat = [r for r in rows if r["metric"] == "latency_ms" and not with_cfg(r)]
    settings = sorted({setting_of(r) for r in lat if r.get("method") == "pagoda"}, key=str)
    if not settings:
        raise Unavailable("no latency_ms rows of pagoda models")
    fig, axes = _grid(len(settings), ncols=2, size=(5.6, 4.0))
    for ax, setting in zip(axes, settings):
        rs = [r for r in lat if setting_of(r) == setting]
        batch = min(r.get("batch") or 0 for r in rs if r["method"] == "pagoda")
        at = [r for r in rs if (r.get("batch") or 0) == batch]
        stack = {}
        for r in sorted((r for r in at if r["method"] == "pagoda"), key=lambda r: r["model"], reverse=True):
            stack[r.get("resolution") or 0] = r["value"]  # one model per resolution: the first by name
        total = 0.0
        for i, R in enumerate(sorted(stack)):
            step = max(stack[R] - total, 0.0)  # a stage measured faster than the one below adds nothing
            ax.bar(0, step, bottom=total, color=f"C{i}", label=f"+ {R} px stage" if i else f"{R} px base")
            total += step
        solvers = sorted((r for r in at if r["method"] in SOLVERS),
                         key=lambda r: (r.get("nfe") or 0, r["model"]))
        for j, r in enumerate(solvers, 1):
            ax.bar(j, r["value"], color="0.65")
        heights = [total] + [r["value"] for r in solvers]
        for j, h in enumerate(heights):
            ax.text(j, h, f"{h:.3g}", ha="center", va="bottom", fontsize=7)
        res = sorted(stack)
        ticks = [f"one-step G\n{res[0]}→{res[-1]} px" if len(res) > 1 else f"one-step G\n{res[0]} px"]
        ticks += [f"{name(r)}\n{label(r.get('nfe')) or '?'} NFE, {res_text(r.get('resolution'))}"
                  for r in solvers]
        ax.set_xticks(range(len(ticks)), ticks, fontsize=6, rotation=30, ha="right")
        device = ", ".join(sorted({d for r in at if (d := (r.get("extra") or {}).get("device_name"))}))
        reps = "/".join(sorted({str(n) for r in at if (n := (r.get("extra") or {}).get("reps"))}))
        ax.set(ylabel=f"latency of one call (ms, median), batch {batch}",
               title=", ".join(filter(None, (setting_text(setting), device)))
               + (f"\nmedian of n = {reps} timed repetitions" if reps else ""))
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    fig.suptitle("Latency: growth stages of the one-step generator vs the teacher's solvers", fontsize=10)
    return fig


def precision_recall(rows: list[dict], paper: list[dict]) -> Figure:
    """The precision-recall plane: one annotated point per model, setup and resolution with both metrics."""
    prec = {_join(r): r for r in rows if r["metric"] == "precision"}
    pairs = [(prec[_join(r)], r) for r in rows if r["metric"] == "recall" and _join(r) in prec]
    if not pairs:
        raise Unavailable("no precision rows with a recall row of the same model, resolution and setup")
    fig, (ax,) = _grid(1, size=(6.4, 5.0))
    methods = sorted({p.get("method") or "" for p, _ in pairs})
    for i, m in enumerate(methods):
        pts = [(r["value"], p["value"], p) for p, r in pairs if (p.get("method") or "") == m]
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], color=f"C{i}", s=18, label=m or "?")
        for x, y, p in pts:
            ax.annotate(f"{name(p)} {res_text(p.get('resolution'))}", (x, y), fontsize=5.5, xytext=(3, 2),
                        textcoords="offset points")
    for lim, values in ((ax.set_xlim, [r["value"] for _, r in pairs]),
                        (ax.set_ylim, [p["value"] for p, _ in pairs])):
        pad = max(0.05, 0.1 * (max(values) - min(values)))
        lim(max(0.0, min(values) - pad), min(1.0, max(values) + pad))
    ax.set(xlabel="recall (coverage of the data, higher is better)",
           ylabel="precision (fidelity, higher is better)")
    ax.legend(fontsize=7, title="method", title_fontsize=7)
    fig.suptitle(f"Precision–recall plane\n{n_text([p for p, _ in pairs])}", fontsize=10)
    return fig


def class_spread(rows: list[dict], paper: list[dict]) -> Figure:
    """The spread of per-class FID: a box and the class points per model and setup, the worst class named."""
    groups = {}
    for r in rows:
        if r["metric"] == "fid_class":
            groups.setdefault(_join(r), []).append(r)
    if not groups:
        raise Unavailable("no fid_class rows")
    keys = sorted(groups, key=str)
    fig, (ax,) = _grid(1, size=(max(4.5, 1.6 * len(keys)), 4.0))
    data = [[r["value"] for r in groups[k]] for k in keys]
    ax.boxplot(data, showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)  # the jitter is part of the picture: fixed
    for i, k in enumerate(keys, 1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(data[i - 1])), data[i - 1], s=12, alpha=0.7, zorder=3)
        worst = max(groups[k], key=lambda r: r["value"])
        extra = worst.get("extra") or {}
        ax.annotate(str(extra.get("class_name", extra.get("class"))), (i, worst["value"]),
                    fontsize=6, xytext=(6, 0), textcoords="offset points", va="center")
    ax.set_xticks(range(1, len(keys) + 1), [f"{name(groups[k][0])}\n{res_text(k[2])}" for k in keys],
                  fontsize=7)
    ax.set(ylabel="per-class FID (lower is better)")
    classes = sorted({len(v) for v in groups.values()})
    fig.suptitle(f"Per-class FID spread\n{'/'.join(map(str, classes))} classes per model; "
                 f"{n_text([r for v in groups.values() for r in v]).replace('point', 'class')}", fontsize=10)
    return fig


def sample_grids(rows: list[dict], paper: list[dict]) -> Figure:
    """The sample-grid PNGs that rows name in extra.samples_png, one panel each (unreadable files listed)."""
    named = {}
    for r in rows:
        if (png := (r.get("extra") or {}).get("samples_png")) and png not in named:
            named[png] = r
    if not named:
        raise Unavailable("no rows with extra.samples_png")
    images, missing = [], []
    for png, r in named.items():
        try:
            images.append((mpimg.imread(png), r))
        except (OSError, ValueError):
            missing.append(Path(png).name)
    if not images:
        raise Unavailable(f"no readable sample grid (missing or not an image: {', '.join(missing)})")
    fig, axes = _grid(len(images), size=(4.0, 4.3))
    for ax, (img, r) in zip(axes, images):
        ax.imshow(img, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{name(r)} · {res_text(r.get('resolution'))}", fontsize=8)
    sub = f"not found or unreadable: {', '.join(missing)}" if missing else \
        "as named by the rows' extra.samples_png"
    fig.suptitle(f"Sample grids\n{sub}", fontsize=10)
    return fig


PLOTS = (("fid_vs_nfe", "FID vs NFE", fid_vs_nfe), ("fid_vs_latency", "FID vs latency", fid_vs_latency),
         ("guidance", "Quality vs guidance scale", guidance_curves),
         ("fid_vs_resolution", "FID vs resolution", fid_vs_resolution),
         ("latency_stack", "Latency: growth stages vs teacher solvers", latency_stack),
         ("precision_recall", "Precision–recall plane", precision_recall),
         ("fid_per_class", "Per-class FID spread", class_spread), ("samples", "Sample grids", sample_grids))


def make_plots(rows: list[dict], paper: list[dict], folder: Path) -> list[tuple[str, Path | None, str]]:
    """Draw every plot of PLOTS into `folder` as NAME.png (120 dpi) and NAME.pdf. Returns one
    (title, png path or None, 'not available: ...' or '') per plot."""
    out = []
    for stem, title, plot in PLOTS:
        try:
            fig = plot(rows, paper)
        except Unavailable as e:
            out.append((title, None, f"not available: {e}"))
            continue
        fig.savefig(folder / f"{stem}.png", dpi=120)
        fig.set_layout_engine("none")  # keep the PNG's layout: constrained layout costs ~1 s per pass
        fig.savefig(folder / f"{stem}.pdf", metadata={"CreationDate": None})  # no date: rebuilds are equal
        out.append((title, folder / f"{stem}.png", ""))
    return out

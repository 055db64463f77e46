"""The report's figures (matplotlib, Agg), each saved as PNG and PDF.

Every plot function takes (rows, paper): our deduplicated rows and the published rows, and returns a Figure,
or raises Unavailable saying which rows it lacks. Subtitles name the sample counts; cost plots name the
device, dtype and compilation of each panel and never mix two of them on one axis. Titles are wrapped to the
width of their figure or panel, so none is clipped; a line is named by what is constant along it.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import numpy as np
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from reports.protocol import dataset_of, metric_label
from reports.tables import NAMES, count, label, res_text, setting_of, setting_text, with_cfg

matplotlib.use("Agg")  # no display; pyplot is never used (figures are plain Figure objects)

JOIN = ("model", "method", "resolution", "guidance", "sampler", "steps")  # one sampling setup of one model
SERIES = ("model", "method", "sampler", "guidance")  # a curve: one setup, several steps (or resolutions)
SOLVERS = ("heun", "ddim", "dpmpp2m", "pd")  # the bars set against the one-step generator's latency
YLABEL = {"fid": "FID (lower is better)", "is": "IS (higher is better)",
          "precision": "precision (higher is better)", "recall": "recall (higher is better)"}


def fd_label(rows: list[dict]) -> str:
    """The y label of our fid rows: FID for Inception's features, FD-<space> for any other (reports.protocol)."""
    heads = {metric_label("fid", r.get("extractor"), NAMES).removesuffix(" ↓") for r in rows}
    return (heads.pop() if len(heads) == 1 else "FD") + " (lower is better)"


def comparable(rows: list[dict], paper: list[dict]) -> list[dict]:
    """The published fid rows that may share axes with our fid `rows`: same feature space and data set (an ImageNet
    FID never stands on an axis of photos-domain FDs)."""
    spaces = {(metric_label("fid", r.get("extractor"), NAMES), dataset_of(r)) for r in rows}
    return [r for r in paper if r["metric"] == "fid" and (metric_label("fid", r.get("extractor"), NAMES),
                                                          dataset_of(r)) in spaces]


class Unavailable(Exception):
    """Raised by a plot whose rows are absent; the message says which rows (e.g. 'no fid_class rows')."""


def wrap(text: str, width: float, fontsize: float) -> str:
    """`text` with each of its lines broken at spaces into lines at most `width` points wide in the default
    font at `fontsize` (a single word wider than that stays whole)."""
    renderer, font = RendererAgg(1, 1, 72), FontProperties(size=fontsize)  # at 72 dpi a pixel is a point
    lines = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            longer = f"{line} {word}" if line else word
            if line and renderer.get_text_width_height_descent(longer, font, ismath=False)[0] > width:
                lines.append(line)
                longer = word
            line = longer
        lines.append(line)
    return "\n".join(lines)


def _suptitle(fig: Figure, title: str, *notes: str) -> None:
    """The figure's title over its notes (joined by '; '), wrapped to the figure's width."""
    text = title + "\n" + "; ".join(n for n in notes if n) if any(notes) else title
    fig.suptitle(wrap(text, fig.get_figwidth() * 72 * 0.95, 10), fontsize=10)


def _title(ax, text: str, fontsize: float = 10) -> None:
    """A panel title wrapped to the width of its panel (the figure's width over the columns of its grid)."""
    ncols = ax.get_subplotspec().get_gridspec().ncols
    ax.set_title(wrap(text, ax.get_figure().get_figwidth() / ncols * 72 * 0.9, fontsize), fontsize=fontsize)


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


def _curves(ax, rows: list[dict], x: str, key: tuple[str, ...] = SERIES, annotate: str | None = None) -> bool:
    """One line per distinct `key` of `rows` (x = the field `x`, y = value), named by what is constant along
    it: model, sampler, w and resolution where `key` holds them, steps where all its points share them.
    Published rows hollow, dashed. On a line whose points differ in the field `annotate`, each point is
    labelled with its value; returns whether any point was."""
    groups, labelled = {}, False
    for r in rows:
        groups.setdefault((bool(r.get("published")),) + tuple(r.get(k) for k in key), []).append(r)
    for i, k in enumerate(sorted(groups, key=str)):
        rs = sorted(groups[k], key=lambda r: r[x])
        style = dict(ls="--", marker="s", mfc="none") if k[0] else dict(ls="-", marker="o^Dv"[i // 10 % 4])
        text = name(rs[0], steps=len({r.get("steps") for r in rs}) == 1, w="guidance" in key,
                    res="resolution" in key)
        ax.plot([r[x] for r in rs], [r["value"] for r in rs], label=text, ms=4, lw=1, color=f"C{i % 10}",
                **style)  # 10 colours x 4 markers tell 40 curves apart
        if annotate and len({r.get(annotate) for r in rs}) > 1:
            _annotate(ax, rs, x, annotate, f"C{i % 10}")
            labelled = True
    return labelled


def _annotate(ax, rows: list[dict], x: str, field: str, color: str) -> None:
    """Label each point (x, value) of `rows` with its `field`."""
    for r in rows:
        ax.annotate(label(r.get(field)) or "?", (r[x], r["value"]), xytext=(3, 3), fontsize=6,
                    textcoords="offset points", color=color)


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


def _not_drawn(ours: list[dict], paper: list[dict]) -> str:
    """The title line saying published FIDs are left off an axis of FDs in another space or of another data set."""
    if comparable(ours, paper) or not any(r["metric"] == "fid" for r in paper):
        return ""
    return f"published ImageNet FIDs not drawn: ours are {fd_label(ours).split(' (')[0]} on another data set"


def _nfe_panel(ax, rows: list[dict], resolution: int) -> None:
    """One resolution's FID-vs-NFE curves (log x) with our Pareto front."""
    _curves(ax, rows, "nfe")
    _front(ax, [(r["nfe"], r["value"]) for r in rows if not r.get("published")])
    _logx(ax, "NFE per image (log scale)")
    ax.set(ylabel=fd_label([r for r in rows if not r.get("published")]))
    _title(ax, res_text(resolution))
    ax.legend(fontsize=6)


def fid_vs_nfe(rows: list[dict], paper: list[dict]) -> Figure:
    """FID against NFE (log x), one panel per resolution, published rows beside ours, our Pareto front."""
    fid = [r for r in rows if r["metric"] == "fid" and r.get("nfe")]
    pub = comparable(fid, paper)
    at = {R: [r for r in fid + pub if r.get("resolution") == R] for R in _resolutions(fid)}
    res = [R for R in at if len(at[R]) > 1]
    if not res:
        raise Unavailable("no fid rows with an nfe at two or more NFE values of one resolution")
    fig, axes = _grid(len(res))
    for ax, R in zip(axes, res):
        _nfe_panel(ax, at[R], R)
    single = ", ".join(res_text(R) for R in at if R not in res)
    shown = any(r.get("published") for R in res for r in at[R])
    _suptitle(fig, f"{fd_label(fid).split(' (')[0]} vs NFE", n_text(fid),
              "hollow, dashed: published (ImageNet, n = 50k)" * shown, _not_drawn(fid, paper),
              "dotted: Pareto front of ours", f"one point only, not drawn: {single}" * bool(single))
    return fig


def fid_vs_latency(rows: list[dict], paper: list[dict]) -> Figure:
    """FID against the latency of the same model and sampling setup (log x), at the smallest batch measured,
    one panel per (device, dtype, compile), with the Pareto front of each resolution. A latency is joined
    only to the FID sampled in its own dtype (on whatever device the FID was measured); a latency without
    one is not drawn."""
    fid = {(_join(r), r["dtype"]): r for r in rows if r["metric"] == "fid" and r.get("dtype")}
    lat = {}
    for r in sorted((r for r in rows if r["metric"] == "latency_ms"), key=lambda r: -(r.get("batch") or 0)):
        lat[setting_of(r), _join(r)] = r  # the smallest batch is written last
    points = [dict(fid[k, s[1]], latency=r["value"], lat_batch=r.get("batch"), setting=s,
                   device_name=(r.get("extra") or {}).get("device_name"))
              for (s, k), r in lat.items() if (k, s[1]) in fid]
    if not points:
        raise Unavailable("no fid rows with a latency_ms row of the same model, resolution, sampling setup "
                          "and dtype")
    settings = sorted({p["setting"] for p in points}, key=str)
    fig, axes = _grid(len(settings), ncols=2, size=(5.6, 4.2))
    steps = False
    for ax, setting in zip(axes, settings):
        ps = [p for p in points if p["setting"] == setting]
        steps |= _curves(ax, ps, "latency", SERIES + ("resolution",), annotate="steps")
        for R in _resolutions(ps):
            _front(ax, [(p["latency"], p["value"]) for p in ps if p.get("resolution") == R],
                   f"Pareto front {res_text(R)}")
        batches = ", ".join(sorted({label(p["lat_batch"]) for p in ps}))
        device = ", ".join(sorted({p["device_name"] for p in ps if p["device_name"]}))
        _logx(ax, f"latency of one call (ms, median, log scale), batch {batches}")
        ax.set(ylabel=fd_label(ps))
        _title(ax, setting_text(setting) + (f"\n{device}" if device else ""), 8)
        ax.legend(fontsize=6)
    fd = fd_label(points).split(" (")[0]
    _suptitle(fig, f"{fd} vs latency", n_text(points), f"{fd} sampled in the panel's dtype",
              "latency at the smallest batch measured", "numbers at points: sampler steps" * steps,
              "dotted: Pareto front")
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
            _curves(ax, at, "guidance", key[:4])
            head = fd_label(at) if m == "fid" else YLABEL[m]
            ax.set(xlabel="guidance scale w (1 = no CFG)", ylabel=head)
            _title(ax, f"{res_text(R)}: {head.split(' (')[0] if m == 'fid' else m}")
            if j == 0:
                ax.legend(fontsize=6)
    _suptitle(fig, "Quality vs guidance scale", n_text(rs))
    return fig


def fid_vs_resolution(rows: list[dict], paper: list[dict]) -> Figure:
    """FID against resolution (log2 x) for each method and sampling setup measured at two or more resolutions
    (a grown generator lineage: the pagoda rows), ours beside the published ones; the line joins the best FID
    at each resolution."""
    key = ("method", "sampler", "steps", "guidance", "published")
    series = {}
    ours = [r for r in rows if r["metric"] == "fid"]
    for r in ours + comparable(ours, paper):
        if r.get("resolution"):
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
    drawn = [r for k, v in series.items() if not k[4] for r in v]
    ax.set(xlabel="resolution (px, log scale)", ylabel=fd_label(drawn))
    ax.legend(fontsize=7)
    _suptitle(fig, f"{fd_label(drawn).split(' (')[0]} vs resolution", n_text(drawn),
              "dashed: published (ImageNet, n = 50k)" * any(k[4] for k in series), _not_drawn(ours, paper))
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
        ax.set(ylabel=f"latency of one call (ms, median), batch {batch}")
        _title(ax, ", ".join(filter(None, (setting_text(setting), device)))
               + (f"\nmedian of n = {reps} timed repetitions" if reps else ""), 8)
        ax.legend(fontsize=7)
    _suptitle(fig, "Latency: growth stages of the one-step generator vs the teacher's solvers")
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
    _suptitle(fig, "Precision–recall plane", n_text([p for p, _ in pairs]))
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
    _suptitle(fig, "Per-class FID spread", f"{'/'.join(map(str, classes))} classes per model",
              n_text([r for v in groups.values() for r in v]).replace("point", "class"))
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
        _title(ax, f"{name(r)} · {res_text(r.get('resolution'))}", 8)
    sub = f"not found or unreadable: {', '.join(missing)}" if missing else \
        "as named by the rows' extra.samples_png"
    _suptitle(fig, "Sample grids", sub)
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

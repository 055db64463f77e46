"""reports/: tables equal golden files, plots are drawn, the page is self-contained and renders, bad input is
refused in one line, and reports imports only pagoda's torch-free row schema (pagoda.rows, pagoda.errors).

Fast CPU tests without torch. The fixture tests/data/reports/rows.jsonl is hand-made: a 16 px teacher with
heun/euler/dpmpp2m at several steps (with and without CFG), one-step generators at 16/32/64 px (one
guidance-conditioned), two PD students, FD-DINOv2, KID, per-class FID, cost rows on cpu/float32 and
cuda:0/bfloat16, training-cost rows, a superseded measurement and two metrics left unmeasured.
To rewrite the golden tables on purpose (then read the diff):

    PAGODA_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_reports.py -k golden
"""

import ast
import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from pagoda.errors import UserError, run_cli
from reports.build import MARKER, main, summarize, write_report
from reports.html import page
from reports.paper import paper_rows
from reports.plots import PLOTS, Unavailable, fid_vs_latency, fid_vs_nfe, pareto, sample_grids
from reports.rows import latest, load
from reports.tables import (
    MISSING,
    QUALITY,
    all_tables,
    cell,
    cost_tables,
    quality_table,
    tex,
    train_tables,
    trained,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "reports"
ROWS = DATA / "rows.jsonl"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The report of the fixture rows, built once through the CLI entry point."""
    out = tmp_path_factory.mktemp("report") / "out"
    assert run_cli(main, [str(DATA), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return latest(load([str(ROWS)])[0])


def _line(table, model: str, **cols) -> list[str]:
    """The one body line of `table` whose Model column is `model` and whose other named columns match."""
    idx = {c: table.columns.index(c) for c in ["Model", *cols]}
    found = [line for _, body in table.sections for line in body if line[idx["Model"]] == model
             and all(line[idx[c]] == v for c, v in cols.items())]
    assert len(found) == 1, found
    return found[0]


def test_tables_match_golden(report):
    for built, golden in (("tables.md", "golden.md"), ("tables.tex", "golden.tex")):
        text = (report / built).read_text(encoding="utf-8")
        if os.environ.get("PAGODA_UPDATE_GOLDEN") == "1":
            (DATA / golden).write_text(text, encoding="utf-8")
        assert text == (DATA / golden).read_text(encoding="utf-8"), \
            f"{built} differs from tests/data/reports/{golden} (if intended: PAGODA_UPDATE_GOLDEN=1)"


def test_plots_are_drawn(report):
    for stem, _, _ in PLOTS:
        png, pdf = report / "plots" / f"{stem}.png", report / "plots" / f"{stem}.pdf"
        assert png.stat().st_size > 15_000, stem
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000, stem
        img = mpimg.imread(png)[..., :3]
        assert img.shape[0] > 300 and img.shape[1] > 400 and img.std() > 0.05, stem  # not blank


def test_page_is_self_contained(report, rows):
    html = (report / "index.html").read_text(encoding="utf-8")
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html) and "url(" not in html
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert len(sources) == len(PLOTS) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1]) == (report / "plots" / "fid_vs_nfe.png").read_bytes()
    tables = [t for t in all_tables(rows, paper_rows()) if not t.unavailable]
    assert html.count("<table>") == len(tables) == 7
    for text in ("224 rows read from 1 file", "devices: cpu (AMD EPYC 7B13), cuda:0 (NVIDIA H200)",
                 "dtypes: bfloat16, float32", "published reference rows: 28 of 64 shown"):
        assert text in html


SHARED = {"pagoda.errors", "pagoda.rows"}  # the torch-free corner of pagoda that reports shares (the row schema)


def _imports(path: Path) -> list[str]:
    """Every module `path` imports, also inside functions (which a run may skip)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
    return names


def test_reports_imports_only_the_row_schema_of_pagoda_and_never_torch():
    code = ("import json, sys\nimport reports.build, reports.html, reports.paper, reports.plots, "
            "reports.rows, reports.tables\nprint(json.dumps(sorted({m for m in sys.modules if m.split('.')[0] in "
            "('pagoda', 'eval', 'bench', 'torch')})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) <= SHARED | {"pagoda"}
    for path in (ROOT / "reports").glob("*.py"):
        ours = {n for n in _imports(path) if n.split(".")[0] in ("pagoda", "eval", "bench")}
        assert ours <= SHARED, (path.name, ours)
    for name in SHARED:  # the shared modules stay on the bottom floor: the standard library and each other
        path = ROOT / (name.replace(".", "/") + ".py")
        third_party = {n.split(".")[0] for n in _imports(path)} - set(sys.stdlib_module_names) - {"__future__"}
        assert {n for n in _imports(path) if n.split(".")[0] == "pagoda"} <= SHARED and third_party <= {"pagoda"}, \
            (name, third_party)


GOOD = {"model": "m", "metric": "fid", "value": 1.0}
BAD_INPUTS = {  # case: (file content, or None for no file; a fragment the message must hold)
    "empty directory": (None, "holds no *.jsonl files"),
    "empty file": ("", "holds no rows"),
    "malformed JSON line": (json.dumps(GOOD) + '\n{"model": "m", "metric":\n', "jsonl:2: not valid JSON"),
    "row without value": ('{"model": "m", "metric": "fid"}\n', "row lacks 'value'"),
    "non-numeric value": (json.dumps(dict(GOOD, value="12.3")), "'value' must be a finite number, got '12"),
    "NaN value": ('{"model": "m", "metric": "fid", "value": NaN}', "'value' must be a finite number"),
    "row not an object": ("[1, 2]\n", "a row must be a JSON object"),
    "resolution not an integer": (json.dumps(dict(GOOD, resolution="64")), "'resolution' must be an integer"),
    "resolution a fraction": (json.dumps(dict(GOOD, resolution=64.5)), "jsonl:1: 'resolution' must be an"),
    "negative resolution": (json.dumps(dict(GOOD, resolution=-8)), "jsonl:1: 'resolution' must be an int"
                                                                    "eger >= 1 or null, got -8"),
    "zero resolution": (json.dumps(dict(GOOD, resolution=0)), "jsonl:1: 'resolution' must be an integer >="),
    "negative batch": (json.dumps(dict(GOOD, batch=-4)), "jsonl:1: 'batch' must be an integer >= 1"),
    "negative nfe": (json.dumps(dict(GOOD, nfe=-1)), "jsonl:1: 'nfe' must be a finite number >= 0"),
    "negative num_samples": (json.dumps(dict(GOOD, num_samples=-1000)), "jsonl:1: 'num_samples' must be an "
                                                                         "integer >= 0"),
    "extra not an object": (json.dumps(dict(GOOD, extra=[1])), "'extra' must be a JSON object"),
    "latency p90 not a number": (json.dumps(dict(GOOD, extra={"p90_ms": "fast"})), "'extra.p90_ms' must be"),
    "nonexistent path": (None, "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    content, fragment = BAD_INPUTS[case]
    src = tmp_path / "in"
    src.mkdir()
    if content is not None:
        (src / "rows.jsonl").write_text(content)
    target = src / "missing.jsonl" if case == "nonexistent path" else src
    assert run_cli(main, [str(target), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output folder, no temporary folder


def test_cli_process_exit_status(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"model": "m", "metric": "fid"}\n')
    for args in ([str(bad), "-o", str(tmp_path / "out")], [str(bad)]):  # bad row; -o missing
        done = subprocess.run([sys.executable, "-m", "reports.build", *args], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stdout == "", done
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done.stderr
    assert not (tmp_path / "out").exists()


def test_output_folder_is_replaced_atomically(tmp_path, capsys):
    out = tmp_path / "out"
    write_report(out, lambda d: (d / "a.txt").write_text("1"))
    write_report(out, lambda d: (d / "b.txt").write_text("2"))  # a previous report is replaced
    assert sorted(p.name for p in out.iterdir()) == [".pagoda-report", "b.txt"]

    def fail(d):
        (d / "half.txt").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_report(out, fail)
    assert sorted(p.name for p in out.iterdir()) == [".pagoda-report", "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    for target, fragment in ((foreign, "holds other files"), (foreign / "notes.txt", "is a file")):
        assert run_cli(main, [str(ROWS), "-o", str(target)]) == 2
        assert fragment in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep" and len(list(foreign.iterdir())) == 1


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc, where nothing can be created")
def test_unwritable_output_is_refused_before_any_work(capsys):
    # os.access says /proc is writable for root; the build must not find out only at the end.
    assert run_cli(main, [str(ROWS), "-o", "/proc/pagoda-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not writable" in err[0]


def test_cost_rows_of_two_devices_are_split(rows, report):
    cpu, cuda = cost_tables(rows)
    assert cpu.title == "Sampling cost: cpu, float32, eager"
    assert cuda.title == "Sampling cost: cuda:0, bfloat16, eager"
    for t, device, latency in ((cpu, "AMD EPYC 7B13", "9.00 (9.72) n=30"),
                               (cuda, "NVIDIA H200", "2.10 (2.27) n=100")):
        assert t.notes[0].startswith("split by device/dtype/compile: 2 groups") and device in t.notes[0]
        line = _line(t, "G_base", Batch="1")
        assert line[t.columns.index("Latency ms (p90)")] == latency
        assert line[t.columns.index("Params")] == "14.2M"
    assert len(_line(cpu, "G_base", Batch="8")) == len(cpu.columns)  # batch-free params shown at batch 8 too
    assert "Batch" in cpu.columns and not any(line[6] == "64" for _, b in cpu.sections for line in b)
    md = (report / "tables.md").read_text(encoding="utf-8")
    assert md.count("split by device/dtype/compile: 2 groups") == 2


def test_missing_metric_is_a_marked_cell(rows):
    t = quality_table(rows, [], QUALITY, "quality")
    rec = "Rec. (domain) ↑"  # recall in the domain net's features, named so (FID-style names are Inception's)
    recall64 = t.columns.index(rec, t.columns.index(rec) + 1) + 5  # the third resolution group
    assert t.groups[-1] == ("64 px", 5)  # FD-domain, FDr_k (not measured: —), IS, Prec., Rec.
    assert _line(t, "G_4x")[recall64] == MISSING
    assert _line(t, "teacher", Sampler="dpmpp2m", Steps="4")[t.columns.index(rec)] == MISSING
    assert any(n.startswith(f"{MISSING} not measured") for n in t.notes)
    no_recall = quality_table([r for r in rows if r["metric"] != "recall"], [], QUALITY, "quality")
    assert _line(no_recall, "G_base")[no_recall.columns.index("Rec. ↑")] == MISSING  # the column stays (no space)
    cpu = cost_tables(rows)[0]
    assert _line(cpu, "pd_2", Batch="1")[cpu.columns.index("Peak MB")] == MISSING


def test_latest_measurement_wins(rows, report):
    t = quality_table(rows, [], QUALITY, "quality")
    assert _line(t, "G_base")[t.columns.index("FD-domain ↓")] == "11.04 [10.58, 11.52]"
    assert "12.77" not in (report / "tables.md").read_text(encoding="utf-8")
    old = dict(GOOD, value=2.0, time="2025-01-02T00:00:00Z")
    new = dict(GOOD, value=1.0, time="2025-01-01T00:00:00Z")
    assert latest([old, new]) == [old]  # by time, not by file order
    cost = [dict(GOOD, metric="latency_ms", batch=1, device=d) for d in ("cpu", "cuda:0")]
    assert latest(cost) == cost  # a cost on another device is another measurement


def test_published_rows():
    paper = paper_rows()
    assert all(r["published"] and re.search(r"\b20\d\d\b", r["source"]) and r["num_samples"] == 50_000
               for r in paper)
    fid = {(r["model"], r["resolution"], r["nfe"]): r for r in paper if r["metric"] == "fid"}
    assert [fid["PaGoDA", R, 1]["value"] for R in (64, 128, 256, 512)] == [1.21, 1.48, 1.56, 1.80]
    assert fid["EDM teacher", 64, 79]["value"] == 2.44 and fid["PD (EDM teacher)", 64, 2]["value"] == 8.95
    assert [fid["EDM teacher", 64, n]["value"] for n in (10, 5, 3)] == [16.7, 43.8, 83.0]
    assert fid["StyleGAN-XL", 64, 1]["extra"]["approx"] and "approx" not in fid["StyleGAN-XL", 128, 1]["extra"]
    assert fid["StyleGAN-XL", 128, 1]["value"] == 1.77 and fid["StyleGAN-XL", 128, 1]["extra"]["conf"] == "A"
    assert [r["value"] for r in paper if r["metric"] == "is"] == [259.6]
    t = quality_table([dict(GOOD, resolution=64, nfe=1, num_samples=100)], paper, QUALITY, "q")
    assert _line(t, "StyleGAN-XL")[t.columns.index("FID ↓")] == "≈1.51"
    assert _line(t, "EDM teacher", NFE="3")[t.columns.index("FID ↓")] == "83"  # as quoted, no invented digits


def test_inputs_directories_and_files(tmp_path):
    lines = ROWS.read_text().splitlines(keepends=True)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.jsonl").write_text("".join(lines[:100]))
    (tmp_path / "a" / "b" / "two.jsonl").write_text("".join(lines[100:]))
    (tmp_path / "a" / "b" / "notes.txt").write_text("not rows")
    by_dir, files = load([str(tmp_path / "a")])
    assert len(by_dir) == len(lines) and len(files) == 2
    by_files, _ = load([str(tmp_path / "a" / "one.jsonl"), str(tmp_path / "a" / "b" / "two.jsonl"),
                        str(tmp_path / "a" / "one.jsonl")])  # a file named twice is read once
    assert sorted(map(json.dumps, by_files)) == sorted(map(json.dumps, by_dir))  # the same rows, any order
    png = {(r.get("extra") or {}).get("samples_png") for r in load([str(ROWS)])[0]} - {None}
    assert png == {str(DATA / "samples_G_4x.png")}  # relative to the rows file's folder


def test_absent_rows_make_plots_and_tables_say_so(rows, tmp_path):
    quality = [r for r in rows if r["metric"] in QUALITY]
    with pytest.raises(Unavailable, match="no fid rows with a latency_ms row"):
        fid_vs_latency(quality, [])
    lost = [dict(r, extra={"samples_png": str(tmp_path / "gone.png")}) for r in quality[:1]]
    with pytest.raises(Unavailable, match="gone.png"):
        sample_grids(lost, [])
    assert [t.unavailable for t in all_tables(quality, []) if t.unavailable] == [
        "no fd_dinov2 rows", "no nfe/latency_ms/img_per_s/params/gflops_per_image/peak_mem_mb rows",
        "no train_step_ms/train_step_gflops rows", "no pairs_cost_ratio rows"]
    html = page("t", ["s"], [], [], [("FID vs latency", None, "not available: no latency_ms rows")])
    assert "not available: no latency_ms rows" in html


def test_pareto_front_and_latex_escapes():
    assert pareto([(1, 5), (2, 3), (3, 4), (4, 1), (1, 6), (4, 2)]) == [(1, 5), (2, 3), (4, 1)]
    assert tex("G_base 50% & #1 ~x {a}—≈") == r"G\_base 50\% \& \#1 \textasciitilde{}x \{a\}---$\approx$"
    assert tex("8 × 30") == r"8 $\times$ 30"


def test_page_renders_in_headless_chromium(report, rows, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not on PATH: run tools/chromium.sh (Debian, root or sudo) to run this test")
    shot, url = tmp_path / "shot.png", (report / "index.html").as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    done = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1280,2000", url],
                          capture_output=True, timeout=180)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (2000, 1280) and img.std() > 0.05  # text and tables, not a blank page
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    assert dom.count("<table>") == len([t for t in all_tables(rows, paper_rows()) if not t.unavailable])
    assert dom.count('<img src="data:image/png;base64,') == len(PLOTS)


def _setup(**fields) -> dict:
    """A row of the 16 px teacher's heun sampler (fields override)."""
    return dict(dict(model="teacher", method="heun", sampler="heun", resolution=16, guidance=1.0, steps=4,
                     nfe=7, metric="fid", value=1.0, num_samples=1000), **fields)


def _lat(device: str, dtype: str, steps: int, value: float) -> dict:
    return _setup(metric="latency_ms", value=value, steps=steps, nfe=2 * steps - 1, batch=1, device=device,
                  dtype=dtype, num_samples=30, extra={"compile": False, "reps": 30})


def test_fid_vs_latency_joins_fid_of_the_same_dtype_only():
    fid = [_setup(value=v, steps=s, nfe=2 * s - 1, dtype=dtype, device="cuda:0")
           for dtype, values in (("float32", (30.0, 15.0)), ("bfloat16", (31.0, 16.5)))
           for s, v in zip((4, 8), values)]
    lat = [_lat(device, dtype, s, v)
           for device, dtype in (("cpu", "float32"), ("cuda:0", "bfloat16"), ("cuda:0", "float16"))
           for s, v in ((4, 9.0), (8, 17.0))]
    fig = fid_vs_latency(fid + lat, [])
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert sorted(panels) == ["cpu, float32, eager", "cuda:0, bfloat16, eager"]  # no float16 FID: no panel
    for title, fids in (("cpu, float32, eager", [30.0, 15.0]), ("cuda:0, bfloat16, eager", [31.0, 16.5])):
        (line,) = [ln for ln in panels[title].get_lines() if not ln.get_label().startswith("Pareto")]
        assert list(line.get_ydata()) == fids and list(line.get_xdata()) == [9.0, 17.0], title
    with pytest.raises(Unavailable, match="and dtype"):  # float32 FID beside bfloat16 latency only
        fid_vs_latency(fid[:2] + lat[2:4], [])


def test_plot_lines_are_named_by_what_is_constant_along_them(rows):
    fid = [_setup(value=v, steps=s, nfe=2 * s - 1, dtype="float32")
           for s, v in ((4, 30.0), (8, 15.0), (16, 9.0))]
    lat = [_lat("cpu", "float32", s, v) for s, v in ((4, 9.0), (8, 17.0), (16, 33.0))]
    (ax,) = [ax for ax in fid_vs_latency(fid + lat, []).axes if ax.get_visible()]
    assert [ln.get_label() for ln in ax.get_lines()] == ["teacher heun 16 px", "Pareto front 16 px"]
    assert sorted(t.get_text() for t in ax.texts) == ["16", "4", "8"]  # each point says its steps
    labels = {ln.get_label() for ax in fid_vs_nfe(rows, paper_rows()).axes for ln in ax.get_lines()}
    assert {"teacher heun", "teacher euler", "pd_2 euler-2", "teacher heun-16 w=2"} <= labels
    assert not any(re.search(r"(heun|euler|dpmpp2m)-4\b", t) for t in labels), labels


def _outside(fig) -> list[str]:
    """The titles and panels (axes with their labels, ticks, legend) of `fig` that reach past its edges."""
    FigureCanvasAgg(fig)
    fig.set_dpi(120)  # as saved
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(ax.get_title() or "panel", ax.get_tightbbox(renderer)) for ax in fig.axes if ax.get_visible()]
    boxes += [(t.get_text(), t.get_window_extent(renderer)) for t in fig.texts if t.get_text()]
    return [text for text, b in boxes
            if b.x0 < -1 or b.y0 < -1 or b.x1 > fig.bbox.width + 1 or b.y1 > fig.bbox.height + 1]


def test_plot_titles_fit_their_figure(rows):
    device = "NVIDIA H200 NVL 141GB HBM3e PCIe Gen5 x16 (MIG 7g.141gb, GI 0 CI 0)"
    long = [dict(r, model=r["model"] + "_ema0.9999_step400000", extra=dict(r.get("extra") or {},
                                                                           device_name=device)) for r in rows]
    for stem, _, plot in PLOTS:  # at one resolution (one panel: narrow figures) where the plot can be drawn
        try:
            fig = plot([r for r in long if r.get("resolution") == 16], paper_rows())
        except Unavailable:
            fig = plot(long, paper_rows())
        assert _outside(fig) == [], stem


def test_cost_and_training_notes_say_what_they_count(rows):
    cpu, cuda = cost_tables(rows)
    line = _line(cpu, "G_base", Batch="8")
    latency, img = (line[cpu.columns.index(c)] for c in ("Latency ms (p90)", "img/s"))
    assert latency.endswith(" n=240") and img.endswith(" n=240")  # 8 images x 30 timed calls
    assert _line(cuda, "G_base", Batch="64")[cuda.columns.index("img/s")].endswith(" n=6.4k")
    assert any("n= images timed" in n and "batch × timed repetitions" in n for n in cpu.notes)
    assert not any("n= timed repetitions" in n for n in cpu.notes)
    bench = dict(_lat("cuda:0", "bfloat16", 4, 2.0), batch=64, num_samples=64 * 30)  # as bench writes it
    assert cell(bench).endswith(" n=1.92k") and cell(dict(bench, metric="img_per_s")).endswith(" n=1.92k")
    step = train_tables(rows)[0]
    assert "Step GFLOPs/img" in step.columns
    assert any("n= timed training steps" in n for n in step.notes)
    assert any("per image (forward + backward" in n and "not of the whole batch" in n for n in step.notes)
    assert not any("its FLOPs" in n for n in step.notes)


def test_published_rows_counted_as_shown(rows):
    paper = paper_rows()
    tables = all_tables(rows, paper)
    shown = sum(t.published for t in tables)
    assert shown == 28  # the 64 px FIDs; IS and the 128-512 px rows have no resolution of ours beside them
    assert "published reference rows: 28 of 64 shown" in summarize(224, [ROWS], rows, paper, shown)[3]
    at16 = [r for r in rows if r.get("resolution") == 16]
    tables = all_tables(at16, paper)
    text = "\n".join(to for t in tables for to in t.cells())
    assert "published" not in text and sum(t.published for t in tables) == 0
    line = summarize(len(at16), [ROWS], at16, paper, 0)[3]
    assert line.startswith("published reference rows: 64 available, none shown (no matching resolution"), line


def _report_like(folder: Path) -> None:
    """A fill for write_report: what a build writes, in small."""
    (folder / "index.html").write_text("<html></html>")
    (folder / "plots").mkdir()
    (folder / "plots" / "fid_vs_nfe.png").write_bytes(b"png")


def test_rebuild_refuses_a_folder_holding_files_it_did_not_write(report, tmp_path, capsys):
    out = tmp_path / "out"
    write_report(out, _report_like)
    write_report(out, _report_like)  # an unchanged report is replaced
    for added in ("notes.txt", "plots/mine.png", "drafts/"):
        path = out / added
        path.mkdir() if added.endswith("/") else path.write_text("mine")
        before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
        with pytest.raises(UserError, match=f"holds {re.escape(added)}, which the previous report build "
                                              "did not write.*move it out"):
            write_report(out, _report_like)
        assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert "index.html\nplots/\nplots/fid_vs_nfe.png\n" in (out / MARKER).read_text()  # what it wrote
    built = tmp_path / "built"  # a real build's folder, through the command line
    shutil.copytree(report, built)
    (built / "notes.txt").write_text("keep")
    assert run_cli(main, [str(ROWS), "-o", str(built)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "notes.txt" in err, err
    assert (built / "notes.txt").read_text() == "keep" and (built / "index.html").exists()
    (out / MARKER).write_text("made by python -m reports.build; the next build replaces this folder\n")
    write_report(out, _report_like)  # a marker of an older build without the list: what a build writes passes
    (out / MARKER).write_text("made by python -m reports.build; the next build replaces this folder\n")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds notes.txt"):
        write_report(out, _report_like)


def test_trained_column_says_steps_and_displacement():
    assert trained({"extra": {"train_step": 256, "displacement_lr": 29.61}}) == "256 / 29.6"
    assert trained({"extra": {"train_step": 40}}) == "40" and trained({"extra": {}}) == "" and trained({}) == ""
    row = {"model": "G16", "method": "pagoda", "metric": "fid", "value": 15.0, "resolution": 16, "guidance": 1.0,
           "nfe": 1, "num_samples": 500, "extra": {"train_step": 256, "displacement_lr": 29.61}}
    table = quality_table([row], [], ("fid",), "t")
    assert "256 / 29.6" in table.cells() and any(n.startswith("Trained:") for n in table.notes)


def test_quality_table_names_spaces_states_protocol_and_greys_published_rows():
    def row(model, metric, value, res, **kw):
        extra = {"labels": "seed", "seeds": "0-499", "uint8": "round", "selection": "single", "space": "pixel",
                 "guidance_cost": "none", **kw.pop("extra", {})}
        return {"model": model, "method": kw.pop("method", "pagoda"), "resolution": res, "guidance": 1.0,
                "metric": metric, "value": value, "num_samples": kw.pop("n", 500), "extractor": "domain",
                "reference": kw.pop("reference", f"photos:heldout:{res}"), "extra": extra, **kw}
    val = {"val_reference": {"domain": "photos:heldout:64"}}
    ours = [row("G", "fid", 15.0, 64), row("G", "fdr", 2.9, 64, reference="photos:train:64", extra=val),
            row("G2", "fid", 16.0, 64, extra={"seeds": "500-999"}),
            row("photos:heldout:64", "fdr", 1.0, 64, method="samples", n=1024, reference="photos:train:64",
                extra={**val, "uint8": "stored", "seeds": "0-1023", "labels": "given"}),
            row("G256", "fid", 3.0, 256, extra={"trained_on_evaluator": True})]
    t = quality_table(ours, paper_rows(), QUALITY, "q")
    assert "FD-domain ↓" in t.columns and "FDr_1" in t.columns and "FID ↓" in t.columns  # one column per space
    assert _line(t, "G")[0] == "ours" and _line(t, "G2")[0] == "ours *1"  # another seed range is marked ...
    assert _line(t, "photos:heldout:64")[0] == "validation *2"  # ... and so is the validation line's N
    assert any(n.startswith("*1: differs from that protocol in seeds 500-999 (table: 0-499)") for n in t.notes)
    assert _line(t, "G256")[t.columns.index("FD-domain ↓", t.columns.index("FD-domain ↓") + 1)].endswith("‡")
    section = next(name for name, _ in t.sections if name.startswith("published"))
    assert "another data set" in section and all(name == section for name, _ in t.grey)
    fd_loss = _line(t, "pMF-H/16 + FD loss (Inception)")
    assert fd_loss[t.columns.index("FID ↓", t.columns.index("FID ↓") + 1)] == "0.72‡"  # trained on Inception
    notes = "\n".join(t.notes)
    assert "training statistics photos:train:64" in notes and "conf C (unconfirmed)" in notes
    assert "differs from ours in reference edm-imagenet64 (ours photos:heldout:64)" in notes

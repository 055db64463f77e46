"""`python -m reports.build results/ -o reports/out`: tables, plots and one HTML page from result rows.

Inputs: directories (every *.jsonl inside, recursively) and/or .jsonl files of result rows (eval, bench).
The output folder gets index.html (self-contained), tables.md, tables.tex and plots/NAME.png + NAME.pdf. It
is built in a temporary folder beside the target and then moved into place, so nothing is ever half-written.
A previous report there is replaced: its marker file lists what that build wrote, and a folder that holds
anything else (a file the user added) is refused, as is any other existing non-empty folder.

Exit status: 0 built; 2 bad input or output path: one line `error: ...` on stderr and nothing written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pagoda.errors import ArgumentParser, UserError, run_cli, writable_dir
from reports.html import page
from reports.paper import paper_rows
from reports.plots import PLOTS, make_plots
from reports.rows import latest, load
from reports.tables import TABLE_METRICS, all_tables, latex, markdown

MARKER = ".pagoda-report"  # marks a folder this command made, which the next build may replace
LISTED = "written by that build:"  # the marker's line before the list of what the build wrote
# What a build writes, for a marker without the list (written by an older version of this command).
REPORT_FILES = {"index.html", "tables.md", "tables.tex", "plots/"} | {
    f"plots/{stem}.{ext}" for stem, _, _ in PLOTS for ext in ("png", "pdf")}


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m reports.build` (bench.demo builds its step against it)."""
    p = ArgumentParser(prog="python -m reports.build", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="PATH",
                   help="a directory of *.jsonl result files (searched recursively) or a .jsonl file; "
                        "several allowed")
    p.add_argument("-o", "--out", required=True, type=Path, metavar="DIR",
                   help="output folder; a previous report there is replaced")
    p.add_argument("--no-published", action="store_true",
                   help="leave out the published reference numbers (reports/paper.py)")
    p.add_argument("--title", default="PaGoDA report", help="title of index.html (default: %(default)s)")
    return p


def entries(folder: Path) -> list[str]:
    """Everything under `folder` but its marker file, as sorted relative POSIX paths, folders with a trailing
    '/' (a link is an entry of its own, never followed)."""
    found = []

    def walk(path: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                found.append(rel + "/")
                walk(Path(entry.path), rel + "/")
            elif rel != MARKER:
                found.append(rel)
    walk(folder, "")
    return found


def marker_text(folder: Path) -> str:
    """The marker file of a finished report in `folder`: what it is, then everything the build wrote."""
    return ("made by python -m reports.build; the next build replaces this folder, and refuses to if it "
            f"holds anything not listed below\n{LISTED}\n" + "".join(f"{e}\n" for e in entries(folder)))


def written_before(out: Path) -> set[str]:
    """What the build that made the report folder `out` wrote, as listed in its marker (REPORT_FILES for a
    marker without the list)."""
    try:
        lines = (out / MARKER).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    return set(lines[lines.index(LISTED) + 1:]) if LISTED in lines else REPORT_FILES


def check_output(out: Path) -> None:
    """UserError unless a report folder can be written at `out`: not a file, not a non-empty folder this
    command did not make, not a report folder holding anything its build did not write (a rebuild would
    delete it), and its nearest existing parent a writable folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} is a file: give a folder path for the report")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UserError(f"-o {out} is a folder that holds other files: give a new or empty folder (only a "
                          "folder made by reports.build is replaced)")
    if out.is_dir() and (out / MARKER).exists():
        before = written_before(out)
        added = [e for e in entries(out) if e not in before]
        if added:
            more = f" (and {len(added) - 1} more)" if len(added) > 1 else ""
            raise UserError(f"-o {out} holds {added[0]}{more}, which the previous report build did not "
                              f"write, and a rebuild replaces the whole folder: move it out of {out} or give "
                              "another -o")
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise UserError(f"-o {out}: {parent} is a file, not a folder: choose another path")
    if not writable_dir(parent):
        raise UserError(f"-o {out}: folder {parent} is not writable: choose another path")


def write_report(out: Path, fill: Callable[[Path], None]) -> None:
    """Run `fill(folder)` on a new temporary folder beside `out`, then move it to `out` (replacing a previous
    report), with a marker file listing what it holds. UserError (check_output) before and after the fill
    if `out` cannot be replaced; if anything fails the temporary folder is removed and `out` is left as it
    was."""
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        fill(tmp)
        (tmp / MARKER).write_text(marker_text(tmp), encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private
        check_output(out)  # again: a file may have been added to `out` during the build
        if not out.exists():
            tmp.rename(out)
            return
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summarize(n_read: int, files: list[Path], rows: list[dict], paper: list[dict], shown: int) -> list[str]:
    """The header lines: rows and files read, devices (with their names) and dtypes seen, the published rows
    (`shown` of them in the tables), and the metrics (with row counts) that no table or plot shows."""
    devices = {}
    for r in rows:
        if r.get("device"):
            name = (r.get("extra") or {}).get("device_name")
            devices.setdefault(r["device"], set()).update([name] if name else [])
    seen = ", ".join(d + (f" ({', '.join(sorted(n))})" if n else "") for d, n in sorted(devices.items()))
    dtypes = ", ".join(sorted({r["dtype"] for r in rows if r.get("dtype")}))
    lines = [f"{n_read} rows read from {len(files)} file{'s' * (len(files) != 1)}",
             f"devices: {seen or 'not recorded'}", f"dtypes: {dtypes or 'not recorded'}",
             "published reference rows: " + published_text(paper, shown)]
    unshown = Counter(r["metric"] for r in rows if r["metric"] not in TABLE_METRICS + ("fid_class",))
    if unshown:
        counts = ", ".join(f"{m} ({n})" for m, n in sorted(unshown.items()))
        lines.append(f"rows of metrics no table or plot shows: {counts}")
    return lines


def published_text(paper: list[dict], shown: int) -> str:
    """How many of the published rows the tables show (the summary line)."""
    if not paper:
        return "left out (--no-published)"
    if not shown:
        at = ", ".join(map(str, sorted({r["resolution"] for r in paper})))
        metrics = "/".join(sorted({r["metric"] for r in paper}))
        return (f"{len(paper)} available, none shown (no matching resolution: no {metrics} row of ours at "
                f"{at} px)")
    return (f"{shown} of {len(paper)} shown, at the resolutions measured here (ImageNet, sources in the "
            "table notes)")


def main(argv: list[str] | None = None) -> int:
    """Build the report that the command line `argv` asks for; UserError on bad input or output path."""
    args = build_parser().parse_args(argv)
    check_output(args.out)
    read, files = load(args.inputs)
    rows, paper = latest(read), [] if args.no_published else paper_rows()
    tables = all_tables(rows, paper)
    summary = summarize(len(read), files, rows, paper, sum(t.published for t in tables))

    def fill(folder: Path) -> None:
        (folder / "tables.md").write_text(markdown(tables, "; ".join(summary)), encoding="utf-8")
        (folder / "tables.tex").write_text(latex(tables, "; ".join(summary)), encoding="utf-8")
        (folder / "plots").mkdir()
        plots = make_plots(rows, paper, folder / "plots")
        (folder / "index.html").write_text(page(args.title, summary, files, tables, plots), encoding="utf-8")

    write_report(args.out, fill)
    print(f"report: {args.out / 'index.html'} ({summary[0]}); tables.md, tables.tex and plots/ beside it")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

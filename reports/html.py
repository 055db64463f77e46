"""index.html: one self-contained page, tables as HTML tables and figures inlined as base64 data URIs.

The page holds no script and loads nothing: it can be mailed, archived or opened offline as one file.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from reports.tables import Table

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
h3 { margin: 1.6em 0 .4em; } body { color: #222; }
.summary { color: #444; } .na { color: #a33; font-style: italic; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; border-top: 2px solid #222; border-bottom: 2px solid #222; }
table { font-size: 12px; }
th, td { padding: 2px 8px; white-space: nowrap; } thead tr:last-child th { border-bottom: 1px solid #222; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } th { text-align: center; }
tr.section th { text-align: left; font-style: italic; background: #f2f2f2; border-top: 1px solid #999; }
tr.grey td { color: #888; }
tbody tr:hover { background: #f7f7ff; } ul.notes { font-size: 12px; color: #555; margin-top: .3em; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
"""


def esc(text: str) -> str:
    """HTML-escaped text."""
    return html.escape(str(text), quote=True)


def table_html(t: Table) -> str:
    """One Table as an HTML table (spanning group headers, section lines) plus its notes; an unavailable
    table as one line saying why."""
    if t.unavailable:
        return f'<p class="na">not available: {esc(t.unavailable)}</p>'
    head = "".join(f'<th colspan="{span}">{esc(g)}</th>' for g, span in t.groups or [])
    head = (f"<tr>{head}</tr>" if head else "") + "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in t.columns)
    head += "</tr>"
    body = []
    for name, lines in t.sections:
        body += [f'<tr class="section"><th colspan="{len(t.columns)}">{esc(name)}</th></tr>'] if name else []
        body += [('<tr class="grey">' if (name, j) in t.grey else "<tr>") + "".join(
            ('<td class="num">' if i >= t.label_cols else "<td>") + f"{esc(c)}</td>" for i, c in enumerate(line))
            + "</tr>" for j, line in enumerate(lines)]
    notes = "".join(f"<li>{esc(n)}</li>" for n in t.notes)
    return (f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>'
            f'<ul class="notes">{notes}</ul>')


def data_uri(png: Path) -> str:
    """The PNG file `png` as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def page(title: str, summary: list[str], files: list[Path], tables: list[Table],
         plots: list[tuple[str, Path | None, str]]) -> str:
    """The whole page: a header (summary lines, the files read), a contents list, every table, then every
    plot (title, png path or None, 'not available: ...' reason) inlined."""
    parts, contents = [], []
    for i, t in enumerate(tables, 1):
        contents.append(f'<li><a href="#t{i}">{esc(t.title)}</a></li>')
        parts.append(f'<h3 id="t{i}">{esc(t.title)}</h3>{table_html(t)}')
    parts.append("<h2>Plots</h2>")
    for i, (name, png, reason) in enumerate(plots, 1):
        contents.append(f'<li><a href="#p{i}">{esc(name)}</a>{"" if png else " (not available)"}</li>')
        body = f'<img src="{data_uri(png)}" alt="{esc(name)}">' if png else f'<p class="na">{esc(reason)}</p>'
        parts.append(f'<h3 id="p{i}">{esc(name)}</h3>{body}')
    listed = "".join(f"<li>{esc(f)}</li>" for f in files)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
        '<div class="summary">' + "".join(f"<p>{esc(s)}</p>" for s in summary) + "</div>",
        f"<details><summary>{len(files)} file(s) read</summary><ul>{listed}</ul></details>",
        f'<h2>Contents</h2><ul class="contents">{"".join(contents)}</ul>', "<h2>Tables</h2>", *parts,
        "</body></html>"]) + "\n"

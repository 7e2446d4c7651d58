"""The Guide as one self-contained HTML page: every cell's explanation and output, plotly.js
inlined once (``viz.report``'s page style), for people who were not in the room."""

from __future__ import annotations

import html
from pathlib import Path

from markdown_it import MarkdownIt
from plotly.offline import get_plotlyjs

from guide.cells import Cell, Output
from merging.checkpoint import write_text_atomically
from viz.report import PAGE_CSS, figure_div

MARKDOWN = MarkdownIt("commonmark")  # raw HTML in a text is shown as text, not run: html off
MARKDOWN.disable("html_inline").disable("html_block")


def table_html(rows: list[dict]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(column for row in rows for column in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if row.get(c) is None else str(row.get(c)))}</td>"
                                    for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cell_html(cell: Cell, output: Output | None) -> str:
    parts = [f"<section id='{html.escape(cell.key)}'><h2>{html.escape(cell.title)}</h2>", MARKDOWN.render(cell.text)]
    if output is None:
        parts.append("<p class='meta'>Not run yet.</p>")
    else:
        parts.append(f"<div class='finding'>{MARKDOWN.render(output.summary)}</div>")
        parts += [figure_div(figure, f"{cell.key}-{index}") for index, figure in enumerate(output.figures)]
        parts += [f"<h3>{html.escape(title)}</h3>{table_html(rows)}" for title, rows in output.tables]
    return "".join(parts) + "</section>"


def render_page(cells: list[tuple[Cell, Output | None]]) -> str:
    sections = "".join(cell_html(cell, output) for cell, output in cells)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Merge Studio: why merging works</title><style>{PAGE_CSS} td {{ text-align: left; }}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body><main>
<h1>Why merging works: a guided tour on a real model</h1>
<p class="meta">Merge Studio's Guide, run on its demo family (SmolLM2-135M-Instruct and three experts). Every number
comes from a real merge and a real evaluation.</p>
{sections}
</main></body></html>
"""


def write_page(path: Path, cells: list[tuple[Cell, Output | None]]) -> Path:
    """Write the page atomically (a temporary file renamed into place); returns its path."""
    return write_text_atomically(path.expanduser(), render_page(cells))

"""Guide tab: the argument for merging as a notebook of cells (``guide``), each with its Run button,
progress and output; "Run all" runs them in order. Outputs are cached on disk for everyone: a
visitor opening the tab sees every cell that ever ran, at once."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from guide import Notebook, Output
from guide.cells import Cell
from merging.errors import Cancelled
from studio.common import HEAVY, INSTANT, UI, handler, served_dir, stop_button, stoppable
from studio.session import StopSignal
from studio.settings import Settings

INTRO = ("**Why merging works, on a real model.** Each cell below explains one step of the argument with its formula "
         "and runs it on the demo family: a 135M chat model and three experts that each learned facts the base "
         "cannot know. **Run** one cell, or **Run all** (about 9 minutes on 2 CPU cores the first time); results are "
         "kept, so the next visitor sees them at once. Every number is a real merge and a real evaluation.")
NOT_RUN = "*Not run yet: press Run.*"
EXPORT = "merge-studio-guide.html"


@dataclass
class CellView:
    cell: Cell
    run: gr.Button
    status: gr.Markdown
    summary: gr.Markdown
    figures: list[gr.Plot]
    tables: list[gr.Dataframe]

    def outputs(self) -> list:
        return [self.status, self.summary, *self.figures, *self.tables]


@dataclass
class GuideTab:
    run_all: gr.Button
    stop: gr.State
    stop_button: gr.Button
    download: gr.Button
    page: gr.File
    status: gr.Markdown
    cells: list[CellView]

    def outputs(self) -> list:
        return [component for view in self.cells for component in view.outputs()]


# -- layout ---------------------------------------------------------------------------------------

def layout(notebook: Notebook) -> GuideTab:
    gr.Markdown(INTRO)
    with gr.Row():
        run_all = gr.Button("Run all", variant="primary", scale=3, elem_id="guide-run-all")
        stop_btn = gr.Button("Stop", variant="stop", scale=1)
        download = gr.Button("Download this notebook (HTML)", scale=2)
    page = gr.File(label="The notebook as one page", interactive=False, visible=False)
    status = gr.Markdown(elem_id="guide-status")
    views = []
    for cell in notebook.cells.values():
        with gr.Group(elem_id=f"guide-{cell.key}", elem_classes=["guide-cell"]):
            gr.Markdown(f"### {cell.title}\n\n{cell.text}")
            with gr.Row():
                run = gr.Button("Run", size="sm", scale=0, min_width=100)
                cell_status = gr.Markdown(NOT_RUN)
            summary = gr.Markdown(elem_classes=["guide-summary"])
            figures = [gr.Plot(show_label=False, visible=False) for _ in range(cell.figures)]
            tables = [gr.Dataframe(interactive=False, visible=False, wrap=True) for _ in range(cell.tables)]
        views.append(CellView(cell, run, cell_status, summary, figures, tables))
    return GuideTab(run_all, gr.State(StopSignal()), stop_btn, download, page, status, views)


# -- handlers -------------------------------------------------------------------------------------

def shown(cell: Cell, output: Output | None, cached: bool) -> list:
    """The values of a cell's outputs: status, summary, its figures, its tables."""
    if output is None:
        return [NOT_RUN, "", *[gr.Plot(visible=False)] * cell.figures, *[gr.Dataframe(visible=False)] * cell.tables]
    status = ("✓ from the cache" if cached else f"✓ ran in {output.seconds:.0f} s" if output.seconds >= 1
              else "✓ ran (its models were measured already)")
    figures = [gr.Plot(figure, visible=True) for figure in output.figures][: cell.figures]
    tables = [gr.Dataframe(pd.DataFrame(rows), label=title, visible=True) for title, rows in output.tables][: cell.tables]
    figures += [gr.Plot(visible=False)] * (cell.figures - len(figures))  # every place filled, shown or not
    tables += [gr.Dataframe(visible=False)] * (cell.tables - len(tables))
    return [status, output.summary, *figures, *tables]


def show_cached(notebook: Notebook) -> list:
    """Every cell's cached output (the page's first view)."""
    return [value for cell in notebook.cells.values() for value in shown(cell, notebook.cached(cell.key), True)]


def run_cell(notebook: Notebook, key: str, signal: StopSignal, progress=gr.Progress()) -> list:
    cell = notebook.cell(key)
    cached = notebook.has(key)
    try:
        output = notebook.run(key, progress=lambda fraction, what: progress(fraction, desc=what), cancel=signal.event,
                              report=lambda message: progress(0, desc=message))
    except Cancelled:
        return ["Stopped; what was measured so far is kept for the next run.",
                *[gr.skip()] * (1 + cell.figures + cell.tables)]
    return shown(cell, output, cached)


def run_all(notebook: Notebook, signal: StopSignal, progress=gr.Progress()):
    """Every cell in order (``Notebook.run_all``); each cell's output appears as soon as it is done."""
    values = show_cached(notebook)
    cells = list(notebook.cells.values())
    cached = {cell.key: notebook.has(cell.key) for cell in cells}
    offsets = [0]
    for cell in cells:
        offsets.append(offsets[-1] + 2 + cell.figures + cell.tables)
    done = 0
    try:
        for index, (cell, output) in enumerate(notebook.run_all(
                progress=lambda fraction, what: progress(fraction, desc=what), cancel=signal.event)):
            values[offsets[index]:offsets[index + 1]] = shown(cell, output, cached[cell.key])
            done = index + 1
            yield [f"Ran {done} of {len(cells)} cells.", *values]
    except Cancelled:
        yield [f"Stopped after {done} of {len(cells)} cells; what was measured so far is kept.", *values]
        return
    yield [f"All {len(cells)} cells ran.", *values]


def download_page(notebook: Notebook) -> gr.File:
    """The page of the cells' current outputs, written once per state of the cache (a click on an
    unchanged guide serves the same file rather than another copy on the Space's disk)."""
    state = hashlib.sha256("".join(notebook.key(cell) + str(notebook.has(cell.key))
                                   for cell in notebook.cells.values()).encode()).hexdigest()[:16]
    path = served_dir("guide", fresh=False) / state / EXPORT
    if not path.is_file():
        notebook.export(path)
    return gr.File(str(path), visible=True)


# -- wiring ---------------------------------------------------------------------------------------

def wire(tab: GuideTab, settings: Settings, notebook: Notebook, demo: gr.Blocks) -> None:
    heavy = {"concurrency_id": HEAVY, "concurrency_limit": settings.heavy_concurrency, **UI}
    # On the CPU, also on ZeroGPU: results are cached and shared, and a CPU run gives every visitor the
    # same numbers (a GPU call would spend a visitor's quota on minutes of small evaluations).
    for view in tab.cells:
        stoppable(view.run.click, tab.stop, handler(run_cell, notebook, view.cell.key), [tab.stop], view.outputs(),
                  show_progress_on=[view.status], **heavy)
    stoppable(tab.run_all.click, tab.stop, handler(run_all, notebook), [tab.stop], [tab.status, *tab.outputs()],
              show_progress_on=[tab.status], **heavy)
    stop_button(tab.stop_button, tab.stop)
    tab.download.click(handler(download_page, notebook), None, [tab.page], **UI)
    demo.load(handler(show_cached, notebook), None, tab.outputs(), **INSTANT)


def build(settings: Settings, demo: gr.Blocks) -> GuideTab:
    # a hosted studio never builds the family for a visitor (a PyPI download, gigabytes written)
    notebook = Notebook(device="cpu", may_build=not settings.hosted)
    tab = layout(notebook)
    wire(tab, settings, notebook, demo)
    return tab

"""Run the Guide's cells, with their results cached on disk, and export them as one page."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import demo
from guide import cache
from guide.cells import Cell, Output
from guide.export import write_page
from guide.runs import Context, Progress, evaluation_identity
from guide.story import CELLS
from merging.errors import MergeStudioError

CODE_VERSION = 1  # bump when the story's shared code (guide.runs) changes what any cell shows


class Notebook:
    """The story's cells over the demo family. ``run`` computes a cell once and reads it from the
    cache after; ``cached`` reads without computing (what a visitor sees on opening)."""

    def __init__(self, cells: list[Cell] = CELLS, device: str = "cpu", *, may_build: bool = True):
        """``may_build``: whether a run may build the demo family when it is missing (False in a
        hosted studio: its cached outputs are shown, and runs need the family built at deploy)."""
        self.cells = {cell.key: cell for cell in cells}
        self.device = device
        self.may_build = may_build

    def cell(self, key: str) -> Cell:
        if key not in self.cells:
            raise MergeStudioError(f"no guide cell {key!r}; the cells are {', '.join(self.cells)}")
        return self.cells[key]

    def key(self, cell: Cell) -> str:
        return cache.key_of("cell", {"cell": cell.key, "version": cell.version, "code": CODE_VERSION,
                                     "inputs": cell.inputs, "evaluation": evaluation_identity(self.device)})

    def has(self, key: str) -> bool:
        """Whether the cell has a stored output (without reading it)."""
        return cache.exists(self.key(self.cell(key)))

    def cached(self, key: str) -> Output | None:
        """The cell's stored output, or None when there is none or it cannot be read (an entry
        from another version of the code counts as not run, never as an error on page load)."""
        stored = cache.read(self.key(self.cell(key)))
        try:
            return None if stored is None else Output.from_json(stored)
        except (ValueError, KeyError, TypeError):
            return None

    def run(self, key: str, *, progress: Progress | None = None, cancel: threading.Event | None = None,
            report=lambda message: None) -> Output:
        """The cell's output: from the cache when its inputs are unchanged, else computed (building the
        demo family first if needed, ``report`` saying so) and cached."""
        cell = self.cell(key)
        output = self.cached(key)
        if output is not None:
            return output
        if not self.may_build and not demo.is_ready():
            raise MergeStudioError("the demo family is not built on this server, so the Guide can show its stored "
                                   "results only; its owner can build it with: python -m merging zoo --list")
        family = demo.ensure_family(report)
        context = Context(family, self.device, progress or (lambda fraction, what: None), cancel)
        started = time.perf_counter()
        output = cell.run(context)
        output.seconds = round(time.perf_counter() - started, 1)
        cache.write(self.key(cell), output.to_json())
        return output

    def run_all(self, *, progress: Progress | None = None, cancel: threading.Event | None = None
                ) -> Iterator[tuple[Cell, Output]]:
        """Every cell in order, each as it finishes (``progress`` gets the fraction of the whole)."""
        cells = list(self.cells.values())
        for index, cell in enumerate(cells):
            def within(fraction: float, what: str, index: int = index, cell: Cell = cell) -> None:
                if progress is not None:
                    progress((index + fraction) / len(cells), f"{cell.title}: {what}")

            yield cell, self.run(cell.key, progress=within, cancel=cancel)

    def export(self, path: str | Path) -> Path:
        """Every cell with its cached output as one self-contained HTML page (``guide.export``);
        cells not run yet say so."""
        return write_page(Path(path), [(cell, self.cached(cell.key)) for cell in self.cells.values()])

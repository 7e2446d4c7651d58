"""A cell of the Guide and what it shows: text with formulas, figures, tables."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import plotly.graph_objects as go
import plotly.io as pio


@dataclass
class Output:
    """What a cell shows under its explanation: a Markdown summary, figures and tables (each a
    title and its rows), in that order. Saved as JSON (figures in Plotly's JSON)."""

    summary: str = ""
    figures: list[go.Figure] = field(default_factory=list)
    tables: list[tuple[str, list[dict]]] = field(default_factory=list)
    seconds: float = 0.0  # what computing it took (not reading it from the cache)

    def to_json(self) -> str:
        return json.dumps({"summary": self.summary, "figures": [json.loads(f.to_json()) for f in self.figures],
                           "tables": [[title, rows] for title, rows in self.tables], "seconds": self.seconds})

    @classmethod
    def from_json(cls, text: str) -> Output:
        data = json.loads(text)
        return cls(data["summary"], [pio.from_json(json.dumps(f)) for f in data["figures"]],
                   [(title, rows) for title, rows in data["tables"]], data.get("seconds", 0.0))


@dataclass(frozen=True)
class Cell:
    """One step of the argument: ``title``, ``text`` (Markdown with its formula), and ``run(context)``
    computing its ``Output``. ``inputs`` is what its result depends on besides the demo family
    (recipes, grids): a change re-runs it. Bump ``version`` when its computation changes.
    ``figures`` and ``tables``: how many of each its output has."""

    key: str
    title: str
    text: str
    run: Callable[..., Output]
    inputs: dict = field(default_factory=dict)
    version: int = 1
    figures: int = 1  # how many figures and tables its output has (a page lays out their places first)
    tables: int = 1

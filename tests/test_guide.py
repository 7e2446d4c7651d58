"""The Guide (issue #18): its cells' math, its cache, its export. The story on the demo family runs
in Chromium and under nbclient in tests/test_guide_story.py."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch

from guide import Notebook, Output
from guide import cache
from guide.cells import Cell
from guide.story import CELLS, ties_steps
from helpers import family
from merging.checkpoint import CheckpointReader
from merging.engine import merge
from merging.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def guide_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "guide"))
    return tmp_path / "guide"


def ties_reference(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES from the paper's Algorithm 1, entry by entry in float64: keep the top-k magnitudes of
    each task vector, γ_p = sgn(Σ_t τ̂_t,p), τ_m,p = mean of {τ̂_t,p : sgn(τ̂_t,p) = γ_p}."""
    flat = [d.flatten().double() for d in deltas]
    k = max(1, int(density * flat[0].numel()))
    trimmed = []
    for tau in flat:
        keep = set(sorted(range(tau.numel()), key=lambda p: -abs(float(tau[p])))[:k])
        trimmed.append([float(tau[p]) if p in keep else 0.0 for p in range(tau.numel())])
    merged = []
    for p in range(flat[0].numel()):
        total = sum(t[p] for t in trimmed)
        gamma = (total > 0) - (total < 0)
        agree = [t[p] for t in trimmed if t[p] != 0 and ((t[p] > 0) - (t[p] < 0)) == gamma]
        merged.append(sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(merged, dtype=torch.float64).reshape(deltas[0].shape)


def test_the_ties_illustration_is_the_papers_algorithm_and_the_engines_merge(tmp_path):
    """The picture's steps equal a float64 reading of the paper, and, on a whole tensor, the
    engine's TIES merge of three real models (which trims each tensor as a whole too)."""
    fam = family("llama", 3)
    name = "model.layers.0.self_attn.q_proj.weight"
    readers = [CheckpointReader(folder) for folder in (fam.base, *fam.finetuned)]
    base, *models = [reader.get(name).double() for reader in readers]
    for reader in readers:
        reader.close()
    deltas = [model - base for model in models]
    steps = ties_steps(deltas, 0.3)
    assert torch.allclose(steps["merged"], ties_reference(deltas, 0.3), atol=1e-12)
    assert all(int((t != 0).sum()) == int(0.3 * t.numel()) for t in steps["trimmed"])
    recipe = {"merge_method": "ties", "base_model": str(fam.base), "dtype": "float32",
              "models": [{"model": str(f), "parameters": {"weight": 1.0, "density": 0.3}} for f in fam.finetuned]}
    merge(load_recipe(recipe), tmp_path / "ties", device="cpu")
    reader = CheckpointReader(tmp_path / "ties")
    engine = reader.get(name).double() - base
    reader.close()
    assert torch.allclose(engine, steps["merged"], atol=1e-6)
    assert not torch.allclose(engine, sum(deltas))  # the election changed something: a comparison with content


def counting_cell(calls: list, key: str = "one", **inputs) -> Cell:
    def run(context) -> Output:
        calls.append(context)
        context.progress(0.5, "halfway")
        return Output(f"**ran** {len(calls)}", [go.Figure(go.Bar(x=["a"], y=[len(calls)]))],
                      [("numbers", [{"model": "m", "value": len(calls)}])])
    return Cell(key, f"Cell {key}", "What it shows: *δ = θ − θ_base*.", run, inputs)


def test_a_cell_runs_once_then_comes_from_the_cache_until_its_inputs_change(guide_cache):
    calls: list = []
    notebook = Notebook([counting_cell(calls, lam=0.5)])
    assert notebook.cached("one") is None
    seen = []
    first = notebook.run("one", progress=lambda fraction, what: seen.append((fraction, what)))
    assert len(calls) == 1 and seen == [(0.5, "halfway")] and first.summary == "**ran** 1"
    again = Notebook([counting_cell(calls, lam=0.5)]).run("one")  # a second visitor: read, not run
    assert len(calls) == 1 and again.summary == first.summary and again.figures[0].data[0].y == (1,)
    assert again.tables == first.tables
    changed = Notebook([counting_cell(calls, lam=0.7)]).run("one")  # its inputs changed: it runs again
    assert len(calls) == 2 and changed.summary == "**ran** 2"
    assert not list(guide_cache.glob(".*.tmp"))  # written atomically: no temporary file left


def test_a_stopped_cell_leaves_no_cache_entry(guide_cache):
    stop = threading.Event()

    def run(context) -> Output:
        stop.set()
        from merging.errors import check_cancel
        check_cancel(context.cancel, "guide stopped")
        return Output("never")

    notebook = Notebook([Cell("stopped", "Stopped", "text", run)])
    with pytest.raises(Exception, match="guide stopped"):
        notebook.run("stopped", cancel=stop)
    assert notebook.cached("stopped") is None and not list(guide_cache.glob("cell-*.json"))


def test_unknown_cell_is_a_clear_error(guide_cache):
    with pytest.raises(Exception, match="no guide cell 'nope'; the cells are family, deltas"):
        Notebook().run("nope")


def test_the_story_is_in_the_order_of_the_argument():
    assert [cell.key for cell in CELLS] == ["family", "deltas", "averaging", "task_arithmetic", "regmean", "ties",
                                           "table", "newest"]
    assert all(re.match(rf"{i}\. ", cell.title) for i, cell in enumerate(CELLS, 1))
    keys = {Notebook().key(cell) for cell in CELLS}
    assert len(keys) == len(CELLS)  # each cell its own cache entry


def test_the_export_is_one_self_contained_page_of_every_cell(guide_cache, tmp_path):
    calls: list = []
    notebook = Notebook([counting_cell(calls, "ran"), counting_cell(calls, "later"),
                         Cell("evil", "<script>alert(1)</script>", "<img src=x onerror=alert(2)>", lambda c: Output())])
    notebook.run("ran")
    page = notebook.export(tmp_path / "out" / "tour.html").read_text(encoding="utf-8")
    assert page.count("<section") == 3 and "Not run yet" in page and "<strong>ran</strong> 1" in page
    assert "<em>δ = θ − θ_base</em>" in page  # the cell's Markdown, rendered
    assert page.count("Plotly.newPlot") == 1 and "<script src" not in page  # plotly.js inlined: opens offline
    assert "<script>alert(1)" not in page and "<img src=x" not in page  # titles and texts are not markup
    assert "<td>m</td><td>1</td>" in page
    data = json.loads(cache.read(notebook.key(notebook.cell("ran"))))
    assert data["summary"] == "**ran** 1" and len(data["figures"]) == 1


def test_the_jupyter_notebook_tells_the_same_story_and_is_kept_without_outputs():
    """notebooks/tour.ipynb is written from the cells (notebooks/make_tour.py): a cell changed without
    rewriting it fails here, so the two never drift apart."""
    notebook = json.loads((REPO / "notebooks" / "tour.ipynb").read_text(encoding="utf-8"))
    markdown = [("".join(cell["source"])) for cell in notebook["cells"] if cell["cell_type"] == "markdown"]
    for cell in CELLS:
        assert f"## {cell.title}\n\n{cell.text}" in markdown, f"rerun python notebooks/make_tour.py ({cell.key})"
    assert all(not cell.get("outputs") for cell in notebook["cells"] if cell["cell_type"] == "code")
    assert not any("import gradio" in "".join(cell["source"]) or "studio" in "".join(cell["source"])
                   for cell in notebook["cells"] if cell["cell_type"] == "code")  # the Python API, no UI code


def test_a_hosted_guide_never_builds_the_family_for_a_visitor(guide_cache, monkeypatch):
    """Hosted (``may_build=False``) and the family missing: a clear refusal, nothing run; the
    cached outputs are still shown."""
    import demo

    calls: list = []
    Notebook([counting_cell(calls, "shown")]).run("shown")
    monkeypatch.setattr(demo, "is_ready", lambda: False)
    monkeypatch.setattr(demo, "ensure_family", lambda report=None: pytest.fail("the family was built"))
    hosted = Notebook([counting_cell(calls, "shown"), counting_cell(calls, "fresh")], may_build=False)
    assert hosted.run("shown").summary == "**ran** 1"  # from the cache
    with pytest.raises(Exception, match="not built on this server.*python -m merging zoo --list"):
        hosted.run("fresh")
    assert len(calls) == 1

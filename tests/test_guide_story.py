"""The Guide's whole story on the demo family (issue #18): in Chromium, "Run all" from an empty cache
fills every cell (Plotly figures drawn, tables filled, the merge answering); a second visitor sees
every output at once; the download is the whole notebook as one page. Then notebooks/tour.ipynb
runs under nbclient against the same results and prints the Guide's numbers.

The two Run-all timings are printed and written to ``guide-timings.json`` beside the screenshots
(``MERGE_STUDIO_SCREENSHOTS``, else the test's tmp folder): the README quotes them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import demo
from guide import CELLS, Notebook
from guide import cache
from test_studio import launch

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parent.parent
needs_demo = pytest.mark.skipif(not demo.is_ready(), reason="needs the demo family: python -m merging zoo --list")
pytestmark = needs_demo


@pytest.fixture(scope="module")
def guide_cache(tmp_path_factory):
    """An empty Guide cache for this module (the user's own is left alone)."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("guide-cache")
    mp.setenv(cache.CACHE_ENV, str(folder))
    yield folder
    mp.undo()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MERGE_STUDIO_SCREENSHOTS") or tmp_path_factory.mktemp("guide-shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _figures_drawn(page, cell) -> int:
    return page.locator(f"#guide-{cell.key} .js-plotly-plot").count()


def _all_drawn(page) -> bool:
    return all(_figures_drawn(page, cell) >= cell.figures for cell in CELLS)


def test_run_all_fills_every_cell_and_a_second_visitor_sees_them_at_once(guide_cache, shots, tmp_path):
    from playwright.sync_api import sync_playwright

    from studio import Settings

    settings = Settings(work_dir=tmp_path / "work", device="cpu")  # the demo family
    app, url = launch(settings)
    timings = {}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                                 args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            first_tab = page.get_by_role("tab").first
            assert first_tab.inner_text().strip() == "Guide" and first_tab.get_attribute("aria-selected") == "true"
            page.wait_for_selector("#guide-run-all")
            assert page.get_by_text("Not run yet: press Run.").count() == len(CELLS)

            started = time.perf_counter()
            page.click("#guide-run-all")
            page.locator("#guide-status").get_by_text(f"All {len(CELLS)} cells ran.").wait_for(timeout=1_500_000)
            timings["run_all_seconds"] = round(time.perf_counter() - started, 1)
            page.wait_for_function("() => document.querySelectorAll('.guide-cell .js-plotly-plot').length >= "
                                   f"{sum(cell.figures for cell in CELLS)}")
            for cell in CELLS:
                assert _figures_drawn(page, cell) == cell.figures, cell.key
                assert page.locator(f"#guide-{cell.key} .main-svg").count() >= cell.figures  # drawn, not just placed
                rows = page.locator(f"#guide-{cell.key} table tbody tr")
                assert (rows.count() > 0) == (cell.tables > 0), cell.key
                assert page.locator(f"#guide-{cell.key}").get_by_text("✓ ran in").count() == 1, cell.key
            table = page.locator("#guide-table table").first.inner_text()
            assert "general (kept)" in table and "regmean++ (exact)" in table and "expert: people" in table
            answers = page.locator("#guide-newest table").last.inner_text()
            assert "Quillport" in answers and "Paris" in answers  # the best merge answers, beside its sources
            page.screenshot(path=str(shots / "guide.png"))
            for key in ("ties", "table"):
                page.locator(f"#guide-{key}").screenshot(path=str(shots / f"guide-{key}.png"))

            page.get_by_role("button", name="Download this notebook (HTML)").click()  # a link appears in gr.File
            link = page.locator("a[href*='merge-studio-guide.html']").first
            link.wait_for()
            exported = page.request.get(link.get_attribute("href")).text()
            assert exported.count("<section") == len(CELLS) and "Not run yet" not in exported
            assert exported.count("Plotly.newPlot") == sum(cell.figures for cell in CELLS) + 1  # + the library's own

            second = browser.new_page(viewport={"width": 1400, "height": 1000})
            started = time.perf_counter()
            second.goto(url)
            second.wait_for_function("() => document.querySelectorAll('.guide-cell .js-plotly-plot').length >= "
                                     f"{sum(cell.figures for cell in CELLS)}", timeout=60_000)
            timings["second_visit_seconds"] = round(time.perf_counter() - started, 1)
            assert second.get_by_text("✓ from the cache").count() == len(CELLS)
            assert not errors, errors
            browser.close()
    finally:
        app.close()
    (shots / "guide-timings.json").write_text(json.dumps(timings) + "\n")
    print(f"Guide timings: {timings}")
    assert timings["second_visit_seconds"] < 30 < timings["run_all_seconds"]


def test_the_notebook_runs_under_nbclient_and_shows_the_guides_numbers(guide_cache, tmp_path):
    """notebooks/tour.ipynb top to bottom (after the browser test, its merges come from the same
    cache: the notebook's own code runs, the models are not merged twice)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks" / "tour.ipynb", as_version=4)
    summary = tmp_path / "numbers.json"
    env = {"MERGE_STUDIO_TOUR_NUMBERS": str(summary), "PYTHONPATH": str(REPO)}
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        for key, value in previous.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors, errors
    theirs = json.loads(summary.read_text())
    table = {row["model"]: row for row in Notebook().cached("table").tables[0][1]}
    assert set(theirs) == set(table)
    for model, row in theirs.items():
        assert row == table[model], model

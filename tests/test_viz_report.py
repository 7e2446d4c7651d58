"""``python -m viz report``: the sweep through the engine, the report folder, errors, and the page
rendered in a real browser (headless Chromium)."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from helpers import REPO, CliResult, error_line, load_model_tensors
from merging.engine import merge
from merging.errors import Cancelled, MergeCancelled, SourceError
from merging.recipe import load_recipe
from test_viz_stats import viz_family
from viz import cli
from viz.measures import top_count
from viz.stats import delta_statistics
from viz.sweep import dare_sweep, sweep_recipe

CHROMIUM = "/usr/bin/chromium"
FIGURES = ["magnitudes", "relative_norm", "energy", "sign_conflicts", "similarity", "spectra", "spectral_energy",
           "subspace_overlap", "sweep"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def run_viz(capsys, *args) -> CliResult:
    """``python -m viz ARGS`` in this process (its imports are already loaded); see also the fresh run below."""
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return CliResult(code, out, err)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A full report (statistics with a TIES merge to compare, and a two-point sweep on a JSONL suite
    and a text) of a tiny family."""
    fam = viz_family()
    root = tmp_path_factory.mktemp("viz-report")
    merged = root / "ties"
    merge(load_recipe({"merge_method": "ties", "base_model": str(fam.base), "models": [
        {"model": str(m), "parameters": {"weight": 1.0, "density": 0.3}} for m in fam.finetuned]}), merged, device="cpu")
    suite = root / "suite.jsonl"
    suite.write_text("".join(json.dumps({"prompt": f"Say {w}.", "answer": w}) + "\n" for w in ("apple", "river")))
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    out = root / "report"
    code = cli.main(["report", str(fam.base), *map(str, fam.finetuned), "--out", str(out), "--suite", str(suite),
                     "--text", str(text), "--rates", "0.9", "--device", "cpu", "--quiet", "--merged", str(merged)])
    assert code == 0
    return out


def test_report_folder_holds_the_page_and_the_numbers(report):
    assert sorted(p.name for p in report.iterdir()) == ["report.html", "stats.json", "sweep.json"]
    assert not [p for p in report.parent.iterdir() if p.name.startswith(".report.")]  # no partial folder left
    stats = json.loads((report / "stats.json").read_text())
    assert list(stats["models"]) == ["ft1", "ft2", "ft3"] and stats["density"] == 0.2
    assert stats["merged_label"] == "ties" and stats["merged"].endswith("ties")
    spectral = stats["model"]["spectral"]
    assert set(spectral["energy_top"]) == {"ft1", "ft2", "ft3"} and spectral["merged_overlap_left"]["ft1"]["ft2"] is not None
    sweep = json.loads((report / "sweep.json").read_text())
    assert [(p["method"], p["drop_rate"]) for p in sweep["points"]] == [
        ("random", 0.0), ("magnitude", 0.0), ("random", 0.9), ("magnitude", 0.9)]
    assert all(p["perplexity"] > 1 for p in sweep["points"]) and sweep["tasks"] == ["suite"]
    page = (report / "report.html").read_text()
    assert "<script src=" not in page and "Plotly.newPlot" in page  # plotly.js inlined: opens offline
    for name in FIGURES:
        assert f'id="figure-{name}"' in page
    for heading in ("What it shows.", "How to read it.", "Where it breaks", "Subspace interference between tasks",
                    "Effective rank: how low-rank each task vector is", "merged model ties"):
        assert heading in page


def test_existing_output_and_bad_input_are_one_line_errors(report, capsys, tmp_path):
    fam = viz_family()
    models = [fam.base, fam.finetuned[0]]
    message = error_line(run_viz(capsys, "report", *models, "--out", tmp_path / "m", "--merged", fam.finetuned[1],
                                 "--no-spectra", "--no-sweep"))
    assert "--merged" in message and "--no-spectra" in message
    message = error_line(run_viz(capsys, "report", *models, "--out", report, "--no-sweep"))
    assert "not empty" in message and "--overwrite" in message
    assert "density" in error_line(run_viz(capsys, "report", *models, "--out", tmp_path / "a", "--density", "1.5", "--no-sweep"))
    assert "not found" in error_line(run_viz(capsys, "report", fam.base, tmp_path / "nope", "--out", tmp_path / "b", "--no-sweep"))
    assert "not found" in error_line(run_viz(capsys, "report", *models, "--out", tmp_path / "c", "--suite", tmp_path / "x.jsonl"))
    inside = error_line(run_viz(capsys, "report", *models, "--out", fam.base / "report", "--no-sweep"))
    assert "overlaps the source model folder" in inside and not (fam.base / "report").exists()
    for name in "abc":
        assert not (tmp_path / name).exists()
    # an existing empty folder is used; --overwrite replaces a report
    (tmp_path / "empty").mkdir()
    assert run_viz(capsys, "report", *models, "--out", tmp_path / "empty", "--no-sweep").returncode == 0
    assert run_viz(capsys, "report", *models, "--out", tmp_path / "empty", "--no-sweep", "--overwrite", "--density", "0.5").returncode == 0
    assert json.loads((tmp_path / "empty" / "stats.json").read_text())["density"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_fresh_process_error_is_one_line(report):
    fam = viz_family()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "viz", "report", str(fam.base), str(fam.finetuned[0]), "--out", str(report)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert "is not empty" in error_line(CliResult(done.returncode, done.stdout, done.stderr))


def test_sweep_merges_are_dare_and_pure_magnitude_trim(tmp_path):
    """ties with one model and weight 1 is θ_base + δ trimmed to its top-density |δ| per tensor,
    exactly; dare_linear keeps ~density of δ, rescaled by 1/density."""
    fam = viz_family()
    base = load_model_tensors(fam.base)
    model = load_model_tensors(fam.finetuned[0])
    for method in ("magnitude", "random"):
        merge(load_recipe(sweep_recipe(str(fam.base), str(fam.finetuned[0]), method, 0.5)), tmp_path / method, device="cpu")
    trimmed = load_model_tensors(tmp_path / "magnitude")
    dropped = load_model_tensors(tmp_path / "random")
    name = "model.layers.1.mlp.down_proj.weight"
    delta = (model[name] - base[name]).reshape(-1)
    keep = torch.zeros_like(delta)
    keep[delta.abs().argsort(descending=True)[:top_count(0.5, delta.numel())]] = 1.0
    assert torch.equal(trimmed[name].reshape(-1), base[name].reshape(-1) + delta * keep)
    kept = (dropped[name] - base[name]).reshape(-1)
    survivors = kept != 0
    assert 0.48 < survivors.double().mean().item() < 0.52
    torch.testing.assert_close(kept[survivors], 2 * delta[survivors], rtol=1e-5, atol=1e-7)


class StopPressedIn(threading.Event):
    """The Stop button pressed while code of ``module`` runs: set the first time that module polls it."""

    def __init__(self, module: str):
        super().__init__()
        self.module = module

    def is_set(self) -> bool:
        frame = sys._getframe(1)
        while frame is not None:  # polled inside ``module`` (through whatever helper it calls)
            if frame.f_globals.get("__name__", "").startswith(self.module):
                self.set()
                break
            frame = frame.f_back
        return super().is_set()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("viz-sweep") / "suite.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {w}.", "answer": w}) + "\n" for w in ("apple", "river")))
    return path


@pytest.mark.parametrize("module", ["evaluation", "merging.engine"])
def test_stop_takes_effect_within_a_merge_or_an_evaluation(module, suite, tmp_path):
    fam = viz_family()
    stop = StopPressedIn(module)
    with pytest.raises(Cancelled) as stopped:
        dare_sweep(fam.base, fam.finetuned[0], rates=(0.5,), methods=("random",), suite=suite, device="cpu",
                   workdir=tmp_path, cancel=stop)
    # an evaluation stops with Cancelled, a merge with its subclass: the tab catches the base class
    assert isinstance(stopped.value, MergeCancelled) == (module == "merging.engine")
    assert list(tmp_path.iterdir()) == []  # no merged model left behind


def test_a_stop_after_the_last_point_keeps_the_finished_sweep(suite):
    fam = viz_family()
    stop = threading.Event()

    def progress(done: int, total: int, what: str) -> None:
        if done == total:
            stop.set()  # pressed as the last evaluation finished

    result = dare_sweep(fam.base, fam.finetuned[0], rates=(0.5,), methods=("random",), suite=suite, device="cpu",
                        progress=progress, cancel=stop)
    assert stop.is_set() and [(p.method, p.drop_rate) for p in result.points] == [("random", 0.0), ("random", 0.5)]


def test_bad_drop_rates_fail_before_any_model_is_read(capsys, tmp_path):
    fam = viz_family()
    for rates in ("0.5,1", "-0.1", "nan"):
        # the fine-tuned model is missing too: the rates are checked first, not after the statistics
        message = error_line(run_viz(capsys, "report", fam.base, tmp_path / "missing", "--out", tmp_path / "out",
                                     "--rates", rates))
        assert message.startswith("drop rate ") and "[0, 1)" in message, message
    assert not (tmp_path / "out").exists()


def test_debug_goes_before_or_after_the_command(capsys, tmp_path):
    fam = viz_family()
    command = ["report", str(fam.base), str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--no-sweep"]
    for argv in (["--debug", *command], [*command, "--debug"], ["report", "--debug", *command[1:]]):
        with pytest.raises(SourceError, match="not found"):  # the traceback, not the one-line error
            cli.main(argv)
    assert "not found" in error_line(run_viz(capsys, *command))


HOSTILE = "<img src=x onerror=alert(1)>"


def test_findings_are_one_text_that_escapes_model_labels():
    """The tab and the report say the same findings (viz.report.findings), with user-chosen model
    labels escaped: shown as written, never run as markup."""
    from studio.redundancy_tab import findings_markdown as tab_findings
    from viz.report import findings, render_html

    fam = viz_family()
    stats = delta_statistics(fam.base, fam.finetuned[:2], labels=[HOSTILE, "b"], device="cpu", threads=1)
    lines = findings(stats)
    assert len(lines) == 5 and all(HOSTILE not in line for line in lines)
    assert "&lt;img src=x onerror=alert(1)&gt;" in lines[0] and "&lt;img src=x onerror=alert(1)&gt;" in lines[3]
    assert "largest 20%" in lines[1] and "disagree in sign" in lines[2] and "density 0.2" in lines[2]
    assert "top 1% / 5% / 10% of each weight matrix's singular values" in lines[3]
    assert "singular subspaces overlap" in lines[4] and "random subspaces" in lines[4]
    markdown = tab_findings(stats)
    assert HOSTILE not in markdown and markdown.startswith("Measured ")
    assert all(f"- {line}" in markdown.splitlines() for line in lines)
    page = render_html(stats)
    assert HOSTILE not in page and all(f"<li>{line}</li>" in page for line in lines)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")
def test_report_renders_every_figure_in_headless_chromium(report, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto((report / "report.html").as_uri())
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length === {len(FIGURES)}", timeout=30_000)
            rendered = page.eval_on_selector_all(".js-plotly-plot", """plots => plots.map(p => ({
                id: p.id,
                svgs: p.querySelectorAll('svg.main-svg').length,
                marks: p.querySelectorAll('.scatterlayer .trace path, .heatmaplayer image, .hm image').length,
                title: (p.querySelector('.gtitle') || {}).textContent || '',
                width: p.getBoundingClientRect().width,
            }))""")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert [r["id"] for r in rendered] == [f"figure-{name}" for name in FIGURES]
    for plot in rendered:
        assert plot["svgs"] >= 2 and plot["marks"] > 0 and plot["title"] and plot["width"] > 600, plot
    assert (tmp_path / "report.png").stat().st_size > 50_000

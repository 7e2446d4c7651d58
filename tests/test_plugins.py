"""A merge method kept outside the project: one file named in $MERGE_STUDIO_PLUGINS appears in
``python -m merging methods``, the README table generator, the engine and the Merge tab's controls."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from helpers import family, load_model_tensors, run_cli
from merging.methods import PLUGINS_ENV, REGISTRY, load_plugins
from merging.errors import MergeStudioError

PLUGIN = textwrap.dedent('''
    """A made-up method: the base plus each task vector scaled by its own 'tilt'."""

    from merging.methods.kernels import weighted_sum
    from merging.methods.spec import MethodSpec, Param, register

    TILT = Param("tilt", float, 0.25, "model", "How far toward this model the base moves.", low=0.0, high=1.0)


    @register(MethodSpec(
        name="tilted_sum", title="Tilted sum", paper="https://example.org/tilted-sum",
        summary="θ = θ_base + Σ tᵢ(θᵢ − θ_base).", params=(TILT,), needs_base=True, base="origin",
        family="other", guidance="Tilts of 0.1-0.3 keep the base recognisable.", suggested={"tilt": 0.2},
    ))
    def tilted_sum(base, tensors, per_model, params, seed):
        tilts = [p["tilt"] for p in per_model]
        return weighted_sum([base, *tensors], [1.0 - sum(tilts), *tilts])
''')


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    path = tmp_path / "elsewhere" / "tilted_sum.py"
    path.parent.mkdir()
    path.write_text(PLUGIN)
    monkeypatch.setenv(PLUGINS_ENV, str(path))
    before = dict(REGISTRY)
    yield path
    REGISTRY.clear()  # the rest of the suite sees the built-in methods only
    REGISTRY.update(before)


def test_the_cli_lists_and_runs_a_plugin_method_and_the_readme_table_has_it(plugin, tmp_path):
    listed = run_cli("methods", fresh=True)
    assert listed.returncode == 0, listed.stderr
    assert "tilted_sum: Tilted sum" in listed.stdout and "tilt (float, per model, default 0.25" in listed.stdout
    table = run_cli("methods", "--markdown", fresh=True)
    assert re.search(r"^\| \[`tilted_sum`\]\(https://example.org/tilted-sum\) \| θ = θ_base .* \| `tilt` \(per model\) = 0.25 \|$",
                     table.stdout, re.M), table.stdout

    fam = family("llama", 2, hidden_size=64, vocab_size=512)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "tilted_sum", "base_model": str(fam.base),
                                      "models": [{"model": str(m), "parameters": {"tilt": 0.5}} for m in fam.finetuned]}))
    merged = run_cli("merge", recipe, tmp_path / "out", fresh=True)
    assert merged.returncode == 0, merged.stderr
    out, base, a, b = (load_model_tensors(p) for p in (tmp_path / "out", fam.base, *fam.finetuned))
    name = "model.layers.0.mlp.down_proj.weight"
    assert (out[name] - 0.5 * (a[name] + b[name])).abs().max() < 1e-6  # base + ½δa + ½δb


def test_a_plugin_that_fails_to_load_is_one_clear_error(tmp_path, monkeypatch):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('half-written plugin')\n")
    monkeypatch.setenv(PLUGINS_ENV, str(broken))
    result = run_cli("methods", fresh=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot load merge-method plugin" in result.stderr and "half-written plugin" in result.stderr
    with pytest.raises(MergeStudioError, match="no such file"):
        load_plugins(str(tmp_path / "missing.py"))


def test_the_merge_tab_offers_a_plugin_method_with_controls_from_its_spec(plugin, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from test_browser_studio import CHROMIUM, TIMEOUT_MS
    from test_studio import launch
    from studio import Settings

    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium (apt install chromium)")
    load_plugins()
    assert "tilted_sum" in REGISTRY
    fam = family("llama", 2, hidden_size=64, vocab_size=512)
    settings = Settings(work_dir=tmp_path / "work", device="cpu").with_models(
        {"base": fam.base, "a": fam.finetuned[0], "b": fam.finetuned[1]})
    demo, url = launch(settings)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.get_by_role("tab", name="Merge").click()
            page.get_by_label("Merge method").click()
            page.get_by_role("option", name="Tilted sum — tilted_sum", exact=True).click()
            page.get_by_text("Tilts of 0.1-0.3 keep the base recognisable.").wait_for()  # its guidance
            tilts = page.get_by_label("number input for tilt")
            expect(tilts).to_have_count(2)  # one control per model, from the spec
            expect(tilts.first).to_have_value("0.2")  # its suggested starting value
            page.wait_for_function("() => document.querySelector('.cm-content').innerText.includes('tilt: 0.2')")
            assert "merge_method: tilted_sum" in page.locator(".cm-content").inner_text()  # the recipe that runs
            browser.close()
    finally:
        demo.close()

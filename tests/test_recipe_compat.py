"""Recipes as people publish them run as mergekit runs them: keys mergekit ignores are warnings
(errors with --strict), YAML 1.1 number strings are numbers, and multi-stage recipes run in order.

Each "same as mergekit" check merges the recipe with mergekit 0.1.5 (one ``mergekit-multi`` run
for the module) and with our CLI, and compares every tensor to 1e-5."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from helpers import error_line, load_model_tensors, run_cli
from merging.errors import RecipeError
from merging.recipe import load_recipe, load_stages
from tests.support.mergekit import MERGEKIT_MULTI, compare, Case, finish, run_mergekit_multi

needs_mergekit = pytest.mark.skipif(not MERGEKIT_MULTI, reason="mergekit is not installed")

# A ties recipe as found on model cards: typos, a method parameter at the top level, a key in the
# wrong scope and YAML 1.1 number strings. mergekit ignores the first four and converts the last.
PUBLISHED_TIES = """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters:
      density: 5e-1
      weight: 0.6
      normalize: false
  - model: {b}
    parameters: {{density: 0.7, weight: 4e-1}}
parameters:
  lamda: 0.5
  nomalize: true
  dtype: bfloat16
  int8_mask: true
normalize: false
dype: bfloat16
dtype: float32
"""


@pytest.fixture(scope="module")
def published(llama_family, tmp_path_factory):
    folder = tmp_path_factory.mktemp("published")
    text = PUBLISHED_TIES.format(base=llama_family.base, a=llama_family.finetuned[0], b=llama_family.finetuned[1])
    path = folder / "published.yaml"
    path.write_text(text)
    return path


def test_every_ignored_key_is_named_with_the_nearest_known_one(published):
    recipe = load_recipe(published)
    notes = "\n".join(recipe.warnings)
    assert len(recipe.warnings) == 6, notes
    assert "'lamda' is ignored (mergekit ignores it too); did you mean 'lambda'?" in notes
    assert "'nomalize' is ignored" in notes and "did you mean 'normalize'?" in notes
    assert "recipe: 'normalize' is ignored" in notes and "put it under 'parameters:'" in notes
    assert "recipe: 'dype' is ignored" in notes and "did you mean 'dtype'?" in notes
    assert "parameters: 'dtype' is ignored" in notes and "top-level key" in notes
    assert "'normalize' is ignored" in notes and "global parameter of ties" in notes  # inside a model entry
    # what mergekit reads is read, with its YAML 1.1 strings as numbers
    assert recipe.models[0].parameters["density"] == 0.5 and recipe.models[1].parameters["weight"] == 0.4
    assert recipe.parameters == {"int8_mask": True} and recipe.dtype == "float32"
    assert "lamda" not in recipe.to_yaml() and "dype" not in recipe.to_yaml()


def test_the_cli_warns_and_merges_and_strict_refuses(published, tmp_path):
    result = run_cli("merge", published, tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 6 and any("'lamda'" in w for w in warnings)
    message = error_line(run_cli("merge", published, tmp_path / "strict", "--strict"))
    assert "is ignored" in message and "--strict" in message
    assert not (tmp_path / "strict").exists()


@needs_mergekit
def test_a_published_recipe_with_ignored_keys_gives_mergekits_result(published, llama_family, tmp_path):
    ours = tmp_path / "ours"
    assert run_cli("merge", published, ours, "--quiet").returncode == 0
    theirs = run_mergekit_multi({"published": yaml.safe_load(published.read_text())}, tmp_path / "mergekit")["published"]
    case = Case({}, llama_family.base, tuple(llama_family.finetuned[:2]), trims=True)
    compare(case, load_model_tensors(ours), load_model_tensors(theirs))


def test_strict_parsing_names_the_key(published):
    with pytest.raises(RecipeError, match="'lamda' is ignored"):
        load_recipe(published, strict=True)


def test_ignored_keys_of_other_methods_and_places():
    recipe = load_recipe("""
merge_method: linear
models:
  - model: a/b
    parameters: {weight: 1, density: 0.3}
    revision: main
  - {model: c/d}
parameters: {int8_mask: true, t: 0.5}
""")
    notes = "\n".join(recipe.warnings)
    assert "models[0].parameters (a/b): 'density' is ignored" in notes and "linear does not read it" in notes
    assert "models[0] (a/b): 'revision' is ignored" in notes
    assert "parameters: 'int8_mask' is ignored" in notes and "parameters: 't' is ignored" in notes


MULTI_STAGE = """
name: pair
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.7}}}}
  - {{model: {b}, parameters: {{weight: 0.4}}}}
dtype: float32
---
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: pair}}]
parameters: {{t: [0.2, 0.8]}}
dtype: float32
"""


@needs_mergekit
def test_a_multi_stage_recipe_runs_in_order_like_mergekit_multi(llama_family, tmp_path):
    text = MULTI_STAGE.format(base=llama_family.base, a=llama_family.finetuned[0], b=llama_family.finetuned[1])
    recipe = tmp_path / "stages.yaml"
    recipe.write_text(text)
    stages = load_stages(recipe)
    assert [s.name for s in stages] == ["pair", None]
    ours = tmp_path / "ours"
    first = run_cli("merge", recipe, ours, "--quiet", "--json")
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "ours-stages" / "pair" / "model.safetensors").is_file()  # the intermediate, kept
    stamp = (tmp_path / "ours-stages" / "pair" / "model.safetensors").stat().st_mtime_ns
    assert run_cli("merge", recipe, tmp_path / "again", "--quiet", "--intermediate-dir", tmp_path / "ours-stages").returncode == 0
    assert (tmp_path / "ours-stages" / "pair" / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not redone

    finish(subprocess.Popen([MERGEKIT_MULTI, str(recipe), "--intermediate-dir", str(tmp_path / "mk-stages"),
                             "--out-path", str(tmp_path / "mergekit"), "--no-lazy"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path), "mergekit-multi")
    compare(Case({}, None), load_model_tensors(ours), load_model_tensors(tmp_path / "mergekit"))


def test_a_failing_stage_is_named_and_a_stage_cannot_use_a_later_one(llama_family, tmp_path):
    broken = MULTI_STAGE.format(base=llama_family.base, a=llama_family.finetuned[0], b=tmp_path / "missing")
    (tmp_path / "broken.yaml").write_text(broken)
    assert error_line(run_cli("merge", tmp_path / "broken.yaml", tmp_path / "out")).startswith("stage 'pair': ")
    backwards = "\n---\n".join(reversed(MULTI_STAGE.format(
        base=llama_family.base, a=llama_family.finetuned[0], b=llama_family.finetuned[1]).split("\n---\n")))
    backwards = backwards.replace("merge_method: slerp", "name: final\nmerge_method: slerp", 1)
    (tmp_path / "backwards.yaml").write_text(backwards)
    assert "comes after it" in error_line(run_cli("merge", tmp_path / "backwards.yaml", tmp_path / "out2"))
    with pytest.raises(RecipeError, match="except, at most, the final one"):
        load_stages("merge_method: linear\nmodels: [a/b]\n---\nmerge_method: linear\nmodels: [c/d]\n")


def test_the_recipe_of_a_merged_model_is_printed_and_runs_again(llama_family, tmp_path):
    text = f"merge_method: linear\nmodels:\n  - model: {llama_family.finetuned[0]}\n  - model: {llama_family.finetuned[1]}\n"
    (tmp_path / "recipe.yaml").write_text(text)
    assert run_cli("merge", tmp_path / "recipe.yaml", tmp_path / "ours", "--quiet").returncode == 0
    printed = run_cli("recipe", tmp_path / "ours")
    assert printed.returncode == 0 and load_recipe(printed.stdout).merge_method == "linear"
    # what mergekit leaves: mergekit_config.yml, or only a model card with the recipe in a YAML block
    mergekit_style = tmp_path / "mergekit-style"
    mergekit_style.mkdir()
    (mergekit_style / "README.md").write_text(
        "---\nbase_model: []\ntags: [mergekit]\n---\n# A merge\n\n```yaml\n" + text.replace("linear", "linear  # ours") + "```\n")
    card = run_cli("recipe", mergekit_style)
    assert card.returncode == 0 and "merge_method: linear" in card.stdout
    (mergekit_style / "mergekit_config.yml").write_text(text)
    assert run_cli("recipe", mergekit_style).stdout.strip() == text.strip()
    (tmp_path / "again.yaml").write_text(run_cli("recipe", mergekit_style).stdout)
    assert run_cli("merge", tmp_path / "again.yaml", tmp_path / "again", "--quiet").returncode == 0
    assert load_model_tensors(tmp_path / "again").keys() == load_model_tensors(tmp_path / "ours").keys()
    empty = tmp_path / "plain"
    empty.mkdir()
    assert "has no recipe" in error_line(run_cli("recipe", empty))


def test_the_studio_merges_a_multi_stage_recipe_and_loads_a_merged_models_recipe(llama_family, tmp_path):
    from gradio_client import Client
    from playwright.sync_api import sync_playwright

    from studio import Settings
    from test_browser_studio import CHROMIUM, TIMEOUT_MS
    from test_studio import launch

    settings = Settings(work_dir=tmp_path / "work", device="cpu").with_models(
        {"base": llama_family.base, "a": llama_family.finetuned[0], "b": llama_family.finetuned[1]})
    demo, url = launch(settings)
    try:
        text = MULTI_STAGE.format(base=llama_family.base, a=llama_family.finetuned[0], b=llama_family.finetuned[1])
        summary = Client(url, verbose=False).predict(text, api_name="/merge_recipe")
        assert summary["method"] == "slerp" and summary["tensors"] > 0
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.get_by_role("tab", name="Merge").click()
            page.get_by_placeholder("org/merged-model").fill(summary["output"])
            page.get_by_role("button", name="Load its recipe").click()
            page.wait_for_function("() => document.querySelector('.cm-content').innerText.includes('merge_method: slerp')")
            page.get_by_text("✓ valid recipe").wait_for()
            browser.close()
    finally:
        demo.close()

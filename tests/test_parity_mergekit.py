"""Parity with mergekit 0.1.5: the same YAML recipe gives the same tensors.

Every case runs through one ``mergekit-multi`` process (``tests/support/mergekit.py``, which also
documents the tolerance and the magnitude-tie exception). One case is also run by ``mergekit-yaml``
itself, in parallel, to show the two agree bit for bit, and our side of that case runs through
our CLI as a fresh ``python -m merging`` process. ``test_magnitude_trim_keeps_exactly_k_at_ties``
pins the tie count.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import load_model_tensors, run_cli, write_recipe
from tests.support.mergekit import (
    MERGEKIT_MULTI,
    MERGEKIT_YAML,
    TOLERANCE,
    Case,
    model_entry as _model,
    compare,
    finish,
    run_mergekit_multi,
    start_mergekit_yaml,
)

pytestmark = pytest.mark.skipif(
    not (MERGEKIT_YAML and MERGEKIT_MULTI),
    reason="mergekit is not installed (pip install -r requirements-dev.txt)",
)

CLI_CASE = "linear_llama_nobase"  # also run by mergekit-yaml, and by our CLI in a fresh process


def build_cases(llama, qwen2, gpt2) -> dict[str, Case]:
    """Every parity case; together they cover the recipe features mergekit users rely on."""
    L, Q, G = llama, qwen2, gpt2
    return {
        # linear without base_model; weights sum to 1.2; normalize defaults to true
        CLI_CASE: Case({
            "merge_method": "linear",
            "models": [_model(L.finetuned[0], weight=0.7), _model(L.finetuned[1], weight=0.5)],
            "dtype": "float32",
        }, None),
        # linear with base_model listed among the models, normalize false; untied lm_head
        "linear_qwen2_base": Case({
            "merge_method": "linear",
            "base_model": str(Q.base),
            "models": [_model(Q.base, weight=0.2), _model(Q.finetuned[0], weight=0.5),
                       _model(Q.finetuned[1], weight=0.6)],
            "parameters": {"normalize": False},
            "dtype": "float32",
        }, None),
        # task arithmetic with a negative weight, normalize true (not the default), lambda
        "task_arithmetic_qwen2": Case({
            "merge_method": "task_arithmetic",
            "base_model": str(Q.base),
            "models": [_model(Q.finetuned[0], weight=0.6), _model(Q.finetuned[1], weight=-0.3)],
            "parameters": {"normalize": True, "lambda": 0.8},
            "dtype": "float32",
        }, None),
        # TIES over 3 fine-tunes: different weights (sum 1.4) and densities, a density gradient,
        # a density only in the global parameters (fallback), lambda, normalize by default
        "ties_llama_3models": Case({
            "merge_method": "ties",
            "base_model": str(L.base),
            "models": [_model(L.finetuned[0], weight=0.7, density=0.3),
                       _model(L.finetuned[1], weight=0.5, density=[0.3, 0.9]),
                       _model(L.finetuned[2], weight=0.2)],
            "parameters": {"density": 0.6, "lambda": 1.3},
            "dtype": "float32",
        }, L.base, tuple(L.finetuned), trims=True),
        # TIES with a {filter, value} density list and normalize false
        "ties_qwen2_filter": Case({
            "merge_method": "ties",
            "base_model": str(Q.base),
            "models": [_model(Q.finetuned[0], weight=1.0, density=[{"filter": "mlp", "value": 0.2}, {"value": 0.7}]),
                       _model(Q.finetuned[1], weight=0.4, density=0.5)],
            "parameters": {"normalize": False},
            "dtype": "float32",
        }, Q.base, tuple(Q.finetuned), trims=True),
        "ties_gpt2": Case({
            "merge_method": "ties",
            "base_model": str(G.base),
            "models": [_model(G.finetuned[0], weight=0.6, density=0.4), _model(G.finetuned[1], weight=0.6, density=0.4)],
            "dtype": "float32",
        }, G.base, tuple(G.finetuned), trims=True),
        # Breadcrumbs on GPT-2: per-model gamma on one model, the default (0.01) on the other
        "breadcrumbs_gpt2": Case({
            "merge_method": "breadcrumbs",
            "base_model": str(G.base),
            "models": [_model(G.finetuned[0], weight=0.6, density=0.8, gamma=0.05),
                       _model(G.finetuned[1], weight=0.3, density=0.6)],
            "dtype": "float32",
        }, G.base, tuple(G.finetuned), trims=True),
        "breadcrumbs_ties_llama": Case({
            "merge_method": "breadcrumbs_ties",
            "base_model": str(L.base),
            "models": [_model(L.finetuned[0], weight=0.5, density=0.7, gamma=0.02),
                       _model(L.finetuned[1], weight=0.9, density=0.5)],
            "parameters": {"normalize": True, "lambda": 0.9},
            "dtype": "float32",
        }, L.base, tuple(L.finetuned[:2]), trims=True),
        # SLERP with a t gradient over the 3 layers (0, 0.5, 1); base listed first
        "slerp_llama_gradient": Case({
            "merge_method": "slerp",
            "base_model": str(L.base),
            "models": [_model(L.base), _model(L.finetuned[0])],
            "parameters": {"t": [0, 0.5, 1]},
            "dtype": "float32",
        }, None),
        # SLERP with a {filter, value} list (one entry itself a gradient); base listed second
        "slerp_qwen2_filter": Case({
            "merge_method": "slerp",
            "base_model": str(Q.base),
            "models": [_model(Q.finetuned[1]), _model(Q.base)],
            "parameters": {"t": [{"filter": "self_attn", "value": 0.3},
                                 {"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.7}]},
            "dtype": "float32",
        }, None),
    }


@pytest.fixture(scope="module")
def cases(llama_family, qwen2_family, gpt2_family) -> dict[str, Case]:
    return build_cases(llama_family, qwen2_family, gpt2_family)


@pytest.fixture(scope="module")
def mergekit_outputs(cases, tmp_path_factory) -> dict[str, Path]:
    """Run mergekit once over every case; returns case name -> output folder.

    Key ``"mergekit-yaml"`` holds ``CLI_CASE`` as merged by a separate ``mergekit-yaml`` run.
    """
    root = tmp_path_factory.mktemp("mergekit")
    single = write_recipe(root / f"{CLI_CASE}.yaml", cases[CLI_CASE].recipe)
    yaml_run = start_mergekit_yaml(single, root / "yaml")  # in parallel with the multi run
    outputs = run_mergekit_multi({name: case.recipe for name, case in cases.items()}, root)
    finish(yaml_run, "mergekit-yaml")
    outputs["mergekit-yaml"] = root / "yaml"
    return outputs


@pytest.fixture(scope="module")
def ours(cases, tmp_path_factory):
    """Our merged folder for a case (made once): in-process, or the CLI for ``CLI_CASE``."""
    from merging import load_recipe, merge

    root = tmp_path_factory.mktemp("ours")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = root / name
            if name == CLI_CASE:
                recipe = write_recipe(root / f"{name}.yaml", cases[name].recipe)
                result = run_cli("merge", recipe, out, "--device", "cpu", "--quiet", "--json", fresh=True)
                assert result.returncode == 0, result.stderr
                summary = json.loads(result.stdout.strip().splitlines()[-1])
                assert summary["method"] == "linear" and Path(summary["output"]) == out.absolute()
            else:
                merge(load_recipe(cases[name].recipe), out, device="cpu")
            done[name] = out
        return done[name]

    return get


# -- the tests ------------------------------------------------------------------------------

CASE_NAMES = [
    CLI_CASE, "linear_qwen2_base", "task_arithmetic_qwen2", "ties_llama_3models", "ties_qwen2_filter",
    "ties_gpt2", "breadcrumbs_gpt2", "breadcrumbs_ties_llama", "slerp_llama_gradient", "slerp_qwen2_filter",
]


def test_case_list_is_complete(cases):
    assert sorted(CASE_NAMES) == sorted(cases)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_same_tensors_as_mergekit(name, cases, mergekit_outputs, ours):
    notes = compare(cases[name], load_model_tensors(ours(name)), load_model_tensors(mergekit_outputs[name]))
    for note in notes:
        print(f"{name}: {note}")  # shown with -rP; see the module docstring


def test_mergekit_yaml_and_mergekit_multi_agree(mergekit_outputs):
    """The batch runner used above is mergekit's ordinary merge, bit for bit."""
    single, batch = load_model_tensors(mergekit_outputs["mergekit-yaml"]), load_model_tensors(mergekit_outputs[CLI_CASE])
    assert sorted(single) == sorted(batch)
    for name in single:
        assert torch.equal(single[name], batch[name]), name


def test_slerp_cases_leave_the_straight_line(cases, ours, llama_family, qwen2_family):
    """The SLERP parity cases exercise the spherical branch, not only its lerp fallback."""
    merged = load_model_tensors(ours("slerp_llama_gradient"))
    base, other = load_model_tensors(llama_family.base), load_model_tensors(llama_family.finetuned[0])
    name = "model.layers.1.mlp.up_proj.weight"  # middle layer: t = 0.5
    lerp = 0.5 * base[name] + 0.5 * other[name]
    # spherical and straight paths differ by ~3e-4 here, 30x the parity tolerance
    assert (merged[name] - lerp).abs().max() > 10 * TOLERANCE * lerp.abs().max()
    # the gradient's end points are the two models themselves
    assert torch.allclose(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert torch.allclose(merged["model.layers.2.mlp.up_proj.weight"], other["model.layers.2.mlp.up_proj.weight"])


def test_magnitude_trim_keeps_exactly_k_at_ties():
    from mergekit.sparsify import magnitude, magnitude_outliers

    from merging.methods.kernels import TaskVector, magnitude_keep, outlier_keep

    delta = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0, -1.0, 0.5])
    task_vector = TaskVector(delta, torch.zeros_like(delta))
    whole = slice(0, delta.numel())
    ours = magnitude_keep(task_vector, 0.5)(whole, delta)
    assert int((magnitude(delta, 0.5) != 0).sum()) == int(ours.sum()) == 4  # exactly k, like mergekit
    assert ours.tolist() == [True, True, True, True, False, False, False, False]  # earliest tie wins
    crumbs = outlier_keep(task_vector, 0.5, 0.125)(whole, delta)
    assert int((magnitude_outliers(delta, 0.5, gamma=0.125) != 0).sum()) == int(crumbs.sum()) == 4
    assert crumbs.tolist() == [False, True, True, True, True, False, False, False]


# -- the merged folder ----------------------------------------------------------------------

@pytest.mark.parametrize("name", [CLI_CASE, "linear_qwen2_base", "breadcrumbs_gpt2"])
def test_merged_folder_loads_with_transformers(name, ours):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ours(name)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    merged = load_model_tensors(folder)
    state = model.state_dict()
    for tensor_name, tensor in merged.items():  # the loaded weights are the merged tensors
        assert torch.equal(state[tensor_name], tensor), tensor_name
    ids = tokenizer("the merged model", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "the merged model"
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", [CLI_CASE, "ties_llama_3models", "slerp_qwen2_filter"])
def test_model_card_and_recipe_reproduce_the_merge(name, ours, tmp_path):
    folder = ours(name)
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("---\n")
    front_matter = yaml.safe_load(readme.split("---\n")[1])
    assert "merge-studio" in front_matter["tags"]
    assert front_matter["merge_method"] == yaml.safe_load((folder / "merge_recipe.yaml").read_text())["merge_method"]

    again = tmp_path / "again"
    result = run_cli("merge", folder / "merge_recipe.yaml", again, "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    first, second = load_model_tensors(folder), load_model_tensors(again)
    assert sorted(first) == sorted(second)
    for tensor_name in first:
        assert torch.equal(first[tensor_name], second[tensor_name]), tensor_name


def test_the_model_card_is_hub_metadata_with_the_sources_and_their_common_license(tmp_path):
    """base_model lists the merged Hub models with base_model_relation merge (local paths are left
    out: the Hub refuses them); license only when the sources agree; mergekit's recipe file too."""
    from huggingface_hub import ModelCard

    from merging.model_card import MERGEKIT_RECIPE, RECIPE_NAME, write_model_card
    from merging.recipe import recipe_from_text

    sources = {}
    for name, license in (("a", "apache-2.0"), ("b", "apache-2.0"), ("c", None)):
        folder = tmp_path / name
        folder.mkdir()
        if license:
            (folder / "README.md").write_text(f"---\nlicense: {license}\n---\n# {name}\n")
        sources[f"org/{name}"] = folder
    recipe = recipe_from_text("merge_method: ties\nbase_model: org/a\nmodels:\n  - model: org/b@main\n"
                              f"    parameters: {{density: 0.5}}\n  - model: {tmp_path / 'c'}\n")
    out = tmp_path / "out"
    out.mkdir()
    write_model_card(out, recipe, sources)
    data = ModelCard.load(out / "README.md").data
    assert data.base_model == ["org/a", "org/b"] and data.base_model_relation == "merge"
    assert data.license == "apache-2.0" and data.library_name == "transformers"
    assert {"merge", "merge-studio", "ties"} <= set(data.tags) and data.merge_method == "ties"
    assert (out / MERGEKIT_RECIPE).read_text() == (out / RECIPE_NAME).read_text() == recipe.to_yaml()

    (tmp_path / "c" / "README.md").write_text("---\nlicense: mit\n---\n")  # the sources disagree: no license
    write_model_card(out, recipe, sources)
    assert ModelCard.load(out / "README.md").data.license is None

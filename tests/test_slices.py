"""``slices:`` recipes: per-range merges and frankenmerges, equal to mergekit 0.1.5's.

How most published SLERP merges are written (two sources over the same layers, gradients per
slice), frankenmerges (``passthrough`` stacking layer ranges of several models: the output has
as many layers as the slices together, loads and generates), mergekit's ``modules:`` form, and
slices with their own base and parameters. One ``mergekit-multi`` run covers every case."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import error_line, load_model_tensors, run_cli, write_recipe
from merging.engine import merge
from merging.errors import RecipeError
from merging.recipe import load_recipe
from tests.support.mergekit import MERGEKIT_MULTI, Case, compare, run_mergekit_multi

pytestmark = pytest.mark.skipif(not MERGEKIT_MULTI, reason="mergekit is not installed")


def _source(model, start, end, **parameters):
    return {"model": str(model), "layer_range": [start, end], **({"parameters": parameters} if parameters else {})}


def build_cases(llama, qwen2, gpt2) -> dict[str, Case]:
    L, G = llama, gpt2
    return {
        # the published SLERP form: two sources over all layers, t filtered and graded
        "slerp_slices_llama": Case({
            "merge_method": "slerp", "base_model": str(L.base),
            "slices": [{"sources": [_source(L.base, 0, 3), _source(L.finetuned[0], 0, 3)]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
            "dtype": "float32"}, L.base, tuple(L.finetuned[:1])),
        # a frankenmerge: layers 0-1 of one model, then 1-2 of another (4 output layers)
        "passthrough_stack_llama": Case({
            "merge_method": "passthrough",
            "slices": [{"sources": [_source(L.finetuned[0], 0, 2)]}, {"sources": [_source(L.finetuned[1], 1, 3)]}],
            "dtype": "float32"}, None),
        # gradients over each slice's own layers; per-source and per-slice parameters
        "ties_two_slices_gpt2": Case({
            "merge_method": "ties", "base_model": str(G.base),
            "slices": [
                {"sources": [_source(G.base, 0, 1), _source(G.finetuned[0], 0, 1, weight=0.7, density=0.6),
                             _source(G.finetuned[1], 0, 1, weight=0.3, density=0.9)]},
                {"sources": [_source(G.base, 1, 2), _source(G.finetuned[0], 1, 2, weight=0.5),
                             _source(G.finetuned[1], 1, 2, weight=0.5)],
                 "parameters": {"density": 0.4}}],
            "parameters": {"density": 0.8, "normalize": True},
            "dtype": "float32"}, G.base, tuple(G.finetuned), trims=True),
        # mergekit's modules: form, as model cards write it
        "linear_modules_llama": Case({
            "merge_method": "linear",
            "modules": {"default": {"slices": [
                {"sources": [_source(L.finetuned[0], 0, 3, weight=[1, 0.2]), _source(L.finetuned[2], 0, 3, weight=0.5)]}]}},
            "dtype": "float32"}, None),
    }


def qwen2_stack(qwen2) -> dict:
    """Five Qwen2 layers from three models. mergekit 0.1.5 cannot write this one under transformers 5
    (it keeps the config's per-layer ``layer_types`` at 2 entries and the config refuses to save)."""
    return {"merge_method": "passthrough",
            "slices": [{"sources": [_source(qwen2.finetuned[0], 0, 2)]}, {"sources": [_source(qwen2.finetuned[1], 0, 2)]},
                       {"sources": [_source(qwen2.base, 1, 2, scale=0.5)]}],
            "dtype": "float32"}


@pytest.fixture(scope="module")
def cases(llama_family, qwen2_family, gpt2_family):
    return build_cases(llama_family, qwen2_family, gpt2_family)


@pytest.fixture(scope="module")
def mergekit_outputs(cases, tmp_path_factory):
    return run_mergekit_multi({name: case.recipe for name, case in cases.items()}, tmp_path_factory.mktemp("mk-slices"))


@pytest.fixture(scope="module")
def ours(cases, tmp_path_factory):
    root = tmp_path_factory.mktemp("our-slices")
    return {name: merge(load_recipe(case.recipe), root / name, device="cpu").output for name, case in cases.items()}


@pytest.mark.parametrize("name", ["slerp_slices_llama", "passthrough_stack_llama", "ties_two_slices_gpt2",
                                  "linear_modules_llama"])
def test_same_tensors_as_mergekit(name, cases, mergekit_outputs, ours):
    compare(cases[name], load_model_tensors(ours[name]), load_model_tensors(mergekit_outputs[name]))


def test_a_frankenmerge_has_the_slices_layers_and_loads_and_generates(cases, ours, mergekit_outputs, llama_family):
    from transformers import AutoModelForCausalLM

    out = ours["passthrough_stack_llama"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert json.loads((mergekit_outputs["passthrough_stack_llama"] / "config.json").read_text())["num_hidden_layers"] == 4
    tensors, second = load_model_tensors(out), load_model_tensors(llama_family.finetuned[1])
    # output layer 2 is layer 1 of the second model, bit for bit
    assert torch.equal(tensors["model.layers.2.mlp.down_proj.weight"], second["model.layers.1.mlp.down_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    generated = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 8)


def test_a_slice_recipe_through_the_cli_and_its_errors(llama_family, tmp_path):
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [_source(llama_family.finetuned[0], 0, 2)]},
                         {"sources": [_source(llama_family.finetuned[1], 2, 3)]}]}
    result = run_cli("merge", write_recipe(tmp_path / "franken.yaml", recipe), tmp_path / "out", "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    too_deep = {"merge_method": "passthrough", "slices": [{"sources": [_source(llama_family.finetuned[0], 2, 5)]}]}
    message = error_line(run_cli("merge", write_recipe(tmp_path / "deep.yaml", too_deep), tmp_path / "deep"))
    assert "has 3 layers" in message and "[2, 5]" in message
    outside = {"merge_method": "slerp", "base_model": str(llama_family.base),
               "slices": [{"sources": [_source(llama_family.finetuned[0], 0, 3), _source(llama_family.finetuned[1], 0, 3)]}],
               "parameters": {"t": 0.5}}
    with pytest.raises(RecipeError, match="needs its base model among the slice.s sources"):
        merge(load_recipe(outside), tmp_path / "outside", device="cpu")


def test_a_qwen2_frankenmerge_rebuilds_the_per_layer_config_and_loads(qwen2_family, tmp_path):
    from transformers import AutoModelForCausalLM

    out = merge(load_recipe(qwen2_stack(qwen2_family)), tmp_path / "out", device="cpu").output
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((qwen2_family.base / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    if isinstance(base_config.get("layer_types"), list):
        assert config["layer_types"] == [base_config["layer_types"][i] for i in (0, 1, 0, 1, 1)]
    tensors, base = load_model_tensors(out), load_model_tensors(qwen2_family.base)
    torch.testing.assert_close(tensors["model.layers.4.self_attn.q_proj.bias"],
                               0.5 * base["model.layers.1.self_attn.q_proj.bias"])  # the scaled last slice
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 5
    assert model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False).shape == (1, 6)

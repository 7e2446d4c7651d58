"""Recipes shaped like the ones published on model cards (REFERENCE's survey of 108: SLERP over
slices with self_attn/mlp gradients, TIES and DARE with int8_mask, Model Stock, DELLA, SCE,
Karcher with ``tol: 1e-9``, frankenmerges repeating layers, negative task weights, a union
tokenizer with a chat template, typos and ``name:``), mapped onto the tiny test families.

Every recipe runs with mergekit 0.1.5 and with us, in one ``mergekit-multi`` run. mergekit
computes in the recipe's dtype (bfloat16 arithmetic loses the small deltas merging is about) and
we compute in float32, then cast; so the deterministic recipes are compared in float32 (the same
tensors, 1e-5), and our merge in the published dtype is that float32 result cast, exactly. The
random ones (DARE, DELLA) have the same layout and move each tensor as far as mergekit's."""

from __future__ import annotations

import pytest
import torch
import yaml

from helpers import load_model_tensors
from merging.engine import merge
from merging.recipe import load_recipe
from tests.support.mergekit import MERGEKIT_MULTI, Case, compare, run_mergekit_multi

pytestmark = pytest.mark.skipif(not MERGEKIT_MULTI, reason="mergekit is not installed")

# (name, recipe template, deterministic); {base}, {a}, {b}, {c} are a Llama family's folders.
PUBLISHED = [
    ("slerp_slices_gradients", """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
      - model: {b}
        layer_range: [0, 3]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""", True),
    ("ties_base_listed_int8_mask", """
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {a}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {b}
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""", True),
    ("dare_ties_int8_mask", """
models:
  - model: {base}
  - model: {a}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {b}
    parameters:
      density: 0.53
      weight: 0.3
  - model: {c}
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
dtype: bfloat16
""", False),
    ("model_stock", """
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: model_stock
base_model: {base}
dtype: bfloat16
""", True),
    ("della_linear_epsilon_lambda", """
models:
  - model: {a}
    parameters:
      weight: 0.6
      density: 0.5
  - model: {b}
    parameters:
      weight: 0.4
      density: 0.45
merge_method: della_linear
base_model: {base}
parameters:
  epsilon: 0.05
  lambda: 1.1
  int8_mask: true
dtype: bfloat16
""", False),
    ("frankenmerge_repeated_layers", """
slices:
  - sources:
    - model: {a}
      layer_range: [0, 2]
  - sources:
    - model: {a}
      layer_range: [1, 3]
merge_method: passthrough
dtype: bfloat16
""", True),
    ("task_arithmetic_negative_weight", """
models:
  - model: {a}
    parameters:
      weight: 1.0
  - model: {b}
    parameters:
      weight: -0.5
merge_method: task_arithmetic
base_model: {base}
parameters:
  normalize: false
dtype: float32
""", True),
    ("breadcrumbs_ties_gamma", """
models:
  - model: {a}
    parameters: {{weight: 0.5, density: 0.9, gamma: 0.01}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.9, gamma: 0.01}}
merge_method: breadcrumbs_ties
base_model: {base}
dtype: float32
""", True),
    ("sce_select_topk", """
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: sce
base_model: {base}
parameters:
  select_topk: 1.0
dtype: bfloat16
""", True),
    ("karcher_tol_string", """
models:
  - model: {a}
  - model: {b}
merge_method: karcher
parameters:
  max_iter: 1000
  tol: 1e-9
dtype: float32
""", True),
    ("nuslerp_weights", """
models:
  - model: {a}
    parameters:
      weight: 0.7
  - model: {b}
    parameters:
      weight: 0.3
merge_method: nuslerp
base_model: {base}
dtype: bfloat16
""", True),
    ("linear_union_chatml_typos", """
name: my-merge
models:
  - model: {a}
    parameters:
      weight: 0.7
  - model: {b}
    parameters:
      weight: 0.3
merge_method: linear
parameters:
  nomalize: true
tokenizer_source: union
chat_template: chatml
dtype: bfloat16
""", True),
]


@pytest.fixture(scope="module")
def recipes(llama_family):
    f = llama_family
    folders = {"base": f.base, "a": f.finetuned[0], "b": f.finetuned[1], "c": f.finetuned[2]}
    return {name: (text.format(**folders), deterministic) for name, text, deterministic in PUBLISHED}


def in_float32(text: str) -> dict:
    """The recipe computed and written in float32 (mergekit-multi reads a name as a stage name, so
    the one single recipe that has one loses it)."""
    return {**{k: v for k, v in yaml.safe_load(text).items() if k != "name"}, "dtype": "float32"}


@pytest.fixture(scope="module")
def mergekit_outputs(recipes, tmp_path_factory):
    docs = {name: in_float32(text) if deterministic else yaml.safe_load(text) | {"name": None}
            for name, (text, deterministic) in recipes.items()}
    docs = {name: {k: v for k, v in doc.items() if v is not None} for name, doc in docs.items()}
    return run_mergekit_multi(docs, tmp_path_factory.mktemp("mk-published"))


@pytest.fixture(scope="module")
def ours(recipes, tmp_path_factory):
    root = tmp_path_factory.mktemp("our-published")
    out = {name: merge(load_recipe(text), root / name, device="cpu").output for name, (text, _) in recipes.items()}
    out.update({f"{name}-float32": merge(load_recipe(in_float32(text)), root / f"{name}-float32", device="cpu").output
                for name, (text, deterministic) in recipes.items() if deterministic})
    return out


@pytest.mark.parametrize("name", [name for name, _, _ in PUBLISHED])
def test_a_published_recipe_runs_as_mergekit_runs_it(name, recipes, mergekit_outputs, ours, llama_family):
    mine, theirs = load_model_tensors(ours[name]), load_model_tensors(mergekit_outputs[name])
    if recipes[name][1]:
        exact = load_model_tensors(ours[f"{name}-float32"])
        compare(Case({}, llama_family.base, tuple(llama_family.finetuned), trims=True), exact, theirs)
        for tensor_name, tensor in mine.items():  # the published dtype: our float32 result, cast
            assert torch.equal(tensor, exact[tensor_name].to(tensor.dtype)), tensor_name
        return
    assert {n: (t.shape, t.dtype) for n, t in mine.items()} == {n: (t.shape, t.dtype) for n, t in theirs.items()}
    base = load_model_tensors(llama_family.base)
    for tensor_name, tensor in mine.items():  # random drops: both move each tensor a similar distance
        ours_moved = (tensor.double() - base[tensor_name].double()).norm()
        theirs_moved = (theirs[tensor_name].double() - base[tensor_name].double()).norm()
        assert torch.isfinite(tensor.double()).all()
        assert ours_moved == pytest.approx(float(theirs_moved), rel=0.35, abs=1e-6), tensor_name


def test_every_published_recipe_parses_with_only_the_expected_warnings(recipes):
    warned = {name: load_recipe(text).warnings for name, (text, _) in recipes.items()}
    assert {name for name, notes in warned.items() if notes} == {"linear_union_chatml_typos"}
    assert "'nomalize' is ignored" in warned["linear_union_chatml_typos"][0]

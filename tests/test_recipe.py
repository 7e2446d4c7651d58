"""Recipes: mergekit's schema, round trips, parameter resolution and validation messages."""

import pytest

from merging.errors import RecipeError
from merging.recipe import load_recipe, resolve

MERGEKIT_TIES = """
models:
  - model: org/base
  - model: org/math
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: org/code
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: org/base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_a_mergekit_recipe_loads_and_the_base_is_not_a_task_vector():
    recipe = load_recipe(MERGEKIT_TIES)
    assert recipe.merge_method == "ties"
    assert [m.model for m in recipe.input_entries()] == ["org/math", "org/code"]
    assert str(recipe.output_dtype) == "torch.float16"


def test_round_trip_through_yaml_is_identical():
    recipe = load_recipe(MERGEKIT_TIES)
    again = load_recipe(recipe.to_yaml())
    assert again == recipe
    assert load_recipe(again.to_yaml()).to_yaml() == recipe.to_yaml()


def test_gradients_interpolate_over_layers_like_mergekit():
    recipe = load_recipe(MERGEKIT_TIES)
    density = recipe.method.param("density")
    setting = recipe.models[1].parameters["density"]
    assert resolve(setting, density, "model.layers.0.mlp", 0.0) == 1.0
    assert resolve(setting, density, "model.layers.5.mlp", 0.5) == pytest.approx(0.7)
    assert resolve(setting, density, "model.layers.7.mlp", 0.75) == pytest.approx(0.4)
    assert resolve(setting, density, "model.layers.9.mlp", 1.0) == pytest.approx(0.1)


def test_filters_pick_the_first_matching_value():
    recipe = load_recipe("""
merge_method: slerp
base_model: a/base
models: [{model: a/base}, {model: a/other}]
parameters:
  t:
    - {filter: self_attn, value: [0, 1]}
    - {filter: mlp, value: 0.3}
    - {value: 0.5}
""")
    t = recipe.method.param("t")
    setting = recipe.parameters["t"]
    assert resolve(setting, t, "model.layers.1.self_attn.q_proj.weight", 1.0) == 1.0
    assert resolve(setting, t, "model.layers.1.mlp.up_proj.weight", 1.0) == 0.3
    assert resolve(setting, t, "model.embed_tokens.weight", 0.0) == 0.5
    assert [m.model for m in recipe.input_entries()] == ["a/base", "a/other"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: nope\nmodels: [a/b]", "unknown merge_method 'nope'; available methods:"),
        ("merge_method: ties\nbase_model: a/b\nmodels: [{model: a/c, parameters: {density: 0}}]", "density = 0 is not valid; expected float in (0, 1]"),
        ("merge_method: ties\nbase_model: a/b\nmodels: [{model: a/c, parameters: {density: 1.5}}]", "density = 1.5"),
        ("merge_method: ties\nbase_model: a/b\nmodels: [{model: a/c, parameters: {density: [0.5, 2]}}]", "density = 2"),
        ("merge_method: ties\nbase_model: a/b\nmodels: [{model: a/c, parameters: {weight: .nan}}]", "weight = nan"),
        ("merge_method: ties\nmodels: [a/c]", "ties needs a 'base_model'"),
        ("merge_method: slerp\nbase_model: a/b\nmodels: [a/c, a/d]", "exactly two models"),
        ("merge_method: linear\nmodels: []", "exactly one of 'models', 'slices' or 'modules'"),
        ("merge_method: linear\nmodels: [a/b]\ndtype: int4", "dtype 'int4' is not supported"),
        ("merge_method: linear\nmodels: [a/b]\nslices: [{sources: [{model: a/b, layer_range: [0, 2]}]}]",
         "exactly one of 'models', 'slices' or 'modules'"),
        ("merge_method: linear\nmodels: ['a/b+c/d+e/f']", "one '+'"),
        ("merge_method: linear\nslices: [{sources: [{model: a/b, layer_range: [0, 2]}, {model: a/c, layer_range: [0, 3]}]}]",
         "same number of layers"),
        ("merge_method: linear\nmodels: [a/b]\ntokenizer_source: 'model:a/b'", "legacy 'model:<path>' form"),
        ("merge_method: ties\nbase_model: a/b\nmodels: [a/c]\nparameters: {normalize: yes please}", "normalize = 'yes please'"),
        ("merge_method: [\n", "not valid YAML at line"),
        ("- just\n- a list", "must be a YAML mapping"),
        ("merge_method: linear\nmodels: [a/b]\nseed: -1", "seed must be an integer"),
    ],
)
def test_bad_recipes_name_the_problem(text, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    assert message in str(info.value)


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_recipe_text_never_opens_a_file(tmp_path):
    """What a hosted studio parses: a one-line 'x.yaml' is YAML text, not a path to read."""
    from merging.recipe import recipe_from_text

    path = tmp_path / "secret.yaml"
    path.write_text("merge_method: linear\nmodels: [a/b, c/d]\n")
    assert load_recipe(str(path)).merge_method == "linear"  # the CLI's load_recipe reads files
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        recipe_from_text(str(path))

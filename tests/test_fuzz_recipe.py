"""Hostile recipes (hypothesis): whatever text or structure arrives, the parser and validators
answer with a RecipeError (a message for the user) or a valid Recipe, never a crash or a hang."""

from __future__ import annotations

import math

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from merging.errors import RecipeError
from merging.methods import REGISTRY
from merging.recipe import Recipe, load_recipe, parse_recipe, recipe_from_text

FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e-320, 0, 1, 0.5, "0.5", "nan", "1e999"]),
)
keys = st.one_of(
    st.sampled_from(["merge_method", "models", "model", "parameters", "base_model", "weight", "density",
                     "lambda", "normalize", "filter", "value", "dtype", "seed", "calibration", "gamma", "t",
                     "tokenizer_source", "tokenizer", "slices", "reduce_non_diagonal", "fisher_floor"]),
    st.text(max_size=8),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=25)


def _recipe_like():
    """Mostly well-shaped recipes with hostile values, so validation code is reached, not just the first check."""
    entry = st.fixed_dictionaries({"model": st.one_of(st.sampled_from(["org/a", "org/b", "./x"]), values)},
                                  optional={"parameters": st.dictionaries(keys, values, max_size=4),
                                            "calibration": values})
    return st.fixed_dictionaries(
        {"merge_method": st.one_of(st.sampled_from(sorted(REGISTRY)), values), "models": st.one_of(st.lists(entry, max_size=4), values)},
        optional={"base_model": st.one_of(st.just("org/base"), values), "parameters": st.dictionaries(keys, values, max_size=4),
                  "dtype": values, "seed": values, "tokenizer_source": values},
    )


def _accepts_or_explains(build) -> None:
    try:
        recipe = build()
    except RecipeError as exc:
        assert str(exc).strip(), "an empty error message helps nobody"
    else:
        assert isinstance(recipe, Recipe)
        assert isinstance(recipe.to_yaml(), str)  # a valid recipe always serializes


@FUZZ
@given(_recipe_like())
@example({"merge_method": "breadcrumbs", "models": ["0"], "dtype": []})  # found by this test: was a TypeError
def test_structured_recipes_are_accepted_or_explained(data):
    _accepts_or_explains(lambda: parse_recipe(data))


@FUZZ
@given(values)
def test_any_structure_is_accepted_or_explained(data):
    _accepts_or_explains(lambda: parse_recipe(data))


@FUZZ
@given(st.text(max_size=300))
def test_any_text_is_accepted_or_explained(text):
    _accepts_or_explains(lambda: recipe_from_text(text))


@FUZZ
@given(_recipe_like())
def test_valid_recipes_survive_a_yaml_round_trip(data):
    try:
        recipe = parse_recipe(data)
    except RecipeError:
        return
    again = load_recipe(recipe.to_yaml() + "\n")
    assert again.to_dict() == recipe.to_dict()


def test_deep_nesting_and_huge_documents_end_in_an_error():
    deep = "a: " + "[" * 5000 + "]" * 5000
    _accepts_or_explains(lambda: recipe_from_text(deep))
    many = "merge_method: linear\nmodels:\n" + "".join(f"  - model: org/m{i}\n" for i in range(2000))
    _accepts_or_explains(lambda: recipe_from_text(many))
    alias_bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    _accepts_or_explains(lambda: recipe_from_text(alias_bomb + "merge_method: linear\nmodels: [org/a]\n"))
    assert yaml.safe_load("x: 1") == {"x": 1}

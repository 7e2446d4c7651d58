"""Merge Studio's engine: recipes, checkpoints, merge methods and the CLI (no UI code here).

    from merging import load_recipe, merge
    result = merge(load_recipe("recipe.yaml"), "out/merged")
"""

from merging.engine import MergeResult, merge
from merging.errors import MergeCancelled, MergeStudioError, RecipeError
from merging.methods import REGISTRY as METHODS
from merging.recipe import Recipe, load_recipe

__all__ = ["METHODS", "MergeCancelled", "MergeResult", "MergeStudioError", "Recipe", "RecipeError", "load_recipe", "merge"]

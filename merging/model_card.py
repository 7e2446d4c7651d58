"""The model card (README.md with Hub metadata) and recipe written beside every merged model."""

from __future__ import annotations

from pathlib import Path

import yaml

from merging.recipe import Recipe

RECIPE_NAME = "merge_recipe.yaml"


def write_model_card(folder: Path, recipe: Recipe) -> None:
    """Write ``README.md`` (YAML front matter: base_model, tags, merge_method) and the recipe.

    The recipe file is the exact input to ``python -m merging merge``, so the merge can be
    reproduced from the folder alone.
    """
    spec = recipe.method
    sources = [m.model for m in recipe.models if m.model != recipe.base_model]
    metadata = {
        "base_model": [recipe.base_model] if recipe.base_model else sources,
        "library_name": "transformers",
        "tags": ["merge", "merge-studio", spec.name],
        "merge_method": spec.name,
    }
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        "# Merged model",
        "",
        f"Made with Merge Studio by **{spec.title}** ([paper]({spec.paper})): {spec.summary}",
        "",
    ]
    if recipe.base_model:
        lines += [f"Base model: `{recipe.base_model}`", ""]
    lines += ["Merged models:", ""] + [f"- `{ref}`" for ref in sources] + [""]
    lines += [
        f"## Recipe (`{RECIPE_NAME}`)",
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
        f"Reproduce with `python -m merging merge {RECIPE_NAME} OUTPUT_DIR`.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")
    (folder / RECIPE_NAME).write_text(recipe.to_yaml(), encoding="utf-8")

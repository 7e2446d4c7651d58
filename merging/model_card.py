"""The model card (README.md with Hub metadata) and recipe written beside every merged model, and
the recipe read back from a merged model (ours, or one made with mergekit)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from merging.errors import SourceError
from merging.recipe import Recipe
from merging.sources import SourcePolicy, model_files, snapshot_download

RECIPE_NAME = "merge_recipe.yaml"
MERGEKIT_RECIPE = "mergekit_config.yml"  # what mergekit writes beside its merges
CARD = "README.md"
YAML_BLOCK = re.compile(r"```ya?ml[^\n]*\n(.*?)```", re.S)


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


def recipe_of(ref: str, policy: SourcePolicy = SourcePolicy(), download=snapshot_download) -> str:
    """The recipe a merged model was made with, as YAML text: its ``merge_recipe.yaml`` or
    ``mergekit_config.yml``, else the first YAML block of its model card that names a
    ``merge_method``. ``ref`` is a local folder or a Hub id (only those files are fetched)."""
    folder = model_files(ref, [RECIPE_NAME, MERGEKIT_RECIPE, CARD], policy, download)
    for name in (RECIPE_NAME, MERGEKIT_RECIPE):
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8")
    if (folder / CARD).is_file():
        for block in YAML_BLOCK.findall((folder / CARD).read_text(encoding="utf-8", errors="replace")):
            if "merge_method" in block:
                return block
    raise SourceError(f"{ref!r} has no recipe: no {RECIPE_NAME}, no {MERGEKIT_RECIPE} and no YAML block with "
                      f"'merge_method' in its model card; it was not merged with Merge Studio or mergekit, or its "
                      "author did not publish the recipe")

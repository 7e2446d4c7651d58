"""The model card (README.md with Hub metadata) and recipe written beside every merged model, and
the recipe read back from a merged model (ours, or one made with mergekit)."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from merging.errors import SourceError
from merging.recipe import Recipe
from merging.sources import HUB_ID, SourcePolicy, model_files, snapshot_download, split_revision

RECIPE_NAME = "merge_recipe.yaml"
MERGEKIT_RECIPE = "mergekit_config.yml"  # what mergekit writes beside its merges
CARD = "README.md"
YAML_BLOCK = re.compile(r"```ya?ml[^\n]*\n(.*?)```", re.S)


def write_model_card(folder: Path, recipe: Recipe, source_folders: dict[str, Path] | None = None) -> None:
    """Write ``README.md`` (a Hub model card) and the recipe, as ``merge_recipe.yaml`` and as
    mergekit's ``mergekit_config.yml``.

    The card's metadata is ``huggingface_hub``'s ``ModelCardData``: ``base_model`` lists the
    merged models that are Hub ids (a local path is no Hub reference and would make the Hub
    refuse the card) with ``base_model_relation: merge``, so the Hub shows the merge in each
    source's model tree; ``license`` is the sources' own when every source that states one states
    the same (``source_folders``: reference -> local folder, whose ``README.md`` is read).
    The recipe file is the exact input to ``python -m merging merge``, so the merge can be
    reproduced from the folder alone.
    """
    spec = recipe.method
    sources = [m.model for m in recipe.models if m.model != recipe.base_model]
    merged = ([recipe.base_model] if recipe.base_model else []) + sources
    hub_ids = list(dict.fromkeys(ref for ref in (_hub_id(r) for r in merged) if ref))
    licenses = {_license(Path(f) / CARD) for f in (source_folders or {}).values()} - {None}
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation="merge" if hub_ids else None,
        library_name="transformers",
        license=licenses.pop() if len(licenses) == 1 else None,
        tags=["merge", "merge-studio", "mergekit", spec.name],
        merge_method=spec.name,
    )
    lines = [
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
        f"Reproduce with `python -m merging merge {RECIPE_NAME} OUTPUT_DIR` (or mergekit's `mergekit-yaml "
        f"{MERGEKIT_RECIPE} OUTPUT_DIR` for the methods it has).",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    card.save(folder / CARD)
    (folder / RECIPE_NAME).write_text(recipe.to_yaml(), encoding="utf-8")
    (folder / MERGEKIT_RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")


def _hub_id(ref: str) -> str | None:
    """The Hub repository a reference names (``org/name`` of ``org/name@rev`` or of a LoRA
    reference ``base+adapter``'s base), or None for a local path."""
    repo, _ = split_revision(ref.split("+")[0])
    if Path(repo).expanduser().exists() or not HUB_ID.match(repo):
        return None
    return repo


def _license(card: Path) -> str | None:
    """The ``license`` of a model card's metadata, or None (no card, none stated, unreadable)."""
    if not card.is_file():
        return None
    try:
        value = ModelCard.load(card).data.license
    except Exception:  # a card that does not parse states no license we can rely on
        return None
    return value if isinstance(value, str) and value else None


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

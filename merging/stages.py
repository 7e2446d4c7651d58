"""Multi-stage recipes (mergekit-multi's format): several documents, each a merge with a ``name:``,
later ones using earlier ones by that name.

    name: math-code
    merge_method: ties
    ...
    ---
    merge_method: slerp          # the unnamed (or else the last) document is the output
    base_model: org/base
    models: [{model: org/base}, {model: math-code}]

Stages run in document order; a named stage is merged into ``<intermediate dir>/<name>``
(default: ``<output>-stages`` beside the output) and kept, so running the recipe again reuses
every intermediate whose recipe did not change. An error names its stage.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from merging.engine import MergeResult, merge
from merging.errors import MergeStudioError, RecipeError
from merging.model_card import RECIPE_NAME
from merging.recipe import OutputSlice, Recipe, SliceSource, TokenizerSettings


def final_stage(stages: list[Recipe]) -> Recipe:
    """The stage that is the output: the unnamed one, else the last."""
    return next((stage for stage in stages if stage.name is None), stages[-1])


def intermediate_dir_for(out_dir: Path) -> Path:
    out_dir = Path(out_dir).expanduser().absolute()
    return out_dir.parent / f"{out_dir.name}-stages"


def merge_stages(stages: list[Recipe], out_dir: str | Path, *, intermediate_dir: str | Path | None = None,
                 progress_stage=None, **options) -> MergeResult:
    """Merge every stage in order and return the final stage's result (``options`` as ``merge``'s).

    ``progress_stage(name, index, count)`` is called before each stage runs.
    """
    final = final_stage(stages)
    order = [stage for stage in stages if stage is not final] + [final]
    folder = Path(intermediate_dir).expanduser() if intermediate_dir else intermediate_dir_for(Path(out_dir))
    _check_order(order)
    done: dict[str, str] = {}
    result = None
    for index, stage in enumerate(order):
        recipe = with_stage_paths(stage, done)
        target = Path(out_dir) if stage is final else folder / stage.name
        if progress_stage is not None:
            progress_stage(stage.name or "output", index, len(order))
        try:
            if stage is final:
                result = merge(recipe, target, **options)
            elif not _up_to_date(target, recipe):
                merge(recipe, target, **{**options, "overwrite": True})
        except MergeStudioError as exc:
            raise type(exc)(f"stage {stage.name or 'output'!r}: {exc}") from None
        if stage.name:
            done[stage.name] = str(target.expanduser().absolute())
    return result


def _check_order(order: list[Recipe]) -> None:
    names = {stage.name for stage in order if stage.name}
    seen: set[str] = set()
    for stage in order:
        for ref in stage.referenced_models():
            name = ref.split("+")[0]
            if name in names and name not in seen:
                raise RecipeError(f"stage {stage.name or 'output'!r} uses stage {name!r}, which comes after it: "
                                  "order the documents so every stage follows the stages it uses")
        if stage.name:
            seen.add(stage.name)


def _up_to_date(target: Path, recipe: Recipe) -> bool:
    """Whether ``target`` holds a finished merge of exactly this recipe (an earlier run's)."""
    written = target / RECIPE_NAME
    return written.is_file() and (target / "config.json").is_file() and written.read_text(encoding="utf-8") == recipe.to_yaml()


def with_stage_paths(recipe: Recipe, done: dict[str, str]) -> Recipe:
    """The recipe with every reference to an earlier stage's name replaced by its folder."""
    def swap(ref: str | None) -> str | None:
        if ref is None:
            return None
        model, plus, adapter = ref.partition("+")
        return done.get(model, model) + plus + adapter

    slices = None if recipe.slices is None else [
        OutputSlice([SliceSource(swap(s.model), s.layer_range, s.parameters) for s in piece.sources],
                    swap(piece.base_model), piece.parameters) for piece in recipe.slices]
    tokenizer = recipe.tokenizer
    if tokenizer is not None and tokenizer.source not in ("base", "union"):
        tokenizer = TokenizerSettings(swap(tokenizer.source), tokenizer.tokens, tokenizer.pad_to_multiple_of)
    return replace(recipe, base_model=swap(recipe.base_model), slices=slices, tokenizer=tokenizer,
                   models=[replace(m, model=swap(m.model)) for m in recipe.models])

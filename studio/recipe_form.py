"""The Merge tab's form state: a recipe as a plain dict (mergekit's YAML shape), edited one field at a time.

The method's controls come from its ``MethodSpec`` (``merging.methods.REGISTRY``), and so do
the papers' usual settings (``guidance``) and the starting values (``suggested``), so a newly
registered method appears in the form without changes here. Every function returns a new dict;
validation is ``merging.recipe.load_recipe``'s.
"""

from __future__ import annotations

import copy

import yaml

from merging.errors import MergeStudioError
from merging.methods import REGISTRY, MethodSpec, Param
from merging.recipe import Recipe, load_recipe
from merging.recipe import stages_from_text as parse_stages_text

DEFAULT_METHOD = "task_arithmetic"
DTYPE_CHOICES = ("as base", "float32", "bfloat16", "float16")

def spec_of(recipe: dict) -> MethodSpec:
    return REGISTRY[recipe["merge_method"]].spec


def method_choices() -> list[tuple[str, str]]:
    """(label, name) of every method: its title, then the name a recipe's ``merge_method`` uses."""
    return [(f"{m.spec.title} — {name}", name) for name, m in REGISTRY.items()]


def starting_value(method: str, param: Param):
    """What the form gives ``param`` when ``method`` is chosen: the spec's suggestion, else its default."""
    return REGISTRY[method].spec.starting_value(param)


def guidance(method: str) -> str:
    spec = REGISTRY[method].spec
    text = f"**{spec.title}** ([paper]({spec.paper})): {spec.summary}"
    if spec.guidance:
        text += f"\n\n*Typical settings:* {spec.guidance}"
    return text


def _entry(ref: str, spec: MethodSpec, calibration_tasks: tuple[str, ...], name: str | None) -> dict:
    entry: dict = {"model": ref}
    params = {k: v for k, v in spec.suggested.items() if spec.param(k) and spec.param(k).scope == "model"}
    if params:
        entry["parameters"] = params
    if spec.calibration and name in calibration_tasks:
        entry["calibration"] = name
    return entry


def initial(base: str, sources: list[str], names: dict[str, str] | None = None,
            calibration_tasks: tuple[str, ...] = (), method: str = DEFAULT_METHOD) -> dict:
    """A recipe of ``method`` over ``base`` and ``sources`` with the suggested starting values.

    ``names``: reference -> short name; a demo expert's name doubles as its calibration task.
    """
    spec = REGISTRY[method].spec
    names = names or {}
    recipe = {"merge_method": method, "base_model": base,
              "models": [_entry(ref, spec, calibration_tasks, names.get(ref)) for ref in sources]}
    globals_ = {k: v for k, v in spec.suggested.items() if spec.param(k) and spec.param(k).scope == "global"}
    if globals_:
        recipe["parameters"] = globals_
    return recipe


def sliced(recipe: dict) -> bool:
    """Whether the recipe picks layer ranges (``slices``): its models are edited in the YAML only."""
    return "models" not in recipe


def model_refs(recipe: dict) -> list[str]:
    """The models a recipe names, in order (a sliced recipe: every slice's sources)."""
    if not sliced(recipe):
        return [m["model"] for m in recipe["models"]]
    return list(dict.fromkeys(s["model"] for piece in recipe.get("slices", []) for s in piece["sources"]))


def with_models(recipe: dict, base: str | None, sources: list[str], names: dict[str, str] | None = None,
                calibration_tasks: tuple[str, ...] = ()) -> dict:
    """The recipe over a new base and sources; models kept keep their settings. A sliced recipe
    keeps its own models (the Models tab cannot say which layers to take)."""
    if sliced(recipe):
        return copy.deepcopy(recipe)
    spec = spec_of(recipe)
    old = {m["model"]: m for m in recipe.get("models", [])}
    out = copy.deepcopy(recipe)
    if base:
        out["base_model"] = base
    else:
        out.pop("base_model", None)
    out["models"] = [copy.deepcopy(old[ref]) if ref in old else _entry(ref, spec, calibration_tasks, (names or {}).get(ref))
                     for ref in sources if ref != base]
    return out


def _chosen(values: dict, old_method: str | None, spec: MethodSpec) -> dict:
    """The ``values`` (parameter -> value) worth keeping for ``spec``'s method: those it also has,
    except a value equal to the old method's starting value, which was the form's choice rather
    than the user's (task arithmetic's weight 0.4 must not become RegMean's)."""
    old = REGISTRY[old_method].spec if old_method in REGISTRY else None
    kept = {}
    for key, value in values.items():
        before = old.param(key) if old else None
        if spec.param(key) and not (before and value == starting_value(old.name, before)):
            kept[key] = value
    return kept


def with_method(recipe: dict, method: str, names: dict[str, str] | None = None,
                calibration_tasks: tuple[str, ...] = ()) -> dict:
    """The recipe switched to ``method``. A setting the new method also has keeps the user's value;
    one still at the old method's starting value, or missing, takes the new method's (the spec's ``suggested``,
    else the spec's default); settings the new method lacks are dropped."""
    if method not in REGISTRY:
        raise MergeStudioError(f"unknown merge method {method!r}; choose one from the list")
    spec = REGISTRY[method].spec
    names = names or {}
    previous = recipe.get("merge_method")
    out = {k: copy.deepcopy(v) for k, v in recipe.items() if k not in ("parameters", "models", "seed")}
    out["merge_method"] = method
    suggested = spec.suggested
    params = _chosen(recipe.get("parameters", {}), previous, spec)
    params.update({k: v for k, v in suggested.items() if spec.param(k) and spec.param(k).scope == "global" and k not in params})
    if params:
        out["parameters"] = params
    models = []
    for old in recipe.get("models", []):
        entry = {"model": old["model"]}
        kept = {k: v for k, v in _chosen(old.get("parameters", {}), previous, spec).items() if spec.param(k).scope == "model"}
        kept.update({k: v for k, v in suggested.items() if spec.param(k) and spec.param(k).scope == "model" and k not in kept})
        if kept:
            entry["parameters"] = kept
        if spec.calibration:
            calibration = old.get("calibration") or (names.get(old["model"]) if names.get(old["model"]) in calibration_tasks else None)
            if calibration:
                entry["calibration"] = calibration
        models.append(entry)
    if not sliced(recipe):
        out["models"] = models
    if spec.randomized and recipe.get("seed"):
        out["seed"] = recipe["seed"]
    return out


def set_param(recipe: dict, param: Param, value, index: int | None = None) -> dict:
    """Set a global parameter (``index`` None) or model ``index``'s; None removes it (back to the default)."""
    out = copy.deepcopy(recipe)
    if index is None:
        target = out.setdefault("parameters", {})
    else:
        target = out["models"][index].setdefault("parameters", {})
    if value is None or value == "":
        target.pop(param.name, None)
    else:
        target[param.name] = coerce(param, value)
    if index is None and not target:
        out.pop("parameters", None)
    if index is not None and not target:
        out["models"][index].pop("parameters", None)
    return out


def coerce(param: Param, value):
    if param.kind is int:
        return round(float(value))
    if param.kind is float:
        return round(float(value), 6)
    return value


def set_calibration(recipe: dict, index: int, value: str | None) -> dict:
    out = copy.deepcopy(recipe)
    if value and str(value).strip():
        out["models"][index]["calibration"] = str(value).strip()
    else:
        out["models"][index].pop("calibration", None)
    return out


def set_option(recipe: dict, key: str, value) -> dict:
    """``dtype`` ('as base' removes it) or ``seed`` (0 removes it)."""
    out = copy.deepcopy(recipe)
    if key == "dtype":
        out.pop("out_dtype", None)
        if value and value != "as base":
            out["dtype"] = value
        else:
            out.pop("dtype", None)
    elif key == "seed":
        seed = int(value or 0)
        if seed:
            out["seed"] = seed
        else:
            out.pop("seed", None)
    else:
        raise ValueError(key)
    return out


def to_yaml(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def stages_from_text(text: str) -> list[Recipe]:
    """The validated recipe(s) of YAML text, never of a file (a hosted studio must not let a
    one-line ``x.yaml`` open a server file): one, or the stages of a multi-stage recipe."""
    if not isinstance(text, str) or not text.strip():
        raise MergeStudioError("the recipe is empty; write or paste a YAML recipe, or pick models and a method")
    return parse_stages_text(text)


def recipe_from_text(text: str) -> Recipe:
    """The one validated Recipe of YAML text (see ``stages_from_text``)."""
    stages = stages_from_text(text)
    if len(stages) > 1:
        raise MergeStudioError(f"this recipe has {len(stages)} stages; give one recipe here")
    return stages[0]


def check(recipe: dict | str) -> str:
    """'' when the recipe is valid, else the engine's message saying what to fix."""
    return review(recipe)[0]


def review(recipe: dict | str) -> tuple[str, list[str]]:
    """(the error, or ''; the keys mergekit would ignore) of a recipe dict or YAML text (a
    multi-stage recipe's notes name their stage)."""
    try:
        stages = [load_recipe(recipe)] if isinstance(recipe, dict) else stages_from_text(recipe)
    except MergeStudioError as exc:
        return str(exc), []
    if len(stages) == 1:
        return "", stages[0].warnings
    return "", [f"stage {stage.name or 'output'!r}: {note}" for stage in stages for note in stage.warnings]


def stage_names(text: str) -> list[str]:
    """The stages of a valid multi-stage recipe (the output as 'output'), or [] for one recipe or invalid text."""
    try:
        stages = stages_from_text(text)
    except MergeStudioError:
        return []
    return [stage.name or "output" for stage in stages] if len(stages) > 1 else []


def parse(text: str) -> dict:
    """A YAML recipe (typed, pasted or uploaded) as a validated dict; raises MergeStudioError."""
    return recipe_from_text(text).to_dict()


def current_value(recipe: dict, param: Param, index: int | None = None):
    """What a control shows: the recipe's value, else (per model) the global one, else the default."""
    scopes = [recipe.get("parameters", {})]
    if index is not None:
        scopes.insert(0, recipe["models"][index].get("parameters", {}))
    for scope in scopes:
        if param.name in scope:
            return scope[param.name]
    return None if param.required else param.default

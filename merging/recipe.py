"""Recipes: what to merge, in mergekit's YAML schema.

    merge_method: ties
    base_model: path/or/org-name[@revision]
    models:
      - model: org/fine-tune-a
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true}
    dtype: bfloat16

A parameter value may be a scalar, a list of scalars (a gradient over the layers: layer i of N
takes the value at position i/(N-1) of the list, interpolated; tensors outside the layers take
the first value), or a list of ``{filter, value}`` (the first filter that is a substring of the
tensor name wins; no filter matches everything). These are mergekit's rules, so existing
mergekit recipes for the supported methods run unchanged. Our extensions: ``seed`` (random
steps) and, per model, ``calibration`` (the text Fisher and RegMean run that model on: a text or
JSONL file, a demo task name, or a list of texts).
Unknown keys are errors that name the key (mergekit silently ignores them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from merging.calibration import sources_hint
from merging.errors import RecipeError
from merging.methods import MethodSpec, Param, get_method

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
TOP_LEVEL_KEYS = {
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "seed",
}
NOT_YET = {
    "slices": "layer slices are not supported yet; list whole models under 'models:'",
    "modules": "per-module recipes are not supported yet; list whole models under 'models:'",
    "chat_template": "setting a chat template is not supported yet; the output keeps the tokenizer source's template",
}


@dataclass
class ModelEntry:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    calibration: str | list[str] | None = None  # data-aware methods: file, demo task name or texts


@dataclass
class Recipe:
    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    seed: int = 0

    @property
    def method(self) -> MethodSpec:
        return get_method(self.merge_method).spec

    @property
    def output_dtype(self) -> torch.dtype | None:
        """The dtype written: ``out_dtype``, else ``dtype``, else (None) the base model's own."""
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else None

    def input_entries(self) -> list[ModelEntry]:
        """The models that enter the method, in order, following mergekit and the spec's ``base``.

        ``origin`` (task vectors): every listed model except the base. ``config`` (Fisher,
        RegMean): exactly the listed models. ``input`` (linear): the listed models, plus the base
        at the end if it is not listed. ``first_input`` (slerp): the same, with the base first.
        """
        role = self.method.base
        if role == "config":
            return list(self.models)
        if role == "origin":
            return [m for m in self.models if m.model != self.base_model]
        entries = list(self.models)
        if self.base_model and all(m.model != self.base_model for m in entries):
            entries.append(ModelEntry(self.base_model))
        if role == "first_input":
            entries.sort(key=lambda m: m.model != self.base_model)
        return entries

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            out["base_model"] = self.base_model
        out["models"] = [
            {
                "model": m.model,
                **({"parameters": m.parameters} if m.parameters else {}),
                **({"calibration": m.calibration} if m.calibration is not None else {}),
            }
            for m in self.models
        ]
        for key in ("parameters", "dtype", "out_dtype", "tokenizer_source"):
            value = getattr(self, key)
            if value:
                out[key] = value
        if self.seed:
            out["seed"] = self.seed
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def load_recipe(source: str | Path | dict) -> Recipe:
    """Parse and validate a recipe from a YAML file path, YAML text or a dict.

    A one-line string ending in .yaml/.yml is read as a path; code that takes recipes from
    untrusted users (the hosted studio) uses ``recipe_from_text``, which never opens a file.
    """
    if isinstance(source, dict):
        return parse_recipe(source)
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise RecipeError(f"recipe {path} is not UTF-8 text") from None
        return recipe_from_text(text)
    return recipe_from_text(source)


def recipe_from_text(text: str) -> Recipe:
    """Parse and validate a recipe from YAML text only (never a file path)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"recipe is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise RecipeError("recipe is nested too deeply") from None
    return parse_recipe(data)


def parse_recipe(data: Any) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping with at least 'merge_method' and 'models'")
    for key in data:
        if key in NOT_YET:
            raise RecipeError(f"recipe key {key!r}: {NOT_YET[key]}")
        if key not in TOP_LEVEL_KEYS:
            raise RecipeError(f"unknown recipe key {key!r}; allowed keys: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    if "merge_method" not in data:
        raise RecipeError("recipe has no 'merge_method'; run `python -m merging methods` to list them")
    if not isinstance(data["merge_method"], str):
        raise RecipeError(f"merge_method must be a method name, not {data['merge_method']!r}")
    spec = get_method(data["merge_method"]).spec

    base_model = data.get("base_model")
    if base_model is not None:
        base_model = _model_ref(base_model, "base_model")
    models = _model_entries(data.get("models"), spec)
    global_params = _parameters(data.get("parameters"), spec, "parameters", per_model=False)

    recipe = Recipe(
        merge_method=spec.name,
        models=models,
        base_model=base_model,
        parameters=global_params,
        dtype=_dtype(data.get("dtype"), "dtype"),
        out_dtype=_dtype(data.get("out_dtype"), "out_dtype"),
        tokenizer_source=_tokenizer_source(data),
        seed=_seed(data.get("seed", 0)),
    )
    _check_inputs(recipe, spec)
    return recipe


def _model_ref(value: Any, where: str) -> str:
    if isinstance(value, dict) and set(value) == {"model"}:  # mergekit's long form
        value = value["model"]
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where} must be a local folder or a Hub id like 'org/name', not {value!r}")
    if "+" in value:
        raise RecipeError(
            f"{where} {value!r}: LoRA references (model+adapter) are not supported yet; "
            "merge the adapter into a full checkpoint first"
        )
    return value.strip()


def _model_entries(value: Any, spec: MethodSpec) -> list[ModelEntry]:
    if not isinstance(value, list) or not value:
        raise RecipeError("recipe needs 'models': a list of entries like {model: org/name, parameters: {weight: 1.0}}")
    entries = []
    for i, item in enumerate(value):
        where = f"models[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise RecipeError(f"{where} must be a mapping with a 'model' key, not {item!r}")
        extra = set(item) - {"model", "parameters", "calibration"}
        if extra:
            raise RecipeError(
                f"{where}: unknown key {min(extra)!r}; a model entry has 'model', 'parameters' "
                "and (for fisher and regmean) 'calibration'"
            )
        ref = _model_ref(item["model"], f"{where}.model")
        params = _parameters(item.get("parameters"), spec, f"{where}.parameters ({ref})", per_model=True)
        entries.append(ModelEntry(ref, params, _calibration(item.get("calibration"), f"{where}.calibration ({ref})")))
    return entries


def _calibration(value: Any, where: str) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, list) and value and all(isinstance(x, str) and x.strip() for x in value):
        return list(value)
    raise RecipeError(f"{where}: expected {sources_hint()}, not {value!r}")


def _parameters(value: Any, spec: MethodSpec, where: str, *, per_model: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must be a mapping of parameter names to values, not {value!r}")
    allowed = spec.model_params() if per_model else spec.params
    out = {}
    for name, setting in value.items():
        param = next((p for p in allowed if p.name == name), None)
        if param is None:
            names = ", ".join(p.name for p in allowed) or "none"
            scope = "per-model" if per_model else "global"
            raise RecipeError(f"{where}: {spec.name} has no {scope} parameter {name!r}; allowed: {names}")
        _validate_setting(setting, param, f"{where}.{name}")
        out[name] = setting
    return out


def _validate_setting(setting: Any, param: Param, where: str, depth: int = 0) -> None:
    """Check every scalar a setting can produce, so a bad value fails before any download."""
    if isinstance(setting, dict):
        extra = set(setting) - {"filter", "value"}
        if extra or "value" not in setting:
            raise RecipeError(f"{where}: a conditional value is {{filter: text, value: ...}}, got {setting!r}")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise RecipeError(f"{where}: filter must be text, not {setting['filter']!r}")
        if depth > 0:
            raise RecipeError(f"{where}: conditional values cannot be nested")
        _validate_setting(setting["value"], param, where, depth + 1)
    elif isinstance(setting, list):
        if not setting:
            raise RecipeError(f"{where}: an empty list is not a value")
        if all(isinstance(x, dict) for x in setting):
            for item in setting:
                _validate_setting(item, param, where, depth)
        elif any(isinstance(x, (dict, list)) for x in setting):
            raise RecipeError(f"{where}: a gradient is a flat list of numbers, not {setting!r}")
        else:
            for x in setting:
                param.validate(x, where)
    else:
        param.validate(setting, where)


def resolve(setting: Any, param: Param, tensor_name: str, t: float) -> Any:
    """The value a (validated) setting takes for one tensor at layer position ``t`` in [0, 1].

    Returns None when no filter matches, so the caller falls back to the next scope.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return param.validate(setting, param.name)
    if all(isinstance(x, dict) for x in setting):
        for cond in setting:
            pattern = cond.get("filter")
            if pattern in (None, "*") or pattern in tensor_name:
                return resolve(cond["value"], param, tensor_name, t)
        return None
    if param.kind in (bool, str):
        return param.validate(setting[int(t * (len(setting) - 1))], param.name)
    position = t * (len(setting) - 1)
    i = int(position)
    j = min(len(setting) - 1, i + 1)
    frac = position - i
    return param.validate((1 - frac) * setting[i] + frac * setting[j], param.name)


def _dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
    if not isinstance(name, str) or name not in DTYPES:
        raise RecipeError(f"{where} {value!r} is not supported; use one of {', '.join(DTYPES)}")
    return name


def _tokenizer_source(data: dict) -> str | None:
    source = data.get("tokenizer_source")
    tokenizer = data.get("tokenizer")
    if source is not None and tokenizer is not None:
        raise RecipeError("give either 'tokenizer_source' or 'tokenizer', not both")
    if tokenizer is not None:
        if not isinstance(tokenizer, dict) or set(tokenizer) - {"source"}:
            raise RecipeError("'tokenizer' supports only {source: base | model reference} here; token surgery is not supported yet")
        source = tokenizer.get("source")
    if source is None:
        return None
    if source == "union":
        raise RecipeError("tokenizer_source 'union' (merging vocabularies) is not supported yet; use 'base' or a model reference")
    return _model_ref(source, "tokenizer_source")


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise RecipeError(f"seed must be an integer in [0, 2^32), not {value!r}")
    return value


def _check_inputs(recipe: Recipe, spec: MethodSpec) -> None:
    if spec.needs_base and not recipe.base_model:
        raise RecipeError(f"{spec.name} needs a 'base_model': task vectors are measured from it")
    inputs = recipe.input_entries()
    count = len(inputs)
    if count < spec.min_models:
        raise RecipeError(f"{spec.name} needs at least {spec.min_models} input model(s) besides the base, got {count}")
    if spec.max_models is not None and count > spec.max_models:
        raise RecipeError(f"{spec.name} takes {spec.inputs_help or f'at most {spec.max_models} models'}, got {count}")
    if spec.calibration:
        for entry in inputs:
            if entry.calibration is None:
                raise RecipeError(
                    f"{spec.name} runs every model on calibration text, and {entry.model} has none: add "
                    f"'calibration:' to its entry: {sources_hint()}"
                )
    for param in spec.params:
        if param.required:
            for entry in inputs if param.scope == "model" else [None]:
                if param.name not in (entry.parameters if entry else {}) and param.name not in recipe.parameters:
                    who = f"model {entry.model}" if entry else "the recipe's parameters"
                    raise RecipeError(f"{spec.name} needs {param.name!r} for {who}")

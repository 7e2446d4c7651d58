"""Search specs: a merge recipe whose values may be ranges, plus a ``tune:`` section.

Any parameter value, global or per model, may be a range ``{min: a, max: b}`` (optional
``log: true``, ``step: s``), a set ``{choices: [...]}``, or the word ``tune`` (the range the
method's spec gives for it, ``Param.search`` or its bounds). ``merge_method`` may be
``{choices: [ties, dare_ties, iso_c, ...]}``: a trial then reads only the parameters of the
method it drew, and every other one is left out of its recipe. Everything else is a plain recipe.

    merge_method: {choices: [ties, iso_c]}
    base_model: ./base
    models:
      - model: ./experts/geography
        parameters: {weight: {min: 0.2, max: 1.5}, density: tune}
      - model: ./experts/people
        parameters: {weight: {min: 0.2, max: 1.5}, density: tune}
    parameters: {lambda: {min: 0.5, max: 2.5}}
    tune: {suite: zoo-validation, test_suite: zoo, objective: mean, sampler: tpe, trials: 30, seed: 0}

A trial's parameters are named ``merge_method``, ``lambda`` (global) and ``geography.weight``
(per model: the model's folder name, or ``models[i]`` when two names clash), as Optuna stores
them; ``SearchSpec.recipe_for`` turns such a set back into a plain recipe.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merging.errors import RecipeError
from merging.methods import REGISTRY, get_method
from merging.methods.spec import MethodSpec, Param
from merging.recipe import Recipe, parse_recipe

OBJECTIVES = ("mean", "pareto")
SAMPLERS = ("tpe", "cmaes", "nsga2", "random")
PRUNERS = ("median", "none")
TUNE = "tune"  # a parameter value meaning "search the spec's default range"
RANGE_KEYS = {"min", "max", "log", "step"}
TUNE_KEYS = ("suite", "test_suite", "objective", "text", "sampler", "trials", "seed", "pruner")


@dataclass(frozen=True)
class Dimension:
    """One searched value: its Optuna name, where it goes in the recipe, and its distribution.

    ``model``: the index of the model entry for a per-model parameter, None for a global one or
    the method. Either ``choices`` or ``low``/``high`` (``kind`` int or float) is set.
    """

    name: str
    param: str  # "merge_method" or a parameter name
    model: int | None
    kind: type
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def distribution(self):
        """The Optuna distribution of this dimension."""
        # Deferred: optuna takes ~0.3 s to import, and every `python -m merging` command loads this module.
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None:
            return CategoricalDistribution(self.choices)
        if self.kind is int:
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} ∈ {{{', '.join(str(c) for c in self.choices)}}}"
        scale = ", log" if self.log else ""
        step = f", step {self.step:g}" if self.step else ""
        return f"{self.name} ∈ [{self.low:g}, {self.high:g}{scale}{step}]"


@dataclass
class TuneSettings:
    """The ``tune:`` section."""

    suite: str | None = None  # a registered suite name or a JSONL file; None: the demo's validation split
    test_suite: str | None = None
    objective: str = "mean"
    text: str | None = None  # perplexity on this text joins a pareto search as one more objective
    sampler: str = "tpe"
    trials: int = 30
    seed: int = 0
    pruner: str = "median"


@dataclass
class SearchSpec:
    """A recipe template with ranges, its dimensions, and the tune settings."""

    template: dict[str, Any]  # the spec without ``tune:``; searched values still in place
    methods: tuple[str, ...]  # the methods a trial may draw
    dimensions: list[Dimension]
    settings: TuneSettings
    model_names: list[str] = field(default_factory=list)

    def dimensions_for(self, method: str) -> list[Dimension]:
        """The dimensions a trial of ``method`` draws: the method choice and the parameters it reads."""
        spec = get_method(method).spec
        return [d for d in self.dimensions if d.param == "merge_method" or _reads(spec, d.param, d.model is not None)]

    def suggest(self, trial) -> Recipe:
        """Draw one trial's values (Optuna's define-by-run: the method first, then what it reads)."""
        method_dimension = next((d for d in self.dimensions if d.param == "merge_method"), None)
        method = method_dimension.suggest(trial) if method_dimension else self.methods[0]
        values = {d.name: d.suggest(trial) for d in self.dimensions_for(method) if d.param != "merge_method"}
        return self.recipe_for({**values, "merge_method": method})

    def recipe_for(self, values: dict[str, Any]) -> Recipe:
        """The plain recipe a set of drawn values (``trial.params``) stands for."""
        method = values.get("merge_method", self.methods[0])
        if method not in self.methods:
            raise RecipeError(f"merge_method {method!r} is not among this search's methods ({', '.join(self.methods)})")
        spec = get_method(method).spec
        data = copy.deepcopy(self.template)
        data["merge_method"] = method
        wanted = {d.name: d for d in self.dimensions_for(method) if d.param != "merge_method"}
        missing = [name for name in wanted if name not in values]
        if missing:
            raise RecipeError(f"no value for {', '.join(missing)} in this trial")
        by_place = {(d.model, d.param): _tidy(values[d.name]) for d in wanted.values()}
        others = [get_method(m).spec for m in self.methods if m != method]
        data["parameters"] = _filled(data.get("parameters"), spec, None, by_place, others)
        if not data["parameters"]:
            data.pop("parameters")
        for index, entry in enumerate(data.get("models") or []):
            entry["parameters"] = _filled(entry.get("parameters"), spec, index, by_place, others)
            if not entry["parameters"]:
                entry.pop("parameters")
            if not spec.calibration:
                entry.pop("calibration", None)
        return parse_recipe(data)

    def first_recipe(self, method: str) -> Recipe:
        """``method``'s recipe with every range at its low end and every set at its first value."""
        values = {d.name: (d.choices[0] if d.choices is not None else d.kind(d.low)) for d in self.dimensions_for(method)}
        return self.recipe_for({**values, "merge_method": method})

    def fingerprint(self) -> str:
        """A short hash of the searched space and settings that matter to a study's trials (not the
        trial count): the default study name, so an edited spec starts a fresh study."""
        settings = {k: v for k, v in vars(self.settings).items() if k != "trials"}
        text = json.dumps({"template": self.template, "settings": settings}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def describe(self) -> list[str]:
        return [d.describe() for d in self.dimensions]


def load_search_spec(source: str | Path | dict) -> SearchSpec:
    """Parse a search spec from a file (a ``Path``), YAML text (a ``str``: never opened as a path,
    so text from a visitor cannot name a server file) or a mapping; every error names its place."""
    if isinstance(source, dict):
        data = source
    else:
        text = source
        if isinstance(source, Path):
            try:
                text = source.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise RecipeError(f"cannot read search spec {source}: {exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"the search spec is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError("a search spec is a recipe (a YAML mapping) whose values may be ranges, plus a 'tune:' section")
    data = copy.deepcopy(data)
    settings = _settings(data.pop("tune", None))
    if data.get("slices") or data.get("modules"):
        raise RecipeError("parameter search runs 'models:' recipes; slices are not searched yet")
    if data.get("tokenizer") or data.get("tokenizer_source"):
        raise RecipeError("parameter search keeps the base's vocabulary: drop 'tokenizer'/'tokenizer_source' from the spec")
    methods = _methods(data.get("merge_method"))
    if settings.objective == "pareto" and settings.pruner != "none":
        settings.pruner = "none"  # Optuna prunes single-objective studies only
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError("a search spec needs 'models': a list of entries like {model: path, parameters: {...}}")
    models = [{"model": item} if isinstance(item, str) else item for item in models]
    data["models"] = models
    names = _model_names(models)
    dimensions = []
    if len(methods) > 1:
        dimensions.append(Dimension("merge_method", "merge_method", None, str, choices=methods))
    specs = [get_method(m).spec for m in methods]
    dimensions += _dimensions(data.get("parameters"), specs, None, "parameters", "")
    for index, entry in enumerate(models):
        if not isinstance(entry, dict):
            raise RecipeError(f"models[{index}] must be a mapping with a 'model' key, not {entry!r}")
        dimensions += _dimensions(entry.get("parameters"), specs, index, f"models[{index}].parameters", f"{names[index]}.")
    data["merge_method"] = methods[0]
    spec = SearchSpec(data, methods, dimensions, settings, names)
    for method in methods:  # every method's recipe must parse
        spec.first_recipe(method)
    return spec


# -- parsing --------------------------------------------------------------------------------------

def _settings(value: Any) -> TuneSettings:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise RecipeError(f"'tune:' must be a mapping of {', '.join(TUNE_KEYS)}, not {value!r}")
    unknown = [key for key in value if key not in TUNE_KEYS]
    if unknown:
        raise RecipeError(f"tune: unknown key {unknown[0]!r}; expected {', '.join(TUNE_KEYS)}")
    settings = TuneSettings(**value)
    for key in ("suite", "test_suite", "text"):
        got = getattr(settings, key)
        if got is not None and (not isinstance(got, str) or not got.strip()):
            raise RecipeError(f"tune.{key} must be a suite name or a file path, not {got!r}")
    for key, allowed in (("objective", OBJECTIVES), ("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if getattr(settings, key) not in allowed:
            raise RecipeError(f"tune.{key} must be one of {', '.join(allowed)}, not {getattr(settings, key)!r}")
    for key, low in (("trials", 1), ("seed", 0)):
        got = getattr(settings, key)
        if isinstance(got, bool) or not isinstance(got, int) or got < low:
            raise RecipeError(f"tune.{key} must be a whole number ≥ {low}, not {got!r}")
    if settings.text is not None and settings.objective != "pareto":
        raise RecipeError("tune.text adds perplexity as an objective of a pareto search: set objective: pareto")
    return settings


def _methods(value: Any) -> tuple[str, ...]:
    if isinstance(value, dict):
        if set(value) != {"choices"} or not isinstance(value["choices"], list) or not value["choices"]:
            raise RecipeError(f"merge_method is a method name or {{choices: [method, ...]}}, not {value!r}")
        names = value["choices"]
    elif isinstance(value, str):
        names = [value]
    else:
        raise RecipeError("a search spec needs 'merge_method': a method or {choices: [...]}; "
                          "run `python -m merging methods` to list them")
    for name in names:
        if not isinstance(name, str) or name not in REGISTRY:
            raise RecipeError(f"merge_method choice {name!r} is not a method; run `python -m merging methods` to list them")
    if len(set(names)) != len(names):
        raise RecipeError("merge_method choices name a method twice")
    return tuple(names)


def _model_names(models: list[dict]) -> list[str]:
    """Readable per-model prefixes: the folder or repository name, else ``models[i]`` on a clash."""
    names = []
    for index, entry in enumerate(models):
        ref = str(entry.get("model", "")) if isinstance(entry, dict) else ""
        names.append(Path(ref.split("+")[0].rstrip("/")).name or f"models[{index}]")
    return [name if names.count(name) == 1 else f"models[{i}]" for i, name in enumerate(names)]


def _reads(spec: MethodSpec, name: str, per_model: bool) -> bool:
    param = spec.param(name)
    return param is not None and (param.scope == "model" or not per_model)


def _dimensions(parameters: Any, specs: list[MethodSpec], model: int | None, where: str, prefix: str) -> list[Dimension]:
    if parameters is None:
        return []
    if not isinstance(parameters, dict):
        raise RecipeError(f"{where} must be a mapping of parameter names to values, not {parameters!r}")
    out = []
    for name, value in parameters.items():
        if not _searched(value):
            continue
        params = [s.param(name) for s in specs if _reads(s, name, model is not None)]
        params = [p for p in params if p is not None]
        if not params:
            methods = ", ".join(s.name for s in specs)
            raise RecipeError(f"{where}.{name}: a searched value for a parameter no method of this search reads ({methods})")
        out.append(_dimension(f"{prefix}{name}", name, model, value, params[0], f"{where}.{name}"))
    return out


def _searched(value: Any) -> bool:
    return value == TUNE or (isinstance(value, dict) and ("choices" in value or bool(set(value) & RANGE_KEYS)))


def _dimension(label: str, name: str, model: int | None, value: Any, param: Param, where: str) -> Dimension:
    if value == TUNE:
        return _default_dimension(label, name, model, param, where)
    if "choices" in value:
        if set(value) != {"choices"} or not isinstance(value["choices"], list) or not value["choices"]:
            raise RecipeError(f"{where}: a set of values is {{choices: [a, b, ...]}}, not {value!r}")
        choices = tuple(param.validate(c, where) for c in value["choices"])
        return Dimension(label, name, model, param.kind, choices=choices)
    extra = set(value) - RANGE_KEYS
    if extra or "min" not in value or "max" not in value:
        raise RecipeError(f"{where}: a range is {{min: a, max: b}} (optional log: true, step: s), not {value!r}")
    if param.kind not in (int, float):
        raise RecipeError(f"{where}: {name} is {param.kind.__name__}; search it with {{choices: [...]}}")
    low, high = (param.validate(_number(value[k], where), where) for k in ("min", "max"))
    log = value.get("log", False)
    step = value.get("step")
    if not isinstance(log, bool):
        raise RecipeError(f"{where}: log must be true or false, not {log!r}")
    if not low < high:
        raise RecipeError(f"{where}: min ({low:g}) must be below max ({high:g})")
    if log and low <= 0:
        raise RecipeError(f"{where}: a log-scale range needs min > 0 (got {low:g})")
    if step is not None:
        step = _number(step, where)
        if step <= 0 or log:
            raise RecipeError(f"{where}: step must be a positive number, and cannot go with log")
        if param.kind is int and float(step) != int(step):
            raise RecipeError(f"{where}: {name} is a whole number; its step must be one too")
    return Dimension(label, name, model, param.kind, float(low), float(high), log, step)


def _default_dimension(label: str, name: str, model: int | None, param: Param, where: str) -> Dimension:
    """``tune``: the spec's search range, else its bounds; booleans and named options: all of them."""
    if param.kind is bool:
        return Dimension(label, name, model, bool, choices=(False, True))
    if param.choices:
        return Dimension(label, name, model, str, choices=param.choices)
    if param.kind is str:
        raise RecipeError(f"{where}: {name} has no set of values to search; give {{choices: [...]}}")
    low, high = param.search or (param.low, param.high)
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        raise RecipeError(f"{where}: {name} has no default range to search; give {{min: a, max: b}}")
    if not param.low_inclusive and param.search is None and low == param.low:
        raise RecipeError(f"{where}: {name} must stay above {low:g}; give {{min: a, max: b}}")
    return Dimension(label, name, model, param.kind, float(low), float(high), param.search_log)


def _tidy(value: Any) -> Any:
    """A drawn float to 4 significant digits: recipes stay readable, and a trial's merge is the
    one its recipe describes (the rounded value is what is merged)."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def _number(value: Any, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-5 as text
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{where}: expected a number, not {value!r}")
    return value


def _filled(parameters: Any, spec: MethodSpec, model: int | None, values: dict, others: list[MethodSpec]) -> dict:
    """One ``parameters:`` mapping for a trial: searched values replaced by the drawn ones, and
    the parameters of the search's other methods that ``spec`` does not read left out (anything
    else stays, for the recipe parser to warn about, as mergekit ignores it)."""
    out = {}
    for name, value in (parameters or {}).items():
        if not _reads(spec, name, model is not None) and (_searched(value) or any(s.param(name) for s in others)):
            continue
        out[name] = values[(model, name)] if _searched(value) else value
    return out

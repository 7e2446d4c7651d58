"""Recipes: what to merge, in mergekit's YAML schema, so recipes copied from model cards run.

    merge_method: ties
    base_model: path/or/org-name[@revision]
    models:
      - model: org/fine-tune-a
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true}
    dtype: bfloat16

or, instead of ``models``, ``slices`` (layer ranges of several models, for frankenmerges and
per-range merges) or mergekit's ``modules: {default: {slices: ...}}``. A parameter value may be a
scalar, a list of scalars (a gradient over the layers: layer i of N takes the value at position
i/(N-1) of the list, interpolated; tensors outside the layers take the first value), or a list
of ``{filter, value}`` (the first filter that is a substring of the tensor name wins; no filter
matches everything). These are mergekit's rules.

Published recipes carry keys mergekit silently ignores (typos such as ``lamda``, a method
parameter at the top level, ``int8_mask`` for a method that does not read it). They run here as
in mergekit, with a warning that names each key and suggests the nearest known one;
``strict=True`` (``--strict``) turns the warnings into an error. Numbers that YAML 1.1 reads as
strings (``tol: 1e-9``) are converted, as mergekit's schema converts them. Our extensions:
``seed`` (random steps) and, per model, ``calibration`` (the text Fisher and RegMean run that
model on). Several documents separated by ``---``, each with a ``name:``, are a multi-stage
recipe (``load_stages``).
"""

from __future__ import annotations

import difflib
import math
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
TOP_LEVEL_KEYS = (
    "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "seed",
)
MODEL_KEYS = ("model", "parameters", "calibration")
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
IGNORED_BY_MERGEKIT = "mergekit ignores it too"


# -- what a recipe holds ---------------------------------------------------------------------

@dataclass
class ModelEntry:
    model: str  # a folder or Hub id (``@revision``), optionally ``+adapter``
    parameters: dict[str, Any] = field(default_factory=dict)
    calibration: str | list[str] | None = None  # data-aware methods: file, registered source or texts


@dataclass
class SliceSource:
    """Layers ``layer_range`` = [start, end) of one model, entering one output slice."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputSlice:
    """A run of output layers: layer i of it merges layer start + i of every source."""

    sources: list[SliceSource]
    base_model: str | None = None  # overrides the recipe's base_model for this slice
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


@dataclass
class TokenizerSettings:
    """mergekit's ``tokenizer:`` block (``tokenizer_source: X`` is ``source: X``)."""

    source: str = "union"  # "base", "union" or a model reference
    tokens: dict[str, Any] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass
class Recipe:
    merge_method: str
    models: list[ModelEntry]  # the models of a ``models:`` recipe, or every model the slices name
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    seed: int = 0
    name: str | None = None  # a stage of a multi-stage recipe
    slices: list[OutputSlice] | None = None  # None: a ``models:`` recipe
    tokenizer_written_as: str = field(default="", compare=False)  # "tokenizer_source" or "tokenizer"
    warnings: list[str] = field(default_factory=list, compare=False)  # keys ignored, as mergekit ignores them

    @property
    def method(self) -> MethodSpec:
        return get_method(self.merge_method).spec

    @property
    def tokenizer_source(self) -> str | None:
        return self.tokenizer.source if self.tokenizer else None

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
        return entries_for(self.method, self.models, self.base_model)

    def referenced_models(self) -> list[str]:
        """Every model reference the recipe names (base first), once each."""
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models]
        for piece in self.slices or []:
            refs += ([piece.base_model] if piece.base_model else []) + [s.model for s in piece.sources]
        return list(dict.fromkeys(refs))

    def to_dict(self) -> dict[str, Any]:
        """The recipe as mergekit's YAML has it (ignored keys left out)."""
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        out["merge_method"] = self.merge_method
        if self.base_model:
            out["base_model"] = self.base_model
        if self.slices is not None:
            out["slices"] = [_slice_dict(piece) for piece in self.slices]
        else:
            out["models"] = [_entry_dict(m) for m in self.models]
        for key in ("parameters", "dtype", "out_dtype", "chat_template"):
            value = getattr(self, key)
            if value:
                out[key] = value
        if self.tokenizer is not None:
            simple = not self.tokenizer.tokens and self.tokenizer.pad_to_multiple_of is None
            if simple and self.tokenizer_written_as != "tokenizer":
                out["tokenizer_source"] = self.tokenizer.source
            else:
                block: dict[str, Any] = {"source": self.tokenizer.source}
                if self.tokenizer.tokens:
                    block["tokens"] = self.tokenizer.tokens
                if self.tokenizer.pad_to_multiple_of is not None:
                    block["pad_to_multiple_of"] = self.tokenizer.pad_to_multiple_of
                out["tokenizer"] = block
        if self.seed:
            out["seed"] = self.seed
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def entries_for(spec: MethodSpec, models: list[ModelEntry], base_model: str | None) -> list[ModelEntry]:
    """The models that enter ``spec``'s method, given the listed ``models`` and the base (see
    ``Recipe.input_entries``)."""
    if spec.base == "config":
        return list(models)
    if spec.base == "origin":
        return [m for m in models if m.model != base_model]
    entries = list(models)
    if base_model and all(m.model != base_model for m in entries):
        entries.append(ModelEntry(base_model))
    if spec.base == "first_input":
        entries.sort(key=lambda m: m.model != base_model)
    return entries


def _entry_dict(entry: ModelEntry) -> dict:
    return {"model": entry.model,
            **({"parameters": entry.parameters} if entry.parameters else {}),
            **({"calibration": entry.calibration} if entry.calibration is not None else {})}


def _slice_dict(piece: OutputSlice) -> dict:
    sources = [{"model": s.model, "layer_range": list(s.layer_range),
                **({"parameters": s.parameters} if s.parameters else {})} for s in piece.sources]
    return {"sources": sources, **({"base_model": piece.base_model} if piece.base_model else {}),
            **({"parameters": piece.parameters} if piece.parameters else {})}


# -- reading --------------------------------------------------------------------------------

def load_recipe(source: str | Path | dict, *, strict: bool = False) -> Recipe:
    """Parse and validate one recipe from a YAML file path, YAML text or a dict.

    A one-line string ending in .yaml/.yml is read as a path; code that takes recipes from
    untrusted users (the hosted studio) uses ``recipe_from_text``, which never opens a file.
    ``strict``: keys mergekit would ignore are an error instead of a warning.
    """
    if isinstance(source, dict):
        return parse_recipe(source, strict=strict)
    stages = load_stages(source, strict=strict)
    if len(stages) > 1:
        raise RecipeError(f"this recipe has {len(stages)} documents (a multi-stage recipe: "
                          f"{', '.join(repr(s.name) for s in stages)}); run it with `python -m merging merge`")
    return stages[0]


def load_stages(source: str | Path, *, strict: bool = False) -> list[Recipe]:
    """Every document of a recipe file or text: one recipe, or the named stages of a multi-stage
    recipe (mergekit-multi's format), in order."""
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise RecipeError(f"recipe {path} is not UTF-8 text") from None
        return stages_from_text(text, strict=strict)
    return stages_from_text(source, strict=strict)


def recipe_from_text(text: str, *, strict: bool = False) -> Recipe:
    """Parse and validate one recipe from YAML text only (never a file path)."""
    stages = stages_from_text(text, strict=strict)
    if len(stages) > 1:
        raise RecipeError(f"this recipe has {len(stages)} documents (a multi-stage recipe); give one at a time here")
    return stages[0]


def stages_from_text(text: str, *, strict: bool = False) -> list[Recipe]:
    """The documents of YAML text (never a file path), each parsed and validated. Several documents
    must each have a distinct ``name:`` (later ones may refer to earlier ones by it)."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"recipe is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise RecipeError("recipe is nested too deeply") from None
    if not documents:
        raise RecipeError("a recipe must be a YAML mapping with at least 'merge_method' and 'models'")
    if len(documents) == 1:
        return [parse_recipe(documents[0], strict=strict)]
    stages, names = [], set()
    for number, document in enumerate(documents, 1):
        try:
            stage = parse_recipe(document, strict=strict)
        except RecipeError as exc:
            raise RecipeError(f"document {number} of the recipe: {exc}") from None
        if stage.name is None and any(s.name is None for s in stages):
            raise RecipeError("a multi-stage recipe names every stage (name: ...) except, at most, the final one")
        if stage.name is not None and stage.name in names:
            raise RecipeError(f"two stages are named {stage.name!r}; stage names must be unique")
        names.add(stage.name)
        stages.append(stage)
    return stages


class _Notes:
    """The warnings one parse collects: keys mergekit ignores, each with the nearest known key."""

    def __init__(self):
        self.warnings: list[str] = []

    def ignored(self, where: str, key: Any, known, hint: str = "") -> None:
        candidates = [str(k) for k in known if str(k) != str(key)]
        suggestion = difflib.get_close_matches(str(key), candidates, n=1, cutoff=0.6)
        text = f"{where}: {key!r} is ignored ({IGNORED_BY_MERGEKIT})"
        if suggestion:
            text += f"; did you mean {suggestion[0]!r}?"
        if hint:
            text += f" {hint}"
        self.warnings.append(text)


def parse_recipe(data: Any, *, strict: bool = False) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping with at least 'merge_method' and 'models'")
    notes = _Notes()
    if "merge_method" not in data:
        raise RecipeError("recipe has no 'merge_method'; run `python -m merging methods` to list them")
    if not isinstance(data["merge_method"], str):
        raise RecipeError(f"merge_method must be a method name, not {data['merge_method']!r}")
    spec = get_method(data["merge_method"]).spec
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            hint = ("It is a parameter of this method: put it under 'parameters:'."
                    if spec.param(str(key)) else "")
            notes.ignored("recipe", key, TOP_LEVEL_KEYS + tuple(p.name for p in spec.params), hint)

    base_model = _model_ref(data["base_model"], "base_model") if data.get("base_model") is not None else None
    global_params = _parameters(data.get("parameters"), spec, "parameters", notes, per_model=False)
    models, slices = _layout(data, spec, notes, global_params)
    tokenizer, written_as = _tokenizer(data, notes)
    recipe = Recipe(
        merge_method=spec.name,
        models=models,
        base_model=base_model,
        parameters=global_params,
        dtype=_dtype(data.get("dtype"), "dtype"),
        out_dtype=_dtype(data.get("out_dtype"), "out_dtype"),
        tokenizer=tokenizer,
        chat_template=_chat_template(data.get("chat_template")),
        seed=_seed(data.get("seed", 0)),
        name=_name(data.get("name")),
        slices=slices,
        tokenizer_written_as=written_as,
        warnings=notes.warnings,
    )
    _check_inputs(recipe, spec)
    if strict and recipe.warnings:
        raise RecipeError(f"{len(recipe.warnings)} key(s) that mergekit ignores, an error with --strict: "
                          + "; ".join(recipe.warnings))
    return recipe


def _layout(data: dict, spec: MethodSpec, notes: _Notes, global_params: dict) -> tuple[list[ModelEntry], list[OutputSlice] | None]:
    """(models, slices) from exactly one of ``models``, ``slices`` or ``modules``."""
    given = [key for key in ("models", "slices", "modules") if data.get(key)]
    if len(given) != 1:
        which = " and ".join(repr(k) for k in given) if given else "none of them"
        raise RecipeError(f"a recipe needs exactly one of 'models', 'slices' or 'modules' (got {which}); "
                          "'models' is a list of entries like {model: org/name, parameters: {weight: 1.0}}")
    if given[0] == "models":
        return _model_entries(data["models"], spec, notes), None
    if given[0] == "slices":
        slices = _slices(data["slices"], spec, notes, "slices")
    else:
        module = _single_module(data["modules"], notes)
        for name, value in _parameters(module.get("parameters"), spec, "modules.parameters", notes, per_model=False).items():
            global_params.setdefault(name, value)  # one module: its parameters rank just above the recipe's
        if module.get("models"):
            return _model_entries(module["models"], spec, notes), None
        slices = _slices(module.get("slices"), spec, notes, "modules.slices")
    models = list({s.model: ModelEntry(s.model) for piece in slices for s in piece.sources}.values())
    return models, slices


def _single_module(value: Any, notes: _Notes) -> dict:
    if not isinstance(value, dict) or len(value) != 1:
        raise RecipeError("'modules' must hold exactly one module (text models have one, e.g. 'default'): "
                          "{default: {slices: [...]}}")
    name, module = next(iter(value.items()))
    if not isinstance(module, dict) or bool(module.get("slices")) == bool(module.get("models")):
        raise RecipeError(f"modules.{name} needs exactly one of 'slices' or 'models'")
    for key in module:
        if key not in ("slices", "models", "parameters"):
            notes.ignored(f"modules.{name}", key, ("slices", "models", "parameters"))
    return module


def _model_ref(value: Any, where: str) -> str:
    """A model reference as text: ``path``, ``org/name@revision``, with ``+adapter`` for a LoRA."""
    if isinstance(value, dict):
        value = _long_form(value, where)
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where} must be a local folder or a Hub id like 'org/name', not {value!r}")
    value = value.strip()
    if value.count("+") > 1:
        raise RecipeError(f"{where} {value!r}: a reference is MODEL or MODEL+ADAPTER (one '+')")
    for part in value.split("+"):
        if part.count("@") > 1 or not part.split("@")[0].strip():
            raise RecipeError(f"{where} {value!r}: write a model as a folder or org/name, optionally @revision")
    return value


def _long_form(value: dict, where: str) -> str:
    """mergekit's long form ``{model: {path, revision}, lora: {path, revision}}`` as text."""
    if "model" not in value or set(value) - {"model", "lora"}:
        raise RecipeError(f"{where} must be a reference like org/name, or {{model: ..., lora: ...}}, not {value!r}")

    def text(part: Any) -> Any:
        if isinstance(part, dict) and set(part) <= {"path", "revision"} and isinstance(part.get("path"), str):
            return f"{part['path']}@{part['revision']}" if part.get("revision") else part["path"]
        return part

    model, lora = text(value["model"]), text(value.get("lora"))
    if not isinstance(model, str) or (lora is not None and not isinstance(lora, str)):
        raise RecipeError(f"{where}: write the model (and lora) as org/name or {{path, revision}}, not {value!r}")
    return f"{model}+{lora}" if lora else model


def _model_entries(value: Any, spec: MethodSpec, notes: _Notes) -> list[ModelEntry]:
    if not isinstance(value, list) or not value:
        raise RecipeError("recipe needs 'models': a list of entries like {model: org/name, parameters: {weight: 1.0}}")
    entries = []
    for i, item in enumerate(value):
        where = f"models[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise RecipeError(f"{where} must be a mapping with a 'model' key, not {item!r}")
        ref = _model_ref(item["model"], f"{where}.model")
        for key in item:
            if key not in MODEL_KEYS:
                notes.ignored(f"{where} ({ref})", key, MODEL_KEYS)
        params = _parameters(item.get("parameters"), spec, f"{where}.parameters ({ref})", notes, per_model=True)
        entries.append(ModelEntry(ref, params, _calibration(item.get("calibration"), f"{where}.calibration ({ref})")))
    return entries


def _slices(value: Any, spec: MethodSpec, notes: _Notes, where: str) -> list[OutputSlice]:
    if not isinstance(value, list) or not value:
        raise RecipeError(f"'{where}' must be a non-empty list of {{sources: [{{model: ..., layer_range: [start, end]}}]}}")
    slices = []
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("sources"), list) or not item["sources"]:
            raise RecipeError(f"{here} must be a mapping with 'sources': a list of {{model, layer_range}}")
        for key in item:
            if key not in SLICE_KEYS:
                notes.ignored(here, key, SLICE_KEYS)
        if item.get("residual_weight") is not None:
            notes.ignored(here, "residual_weight", (), "(mergekit reads it nowhere)")
        sources = [_slice_source(source, spec, notes, f"{here}.sources[{j}]") for j, source in enumerate(item["sources"])]
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) != 1:
            raise RecipeError(f"{here}: every source of a slice must span the same number of layers, got "
                              + ", ".join(f"{s.model} {list(s.layer_range)}" for s in sources))
        base = _model_ref(item["base_model"], f"{here}.base_model") if item.get("base_model") is not None else None
        params = _parameters(item.get("parameters"), spec, f"{here}.parameters", notes, per_model=False, slice_level=True)
        slices.append(OutputSlice(sources, base, params))
    return slices


def _slice_source(item: Any, spec: MethodSpec, notes: _Notes, where: str) -> SliceSource:
    if not isinstance(item, dict) or "model" not in item or "layer_range" not in item:
        raise RecipeError(f"{where} must be a mapping with 'model' and 'layer_range: [start, end]', not {item!r}")
    ref = _model_ref(item["model"], f"{where}.model")
    for key in item:
        if key not in SOURCE_KEYS:
            notes.ignored(f"{where} ({ref})", key, SOURCE_KEYS,
                          "(a revision goes into the reference: org/name@revision)" if key == "revision" else "")
    span = item["layer_range"]
    if not (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
            and 0 <= span[0] < span[1]):
        raise RecipeError(f"{where} ({ref}): layer_range must be [start, end] with 0 <= start < end (end excluded), "
                          f"not {span!r}")
    params = _parameters(item.get("parameters"), spec, f"{where}.parameters ({ref})", notes, per_model=True)
    return SliceSource(ref, (span[0], span[1]), params)


def _calibration(value: Any, where: str) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, list) and value and all(isinstance(x, str) and x.strip() for x in value):
        return list(value)
    raise RecipeError(f"{where}: expected {sources_hint()}, not {value!r}")


def _parameters(value: Any, spec: MethodSpec, where: str, notes: _Notes, *, per_model: bool,
                slice_level: bool = False) -> dict[str, Any]:
    """The settings ``spec`` reads from one ``parameters:`` mapping, validated and normalized;
    anything else is a warning (mergekit ignores parameters a method does not read)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must be a mapping of parameter names to values, not {value!r}")
    allowed = spec.model_params() if per_model else spec.params
    out = {}
    for name, setting in value.items():
        param = next((p for p in allowed if p.name == name), None)
        if param is None:
            if per_model and spec.param(str(name)):
                hint = f"(a global parameter of {spec.name}: put it in the recipe's top-level 'parameters:')"
            elif spec.param(str(name)) is None and str(name) in ("dtype", "out_dtype", "tokenizer_source"):
                hint = f"('{name}' is a top-level key of the recipe)"
            else:
                hint = f"({spec.name} does not read it)"
            notes.ignored(where, name, [p.name for p in allowed], hint)
            continue
        out[name] = _validate_setting(setting, param, f"{where}.{name}")
    return out


def _validate_setting(setting: Any, param: Param, where: str, depth: int = 0) -> Any:
    """Check every scalar a setting can produce (so a bad value fails before any download) and
    return the setting with YAML-1.1 numeric strings such as '1e-9' converted to numbers."""
    if isinstance(setting, dict):
        extra = set(setting) - {"filter", "value"}
        if extra or "value" not in setting:
            raise RecipeError(f"{where}: a conditional value is {{filter: text, value: ...}}, got {setting!r}")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise RecipeError(f"{where}: filter must be text, not {setting['filter']!r}")
        if depth > 0:
            raise RecipeError(f"{where}: conditional values cannot be nested")
        value = _validate_setting(setting["value"], param, where, depth + 1)
        return {**({"filter": setting["filter"]} if setting.get("filter") is not None else {}), "value": value}
    if isinstance(setting, list):
        if not setting:
            raise RecipeError(f"{where}: an empty list is not a value")
        if all(isinstance(x, dict) for x in setting):
            return [_validate_setting(item, param, where, depth) for item in setting]
        if any(isinstance(x, (dict, list)) for x in setting):
            raise RecipeError(f"{where}: a gradient is a flat list of numbers, not {setting!r}")
        return [_scalar(x, param, where) for x in setting]
    return _scalar(setting, param, where)


def _scalar(value: Any, param: Param, where: str) -> Any:
    if isinstance(value, str) and param.kind in (int, float):
        try:
            number = float(value)  # YAML 1.1 reads 1e-9 as a string; mergekit's schema converts it
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                value = int(number) if number.is_integer() and ("." not in value and "e" not in value.lower()) else number
    param.validate(value, where)
    return value


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


def _tokenizer(data: dict, notes: _Notes) -> tuple[TokenizerSettings | None, str]:
    source, block = data.get("tokenizer_source"), data.get("tokenizer")
    if source is not None and block is not None:
        raise RecipeError("give either 'tokenizer_source' or 'tokenizer', not both")
    if source is not None:
        return TokenizerSettings(_tokenizer_source(source, "tokenizer_source")), "tokenizer_source"
    if block is None:
        return None, ""
    if not isinstance(block, dict):
        raise RecipeError("'tokenizer' must be a mapping like {source: union, tokens: {...}, pad_to_multiple_of: 64}")
    for key in block:
        if key not in TOKENIZER_KEYS:
            notes.ignored("tokenizer", key, TOKENIZER_KEYS)
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, dict))
                                               for k, v in tokens.items()):
        raise RecipeError("tokenizer.tokens must map each token to {source: ..., force: true|false}")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise RecipeError(f"tokenizer.pad_to_multiple_of must be a positive whole number, not {pad!r}")
    return TokenizerSettings(_tokenizer_source(block.get("source", "union"), "tokenizer.source"), dict(tokens), pad), "tokenizer"


def _tokenizer_source(value: Any, where: str) -> str:
    if value in ("base", "union"):
        return value
    if isinstance(value, str) and value.startswith("model:"):
        raise RecipeError(f"{where} {value!r}: the legacy 'model:<path>' form is refused by mergekit 0.1.5 too; "
                          f"write the model reference alone: {where}: {value[len('model:'):].strip()}")
    return _model_ref(value, where)


def _chat_template(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"chat_template must be 'auto', a template name such as chatml, or a Jinja template, not {value!r}")
    return value


def _name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "/" in value or "\\" in value:
        raise RecipeError(f"name must be a short name for this stage (no slashes), not {value!r}")
    return value.strip()


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise RecipeError(f"seed must be an integer in [0, 2^32), not {value!r}")
    return value


def slice_base(piece: OutputSlice, base_model: str | None) -> str | None:
    """A slice's base is one of its sources (its own base_model, else the recipe's), never added."""
    base = piece.base_model or base_model
    return base if base in [s.model for s in piece.sources] else None


def _check_inputs(recipe: Recipe, spec: MethodSpec) -> None:
    slice_bases = [piece.base_model for piece in recipe.slices or []]
    if spec.needs_base and not recipe.base_model and not (slice_bases and all(slice_bases)):
        raise RecipeError(f"{spec.name} needs a 'base_model': task vectors are measured from it")
    groups = [(None, recipe.input_entries())] if recipe.slices is None else [
        (f"slices[{i}]", entries_for(spec, [ModelEntry(s.model) for s in piece.sources],
                                     slice_base(piece, recipe.base_model)))
        for i, piece in enumerate(recipe.slices)]
    for where, inputs in groups:
        prefix = f"{where}: " if where else ""
        count = len(inputs)
        if count < spec.min_models:
            raise RecipeError(f"{prefix}{spec.name} needs at least {spec.min_models} input model(s) besides the base, got {count}")
        if spec.max_models is not None and count > spec.max_models:
            raise RecipeError(f"{prefix}{spec.name} takes {spec.inputs_help or f'at most {spec.max_models} models'}, got {count}")
    if spec.calibration:
        for entry in recipe.input_entries():
            if entry.calibration is None:
                raise RecipeError(
                    f"{spec.name} runs every model on calibration text, and {entry.model} has none: add "
                    f"'calibration:' to its entry: {sources_hint()}"
                )
    for param in spec.params:
        if param.required:
            for entry in recipe.input_entries() if param.scope == "model" else [None]:
                if param.name not in (entry.parameters if entry else {}) and param.name not in recipe.parameters:
                    who = f"model {entry.model}" if entry else "the recipe's parameters"
                    raise RecipeError(f"{spec.name} needs {param.name!r} for {who}")

"""Method and parameter specifications: the one place a merge method is described.

A method is a pure tensor function plus a ``MethodSpec``. The spec drives recipe validation,
the engine, ``python -m merging methods``, the README table and the studio's controls, typical
settings and starting values, so a method appears everywhere by being registered once with
``register``.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch

from merging.calibration import MAX_LENGTH_PARAM, SAMPLES_PARAM, CalibrationKind
from merging.errors import RecipeError

FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # merges compute in float32

REQUIRED = object()
"""Sentinel default for a parameter the recipe must set."""

_STEP_HOOK: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar("merge_step_hook", default=None)


def report_steps(done: int, total: int) -> None:
    """Called by a method's long loop over one tensor (WUDI's optimizer steps): the engine shows
    how far the tensor is, and raises ``MergeCancelled`` here when the user stopped the merge, so
    a minute-long tensor neither looks frozen nor ignores Stop. Outside a merge it does nothing."""
    hook = _STEP_HOOK.get()
    if hook is not None:
        hook(done, total)


@contextmanager
def step_reporting(hook: Callable[[int, int], None]):
    """Route ``report_steps`` of the method calls made inside the block to ``hook``."""
    token = _STEP_HOOK.set(hook)
    try:
        yield
    finally:
        _STEP_HOOK.reset(token)

Scope = Literal["global", "model"]


@dataclass(frozen=True)
class Param:
    """One tunable of a method.

    ``scope`` is ``"model"`` for values set per input model (weight, density) and ``"global"``
    for values set once in the recipe's top-level ``parameters``. As in mergekit, a per-model
    value missing from a model's entry falls back to the same key in the global parameters.
    """

    name: str
    kind: type  # float, int, bool or str
    default: Any
    scope: Scope
    help: str
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    choices: tuple[str, ...] | None = None
    hidden: bool = False  # accepted (mergekit compatibility) but changes nothing: no control, not in the README table
    # The range a parameter search tries when a search spec says only ``tune`` (numbers: [low, high],
    # searched on a log scale when ``search_log``); None: the bounds above, when both are finite.
    search: tuple[float, float] | None = None
    search_log: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def range_text(self) -> str:
        if self.choices:
            return " | ".join(self.choices)
        if self.kind is bool:
            return "true | false"
        if self.low is None and self.high is None:
            return "any number"
        left = ("[" if self.low_inclusive else "(") + ("-inf" if self.low is None else f"{self.low:g}")
        right = ("inf" if self.high is None else f"{self.high:g}") + ("]" if self.high_inclusive else ")")
        return f"{left}, {right}"

    def validate(self, value: Any, where: str) -> Any:
        """Coerce a YAML scalar to this parameter's type or raise a RecipeError naming ``where``."""
        bad = f"{where}: {self.name} = {value!r} is not valid; expected {self.kind.__name__} in {self.range_text()}"
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise RecipeError(bad)
        if self.kind is str:
            if isinstance(value, str) and (not self.choices or value in self.choices):
                return value
            raise RecipeError(bad)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(bad)
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise RecipeError(bad + " (a finite number within float32's range)")
        if self.kind is int:
            if float(value) != int(value):
                raise RecipeError(bad)
            value = int(value)
        value = self.kind(value)
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            raise RecipeError(bad)
        if self.high is not None and (value > self.high or (value == self.high and not self.high_inclusive)):
            raise RecipeError(bad)
        return value


# Parameters shared by many methods, declared once.
WEIGHT = Param(
    "weight", float, 1.0, "model",
    "How much this model's contribution counts (for task arithmetic, its task vector's "
    "scaling coefficient; typical 0.3-0.5 per model). mergekit requires it; here it defaults to 1.",
    search=(0.1, 1.5),
)
DENSITY = Param(
    "density", float, 1.0, "model",
    "Fraction of this model's delta parameters kept before merging (1 keeps all).",
    low=0.0, high=1.0, low_inclusive=False, search=(0.05, 1.0),
)
NORMALIZE = Param(
    "normalize", bool, True, "global",
    "Divide by the sum of the weights that contribute to each entry.",
)
LAMBDA = Param(
    "lambda", float, 1.0, "global",
    "Scale applied to the merged task vector before adding it to the base.",
    search=(0.3, 2.0),
)
DATA_WEIGHT = Param(
    "weight", float, 1.0, "model",
    "How much this model counts (scales its Fisher or its Gram matrices).",
    low=0.0, search=(0.1, 2.0),
)
CALIBRATION_SAMPLES = Param(
    SAMPLES_PARAM, int, 128, "global",
    "Calibration examples used per model (the first ones of its calibration data).",
    low=1, high=100_000,
)
CALIBRATION_MAX_LENGTH = Param(
    MAX_LENGTH_PARAM, int, 256, "global",
    "Tokens per calibration example (longer examples are truncated).",
    low=2, high=32_768,
)
INT8_MASK = Param(
    "int8_mask", bool, False, "global",
    "Accepted for mergekit compatibility; masks are always compact booleans here.",
    hidden=True,
)


FAMILIES = ("interpolation", "task vectors", "subspace", "data-aware", "other")
"""The groups methods are listed in (``python -m merging methods``, the README, the Merge tab)."""

BaseRole = Literal["origin", "input", "first_input", "config"]


@dataclass(frozen=True)
class MethodSpec:
    """Everything a method is and accepts; the recipe parser, the engine, the CLI, the README
    table and the studio's controls read it and never a method's name.

    ``base``: what the recipe's ``base_model`` is to the method. ``origin``: task vectors are
    measured from it and it is not an input (task arithmetic family). ``input``: it is averaged
    in like another model, appended when not listed (linear, as mergekit). ``first_input``: it
    is the first of the inputs (slerp). ``config``: it only supplies the config (Fisher, RegMean).
    """

    name: str
    title: str
    paper: str
    summary: str
    params: tuple[Param, ...]
    needs_base: bool
    base: BaseRole = "origin"
    min_models: int = 1
    max_models: int | None = None
    inputs_help: str | None = None  # how many models it takes, in words, when a recipe gives too many or few
    randomized: bool = False
    # What each model is run on its calibration text for (a ``merging.calibration`` kind), or None.
    calibration: CalibrationKind | None = None
    family: str = "other"  # one of FAMILIES
    guidance: str = ""  # the paper's usual settings, in a sentence or two
    suggested: Mapping[str, Any] = field(default_factory=dict)  # parameter -> starting value in the studio

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name}: family {self.family!r} is not one of {FAMILIES}")
        unknown = [key for key in self.suggested if self.param(key) is None]
        if unknown:
            raise ValueError(f"method {self.name}: suggested value for unknown parameter {unknown[0]!r}")
        if self.calibration and not (self.param(SAMPLES_PARAM) and self.param(MAX_LENGTH_PARAM)):
            raise ValueError(f"method {self.name} runs models on calibration text: declare CALIBRATION_SAMPLES "
                             "and CALIBRATION_MAX_LENGTH among its parameters")

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "model")

    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "global")

    def starting_value(self, param: Param) -> Any:
        """What the studio's form gives ``param`` when this method is chosen."""
        return self.suggested.get(param.name, param.default)


MergeFn = Callable[..., torch.Tensor]
"""``fn(base, tensors, per_model, params, seed) -> tensor`` (data-aware methods: ``..., seed, stats)``).

base: the base tensor or None; tensors: the input models' tensors (same shape, in their
stored dtype, on the compute device; methods widen them to float32 chunk by chunk); per_model: one dict of resolved per-model parameters each; params: resolved global
parameters; seed: an integer derived from the recipe seed and the tensor name, for methods
with random steps; stats (methods with ``calibration`` only): per model, that model's
statistics for this tensor from ``merging.calibration``. Inputs are never modified; the result
is float32.
"""


@dataclass(frozen=True)
class MergeMethod:
    spec: MethodSpec
    fn: MergeFn = field(repr=False)

    def __call__(self, base, tensors, per_model, params, seed: int = 0, stats=None) -> torch.Tensor:
        if self.spec.calibration:
            return self.fn(base, tensors, per_model, params, seed, stats)
        return self.fn(base, tensors, per_model, params, seed)


REGISTRY: dict[str, MergeMethod] = {}


def register(spec: MethodSpec) -> Callable[[MergeFn], MergeFn]:
    """Decorator: register ``fn`` under ``spec.name``. ``REGISTRY`` stays in ``FAMILIES`` order
    (registration order within a family)."""

    def wrap(fn: MergeFn) -> MergeFn:
        if spec.name in REGISTRY:
            raise ValueError(f"merge method {spec.name!r} registered twice")
        REGISTRY[spec.name] = MergeMethod(spec, fn)
        ordered = sorted(REGISTRY.items(), key=lambda item: FAMILIES.index(item[1].spec.family))
        REGISTRY.clear()
        REGISTRY.update(ordered)
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise RecipeError(f"unknown merge_method {name!r}; available methods: {known}") from None

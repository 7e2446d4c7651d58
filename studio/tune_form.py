"""The Tune tab's form: which parameters of the chosen methods are searched, over which ranges,
and the search spec (``tuning.spec``) they make with the Models tab's base and sources.

Rows come from the methods' specs (``merging.methods.REGISTRY``), so a newly registered method
can be searched without changes here: a number with a range (``Param.search``, else its bounds
when both are finite) gets a min and a max, prefilled; a switch or a set of named options is
searched over all its values. One row stands for a parameter name in every chosen method that
reads it (its range from the first); a per-model parameter's range applies to every model, each
model's value drawn on its own. What the visitor changed is kept as ``edits``
(key -> {"search", "min", "max"}), everything else comes from the specs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

from merging.errors import MergeStudioError
from merging.methods import REGISTRY, Param

# WUDI's 300 optimizer steps per matrix make each trial minutes long on a CPU: a choice, not a default.
DEFAULT_METHODS = ("ties", "iso_c", "iso_cts", "tsv")
SAMPLERS = {"TPE (Bayesian; the first 8 trials random)": "tpe", "CMA-ES (numbers only)": "cmaes",
            "NSGA-II (genetic; for pareto)": "nsga2", "random": "random"}
OBJECTIVES = {"mean accuracy ÷ best source's, over tasks": "mean", "every task apart (Pareto front)": "pareto"}


@dataclass(frozen=True)
class Row:
    """One searchable parameter of the chosen methods, with its starting range."""

    key: str  # "<scope>:<name>": a name can be per-model in one method and global in another
    param: Param  # as the first chosen method that reads it declares it
    methods: tuple[str, ...]  # the chosen methods that read it
    low: float | None  # the starting range of a number; None for a switch or named options
    high: float | None
    log: bool
    searched: bool  # ticked at first: the numbers with a search range in their spec

    @property
    def numeric(self) -> bool:
        return self.low is not None

    @property
    def values(self) -> tuple:
        """What a switch or named options are searched over."""
        return (False, True) if self.param.kind is bool else tuple(self.param.choices or ())


def searchable(name: str) -> bool:
    """Whether the Tune tab offers ``name``: data-aware methods need calibration text for every
    model, which this form does not ask for (a search spec with ``calibration:`` runs them)."""
    return REGISTRY[name].spec.calibration is None


def method_choices() -> list[tuple[str, str]]:
    """(label, name) of the methods the tab can search, as the Merge tab labels them."""
    return [(f"{m.spec.title} — {name}", name) for name, m in REGISTRY.items() if searchable(name)]


def default_methods() -> list[str]:
    return [name for name in DEFAULT_METHODS if name in REGISTRY]


def _range(param: Param) -> tuple[float, float] | None:
    """A number's starting range: its spec's search range, else its bounds when both are finite
    (and the lower one may be taken); None when only the user can give one."""
    if param.kind not in (int, float):
        return None
    if param.search is not None:
        return param.search
    if param.low is None or param.high is None or not (math.isfinite(param.low) and math.isfinite(param.high)):
        return None
    return (param.low, param.high) if param.low_inclusive else None


def rows(methods: list[str]) -> list[Row]:
    """The searchable parameters of ``methods``, in the order the methods declare them."""
    found: dict[str, Row] = {}
    for method in methods or []:
        for param in REGISTRY[method].spec.params:
            if param.hidden:
                continue
            key = f"{param.scope}:{param.name}"
            if key in found:
                found[key] = replace(found[key], methods=(*found[key].methods, method))
                continue
            bounds = _range(param)
            if bounds is None and param.kind is not bool and not param.choices:
                continue  # a number with no range to start from (the method's default is kept)
            low, high = bounds or (None, None)
            found[key] = Row(key, param, (method,), low, high, param.search_log and param.search is not None,
                             bounds is not None and param.search is not None)
    return list(found.values())


def label(row: Row) -> str:
    where = "per model" if row.param.scope == "model" else "global"
    return f"{row.param.name} ({where}; {', '.join(row.methods)})"


def current(row: Row, edits: dict) -> dict:
    """The row as the visitor sees it: {"search", "min", "max"} (the spec's, changed by ``edits``)."""
    return {"search": row.searched, "min": row.low, "max": row.high, **(edits or {}).get(row.key, {})}


def edit(edits: dict, key: str, field: str, value) -> dict:
    """``edits`` with one field of one row changed (a new dict)."""
    return {**(edits or {}), key: {**(edits or {}).get(key, {}), field: value}}


def _searched_value(row: Row, shown: dict) -> Any:
    if not row.numeric:
        return "tune"  # the spec's every value
    low, high = shown["min"], shown["max"]
    if low is None or high is None:
        raise MergeStudioError(f"give {row.param.name} a min and a max, or untick it")
    if row.param.kind is int:
        low, high = int(low), int(high)
    value = {"min": low, "max": high}
    if row.log:
        value["log"] = True
    return value


def spec_dict(base: str | None, sources: list[str] | None, methods: list[str] | None, edits: dict,
              tune: dict) -> dict:
    """The search spec of the form: ``base`` and ``sources`` (the Models tab's), the methods as a
    choice, each ticked row as a range (per-model ones in every model's entry), and ``tune``."""
    if not base or not sources:
        raise MergeStudioError("choose a base and at least one source model in the Models tab")
    if not methods:
        raise MergeStudioError("choose at least one merge method to search")
    unknown = [m for m in methods if m not in REGISTRY or not searchable(m)]
    if unknown:
        raise MergeStudioError(f"{unknown[0]!r} cannot be searched here; choose methods from the list")
    per_model, global_ = {}, {}
    for row in rows(methods):
        shown = current(row, edits)
        if shown["search"]:
            (per_model if row.param.scope == "model" else global_)[row.param.name] = _searched_value(row, shown)
    spec: dict[str, Any] = {"merge_method": methods[0] if len(methods) == 1 else {"choices": list(methods)},
                            "base_model": base,
                            "models": [{"model": ref, **({"parameters": copy.deepcopy(per_model)} if per_model else {})}
                                       for ref in sources]}
    if global_:
        spec["parameters"] = global_
    if len(methods) == 1 and not per_model and not global_:
        raise MergeStudioError("nothing to search: tick at least one parameter, or choose two methods or more")
    spec["tune"] = {key: value for key, value in tune.items() if value is not None}
    return spec


__all__ = ["DEFAULT_METHODS", "OBJECTIVES", "SAMPLERS", "Row", "current", "default_methods", "edit", "label",
           "method_choices", "rows", "spec_dict"]

"""The results of ``viz.stats.delta_statistics``: plain dataclasses that round-trip to JSON.

Keys of per-model maps are the models' labels; quantile and top-fraction keys are the numbers
as text ("0.5", "0.2"), since JSON keys are strings. Everything is a float, int, str, None or
a list / dict of those, so ``json.dumps(stats.to_dict())`` needs no custom encoder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 1


def number_key(x: float) -> str:
    """The JSON key of a quantile or top fraction: 0.5 -> "0.5", 1.0 -> "1"."""
    return f"{x:g}"


@dataclass
class DeltaStats:
    """One task vector over a set of entries (a tensor, a layer or the whole model).

    ``quantiles[q]``: |δ| at quantile q (keys "0.5" … "1"); which are exact and which sampled
    says ``DEFINITIONS["quantiles"]`` below, also written into every stats.json (the sampled
    ones are within about a percentile point).
    ``energy_top[f]``: share of ‖δ‖² held by the top f of entries of each tensor (keys "0.01" …
    "0.2"); for a layer or the model, Σ over its tensors of that energy / Σ of ‖δ‖², i.e.
    exactly what trimming each tensor to density f keeps, as TIES does. None where ‖δ‖ = 0.
    """

    numel: int
    norm: float
    relative_norm: float | None  # ‖δ‖ / ‖θ_base‖; None when the base is 0 there
    mean_abs: float
    zero_fraction: float  # entries with δ exactly 0
    quantiles: dict[str, float]
    energy_top: dict[str, float | None]


@dataclass
class ConflictStats:
    """Sign conflicts among the models' task vectors, before and after TIES trimming.

    ``eligible``: entries where at least two models have a non-zero delta; ``conflicts``: of
    those, entries where both signs occur. ``rate`` = conflicts / eligible (None when no entry
    is eligible); ``rate_all`` = conflicts / all entries. ``trimmed_*``: the same after each
    model's δ is trimmed to its top-``density`` magnitudes per tensor.
    """

    entries: int
    eligible: int
    conflicts: int
    trimmed_eligible: int
    trimmed_conflicts: int
    rate: float | None = None
    rate_all: float | None = None
    trimmed_rate: float | None = None
    trimmed_rate_all: float | None = None

    def __post_init__(self):
        self.rate = self.conflicts / self.eligible if self.eligible else None
        self.rate_all = self.conflicts / self.entries if self.entries else None
        self.trimmed_rate = self.trimmed_conflicts / self.trimmed_eligible if self.trimmed_eligible else None
        self.trimmed_rate_all = self.trimmed_conflicts / self.entries if self.entries else None


@dataclass
class GroupStats:
    """Statistics of a tensor, a layer group or the whole model, for every fine-tuned model."""

    name: str  # tensor name, a group ("layer 3", "embeddings", ...) or "model"
    layer: int | None
    numel: int
    base_norm: float
    deltas: dict[str, DeltaStats]  # model label -> statistics of its task vector
    conflicts: ConflictStats | None  # None with fewer than two fine-tuned models
    cosine: dict[str, dict[str, float | None]]  # label -> label -> cos(δa, δb); None if a δ is 0
    group: str | None = None  # tensors: the group they belong to
    shape: list[int] | None = None  # tensors: their shape


@dataclass
class Histogram:
    """Distribution of |δ| per model: log-spaced bin ``edges`` (|δ| units); per model the exact
    fraction of entries with δ = 0 (in no bin) and the fraction of all entries in each bin (its
    shape from the weighted samples, scaled so that the bins add up to the exact non-zero
    share). Entries below the first edge (12 decades under the largest) count in the first bin."""

    edges: list[float]
    fractions: dict[str, list[float]]
    zero_fraction: dict[str, float]


@dataclass
class RedundancyStats:
    """Everything ``delta_statistics`` measured; ``to_json`` / ``from_json`` round-trip it."""

    base: str
    models: dict[str, str]  # label -> model reference, in the order given
    density: float
    device: str
    seconds: float
    tensors: list[GroupStats]
    layers: list[GroupStats]  # embeddings, layer 0 … N−1, final norm, lm_head, other
    model: GroupStats
    histogram: Histogram
    version: int = FORMAT_VERSION
    definitions: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.models)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> RedundancyStats:
        def group(d: dict) -> GroupStats:
            d = dict(d)
            d["deltas"] = {k: DeltaStats(**v) for k, v in d["deltas"].items()}
            if d["conflicts"] is not None:
                counts = {k: v for k, v in d["conflicts"].items() if "rate" not in k}
                d["conflicts"] = ConflictStats(**counts)
            return GroupStats(**d)

        data = dict(data)
        data["tensors"] = [group(t) for t in data["tensors"]]
        data["layers"] = [group(t) for t in data["layers"]]
        data["model"] = group(data["model"])
        data["histogram"] = Histogram(**data["histogram"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> RedundancyStats:
        return cls.from_dict(json.loads(text))


DEFINITIONS = {
    "task vector": "δ = θ_fine-tuned − θ_base, per tensor",
    "relative_norm": "‖δ‖₂ / ‖θ_base‖₂ over the same entries",
    "quantiles": "|δ| at quantile q; per tensor q ≥ 0.8 exact (k-th largest, k = max(1, int((1−q)·n))), the median "
                 "from a uniform sample of 32,768 entries; per layer/model the max is exact, the others from weighted "
                 "samples of 4,096 entries per tensor",
    "energy_top": "share of ‖δ‖² in the top f of |δ| of each tensor (layer/model: summed over tensors)",
    "conflict rate": "entries where the non-zero deltas of ≥2 models disagree in sign / entries where ≥2 models are non-zero",
    "conflict rate_all": "the same conflicting entries / all entries",
    "trimmed": "after trimming each δ to its top-density magnitudes per tensor (TIES)",
    "cosine": "⟨δa, δb⟩ / (‖δa‖‖δb‖) over the entries of the group",
}

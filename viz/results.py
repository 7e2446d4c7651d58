"""The results of ``viz.stats.delta_statistics``: plain dataclasses that round-trip to JSON.

Keys of per-model maps are the models' labels; quantile and top-fraction keys are the numbers
as text ("0.5", "0.2"), since JSON keys are strings. Everything is a float, int, str, None or
a list / dict of those, so ``json.dumps(stats.to_dict())`` needs no custom encoder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 2  # 2: singular-value statistics (GroupStats.spectral) and the optional merged model; 1 still loads


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
class Spectrum:
    """Singular values of a task matrix (a tensor), or of all of a group's matrices pooled (the
    spectrum of the block-diagonal matrix that holds them), largest first.

    ``rank``: how many singular values there are, min(m, n) (a group: summed over its matrices).
    ``known``: how many were computed: all r, or the top ones when the rest are below rounding
    (``complete``), or the approximate top ones of a randomized SVD (a vocabulary-sized matrix;
    ``complete`` False). ``numerical_rank``: values above max(m, n)·ε·σ₁ with float32's ε (a
    group: summed), None when not complete. ``index``/``values``: at most 48 of the known values
    and their 1-based positions: every one of the first 16, then about log-spaced to the last,
    and the numerical rank and the one after it. Zero values (an untouched matrix) are left out.
    """

    rank: int
    known: int
    complete: bool
    numerical_rank: int | None
    index: list[int]
    values: list[float]


@dataclass
class SpectralStats:
    """Singular-value statistics of the 2-D weight matrices of a tensor, a layer or the model.

    Per model: ``spectra`` and ``energy_top`` (share of ‖δ‖²_F in the top f of singular values of
    each matrix, keys "0.01", "0.05", "0.1"; a group: Σ over its matrices of that energy / Σ of
    ‖δ‖²_F; None where δ = 0). The same for the plain sum Σδᵢ (``sum_*``, two or more models) and
    a merged model's update θ_merged − θ_base (``merged_*``). ``overlap_left[a][b]``: ‖UₐᵀU_b‖²_F / k
    for the top-k left singular vectors (``overlap_right``: right), a group: the mean over its
    matrices; ``merged_overlap_*``: the same between the subspaces the merged update gives each
    task. ``chance_left``/``chance_right``: the mean k/m (k/n) over the same matrices and pairs,
    what random subspaces would give. None where no pair has a non-zero matrix.
    ``merged_alignment[label]``: Iso-C's subspace alignment ratio ‖Π δᵢ‖_F / ‖δᵢ‖_F, Π the projection
    onto the merged update's top Σᵢkᵢ left singular vectors (a group: over all its matrices'
    energy, √(Σ‖Πδᵢ‖² / Σ‖δᵢ‖²)).
    """

    matrices: int
    spectra: dict[str, Spectrum]
    energy_top: dict[str, dict[str, float | None]]
    overlap_left: dict[str, dict[str, float | None]]
    overlap_right: dict[str, dict[str, float | None]]
    chance_left: float | None = None
    chance_right: float | None = None
    sum_spectrum: Spectrum | None = None
    sum_energy_top: dict[str, float | None] | None = None
    merged_spectrum: Spectrum | None = None
    merged_energy_top: dict[str, float | None] | None = None
    merged_overlap_left: dict[str, dict[str, float | None]] | None = None
    merged_overlap_right: dict[str, dict[str, float | None]] | None = None
    merged_alignment: dict[str, float | None] | None = None

    @staticmethod
    def from_dict(data: dict) -> SpectralStats:
        data = dict(data)
        data["spectra"] = {k: Spectrum(**v) for k, v in data["spectra"].items()}
        for key in ("sum_spectrum", "merged_spectrum"):
            if data.get(key) is not None:
                data[key] = Spectrum(**data[key])
        return SpectralStats(**data)


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
    spectral: SpectralStats | None = None  # 2-D weight matrices (and groups holding any); None without


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
    merged: str | None = None  # a merged model's reference, compared in the singular-value statistics
    merged_label: str | None = None
    spectral_seconds: float | None = None  # the part of ``seconds`` spent on singular values; None: not computed

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
            if d.get("spectral") is not None:
                d["spectral"] = SpectralStats.from_dict(d["spectral"])
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
    "spectral": "2-D weight matrices only (not norms or biases): singular values σ₁ ≥ σ₂ ≥ … of δ as a matrix, "
                "float32 on the compute device; exact, except matrices over 16.8M entries (vocabulary-sized "
                "embeddings), where a randomized SVD gives the top 10% approximately (Spectrum.complete false)",
    "spectral energy_top": "share of ‖δ‖²_F in the top f of the singular values of each matrix, f of min(m, n) "
                           "rounded down (at least 1); layer/model: summed over matrices",
    "sum": "Σδᵢ, the plain sum of the task matrices (task arithmetic with λ = 1)",
    "merged": "δ_merged = θ_merged − θ_base of the merged model given",
    "overlap": "‖UᵢᵀUⱼ‖²_F / k (left singular vectors; right: V) of the top k = min(⌊min(m, n)/T⌋, numerical "
               "ranks of δᵢ and δⱼ) singular vectors, T models (TSV-M's per-task budget): the mean squared "
               "cosine of the principal angles, 0 orthogonal, 1 the same; layer/model: mean over matrices",
    "merged overlap": "the same between Ũᵢ = range(δ_merged·Vᵢ) and Ũⱼ (right: range(δ_mergedᵀ·Uᵢ)): the "
                      "merged update's responses to each task's top-k input (output) directions",
    "merged alignment": "Iso-C's subspace alignment ratio ‖Π δᵢ‖_F / ‖δᵢ‖_F, Π the projection onto the top Σᵢkᵢ "
                        "left singular vectors of δ_merged (kᵢ as for the overlap); layer/model: over the summed energy",
    "chance": "k/m (left) and k/n (right), averaged like the overlap: what random k-dimensional subspaces give",
}

"""The task-vector family: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA, as one table.

Every member is one pipeline over task vectors δᵢ = θᵢ − θ_base (per tensor):

1. sparsify each δᵢ on its own (a row of ``SPARSIFIERS``): nothing (task arithmetic),
   magnitude trim (TIES), random drop (DARE), outlier-and-small trim (Breadcrumbs) or a random
   drop whose keep probability grows with magnitude rank (DELLA's MagPrune); optionally rescale
   the survivors;
2. weight: wᵢ·δᵢ (after sparsifying, as mergekit);
3. combine (a row of ``CONSENSUS``): a plain sum (``Σ wᵢδᵢ``, divided by Σ wᵢ if ``normalize``),
   or TIES's: elect the sign of Σ wᵢδᵢ per entry and take the weighted disjoint mean of
   agreeing entries;
4. θ = θ_base + λ · combined.

The members differ only in the sparsifier, the consensus and the default of ``normalize``,
exactly the table of mergekit 0.1.5, so mergekit recipes give mergekit's result (DARE's rescale
aside: see ``rescale_mode``). A new variant is one row of ``MEMBERS`` (and, for a new way of
sparsifying, one row of ``SPARSIFIERS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from merging.errors import RecipeError
from merging.methods.kernels import (
    Keep,
    TaskVector,
    chunks,
    disjoint_merge,
    magnitude_keep,
    magprune_keep,
    outlier_keep,
    random_keep,
    rescale_factor,
    sum_merge,
)
from merging.methods.spec import DENSITY, INT8_MASK, LAMBDA, WEIGHT, MethodSpec, Param, register

GAMMA = Param(
    "gamma", float, 0.01, "model",
    "Model Breadcrumbs: fraction of the largest-magnitude deltas dropped as outliers.",
    low=0.0, high=1.0, high_inclusive=False,
)
EPSILON = Param(
    "epsilon", float, 0.15, "model",
    "DELLA: spread of the keep probability by magnitude rank: from density − epsilon for the smallest "
    "|delta| of a row to density + epsilon for the largest. density ± epsilon must stay inside (0, 1).",
    low=0.0, high=0.5, high_inclusive=False,
)


@dataclass(frozen=True)
class Sparsifier:
    """How one model's task vector is thinned before the models are combined.

    ``keep(delta, per_model_params, seed)``: the keep mask (``merging.methods.kernels.Keep``);
    ``params``: the per-model parameters it reads; ``rescale``/``rescale_mode``: the defaults of
    the method's ``rescale`` and ``rescale_mode`` parameters. ``keep_rescaled``, for sparsifiers
    whose keep probability differs per entry (DELLA): the mask with each survivor already divided
    by its own keep probability, used for ``rescale_mode: density``; None divides by density.
    """

    keep: Callable[[TaskVector, dict, int], Keep]
    params: tuple[Param, ...]
    rescale: bool
    rescale_mode: str = "l1"
    randomized: bool = False
    keep_rescaled: Callable[[TaskVector, dict, int], Keep] | None = None


def _della_keep(delta: TaskVector, p: dict, seed: int, *, divide: bool = False) -> Keep:
    """MagPrune with mergekit's check: probabilities density ± epsilon must lie in (0, 1)."""
    density, epsilon = p["density"], p["epsilon"]
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise RecipeError(f"DELLA needs density ± epsilon inside (0, 1), got density {density:g} and "
                          f"epsilon {epsilon:g}; lower epsilon (or move density away from 0 and 1)")
    return magprune_keep(delta, density, epsilon, seed, divide=divide)


SPARSIFIERS: dict[str, Sparsifier] = {
    "magnitude": Sparsifier(lambda delta, p, seed: magnitude_keep(delta, p["density"]), (DENSITY,), rescale=False),
    "random": Sparsifier(lambda delta, p, seed: random_keep(delta.numel, p["density"], seed), (DENSITY,),
                         rescale=True, rescale_mode="density", randomized=True),
    "magnitude_outliers": Sparsifier(lambda delta, p, seed: outlier_keep(delta, p["density"], p["gamma"]),
                                     (DENSITY, GAMMA), rescale=False),
    # mergekit rescales DELLA to the L1 norm like the others; the paper divides by each pᵢ
    "della_magprune": Sparsifier(_della_keep, (DENSITY, EPSILON), rescale=True, rescale_mode="l1", randomized=True,
                                 keep_rescaled=lambda delta, p, seed: _della_keep(delta, p, seed, divide=True)),
}

CONSENSUS: dict[str | None, Callable[[list[torch.Tensor], list[float], bool], torch.Tensor]] = {
    None: sum_merge,  # Σ wᵢδᵢ (/ Σ wᵢ)
    "sum": disjoint_merge,  # TIES: elect the sign of Σ wᵢδᵢ, mean of the agreeing entries
}


@dataclass(frozen=True)
class Member:
    """One method of the family: a row of the table below."""

    name: str
    title: str
    paper: str
    summary: str
    sparsifier: str | None  # a key of SPARSIFIERS, or None (no sparsification)
    consensus: str | None  # a key of CONSENSUS
    normalize: bool  # the default of ``normalize``
    guidance: str
    suggested: dict[str, Any] = field(default_factory=dict)


MEMBERS = (
    Member("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
           "θ = θ_base + λ Σ wᵢ(θᵢ − θ_base); typical weights 0.3-0.5.",
           sparsifier=None, consensus=None, normalize=False,
           guidance="Each model's weight scales its task vector: typically 0.3–0.5 per model (λ stays 1). "
                    "Larger weights add more of each skill, and more interference between them.",
           suggested={"weight": 0.4}),
    Member("ties", "TIES", "https://arxiv.org/abs/2306.01708",
           "Trim each task vector to its top-density magnitudes, elect signs, disjoint mean.",
           sparsifier="magnitude", consensus="sum", normalize=True,
           guidance="Density 0.2–0.5 (the paper keeps the top 20%) with λ around 1 and normalize on. "
                    "Weights also take part in the sign election.",
           suggested={"weight": 1.0, "density": 0.3}),
    Member("dare_ties", "DARE + TIES", "https://arxiv.org/abs/2311.03099",
           "Randomly drop 1 − density of each task vector, rescale by 1/density, then TIES election.",
           sparsifier="random", consensus="sum", normalize=False,
           guidance="Density 0.1–0.3 (drop 70–90%) suits ordinary fine-tunes; survivors are rescaled by "
                    "1/density. Large deltas (continued pre-training) break DARE. Seeded: the same seed "
                    "gives the same merge.",
           suggested={"density": 0.3}),
    Member("dare_linear", "DARE + Task Arithmetic", "https://arxiv.org/abs/2311.03099",
           "Randomly drop 1 − density of each task vector, rescale by 1/density, then add.",
           sparsifier="random", consensus=None, normalize=False,
           guidance="Density 0.1–0.3 (drop 70–90%) suits ordinary fine-tunes; survivors are rescaled by "
                    "1/density, then added like task arithmetic (weights 0.3–0.5 each). Seeded.",
           suggested={"weight": 0.4, "density": 0.3}),
    Member("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
           "Drop the largest gamma and the smallest magnitudes of each task vector, keep density, add.",
           sparsifier="magnitude_outliers", consensus=None, normalize=False,
           guidance="Gamma drops the largest outliers (default 1% of each task vector), density sets how "
                    "much of the rest is kept.",
           suggested={"density": 0.9}),
    Member("breadcrumbs_ties", "Model Breadcrumbs + TIES", "https://arxiv.org/abs/2312.06795",
           "Breadcrumbs sparsification followed by TIES sign election.",
           sparsifier="magnitude_outliers", consensus="sum", normalize=False,
           guidance="Breadcrumbs' outlier and small-value trim, then TIES's sign election.",
           suggested={"density": 0.9}),
    Member("della", "DELLA", "https://arxiv.org/abs/2406.11617",
           "Drop entries at random, keeping larger magnitudes more often (density ± epsilon), rescale, "
           "then TIES election.",
           sparsifier="della_magprune", consensus="sum", normalize=True,
           guidance="Density 0.3–0.7 with epsilon 0.1–0.2 (mergekit's default 0.15): each row's smallest "
                    "deltas are kept with probability density − epsilon, its largest with density + epsilon. "
                    "Survivors are rescaled to the delta's L1 norm (rescale_mode density: by 1/p, the "
                    "paper's). Seeded.",
           suggested={"density": 0.5, "epsilon": 0.15}),
    Member("della_linear", "Linear DELLA", "https://arxiv.org/abs/2406.11617",
           "Drop entries at random, keeping larger magnitudes more often (density ± epsilon), rescale, "
           "then add.",
           sparsifier="della_magprune", consensus=None, normalize=False,
           guidance="Density 0.3–0.7 with epsilon 0.1–0.2 (mergekit's default 0.15), then added like task "
                    "arithmetic (weights 0.3–0.5 each). Seeded.",
           suggested={"weight": 0.4, "density": 0.5, "epsilon": 0.15}),
)


def _sparsify(delta: TaskVector, sparsifier: Sparsifier | None, p: dict, params: dict, seed: int):
    """(keep, scale) for one model's task vector: which entries survive, and their rescale factor."""
    density = p.get("density", 1.0)
    if sparsifier is None or density >= 1.0:
        return None, 1.0
    mode = params.get("rescale_mode", "l1") if params.get("rescale", False) else "none"
    if mode == "density" and sparsifier.keep_rescaled is not None:
        return sparsifier.keep_rescaled(delta, p, seed), 1.0  # each survivor divided by its own keep probability
    keep = sparsifier.keep(delta, p, seed)
    return keep, rescale_factor(delta, keep, density, mode)


def task_vector_merge(base, tensors, per_model, params, seed, *, sparsifier: Sparsifier | None, consensus) -> torch.Tensor:
    """θ_base + λ · combine(wᵢ · rescale · sparsify(θᵢ − θ_base)), the shared pipeline above.

    Thresholds and norms are found first (one chunked pass per model where needed); then each
    chunk of the output is computed from the same chunk of every input.
    """
    deltas = [TaskVector(x, base) for x in tensors]
    weights = [p["weight"] for p in per_model]
    plans = [_sparsify(d, sparsifier, p, params, seed + i) for i, (d, p) in enumerate(zip(deltas, per_model))]
    out = torch.empty(base.numel(), dtype=torch.float32, device=base.device)
    flat_base = base.reshape(-1)
    for part in chunks(base.numel(), base.device):
        weighted = []
        for delta, (keep, scale), weight in zip(deltas, plans, weights):
            chunk = delta.chunk(part)
            if keep is not None:
                chunk *= keep(part, chunk)
            weighted.append(chunk.mul_(weight * scale))
        combined = consensus(weighted, weights, params["normalize"])
        torch.add(flat_base[part].float(), combined, alpha=params["lambda"], out=out[part])
    return out.reshape(base.shape)


def _params(member: Member, sparsifier: Sparsifier | None) -> tuple[Param, ...]:
    params = [WEIGHT, *(sparsifier.params if sparsifier else ())]
    params.append(Param("normalize", bool, member.normalize, "global",
                        "Divide the combined task vector by the total weight of the models contributing to "
                        "each entry (TIES: only those agreeing with the elected sign)."))
    params += [LAMBDA, INT8_MASK]
    if sparsifier is not None:
        params.append(Param("rescale", bool, sparsifier.rescale, "global",
                            "Rescale the deltas that survive sparsification (see rescale_mode)."))
        params.append(Param("rescale_mode", str, sparsifier.rescale_mode, "global",
                            "How survivors are rescaled: 'density' divides each by its keep probability (the "
                            "papers' unbiased estimate: DARE's density, DELLA's per-entry probability); 'l1' "
                            "restores the delta's L1 norm (mergekit's behaviour).",
                            choices=("density", "l1")))
    return tuple(params)


def _register(member: Member) -> None:
    sparsifier = SPARSIFIERS[member.sparsifier] if member.sparsifier else None
    consensus = CONSENSUS[member.consensus]
    spec = MethodSpec(
        name=member.name, title=member.title, paper=member.paper, summary=member.summary,
        params=_params(member, sparsifier), needs_base=True, base="origin",
        randomized=bool(sparsifier and sparsifier.randomized), family="task vectors",
        guidance=member.guidance, suggested=member.suggested,
    )

    def merge(base, tensors, per_model, params, seed):
        return task_vector_merge(base, tensors, per_model, params, seed, sparsifier=sparsifier, consensus=consensus)

    merge.__name__ = f"{member.name}_merge"
    merge.__doc__ = f"{member.title}: {member.summary}"
    register(spec)(merge)


for _member in MEMBERS:
    _register(_member)

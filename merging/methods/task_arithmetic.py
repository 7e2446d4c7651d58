"""The task-arithmetic family: task arithmetic, TIES, DARE, Model Breadcrumbs.

Every member is one pipeline over task vectors δᵢ = θᵢ − θ_base (per tensor):

1. sparsify each δᵢ on its own: nothing (task arithmetic), magnitude trim (TIES), random drop
   (DARE) or outlier-and-small trim (Breadcrumbs); optionally rescale the survivors;
2. weight: wᵢ·δᵢ (after sparsifying, as mergekit);
3. combine: a plain sum (``Σ wᵢδᵢ``, divided by Σ wᵢ if ``normalize``), or TIES consensus:
   elect the sign of Σ wᵢδᵢ per entry and take the weighted disjoint mean of agreeing entries;
4. θ = θ_base + λ · combined.

The members differ only in the sparsifier, the consensus and two defaults, exactly the table
of mergekit 0.1.5, so mergekit recipes give mergekit's result (DARE's rescale aside, below).
"""

from __future__ import annotations

import torch

from merging.methods.sparsify import (
    TaskVector,
    chunks,
    disjoint_merge,
    magnitude_keep,
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


def _normalize(default: bool) -> Param:
    return Param(
        "normalize", bool, default, "global",
        "Divide the combined task vector by the total weight of the models contributing to "
        "each entry (TIES: only those agreeing with the elected sign).",
    )


def _rescale(default: bool) -> Param:
    return Param(
        "rescale", bool, default, "global",
        "Rescale the deltas that survive sparsification (see rescale_mode).",
    )


def _rescale_mode(default: str) -> Param:
    return Param(
        "rescale_mode", str, default, "global",
        "How survivors are rescaled: 'density' divides by density (DARE paper, unbiased); "
        "'l1' restores the delta's L1 norm (mergekit's behaviour).",
        choices=("density", "l1"),
    )


def _sparsifier(delta: TaskVector, kind: str | None, p: dict, params: dict, seed: int):
    """(keep, scale) for one model's task vector: which entries survive, and their rescale factor."""
    density = p.get("density", 1.0)
    if kind is None or density >= 1.0:
        return None, 1.0
    if kind == "magnitude":
        keep = magnitude_keep(delta, density)
    elif kind == "random":
        keep = random_keep(delta.numel, density, seed)
    else:
        keep = outlier_keep(delta, density, p["gamma"])
    mode = params.get("rescale_mode", "l1") if params.get("rescale", False) else "none"
    return keep, rescale_factor(delta, keep, density, mode)


def task_vector_merge(base, tensors, per_model, params, seed, *, sparsifier: str | None, consensus: bool):
    """θ_base + λ · combine(wᵢ · rescale · sparsify(θᵢ − θ_base)), the shared pipeline above.

    Thresholds and norms are found first (one chunked pass per model where needed); then each
    chunk of the output is computed from the same chunk of every input.
    """
    deltas = [TaskVector(x, base) for x in tensors]
    weights = [p["weight"] for p in per_model]
    plans = [_sparsifier(d, sparsifier, p, params, seed + i) for i, (d, p) in enumerate(zip(deltas, per_model))]
    out = torch.empty(base.numel(), dtype=torch.float32, device=base.device)
    flat_base = base.reshape(-1)
    for part in chunks(base.numel(), base.device):
        weighted = []
        for delta, (keep, scale), weight in zip(deltas, plans, weights):
            chunk = delta.chunk(part)
            if keep is not None:
                chunk *= keep(part, chunk)
            weighted.append(chunk.mul_(weight * scale))
        if consensus:
            combined = disjoint_merge(weighted, weights, params["normalize"])
        else:
            combined = sum_merge(weighted, weights, params["normalize"])
        torch.add(flat_base[part].float(), combined, alpha=params["lambda"], out=out[part])
    return out.reshape(base.shape)


def _family_member(name, title, paper, summary, sparsifier, consensus, normalize, rescale):
    params = [WEIGHT]
    if sparsifier is not None:
        params.append(DENSITY)
    if sparsifier == "outliers":
        params.append(GAMMA)
    params += [_normalize(normalize), LAMBDA, INT8_MASK]
    if sparsifier is not None:
        params += [_rescale(rescale), _rescale_mode("density" if sparsifier == "random" else "l1")]
    spec = MethodSpec(
        name=name, title=title, paper=paper, summary=summary, params=tuple(params),
        needs_base=True, randomized=sparsifier == "random",
    )

    def merge(base, tensors, per_model, params, seed):
        return task_vector_merge(base, tensors, per_model, params, seed, sparsifier=sparsifier, consensus=consensus)

    merge.__name__ = f"{name}_merge"
    merge.__doc__ = f"{title}: {summary}"
    register(spec)(merge)
    return merge


task_arithmetic = _family_member(
    "task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
    "θ = θ_base + λ Σ wᵢ(θᵢ − θ_base); typical weights 0.3-0.5.",
    sparsifier=None, consensus=False, normalize=False, rescale=False,
)
ties = _family_member(
    "ties", "TIES", "https://arxiv.org/abs/2306.01708",
    "Trim each task vector to its top-density magnitudes, elect signs, disjoint mean.",
    sparsifier="magnitude", consensus=True, normalize=True, rescale=False,
)
dare_ties = _family_member(
    "dare_ties", "DARE + TIES", "https://arxiv.org/abs/2311.03099",
    "Randomly drop 1 − density of each task vector, rescale by 1/density, then TIES election.",
    sparsifier="random", consensus=True, normalize=False, rescale=True,
)
dare_linear = _family_member(
    "dare_linear", "DARE + Task Arithmetic", "https://arxiv.org/abs/2311.03099",
    "Randomly drop 1 − density of each task vector, rescale by 1/density, then add.",
    sparsifier="random", consensus=False, normalize=False, rescale=True,
)
breadcrumbs = _family_member(
    "breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
    "Drop the largest gamma and the smallest magnitudes of each task vector, keep density, add.",
    sparsifier="outliers", consensus=False, normalize=False, rescale=False,
)
breadcrumbs_ties = _family_member(
    "breadcrumbs_ties", "Model Breadcrumbs + TIES", "https://arxiv.org/abs/2312.06795",
    "Breadcrumbs sparsification followed by TIES sign election.",
    sparsifier="outliers", consensus=True, normalize=False, rescale=False,
)

"""Consensus Merging with TALL masks (Wang et al., ICML 2024, https://arxiv.org/abs/2405.07813).

A weight matters to task t when the merged model moves it less than the fine-tune did
relative to the base; the TALL mask of each task (weighted task vector τₜ = wₜδₜ) is

    mₜ = 1{ |τₜ| ≥ λₜ · |τ_MTL − τₜ| }

with τ_MTL the merged task vector of the underlying method (before the final scale λ) and λₜ
the paper's per-task ``tall_mask_lambda``. Weights no mask (catastrophic) or a single mask
(selfish) selects are removed: the consensus mask keeps the entries at least ``k`` masks agree
on, m = 1{Σₜ mₜ ≥ k}, and θ = θ_base + λ · (m ⊙ τ_MTL).

- ``consensus_ta``: τ_MTL = Σ wₜδₜ (task arithmetic).
- ``consensus_ties``: τ_MTL = TIES's trim, elect and disjoint merge of the wₜδₜ; the masks are
  built from the untrimmed τₜ against that TIES vector, as the authors' code does (masks "built
  with TIES"). The consensus mask applies to the merged vector, after TIES's trim, as in the
  paper (τ_consensus = m ⊙ τ_MTL); at an entry it removes every task's value at once, so this
  equals masking the trimmed task vectors before the sign election, and the trim's top-k is
  taken over the whole task vector, unmasked.

Decisions where the paper leaves room: masks compare the weighted task vectors wₜδₜ with the
merged vector (with equal weights this is the paper's rule exactly: the comparison is
scale-free); ``≥`` where the authors' code has ``>`` (they differ only on exact ties, and
with ``≥`` λₜ = 0 selects every entry, so consensus_ta with k ≤ T is task arithmetic). Only
matrices are masked; other tensors (norms, biases) take the weighted mean task vector, the
rule of the issue's subspace family (``kernels.mean_task_vector``).

Everything is elementwise: one chunked pass (``kernels.chunks``) computes τ_MTL, the masks and
the output chunk by chunk; TIES's trim thresholds need one pass per model first
(``kernels.magnitude_keep``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from merging.methods.kernels import (
    TaskVector,
    chunks,
    disjoint_merge,
    magnitude_keep,
    mean_task_vector,
    sum_merge,
)
from merging.methods.spec import DENSITY, LAMBDA, WEIGHT, MethodSpec, Param, register

TALL_MASK_LAMBDA = Param(
    "tall_mask_lambda", float, 0.4, "model",
    "TALL mask threshold λₜ for this model: an entry belongs to its task when |τₜ| ≥ λₜ·|τ_MTL − τₜ|. "
    "Larger keeps fewer entries; 0 keeps all. The paper picks it per task from 0.2-0.6 on validation data.",
    low=0.0, search=(0.1, 1.0),
)
K = Param(
    "k", int, 2, "global",
    "Consensus threshold: keep an entry only when at least k task masks select it (2 removes the "
    "catastrophic and the selfish weights, 1 only the catastrophic ones, 0 none; more than the number "
    "of models removes all).",
    low=0,
)
TIES_NORMALIZE = Param(
    "normalize", bool, True, "global",
    "TIES: divide by the total weight of the models agreeing with the elected sign (the disjoint mean); "
    "off sums them (the consensus authors' code uses the sum).",
)


def tall_masks(taus: list[torch.Tensor], merged: torch.Tensor, lambdas: list[float]) -> list[torch.Tensor]:
    """TALL masks mₜ = 1{|τₜ| ≥ λₜ·|τ_MTL − τₜ|} as float 0/1 tensors (Wang et al., 2024)."""
    masks = []
    for tau, lam in zip(taus, lambdas):
        distance = torch.sub(merged, tau).abs_().mul_(lam)
        masks.append(torch.ge(tau.abs(), distance, out=distance))
    return masks


def consensus_mask(masks: list[torch.Tensor], k: int) -> torch.Tensor:
    """m = 1{Σₜ mₜ ≥ k} (float 0/1): the entries at least ``k`` task masks select."""
    votes = masks[0].clone()
    for mask in masks[1:]:
        votes += mask
    return torch.ge(votes, k, out=votes)


Combine = Callable[[list[torch.Tensor], list[float], bool], torch.Tensor]


def consensus_merge(base, tensors, per_model, params, *, combine: Combine, trim: bool) -> torch.Tensor:
    """θ_base + λ·(m ⊙ τ_MTL), τ_MTL = combine(trimmed wₜδₜ), m the consensus of the TALL masks.

    ``combine``: ``kernels.sum_merge`` (task arithmetic) or ``kernels.disjoint_merge`` (TIES);
    ``trim``: keep each δₜ's top-density magnitudes first (TIES). Matrices only; other tensors
    get the weighted mean task vector.
    """
    weights = [p["weight"] for p in per_model]
    if base.dim() != 2:
        return mean_task_vector(base, tensors, weights, params["lambda"])
    deltas = [TaskVector(x, base) for x in tensors]
    lambdas = [p["tall_mask_lambda"] for p in per_model]
    keeps = [magnitude_keep(d, p["density"]) if trim and p["density"] < 1.0 else None
             for d, p in zip(deltas, per_model)]
    normalize = params.get("normalize", False)
    out = torch.empty(base.numel(), dtype=torch.float32, device=base.device)
    flat_base = base.reshape(-1)
    for part in chunks(base.numel(), base.device):
        taus, trimmed = [], []
        for delta, keep, weight in zip(deltas, keeps, weights):
            chunk = delta.chunk(part)
            kept = keep(part, chunk) if keep is not None else None  # the trim ranks |δₜ|, before weighting
            tau = chunk.mul_(weight)
            taus.append(tau)
            trimmed.append(tau * kept if kept is not None else tau)
        merged = combine(trimmed, weights, normalize)
        merged *= consensus_mask(tall_masks(taus, merged, lambdas), params["k"])
        torch.add(flat_base[part].float(), merged, alpha=params["lambda"], out=out[part])
    return out.reshape(base.shape)


@register(MethodSpec(
    name="consensus_ta",
    title="Consensus Merging (task arithmetic)",
    paper="https://arxiv.org/abs/2405.07813",
    summary="θ = θ_base + λ·m ⊙ Σ wₜδₜ, m keeping entries where ≥ k TALL masks |τₜ| ≥ λₜ|Σ τ − τₜ| agree "
            "(matrices; other tensors: the weighted mean task vector).",
    params=(WEIGHT, TALL_MASK_LAMBDA, K, LAMBDA),
    needs_base=True,
    base="origin",
    family="task vectors",
    guidance="k = 2 (drop weights fewer than two tasks need) with tall_mask_lambda 0.2-0.6 (the paper tunes it "
             "per task on validation data); weights as in task arithmetic, typically 0.3-0.5 per model. "
             "With two models k = 2 keeps only the entries both need.",
    suggested={"weight": 0.4, "tall_mask_lambda": 0.4, "k": 2},
))
def consensus_ta(base, tensors, per_model, params, seed):
    """Consensus task arithmetic: θ_base + λ·(m ⊙ Σ wₜδₜ)."""
    return consensus_merge(base, tensors, per_model, params, combine=sum_merge, trim=False)


@register(MethodSpec(
    name="consensus_ties",
    title="Consensus Merging (TIES)",
    paper="https://arxiv.org/abs/2405.07813",
    summary="TIES (trim, elect, disjoint mean) of the wₜδₜ, then only the entries ≥ k TALL masks agree on "
            "(matrices; other tensors: the weighted mean task vector).",
    params=(WEIGHT, DENSITY, TALL_MASK_LAMBDA, K, TIES_NORMALIZE, LAMBDA),
    needs_base=True,
    base="origin",
    family="task vectors",
    guidance="The paper pairs k = 2 and tall_mask_lambda 0.2-0.6 with TIES keeping the top 20% (density 0.2) "
             "and λ around 1; the TALL masks compare each task vector with the TIES-merged one.",
    suggested={"density": 0.2, "tall_mask_lambda": 0.4, "k": 2},
))
def consensus_ties(base, tensors, per_model, params, seed):
    """Consensus TIES: θ_base + λ·(m ⊙ TIES(wₜδₜ)), the mask taken after TIES's trim."""
    return consensus_merge(base, tensors, per_model, params, combine=disjoint_merge, trim=True)

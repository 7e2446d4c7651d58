"""Reinforced Agent Merging (RAM) and RAM+ (tensor-local), Yuan et al., 2026 (arXiv 2601.13572).

RL fine-tuning changes few parameters, and different agents change different ones, so averaging
every entry dilutes each agent's updates. RAM sorts each entry of a tensor by how many task
vectors δᵢ = θᵢ − θ_base change it (|δᵢ| > ε):

- unchanged (no model): the base is kept;
- unique (one model): that model's update is kept whole;
- shared (several models): their updates are averaged.

RAM+ also rescales each model's unique updates by λᵢ = 1 + r·clip(ρᵢ, 0, α), where ρᵢ is the
ratio of that model's shared to unique entries in the tensor: a model whose updates mostly
overlap with others loses more in the averages, so its unique updates are amplified to make up.
"Tensor-local" (mergekit's ``ramplus_tl``): ρᵢ is counted per tensor, not over the whole model.

Both follow mergekit 0.1.5 ``merge_methods/ram.py`` operation for operation (float32, the same
order of additions), so results agree with it bit for bit on the same inputs.
"""

from __future__ import annotations

import torch

from merging.methods.kernels import TaskVector, chunks
from merging.methods.spec import MethodSpec, Param, register

PAPER = "https://arxiv.org/abs/2601.13572"

EPSILON = Param(
    "epsilon", float, 1e-5, "global",
    "An entry counts as changed by a model when |θᵢ − θ_base| > epsilon. Raise it for dense "
    "(SFT-style) deltas, where almost every entry changes.",
    low=0.0, search=(1e-7, 1e-3), search_log=True,
)
R = Param(
    "r", float, 0.1, "global",
    "RAM+: strength of the rescaling of each model's unique updates, λᵢ = 1 + r·clip(ρᵢ, 0, alpha).",
    low=0.0,
)
ALPHA = Param(
    "alpha", float, 0.2, "global",
    "RAM+: cap on the shared-to-unique ratio ρᵢ used in the rescaling (the largest λᵢ is 1 + r·alpha).",
    low=0.0,
)

GUIDANCE = ("Meant for RL-trained agents from one base, whose task vectors are sparse: entries changed "
            "by more than epsilon count as updates (the default 1e-5 treats almost any change as one; "
            "for dense fine-tunes raise epsilon towards the typical |δ|).")


@register(MethodSpec(
    name="ram",
    title="Reinforced Agent Merging (RAM)",
    paper=PAPER,
    summary="θ = θ_base + Σᵢ mᵢδᵢ / max(1, Σⱼ mⱼ), mᵢ = [|δᵢ| > ε]: unique updates kept, shared ones averaged.",
    params=(EPSILON,),
    needs_base=True,
    base="origin",
    family="task vectors",
    guidance=GUIDANCE,
))
def ram(base, tensors, per_model, params, seed):
    """θ_base + Σᵢ mᵢδᵢ / max(1, c), with mᵢ = [|δᵢ| > ε] and c = Σᵢ mᵢ per entry (Yuan et al., 2026).

    Where one model changes an entry (c = 1) its update is kept whole; where several do, their
    mean is taken; where none does, the base stays. Elementwise, so one chunked pass.
    """
    return _merge(base, tensors, params["epsilon"], scales=None)


@register(MethodSpec(
    name="ramplus_tl",
    title="RAM+ (tensor-local)",
    paper=PAPER,
    summary="RAM with each model's unique updates scaled by λᵢ = 1 + r·clip(ρᵢ, 0, α), ρᵢ = shared/unique entries of model i.",
    params=(R, ALPHA, EPSILON),
    needs_base=True,
    base="origin",
    family="task vectors",
    guidance=GUIDANCE + " r and alpha (defaults 0.1 and 0.2) bound the boost of unique updates to 1 + r·alpha.",
))
def ramplus_tl(base, tensors, per_model, params, seed):
    """θ_base + Σᵢ mᵢδᵢ·(λᵢ if c = 1 else 1) / max(1, c), λᵢ = 1 + r·clip(ρᵢ, 0, α) (Yuan et al., 2026).

    ρᵢ = #(mᵢ ∧ c > 1) / max(#(mᵢ ∧ c = 1), ε) over the whole tensor (mergekit's tensor-local
    variant), so a first chunked pass counts, then the combining pass runs.
    """
    epsilon = params["epsilon"]
    shared, unique = overlap_counts(base, tensors, epsilon)
    return _merge(base, tensors, epsilon, scales=unique_scales(shared, unique, params["r"], params["alpha"], epsilon))


def overlap_counts(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float) -> tuple[list[int], list[int]]:
    """Per model i: how many entries it changes together with another model (shared), and alone (unique)."""
    deltas = [TaskVector(x, base) for x in tensors]
    shared, unique = [0] * len(deltas), [0] * len(deltas)
    for part in chunks(base.numel(), base.device):
        changed = [_changed(delta.chunk(part), epsilon) for delta in deltas]
        count = _count(changed)
        alone = torch.eq(count, 1, out=torch.empty_like(count))
        for i, mask in enumerate(changed):
            total = int(mask.sum().item())
            alone_here = int(mask.mul_(alone).sum().item())
            unique[i] += alone_here
            shared[i] += total - alone_here  # changed by model i and by at least one other
    return shared, unique


def unique_scales(shared: list[int], unique: list[int], r: float, alpha: float, epsilon: float) -> torch.Tensor:
    """λᵢ = 1 + r·clip(ρᵢ, 0, α), ρᵢ = sharedᵢ / max(uniqueᵢ, ε), as float32 (mergekit's arithmetic).

    A model that changes no entry of the tensor gets ρᵢ = 0 (λᵢ = 1, and it has no unique
    updates to scale anyway). mergekit divides 0 by max(0, ε), which is 0/0 when ε = 0, and
    the NaN then spreads over the whole merged tensor; a deliberate difference.
    """
    counts = torch.tensor(shared, dtype=torch.int64)
    rho = counts / torch.tensor(unique, dtype=torch.int64).clamp(min=epsilon)
    rho = rho.masked_fill(counts == 0, 0.0)  # 0 / x is already 0 for x > 0: only 0 / 0 changes
    return 1 + r * rho.clamp(min=0, max=alpha)


def _changed(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """mᵢ = [|δᵢ| > ε] as a float 0/1 mask (ε compared in float32, as mergekit)."""
    return torch.gt(delta.abs(), epsilon, out=torch.empty_like(delta))


def _count(changed: list[torch.Tensor]) -> torch.Tensor:
    count = changed[0].clone()
    for mask in changed[1:]:
        count += mask
    return count


def _merge(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float, scales: torch.Tensor | None) -> torch.Tensor:
    """θ_base + Σᵢ (mᵢδᵢ·sᵢ) / max(1, c), sᵢ = λᵢ on unique entries (RAM+) and 1 elsewhere.

    mergekit writes each term as mᵢδᵢ·[c = 1]·λᵢ + mᵢδᵢ·[c > 1] / max(1, c); one of the two is
    always 0 (or both, where mᵢ = 0), so the division by max(1, c) alone gives the same floats.
    Terms are added in model order, as its sum over the stacked models does.
    """
    deltas = [TaskVector(x, base) for x in tensors]
    lambdas = None if scales is None else scales.tolist()  # Python floats hold float32 values exactly
    flat_base = base.reshape(-1)
    out = torch.empty(flat_base.numel(), dtype=torch.float32, device=flat_base.device)
    for part in chunks(out.numel(), out.device):
        kept = [delta.chunk(part) for delta in deltas]
        changed = [_changed(chunk, epsilon) for chunk in kept]
        count = _count(changed)
        if lambdas is not None:
            alone = torch.eq(count, 1, out=torch.empty_like(count))
        divisor = count.clamp_(min=1)
        merged = None
        for i, (chunk, mask) in enumerate(zip(kept, changed)):
            term = chunk.mul_(mask)
            if lambdas is not None:  # exactly λᵢ where alone, exactly 1 elsewhere
                term.mul_(alone * lambdas[i] + (1 - alone))
            term.div_(divisor)
            merged = term if merged is None else merged.add_(term)
        torch.add(flat_base[part].float(), merged, out=out[part])
    return out.reshape(base.shape)

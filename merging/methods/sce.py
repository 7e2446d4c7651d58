"""SCE, the merge of FuseChat 2.0 (Wan et al., 2024): Select, Calculate, Erase over task vectors.

Per tensor, with task vectors δᵢ = θᵢ − θ_base:

1. **Select**: keep the ``select_topk`` fraction of entries where the δᵢ vary most across the
   models (variance over models, per entry); the others are zeroed in every δᵢ.
2. **Calculate**: each model's coefficient is its mean squared (selected) δ, normalized to sum 1.
3. **Erase**: TIES's sign election on the selected δᵢ (unweighted); entries disagreeing with the
   elected sign are dropped, and the rest averaged with the coefficients of step 2.

θ = θ_base + Σᵢ wᵢmᵢδᵢ / Σᵢ wᵢmᵢ. Details as mergekit 0.1.5 (``merge_methods/sce.py``): the
variance is the population variance, the count k = int(nonzero variances · select_topk) (a
float32 product), coefficients fall back to 1/N when their sum is below 1e-6, the divisor is
floored at 1e-6, and an entry no model agrees on stays at the base.
"""

from __future__ import annotations

import torch

from merging.methods.kernels import TaskVector, chunks, top_k_keep
from merging.methods.spec import INT8_MASK, MethodSpec, Param, register

WEIGHT_SUM_FLOOR = 1e-6  # mergekit: below this total the coefficients are uniform
DIVISOR_FLOOR = 1e-6  # mergekit's floor on Σ wᵢmᵢ

SELECT_TOPK = Param(
    "select_topk", float, 1.0, "global",
    "Fraction of entries kept: those where the models' task vectors vary most (1 keeps all, 0 returns the base).",
    low=0.0, high=1.0,
)


def variance_select(deltas: list[TaskVector], fraction: float):
    """(keep, variance): keep the top ``fraction`` of entries by Var_i(δᵢ), over the entries whose
    variance is not 0 (k = int(nonzero · fraction)), or None when ``fraction`` >= 1.

    ``keep`` is a ``kernels.Keep`` over the flat variance tensor (pass it ``variance[part]``);
    the variance is held whole (one float32 copy) because the threshold needs every entry.
    Equal variances at the threshold are kept by position (mergekit's ``topk``: arbitrary).
    """
    numel = deltas[0].numel
    if fraction >= 1:
        return None, None
    variance = torch.empty(numel, dtype=torch.float32, device=deltas[0].base.device)
    nonzero = 0
    for part in chunks(numel, variance.device):
        # The population variance in float64, rounded to float32: the values of mergekit's torch.var
        # over the stacked models (which accumulates in double), bit for bit in our tests, and ~10x
        # faster on a CPU, where var over a short leading axis takes a slow path (20 of 27 s of a
        # 170M-parameter SCE merge).
        values = [d.chunk(part).double() for d in deltas]
        mean = sum(values) / len(values)
        variance[part] = (sum((v - mean).square_() for v in values) / len(values)).float()
        nonzero += int(torch.count_nonzero(variance[part]))
    k = int(torch.tensor(nonzero) * fraction) if fraction > 0 else 0  # as mergekit: a float32 product
    zero = torch.zeros((), dtype=torch.float32, device=variance.device).expand(numel)
    return top_k_keep(TaskVector(variance, zero), k), variance


def _selected(deltas: list[TaskVector], part: slice, keep, variance) -> torch.Tensor:
    """The selected task vectors of one chunk, stacked (N × chunk)."""
    stacked = torch.stack([d.chunk(part) for d in deltas])
    if keep is not None:
        stacked *= keep(part, variance[part])
    return stacked


def sce_coefficients(deltas: list[TaskVector], keep, variance) -> list[float]:
    """wᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²) over the selected entries (Wan et al., 2024,
    https://arxiv.org/abs/2408.07990, "Calculate"); 1/N each when the total is below 1e-6."""
    squares = torch.zeros(len(deltas), dtype=torch.float64, device=deltas[0].base.device)
    for part in chunks(deltas[0].numel, squares.device):
        squares += _selected(deltas, part, keep, variance).double().square_().sum(dim=1)
    means = (squares / max(1, deltas[0].numel)).tolist()
    total = sum(means)
    if abs(total) < WEIGHT_SUM_FLOOR:
        return [1.0 / len(deltas)] * len(deltas)
    return [m / total for m in means]


def elect_and_erase(selected: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Σᵢ wᵢmᵢδᵢ / max(Σᵢ wᵢmᵢ, 1e-6) for one chunk (N × chunk in, chunk out).

    mᵢ = [sign δᵢ = elected sign], the elected sign that of Σᵢ δᵢ with 0 counted as + (TIES's
    election, mergekit's ``get_mask(method="sum")``, here over the unweighted δᵢ, so
    ``kernels.disjoint_merge``, which votes with the weighted ones, does not apply). Zero
    entries have no sign and never agree.
    """
    elected = torch.ge(selected.sum(dim=0), 0, out=torch.empty_like(selected[0])).mul_(2).sub_(1)
    agrees = torch.eq(torch.sign(selected), elected, out=torch.empty_like(selected))
    erased = agrees.mul_(coefficients.unsqueeze(-1))
    return (selected * erased).sum(dim=0).div_(erased.sum(dim=0).clamp_(min=DIVISOR_FLOOR))


@register(MethodSpec(
    name="sce",
    title="SCE (FuseChat)",
    paper="https://arxiv.org/abs/2408.07990",
    summary="Keep the select_topk entries of highest variance across models, weight each task vector by its "
            "mean square, elect signs, weighted disjoint mean.",
    params=(SELECT_TOPK, INT8_MASK),
    needs_base=True,
    base="origin",
    family="task vectors",
    guidance="No per-model weights: each model counts by the size of its task vector. select_topk 1 "
             "(mergekit's default) keeps every entry; lower values (e.g. 0.1–0.5) keep only the entries where "
             "the models differ most.",
    suggested={"select_topk": 1.0},
))
def sce(base, tensors, per_model, params, seed):
    """θ = θ_base + Σᵢ wᵢmᵢδᵢ / Σᵢ wᵢmᵢ over the selected δᵢ = θᵢ − θ_base (module docstring;
    Wan et al., 2024, https://arxiv.org/abs/2408.07990)."""
    deltas = [TaskVector(x, base) for x in tensors]
    keep, variance = variance_select(deltas, params["select_topk"])
    coefficients = torch.tensor(sce_coefficients(deltas, keep, variance), dtype=torch.float32, device=base.device)
    out = torch.empty(base.numel(), dtype=torch.float32, device=base.device)
    flat_base = base.reshape(-1)
    for part in chunks(base.numel(), base.device):
        merged = elect_and_erase(_selected(deltas, part, keep, variance), coefficients)
        torch.add(flat_base[part].float(), merged, out=out[part])
    return out.reshape(base.shape)

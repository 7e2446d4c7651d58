"""Model Stock (Jang et al., 2024): move from the base towards the fine-tunes' average by a ratio
that their angle decides, with no hyperparameter to tune.

With N fine-tunes θᵢ of one base θ₀, the offsets θᵢ − θ₀ of independently fine-tuned models are
nearly orthogonal around a common centre; the paper's geometry gives the interpolation ratio
t = N cos θ / (1 + (N − 1) cos θ) from the angle θ between offsets, and θ = t · mean(θᵢ) + (1 − t) θ₀.
As mergekit 0.1.5 (``merge_methods/model_stock.py``): cos θ is the mean of the pairwise cosines
(each clamped to [−1, 1], norms' product floored at 1e-6), once per tensor or, with
``filter_wise``, once per row; where 1 + (N − 1) cos θ is within 1e-6 of 0 there is no finite
estimate and the base is kept (t = 0).
"""

from __future__ import annotations

import torch

from merging.methods.kernels import BLOCK, GPU_BLOCKS, chunks, weighted_sum
from merging.methods.spec import MethodSpec, Param, register

NORM_FLOOR = 1e-6  # mergekit's floor on ‖a‖·‖b‖ in a cosine
SINGULAR = 1e-6  # |1 + (N − 1) cos θ| below this: t = 0 (mergekit)

FILTER_WISE = Param(
    "filter_wise", bool, False, "global",
    "Compute the ratio t for each row of a matrix (each output filter) instead of once per tensor.",
)


def interpolation_ratio(gram: torch.Tensor) -> torch.Tensor:
    """t = N c / (1 + (N − 1) c) from the Gram matrices ``gram`` (..., N, N) of the N offsets.

    c is the mean over pairs i < j of Gᵢⱼ / max(‖oᵢ‖‖oⱼ‖, 1e-6), each clamped to [−1, 1]
    (Jang et al., 2024, https://arxiv.org/abs/2403.19522, eq. for t; mergekit's estimate of
    cos θ). Where |1 + (N − 1) c| < 1e-6, t = 0 (keep the base). Returns shape (...).
    """
    count = gram.shape[-1]
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    pairs = torch.triu_indices(count, count, offset=1, device=gram.device)
    dots = gram[..., pairs[0], pairs[1]]
    products = (norms[..., pairs[0]] * norms[..., pairs[1]]).clamp(min=NORM_FLOOR)
    cos = (dots / products).clamp(-1, 1).mean(dim=-1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(cos), count * cos / torch.where(singular, 1.0, denominator))


def _gram(base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Gᵢⱼ = (θᵢ − θ₀)·(θⱼ − θ₀) over the flattened tensor, accumulated in float64 chunk by chunk
    (the offsets themselves in float32, as mergekit forms them)."""
    flat_base, flat = base.reshape(-1), [x.reshape(-1) for x in tensors]
    gram = torch.zeros(len(tensors), len(tensors), dtype=torch.float64, device=base.device)
    for part in chunks(flat_base.numel(), flat_base.device):
        start = flat_base[part].float()
        offsets = torch.stack([x[part].float() - start for x in flat]).double()
        gram += offsets @ offsets.T
    return gram


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The tensor as rows over its last dimension (a vector is one row), as mergekit's filter-wise mode."""
    return x.reshape(-1, x.shape[-1]) if x.dim() >= 2 else x.reshape(1, -1)


def _filter_wise(base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Model Stock with one t per row, a block of rows at a time (one pass: each row is independent)."""
    base_rows, rows = _rows(base), [_rows(x) for x in tensors]
    count, (height, length) = len(tensors), base_rows.shape
    out = torch.empty(height, length, dtype=torch.float32, device=base.device)
    step = max(1, BLOCK * (GPU_BLOCKS if base.device.type == "cuda" else 1) // max(1, length))
    for first in range(0, height, step):
        block = slice(first, min(height, first + step))
        start = base_rows[block].float()
        models = torch.stack([x[block].float() for x in rows])  # N × rows × L
        offsets = (models - start).double()
        t = interpolation_ratio(torch.einsum("irl,jrl->rij", offsets, offsets)).float().unsqueeze(-1)
        average = models.sum(dim=0).div_(count)
        torch.add(t * average, (1 - t) * start, out=out[block])
    return out.reshape(base.shape)


@register(MethodSpec(
    name="model_stock",
    title="Model Stock",
    paper="https://arxiv.org/abs/2403.19522",
    summary="θ = t·mean(θᵢ) + (1 − t)·θ_base, t = N cos θ / (1 + (N − 1) cos θ) from the fine-tunes' mean "
            "pairwise angle around the base.",
    params=(FILTER_WISE,),
    needs_base=True,
    base="origin",
    min_models=2,  # mergekit's min_inputs = 3 counts the base
    family="interpolation",
    guidance="No weights to tune: the ratio comes from the angle between the fine-tunes' task vectors. Needs the "
             "base and at least two fine-tunes of it (the paper uses two); filter_wise computes the ratio per row.",
))
def model_stock(base, tensors, per_model, params, seed):
    """θ = t · (1/N) Σ θᵢ + (1 − t) θ₀ with t from ``interpolation_ratio`` (Jang et al., 2024,
    https://arxiv.org/abs/2403.19522); per tensor, or per row with ``filter_wise``."""
    if params["filter_wise"]:
        return _filter_wise(base, tensors)
    count = len(tensors)
    t = interpolation_ratio(_gram(base, tensors)).item()
    return weighted_sum([base, *tensors], [1 - t, *[t / count] * count])

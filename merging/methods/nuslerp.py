"""NuSLERP: spherical interpolation of two models, or of their task vectors (mergekit 0.1.5).

mergekit's second SLERP. It takes exactly two models and an optional base. The interpolation
factor comes from the two models' weights, t = w₂ / (w₁ + w₂). With a base, the two task vectors
δᵢ = θᵢ − θ_base are interpolated and the result added back to the base; without one, the two
models themselves. The angle is measured over the whole tensor (``nuslerp_flatten``, the
default) or separately for each vector along one dimension of the stored tensor: the last one
(each row of a matrix), or with ``nuslerp_row_wise`` the first one.

Differences from ``slerp`` (as in mergekit): no |cos Ω| > 0.9995 fallback to a lerp (only
vectors collinear to 1 − cos²Ω <= 1e-16 are lerped), and a zero vector is not special-cased: it
is "orthogonal" to everything (cos Ω = 0), so nuslerp(0, δ; t) = sin(tπ/2)·δ.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from merging.methods.kernels import BLOCK, GPU_BLOCKS
from merging.methods.spec import WEIGHT, MethodSpec, Param, register

NORM_FLOOR = 1e-7  # a vector's norm is clamped to at least this before the cosine (mergekit)
COLLINEAR = 1e-8  # lerp where 1 − cos²Ω <= COLLINEAR² (sin Ω would vanish)

ROW_WISE = Param(
    "nuslerp_row_wise", bool, False, "global",
    "With nuslerp_flatten false: interpolate the vectors along the first dimension of each stored "
    "tensor instead of along the last (each row of a matrix).",
)
FLATTEN = Param(
    "nuslerp_flatten", bool, True, "global",
    "Measure one angle over the whole tensor (true), or one per vector along a dimension (false; "
    "see nuslerp_row_wise).",
)


@register(MethodSpec(
    name="nuslerp",
    title="NuSLERP",
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp-nuslerp",
    summary="SLERP of two models (or of their task vectors, given a base_model) by t = w₂/(w₁+w₂); "
            "per tensor or per row.",
    params=(WEIGHT, ROW_WISE, FLATTEN),
    needs_base=False,
    base="origin",
    min_models=2,
    max_models=2,
    inputs_help="exactly two models besides an optional base_model",
    family="interpolation",
    guidance="The two weights only set t = w₂/(w₁+w₂): weights 1 − t and t reproduce slerp between the "
             "models. With a base_model it interpolates their task vectors, keeping the base's "
             "knowledge. Flattened (one angle per tensor) is the usual setting.",
    suggested={"weight": 1.0},
))
def nuslerp(base, tensors, per_model, params, seed):
    """θ = θ_base + slerp(δ₁, δ₂; t) (or slerp(θ₁, θ₂; t) without a base), t = w₂ / (w₁ + w₂).

    slerp(a, b; t) = [sin((1−t)Ω)·a + sin(tΩ)·b] / sin Ω with cos Ω = a·b / (‖a‖‖b‖), for each
    vector of the layout chosen by ``nuslerp_flatten`` / ``nuslerp_row_wise``; lerp where the
    vectors are collinear. t = 0.5 when |w₁ + w₂| < 1e-6. Source: mergekit 0.1.5
    ``merge_methods/nuslerp.py`` (https://github.com/arcee-ai/mergekit).
    """
    w1, w2 = (p["weight"] for p in per_model)
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    shape = tensors[0].shape
    rows, cols, axis = vector_layout(shape, params["nuslerp_flatten"], params["nuslerp_row_wise"])
    a, b = (x.reshape(rows, cols) for x in tensors)
    origin = base.reshape(rows, cols) if base is not None else None
    device = a.device

    def vectors(part: slice, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh copies (never views of the inputs) of this block's two vectors or task vectors."""
        x, y = a[part].to(dtype, copy=True), b[part].to(dtype, copy=True)
        if origin is not None:
            o = origin[part].to(dtype)
            x, y = x.sub_(o), y.sub_(o)
        return x, y

    # pass 1: per vector ‖a‖², ‖b‖², a·b (one vector, or one per row or column): float32
    # products summed per block by torch (cascade sums, ~1e-7 relative), block totals in float64
    count = cols if axis == 0 else rows
    stats = torch.zeros(3, count, dtype=torch.float64, device=device)
    for part in row_blocks(rows, cols, device):
        x, y = vectors(part, torch.float32)
        for k, products in enumerate((x * x, y * y, x.mul_(y))):
            if axis == 0:
                stats[k] += products.sum(0)
            else:
                stats[k, part] = products.sum(1)
    c1, c2 = slerp_coefficients(stats, t)
    c1, c2 = (c.float() for c in (c1, c2))

    # pass 2: c₁·a + c₂·b (+ base), coefficients broadcast along each vector
    out = torch.empty(rows, cols, dtype=torch.float32, device=device)
    for part in row_blocks(rows, cols, device):
        x, y = vectors(part, torch.float32)
        k1, k2 = (c.unsqueeze(0) if axis == 0 else c[part].unsqueeze(1) for c in (c1, c2))
        merged = x.mul_(k1).add_(y.mul_(k2))
        if origin is not None:
            merged += origin[part].float()
        out[part] = merged
    return out.reshape(shape)


def vector_layout(shape: torch.Size, flatten: bool, row_wise: bool) -> tuple[int, int, int]:
    """(rows, cols, axis): the tensor viewed as a rows × cols matrix whose vectors lie along ``axis``.

    flatten: one vector, the whole tensor (n × 1, along axis 0). Otherwise mergekit normalizes
    along the last dimension (each row of the stored tensor: [n/last, last], axis 1), or with
    row_wise along the first one ([first, n/first], axis 0: vectors are columns). A 1-D tensor
    is one vector in every mode.
    """
    numel = math.prod(shape)
    if flatten or len(shape) <= 1:
        return numel, 1, 0
    if row_wise:
        return shape[0], numel // shape[0], 0
    return numel // shape[-1], shape[-1], 1


def row_blocks(rows: int, cols: int, device: torch.device) -> Iterator[slice]:
    """Slices of whole rows holding about one chunk (``kernels.chunks``' size) of entries each."""
    step = BLOCK * (GPU_BLOCKS if device.type == "cuda" else 1)
    per = max(1, step // max(1, cols))
    for start in range(0, rows, per):
        yield slice(start, min(rows, start + per))


def slerp_coefficients(stats: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c₁, c₂) with slerp(a, b; t) = c₁a + c₂b, from stats = [‖a‖², ‖b‖², a·b] per vector (float64).

    cos Ω = a·b / (max(‖a‖, 1e-7)·max(‖b‖, 1e-7)), clamped to [−1, 1]; c₁ = sin((1−t)Ω)/sin Ω,
    c₂ = sin(tΩ)/sin Ω; where 1 − cos²Ω <= 1e-16 (collinear) c₁ = 1 − t, c₂ = t.
    """
    norm_a, norm_b = (s.sqrt().clamp(min=NORM_FLOOR) for s in stats[:2])
    cos = (stats[2] / (norm_a * norm_b)).clamp(-1.0, 1.0)
    collinear = (1 - cos.square()) <= COLLINEAR**2
    theta = torch.acos(torch.where(collinear, 0.0, cos))  # keeps sin Ω away from 0 where unused
    sin = torch.sin(theta)
    c1 = torch.where(collinear, 1.0 - t, torch.sin((1 - t) * theta) / sin)
    c2 = torch.where(collinear, t, torch.sin(t * theta) / sin)
    return c1, c2

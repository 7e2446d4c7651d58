"""Multi-SLERP: barycentric interpolation of any number of models on the hypersphere (mergekit 0.1.5).

Charles Goddard's construction (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea):
project each model (or task vector, given a base) onto the unit sphere, take the weighted
Euclidean mean of the unit vectors, normalize it, interpolate in the tangent space there and map
back with the exponential map; the result gets the weighted mean of the models' norms.

The tangent step has a closed form: at m̂ = m/‖m‖ with m = Σ wᵢuᵢ, the weighted tangent vectors
sum to Σ wᵢ(uᵢ − (uᵢ·m̂)m̂) = m − (m·m̂)m̂ = 0 exactly, so the exponential map returns m̂·cos(ε)
(mergekit adds ε to the tangent norm). We compute that closed form in two chunked passes instead
of materializing every unit vector; mergekit's result differs only by float rounding (~1e-7).
"""

from __future__ import annotations

import math

import torch

from merging.errors import RecipeError
from merging.methods.kernels import chunks
from merging.methods.spec import WEIGHT, MethodSpec, Param, register

NORMALIZE_WEIGHTS = Param(
    "normalize_weights", bool, True, "global",
    "Divide the weights by their sum (so they are barycentric coordinates).",
)
EPS = Param(
    "eps", float, 1e-8, "global",
    "Small constant for numerical stability: added to each norm before normalizing, and the "
    "smallest weighted mean direction accepted.",
    low=0.0,
)


@register(MethodSpec(
    name="multislerp",
    title="Multi-SLERP",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    summary="Weighted spherical mean of any number of models (or task vectors, given a base_model): "
            "direction of Σ wᵢθᵢ/‖θᵢ‖, norm Σ wᵢ‖θᵢ‖.",
    params=(WEIGHT, NORMALIZE_WEIGHTS, EPS),
    needs_base=False,
    base="origin",
    min_models=1,
    inputs_help="one or more models besides an optional base_model",
    family="interpolation",
    guidance="SLERP for more than two models: weights are relative (normalized to sum to 1 by default). "
             "With a base_model it averages task vectors on the sphere, keeping the base's knowledge.",
    suggested={"weight": 1.0},
))
def multislerp(base, tensors, per_model, params, seed):
    """θ = θ_base + cos(ε)·(Σ wᵢ‖δᵢ‖)·m/‖m‖, m = Σ wᵢ δᵢ/(‖δᵢ‖ + ε), δᵢ = θᵢ − θ_base (θᵢ without a base).

    wᵢ are divided by Σ wⱼ when ``normalize_weights``. A single model is returned as is. When
    ‖m‖ < ε (antipodal inputs cancelling out): two models give the lerp w₁δ₁ + w₂δ₂ (+ base),
    more are an error, as in mergekit 0.1.5 ``merge_methods/multislerp.py``; except that when
    every δᵢ is 0 the result is the base (mergekit raises for three or more models there).
    """
    if len(tensors) == 1:
        return tensors[0].to(torch.float32, copy=True)
    eps = params["eps"]
    weights = [p["weight"] for p in per_model]
    if params["normalize_weights"]:
        total = sum(weights)
        if total == 0:
            raise RecipeError("multislerp: the weights sum to 0, so normalize_weights cannot divide by their sum; "
                              "change the weights or set normalize_weights: false")
        weights = [w / total for w in weights]
    flat = [x.reshape(-1) for x in tensors]
    origin = base.reshape(-1) if base is not None else None
    device = flat[0].device

    def delta(x: torch.Tensor, part: slice) -> torch.Tensor:
        chunk = x[part].to(torch.float32, copy=True)
        return chunk.sub_(origin[part].float()) if origin is not None else chunk

    # pass 1: the norms ‖δᵢ‖. Sums of squares: torch's cascade sum per chunk (~1e-7 relative),
    # chunk totals in float64; not torch.norm, whose float32 accumulation on a CPU drifts with
    # length (measured: a 16.8M-entry norm 6.5e-4 low; mergekit's multislerp of three such task
    # vectors was 4e-5 from a float64 evaluation, ours 4e-8).
    squares = torch.zeros(len(flat), dtype=torch.float64, device=device)
    for part in chunks(flat[0].numel(), device):
        for i, x in enumerate(flat):
            squares[i] += delta(x, part).square_().sum()
    norms = [math.sqrt(s) for s in squares.tolist()]

    # pass 2: m = Σ wᵢ·uᵢ, uᵢ = δᵢ/(‖δᵢ‖ + ε), into the output, and ‖m‖. Each uᵢ and wᵢuᵢ is
    # rounded before the sum (no fused multiply-add), so that antipodal inputs cancel exactly
    # and take the fallback below, as in mergekit.
    out = torch.zeros(flat[0].numel(), dtype=torch.float32, device=device)
    mean_square = torch.zeros((), dtype=torch.float64, device=device)
    for part in chunks(out.numel(), device):
        acc = out[part]
        for x, w, n in zip(flat, weights, norms):
            acc += delta(x, part).div_(n + eps).mul_(w)
        mean_square += acc.square().sum()
    mean_norm = math.sqrt(mean_square.item())

    if mean_norm < eps:
        if all(n == 0 for n in norms):  # every model is the origin: nothing to average
            coefficients = [0.0] * len(flat)
        elif len(flat) == 2:  # mergekit: an antipodal pair falls back to the lerp
            coefficients = weights
        else:
            raise RecipeError(
                "multislerp: the weighted mean of the models' directions is zero for this tensor (antipodal "
                "models whose weights cancel out, e.g. a and -a with equal weights); use different weights")
        out.zero_()
        for part in chunks(out.numel(), device):
            for x, c in zip(flat, coefficients):
                out[part].add_(delta(x, part), alpha=c)
    else:
        scale = math.cos(eps) * sum(w * n for w, n in zip(weights, norms)) / mean_norm
        out.mul_(scale)
    if origin is not None:
        for part in chunks(out.numel(), device):
            out[part].add_(origin[part].float())
    return out.reshape(tensors[0].shape)

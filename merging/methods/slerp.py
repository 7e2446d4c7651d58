"""Spherical linear interpolation between two models (Shoemake, 1985), per tensor."""

from __future__ import annotations

import torch

from merging.methods.spec import MethodSpec, Param, register

DOT_THRESHOLD = 0.9995  # nearly collinear tensors: slerp is ill-conditioned, lerp is exact enough
EPS = 1e-8

T = Param(
    "t", float, 0.5, "global",
    "Interpolation factor: 0 gives the base model, 1 the other model. "
    "A list gives a gradient over layers.",
    low=0.0, high=1.0,
)


@register(MethodSpec(
    name="slerp",
    title="SLERP",
    paper="https://en.wikipedia.org/wiki/Slerp",
    summary="Interpolate along the great circle between the base and one other model, by t.",
    params=(T,),
    needs_base=True,
    base_is_input=True,
    min_models=2,
    max_models=2,
))
def slerp(base, tensors, per_model, params, seed):
    """slerp(a, b; t) = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, cos Ω = â·b̂ over the flattened tensor.

    ``tensors`` is [base, other]; the angle is measured between the normalized tensors, the
    interpolation applied to the unnormalized ones (as mergekit). When |cos Ω| > 0.9995 it
    falls back to linear interpolation.
    """
    a, b = tensors
    t = params["t"]
    a_norm = torch.linalg.vector_norm(a)
    b_norm = torch.linalg.vector_norm(b)
    a_norm = a_norm if a_norm > EPS else torch.ones_like(a_norm)
    b_norm = b_norm if b_norm > EPS else torch.ones_like(b_norm)
    dot = torch.clamp(torch.sum((a / a_norm) * (b / b_norm)), -1.0, 1.0)
    if dot.abs() > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / sin_theta) * a + (torch.sin(t * theta) / sin_theta) * b

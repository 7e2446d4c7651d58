"""Spherical linear interpolation between two models (Shoemake, 1985), per tensor."""

from __future__ import annotations

import math

import torch

from merging.methods.kernels import chunks
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
    base="first_input",
    min_models=2,
    max_models=2,
    inputs_help="exactly two models: the base_model and one other model",
    family="interpolation",
    guidance="Takes the base and exactly one other model. t = 0 gives the base, t = 1 the other model; "
             "0.3–0.7 keeps a blend of both.",
))
def slerp(base, tensors, per_model, params, seed):
    """slerp(a, b; t) = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, cos Ω = â·b̂ over the flattened tensor.

    ``tensors`` is [base, other]; the angle is measured between the normalized tensors, the
    interpolation applied to the unnormalized ones (as mergekit). When |cos Ω| > 0.9995 it
    falls back to linear interpolation. Norms and the dot product take one chunked pass.
    """
    a, b = (x.reshape(-1) for x in tensors)
    t = params["t"]
    norm_a = norm_b = dot = 0.0
    for part in chunks(a.numel(), a.device):
        x, y = a[part].double(), b[part].double()
        norm_a += x.square().sum().item()
        norm_b += y.square().sum().item()
        dot += (x * y).sum().item()
    norm_a, norm_b = norm_a**0.5, norm_b**0.5
    cos = dot / ((norm_a if norm_a > EPS else 1.0) * (norm_b if norm_b > EPS else 1.0))
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t, t
    else:
        theta = math.acos(cos)
        coef_a, coef_b = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    out = torch.empty(a.numel(), dtype=torch.float32, device=a.device)
    for part in chunks(a.numel(), a.device):
        torch.add(a[part].float() * coef_a, b[part].float(), alpha=coef_b, out=out[part])
    return out.reshape(tensors[0].shape)

"""Karcher mean: the Riemannian centre of mass of the models on the unit hypersphere (mergekit 0.1.5).

Per tensor, every model is reduced to its direction uᵢ = θᵢ/‖θᵢ‖ and the equally weighted
Karcher (Fréchet) mean of the directions is found by Riemannian gradient descent: at the current
mean μ, the log map of each direction is logμ(uᵢ) = θᵢ/sin θᵢ·(uᵢ − cos θᵢ·μ) with cos θᵢ = μ·uᵢ;
their weighted sum T is the step, taken with the exponential map μ ← cos‖T‖·μ + sin‖T‖·T/‖T‖.
The result is the mean direction scaled by the mean norm of the models.

As in mergekit, every model of the recipe enters with the same weight 1/N, a base_model
included (it is appended when not listed, as for linear); there are no per-model weights.
"""

from __future__ import annotations

import math

import torch

from merging.methods.kernels import chunks
from merging.methods.spec import MethodSpec, Param, register

MAX_ITER = Param(
    "max_iter", int, 10, "global",
    "Most gradient steps on the sphere (each reads every model twice); 0 keeps the normalized "
    "Euclidean mean of the directions.",
    low=0,
)
TOL = Param(
    "tol", float, 1e-5, "global",
    "Stop when the step is shorter than this; also the smallest norm for a model to count and the "
    "smallest angle from the mean for a direction to pull on it.",
    low=0.0,
)


@register(MethodSpec(
    name="karcher",
    title="Karcher mean",
    paper="https://arxiv.org/abs/2603.04972",
    summary="Spherical mean of all models' directions (Riemannian gradient descent), scaled by their "
            "mean norm.",
    params=(MAX_ITER, TOL),
    needs_base=False,
    base="input",
    min_models=1,
    inputs_help="one or more models (a base_model is averaged in like the others)",
    family="interpolation",
    guidance="Every model counts equally (a base_model is one of them). The defaults (10 steps, tol 1e-5) "
             "converge in a step or two for fine-tunes of one base; a tol far below float32 rounding "
             "(recipes use 1e-9) is never reached, so all max_iter steps run.",
))
def karcher(base, tensors, per_model, params, seed):
    """θ = (1/N Σ ‖θᵢ‖)·μ*, μ* = argmin_μ Σᵢ d(μ, uᵢ)² over unit vectors, uᵢ = θᵢ/‖θᵢ‖.

    Models with ‖θᵢ‖ <= tol take no part in the direction (their norm still enters the mean
    norm); if all are that small the result is 0. The descent starts at the normalized
    Euclidean mean of the directions (the first direction if that mean is shorter than tol)
    and stops after ``max_iter`` steps or at a step shorter than ``tol``; directions within
    ``tol`` radians of the mean are skipped; after each step μ is renormalized. Source: mergekit
    0.1.5 ``merge_methods/karcher.py``. Vectors are float32 chunked passes; norms, dot products
    and angles are accumulated in float64 (see ``square_norm``).
    """
    if len(tensors) == 1:
        return tensors[0].to(torch.float32, copy=True)
    max_iter, tol = params["max_iter"], params["tol"]
    flat = [x.reshape(-1) for x in tensors]
    norms = [math.sqrt(square_norm(x)) for x in flat]
    mean_norm = sum(norms) / len(norms)
    points = [(x, n) for x, n in zip(flat, norms) if n > tol]  # (θᵢ, ‖θᵢ‖): uᵢ = θᵢ/‖θᵢ‖
    if not points:
        return torch.zeros(tensors[0].shape, dtype=torch.float32, device=flat[0].device)
    alpha = 1.0 / len(points)

    mu = unit_mean(points, alpha)
    length = math.sqrt(square_norm(mu))
    if length < tol:
        mu = unit_mean(points[:1], 1.0)
    else:
        mu /= length
    step = torch.empty_like(mu)
    for _ in range(max_iter):
        # log map of each direction at μ: θ/sin θ · (u − cos θ · μ), θ = arccos(μ·u)
        coefficients, along_mu = [], 0.0
        for (_, n), product in zip(points, dots(mu, [x for x, _ in points])):
            cos = min(1.0, max(-1.0, product / n))
            theta = math.acos(cos)
            pull = 0.0 if theta < tol else alpha * theta / math.sin(theta)
            coefficients.append(pull / n)
            along_mu += pull * cos
        # T = Σ pullᵢ·(uᵢ − cos θᵢ·μ) = Σ (pullᵢ/‖θᵢ‖)·θᵢ − (Σ pullᵢ cos θᵢ)·μ, and ‖T‖
        total = torch.zeros((), dtype=torch.float64, device=mu.device)
        for part in chunks(mu.numel(), mu.device):
            acc = torch.mul(mu[part], -along_mu, out=step[part])
            for (x, _), c in zip(points, coefficients):
                if c:
                    acc.add_(x[part].float(), alpha=c)
            total += acc.square().sum()
        distance = math.sqrt(total.item())
        if distance < tol:
            break
        # exponential map: μ ← cos‖T‖·μ + sin‖T‖·T/‖T‖, then back onto the sphere
        total.zero_()
        for part in chunks(mu.numel(), mu.device):
            acc = mu[part].mul_(math.cos(distance)).add_(step[part], alpha=math.sin(distance) / distance)
            total += acc.square().sum()
        length = math.sqrt(total.item())
        if length > tol:
            mu /= length
    return mu.mul_(mean_norm).reshape(tensors[0].shape)


# Reductions: float32 products summed per chunk by torch's cascade sum (relative error ~1e-7),
# chunk totals added in float64. Not torch.dot / torch.linalg.vector_norm: on a CPU they
# accumulate float32 with an error that grows with the length (measured: a 16.8M-entry norm came
# out 6.5e-4 low); that is why mergekit's Karcher mean of large tensors is off by ~1e-4.


def square_norm(x: torch.Tensor) -> float:
    """‖x‖² of a flat tensor, chunk by chunk."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for part in chunks(x.numel(), x.device):
        total += x[part].float().square().sum()
    return total.item()


def dots(mu: torch.Tensor, xs: list[torch.Tensor]) -> list[float]:
    """μ·xᵢ for every xᵢ (flat), in one pass over μ."""
    totals = torch.zeros(len(xs), dtype=torch.float64, device=mu.device)
    for part in chunks(mu.numel(), mu.device):
        m = mu[part]
        for i, x in enumerate(xs):
            totals[i] += torch.mul(m, x[part].float()).sum()
    return totals.tolist()


def unit_mean(points: list[tuple[torch.Tensor, float]], alpha: float) -> torch.Tensor:
    """Σ α·θᵢ/‖θᵢ‖ as a new flat float32 tensor, chunk by chunk.

    Each unit vector and its product with α are rounded before the sum (no fused multiply-add),
    as mergekit computes them, so that antipodal directions cancel exactly.
    """
    first = points[0][0]
    out = torch.zeros(first.numel(), dtype=torch.float32, device=first.device)
    for part in chunks(out.numel(), out.device):
        acc = out[part]
        for x, n in points:
            acc += x[part].float().div(n).mul_(alpha)
    return out

"""Merges that need the models run on data: Fisher-weighted averaging and RegMean.

Both read per-model statistics from ``merging.calibration`` (computed once per model and
calibration text, then cached); the engine hands each method the statistics of the tensor it
merges as ``stats``, one entry per model (None where a model has none for that tensor).
"""

from __future__ import annotations

import torch

from merging.methods.sparsify import chunks
from merging.methods.spec import MethodSpec, Param, register

DATA_WEIGHT = Param(
    "weight", float, 1.0, "model",
    "How much this model counts (scales its Fisher or its Gram matrices).",
    low=0.0,
)
CALIBRATION_SAMPLES = Param(
    "calibration_samples", int, 128, "global",
    "Calibration examples used per model (the first ones of its calibration data).",
    low=1, high=100_000,
)
CALIBRATION_MAX_LENGTH = Param(
    "calibration_max_length", int, 256, "global",
    "Tokens per calibration example (longer examples are truncated).",
    low=2, high=32_768,
)
FISHER_FLOOR = Param(
    "fisher_floor", float, 1e-6, "global",
    "Lower bound on each model's (normalized) Fisher, so entries no model cares about fall back "
    "to the weighted average instead of dividing by ~0.",
    low=0.0, low_inclusive=False,
)
NORMALIZE_FISHER = Param(
    "normalize_fisher", bool, True, "global",
    "Divide each model's Fisher by its global L2 norm first (as the paper's code does by default), "
    "so a model whose log-likelihood is simply steeper does not dominate every entry.",
)
REDUCE_NON_DIAGONAL = Param(
    "reduce_non_diagonal", float, 0.9, "global",
    "α: off-diagonal entries of every Gram are scaled by α (1 = the exact least-squares "
    "solution; the paper's regularized variant uses α < 1, e.g. 0.6 for GPT-2).",
    low=0.0, high=1.0,
)


def _weighted_average(tensors, weights) -> torch.Tensor:
    total = sum(weights)
    scale = 1.0 / total if total > 0 else 1.0 / len(weights)
    weights = weights if total > 0 else [1.0] * len(weights)
    out = torch.zeros(tensors[0].numel(), dtype=torch.float32, device=tensors[0].device)
    flat = [t.reshape(-1) for t in tensors]
    for part in chunks(out.numel(), out.device):
        for tensor, weight in zip(flat, weights):
            out[part].add_(tensor[part].float(), alpha=weight * scale)
    return out.reshape(tensors[0].shape)


@register(MethodSpec(
    name="fisher",
    title="Fisher-weighted averaging",
    paper="https://arxiv.org/abs/2111.09832",
    summary="θ = Σ wᵢFᵢθᵢ / Σ wᵢFᵢ per entry, Fᵢ the diagonal Fisher of model i on its calibration text.",
    params=(DATA_WEIGHT, NORMALIZE_FISHER, FISHER_FLOOR, CALIBRATION_SAMPLES, CALIBRATION_MAX_LENGTH),
    needs_base=False,
    uses_base=False,
    calibration="fisher",
))
def fisher(base, tensors, per_model, params, seed, stats):
    """θ = Σ wᵢ F̃ᵢ θᵢ / Σ wᵢ F̃ᵢ with F̃ᵢ = max(Fᵢ / ‖Fᵢ‖ (if normalized), floor).

    ``stats``: per model, ``(Fisher tensor or None, global norm)``. A tensor some model has no
    Fisher for (not a trained parameter) takes the weighted average.
    """
    weights = [p["weight"] for p in per_model]
    if not stats or sum(weights) <= 0 or any(entry is None or entry[0] is None for entry in stats):
        return _weighted_average(tensors, weights)
    floor = params["fisher_floor"]
    flat = [t.reshape(-1) for t in tensors]
    fishers = [entry[0].reshape(-1) for entry in stats]
    scales = [1.0 / entry[1] if params["normalize_fisher"] and entry[1] > 0 else 1.0 for entry in stats]
    out = torch.empty(flat[0].numel(), dtype=torch.float32, device=flat[0].device)
    for part in chunks(out.numel(), out.device):
        numerator = torch.zeros(part.stop - part.start, dtype=torch.float32, device=out.device)
        denominator = torch.zeros_like(numerator)
        for tensor, fisher_i, scale, weight in zip(flat, fishers, scales, weights):
            importance = (fisher_i[part].float() * scale).clamp_(min=floor).mul_(weight)
            numerator.addcmul_(importance, tensor[part].float())
            denominator.add_(importance)
        out[part] = numerator / denominator.clamp_(min=torch.finfo(torch.float32).tiny)
    return out.reshape(tensors[0].shape)


@register(MethodSpec(
    name="regmean",
    title="RegMean (regression mean)",
    paper="https://arxiv.org/abs/2212.09849",
    summary="Per linear layer W* = (Σ wᵢG̃ᵢ)⁻¹ Σ wᵢG̃ᵢWᵢᵀ, Gᵢ = XᵢᵀXᵢ of its inputs on model i's "
            "calibration text; other tensors are averaged.",
    params=(DATA_WEIGHT, REDUCE_NON_DIAGONAL, CALIBRATION_SAMPLES, CALIBRATION_MAX_LENGTH),
    needs_base=False,
    uses_base=False,
    calibration="gram",
))
def regmean(base, tensors, per_model, params, seed, stats):
    """For a linear weight (y = W x): W* minimizes Σᵢ wᵢ‖Xᵢ(W − Wᵢ)ᵀ‖², i.e.
    W*ᵀ = (Σ wᵢG̃ᵢ)⁻¹ Σ wᵢG̃ᵢWᵢᵀ with G̃ = α·G + (1 − α)·diag(G); solved in float64 (a solve, not
    an inverse). ``stats``: per model, ``(Gram, stored transposed)`` or None (not a linear weight:
    weighted average)."""
    weights = [p["weight"] for p in per_model]
    if not stats or tensors[0].dim() != 2 or any(entry is None for entry in stats) or sum(weights) <= 0:
        return _weighted_average(tensors, weights)
    alpha = params["reduce_non_diagonal"]
    transposed = stats[0][1]
    lhs = None
    rhs = None
    for tensor, (gram, _), weight in zip(tensors, stats, weights):
        g = gram.to(tensor.device, torch.float64)
        if alpha != 1.0:
            diagonal = torch.diagonal(g).clone()
            g.mul_(alpha)
            torch.diagonal(g).copy_(diagonal)
        g.mul_(weight)
        w_t = tensor.double() if transposed else tensor.double().T  # (in, out)
        lhs = g if lhs is None else lhs.add_(g)
        term = g @ w_t
        rhs = term if rhs is None else rhs.add_(term)
    solution = _solve(lhs, rhs)  # (in, out)
    return (solution if transposed else solution.T).float().contiguous()


def _solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """lhs⁻¹ rhs; a singular lhs (an input dimension no token ever used) takes the least-squares
    minimum-norm solution instead."""
    try:
        return torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        device = lhs.device
        return torch.linalg.lstsq(lhs.cpu(), rhs.cpu(), driver="gelsd").solution.to(device)

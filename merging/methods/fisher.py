"""Fisher-weighted averaging (Matena & Raffel, 2022): each entry weighted by how much each model's
likelihood on its calibration text depends on it."""

from __future__ import annotations

import torch

from merging.calibration import FISHER
from merging.methods.kernels import chunks, weighted_mean
from merging.methods.spec import CALIBRATION_MAX_LENGTH, CALIBRATION_SAMPLES, DATA_WEIGHT, MethodSpec, Param, register

FISHER_FLOOR = Param(
    "fisher_floor", float, 1e-6, "global",
    "Lower bound on each model's (normalized) Fisher, so entries no model cares about fall back "
    "to the weighted average instead of dividing by ~0.",
    low=0.0, low_inclusive=False, search=(1e-8, 1e-4), search_log=True,
)
NORMALIZE_FISHER = Param(
    "normalize_fisher", bool, True, "global",
    "Divide each model's Fisher by its global L2 norm first (as the paper's code does by default), "
    "so a model whose log-likelihood is simply steeper does not dominate every entry.",
)


@register(MethodSpec(
    name="fisher",
    title="Fisher-weighted averaging",
    paper="https://arxiv.org/abs/2111.09832",
    summary="θ = Σ wᵢFᵢθᵢ / Σ wᵢFᵢ per entry, Fᵢ the diagonal Fisher of model i on its calibration text.",
    params=(DATA_WEIGHT, NORMALIZE_FISHER, FISHER_FLOOR, CALIBRATION_SAMPLES, CALIBRATION_MAX_LENGTH),
    needs_base=False,
    base="config",
    calibration=FISHER,
    family="data-aware",
    guidance="Each model runs once on its calibration text (a registered source such as a demo task, or "
             "a text/JSONL file); the statistics are cached, so repeating the merge is fast.",
    suggested={"weight": 1.0},
))
def fisher(base, tensors, per_model, params, seed, stats):
    """θ = Σ wᵢ F̃ᵢ θᵢ / Σ wᵢ F̃ᵢ with F̃ᵢ = max(Fᵢ / ‖Fᵢ‖ (if normalized), floor).

    ``stats``: per model, ``(Fisher tensor or None, global norm)``. A tensor some model has no
    Fisher for (not a trained parameter) takes the weighted average.
    """
    weights = [p["weight"] for p in per_model]
    if not stats or sum(weights) <= 0 or any(entry is None or entry[0] is None for entry in stats):
        return weighted_mean(tensors, weights)
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

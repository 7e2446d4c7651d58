"""Simple (weighted) averaging, "model soups" (Wortsman et al., 2022)."""

from __future__ import annotations

import torch

from merging.methods.spec import NORMALIZE, WEIGHT, MethodSpec, register


@register(MethodSpec(
    name="linear",
    title="Simple Averaging (linear)",
    paper="https://arxiv.org/abs/2203.05482",
    summary="θ = Σ wᵢθᵢ / Σ wᵢ; a base_model, if given, is averaged in like any other model.",
    params=(WEIGHT, NORMALIZE),
    needs_base=False,
    base_is_input=True,
))
def linear(base, tensors, per_model, params, seed):
    """θ = Σ wᵢθᵢ, divided by Σ wᵢ when ``normalize`` (a sum of ~0 is left undivided)."""
    weights = [p["weight"] for p in per_model]
    merged = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights):
        merged.add_(tensor, alpha=weight)
    total = sum(weights)
    if params["normalize"] and abs(total) >= 1e-8:
        merged /= total
    return merged

"""Simple (weighted) averaging, "model soups" (Wortsman et al., 2022)."""

from __future__ import annotations

import torch

from merging.methods.sparsify import chunks
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
    total = sum(weights)
    scale = 1.0 / total if params["normalize"] and abs(total) >= 1e-8 else 1.0
    flat = [t.reshape(-1) for t in tensors]
    out = torch.zeros(flat[0].numel(), dtype=torch.float32, device=flat[0].device)
    for part in chunks(out.numel(), out.device):
        acc = out[part]
        for tensor, weight in zip(flat, weights):
            acc.add_(tensor[part].float(), alpha=weight * scale)
    return out.reshape(tensors[0].shape)

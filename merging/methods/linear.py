"""Simple (weighted) averaging, "model soups" (Wortsman et al., 2022)."""

from __future__ import annotations

from merging.methods.kernels import weighted_sum
from merging.methods.spec import NORMALIZE, WEIGHT, MethodSpec, register


@register(MethodSpec(
    name="linear",
    title="Simple Averaging (linear)",
    paper="https://arxiv.org/abs/2203.05482",
    summary="θ = Σ wᵢθᵢ / Σ wᵢ; a base_model, if given, is averaged in like any other model.",
    params=(WEIGHT, NORMALIZE),
    needs_base=False,
    base="input",
    family="interpolation",
    guidance="Weights are relative (normalize divides by their sum). A base model that is not listed "
             "under models is averaged in like the others, as in mergekit.",
    # mergekit requires a weight; equal weights, written out, are the plain mean
    suggested={"weight": 1.0},
))
def linear(base, tensors, per_model, params, seed):
    """θ = Σ wᵢθᵢ, divided by Σ wᵢ when ``normalize`` (a sum of ~0 is left undivided)."""
    weights = [p["weight"] for p in per_model]
    total = sum(weights)
    scale = 1.0 / total if params["normalize"] and abs(total) >= 1e-8 else 1.0
    return weighted_sum(tensors, [w * scale for w in weights])

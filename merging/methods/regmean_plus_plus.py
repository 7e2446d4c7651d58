"""RegMean++ (Nguyen et al., 2025): RegMean whose statistics for a layer come from inputs that
flowed through the already merged earlier layers (``merging.propagation``)."""

from __future__ import annotations

from merging.calibration import PROPAGATED_GRAMS
from merging.methods.regmean import REDUCE_NON_DIAGONAL, regmean
from merging.methods.spec import CALIBRATION_MAX_LENGTH, CALIBRATION_SAMPLES, DATA_WEIGHT, MethodSpec, register


@register(MethodSpec(
    name="regmean_plus_plus",
    title="RegMean++ (regression mean through the merged layers)",
    paper="https://arxiv.org/abs/2508.03121",
    summary="RegMean merged layer by layer: layer l's Grams Gᵢ = XᵢᵀXᵢ come from model i's text "
            "run through the merged layers 0..l−1, then W* = (Σ wᵢG̃ᵢ)⁻¹ Σ wᵢG̃ᵢWᵢᵀ.",
    params=(DATA_WEIGHT, REDUCE_NON_DIAGONAL, CALIBRATION_SAMPLES, CALIBRATION_MAX_LENGTH),
    needs_base=False,
    base="config",
    calibration=PROPAGATED_GRAMS,
    family="data-aware",
    guidance="All models calibrate together, layer by layer (about four times RegMean's forward passes, "
             "one model in memory). The paper keeps RegMean's α; 1 is the exact least-squares merge.",
    suggested={"weight": 1.0},
))
def regmean_plus_plus(base, tensors, per_model, params, seed, stats):
    """RegMean's solve (``merging.methods.regmean.regmean``) on the propagated Grams: for each
    linear weight W*ᵀ = (Σ wᵢG̃ᵢ + εI)⁻¹ (Σ wᵢG̃ᵢWᵢᵀ + εW̄ᵀ); other tensors the weighted mean."""
    return regmean(base, tensors, per_model, params, seed, stats)

"""Passthrough: one model's tensors, unchanged or scaled (mergekit ``merge_methods/passthrough.py``).

mergekit uses it mostly with ``slices:`` to stack layers of several models ("frankenmerges"),
one source per slice; on a plain ``models:`` recipe it copies the single model, optionally
scaling chosen tensors (``scale: [{filter: o_proj, value: 0.5}, {value: 1}]``).

Input contract, as mergekit's: at most one model per tensor, and the base_model plays no part
(mergekit ignores it), but a ``base_model`` that is not the listed model is added to the inputs
(``models:`` recipes append an unlisted base, as for linear), making two models: refused.
"""

from __future__ import annotations

import torch

from merging.methods.spec import MethodSpec, Param, register

SCALE = Param(
    "scale", float, 1.0, "model",
    "Factor the model's tensor is multiplied by (1 copies it). Usually given with a filter, "
    "e.g. [{filter: o_proj, value: 0.5}, {value: 1}]. mergekit's default (none) is the same as 1.",
)


@register(MethodSpec(
    name="passthrough",
    title="Passthrough",
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#passthrough-passthrough",
    summary="θ = scale · θ₁: one model's tensors copied, optionally scaled per tensor.",
    params=(SCALE,),
    needs_base=False,
    base="input",
    min_models=1,
    max_models=1,
    inputs_help="exactly one model (a base_model, if given, must be that model)",
    family="other",
    guidance="Copies a single model; a scale below 1 on chosen tensors (e.g. attention o_proj and MLP "
             "down_proj of stacked layers) damps what they add to the residual stream.",
))
def passthrough(base, tensors, per_model, params, seed):
    """θ = s·θ₁, s the model's ``scale`` for this tensor (mergekit: θ₁ itself when no scale is set)."""
    (theta,) = tensors
    out = theta.to(torch.float32, copy=True)  # never the input itself: it must not be modified
    scale = per_model[0]["scale"]
    if scale != 1.0:  # x·1 = x exactly, so skipping it changes nothing
        out.mul_(scale)
    return out

"""NearSwap: take the other model's value where it is already near the base's (mergekit 0.1.5).

From alchemonaut's QuartetAnemoi merges (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001):
per entry, the closer the other model is to the base, the more of it is taken; entries that
moved far from the base keep the base's value. ``t`` is the distance below which the other
model's value is taken whole.
"""

from __future__ import annotations

import torch

from merging.methods.kernels import chunks
from merging.methods.spec import REQUIRED, MethodSpec, Param, register

MIN_DISTANCE = 1e-6  # |base − other| is floored here before dividing (mergekit)

T = Param(
    "t", float, REQUIRED, "global",
    "Similarity threshold: entries within t of the base take the other model's value; farther "
    "entries take a fraction t/|base − other| of the way to it. 0 gives the base. Typical 1e-4 for "
    "16-bit weights. A list gives a gradient over layers.",
    low=0.0, search=(1e-5, 1e-2), search_log=True,
)


@register(MethodSpec(
    name="nearswap",
    title="NearSwap",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    summary="θ = θ_base + w·(θ₁ − θ_base) per entry, w = clamp(t / |θ₁ − θ_base|, 0, 1).",
    params=(T,),
    needs_base=True,
    base="origin",
    min_models=1,
    max_models=1,
    inputs_help="exactly two models: the base_model and one other model",
    family="interpolation",
    guidance="Keeps the base where the other model moved far and swaps in the other model where the two "
             "nearly agree. t around 1e-4 (the QuartetAnemoi merges); larger t takes more of the other "
             "model.",
    suggested={"t": 1e-4},
))
def nearswap(base, tensors, per_model, params, seed):
    """θ = w·θ₁ + (1 − w)·θ_base, w = clamp(t / max(|θ_base − θ₁|, 1e-6), 0, 1), entry by entry.

    Source: mergekit 0.1.5 ``merge_methods/nearswap.py``.
    """
    t = params["t"]
    a, b = base.reshape(-1), tensors[0].reshape(-1)
    out = torch.empty(a.numel(), dtype=torch.float32, device=a.device)
    for part in chunks(a.numel(), a.device):
        x, y = a[part].float(), b[part].float()
        weight = (t / torch.sub(y, x).abs_().clamp_(min=MIN_DISTANCE)).clamp_(0.0, 1.0)
        torch.lerp(x, y, weight, out=out[part])
    return out.reshape(base.shape)

"""Arcee Fusion (mergekit 0.1): keep only the changes of one model that stand out from the rest.

Per tensor, with θ the other model and θ_base the base:

    importance = |θ − θ_base| · KL(softmax(θ) ‖ softmax(θ_base))      (softmax and KL along the last dim)
    threshold  = median + 1.5 · (Q3 − Q1)                            (quantiles of importance over the tensor)
    θ_merged   = θ_base + (θ − θ_base) · [importance ≥ threshold]

Source: mergekit ``merge_methods/arcee_fusion.py`` and its release post
(https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from merging.methods.kernels import BLOCK, GPU_BLOCKS, chunks
from merging.methods.spec import MethodSpec, register

SOFTMAX_FLOOR = 1e-8  # added to both distributions before the log ratio, as mergekit
IQR_FACTOR = 1.5  # Tukey's fence: an importance above median + 1.5·IQR is an outlier, and kept
QUANTILES = (0.25, 0.5, 0.75)
# mergekit takes its quantiles from a random sample of this many entries (with replacement) when a
# tensor is larger; below it they are exact. We are always exact (see ``importance_quantiles``).
MERGEKIT_QUANTILE_SAMPLE = 1_000_000


@register(MethodSpec(
    name="arcee_fusion",
    title="Arcee Fusion",
    paper="https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
    summary="θ = θ_base + (θ₁ − θ_base)·[|θ₁ − θ_base|·KL(softmax θ₁ ‖ softmax θ_base) ≥ median + 1.5·IQR].",
    params=(),
    needs_base=True,
    base="origin",
    min_models=1,
    max_models=1,
    inputs_help="exactly two models: the base_model and one other model",
    family="task vectors",
    guidance="Takes the base and exactly one other model and has no parameters: only the other model's "
             "outlying changes (importance above median + 1.5·IQR, per tensor) are applied to the base.",
))
def arcee_fusion(base, tensors, per_model, params, seed):
    """θ_base + (θ − θ_base)·m, m = [importance ≥ median + 1.5·(Q3 − Q1)] over the tensor.

    One chunked pass computes the importance (kept whole: the quantiles need all of it), a
    second writes the output. Every step is the same float32 operation as mergekit's, so the
    masks agree entry for entry.
    """
    (theta,) = tensors
    score = importance(theta, base)
    q1, median, q3 = importance_quantiles(score)
    threshold = median + IQR_FACTOR * (q3 - q1)  # float32 arithmetic on 0-d tensors, as mergekit
    flat_base, flat_theta, flat_score = base.reshape(-1), theta.reshape(-1), score.reshape(-1)
    out = torch.empty(flat_base.numel(), dtype=torch.float32, device=flat_base.device)
    for part in chunks(out.numel(), out.device):
        b = flat_base[part].float()
        keep = torch.ge(flat_score[part], threshold, out=torch.empty_like(b))
        torch.add(b, (flat_theta[part].float() - b).mul_(keep), out=out[part])
    return out.reshape(base.shape)


def importance(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ − θ_base| · KL(p ‖ q), p = softmax(θ) + 1e-8, q = softmax(θ_base) + 1e-8 along the last
    dim (one KL per row, broadcast over the row), in float32 and the input's shape.

    Rows are independent, so the tensor is processed a few rows at a time (about ``BLOCK``
    entries per chunk): scratch memory stays small and the result is bit-identical to one call
    over the whole tensor. A 0-d or 1-D tensor is a single row.
    """
    width = theta.shape[-1] if theta.dim() else 1
    rows_theta, rows_base = theta.reshape(-1, width), base.reshape(-1, width)
    score = torch.empty(rows_theta.shape, dtype=torch.float32, device=theta.device)
    for rows in _row_chunks(rows_theta.shape[0], width, theta.device):
        x, b = rows_theta[rows].float(), rows_base[rows].float()
        p = F.softmax(x, dim=-1) + SOFTMAX_FLOOR
        q = F.softmax(b, dim=-1) + SOFTMAX_FLOOR
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        torch.mul((x - b).abs_(), kl, out=score[rows])
    return score.reshape(theta.shape)


def importance_quantiles(score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q1, median and Q3 of ``score`` as mergekit indexes them: the sorted value at position
    ⌊q·(n − 1)⌋ (no interpolation), each a 0-d float32 tensor.

    Exact at every size, by ``kthvalue`` (a selection, O(n), deterministic). mergekit is exact up
    to 1M entries and above that takes the quantiles of 1M entries drawn at random (with
    replacement, unseeded), so on large tensors its threshold varies from run to run by the
    sampling error (a standard error of ~0.05 percentile points) around the exact value we
    take. A deliberate difference: the same recipe always gives the same merge, and the cost
    is three O(n) selections instead of one sort of 1M entries.
    """
    flat = score.reshape(-1)
    last = flat.numel() - 1
    positions = (last // 4, last // 2, 3 * last // 4)  # ⌊q·(n−1)⌋ for q = 1/4, 1/2, 3/4, in integers
    q1, median, q3 = (torch.kthvalue(flat, position + 1).values for position in positions)
    return q1, median, q3


def _row_chunks(rows: int, width: int, device: torch.device) -> Iterator[slice]:
    entries = BLOCK * (GPU_BLOCKS if device.type == "cuda" else 1)
    step = max(1, entries // max(1, width))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))

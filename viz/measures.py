"""Measures of one task-vector tensor: pure functions over the tensors of one parameter.

A task vector is δ = θ_ft − θ_base (Ilharco et al., https://arxiv.org/abs/2212.04089). Every
function here sees one parameter tensor at a time, chunk by chunk (``sparsify.chunks``), in
float32. Masks and counts use float arithmetic and ``count_nonzero`` rather than boolean
masks or ``where``: torch's boolean paths are 10-20x slower per element on a CPU. The one
boolean step left, collecting the candidates for the top magnitudes, touches each entry once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.methods.kernels import TaskVector

TOP_FRACTIONS = (0.01, 0.05, 0.10, 0.20)
"""The k% of entries whose share of ‖δ‖² is reported (and TIES's usual densities)."""
QUANTILES = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)
"""Quantiles of |δ| reported: 0.8 and up are exact order statistics, 0.5 is sampled (below)."""
SAMPLE = 1 << 15  # entries sampled per tensor (all of them when the tensor is smaller)
POOL = 1 << 12  # of those, how many go into a layer's or the model's pooled sample
_BAND = 0.01  # margin, in quantile, below the largest top fraction when collecting candidates
_SEED = 20240611  # fixed: the same sample positions for every model, so runs are reproducible


def top_count(fraction: float, numel: int) -> int:
    """k = max(1, int(fraction·n)): how many entries a top fraction holds (TIES's own count)."""
    return max(1, int(fraction * numel))


def sample_positions(numel: int, device: torch.device) -> torch.Tensor | None:
    """SAMPLE uniform random positions (fixed seed, with replacement), or None: take every entry.

    Random rather than strided: a stride that is a multiple of a row length would sample a few
    columns only (a 49152×576 embedding with stride 864 hits two columns).
    """
    if numel <= SAMPLE:
        return None
    generator = torch.Generator().manual_seed(_SEED + numel)
    return torch.randint(numel, (SAMPLE,), generator=generator).to(device)


@dataclass
class MagnitudeProfile:
    """How the magnitudes |δ| of one task-vector tensor are spread.

    ``top_values[f]`` is the k-th largest |δ| and ``top_energy[f]`` = Σ of the k largest δ²,
    k = top_count(f, n), both exact (so ``top_energy[0.2] / sumsq`` is exactly the share of
    the delta's energy that TIES trimming at density 0.2 keeps). ``median`` comes from a uniform
    sample of SAMPLE entries (exact for smaller tensors; otherwise its standard error is
    about 0.3 percentile points). ``sample`` holds up to POOL sampled |δ|, each standing for
    numel / len(sample) entries, for the quantiles and histograms of layers and the model.
    """

    numel: int
    sumsq: float
    abs_sum: float
    nonzero: int
    maximum: float
    median: float
    top_values: dict[float, float]
    top_energy: dict[float, float]
    sample: torch.Tensor

    @staticmethod
    def zero(numel: int) -> MagnitudeProfile:
        """The profile of a task vector that is exactly 0 (the tensor was not fine-tuned)."""
        zeros = {f: 0.0 for f in TOP_FRACTIONS}
        return MagnitudeProfile(numel, 0.0, 0.0, 0, 0.0, 0.0, zeros, dict(zeros), torch.zeros(min(numel, POOL)))

    def quantile(self, q: float) -> float:
        """|δ| at quantile q: the median (sampled), or the k-th largest with k = top_count(1 − q, n)."""
        if q >= 1.0:
            return self.maximum
        if q < 1.0 - max(TOP_FRACTIONS):
            return self.median
        return self.top_values[round(1.0 - q, 10)]


class MagnitudeProfiler:
    """Builds a MagnitudeProfile in one pass over the chunks of δ, fed in any order.

    The k-th largest |δ| for every top fraction comes from candidates: a uniform sample puts a
    lower bound below the largest fraction's threshold (with a margin of _BAND in quantile,
    over 4 standard errors), the pass keeps every entry above it (about a fifth of the
    entries), and exact ``kthvalue`` calls on the shrinking candidate pool finish the job.
    If the bound misses (rare; heavy ties) a second pass takes every entry.
    """

    def __init__(self, delta: TaskVector, positions: torch.Tensor | None):
        self.delta = delta
        n = delta.numel
        if positions is None:
            sample = delta.chunk(slice(0, n)).abs_()
        else:
            sample = (delta.model[positions].float() - delta.base[positions].float()).abs_()
        self.median = _order_statistic(sample, (sample.numel() + 1) // 2)
        if positions is not None or n <= POOL:  # positions are i.i.d. uniform: their first POOL too
            self.pool = sample[:POOL].cpu()
        else:
            generator = torch.Generator().manual_seed(_SEED + n)
            self.pool = sample[torch.randint(n, (POOL,), generator=generator).to(sample.device)].cpu()
        self.needed = top_count(max(TOP_FRACTIONS), n)
        q_low = 1.0 - max(TOP_FRACTIONS) - _BAND
        self.low = 0.0 if positions is None else _order_statistic(sample, int(q_low * (sample.numel() - 1)) + 1)
        self.sumsq = self.abs_sum = 0.0
        self.nonzero = 0
        self.candidates: list[torch.Tensor] = []

    def add(self, chunk: torch.Tensor) -> None:
        """Account for one chunk of δ (float32; it is not modified)."""
        magnitude = chunk.abs()
        self.sumsq += magnitude.square().sum().item()  # torch's cascaded sum: BLAS dot loses ~1e-5 here
        self.abs_sum += magnitude.sum().item()
        self.nonzero += int(torch.count_nonzero(magnitude))
        self.candidates.append(magnitude if self.low <= 0 else magnitude[magnitude >= self.low])

    def finish(self) -> MagnitudeProfile:
        n = self.delta.numel
        pool = torch.cat(self.candidates) if self.candidates else torch.zeros(0)
        self.candidates = []
        if pool.numel() < self.needed:  # the sampled bound was too high: take every entry
            pool = torch.cat([chunk.abs_() for _, chunk in self.delta.chunks()])
        values, energy = top_order_statistics(pool, {f: top_count(f, n) for f in TOP_FRACTIONS})
        maximum = pool.max().item() if pool.numel() else 0.0
        return MagnitudeProfile(n, self.sumsq, self.abs_sum, self.nonzero, maximum, self.median, values, energy, self.pool)


def _order_statistic(values: torch.Tensor, position: int) -> float:
    """The position-th smallest value (1-based), or 0 for an empty tensor."""
    return torch.kthvalue(values, position).values.item() if values.numel() else 0.0


def top_order_statistics(pool: torch.Tensor, counts: dict[float, int]) -> tuple[dict[float, float], dict[float, float]]:
    """For each key f with count k: the k-th largest value of ``pool`` and the sum of squares
    of the k largest, exactly (ties at the k-th value counted once each, up to k).

    ``pool`` (non-negative) must hold every entry at least as large as the k-th largest of the
    whole tensor for the largest k. Counts are taken largest first, and the pool shrinks to the
    entries ≥ each k-th value, so the work is about one ``kthvalue`` over the pool.
    Energy of the top k = Σ_{v ≥ v_k} v² − (#{v ≥ v_k} − k)·v_k².
    """
    values, energy = {}, {}
    for fraction, k in sorted(counts.items(), key=lambda item: -item[1]):
        k = min(k, pool.numel())
        if k == 0:
            values[fraction] = energy[fraction] = 0.0
            continue
        kth = torch.kthvalue(pool, pool.numel() - k + 1).values
        pool = pool[pool >= kth]
        v = kth.item()
        values[fraction] = v
        # float64: the pool can hold millions of entries
        energy[fraction] = max(0.0, pool.double().square().sum().item() - (pool.numel() - k) * v * v)
    return values, energy


def sign_conflict_counts(deltas: list[torch.Tensor]) -> tuple[int, int]:
    """(conflicting, eligible) entries of same-shaped task-vector chunks of several models.

    With sᵢ = sign(δᵢ) ∈ {−1, 0, 1}, N = Σ sᵢ² (models with a non-zero delta) and S = Σ sᵢ:
    an entry is eligible when N ≥ 2, and conflicting when both signs occur among its non-zero
    deltas, i.e. N − |S| = 2·min(#positive, #negative) > 0 (TIES's interference).
    """
    signs = torch.sign(deltas[0])
    nonzero = signs * signs
    for delta in deltas[1:]:
        sign = torch.sign(delta)
        signs += sign
        nonzero += sign.mul_(sign)
    conflicts = int(torch.count_nonzero(nonzero - signs.abs_()))
    eligible = int(torch.count_nonzero(nonzero.sub_(1).clamp_(min=0)))
    return conflicts, eligible


def weighted_quantiles(values: torch.Tensor, weights: torch.Tensor, qs: tuple[float, ...]) -> dict[float, float]:
    """Quantiles of a weighted sample: the smallest value whose cumulative weight reaches q·total."""
    if values.numel() == 0:
        return {q: 0.0 for q in qs}
    order = values.argsort()
    ordered, cumulative = values[order], weights[order].double().cumsum(0)
    total = cumulative[-1].item()
    out = {}
    for q in qs:
        index = int(torch.searchsorted(cumulative, torch.tensor([q * total], dtype=torch.float64)).item())
        out[q] = ordered[min(index, ordered.numel() - 1)].item()
    return out

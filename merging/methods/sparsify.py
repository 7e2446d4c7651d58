"""The shared steps of the task-arithmetic family, each a small pure tensor function.

TIES, DARE, Breadcrumbs and their combinations are compositions of these:
``task vector -> sparsify (trim or drop) -> rescale -> weight -> sign election -> disjoint merge``.
Everything here works on one parameter tensor at a time (never on the whole model), like
mergekit and PEFT; the original TIES code trimmed over the whole flattened model.
"""

from __future__ import annotations

import torch

_SAMPLE = 1 << 16  # entries sampled to bracket a k-th largest magnitude
_BAND = 0.01  # half-width, in quantile, of the bracket around the target


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor (1 <= k <= numel), exactly.

    A full sort (mergekit's ``argsort``) costs O(n log n) and dominates TIES on a CPU. Instead a
    fixed, evenly strided sample brackets the target quantile, entries outside the bracket are
    only counted, and the exact order statistic is taken among the few inside it. When the
    bracket misses (heavy ties, tiny tensors) it falls back to ``torch.kthvalue`` on everything.
    """
    n = values.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(values, n - k + 1).values
    sample = values[:: n // _SAMPLE]
    q = 1.0 - k / n
    bounds = torch.tensor([max(0.0, q - _BAND), min(1.0, q + _BAND)], device=values.device)
    low, high = torch.quantile(sample, bounds)
    above = int(torch.count_nonzero(values > high))
    band = values[(values >= low) & (values <= high)]
    rank = k - above  # rank of the target inside the band, counted from the top
    if 0 < rank <= band.numel():
        return torch.kthvalue(band, band.numel() - rank + 1).values
    return torch.kthvalue(values, n - k + 1).values


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES "trim": keep the top ``density`` fraction of entries by |delta|.

    k = max(1, int(density * numel)) as in mergekit. Entries tied with the k-th magnitude are
    all kept (mergekit's argsort keeps an arbitrary subset of them); with float weights ties
    are rare and only ever involve equal values.
    """
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    magnitude = delta.abs()
    k = max(1, int(density * delta.numel()))
    return magnitude >= kth_largest(magnitude.reshape(-1), k)


def outlier_magnitude_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction, then the smallest, keeping ``density``.

    Counts follow mergekit: keep = int(density*n), top = int(gamma*n) and the bottom
    n - keep - top entries go (fewer outliers are dropped when density + gamma > 1).
    """
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    keep = int(density * n)
    if keep == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    top = n - keep - max(0, n - keep - int(gamma * n))  # outliers actually dropped
    magnitude = delta.abs()
    flat = magnitude.reshape(-1)
    upper = kth_largest(flat, top + 1)
    lower = kth_largest(flat, top + keep)
    return (magnitude >= lower) & (magnitude <= upper)


def random_mask(shape: torch.Size, density: float, seed: int, device: torch.device | str) -> torch.Tensor:
    """DARE "drop": keep each entry independently with probability ``density`` (= 1 - drop rate).

    Drawn on the CPU from a generator seeded by ``seed``, so the mask is the same on every device.
    """
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) < density).to(device)


def rescale_kept(delta: torch.Tensor, kept: torch.Tensor, density: float, mode: str) -> torch.Tensor:
    """Apply a keep-mask to a delta and rescale what survives.

    ``density``: divide by the keep probability, DARE's unbiased estimator δ̃ = m⊙δ / (1-p).
    ``l1``: scale so the masked delta has the original's L1 norm (mergekit since Feb 2025),
    skipped when either norm is below 1e-7. ``none``: no rescaling.
    """
    masked = delta * kept
    if mode == "none" or density >= 1.0:
        return masked
    if mode == "density":
        return masked / density
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def elect_sign(weighted_deltas: list[torch.Tensor]) -> torch.Tensor:
    """TIES sign election: the sign of Σᵢ wᵢδᵢ per entry, with 0 counted as +1 (as mergekit).

    Because the weights are applied before the vote, a heavier model pulls the vote its way.
    """
    total = torch.stack(weighted_deltas).sum(dim=0) if len(weighted_deltas) > 1 else weighted_deltas[0]
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def disjoint_merge(
    weighted_deltas: list[torch.Tensor], weights: list[float], elected: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """TIES disjoint merge: sum the entries that agree with the elected sign.

    With ``normalize`` the sum is divided by the total weight of the agreeing models per entry
    (a weighted disjoint mean; entries where none agree keep 0). Pruned entries are 0 and have
    no sign, so they never count as agreeing.
    """
    merged = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected) if normalize else None
    for delta, weight in zip(weighted_deltas, weights):
        agrees = torch.sign(delta) == elected
        merged += delta * agrees
        if divisor is not None:
            divisor += weight * agrees
    if divisor is not None:
        merged /= torch.where(divisor == 0, 1.0, divisor)
    return merged

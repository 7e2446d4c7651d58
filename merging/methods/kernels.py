"""The kernels merge methods share, each small and composable.

TIES, DARE, Breadcrumbs and their combinations are compositions of these:
``task vector -> sparsify (trim or drop) -> rescale -> weight -> sign election -> disjoint merge``;
averaging methods use ``weighted_sum``. Everything works on one parameter tensor at a time
(never the whole model), like mergekit and PEFT; the original TIES code trimmed over the whole
flattened model.

Two implementation choices keep this fast and lean on a CPU:

- Tensors are processed in chunks of ``BLOCK`` entries: every elementwise step of a chunk runs
  in cache, scratch memory stays a few MB whatever the tensor's size, and inputs stay in their
  stored dtype (bf16 is widened to float32 one chunk at a time). Steps that need the whole
  tensor (a magnitude threshold, an L1 norm) make one extra chunked pass first.
- Masks are float tensors of 0 and 1 made by comparisons written straight into float outputs:
  boolean tensors, ``where`` and mixed-dtype arithmetic take torch's slow paths (10-20x slower
  per element than float arithmetic here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

BLOCK = 1 << 18  # entries per chunk on a CPU (1 MB of float32, cache-sized); also the random-mask block
GPU_BLOCKS = 256  # a GPU takes 256 blocks per chunk: fewer, larger kernels
_SAMPLE = 1 << 15  # entries sampled to bracket a k-th largest magnitude
_BAND = 0.01  # half-width, in quantile, of that bracket (>3.5 standard errors of the sample quantile)
_RANDOM_BITS = 15  # DARE keep probability resolution: density is used as round(density * 2^15) / 2^15

Keep = Callable[[slice, torch.Tensor], torch.Tensor]
"""keep(chunk_slice, delta_chunk) -> float mask, 1.0 for entries that survive sparsification."""


def chunks(numel: int, device: torch.device) -> Iterator[slice]:
    """Chunk slices over a flat tensor; chunk starts are always multiples of BLOCK."""
    step = BLOCK * (GPU_BLOCKS if device.type == "cuda" else 1)
    for start in range(0, numel, step):
        yield slice(start, min(numel, start + step))


def weighted_sum(tensors: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """Σ cᵢxᵢ in float32, chunk by chunk (inputs stay in their stored dtype): the one averaging
    kernel (a weighted mean is ``coefficients = wᵢ / Σ wⱼ``)."""
    flat = [t.reshape(-1) for t in tensors]
    out = torch.zeros(flat[0].numel(), dtype=torch.float32, device=flat[0].device)
    for part in chunks(out.numel(), out.device):
        acc = out[part]
        for tensor, coefficient in zip(flat, coefficients):
            acc.add_(tensor[part].float(), alpha=coefficient)
    return out.reshape(tensors[0].shape)


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ wᵢxᵢ / Σ wᵢ for non-negative weights (all zero: the plain mean)."""
    total = sum(weights)
    if total <= 0:
        return weighted_sum(tensors, [1.0 / len(tensors)] * len(tensors))
    return weighted_sum(tensors, [w / total for w in weights])


def mask_like(chunk: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(chunk, value)


@dataclass(frozen=True)
class TaskVector:
    """δ = θ − θ_base of one tensor, computed on demand in float32, chunk by chunk."""

    model: torch.Tensor
    base: torch.Tensor
    shape: tuple[int, ...] = field(init=False)  # the tensor's own shape (DELLA ranks within its rows)

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.base.shape))
        object.__setattr__(self, "model", self.model.reshape(-1))
        object.__setattr__(self, "base", self.base.reshape(-1))

    @property
    def numel(self) -> int:
        return self.base.numel()

    def chunk(self, part: slice) -> torch.Tensor:
        return self.model[part].float() - self.base[part].float()

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for part in chunks(self.numel, self.base.device):
            yield part, self.chunk(part)


@dataclass(frozen=True)
class OrderStatistic:
    """The k-th largest |δ| and how many entries lie strictly above it and exactly at it."""

    value: float
    above: int
    ties: int


def kth_largest_magnitude(delta: TaskVector, k: int) -> OrderStatistic:
    """The k-th largest |δ| (1 <= k <= numel), exactly.

    A full sort (mergekit's ``argsort``) costs O(n log n) and dominates TIES on a CPU. Instead a
    fixed, evenly strided sample brackets the target quantile; one chunked pass counts the
    entries above the bracket and keeps the few inside it, and the exact order statistic is
    taken among those. When the bracket misses (heavy ties) it falls back to ``kthvalue`` over
    all magnitudes.
    """
    n = delta.numel
    if n > 4 * _SAMPLE:
        step = n // _SAMPLE
        sample = (delta.model[::step].float() - delta.base[::step].float()).abs_()
        q = 1.0 - k / n
        low = _sample_quantile(sample, max(0.0, q - _BAND))
        high = _sample_quantile(sample, min(1.0, q + _BAND))
        above, band = 0, []
        for _, chunk in delta.chunks():
            magnitude = chunk.abs_()
            above += int(torch.gt(magnitude, high, out=torch.empty_like(magnitude)).sum().item())
            band.append(magnitude[torch.clamp(magnitude, low, high) == magnitude])  # low <= |δ| <= high
        band = torch.cat(band)
        rank = k - above  # the target's rank inside the band, counted from the top
        if 0 < rank <= band.numel():
            return _statistic(band, band.numel() - rank + 1, above)
    return _statistic(torch.cat([chunk.abs_() for _, chunk in delta.chunks()]), n - k + 1, 0)


def _sample_quantile(sample: torch.Tensor, q: float) -> float:
    position = min(sample.numel(), max(1, round(q * (sample.numel() - 1)) + 1))
    return torch.kthvalue(sample, position).values.item()


def _statistic(values: torch.Tensor, position: int, above_values: int) -> OrderStatistic:
    value = torch.kthvalue(values, position).values
    return OrderStatistic(
        value.item(),
        above_values + int(torch.count_nonzero(values > value)),
        int(torch.count_nonzero(values == value)),
    )


def top_k_keep(delta: TaskVector, k: int) -> Keep:
    """Keep exactly the k entries of largest |δ|; among equal magnitudes the earlier ones win.

    mergekit picks the k with ``argsort``, which breaks ties arbitrarily; breaking them by
    position keeps the count exact (bf16 deltas take few distinct values, so ties at the
    threshold are common) and makes the top k nested in the top k+1.
    """
    if k <= 0:
        return lambda part, chunk: mask_like(chunk, 0.0)
    if k >= delta.numel:
        return lambda part, chunk: mask_like(chunk, 1.0)
    stat = kth_largest_magnitude(delta, k)
    threshold, needed = stat.value, k - stat.above  # 1 <= needed <= stat.ties
    if needed == stat.ties:
        return lambda part, chunk: torch.ge(chunk.abs(), threshold, out=torch.empty_like(chunk))
    return _TiesByPosition(threshold, needed)


class _TiesByPosition:
    """Keep |δ| > threshold, plus the first ``needed`` entries with |δ| == threshold.

    Chunks must be visited in order from the start (every pass does so); the count of ties
    seen so far is carried from chunk to chunk and restarts with each pass.
    """

    def __init__(self, threshold: float, needed: int):
        self.threshold, self.needed = threshold, needed
        self.seen = self.next_start = 0

    def __call__(self, part: slice, chunk: torch.Tensor) -> torch.Tensor:
        if part.start == 0:
            self.seen = self.next_start = 0
        if part.start != self.next_start:
            raise RuntimeError("chunks must be visited in order")
        self.next_start = part.stop
        magnitude = chunk.abs()
        if self.seen >= self.needed:
            return torch.gt(magnitude, self.threshold, out=torch.empty_like(chunk))
        mask = torch.ge(magnitude, self.threshold, out=torch.empty_like(chunk))
        ties = int(torch.eq(magnitude, self.threshold, out=torch.empty_like(chunk)).sum().item())
        if self.seen + ties > self.needed:  # the last tie to keep is in this chunk
            positions = (magnitude == self.threshold).nonzero().flatten()
            mask[positions[self.needed - self.seen:]] = 0.0
        self.seen += ties
        return mask


def magnitude_keep(delta: TaskVector, density: float) -> Keep:
    """TIES "trim": keep the top ``density`` fraction of entries by |δ|, k = max(1, int(density·n))."""
    return top_k_keep(delta, max(1, int(density * delta.numel)))


def outlier_keep(delta: TaskVector, density: float, gamma: float) -> Keep:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction, then the smallest, keeping ``density``.

    Counts follow mergekit: keep = int(density·n), and min(int(gamma·n), n − keep) outliers go
    (fewer outliers are dropped when density + gamma > 1). The kept entries are the top
    (outliers + keep) minus the top (outliers).
    """
    n = delta.numel
    keep = int(density * n)
    outliers = min(int(gamma * n), n - keep)
    if keep == 0:
        return top_k_keep(delta, 0)
    kept_with_outliers = top_k_keep(delta, outliers + keep)
    dropped_outliers = top_k_keep(delta, outliers)
    return lambda part, chunk: kept_with_outliers(part, chunk).sub_(dropped_outliers(part, chunk))


def block_seed(seed: int, block: int) -> int:
    """An independent 63-bit seed per random block (splitmix64 of seed and block index)."""
    z = (seed * 0x9E3779B97F4A7C15 + block + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


def _block_draws(numel: int, seed: int, part: slice) -> torch.Tensor:
    """15-bit uniform integers (int16 in [0, 2¹⁵)), one per entry of the BLOCKs ``part`` covers, on the CPU.

    One generator per fixed block of BLOCK entries, seeded from ``seed`` and the block's index,
    so the draws are identical on every device and chunking (chunks start at block
    boundaries). Each 64-bit random word gives four draws (the sign bit of each 16-bit lane
    is dropped).
    """
    pieces = []
    for block in range(part.start // BLOCK, -(-part.stop // BLOCK)):
        size = min(BLOCK, numel - block * BLOCK)
        generator = torch.Generator().manual_seed(block_seed(seed, block))
        words = torch.empty(-(-size // 4), dtype=torch.int64).random_(generator=generator)
        pieces.append(words.view(torch.int16)[:size].bitwise_and_(0x7FFF))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def random_keep(numel: int, density: float, seed: int) -> Keep:
    """DARE "drop": keep each entry independently with probability ``density`` (= 1 − drop rate).

    Masks are drawn on the CPU from ``_block_draws``, so they are identical on every device and
    chunking; an entry is kept when its 15-bit draw is below round(density·2¹⁵), so the keep
    probability is round(density·2¹⁵)/2¹⁵, within 1.6e-5 of density.
    """
    cutoff = max(1, round(density * 2**_RANDOM_BITS))

    def kept(part: slice, chunk: torch.Tensor) -> torch.Tensor:
        draws = _block_draws(numel, seed, part)
        mask = torch.lt(draws, cutoff, out=torch.empty(draws.numel()))
        return mask.to(chunk.device, non_blocking=True)

    return kept


def rank_fraction(magnitude: torch.Tensor) -> torch.Tensor:
    """r / (L − 1) per entry of each row of ``magnitude`` (rows × L), r its 0-based rank by size
    within its row: 0 for the smallest, 1 for the largest (float32).

    Equal magnitudes rank by position (a stable sort; mergekit's ``argsort`` orders them
    arbitrarily). A row of one entry has no spread of ranks and gets 0.5, the middle of the
    schedule (mergekit divides 0 by 0 there and fails).
    """
    rows, length = magnitude.shape
    if length == 1:
        return torch.full_like(magnitude, 0.5, dtype=torch.float32)
    order = torch.argsort(magnitude, dim=1, stable=True)
    positions = torch.arange(length, dtype=torch.float32, device=magnitude.device).div_(length - 1)
    return torch.empty(rows, length, device=magnitude.device).scatter_(1, order, positions.expand(rows, length))


def _row_rank_fractions(delta: TaskVector, length: int):
    """``fraction(part)``: ``rank_fraction`` of the chunk's entries within their rows of ``length``.

    The ranks are sorted once, on first use, for the whole tensor (a block of rows at a time)
    and kept as int16 (int32 for rows longer than 32767): DELLA reads them in two passes (the L1
    rescale, then the merge), and the row sorts were 20 of a 170M-parameter merge's 34 s when
    each pass sorted them again.
    """
    rows = delta.numel // length
    positions = torch.arange(length, dtype=torch.float32, device=delta.base.device).div_(max(1, length - 1))
    ranks: list[torch.Tensor] = []

    def fill() -> torch.Tensor:
        block = max(1, BLOCK // length)
        out = torch.empty(delta.numel, dtype=torch.int16 if length <= 32767 else torch.int32, device=delta.base.device)
        for first in range(0, rows, block):
            last = min(rows, first + block)
            magnitude = delta.chunk(slice(first * length, last * length)).abs_().view(last - first, length)
            order = torch.argsort(magnitude, dim=1, stable=True)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=order.device).expand_as(order))
            out[first * length:last * length] = rank.view(-1)
        return out

    def fraction(part: slice) -> torch.Tensor:
        if length == 1:
            return torch.full((part.stop - part.start,), 0.5, dtype=torch.float32, device=delta.base.device)
        if not ranks:
            ranks.append(fill())
        return positions[ranks[0][part].long()]

    return fraction


def magprune_keep(delta: TaskVector, density: float, epsilon: float, seed: int, *, divide: bool = False) -> Keep:
    """DELLA MagPrune: keep each entry with a probability that grows with its magnitude's rank.

    pᵢ = (density − ε) + 2ε · rᵢ/(L − 1), rᵢ the rank of |δᵢ| within its row of L entries
    (mergekit ranks along dim 1: the rows of a matrix, the whole of a vector); the kept
    fraction stays ≈ density on average. With ``divide`` every survivor is divided by its own
    pᵢ (the paper's rescale, δ̃ᵢ = mᵢδᵢ/pᵢ, unbiased); otherwise the mask is 0/1. The random
    draws are ``random_keep``'s (same seed: same draws), so with ε = 0 this keeps exactly
    DARE's entries. Deep et al., 2024, https://arxiv.org/abs/2406.11617; mergekit
    ``sparsify.della_magprune``.

    Ranks are computed per chunk for the rows the chunk touches (one sort of those rows),
    except for tensors of 3 or more dimensions, whose dim-1 "rows" are strided: their rank
    fractions are computed once for the whole tensor.
    """
    shape, numel = delta.shape, delta.numel
    low, spread = density - epsilon, 2 * epsilon
    if len(shape) >= 3:
        magnitude = delta.chunk(slice(0, numel)).abs_().view(shape).movedim(1, -1)
        whole = rank_fraction(magnitude.reshape(-1, shape[1])).view(magnitude.shape).movedim(-1, 1).reshape(-1)
        fraction = lambda part: whole[part]
    else:
        fraction = _row_rank_fractions(delta, shape[-1] if len(shape) == 2 else numel)

    def kept(part: slice, chunk: torch.Tensor) -> torch.Tensor:
        draws = _block_draws(numel, seed, part).to(chunk.device, non_blocking=True).to(torch.float32)
        if spread == 0:  # no ranks to sort; DARE's cutoff round(density·2¹⁵) exactly
            mask = torch.lt(draws, max(1, round(low * 2**_RANDOM_BITS)), out=torch.empty_like(chunk))
            return mask.div_(low) if divide else mask
        probability = fraction(part).mul(spread).add_(low)  # not in place: a 3-d tensor's fractions are kept
        cutoff = probability.mul(2**_RANDOM_BITS).round_().clamp_(min=1)
        mask = torch.lt(draws, cutoff, out=torch.empty_like(chunk))
        return mask.div_(probability) if divide else mask

    return kept


def rescale_factor(delta: TaskVector, keep: Keep, density: float, mode: str) -> float:
    """The factor applied to the survivors of sparsification.

    ``density``: 1/density, DARE's unbiased estimator δ̃ = m⊙δ / (1 − p).
    ``l1``: ‖δ‖₁ / ‖m⊙δ‖₁, restoring the L1 norm (mergekit since Feb 2025); 1 when either norm
    is below 1e-7. ``none``: 1.
    """
    if mode == "none":
        return 1.0
    if mode == "density":
        return 1.0 / density
    before = after = 0.0
    for part, chunk in delta.chunks():
        mask = keep(part, chunk)
        magnitude = chunk.abs_()
        before += magnitude.sum().item()
        after += magnitude.mul_(mask).sum().item()
    return 1.0 if before < 1e-7 or after < 1e-7 else before / after


def sum_merge(weighted: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """Σ wᵢδᵢ, divided by Σ wᵢ when ``normalize`` (a total of ~0 is left undivided)."""
    total = weighted[0].clone()
    for delta in weighted[1:]:
        total += delta
    weight_sum = sum(weights)
    if normalize and abs(weight_sum) >= 1e-8:
        total /= weight_sum
    return total


def disjoint_merge(weighted: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """TIES elect + disjoint merge: sum the weighted deltas that agree with the elected sign.

    The elected sign is that of Σᵢ wᵢδᵢ, with 0 counting as + (mergekit's rule; the weights
    vote). Written without materializing signs: the positive and negative parts are summed
    apart and the election picks one (Σ δ⁺ where Σ δ⁺ + Σ δ⁻ >= 0, else Σ δ⁻). With
    ``normalize`` the sum is divided by the total weight of the agreeing models per entry (a
    total of 0 becomes 1). Pruned entries are 0 and have no sign, so they never agree.
    """
    positive = torch.zeros_like(weighted[0])
    negative = torch.zeros_like(weighted[0])
    for delta in weighted:
        positive += delta.clamp(min=0)
        negative += delta.clamp(max=0)
    elected_positive = torch.ge(positive + negative, 0, out=torch.empty_like(positive))
    # exactly Σ δ⁺ or Σ δ⁻: one of the two products is 0, so no rounding is introduced
    merged = positive.mul_(elected_positive).add_(negative.mul_(1 - elected_positive))
    if normalize:
        elected_sign = elected_positive.mul_(2).sub_(1)
        divisor = torch.zeros_like(merged)
        for delta, weight in zip(weighted, weights):
            agrees = torch.sign(delta).mul_(elected_sign).clamp_(min=0)
            divisor.add_(agrees, alpha=weight)
        divisor += torch.eq(divisor, 0, out=torch.empty_like(divisor))
        merged /= divisor
    return merged


# -- matrices: the subspace methods (Iso-C, Iso-CTS, TSV-M, WUDI) ------------------------------

def mean_task_vector(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], lam: float) -> torch.Tensor:
    """θ_base + λ·Σ wᵢδᵢ / Σ wᵢ (float32): what the subspace methods give a tensor that is not a
    matrix (norms, biases), where singular vectors mean nothing. Weights summing to ~0 are used
    unnormalized."""
    total = sum(weights)
    scale = lam / total if abs(total) >= 1e-8 else lam
    return weighted_sum([base, *tensors], [1.0 - scale * sum(weights), *[scale * w for w in weights]])


def task_matrix(base: torch.Tensor, tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """δ = θ − θ_base of a matrix, in ``dtype`` (float32, or float64 where conditioning demands)."""
    return tensor.to(dtype) - base.to(dtype)


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vᴴ) of the thin SVD, on the matrix's device and in its dtype."""
    return torch.linalg.svd(matrix, full_matrices=False)


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, ...]) -> int:
    """How many singular values are above rounding: s > max(m, n)·ε·s_max (NumPy's ``matrix_rank``
    tolerance, ε of the values' dtype). A sum of LoRA task vectors has rank ≤ Σ rᵢ however wide."""
    if singular_values.numel() == 0 or float(singular_values.max()) == 0.0:
        return 0
    tolerance = max(shape) * torch.finfo(singular_values.dtype).eps * float(singular_values.max())
    return int((singular_values > tolerance).sum())

"""Singular values of task matrices: spectra, effective rank, and the overlap of task subspaces.

For one 2-D weight matrix with task matrices δᵢ = θᵢ − θ_base (m×n, r = min(m, n) singular
values σ₁ ≥ σ₂ ≥ …), for T fine-tuned models:

- the spectrum of each δᵢ, of the plain sum Σδᵢ (task arithmetic) and, given a merged model, of
  its update δ_merged = θ_merged − θ_base;
- how low-rank each is: the share of ‖δ‖²_F = Σⱼσⱼ² held by its top 1/5/10% of singular values
  (TSV-M, Gargiulo et al. 2025, https://arxiv.org/abs/2412.00081: task matrices are low-rank, a
  few singular directions carry a task);
- subspace overlap of tasks i and j: ‖UᵢᵀUⱼ‖²_F / k over their top-k left singular vectors (and
  ‖VᵢᵀVⱼ‖²_F / k, right), the mean squared cosine of the principal angles between the two
  subspaces: 0 when orthogonal, 1 when the same, k/m on average for random k-dimensional
  subspaces of an m-dimensional space. k = ⌊r/T⌋, TSV-M's budget (each task keeps 1/T of the
  rank), capped at both matrices' numerical ranks: a rank-8 LoRA update has 8 directions, and
  its further singular vectors are rounding noise.
- after merging, the same overlap between the merged update's responses to the tasks:
  Ũᵢ = range(δ_merged·Vᵢ), the outputs it gives task i's top input directions, and
  Ṽᵢ = range(δ_mergedᵀ·Uᵢ), the inputs it reads to write task i's top output directions. No merge
  can separate its responses to inputs the tasks share: a near-isometry on the tasks' span (TSV-M's
  orthogonalized factors, Iso-C/CTS's flat spectrum) keeps the angles between them, so the left
  and right overlaps trade places, while a merge that spreads each task over many directions
  (TIES's and DARE's sparsification of low-rank updates) raises both.
- how much of each task the merge keeps in its main directions: Iso-C's subspace alignment ratio
  (Marczak et al. 2025, https://arxiv.org/abs/2502.04959), ‖Π δᵢ‖_F / ‖δᵢ‖_F with Π the projection
  onto the merged update's top K = Σᵢkᵢ left singular vectors (the tasks' budgets together).

Cost (every SVD on the compute device, in float32 unless said): a task matrix is first sketched
with RANGE_RANK random columns (one product, a QR and an SVD of a RANGE_RANK×n matrix). If the
sketch holds all of δ up to rounding (LoRA updates, their sums), its SVD is exact; on the demo
family that is 4-20 ms a matrix instead of 50-300 ms for a full SVD. Otherwise the singular
values come from the eigenvalues of the Gram matrix δδᵀ (or δᵀδ) of the smaller side in float64
(1.5-3x faster than a float32 SVD here, and exact to ~1e-8·σ₁, below float32's rounding floor).
Matrices over FULL_LIMIT entries (vocabulary-sized embeddings) get a randomized SVD of their top
10% of singular values only (4 power iterations; approximate, marked incomplete).
The sum Σδᵢ of sketched tasks is taken from their factors without another pass over m×n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from merging.methods.kernels import chunks, numerical_rank, task_matrix

SV_FRACTIONS = (0.01, 0.05, 0.10)
"""The top fractions of singular values whose share of ‖δ‖²_F is reported."""
RANGE_RANK = 24  # sketch columns: captures any update of rank ≤ ~16 (LoRA's usual 8 or 16) exactly
OVERSAMPLE = 8  # extra columns beyond the rank a sketch must hold
FULL_LIMIT = 1 << 24  # entries (16.8M) above which only the top singular values are computed
POWER_ITERATIONS = 4  # of the randomized SVD of big matrices (Halko et al. 2011: 2-4 suffice)
SPECTRUM_POINTS = 48  # values kept per stored spectrum (JSON size); all of the first HEAD
HEAD = 16
_SEED = 20250204
_EPS = torch.finfo(torch.float32).eps  # the checkpoints' rounding: tolerances use float32's ε


def is_matrix(shape) -> bool:
    """Whether a tensor is a 2-D weight matrix with singular vectors worth the name (not a norm
    vector, not a single row or column)."""
    return len(shape) == 2 and min(shape) >= 2


def top_count(fraction: float, rank: int) -> int:
    """How many singular values a top fraction holds: max(1, int(fraction·r)), as for entries."""
    return max(1, int(fraction * rank))


def rank_tolerance(shape, sigma_max: float) -> float:
    """max(m, n)·ε·σ₁ with float32's ε: singular values below it are rounding (NumPy's matrix_rank
    tolerance; ``merging.methods.kernels.numerical_rank`` uses the same)."""
    return max(shape) * _EPS * sigma_max


def sum_of_squares(matrix: torch.Tensor) -> float:
    """‖X‖²_F summed in float64, chunk by chunk (no float64 copy of the whole matrix)."""
    flat = matrix.reshape(-1)
    return sum(flat[part].double().square().sum().item() for part in chunks(flat.numel(), flat.device))


@dataclass
class Factors:
    """The singular values of one matrix, and its top singular vectors when asked for.

    ``values``: the known singular values, descending (float32, CPU): all r of them, or the top
    ones when the rest are known to be rounding (``complete``), or the approximate top ones of a
    randomized SVD (``complete`` False). ``sumsq``: ‖δ‖²_F exactly. ``U`` (m×k), ``V`` (n×k): the
    top k singular vectors (on the compute device), k ≤ the numerical rank. ``parts``: for a
    sketched matrix, (U·Σ, V) over all sketched columns, so δ = (U·Σ)Vᵀ up to rounding.
    """

    shape: tuple[int, int]
    values: torch.Tensor
    sumsq: float
    complete: bool
    numerical_rank: int | None
    U: torch.Tensor | None = None
    V: torch.Tensor | None = None
    parts: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return min(self.shape)

    @property
    def sigma_max(self) -> float:
        return float(self.values[0]) if self.values.numel() else 0.0

    @staticmethod
    def zero(shape) -> Factors:
        """A matrix that is exactly 0 (the tensor was not fine-tuned)."""
        return Factors(tuple(shape), torch.zeros(0), 0.0, True, 0)

    def top_energy(self, fraction: float) -> float:
        """Σ of the top ``top_count(fraction, r)`` squared singular values (known ones; the rest of a
        complete spectrum are rounding)."""
        values = self.values[:top_count(fraction, self.rank)].double()
        return values.square().sum().item()

    def drop_vectors(self) -> Factors:
        return Factors(self.shape, self.values, self.sumsq, self.complete, self.numerical_rank)


def _random(n: int, q: int, device: torch.device, seed: int) -> torch.Tensor:
    """A fixed n×q Gaussian test matrix (seeded by the shape: the same for every run and model)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, q, generator=generator).to(device)


def _sketch(delta: torch.Tensor, q: int, iterations: int) -> torch.Tensor:
    """An orthonormal basis Q (m×q) of range(δΩ), refined by power iterations (Halko et al. 2011,
    Algorithm 4.4: re-orthonormalized at every step)."""
    m, n = delta.shape
    Q = torch.linalg.qr(delta @ _random(n, q, delta.device, _SEED + m * n + q)).Q
    for _ in range(iterations):
        Z = torch.linalg.qr(delta.T @ Q).Q
        Q = torch.linalg.qr(delta @ Z).Q
    return Q


def _residual_sumsq(delta: torch.Tensor, Q: torch.Tensor, B: torch.Tensor) -> float:
    """‖δ − QB‖²_F, formed a block of rows at a time (a few MB of scratch)."""
    rows = max(1, (1 << 18) // delta.shape[1])
    total = 0.0
    for start in range(0, delta.shape[0], rows):
        block = delta[start:start + rows] - Q[start:start + rows] @ B
        total += block.double().square().sum().item()
    return total


def _from_sketch(shape, Q: torch.Tensor, svd, sumsq: float, vectors: int, complete: bool) -> Factors:
    """Factors from a sketch: δ ≈ QB with B = Qᵀδ = UbΣVᵀ (``svd``), so U = QUb."""
    Ub, S, Vh = svd
    U, V = Q @ Ub, Vh.T
    rank = numerical_rank(S, shape) if complete else None
    k = min(vectors, rank if rank is not None else max(0, S.numel() - OVERSAMPLE))
    parts = (U * S, V) if complete else None
    return Factors(shape, S.float().cpu(), sumsq, complete, rank, U[:, :k], V[:, :k], parts)


def _from_gram(delta: torch.Tensor, sumsq: float, vectors: int) -> Factors:
    """All singular values from the Gram matrix of the smaller side, in float64; the top singular
    vectors of the other side as δᵀuⱼ/σⱼ (or δvⱼ/σⱼ)."""
    m, n = delta.shape
    X = delta.double()
    wide = m <= n
    gram = X @ X.T if wide else X.T @ X
    if vectors > 0:
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        eigenvectors = eigenvectors.flip(1)
    else:
        eigenvalues, eigenvectors = torch.linalg.eigvalsh(gram), None
    S = eigenvalues.flip(0).clamp_(min=0).sqrt_()
    values = S.float()
    rank = numerical_rank(values, (m, n))
    k = min(vectors, rank)
    U = V = None
    if k > 0:
        top = eigenvectors[:, :k]
        other = (X.T @ top if wide else X @ top) / S[:k]
        U, V = (top, other) if wide else (other, top)
        U, V = U.float(), V.float()
    return Factors((m, n), values.cpu(), sumsq, True, rank, U, V)


def decompose(delta: torch.Tensor, *, vectors: int = 0, sketch: int = RANGE_RANK,
              full_limit: int = FULL_LIMIT) -> Factors:
    """The singular values of ``delta`` (float32, m×n, on the compute device) and its top
    ``vectors`` singular vectors (fewer when its numerical rank is lower).

    Tried in order: a sketch of ``sketch`` random columns, kept when it holds δ up to rounding
    (‖δ − QQᵀδ‖_F ≤ max(m, n)·ε·σ₁: every singular value it misses is below the rank tolerance);
    the Gram matrix's eigenvalues in float64 (all r values, exact); for matrices over
    ``full_limit`` entries a randomized SVD of the top 10% (plus ``vectors``) only.
    """
    m, n = delta.shape
    r = min(m, n)
    sumsq = sum_of_squares(delta)
    if sumsq == 0.0:
        return Factors.zero((m, n))
    if 2 * sketch <= r:
        Q = _sketch(delta, sketch, 0)
        B = Q.T @ delta  # q×n
        svd = torch.linalg.svd(B, full_matrices=False)
        if _residual_sumsq(delta, Q, B) <= rank_tolerance((m, n), float(svd[1][0])) ** 2:
            return _from_sketch((m, n), Q, svd, sumsq, vectors, True)
    if delta.numel() <= full_limit:
        return _from_gram(delta, sumsq, vectors)
    q = min(r, max(top_count(max(SV_FRACTIONS), r), vectors) + OVERSAMPLE)
    Q = _sketch(delta, q, POWER_ITERATIONS)
    return _from_sketch((m, n), Q, torch.linalg.svd(Q.T @ delta, full_matrices=False), sumsq, vectors, False)


def sum_from_parts(parts: list[Factors]) -> Factors | None:
    """The singular values of Σδᵢ from the tasks' sketched factors δᵢ = AᵢVᵢᵀ (Aᵢ = UᵢΣᵢ), without
    forming the m×n sum: [A₁ … A_T] = QₐRₐ, [V₁ … V_T] = Q_bR_b, Σδᵢ = Qₐ(RₐR_bᵀ)Q_bᵀ, so the sum's
    singular values are those of the small core RₐR_bᵀ. None unless every non-zero δᵢ was
    sketched completely."""
    present = [p for p in parts if p.sumsq > 0]
    if not present or any(p.parts is None for p in present):
        return None
    shape = present[0].shape
    A = torch.cat([p.parts[0] for p in present], dim=1)
    V = torch.cat([p.parts[1] for p in present], dim=1)
    if A.shape[1] * 2 > min(shape):
        return None  # a big core: the Gram route is as cheap
    Ra, Rb = torch.linalg.qr(A).R, torch.linalg.qr(V).R
    S = torch.linalg.svdvals(Ra @ Rb.T)
    # ‖Σδᵢ‖² from the factors: the same up to the tasks' rounding-level residuals
    return Factors(shape, S.float().cpu(), S.double().square().sum().item(), True, numerical_rank(S, shape))


def overlap(A: torch.Tensor, B: torch.Tensor, k: int) -> float:
    """‖AᵀB‖²_F / k for orthonormal A and B with at most k columns: the mean squared cosine of
    the principal angles between their spans (0 orthogonal … 1 the same subspace)."""
    return min(1.0, (A.T @ B).double().square().sum().item() / k)  # ≤ 1 but for rounding


def image_basis(matrix: torch.Tensor, directions: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """An orthonormal basis of range(matrix·directions): its left singular vectors above the
    rounding tolerance of ``matrix`` (σ₁ = ``sigma_max``); none where the matrix kills them."""
    U, S, _ = torch.linalg.svd(matrix @ directions, full_matrices=False)
    return U[:, S > rank_tolerance(matrix.shape, sigma_max)]


@dataclass
class PairOverlap:
    """Subspace overlap of two tasks on one matrix (before merging, and in the merged update)."""

    k: int
    left: float
    right: float
    merged_left: float | None = None
    merged_right: float | None = None


@dataclass
class MatrixSpectra:
    """Everything measured on one weight matrix: the factors of each δᵢ (values only, by now),
    of Σδᵢ and of δ_merged, and the overlaps of each pair of tasks (i < j)."""

    shape: tuple[int, int]
    tasks: list[Factors]
    total: Factors | None
    merged: Factors | None
    pairs: dict[tuple[int, int], PairOverlap]
    aligned: list[float | None] | None = None  # per task ‖Π_M δᵢ‖²_F (see measure_matrix); None: no merge


def measure_matrix(base: torch.Tensor, models: list[torch.Tensor], merged: torch.Tensor | None = None) -> MatrixSpectra:
    """Spectra and subspace overlaps of one weight matrix of the base, the models and a merge.

    ``base``, ``models`` and ``merged`` are one tensor each (stored dtype, on the compute device);
    the task matrices are formed in float32 one at a time (the sum, when it cannot be had from the
    factors, is one more m×n accumulator).
    """
    shape = tuple(base.shape)
    T = len(models)
    budget = max(1, min(shape) // T)  # TSV-M: each of T tasks keeps ⌊r/T⌋ directions
    tasks = []
    for model in models:
        if torch.equal(model, base):
            tasks.append(Factors.zero(shape))
        else:
            tasks.append(decompose(task_matrix(base, model), vectors=budget if T >= 2 else 0))
    total = None
    if T >= 2 and all(t.sumsq == 0 for t in tasks):
        total = Factors.zero(shape)
    elif T >= 2:
        total = sum_from_parts(tasks)
        if total is None:
            accumulator = torch.zeros(shape, dtype=torch.float32, device=base.device)
            for model in models:
                accumulator += task_matrix(base, model)
            total = decompose(accumulator, sketch=_sketch_size(tasks, shape))
            del accumulator
    pairs = {}
    for i in range(T):
        for j in range(i + 1, T):
            a, b = tasks[i], tasks[j]
            if a.U is None or b.U is None:
                continue
            k = min(budget, a.U.shape[1], b.U.shape[1])
            if k > 0:
                pairs[(i, j)] = PairOverlap(k, overlap(a.U[:, :k], b.U[:, :k], k), overlap(a.V[:, :k], b.V[:, :k], k))
    merged_factors, aligned = None, None
    if merged is not None:
        delta = task_matrix(base, merged)
        budgets = [min(budget, _directions(t)) for t in tasks]
        merged_factors = decompose(delta, vectors=max(1, sum(budgets)), sketch=_sketch_size(tasks, shape))
        aligned = [None if t.sumsq == 0 else 0.0 for t in tasks]
        if merged_factors.sumsq > 0:
            # Iso-C's subspace alignment: the energy of δᵢ in the merged update's top K = Σ kᵢ left
            # singular directions (the tasks' budgets together)
            top = merged_factors.U
            aligned = [None if t.sumsq == 0 else (top.T @ task_matrix(base, model)).double().square().sum().item()
                       for t, model in zip(tasks, models)]
            sigma = merged_factors.sigma_max
            images: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

            def image(i: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
                if (i, k) not in images:  # where δ_merged sends task i's top-k input / output directions
                    images[(i, k)] = (image_basis(delta, tasks[i].V[:, :k], sigma),
                                      image_basis(delta.T, tasks[i].U[:, :k], sigma))
                return images[(i, k)]

            for (i, j), pair in pairs.items():
                (left_i, right_i), (left_j, right_j) = image(i, pair.k), image(j, pair.k)
                pair.merged_left = overlap(left_i, left_j, pair.k)
                pair.merged_right = overlap(right_i, right_j, pair.k)
        del delta
    return MatrixSpectra(shape, [t.drop_vectors() for t in tasks], total and total.drop_vectors(),
                         merged_factors and merged_factors.drop_vectors(), pairs, aligned)


def _directions(factors: Factors) -> int:
    """How many singular directions of a matrix are real: its numerical rank, or for an approximate
    spectrum the values computed less the oversampling."""
    if factors.sumsq == 0:
        return 0
    if factors.numerical_rank is not None:
        return factors.numerical_rank
    return max(1, factors.values.numel() - OVERSAMPLE)


def _sketch_size(tasks: list[Factors], shape) -> int:
    """Sketch columns for a sum or a merge of the tasks: their numerical ranks added, plus margin
    (a merge of low-rank tasks by task arithmetic or TSV-M is no higher in rank)."""
    ranks = [t.numerical_rank for t in tasks if t.sumsq > 0]
    if not ranks or any(r is None for r in ranks):
        return RANGE_RANK
    return max(RANGE_RANK, sum(ranks) + OVERSAMPLE)


# -- stored spectra ---------------------------------------------------------------------------------

def spectrum_positions(known: int, marks: tuple[int, ...] = (), points: int = SPECTRUM_POINTS) -> list[int]:
    """1-based positions of the singular values a stored spectrum keeps: all of the first HEAD,
    then about log-spaced to ``known`` (always included), plus ``marks`` (the numerical rank and
    the one after it, so the drop to rounding shows where it is)."""
    if known <= points:
        return list(range(1, known + 1))
    chosen = set(range(1, HEAD + 1))
    steps = points - HEAD - 1
    for s in range(steps + 1):
        chosen.add(round(math.exp(math.log(HEAD) + (math.log(known) - math.log(HEAD)) * s / steps)))
    chosen.update(p for p in marks if 1 <= p <= known)
    return sorted(chosen)


def pooled(values: list[torch.Tensor]) -> torch.Tensor:
    """The singular values of several matrices as one spectrum, largest first: those of the
    block-diagonal matrix that holds them all (a layer's, or the whole model's)."""
    known = [v for v in values if v.numel()]
    if not known:
        return torch.zeros(0)
    return torch.cat(known).sort(descending=True).values

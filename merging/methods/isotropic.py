"""Isotropic merging: Iso-C and Iso-CTS (Marczak et al., 2025, "No Task Left Behind: Isotropic
Model Merging with Common and Task-Specific Subspaces", https://arxiv.org/abs/2502.04959).

Summing task matrices (task arithmetic) gives a spectrum dominated by a few directions that the
tasks share; the tasks' own directions sit in its tail and are drowned. Both methods flatten the
merged matrix's spectrum to its mean σ̄ (an isotropic update), per 2-D weight matrix:

- Iso-C: Δ = Σᵢ wᵢδᵢ = UΣVᵀ, update σ̄·UVᵀ.
- Iso-CTS: the top directions of Δ (the common subspace) plus, for each task, the top directions
  of its δᵢ with the common subspace projected out (its task-specific subspace), orthogonalized,
  with the mean of their singular values as the one singular value.

θ = θ_base + λ·update. Every other tensor (norms, biases) takes λ times the weighted mean task
vector (``kernels.mean_task_vector``), as the paper's code averages them.

Rank-deficient task matrices (LoRA experts: the demo's three rank-8 experts sum to rank 24 of
576) keep only the directions above rounding (``kernels.numerical_rank``): the paper's code takes
σ̄ and UVᵀ over all min(m, n) directions, which there adds the SVD's arbitrary completion vectors
at full strength: the demo merge collapsed to 0% (restricted to the rank: 25-34%; measured by
the issue's author). Measured on the demo's q_proj/k_proj/down_proj in float32: the smallest
genuine singular value is 0.07-0.37 of σ₁, the rounding floor 3e-7-9e-7 of σ₁, the tolerance
7e-5-2e-4. The SVDs run in float32 on purpose: a float64 SVD of the same float32 checkpoints
counts their storage rounding as rank (576 of 576), its tolerance being float64's.
"""

from __future__ import annotations

import torch

from merging.methods.kernels import mean_task_vector, numerical_rank, svd, task_matrix
from merging.methods.spec import LAMBDA, WEIGHT, MethodSpec, Param, register

COMMON_SPACE_FRACTION = Param(
    "common_space_fraction", float, 0.8, "global",
    "Iso-CTS: fraction of the merged matrix's rank kept from the common subspace (the top singular "
    "directions of the summed task matrices); the rest is shared equally among the tasks' own "
    "directions. 1 is Iso-C.",
    low=0.0, high=1.0,
)

_PAPER = "https://arxiv.org/abs/2502.04959"
_LAMBDA_GUIDANCE = (
    "The paper picks α (λ here) on held-out validation data from a grid over (0, 3] in steps of 0.1, on "
    "CLIP ViT models; FusionBench's CLIP example uses 1.5. There are no language-model experiments: sweep "
    "λ about 0.5-2 on held-out data (the flattened update's Frobenius norm, σ̄·√r, is at most the task "
    "sum's)."
)


# -- per matrix ---------------------------------------------------------------------------------

def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kernels.svd`` (U, S, Vᵀ), a wide matrix decomposed through its transpose: torch's CPU SVD
    of a 768×3072 float32 matrix took 4.6 s, of its 3072×768 transpose 1.6 s (best of 5 on the
    2 shared cores)."""
    if matrix.shape[0] >= matrix.shape[1]:
        return svd(matrix)
    V, S, Uh = svd(matrix.T.contiguous())
    return Uh.T, S, V.T


def task_sum(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Δ = Σᵢ wᵢ(θᵢ − θ_base) in float32.

    Each δᵢ is formed first: Σwᵢθᵢ − (Σwᵢ)θ_base rounds at |θ| instead of |δ| (on a demo q_proj
    its rounding floor was 5.7e-7 of σ₁ against 3.4e-7, both far below the 7e-5 rank tolerance,
    but the gap grows as |δ|/|θ| shrinks).
    """
    total = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    for tensor, weight in zip(tensors, weights):
        total.add_(task_matrix(base, tensor), alpha=weight)
    return total


def partial_isometry(matrix: torch.Tensor) -> torch.Tensor:
    """The polar factor of ``matrix`` over its numerical rank r: U_r V_rᵀ (the paper's
    orthogonalization "via SVD"). For a full-rank matrix it is the nearest matrix with
    orthonormal columns; directions of zero singular value get no arbitrary completion."""
    U, S, Vh = thin_svd(matrix)
    r = numerical_rank(S, tuple(matrix.shape))
    return U[:, :r] @ Vh[:r]


def iso_c_update(delta: torch.Tensor) -> torch.Tensor:
    """Iso-C (Marczak et al., 2025, Algorithm 1): Δ = UΣVᵀ ↦ σ̄·U_r V_rᵀ, σ̄ = (1/r)·Σⱼ₌₁ʳ σⱼ.

    r is Δ's numerical rank (the paper: min(m, n)); a zero Δ gives a zero update.
    """
    U, S, Vh = thin_svd(delta)
    r = numerical_rank(S, tuple(delta.shape))
    if r == 0:
        return torch.zeros_like(delta)
    return (U[:, :r] * S[:r].mean()) @ Vh[:r]


def subspace_sizes(rank: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(k, s): Iso-CTS's common-subspace size and directions per task, with k + T·s = rank.

    As the paper's code: k₀ = ⌊rank·f⌋, s = round((rank − k₀)/T) (Python's round, half to even),
    k = rank − T·s, so the task-specific part divides equally. ``rank`` is min(m, n) in the paper,
    the numerical rank of Σwᵢδᵢ here. s is capped at ⌊rank/T⌋ (the paper's code would make k
    negative when f is near 0).
    """
    k0 = int(rank * common_space_fraction)
    s = min(round((rank - k0) / tasks), rank // tasks)
    return rank - tasks * s, s


def task_specific_directions(
    delta: torch.Tensor, complement: torch.Tensor | None, common: torch.Tensor, s: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ, Vᵀ) of one task's top ``s`` directions outside the common subspace:
    δ' = (I − U_k U_kᵀ)δ (Iso-CTS), over δ''s singular values above rounding only.

    ``complement``: an orthonormal basis of the complement of U_k when one is at hand (the
    square U of a wide matrix): then δ' = U_c(U_cᵀδ) and the SVD is of the small (m − k) × n
    matrix U_cᵀδ (5-8x faster for three tasks at 768×3072). Otherwise δ' is decomposed whole.
    Rounding is judged against ‖δ‖_F: δ' can be all rounding (a task inside the common subspace),
    so its own σ₁ is no scale.
    """
    if complement is not None:
        inner_U, S, Vh = thin_svd(complement.T @ delta)
        U = complement @ inner_U[:, :s]
    else:
        U, S, Vh = thin_svd(delta - common @ (common.T @ delta))
        U = U[:, :s]
    tolerance = max(delta.shape) * torch.finfo(S.dtype).eps * float(torch.linalg.matrix_norm(delta))
    kept = min(s, int((S > tolerance).sum()))
    return U[:, :kept], S[:kept], Vh[:kept]


def iso_cts_update(deltas: list[torch.Tensor], common_space_fraction: float) -> torch.Tensor:
    """Iso-CTS (Marczak et al., 2025, Algorithm 2), for weighted task matrices wᵢδᵢ:

    1. common subspace: the top k singular directions (U_k, σ_k, V_k) of Δ = Σᵢ wᵢδᵢ;
    2. each task's top s directions (Uᵢ, σᵢ, Vᵢ) of (I − U_k U_kᵀ)·wᵢδᵢ;
    3. U = [U_k, U₁ … U_T], V = [V_k, V₁ … V_T] orthogonalized by their polar factors;
    4. update = σ̄·UVᵀ with σ̄ the mean of [σ_k, σ₁ … σ_T].

    (k, s) from ``subspace_sizes`` over Δ's numerical rank r (the paper: min(m, n)), so the
    directions fill r. Directions of zero singular value are left out throughout (a task lying
    inside the common subspace then adds fewer than s; none is redistributed). With fraction 1
    (k = r, s = 0) this is Iso-C.
    """
    delta = deltas[0].clone()
    for other in deltas[1:]:
        delta += other
    U, S, Vh = thin_svd(delta)
    r = numerical_rank(S, tuple(delta.shape))
    if r == 0:
        return torch.zeros_like(delta)
    k, s = subspace_sizes(r, len(deltas), common_space_fraction)
    parts = [(U[:, :k], S[:k], Vh[:k])]
    if s > 0:
        # a wide matrix's U is square: its last m − k columns span the complement of U_k
        complement = U[:, k:] if U.shape[1] == U.shape[0] else None
        parts += [task_specific_directions(d, complement, U[:, :k], s) for d in deltas]
    left = torch.cat([p[0] for p in parts], dim=1)
    sigma = torch.cat([p[1] for p in parts])
    right = torch.cat([p[2] for p in parts], dim=0)
    return sigma.mean() * (partial_isometry(left) @ partial_isometry(right.T).T)


# -- registered methods ---------------------------------------------------------------------------

def _weights(per_model: list[dict]) -> list[float]:
    return [p["weight"] for p in per_model]


@register(MethodSpec(
    name="iso_c",
    title="Iso-C (isotropic merging in the common subspace)",
    paper=_PAPER,
    summary="Δ = Σ wᵢδᵢ = UΣVᵀ; θ = θ_base + λ·σ̄·U_r V_rᵀ, every singular value replaced by their mean σ̄ "
            "(over Δ's numerical rank r); other tensors: θ_base + λ·Σ wᵢδᵢ / Σ wᵢ.",
    params=(WEIGHT, LAMBDA),
    needs_base=True,
    base="origin",
    family="subspace",
    guidance=_LAMBDA_GUIDANCE + " Weights scale each task matrix inside the sum (the paper: all 1).",
    suggested={"lambda": 1.5},
))
def iso_c(base, tensors, per_model, params, seed):
    """Iso-C per tensor: θ_base + λ·``iso_c_update``(Σ wᵢδᵢ) for a matrix, else the mean task vector."""
    weights, lam = _weights(per_model), params["lambda"]
    if base.ndim != 2:
        return mean_task_vector(base, tensors, weights, lam)
    return base.to(torch.float32, copy=True).add_(iso_c_update(task_sum(base, tensors, weights)), alpha=lam)


@register(MethodSpec(
    name="iso_cts",
    title="Iso-CTS (isotropic merging in common and task-specific subspaces)",
    paper=_PAPER,
    summary="Top directions of Σ wᵢδᵢ (the common subspace) plus each task's top directions outside it, "
            "orthogonalized, all with the mean singular value σ̄: θ = θ_base + λ·σ̄·UVᵀ.",
    params=(WEIGHT, LAMBDA, COMMON_SPACE_FRACTION),
    needs_base=True,
    base="origin",
    family="subspace",
    guidance=_LAMBDA_GUIDANCE + " common_space_fraction 0.8 in the paper's experiments and code (1 is "
             "Iso-C). Weights scale each task matrix (the paper: all 1).",
    suggested={"lambda": 1.5, "common_space_fraction": 0.8},
))
def iso_cts(base, tensors, per_model, params, seed):
    """Iso-CTS per tensor: θ_base + λ·``iso_cts_update``([wᵢδᵢ]) for a matrix, else the mean task vector."""
    weights, lam = _weights(per_model), params["lambda"]
    if base.ndim != 2:
        return mean_task_vector(base, tensors, weights, lam)
    deltas = [task_matrix(base, tensor).mul_(weight) for tensor, weight in zip(tensors, weights)]
    return base.to(torch.float32, copy=True).add_(iso_cts_update(deltas, params["common_space_fraction"]), alpha=lam)

"""TSV-Merge: Task Singular Vectors (Gargiulo et al., CVPR 2025, https://arxiv.org/abs/2412.00081).

Per weight matrix, each task matrix wᵢδᵢ is compressed to its top singular components (the
paper's TSV-C: 1/T of them for T tasks), the components of all tasks are stacked side by side,
and the stacked singular vectors are decorrelated by replacing them with their nearest
orthonormal matrices (orthogonal Procrustes):

    U = [U₁ … U_T] = P Σ_U Qᵀ  ->  U⊥ = P Qᵀ        (likewise V⊥ from V = [V₁ … V_T])
    Δ = U⊥ · diag(σ₁ … σ_T) · V⊥ᵀ,    θ = θ_base + λ Δ

Tasks whose singular vectors already are mutually orthogonal pass through unchanged (Δ = Σ wᵢδᵢ
when each keeps all its nonzero components); overlapping ones are rotated apart, which is how the paper
reduces task interference. Tensors that are not matrices (norms, biases) take the weighted mean
of the task vectors (``kernels.mean_task_vector``).

Precision: float32, measured here on demo-sized (576x576, 1536x576) task matrices from bf16
checkpoints, 3 tasks. Against a float64 run the merged Δ differs by 1-2e-5 (relative Frobenius)
for independent tasks; with δᵢ = shared + ownᵢ it grows as tasks become alike: 6e-5 when
‖ownᵢ‖ is 10% of ‖shared‖, 4e-4 at 1%, 4e-3 at 0.1% (near-duplicates make the stacked U
ill-conditioned; float64 per-task SVDs with a float32 orthogonalization, or the reverse, only
halve that). Even the last is below a bf16 checkpoint's resolution of θ (Δ is a few % of θ,
bf16 keeps 3.9e-3 of it), while float64 made the SVDs 1.1-4.5x slower on this (busy) CPU.
U⊥ᵀU⊥ = I holds to 2e-6 in float32.
"""

from __future__ import annotations

import math

import torch

from merging.methods.kernels import mean_task_vector, numerical_rank, svd, task_matrix
from merging.methods.spec import LAMBDA, WEIGHT, MethodSpec, Param, register

SV_REDUCTION = Param(
    "sv_reduction", float, 0.0, "global",
    "Fraction of each task matrix's singular components kept (its top sv_reduction·min(rows, columns); "
    "FusionBench's name). 0, the default, means 1/T for T models, the paper's choice: the kept components "
    "of all tasks then fill the matrix's rank exactly.",
    low=0.0, high=1.0,
)


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vᵀ) of the thin SVD, always decomposing the tall orientation.

    A wide matrix is decomposed as its transpose: on this CPU (MKL, 1 thread) a 768x3072
    float32 SVD took 1.3 s and its 3072x768 transpose 0.6-0.8 s, the same factors.
    """
    if matrix.shape[0] >= matrix.shape[1]:
        return svd(matrix)
    u, s, vt = svd(matrix.mT)
    return vt.mT, s, u.mT


def kept_components(rank: int, tasks: int, sv_reduction: float) -> int:
    """How many singular components each task keeps: ⌊sv_reduction·rank⌋, or ⌊rank/T⌋ when
    ``sv_reduction`` is 0 (the paper's 1/T, in integers so 576/3 is exactly 192); at least one."""
    if sv_reduction <= 0:
        return max(1, rank // tasks)
    return max(1, math.floor(sv_reduction * rank + 1e-9))


def task_singular_vectors(matrix: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TSV-C of one task matrix: its top ``keep`` singular triplets (Uᵢ, σᵢ, Vᵢᵀ).

    Components beyond the matrix's numerical rank (``kernels.numerical_rank``) are dropped too:
    their singular vectors are an arbitrary completion of the basis, not the task's. A LoRA
    task vector of rank 8 thus contributes 8 components, not rank/T, and its arbitrary null-space
    vectors cannot rotate the other tasks' real ones during the orthogonalization (kept, they
    moved Δ by 58% of its largest entry for three orthogonal rank-3 tasks, tests). A LoRA folded
    into bf16 weights is not low-rank: its rounding noise fills the rest of the spectrum above this
    tolerance and is kept, as in the paper; for three rank-8 LoRAs on a 1536x576 bf16 matrix the
    merge then lay 53% (relative Frobenius) from the noise-free one. float32 checkpoints (the
    demo's experts) are unaffected.
    """
    u, s, vt = thin_svd(matrix)
    keep = min(keep, numerical_rank(s, tuple(matrix.shape)))
    return u[:, :keep], s[:keep], vt[:keep]


def orthogonal_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to ``matrix`` in Frobenius norm (orthogonal Procrustes,
    the polar factor): P Qᵀ where matrix = P Σ Qᵀ. Orthonormal columns for a tall or square
    matrix, orthonormal rows for a wide one."""
    p, _, qt = thin_svd(matrix)
    return p @ qt


def tsv_factors(task_matrices: list[torch.Tensor], sv_reduction: float = 0.0):
    """TSV-M's factors of the merged task matrix: (U⊥, σ, V⊥ᵀ) with Δ = U⊥ diag(σ) V⊥ᵀ.

    ``task_matrices`` are the weighted task matrices wᵢδᵢ. Each keeps its top components
    (``kept_components``); U = [U₁ … U_T] and Vᵀ = [V₁ … V_T]ᵀ are stacked and replaced by their
    orthogonal factors; σ is the stacked singular values, block by block (not re-sorted).
    Gargiulo et al., 2025 (TSV-M). Returns None when no task has a nonzero component.
    """
    rows, cols = task_matrices[0].shape
    keep = kept_components(min(rows, cols), len(task_matrices), sv_reduction)
    parts = [task_singular_vectors(m, keep) for m in task_matrices]
    parts = [p for p in parts if p[1].numel()]
    if not parts:
        return None
    u = torch.cat([p[0] for p in parts], dim=1)
    sigma = torch.cat([p[1] for p in parts])
    vt = torch.cat([p[2] for p in parts], dim=0)
    return orthogonal_factor(u), sigma, orthogonal_factor(vt)


def tsv_delta(task_matrices: list[torch.Tensor], sv_reduction: float = 0.0) -> torch.Tensor:
    """Δ = U⊥ diag(σ) V⊥ᵀ, the TSV-M merge of the weighted task matrices (zeros when all are 0)."""
    factors = tsv_factors(task_matrices, sv_reduction)
    if factors is None:
        return torch.zeros_like(task_matrices[0])
    u, sigma, vt = factors
    return (u * sigma) @ vt


@register(MethodSpec(
    name="tsv",
    title="TSV-Merge (Task Singular Vectors)",
    paper="https://arxiv.org/abs/2412.00081",
    summary="Per matrix: keep each wᵢδᵢ's top 1/T singular components, orthogonalize the stacked U and V "
            "(Procrustes), θ = θ_base + λ U⊥ Σ V⊥ᵀ; other tensors: the weighted mean task vector.",
    params=(WEIGHT, SV_REDUCTION, LAMBDA),
    needs_base=True,
    base="origin",
    family="subspace",
    guidance="The paper merges with λ = 1 and keeps 1/T of each task's singular components (sv_reduction 0), "
             "needing no tuning; weights scale each task matrix before its SVD. One SVD per model and two "
             "more per matrix: slower than task arithmetic.",
    suggested={"lambda": 1.0},
))
def tsv(base, tensors, per_model, params, seed):
    """TSV-Merge of one tensor: θ_base + λ·tsv_delta(wᵢ(θᵢ − θ_base)) for a matrix (float32 SVDs on
    the tensors' device), θ_base + λ·Σwᵢδᵢ/Σwᵢ otherwise."""
    weights = [p["weight"] for p in per_model]
    if base.dim() != 2:
        return mean_task_vector(base, tensors, weights, params["lambda"])
    matrices = [task_matrix(base, x).mul_(w) for x, w in zip(tensors, weights)]
    delta = tsv_delta(matrices, params["sv_reduction"])
    return torch.add(base.float(), delta, alpha=params["lambda"])

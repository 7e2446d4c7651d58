"""RegMean (Jin et al., 2023): per linear layer, the weights whose outputs stay closest to every
model's own outputs on that model's calibration inputs."""

from __future__ import annotations

import torch

from merging.calibration import GRAMS
from merging.methods.kernels import weighted_mean
from merging.methods.spec import CALIBRATION_MAX_LENGTH, CALIBRATION_SAMPLES, DATA_WEIGHT, MethodSpec, Param, register

REDUCE_NON_DIAGONAL = Param(
    "reduce_non_diagonal", float, 0.9, "global",
    "α: off-diagonal entries of every Gram are scaled by α (1 = the exact least-squares "
    "solution; the paper's regularized variant uses α < 1, e.g. 0.6 for GPT-2).",
    low=0.0, high=1.0,
)
# Eigenvalue floor of the summed Gram, relative to its largest eigenvalue (see ``solve_toward_average``).
# Measured on tiny GPT-2s (the families and texts of tests/test_calibration.py): eigen-directions
# below ~1e-7·λ_max carry no information about the inputs, since the float32 forward pass alone
# (batched with padding vs one example at a time) moves a Gram by up to 5e-8·λ_max, and float32
# accumulation by up to 1.4e-7. With no floor, even float64 Grams that are rank-deficient (fewer
# distinct inputs than dimensions) gave weights 30-2500× the sources'. At 1e-6 every layer stayed
# within 1.08× the sources' largest |W|; at 1e-8 an input layer fed only 4 distinct tokens reached
# 1.9×, at 1e-12 3.1×. The price on the calibration objective, from 1e-8 to 1e-6: a well covered
# attention output 0.12× → 0.13× averaging's, the nearly rank-deficient one of the issue #12 test
# 0.0016× → 0.0073×, that 4-token layer 0.006× → 0.16× (all still far below averaging).
RELATIVE_FLOOR = 1e-6


@register(MethodSpec(
    name="regmean",
    title="RegMean (regression mean)",
    paper="https://arxiv.org/abs/2212.09849",
    summary="Per linear layer W* = (Σ wᵢG̃ᵢ)⁻¹ Σ wᵢG̃ᵢWᵢᵀ, Gᵢ = XᵢᵀXᵢ of its inputs on model i's "
            "calibration text; other tensors are averaged.",
    params=(DATA_WEIGHT, REDUCE_NON_DIAGONAL, CALIBRATION_SAMPLES, CALIBRATION_MAX_LENGTH),
    needs_base=False,
    base="config",
    calibration=GRAMS,
    family="data-aware",
    guidance="Each model runs once on its calibration text. α (reduce_non_diagonal) in published "
             "use: 0.1 (T5), 0.6 (GPT-2), 0.95 (CLIP); 1 is the exact least-squares merge.",
    suggested={"weight": 1.0},
))
def regmean(base, tensors, per_model, params, seed, stats):
    """For a linear weight (y = W x): W* minimizes Σᵢ wᵢ‖Xᵢ(W − Wᵢ)ᵀ‖², i.e.
    W*ᵀ = (Σ wᵢG̃ᵢ)⁻¹ Σ wᵢG̃ᵢWᵢᵀ with G̃ = α·G + (1 − α)·diag(G), solved in float64 by
    ``solve_toward_average`` with an eigenvalue floor ε = ``RELATIVE_FLOOR``·λ_max(Σ wᵢG̃ᵢ) that
    pulls directions the calibration inputs barely reach toward the weighted average W̄:
    W*ᵀ = (Σ wᵢG̃ᵢ + εI)⁻¹ (Σ wᵢG̃ᵢWᵢᵀ + εW̄ᵀ). ``stats``: per model, ``(Gram, stored
    transposed)`` or None (not a linear weight: weighted average)."""
    weights = [p["weight"] for p in per_model]
    if not stats or tensors[0].dim() != 2 or any(entry is None for entry in stats) or sum(weights) <= 0:
        return weighted_mean(tensors, weights)
    alpha = params["reduce_non_diagonal"]
    transposed = stats[0][1]
    lhs = rhs = None
    for tensor, (gram, _), weight in zip(tensors, stats, weights):
        g = gram.to(tensor.device, torch.float64, copy=True)  # the cached Gram is shared by q, k and v
        if alpha != 1.0:
            diagonal = torch.diagonal(g).clone()
            g.mul_(alpha)
            torch.diagonal(g).copy_(diagonal)
        g.mul_(weight)
        w_t = tensor.double() if transposed else tensor.double().T  # (in, out)
        lhs = g if lhs is None else lhs.add_(g)
        term = g @ w_t
        rhs = term if rhs is None else rhs.add_(term)
    average = weighted_mean(tensors, weights).double()
    solution = solve_toward_average(lhs, rhs, average if transposed else average.T)  # (in, out)
    return (solution if transposed else solution.T).float().contiguous()


def solve_toward_average(lhs: torch.Tensor, rhs: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
    """(lhs + εI)⁻¹ (rhs + ε·average), ε = ``RELATIVE_FLOOR`` · λ_max(lhs), in float64.

    With lhs = Σ wᵢG̃ᵢ and rhs = Σ wᵢG̃ᵢWᵢᵀ this is the minimizer of RegMean's objective plus
    ε‖W − W̄‖² (W̄ the weighted average): in input directions the calibration text barely
    reaches (eigenvalues of Σ G̃ far below the largest, as in a small model's attention output:
    1e-8 against 6), the merge keeps the average instead of amplifying rounding, and since W̄
    itself has no penalty, the result is never worse than averaging on the objective it solves
    (RegMean's own for α = 1). Where the inputs are well covered (eigenvalues ≫ ε) it is the
    exact RegMean solution.
    """
    largest = _largest_eigenvalue(lhs)
    if not largest > 0:  # no calibration input reached this layer
        return average
    ridge = RELATIVE_FLOOR * largest
    system = lhs.clone()
    system.diagonal().add_(ridge)
    target = rhs + ridge * average
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(target, factor)
    return torch.linalg.solve(system, target)


def _largest_eigenvalue(symmetric: torch.Tensor, iterations: int = 50, start: torch.Tensor | None = None) -> float:
    """λ_max of a symmetric positive semi-definite matrix by power iteration from ``start``
    (default: a fixed random vector); the Rayleigh quotient it returns is never above λ_max.

    A floor needs its order of magnitude, not ``eigvalsh``'s cubic cost (0.8 s for a 1536-wide
    Gram here, against ~50 ms). Measured: within 0.03% of ``eigvalsh`` on all 72 Grams (one
    model's, two models' sum) of four tiny GPT-2 calibrations (widths 64-2048). From a start
    orthogonal to the top eigenvector, rounding brings that direction back within 50 iterations
    once λ₁/λ₂ ≥ 2.5 (it grows by λ₁/λ₂ per step from ~1e-16); below that it returns about λ₂,
    so never much under λ₁/2 (worst measured: 0.50·λ₁ at λ₁/λ₂ = 2): the order of magnitude.
    """
    if start is None:
        generator = torch.Generator().manual_seed(0)
        start = torch.randn(symmetric.shape[0], 1, dtype=symmetric.dtype, generator=generator)
    vector = start.reshape(-1, 1).to(symmetric.device, symmetric.dtype)
    value = 0.0
    for _ in range(iterations):
        product = symmetric @ vector
        norm = float(product.norm())
        if norm == 0.0:
            return 0.0
        value = float((vector.T @ product).item() / (vector.T @ vector).item())
        vector = product / norm
    return value

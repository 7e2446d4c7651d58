"""WUDI-Merging (Cheng et al., 2025, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", https://arxiv.org/abs/2503.08099).

A linear layer's task vector δᵢ = θᵢ − θ_base is, row by row, close to a linear combination of
the inputs the layer saw while task i was fine-tuned, so δᵢ's row space stands in for task i's
inputs and no data is needed. The merged task vector τ should act on those inputs like δᵢ does:

    τ* = argmin_τ  Σᵢ wᵢ ‖(τ − δᵢ) δᵢᵀ‖²_F / ‖δᵢ‖²_F,      θ = θ_base + λ·τ*

per 2-D weight (rows = outputs, as ``nn.Linear`` stores them), starting from task arithmetic
τ₀ = Σᵢ wᵢδᵢ. As the paper's code (``vit/wudi_main.py``; FusionBench ``method/wudi``): Adam with
learning rate 1e-5 for 300 steps (FusionBench: 400), weights 1 and no final scaling (λ = 1).
Weights are ours: wᵢ scales task i's share of the start and its term of the objective. Every other
tensor (norms, biases) takes θ_base + λ·Σwᵢδᵢ/Σwᵢ (``kernels.mean_task_vector``), as FusionBench.
Matrices are taken as stored, embeddings and ``lm_head`` included (as FusionBench): GPT-2's Conv1D
weights are stored (in, out), so there the objective sees the wrong side; a method is not told a
tensor's layout.

The objective is a quadratic in τ. With Gᵢ = δᵢᵀδᵢ and cᵢ = wᵢ/‖δᵢ‖²_F it is
Σᵢ cᵢ tr((τ − δᵢ)Gᵢ(τ − δᵢ)ᵀ), whose gradient is 2Σᵢ cᵢ(τ − δᵢ)Gᵢ = 2(ΔA + R) at τ = τ₀ + Δ,
with A = Σ cᵢGᵢ and R = Σ cᵢ(τ₀ − δᵢ)Gᵢ (``interference_terms``). The paper differentiates
the loss with autograd every step: three products of the task vectors with each other per task
(3k·rows²·cols multiply-adds for k tasks); with A and R formed once a step is one product ΔA
(rows·cols²) and the Adam trajectory is the same. Measured per step with 3 task vectors, one
torch thread, on this 2-core CPU while other work kept it busy (load ~6-8): 768×3072, autograd
0.38 s, ours 0.24 s; 3072×768, autograd 1.9 s, ours 0.06 s. A whole call on the 768×3072 matrix:
80 s for the paper's 300 steps, 4.3 s for the exact solve, against TIES's 0.06 s. WUDI costs
rows·cols² per step where TIES costs rows·cols per matrix, so on a CPU it stays two to three
orders of magnitude slower; on a GPU the 300 products take well under a second.

``solver: exact`` solves ΔA = −R instead (float64, ``exact_minimizer``). It is not the default:
the paper's 300 Adam steps of 1e-5 move each entry by at most about 3e-3 and stop short of the
minimizer, and that early stop is part of its results (Wei et al., 2026,
https://arxiv.org/abs/2606.07289, report that the exact pseudo-inverse solution underperforms
the iterations, which act as a spectral regulariser). The two differ in kind, too. Measured on
the demo's three rank-8 LoRA experts (layer 10 q_proj, 576×576): from task arithmetic's 0.072,
300 Adam steps bring the objective to 3.7e-4 and the exact solve to ~1e-12; the exact change
lies in the task vectors' row space (the only inputs the objective sees), while Adam's per-entry
steps also move the layer off it (a component of norm 0.32 in a change of 0.54, ‖τ₀‖ = 2.3),
changing its outputs on inputs no task vector spans.
"""

from __future__ import annotations

import torch

from merging.methods.kernels import mean_task_vector, task_matrix
from merging.methods.spec import LAMBDA, MethodSpec, Param, register, report_steps

_PAPER = "https://arxiv.org/abs/2503.08099"

TASK_WEIGHT = Param(
    "weight", float, 1.0, "model",
    "How much this model counts: its share of the task-arithmetic start Σ wᵢδᵢ and the weight of its "
    "interference term in the objective (the paper: 1 for every model).",
    low=0.0, search=(0.1, 2.0),
)
STEPS = Param(
    "steps", int, 300, "global",
    "Adam steps per weight matrix (the paper's code: 300; FusionBench: 400). 0 keeps the task-arithmetic "
    "start. Each step costs one (rows × cols) by (cols × cols) matrix product. Unused by solver exact.",
    low=0, high=100_000, search=(50, 600),
)
LEARNING_RATE = Param(
    "learning_rate", float, 1e-5, "global",
    "Adam's learning rate (the paper's code: 1e-5; its language-model code 2e-5). Adam moves each entry "
    "by about this much per step at most, so steps × learning_rate bounds how far the merge leaves "
    "task arithmetic. Unused by solver exact.",
    low=0.0, low_inclusive=False, search=(1e-6, 1e-4), search_log=True,  # no upper bound: the studio then shows a number box, not a 0-1 slider
)
SOLVER = Param(
    "solver", str, "adam", "global",
    "adam: the paper's optimizer, stopped after steps (its results depend on that early stop). exact: "
    "the objective's minimizer in one float64 linear solve (no steps; weakly constrained directions "
    "stay at task arithmetic).",
    choices=("adam", "exact"),
)

# Adam as the paper's code runs it: torch.optim.Adam's defaults apart from the learning rate.
BETAS = (0.9, 0.999)
EPS = 1e-8
# ``exact_minimizer``: ridge ε = EXACT_FLOOR·‖A‖_F toward the start. Measured on the demo's LoRA
# experts (layer 10 q_proj, up_proj, down_proj): A's genuine eigenvalues are >= 1e-2·λ_max, those
# from storage rounding ~1e-13·λ_max; floors from 1e-9 to 1e-6 give the same merge (max |τ| equal
# to 5 digits), 1e-12 starts fitting the rounding directions.
EXACT_FLOOR = 1e-6


def interference_terms(deltas: list[torch.Tensor], weights: list[float], start: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, R) = (Σ cᵢGᵢ, Σ cᵢ(τ₀ − δᵢ)Gᵢ), Gᵢ = δᵢᵀδᵢ, cᵢ = wᵢ/‖δᵢ‖²_F, in ``dtype``: WUDI's
    objective Σᵢ wᵢ‖(τ − δᵢ)δᵢᵀ‖²_F/‖δᵢ‖²_F (Cheng et al., 2025, https://arxiv.org/abs/2503.08099,
    Sec. 4) at τ = τ₀ + Δ has the gradient 2(ΔA + R): R is half the gradient at the start τ₀.

    The gradient is taken around the start rather than as 2(τA − Σ cᵢδᵢGᵢ): that difference of two
    large products cancels near the minimum, and Adam turns float32 cancellation noise into full
    steps of the learning rate. Around the start it is exact where it should be: one task with
    weight 1 starts at its minimum (τ₀ − δ₁ = 0, so R = 0) and stays there.

    Tasks with wᵢ = 0 or δᵢ = 0 have no term (the paper's 1/‖δᵢ‖² would be 0/0 there); None when
    no task has one. Cost per task: rows·cols² multiply-adds for Gᵢ and as many for (τ₀ − δᵢ)Gᵢ,
    which is taken as ((τ₀ − δᵢ)δᵢᵀ)δᵢ (2·rows²·cols) when rows < cols/2.
    """
    A = R = None
    start = start.to(dtype)
    for delta, weight in zip(deltas, weights):
        delta = delta.to(dtype)
        square_norm = float(delta.square().sum())
        if weight == 0 or square_norm == 0.0:
            continue
        c = weight / square_norm
        gram = delta.T @ delta
        rows, cols = delta.shape
        offset = start - delta
        term = (offset @ delta.T) @ delta if 2 * rows < cols else offset @ gram  # (τ₀ − δᵢ)Gᵢ
        A = gram.mul_(c) if A is None else A.add_(gram, alpha=c)
        R = term.mul_(c) if R is None else R.add_(term, alpha=c)
    return None if A is None else (A, R)


def adam_minimize(A: torch.Tensor, R: torch.Tensor, steps: int, learning_rate: float) -> torch.Tensor:
    """Δ after ``steps`` Adam steps (Kingma & Ba, 2015; torch.optim.Adam with betas (0.9, 0.999)
    and ε 1e-8, as the paper's code) on WUDI's objective at τ₀ + Δ from Δ = 0, with the gradient
    in closed form, 2(ΔA + R) (``interference_terms``): one (rows × cols) by (cols × cols) product
    a step. Deterministic: nothing is random."""
    delta = torch.zeros_like(R)
    if steps == 0:
        return delta
    delta.grad = torch.empty_like(delta)
    optimizer = torch.optim.Adam([delta], lr=learning_rate, betas=BETAS, eps=EPS, fused=True)
    for step in range(steps):
        torch.addmm(R, delta, A, beta=2.0, alpha=2.0, out=delta.grad)
        optimizer.step()
        report_steps(step + 1, steps)  # progress within the tensor, and where Stop takes effect
    delta.grad = None
    return delta


def exact_minimizer(A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Δ = −R(A + εI)⁻¹: WUDI's objective at τ₀ + Δ minimized in closed form, in A's dtype.

    The minimizer solves ΔA = −R (the gradient 2(ΔA + R) is zero); A is singular when the
    matrix has more columns than the tasks have rows in all, or for low-rank (LoRA) task vectors,
    and then the minimizers form a family. The ridge ε = ``EXACT_FLOOR``·‖A‖_F (‖A‖_F lies between
    λ_max and √rank·λ_max) picks the one nearest the start: it minimizes the objective plus
    ε‖Δ‖²_F, so directions the task vectors do not constrain stay at task arithmetic, as gradient
    steps would leave them. Where A's eigenvalues are ≫ ε it is the exact minimizer.
    """
    ridge = EXACT_FLOOR * float(torch.linalg.matrix_norm(A))
    system = A.clone()
    system.diagonal().add_(ridge)
    target = -R.T
    factor, info = torch.linalg.cholesky_ex(system)
    solution = torch.cholesky_solve(target, factor) if int(info) == 0 else torch.linalg.solve(system, target)
    return solution.T


def wudi_update(deltas: list[torch.Tensor], weights: list[float], steps: int, learning_rate: float,
                solver: str = "adam") -> torch.Tensor:
    """τ* (float32) for one matrix from its float32 task vectors δᵢ, from τ₀ = Σ wᵢδᵢ:
    ``solver`` ``adam`` (the paper's ``steps`` Adam steps) or ``exact`` (``exact_minimizer``,
    float64)."""
    start = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        start.add_(delta, alpha=weight)
    exact = solver == "exact"
    terms = interference_terms(deltas, weights, start, torch.float64 if exact else torch.float32)
    if terms is None:  # no task has a term: nothing moves the start
        return start
    change = exact_minimizer(*terms).float() if exact else adam_minimize(*terms, steps, learning_rate)
    return start.add_(change)


@register(MethodSpec(
    name="wudi",
    title="WUDI-Merging (data-free interference minimization)",
    paper=_PAPER,
    summary="Per matrix τ* = argmin Σ wᵢ‖(τ − δᵢ)δᵢᵀ‖²_F/‖δᵢ‖²_F by Adam from τ₀ = Σ wᵢδᵢ; θ = θ_base + λτ*; "
            "other tensors: θ_base + λ·Σ wᵢδᵢ / Σ wᵢ.",
    params=(TASK_WEIGHT, LAMBDA, STEPS, LEARNING_RATE, SOLVER),
    needs_base=True,
    base="origin",
    family="subspace",
    guidance="The paper uses no tuning: weights 1, λ 1, Adam with learning rate 1e-5 for 300 steps (its "
             "language-model code 2e-5; FusionBench 400 steps). Each weight matrix costs steps products of "
             "(rows × cols) by (cols × cols): fast on a GPU, but 1-2 minutes per 768×3072 matrix on a 2-core "
             "CPU; solver exact takes a few seconds per matrix instead, but is not the paper's result.",
    suggested={"weight": 1.0, "lambda": 1.0},
))
def wudi(base, tensors, per_model, params, seed):
    """WUDI per tensor: θ_base + λ·``wudi_update`` for a matrix, else the mean task vector."""
    weights, lam = [p["weight"] for p in per_model], params["lambda"]
    if base.ndim != 2:
        return mean_task_vector(base, tensors, weights, lam)
    deltas = [task_matrix(base, tensor) for tensor in tensors]
    tau = wudi_update(deltas, weights, params["steps"], params["learning_rate"], params["solver"])
    return torch.add(base.float(), tau, alpha=lam)  # not base.float().add_: a float32 base is the caller's

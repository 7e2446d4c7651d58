"""WUDI-Merging (Cheng et al., 2025, https://arxiv.org/abs/2503.08099).

The method against an independent float64 implementation of the paper: its objective
Σᵢ wᵢ‖(τ − δᵢ)δᵢᵀ‖²_F/‖δᵢ‖²_F differentiated by autograd and Adam written out from Kingma & Ba
(at unit scale and at a scale where Adam's ε matters, so a wrong gradient scale shows), and the
exact solver against a least-squares solve of the same objective (full rank and LoRA-like rank
deficiency). Then the properties the issue names: the objective falls from task arithmetic, one
task gives that task back, runs repeat bit for bit, and a real merge of the tiny Llama family
loads with transformers with its non-matrix tensors the weighted mean task vector.
"""

from __future__ import annotations

import pytest
import torch

from merging.methods import get_method
from tests.support.families import load_tensors

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # hundreds of small products per merge

WEIGHTS = [1.0, 0.5, 2.0]
BETA1, BETA2, EPSILON = 0.9, 0.999, 1e-8  # Adam's defaults (Kingma & Ba, 2015), as the paper's code


def run(base, tensors, weights=None, **params):
    method = get_method("wudi")
    weights = weights or [1.0] * len(tensors)
    defaults = {p.name: p.default for p in method.spec.global_params()}
    return method(base, tensors, [{"weight": w} for w in weights], defaults | params, seed=0)


def family(shape, n=3, scale=1.0, seed=0, base_scale=1.0):
    """A base and n fine-tunes θᵢ = θ_base + δᵢ with δᵢ of size ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    base = base_scale * torch.randn(shape, generator=generator)
    return base, [base + scale * torch.randn(shape, generator=generator) for _ in range(n)]


def task_vectors(base, tensors):
    return [t.double() - base.double() for t in tensors]


# -- the paper, written out in float64 ----------------------------------------------------------------

def paper_objective(tau, deltas, weights):
    """Σᵢ wᵢ‖(τ − δᵢ)δᵢᵀ‖²_F / ‖δᵢ‖²_F (the paper's weights are all 1)."""
    return sum(w * ((tau - d) @ d.T).square().sum() / d.square().sum() for d, w in zip(deltas, weights))


def task_arithmetic(deltas, weights):
    return sum(w * d for d, w in zip(deltas, weights))


def paper_adam(deltas, weights, steps, learning_rate):
    """Adam (Kingma & Ba, 2015, Algorithm 1) on the objective by autograd, from Σ wᵢδᵢ."""
    tau = task_arithmetic(deltas, weights).clone().requires_grad_()
    m, v = torch.zeros_like(tau), torch.zeros_like(tau)
    for t in range(1, steps + 1):
        (g,) = torch.autograd.grad(paper_objective(tau, deltas, weights), tau)
        m = BETA1 * m + (1 - BETA1) * g
        v = BETA2 * v + (1 - BETA2) * g * g
        with torch.no_grad():
            tau -= learning_rate * (m / (1 - BETA1**t)) / ((v / (1 - BETA2**t)).sqrt() + EPSILON)
    return tau.detach()


def least_squares_minimizer(deltas, weights):
    """The objective's minimizer of least norm: Σᵢ ‖τ(√cᵢδᵢ)ᵀ − √cᵢδᵢδᵢᵀ‖², cᵢ = wᵢ/‖δᵢ‖², is one
    least-squares problem M τᵀ = Y with M the stacked √cᵢδᵢ. Singular values of M below 1e-5·σ₁
    are the float32 storage rounding of θᵢ (a low-rank δᵢ is full rank at 1e-7·σ₁), not task
    directions: the pseudo-inverse leaves them out."""
    roots = [(w / d.square().sum()).sqrt() for d, w in zip(deltas, weights)]
    M = torch.cat([r * d for r, d in zip(roots, deltas)])
    Y = torch.cat([r * d @ d.T for r, d in zip(roots, deltas)])
    return torch.linalg.lstsq(M, Y, rcond=1e-5, driver="gelsd").solution.T


def low_rank_family(shape, rank, n=3, seed=0):
    """Fine-tunes whose task vectors have rank ``rank`` (LoRA-like): the objective is flat off their rows."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)

    def lora():  # B·A, as an adapter adds it
        return torch.randn(shape[0], rank, generator=generator) @ torch.randn(rank, shape[1], generator=generator)

    return base, [base + lora() for _ in range(n)]


# -- against the float64 implementation --------------------------------------------------------------

@pytest.mark.parametrize("scale, learning_rate", [(1.0, 1e-2), (1e-3, 1e-5), (1e-6, 1e-8)])
def test_wudi_takes_the_papers_adam_steps_on_its_objective(scale, learning_rate):
    # at scale 1e-6 the gradients are near Adam's ε, so a gradient off by 2x moves the result by 3%
    # (the base as small, so that float32 θ = θ_base + λτ keeps τ's digits)
    base, tensors = family((12, 20), scale=scale, base_scale=scale)
    merged = run(base, tensors, WEIGHTS, learning_rate=learning_rate, **{"lambda": 0.7})
    deltas = task_vectors(base, tensors)
    expected = paper_adam(deltas, WEIGHTS, 300, learning_rate)
    moved = (expected - task_arithmetic(deltas, WEIGHTS)).abs().max()
    assert ((merged.double() - base.double()) / 0.7 - expected).abs().max() < 1e-4 * moved + 1e-6 * scale


@pytest.mark.parametrize("case", ["full rank", "rank deficient"])
def test_the_exact_solver_returns_the_minimizer_nearest_task_arithmetic(case):
    base, tensors = family((12, 20)) if case == "full rank" else low_rank_family((16, 40), rank=3)
    deltas = task_vectors(base, tensors)
    tau = run(base, tensors, WEIGHTS, solver="exact").double() - base.double()
    expected = least_squares_minimizer(deltas, WEIGHTS)
    assert (tau - expected).abs().max() < 1e-4 * expected.abs().max()
    if case == "rank deficient":  # the task vectors' 9 row directions are all the objective sees; on
        # the other 31 the result keeps task arithmetic (nothing: its rows lie in those 9 too)
        rows = torch.linalg.svd(torch.cat(deltas)).Vh[:9]
        assert (tau - tau @ rows.T @ rows).abs().max() < 1e-5 * tau.abs().max()


# -- properties ------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["adam", "exact"])
def test_wudi_lowers_its_own_objective_from_task_arithmetic(solver):
    # task vectors the size of a language-model fine-tune's, and the paper's steps and learning rate
    base, tensors = family((32, 48), scale=1e-3)
    deltas = task_vectors(base, tensors)
    start = paper_objective(task_arithmetic(deltas, WEIGHTS), deltas, WEIGHTS)
    merged = run(base, tensors, WEIGHTS, solver=solver)
    reached = paper_objective(merged.double() - base.double(), deltas, WEIGHTS)
    assert reached < 0.5 * start
    if solver == "exact":
        adam = run(base, tensors, WEIGHTS).double() - base.double()
        assert reached <= paper_objective(adam, deltas, WEIGHTS)


@pytest.mark.parametrize("solver", ["adam", "exact"])
def test_one_task_gives_back_that_task(solver):
    # its own task vector is the objective's minimum: Adam's first gradient is exactly zero
    base, (tuned,) = family((10, 14), n=1, scale=0.05)
    merged = run(base, [tuned], solver=solver, **{"lambda": 0.6})
    assert torch.allclose(merged, base + 0.6 * (tuned - base), rtol=0, atol=1e-6)  # float32 rounding of θ


def test_wudi_repeats_bit_for_bit():
    base, tensors = family((48, 64), scale=1e-2)
    assert torch.equal(run(base, tensors), run(base, tensors))


def test_models_with_weight_zero_or_no_change_are_left_out():
    base, tensors = family((12, 20), n=2, scale=0.1)
    merged = run(base, [*tensors, base.clone(), tensors[0] + 1.0], [1.0, 1.0, 1.0, 0.0])
    assert torch.isfinite(merged).all()
    assert torch.allclose(merged, run(base, tensors), atol=1e-6)


def test_other_tensors_take_lambda_times_the_weighted_mean_task_vector():
    base, tensors = family((16,))
    merged = run(base, tensors, WEIGHTS, **{"lambda": 1.5})
    mean = sum(w * (t - base) for t, w in zip(tensors, WEIGHTS)) / sum(WEIGHTS)
    assert torch.allclose(merged, base + 1.5 * mean, atol=1e-6)


def test_the_spec_carries_the_papers_settings():
    spec = get_method("wudi").spec
    assert spec.paper == "https://arxiv.org/abs/2503.08099" and spec.family == "subspace"
    assert spec.needs_base and spec.base == "origin"
    defaults = {p.name: p.default for p in spec.params}
    assert defaults == {"weight": 1.0, "lambda": 1.0, "steps": 300, "learning_rate": 1e-5, "solver": "adam"}


# -- a real merge -----------------------------------------------------------------------------------

def test_a_merged_llama_loads_with_transformers_and_its_vectors_are_the_mean_task_vector(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    from merging.engine import merge
    from merging.recipe import load_recipe

    L, lam = llama_family, 0.8
    recipe = {
        "merge_method": "wudi",
        "base_model": str(L.base),
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(L.finetuned, WEIGHTS)],
        "parameters": {"lambda": lam},
        "dtype": "float32",
    }
    merge(load_recipe(recipe), tmp_path / "wudi", device="cpu")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "wudi")
    merged, base = load_tensors(tmp_path / "wudi"), load_tensors(L.base)
    sources = [load_tensors(p) for p in L.finetuned]
    state = model.state_dict()
    for name, tensor in merged.items():
        assert torch.equal(state[name], tensor), name
        deltas = [s[name].double() - base[name].double() for s in sources]
        tau = (tensor.double() - base[name].double()) / lam
        if tensor.ndim == 1:  # norms: θ_base + λ·Σwᵢδᵢ/Σwᵢ
            mean = sum(w * d for w, d in zip(WEIGHTS, deltas)) / sum(WEIGHTS)
            assert torch.allclose(tau, mean, atol=1e-5), name
        else:  # matrices, the embedding included: less interference than task arithmetic
            start = task_arithmetic(deltas, WEIGHTS)
            assert paper_objective(tau, deltas, WEIGHTS) < paper_objective(start, deltas, WEIGHTS), name
    assert any(n.endswith("norm.weight") for n in merged) and "model.embed_tokens.weight" in merged
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 12]])).logits).all()


def test_a_long_tensor_reports_its_steps_and_stops_within_them(llama_family, tmp_path):
    """The engine hears of WUDI's steps inside one tensor (progress as a fraction of that tensor)
    and Stop takes effect between steps, leaving no output."""
    import threading

    from merging.engine import merge
    from merging.errors import MergeCancelled
    from merging.recipe import load_recipe

    L, cancel, seen = llama_family, threading.Event(), []
    recipe = {"merge_method": "wudi", "base_model": str(L.base), "models": [{"model": str(p)} for p in L.finetuned],
              "parameters": {"steps": 2000}}

    def progress(done, total, name):
        seen.append(done)
        if done != int(done):  # within a tensor: stop there
            cancel.set()

    with pytest.raises(MergeCancelled):
        merge(load_recipe(recipe), tmp_path / "out", device="cpu", progress=progress, cancel=cancel)
    assert not (tmp_path / "out").exists()
    fraction = next(d for d in seen if d != int(d))
    assert 0 < fraction - int(fraction) <= 0.05 + 1e-9  # the first 5% of the tensor, reported once
    assert seen[-1] == fraction  # stopped at the next step, before that tensor finished

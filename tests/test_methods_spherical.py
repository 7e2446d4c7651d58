"""nuslerp, multislerp, karcher and nearswap: parity with mergekit 0.1.5 and the geometry they promise.

The parity cases run through one ``mergekit-multi`` process (``tests/support/mergekit.py``) on the
three session families (Llama tied, Qwen2 with biases, GPT-2 Conv1D) with non-default parameters,
per-model values, gradients and ``{filter, value}`` lists. The property tests check each method
against an independent float64 implementation of its construction, on tensors larger than one
chunk so the chunked passes are exercised.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import load_model_tensors

from merging.errors import RecipeError
from merging.methods import get_method
from merging.methods.kernels import BLOCK
from tests.support.mergekit import MERGEKIT_MULTI, Case, compare, run_mergekit_multi
from tests.support.mergekit import model_entry as _model

BIG = (BLOCK // 400 + 300, 400)  # more than one chunk of entries


def run(name, base, tensors, per_model=None, **params):
    method = get_method(name)
    defaults = {p.name: p.default for p in method.spec.global_params()}
    per_model = per_model or [{} for _ in tensors]
    models = [{p.name: p.default for p in method.spec.model_params()} | m for m in per_model]
    return method(base, tensors, models, defaults | params, seed=0)


def close(a, b, tol=1e-5):
    return (a.double() - b.double()).abs().max().item() <= tol * b.abs().max().item()


# -- parity with mergekit ---------------------------------------------------------------------


def build_cases(L, Q, G) -> dict[str, Case]:
    return {
        # task vectors interpolated; the second weight a gradient over the 3 layers (t varies)
        "nuslerp_llama_base": Case({
            "merge_method": "nuslerp", "base_model": str(L.base),
            "models": [_model(L.finetuned[0], weight=0.3), _model(L.finetuned[1], weight=[0.2, 0.9])],
            "dtype": "float32",
        }, None),
        # the models themselves, one angle per row; a {filter, value} weight
        "nuslerp_qwen2_rows": Case({
            "merge_method": "nuslerp",
            "models": [_model(Q.finetuned[0], weight=[{"filter": "mlp", "value": 0.2}, {"value": 0.6}]),
                       _model(Q.finetuned[1], weight=0.5)],
            "parameters": {"nuslerp_flatten": False},
            "dtype": "float32",
        }, None),
        # base listed among the models; one angle per vector along the first dimension (Conv1D)
        "nuslerp_gpt2_row_wise": Case({
            "merge_method": "nuslerp", "base_model": str(G.base),
            "models": [_model(G.base), _model(G.finetuned[0], weight=0.7), _model(G.finetuned[1], weight=0.4)],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            "dtype": "float32",
        }, None),
        "multislerp_llama_base": Case({
            "merge_method": "multislerp", "base_model": str(L.base),
            "models": [_model(L.finetuned[0], weight=0.5), _model(L.finetuned[1], weight=[0.2, 1.0]),
                       _model(L.finetuned[2], weight=0.3)],
            "dtype": "float32",
        }, None),
        "multislerp_qwen2_unnormalized": Case({
            "merge_method": "multislerp",
            "models": [_model(Q.finetuned[0], weight=[{"filter": "self_attn", "value": 0.3}, {"value": 0.5}]),
                       _model(Q.finetuned[1], weight=0.4)],
            "parameters": {"normalize_weights": False, "eps": 1e-6},
            "dtype": "float32",
        }, None),
        "multislerp_gpt2": Case({
            "merge_method": "multislerp", "base_model": str(G.base),
            "models": [_model(G.finetuned[0], weight=1.0), _model(G.base), _model(G.finetuned[1], weight=2.0)],
            "dtype": "float32",
        }, None),
        # the base, not listed, is appended and averaged in as a fourth model
        "karcher_llama_base": Case({
            "merge_method": "karcher", "base_model": str(L.base),
            "models": [_model(m) for m in L.finetuned],
            "parameters": {"max_iter": 5, "tol": 1e-7},
            "dtype": "float32",
        }, None),
        "karcher_qwen2_filter": Case({
            "merge_method": "karcher",
            "models": [_model(m) for m in Q.finetuned],
            "parameters": {"tol": [{"filter": "self_attn", "value": 1e-9}, {"value": 1e-5}]},
            "dtype": "float32",
        }, None),
        "karcher_gpt2": Case({
            "merge_method": "karcher", "base_model": str(G.base),
            "models": [_model(G.finetuned[0]), _model(G.base), _model(G.finetuned[1])],
            "dtype": "float32",
        }, None),
        "nearswap_llama_gradient": Case({
            "merge_method": "nearswap", "base_model": str(L.base),
            "models": [_model(L.finetuned[0])],
            "parameters": {"t": [0.0002, 0.001]},
            "dtype": "float32",
        }, None),
        "nearswap_qwen2_filter": Case({
            "merge_method": "nearswap", "base_model": str(Q.base),
            "models": [_model(Q.finetuned[1]), _model(Q.base)],
            "parameters": {"t": [{"filter": "mlp", "value": 0.001}, {"value": 0.003}]},
            "dtype": "float32",
        }, None),
        "nearswap_gpt2": Case({
            "merge_method": "nearswap", "base_model": str(G.base),
            "models": [_model(G.finetuned[0])],
            "parameters": {"t": 0.0002},
            "dtype": "float32",
        }, None),
    }


CASE_NAMES = [
    "nuslerp_llama_base", "nuslerp_qwen2_rows", "nuslerp_gpt2_row_wise",
    "multislerp_llama_base", "multislerp_qwen2_unnormalized", "multislerp_gpt2",
    "karcher_llama_base", "karcher_qwen2_filter", "karcher_gpt2",
    "nearswap_llama_gradient", "nearswap_qwen2_filter", "nearswap_gpt2",
]


@pytest.fixture(scope="module")
def cases(llama_family, qwen2_family, gpt2_family) -> dict[str, Case]:
    return build_cases(llama_family, qwen2_family, gpt2_family)


@pytest.fixture(scope="module")
def theirs(cases, tmp_path_factory) -> dict[str, Path]:
    if not MERGEKIT_MULTI:
        pytest.skip("mergekit is not installed (pip install -r requirements-dev.txt)")
    return run_mergekit_multi({name: case.recipe for name, case in cases.items()}, tmp_path_factory.mktemp("mergekit"))


@pytest.fixture(scope="module")
def ours(cases, tmp_path_factory) -> dict[str, Path]:
    from merging import load_recipe, merge

    root = tmp_path_factory.mktemp("ours")
    for name, case in cases.items():
        merge(load_recipe(case.recipe), root / name, device="cpu")
    return {name: root / name for name in cases}


def test_case_list_is_complete(cases):
    assert sorted(CASE_NAMES) == sorted(cases)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_same_tensors_as_mergekit(name, cases, ours, theirs):
    assert compare(cases[name], load_model_tensors(ours[name]), load_model_tensors(theirs[name])) == []


def test_parameters_really_vary_across_the_cases(ours, llama_family):
    """The gradient and filter cases are not degenerate: nearswap's t gradient takes more of the
    fine-tune in the last layer than in the first."""
    merged, base = load_model_tensors(ours["nearswap_llama_gradient"]), load_model_tensors(llama_family.base)
    other = load_model_tensors(llama_family.finetuned[0])

    def taken(layer):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        return ((merged[name] - base[name]).norm() / (other[name] - base[name]).norm()).item()

    assert 0.1 < taken(0) < taken(2) < 0.9


def test_a_merged_folder_loads_with_transformers(ours):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ours["karcher_llama_base"])
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


# -- nuslerp -----------------------------------------------------------------------------------


def slerp64(a, b, t):
    """Reference: slerp of two float64 vectors along their last dimension."""
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True))
    theta = torch.acos(cos.clamp(-1, 1))
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def test_nuslerp_without_a_base_and_weights_one_minus_t_and_t_is_slerp():
    torch.manual_seed(0)
    a, b = torch.randn(64, 32), torch.randn(64, 32)
    for t in (0.0, 0.3, 1.0):
        merged = run("nuslerp", None, [a, b], [{"weight": 1 - t}, {"weight": t}])
        assert close(merged, run("slerp", None, [a, b], t=t)), t


def test_nuslerp_with_a_base_interpolates_the_task_vectors_on_the_sphere():
    torch.manual_seed(1)
    base = torch.randn(200)
    d1 = torch.zeros(200)
    d1[:100] = 1.0
    d2 = torch.zeros(200)
    d2[100:] = 1.0  # orthogonal task vectors of equal norm
    x1, x2 = base + d1, base + d2
    assert close(run("nuslerp", base, [x1, x2], [{"weight": 2.0}, {"weight": 0.0}]), x1)
    assert close(run("nuslerp", base, [x1, x2], [{"weight": 0.0}, {"weight": 5.0}]), x2)
    half = math.sin(math.pi / 4)  # t = 0.5 on a quarter circle
    assert close(run("nuslerp", base, [x1, x2], [{"weight": 1.0}, {"weight": 1.0}]), base + half * (d1 + d2))
    # weights summing to ~0 give t = 0.5, as in mergekit
    assert close(run("nuslerp", base, [x1, x2], [{"weight": 1.0}, {"weight": -1.0}]), base + half * (d1 + d2))


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_unflattened_measures_one_angle_per_vector(row_wise):
    torch.manual_seed(2)
    base = torch.randn(BIG)
    x1, x2 = base + 0.3 * torch.randn(BIG), base + 0.3 * torch.randn(BIG)
    merged = run("nuslerp", base, [x1, x2], [{"weight": 0.25}, {"weight": 0.75}],
                 nuslerp_flatten=False, nuslerp_row_wise=row_wise)
    d1, d2 = (x.double() - base.double() for x in (x1, x2))
    if row_wise:  # vectors along the first dimension (columns of the stored matrix)
        expected = slerp64(d1.T, d2.T, 0.75).T
    else:
        expected = slerp64(d1, d2, 0.75)
    assert close(merged, base.double() + expected)
    flattened = run("nuslerp", base, [x1, x2], [{"weight": 0.25}, {"weight": 0.75}])
    assert close(flattened, base.double() + slerp64(d1.reshape(-1), d2.reshape(-1), 0.75).reshape(BIG))


def test_nuslerp_lerps_collinear_vectors_and_treats_a_zero_task_vector_as_orthogonal():
    base, x = torch.zeros(10), torch.arange(10.0)
    assert close(run("nuslerp", None, [x, 3 * x], [{"weight": 0.5}, {"weight": 0.5}]), 2 * x)
    # δ₁ = 0: cos Ω = 0, so the result is sin(tπ/2)·δ₂ (mergekit's behaviour)
    merged = run("nuslerp", base, [base, x], [{"weight": 0.5}, {"weight": 0.5}])
    assert close(merged, math.sin(math.pi / 4) * x)


# -- multislerp --------------------------------------------------------------------------------


def multislerp64(deltas, weights):
    """Reference: Goddard's construction step by step in float64 (sphere, tangent space, exp map)."""
    flat = torch.stack([d.double().reshape(-1) for d in deltas])
    w = torch.tensor(weights, dtype=torch.float64)
    norms = flat.norm(dim=1, keepdim=True)
    units = flat / norms
    mean = (w[:, None] * units).sum(0)
    mean = mean / mean.norm()
    tangents = units - (units @ mean)[:, None] * mean  # log map (projection) at the mean
    step = (w[:, None] * tangents).sum(0)
    length = step.norm()
    on_sphere = mean * torch.cos(length) + (step * torch.sin(length) / length if length > 0 else 0)
    return (on_sphere * (w * norms[:, 0]).sum()).reshape(deltas[0].shape)


def test_multislerp_is_the_barycentre_on_the_sphere_scaled_to_the_mean_norm():
    torch.manual_seed(3)
    base = torch.randn(BIG)
    models = [base + s * torch.randn(BIG) for s in (0.1, 0.2, 0.4)]
    weights = [0.5, 0.2, 0.3]
    merged = run("multislerp", base, models, [{"weight": w} for w in weights])
    expected = base.double() + multislerp64([m - base for m in models], weights)
    assert close(merged, expected)
    # normalize_weights: false keeps the weights as given (here summing to 2)
    merged = run("multislerp", None, models, [{"weight": 2 * w} for w in weights], normalize_weights=False)
    assert close(merged, multislerp64(models, [2 * w for w in weights]))


def test_multislerp_of_one_model_is_that_model_and_of_copies_is_the_copy():
    x = torch.randn(30, 7)
    assert torch.equal(run("multislerp", torch.zeros(30, 7), [x]), x)
    assert close(run("multislerp", None, [x, x.clone(), x.clone()], [{"weight": w} for w in (1, 2, 3)]), x)


def test_multislerp_of_antipodal_pairs_falls_back_to_the_lerp_and_refuses_three():
    x = torch.randn(50)
    merged = run("multislerp", None, [x, -x], [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.equal(merged, torch.zeros(50))  # 0.5·x + 0.5·(−x), as mergekit
    with pytest.raises(RecipeError, match="weights"):
        run("multislerp", None, [x, -x, x], [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}])


def test_multislerp_returns_the_base_where_every_model_equals_it():
    """mergekit raises for three or more models here (their mean direction is 0); the base is the
    only sensible answer, and what mergekit gives for two."""
    base = torch.randn(40)
    for n in (2, 3):
        assert torch.equal(run("multislerp", base, [base.clone() for _ in range(n)]), base)


def test_multislerp_refuses_weights_summing_to_zero_when_normalizing():
    x, y = torch.randn(10), torch.randn(10)
    with pytest.raises(RecipeError, match="normalize_weights"):
        run("multislerp", None, [x, y], [{"weight": 1.0}, {"weight": -1.0}])


# -- karcher -----------------------------------------------------------------------------------


def test_karcher_of_two_models_is_their_geodesic_midpoint_at_the_mean_norm():
    torch.manual_seed(4)
    a, b = torch.randn(BIG), 3 * torch.randn(BIG)
    merged = run("karcher", None, [a, b])
    ua, ub = (x.double() / x.double().norm() for x in (a, b))
    midpoint = (ua + ub) / (ua + ub).norm()
    assert close(merged, midpoint * (a.double().norm() + b.double().norm()) / 2)


def test_karcher_converges_to_a_critical_point_of_the_squared_geodesic_distances():
    torch.manual_seed(5)
    models = [torch.randn(3000) + s for s in (0.0, 0.5, 1.0)]  # far apart: several steps
    merged = run("karcher", None, models, max_iter=100, tol=1e-9).double().reshape(-1)
    mu = merged / merged.norm()
    gradient = torch.zeros_like(mu)
    for x in models:
        u = x.double().reshape(-1) / x.double().norm()
        cos = (mu @ u).clamp(-1, 1)
        theta = torch.acos(cos)
        gradient += theta / torch.sin(theta) * (u - cos * mu)  # log map of u at μ
    assert gradient.norm() < 1e-5
    mean_norm = sum(x.double().norm() for x in models) / 3
    assert abs(merged.norm() - mean_norm) < 1e-5 * mean_norm
    # the first step already moves from the Euclidean mean direction (max_iter 0)
    start = run("karcher", None, models, max_iter=0).double().reshape(-1)
    assert not close(start, merged, 1e-4)


def test_karcher_leaves_negligible_models_out_of_the_direction_but_in_the_norm():
    torch.manual_seed(6)
    a, b = torch.randn(100), torch.randn(100)
    with_zero = run("karcher", None, [a, torch.zeros(100), b])
    without = run("karcher", None, [a, b])
    assert close(with_zero, without * 2 / 3)
    assert torch.equal(run("karcher", None, [torch.zeros(5), torch.full((5,), 1e-9)]), torch.zeros(5))


# -- nearswap ----------------------------------------------------------------------------------


def test_nearswap_takes_the_other_value_where_it_is_within_t_and_a_fraction_beyond():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    other = torch.tensor([5e-5, 2e-4, 1.0, 1.0])
    merged = run("nearswap", base, [other], t=1e-4)
    # weights clamp(1e-4 / |Δ|, 0, 1) = [1, 0.5, 1e-4, 1 (|Δ| floored at 1e-6)]
    assert torch.allclose(merged, torch.tensor([5e-5, 1e-4, 1e-4, 1.0]), rtol=1e-6, atol=0)
    assert torch.equal(run("nearswap", base, [other], t=0.0), base)


# -- contracts ---------------------------------------------------------------------------------


def test_no_method_modifies_its_inputs():
    torch.manual_seed(7)
    base = torch.randn(BIG)
    models = [base + 0.1 * torch.randn(BIG) for _ in range(2)]
    copies = [x.clone() for x in (base, *models)]
    run("nuslerp", base, models, nuslerp_flatten=False)
    run("nuslerp", None, models)
    run("multislerp", base, models)
    run("karcher", None, [base, *models])
    run("nearswap", base, models[:1], t=0.01)
    assert all(torch.equal(x, y) for x, y in zip((base, *models), copies))


def test_recipes_get_mergekits_input_contracts(llama_family):
    from merging import load_recipe

    L = llama_family

    def recipe(method, models, base=None, **parameters):
        return {"merge_method": method, "models": [{"model": str(m)} for m in models],
                **({"base_model": str(base)} if base else {}), **({"parameters": parameters} if parameters else {})}

    with pytest.raises(RecipeError, match="nuslerp"):
        load_recipe(recipe("nuslerp", L.finetuned, base=L.base))  # three besides the base
    with pytest.raises(RecipeError, match="nuslerp"):
        load_recipe(recipe("nuslerp", [L.base, L.finetuned[0]], base=L.base))  # one besides the base
    load_recipe(recipe("nuslerp", L.finetuned[:2]))  # the base is optional
    with pytest.raises(RecipeError, match="base_model"):
        load_recipe(recipe("nearswap", L.finetuned[:2], t=0.001))
    with pytest.raises(RecipeError, match="'t'"):
        load_recipe(recipe("nearswap", [L.finetuned[0]], base=L.base))  # t is required, as in mergekit
    with pytest.raises(RecipeError, match="nearswap"):
        load_recipe(recipe("nearswap", L.finetuned[:2], base=L.base, t=0.001))
    load_recipe(recipe("multislerp", L.finetuned[:1], base=L.base))
    assert load_recipe(recipe("karcher", L.finetuned[:2], base=L.base)).input_entries()[-1].model == str(L.base)

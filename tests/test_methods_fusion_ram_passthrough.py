"""Arcee Fusion, RAM, RAM+ (tensor-local) and passthrough: the same tensors as mergekit 0.1.5,
and the properties their sources state.

Every parity case runs through one ``mergekit-multi`` process (``tests/support/mergekit.py``:
tolerance 1e-5 per tensor). The tiny families' tensors fit in one chunk, so the chunked paths
(several chunks, RAM+'s counting pass, Arcee Fusion's row chunks) are compared with mergekit's
own functions in-process on larger tensors, bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import load_model_tensors

from merging import load_recipe, merge
from merging.errors import RecipeError
from merging.methods import get_method
from merging.methods.arcee_fusion import MERGEKIT_QUANTILE_SAMPLE, importance
from merging.methods.kernels import BLOCK
from merging.methods.ram import overlap_counts, unique_scales
from tests.support.mergekit import MERGEKIT_MULTI, Case, compare, run_mergekit_multi
from tests.support.mergekit import model_entry as _model

pytestmark = pytest.mark.skipif(not MERGEKIT_MULTI, reason="mergekit is not installed (pip install -r requirements-dev.txt)")

NORMS = "norm"  # every Llama/Qwen2 norm weight: their deltas are ~50x the matrices' (std 0 at init)


def build_cases(llama, qwen2, gpt2) -> dict[str, Case]:
    """Every parity case. ``epsilon`` is set near each family's typical |δ| (Llama ~7e-4, Qwen2
    ~1.3e-3, GPT-2 ~1e-4) where the defaults would count every entry as shared, so unique,
    shared and unchanged entries all occur; the GPT-2 cases keep the defaults."""
    L, Q, G = llama, qwen2, gpt2
    return {
        # the base listed among the models (mergekit: two inputs, one of them the base)
        "arcee_fusion_llama": Case({
            "merge_method": "arcee_fusion", "base_model": str(L.base),
            "models": [_model(L.base), _model(L.finetuned[0])], "dtype": "float32",
        }, None),
        # the base not listed: both add it to the inputs
        "arcee_fusion_qwen2": Case({
            "merge_method": "arcee_fusion", "base_model": str(Q.base),
            "models": [_model(Q.finetuned[1])], "dtype": "float32",
        }, None),
        "arcee_fusion_gpt2": Case({
            "merge_method": "arcee_fusion", "base_model": str(G.base),
            "models": [_model(G.finetuned[0])], "dtype": "float32",
        }, None),
        # three models; epsilon: a {filter, value} list whose fallback is a gradient over the layers
        "ram_llama_3models": Case({
            "merge_method": "ram", "base_model": str(L.base),
            "models": [_model(m) for m in L.finetuned],
            "parameters": {"epsilon": [{"filter": NORMS, "value": 0.03}, {"value": [0.0005, 0.0012]}]},
            "dtype": "float32",
        }, None),
        "ram_qwen2": Case({
            "merge_method": "ram", "base_model": str(Q.base),
            "models": [_model(m) for m in Q.finetuned], "parameters": {"epsilon": 0.0015}, "dtype": "float32",
        }, None),
        "ram_gpt2_defaults": Case({
            "merge_method": "ram", "base_model": str(G.base),
            "models": [_model(m) for m in G.finetuned], "dtype": "float32",
        }, None),
        # alpha as a gradient: layer 0 caps rho (~1.2 here) at 1, layer 2 leaves it below 2
        "ramplus_tl_llama_3models": Case({
            "merge_method": "ramplus_tl", "base_model": str(L.base),
            "models": [_model(m) for m in L.finetuned],
            "parameters": {"r": 0.5, "alpha": [1.0, 2.0], "epsilon": 0.001}, "dtype": "float32",
        }, None),
        # r by filter; rho ~0.5 with two models at this epsilon, under alpha = 1
        "ramplus_tl_qwen2": Case({
            "merge_method": "ramplus_tl", "base_model": str(Q.base),
            "models": [_model(Q.base), *(_model(m) for m in Q.finetuned)],
            "parameters": {"r": [{"filter": "mlp", "value": 0.3}, {"value": 0.05}], "alpha": 1.0, "epsilon": 0.002},
            "dtype": "float32",
        }, None),
        "ramplus_tl_gpt2_defaults": Case({
            "merge_method": "ramplus_tl", "base_model": str(G.base),
            "models": [_model(m) for m in G.finetuned], "dtype": "float32",
        }, None),
        # a per-model scale by filter, one filter's value a gradient; other tensors default to 1
        "passthrough_llama_filter": Case({
            "merge_method": "passthrough",
            "models": [_model(L.finetuned[1], scale=[{"filter": "o_proj", "value": 0.5},
                                                     {"filter": "down_proj", "value": [0.2, 1.4]}])],
            "dtype": "float32",
        }, None),
        # a global gradient; the base_model is the listed model (mergekit accepts that)
        "passthrough_qwen2_gradient": Case({
            "merge_method": "passthrough", "base_model": str(Q.finetuned[0]),
            "models": [_model(Q.finetuned[0])], "parameters": {"scale": [0.5, 1.5]}, "dtype": "float32",
        }, None),
        "passthrough_gpt2": Case({
            "merge_method": "passthrough", "models": [_model(G.finetuned[1], scale=0.8)], "dtype": "float32",
        }, None),
    }


CASE_NAMES = [
    "arcee_fusion_llama", "arcee_fusion_qwen2", "arcee_fusion_gpt2",
    "ram_llama_3models", "ram_qwen2", "ram_gpt2_defaults",
    "ramplus_tl_llama_3models", "ramplus_tl_qwen2", "ramplus_tl_gpt2_defaults",
    "passthrough_llama_filter", "passthrough_qwen2_gradient", "passthrough_gpt2",
]


@pytest.fixture(scope="module")
def cases(llama_family, qwen2_family, gpt2_family) -> dict[str, Case]:
    return build_cases(llama_family, qwen2_family, gpt2_family)


@pytest.fixture(scope="module")
def mergekit_outputs(cases, tmp_path_factory) -> dict[str, Path]:
    return run_mergekit_multi({name: case.recipe for name, case in cases.items()}, tmp_path_factory.mktemp("mergekit"))


@pytest.fixture(scope="module")
def ours(cases, tmp_path_factory):
    """Our merged folder for a case, made once."""
    root = tmp_path_factory.mktemp("ours")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            merge(load_recipe(cases[name].recipe), root / name, device="cpu")
            done[name] = root / name
        return done[name]

    return get


def run(name, base, tensors, per_model=None, **params):
    """One tensor through a registered method, with its defaults for what is not given."""
    method = get_method(name)
    models = [{p.name: p.default for p in method.spec.model_params()} | m for m in per_model or [{} for _ in tensors]]
    return method(base, tensors, models, {p.name: p.default for p in method.spec.global_params()} | params, seed=0)


def mergekit_tensor(method, tensors, base_index, **parameters):
    """mergekit's method on one group of tensors, in-process (its public call)."""
    from mergekit.merge_methods.base import TensorGroup

    (result,) = method((TensorGroup.from_tensors(tensors, base_index=base_index),), parameters=parameters)
    return result


def sparse_deltas(base, count, seed):
    """Task vectors that change about half the entries each, at the families' scale (~1e-3)."""
    generator = torch.Generator().manual_seed(seed)
    return [base + torch.randn(base.shape, generator=generator) * 1e-3
            * (torch.rand(base.shape, generator=generator) < 0.5) for _ in range(count)]


# -- parity -----------------------------------------------------------------------------------

def test_case_list_is_complete(cases):
    assert sorted(CASE_NAMES) == sorted(cases)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_same_tensors_as_mergekit(name, cases, mergekit_outputs, ours):
    assert compare(cases[name], load_model_tensors(ours(name)), load_model_tensors(mergekit_outputs[name])) == []


def test_ram_cases_have_unique_shared_and_unchanged_entries(llama_family):
    """The parity cases' epsilon makes every branch of RAM count (not only 'shared')."""
    base = load_model_tensors(llama_family.base)
    models = [load_model_tensors(m) for m in llama_family.finetuned]
    name = "model.layers.2.mlp.up_proj.weight"
    changed = torch.stack([(m[name] - base[name]).abs() > 0.0012 for m in models]).sum(0)
    for count in range(4):
        assert (changed == count).float().mean() > 0.01, count


def test_ramplus_case_rescales_below_the_cap(llama_family):
    """In the Llama RAM+ case, rho is capped by alpha in layer 0 (alpha 1) and not in layer 2 (alpha 2)."""
    base = load_model_tensors(llama_family.base)
    models = [load_model_tensors(m) for m in llama_family.finetuned]
    for layer, capped in ((0, True), (2, False)):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        shared, unique = overlap_counts(base[name], [m[name] for m in models], 0.001)
        rho = torch.tensor(shared) / torch.tensor(unique)
        assert bool((rho > 1.0).all() and (rho < 2.0).all()), rho
        scales = unique_scales(shared, unique, 0.5, 1.0 if capped else 2.0, 0.001)
        assert torch.allclose(scales, torch.full((3,), 1.5)) == capped


def test_arcee_fusion_case_applies_some_changes_but_not_all(ours, llama_family):
    merged = load_model_tensors(ours("arcee_fusion_llama"))
    base, other = load_model_tensors(llama_family.base), load_model_tensors(llama_family.finetuned[0])
    name = "model.layers.1.mlp.down_proj.weight"
    from_other = merged[name] == other[name]
    assert torch.equal(merged[name][~from_other], base[name][~from_other])  # every entry is one of the two
    assert 0.001 < from_other.float().mean() < 0.25  # outliers above median + 1.5 IQR


def test_passthrough_scales_only_the_filtered_tensors(ours, llama_family):
    merged, source = load_model_tensors(ours("passthrough_llama_filter")), load_model_tensors(llama_family.finetuned[1])
    assert torch.equal(merged["model.layers.1.self_attn.o_proj.weight"], source["model.layers.1.self_attn.o_proj.weight"] * 0.5)
    assert torch.allclose(merged["model.layers.1.mlp.down_proj.weight"], source["model.layers.1.mlp.down_proj.weight"] * 0.8)
    assert torch.equal(merged["model.layers.1.mlp.up_proj.weight"], source["model.layers.1.mlp.up_proj.weight"])


# -- chunked paths, against mergekit's functions in-process -------------------------------------

def test_ram_and_ramplus_match_mergekit_bit_for_bit_across_chunks():
    from mergekit.merge_methods.ram import ram_merge, ramplus_tl_merge

    base = torch.randn(600, 1000, generator=torch.Generator().manual_seed(1)) * 0.02  # 2.3 chunks
    models = sparse_deltas(base, 3, seed=2)
    assert base.numel() > 2 * BLOCK
    assert torch.equal(run("ram", base, models, epsilon=5e-4), mergekit_tensor(ram_merge, [base, *models], 0, epsilon=5e-4))
    for params in ({}, {"epsilon": 5e-4, "r": 0.5, "alpha": 2.0}):
        ours = run("ramplus_tl", base, models, **params)
        assert torch.equal(ours, mergekit_tensor(ramplus_tl_merge, [base, *models], 0, **params)), params


def test_arcee_fusion_matches_mergekit_bit_for_bit_across_row_chunks():
    from mergekit.merge_methods.arcee_fusion import arcee_fusion_merge_method

    base = torch.randn(600, 1000, generator=torch.Generator().manual_seed(3)) * 0.02  # 3 chunks of 262 rows
    (other,) = sparse_deltas(base, 1, seed=4)
    ours = run("arcee_fusion", base, [other])
    assert torch.equal(ours, mergekit_tensor(arcee_fusion_merge_method, [base, other], 0))
    assert 0 < (ours != base).float().mean() < 0.25
    vector = torch.randn(5000)  # a 1-D tensor: one softmax over all of it
    assert torch.equal(run("arcee_fusion", vector * 0.9, [vector]),
                       mergekit_tensor(arcee_fusion_merge_method, [vector * 0.9, vector], 0))


def test_arcee_fusion_takes_exact_quantiles_above_mergekits_sample_size():
    """Above 1M entries mergekit estimates the quantiles from a random sample; ours stay exact
    (the sorted importance at ⌊q·(n−1)⌋) and so the merge is the same on every run."""
    from mergekit.merge_methods.arcee_fusion import arcee_fusion_merge_method

    base = torch.randn(1010, 1000, generator=torch.Generator().manual_seed(5)) * 0.02
    (other,) = sparse_deltas(base, 1, seed=6)
    n = base.numel()
    assert n > MERGEKIT_QUANTILE_SAMPLE
    score = importance(other, base)
    ordered = score.reshape(-1).sort().values
    q1, median, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    keep = score >= median + 1.5 * (q3 - q1)
    ours = run("arcee_fusion", base, [other])
    assert torch.equal(ours, base + (other - base) * keep)
    assert torch.equal(run("arcee_fusion", base, [other]), ours)
    theirs = mergekit_tensor(arcee_fusion_merge_method, [base, other], 0)  # sampled: close, not equal
    assert (ours != theirs).float().mean() < 0.01


# -- the methods' own properties --------------------------------------------------------------

def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_ram_keeps_unique_updates_whole_and_averages_shared_ones():
    base = t(1.0, 1.0, 1.0, 1.0, 1.0)
    a = base + t(0.5, 0.0, 2.0, 0.0, 1e-6)  # the last change is below epsilon: unchanged
    b = base + t(0.0, 0.0, 4.0, 3.0, 0.0)
    assert torch.allclose(run("ram", base, [a, b], epsilon=1e-5), base + t(0.5, 0.0, 3.0, 3.0, 0.0))


def test_ramplus_scales_each_models_unique_updates_by_its_shared_to_unique_ratio():
    base = torch.zeros(6)
    a = t(1.0, 0.0, 2.0, 5.0, 0.0, 0.0)  # shared at 2 and 3, alone at 0: rho = 2 / 1
    b = t(0.0, 0.0, 4.0, 1.0, 3.0, 7.0)  # shared at 2 and 3, alone at 4 and 5: rho = 2 / 2
    merged = run("ramplus_tl", base, [a, b], r=0.5, alpha=1.5)
    # lambda_a = 1 + 0.5 * min(2, 1.5) = 1.75, lambda_b = 1 + 0.5 * min(1, 1.5) = 1.5
    assert torch.allclose(merged, t(1.75, 0.0, 3.0, 3.0, 4.5, 10.5))
    assert torch.allclose(run("ramplus_tl", base, [a, b], r=0.0), run("ram", base, [a, b]))  # r = 0 is RAM


def test_ramplus_with_no_unique_updates_is_ram():
    base = torch.zeros(3)
    a, b = t(1.0, 2.0, 0.0), t(3.0, 2.0, 0.0)  # unique counts 0: rho = shared / epsilon, capped
    assert torch.equal(run("ramplus_tl", base, [a, b]), run("ram", base, [a, b]))


def test_ramplus_with_epsilon_zero_and_an_unchanged_model_stays_finite():
    """mergekit computes rho = 0 / max(0, epsilon) = NaN for a model without changes when
    epsilon is 0, and its whole tensor becomes NaN; ours gives that model rho = 0."""
    base = torch.zeros(4)
    a = t(1.0, 2.0, 0.0, 3.0)
    merged = run("ramplus_tl", base, [a, base.clone()], epsilon=0.0)
    assert torch.equal(merged, a)  # a alone everywhere (shared 0: rho 0), b changes nothing
    assert torch.isfinite(merged).all()


@pytest.mark.parametrize("name", ["ram", "ramplus_tl", "arcee_fusion"])
def test_models_equal_to_the_base_give_the_base(name):
    base = torch.randn(33, 17)
    inputs = [base.clone()] if name == "arcee_fusion" else [base.clone(), base.clone()]
    assert torch.equal(run(name, base, inputs), base)


def test_arcee_fusion_keeps_the_changes_whose_importance_is_an_outlier():
    """Against a float64 reading of the definition: importance = |δ|·KL(softmax θ ‖ softmax θ_base)
    per row, kept where >= median + 1.5·IQR (mergekit's quantile positions ⌊q·(n−1)⌋)."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(40, 30, generator=generator)
    other = base + torch.randn(40, 30, generator=generator) * torch.rand(40, 1, generator=generator)
    x, b = other.double(), base.double()
    p, q = torch.softmax(x, -1) + 1e-8, torch.softmax(b, -1) + 1e-8
    score = (x - b).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    ordered = score.reshape(-1).sort().values
    n = score.numel()
    q1, median, q3 = (ordered[math.floor(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    assert ((score - threshold).abs() > 1e-6 * threshold).all()  # no entry is a float32 rounding away from it
    keep = score >= threshold
    assert 0 < keep.sum() < n // 4
    assert torch.allclose(run("arcee_fusion", base, [other]), torch.where(keep, other, base))


def test_passthrough_copies_or_scales_the_one_model_without_touching_it():
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    before = x.clone()
    copied = run("passthrough", None, [x])
    assert copied.dtype == torch.float32 and torch.equal(copied, x.float())
    assert torch.equal(run("passthrough", None, [x], [{"scale": 0.5}]), x.float() * 0.5)
    assert torch.equal(x, before)


# -- input contracts: as mergekit's --------------------------------------------------------------

CONTRACTS = [  # (method, listed models, base_model, accepted)
    ("passthrough", ["A"], None, True),
    ("passthrough", ["A"], "A", True),  # the base is the one model
    ("passthrough", ["A"], "B", False),  # an unlisted base is appended: two models
    ("passthrough", ["A", "B"], None, False),
    ("arcee_fusion", ["A"], "B", True),
    ("arcee_fusion", ["B", "A"], "B", True),
    ("arcee_fusion", ["A"], None, False),
    ("arcee_fusion", ["A", "C"], "B", False),
    ("ram", ["A", "C"], "B", True),
    ("ram", ["A", "C"], None, False),
    ("ramplus_tl", ["A"], "B", True),
    ("ramplus_tl", ["A", "C"], None, False),
]


@pytest.mark.parametrize("method, listed, base_model, accepted", CONTRACTS)
def test_inputs_are_accepted_and_refused_as_mergekit_does(method, listed, base_model, accepted, tmp_path):
    from mergekit import merge_methods

    inputs = listed + ([base_model] if base_model and base_model not in listed else [])  # mergekit's models: form
    try:
        merge_methods.get(method).validate_inputs(inputs, base_model)
        theirs = True
    except ValueError:
        theirs = False
    recipe = {"merge_method": method, "models": [{"model": str(tmp_path / m)} for m in listed]}
    if base_model:
        recipe["base_model"] = str(tmp_path / base_model)
    try:
        load_recipe(recipe)
        ours = True
    except RecipeError:
        ours = False
    assert ours == theirs == accepted


# -- the merged folder ------------------------------------------------------------------------

def test_merged_folder_loads_with_transformers(ours):
    from transformers import AutoModelForCausalLM

    folder = ours("ramplus_tl_llama_3models")
    model = AutoModelForCausalLM.from_pretrained(folder)
    state = model.state_dict()
    for name, tensor in load_model_tensors(folder).items():
        assert torch.equal(state[name], tensor), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all()

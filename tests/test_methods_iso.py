"""Iso-C and Iso-CTS (Marczak et al., 2025, https://arxiv.org/abs/2502.04959).

Each method against an independent float64 implementation of the paper's algorithms (full-rank
random task matrices, wide and tall), the properties the issue names (a flat spectrum over the
numerical rank, one task of rank r, rank-deficient sums such as LoRA experts', Iso-CTS at
common_space_fraction 1 is Iso-C, a task orthogonal to the others keeps its subspace), and a real
merge of the tiny Llama family that loads with transformers.
"""

from __future__ import annotations

import pytest
import torch

from merging.engine import merge
from merging.methods import get_method
from merging.methods.isotropic import subspace_sizes
from merging.recipe import load_recipe
from tests.support.families import load_tensors

WEIGHTS = [1.0, 0.5, 2.0]


def run(name, base, tensors, weights=None, **params):
    method = get_method(name)
    weights = weights or [1.0] * len(tensors)
    defaults = {p.name: p.default for p in method.spec.global_params()}
    return method(base, tensors, [{"weight": w} for w in weights], defaults | params, seed=0)


def family(shape, n=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(n)]


def low_rank(m, n, r, generator, scale=1.0):
    """B·A of rank r, as a LoRA adapter adds it."""
    return scale * torch.randn(m, r, generator=generator, dtype=torch.float64) @ torch.randn(
        r, n, generator=generator, dtype=torch.float64)


def projector(columns):
    """Orthogonal projector onto span(columns), over its numerical rank (float64)."""
    U, S, _ = torch.linalg.svd(columns.double(), full_matrices=False)
    U = U[:, S > 1e-6 * S[0]]
    return U @ U.T


def rank64(matrix, tol=1e-4):
    s = torch.linalg.svdvals(matrix.double())
    return int((s > tol * s[0]).sum())


# -- the paper's equations in float64 -----------------------------------------------------------

def paper_iso_c(base, tensors, weights, lam):
    """Iso-C: Δ = Σwᵢδᵢ = UΣVᵀ, θ = θ₀ + λ·mean(σ)·UVᵀ (full rank: every σ is nonzero)."""
    base64 = base.double()
    delta = sum(w * (t.double() - base64) for t, w in zip(tensors, weights))
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return base64 + lam * S.mean() * U @ Vh


def paper_iso_cts(base, tensors, weights, lam, fraction):
    """Iso-CTS as the paper's Algorithm 2 and code state it, with d = min(m, n)."""
    base64 = base.double()
    deltas = [w * (t.double() - base64) for t, w in zip(tensors, weights)]
    T, d = len(deltas), min(base.shape)
    k = int(d * fraction)
    s = round((d - k) / T)
    k = d - T * s
    U, S, Vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    lefts, sigmas, rights = [U[:, :k]], [S[:k]], [Vh[:k]]
    for delta in deltas:
        projected = delta - U[:, :k] @ U[:, :k].T @ delta
        u, sigma, vh = torch.linalg.svd(projected, full_matrices=False)
        lefts.append(u[:, :s]), sigmas.append(sigma[:s]), rights.append(vh[:s])
    left, right = torch.cat(lefts, 1), torch.cat(rights, 0)
    pu, _, qu = torch.linalg.svd(left, full_matrices=False)
    pv, _, qv = torch.linalg.svd(right.T, full_matrices=False)
    return base64 + lam * torch.cat(sigmas).mean() * (pu @ qu) @ (pv @ qv).T


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_iso_c_is_the_papers_mean_singular_value_times_UVt(shape):
    base, tensors = family(shape)
    merged = run("iso_c", base, tensors, WEIGHTS, **{"lambda": 1.3})
    expected = paper_iso_c(base, tensors, WEIGHTS, 1.3)
    assert merged.dtype == torch.float32
    assert torch.allclose(merged.double(), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("shape,fraction", [((24, 40), 0.8), ((40, 24), 0.8), ((30, 30), 0.5), ((24, 40), 0.0)])
def test_iso_cts_is_the_papers_common_plus_task_specific_subspaces(shape, fraction):
    base, tensors = family(shape, seed=1)
    merged = run("iso_cts", base, tensors, WEIGHTS, **{"lambda": 0.7, "common_space_fraction": fraction})
    expected = paper_iso_cts(base, tensors, WEIGHTS, 0.7, fraction)
    assert torch.allclose(merged.double(), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_inputs_are_left_untouched(name):
    base, tensors = family((12, 20))
    before = [base.clone(), *(t.clone() for t in tensors)]
    run(name, base, tensors)
    assert all(torch.equal(a, b) for a, b in zip(before, [base, *tensors]))


def test_subspace_sizes_divide_the_rank_as_the_papers_code():
    assert subspace_sizes(768, 8, 0.8) == (616, 19)  # k₀ = 614, s = round(19.25), k = 768 − 152
    assert subspace_sizes(24, 3, 0.8) == (18, 2)  # the LoRA demo's rank-24 sum
    assert subspace_sizes(24, 3, 1.0) == (24, 0)
    assert subspace_sizes(5, 3, 0.0) == (2, 1)  # the paper's code would make k = −1 here


# -- properties -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [20, 6])
def test_iso_c_update_has_a_flat_spectrum_over_its_numerical_rank(rank):
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(20, 36, generator=generator)
    tensors = [base + low_rank(20, 36, rank // 2, generator).float() for _ in range(2)]
    update = (run("iso_c", base, tensors, **{"lambda": 2.0}) - base).double() / 2.0
    S = torch.linalg.svdvals(update)
    assert torch.allclose(S[:rank], S[:rank].mean().expand(rank), rtol=1e-4)
    assert (S[rank:] < 1e-5 * S[0]).all()


def test_iso_c_of_one_task_of_rank_r_is_lambda_mean_sigma_times_Ur_Vr():
    generator = torch.Generator().manual_seed(3)
    U_r, _ = torch.linalg.qr(torch.randn(40, 5, generator=generator, dtype=torch.float64))
    V_r, _ = torch.linalg.qr(torch.randn(24, 5, generator=generator, dtype=torch.float64))
    sigma = torch.tensor([4.0, 2.5, 1.0, 0.5, 0.2], dtype=torch.float64)
    base = torch.randn(40, 24, generator=generator, dtype=torch.float64)
    task = base + U_r @ torch.diag(sigma) @ V_r.T
    merged = run("iso_c", base.float(), [task.float()], **{"lambda": 1.5})
    expected = base + 1.5 * sigma.mean() * U_r @ V_r.T
    assert torch.allclose(merged.double(), expected, atol=2e-5, rtol=0)


def lora_family(m=48, n=64, ranks=(4, 4, 4), seed=4):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=generator, dtype=torch.float64)
    deltas = [low_rank(m, n, r, generator, 0.01) for r in ranks]
    return base.float(), [(base + d).float() for d in deltas], deltas


def test_iso_c_update_of_a_rank_deficient_sum_has_the_sums_rank_and_span():
    base, tensors, deltas = lora_family()
    delta = sum(deltas)
    update = (run("iso_c", base, tensors) - base).double()
    assert rank64(delta) == 12 and rank64(update) == 12
    # inside the sum's column and row spaces: no completion vector of its null space enters
    U, _, Vh = torch.linalg.svd(delta)
    assert (U[:, :12] @ U[:, :12].T @ update - update).abs().max() < 1e-5 * update.abs().max()
    assert (update @ Vh[:12].T @ Vh[:12] - update).abs().max() < 1e-5 * update.abs().max()
    # and σ̄ is the mean of the 12 nonzero singular values, not of all 48
    S = torch.linalg.svdvals(delta)
    assert torch.allclose(torch.linalg.svdvals(update)[:12], S[:12].mean().expand(12), rtol=1e-4)


@pytest.mark.parametrize("case", ["full rank", "LoRA"])
def test_iso_cts_with_common_space_fraction_1_is_iso_c(case):
    if case == "LoRA":
        base, tensors, _ = lora_family()
    else:
        base, tensors = family((24, 40), seed=5)
    iso_c = run("iso_c", base, tensors, WEIGHTS, **{"lambda": 1.2})
    iso_cts = run("iso_cts", base, tensors, WEIGHTS, **{"lambda": 1.2, "common_space_fraction": 1.0})
    assert torch.allclose(iso_cts, iso_c, atol=1e-5 * float((iso_c - base).abs().max()), rtol=0)


def orthogonal_tasks(seed=6):
    """Three tasks of rank 8 in mutually orthogonal subspaces of R²⁴ (left and right), with
    singular values around 10, 3 and 0.1: the weakest is far below the others in the sum."""
    generator = torch.Generator().manual_seed(seed)
    P, _ = torch.linalg.qr(torch.randn(24, 24, generator=generator, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(24, 24, generator=generator, dtype=torch.float64))
    tasks = []
    for i, scale in enumerate([10.0, 3.0, 0.1]):
        sigma = scale * torch.linspace(1.0, 0.5, 8, dtype=torch.float64)
        block = slice(8 * i, 8 * i + 8)
        tasks.append((P[:, block], sigma, Q[:, block]))
    return tasks


def test_iso_cts_keeps_the_top_directions_of_a_task_orthogonal_to_the_others():
    tasks = orthogonal_tasks()
    base = torch.zeros(24, 24)
    tensors = [(u @ torch.diag(s) @ v.T).float() for u, s, v in tasks]
    # rank 24, fraction 0.5: the common subspace is the sum's top 12 (task 1's 8, task 2's top 4),
    # and each task adds its top 4 outside it (task 1: none left; task 2: its next 4; task 3: its top 4)
    update = run("iso_cts", base, tensors, common_space_fraction=0.5).double()
    left, right = projector(update), projector(update.T)
    (u3, _, v3) = tasks[2]
    for j in range(4):  # task 3's top directions are in the update, though the sum ranks them last
        assert torch.linalg.norm(left @ u3[:, j]) > 1 - 1e-4 and torch.linalg.norm(right @ v3[:, j]) > 1 - 1e-4
    for j in range(4, 8):  # and its weaker half is not
        assert torch.linalg.norm(left @ u3[:, j]) < 1e-3
    for u, _, v in tasks[:2]:  # every task keeps its top direction
        assert torch.linalg.norm(left @ u[:, 0]) > 1 - 1e-4 and torch.linalg.norm(right @ v[:, 0]) > 1 - 1e-4
    # isotropic: 20 equal singular values (12 common + 0 + 4 + 4); task 1 adds no arbitrary direction
    S = torch.linalg.svdvals(update)
    assert torch.allclose(S[:20], S[:20].mean().expand(20), rtol=1e-4) and S[20:].max() < 1e-5 * S[0]
    # whereas Iso-C's flat spectrum over all 24 directions keeps task 3's weaker half too
    iso_c = projector(run("iso_c", base, tensors).double())
    assert torch.linalg.norm(iso_c @ u3[:, 7]) > 1 - 1e-4


def test_iso_cts_of_lora_experts_stays_inside_their_span():
    base, tensors, deltas = lora_family(ranks=(8, 8, 8))
    update = (run("iso_cts", base, tensors, common_space_fraction=0.8) - base).double()
    span_left = projector(torch.cat(deltas, 1))
    span_right = projector(torch.cat([d.T for d in deltas], 1))
    # an arbitrary completion vector would leak O(1); measured 5e-5: the orthogonalization divides
    # the float32 rounding of the experts by the stacked V's smallest singular value, 0.006 here
    assert (span_left @ update - update).abs().max() < 1e-3 * update.abs().max()
    assert (update @ span_right - update).abs().max() < 1e-3 * update.abs().max()
    S = torch.linalg.svdvals(update)
    rank = int((S > 1e-5 * S[0]).sum())
    assert rank <= 24 and torch.allclose(S[:rank], S[:rank].mean().expand(rank), rtol=1e-4)


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_a_zero_task_sum_leaves_the_base(name):
    base = torch.randn(8, 12)
    assert torch.equal(run(name, base, [base.clone(), base.clone()]), base)


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_vectors_take_lambda_times_the_weighted_mean_task_vector(name):
    base, tensors = family((16,))
    merged = run(name, base, tensors, WEIGHTS, **{"lambda": 1.5})
    mean = sum(w * (t - base) for t, w in zip(tensors, WEIGHTS)) / sum(WEIGHTS)
    assert torch.allclose(merged, base + 1.5 * mean, atol=1e-6)


# -- a real merge -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_a_merged_llama_loads_with_transformers_and_its_vectors_are_the_mean_task_vector(name, llama_family, tmp_path):
    # transformers is slow to import: only this test needs it
    from transformers import AutoModelForCausalLM

    L, lam = llama_family, 1.5
    recipe = {
        "merge_method": name,
        "base_model": str(L.base),
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(L.finetuned, WEIGHTS)],
        "parameters": {"lambda": lam},
        "dtype": "float32",
    }
    merge(load_recipe(recipe), tmp_path / name, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
    merged, base = load_tensors(tmp_path / name), load_tensors(L.base)
    sources = [load_tensors(p) for p in L.finetuned]
    state = model.state_dict()
    for tensor_name, tensor in merged.items():
        assert torch.equal(state[tensor_name], tensor), tensor_name
        deltas = [s[tensor_name] - base[tensor_name] for s in sources]
        if tensor.ndim == 1:  # norms: θ_base + λ·Σwᵢδᵢ/Σwᵢ
            mean = sum(w * d for w, d in zip(WEIGHTS, deltas)) / sum(WEIGHTS)
            assert torch.allclose(tensor, base[tensor_name] + lam * mean, atol=1e-6), tensor_name
        else:  # matrices, the embedding included: a flat spectrum
            S = torch.linalg.svdvals((tensor - base[tensor_name]).double())
            assert torch.allclose(S, S.mean().expand_as(S), rtol=1e-3), tensor_name
    assert any(n.endswith("norm.weight") for n in merged) and "model.embed_tokens.weight" in merged
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 12]])).logits).all()

"""TSV-Merge (``tsv``) and Consensus Merging (``consensus_ta``, ``consensus_ties``).

Each method is checked against an independent float64 implementation of its paper's equations
written here with NumPy (not the methods' helpers), on small random matrices, plus the
properties the issue names, and one real merge of the tiny Llama family that transformers loads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import load_model_tensors

from merging.methods import get_method
from merging.methods.kernels import BLOCK
from merging.methods.tsv import tsv_factors

# Small SVDs with two threads on a busy 2-core CPU took 1-3 s each here (20 ms with one)
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def run(name, base, tensors, per_model, **params):
    method = get_method(name)
    defaults = {p.name: p.default for p in method.spec.global_params()}
    models = [{p.name: p.default for p in method.spec.model_params()} | m for m in per_model]
    return method(base, tensors, models, defaults | params, seed=0)


def family_of(shape, tasks=3, scale=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + scale * torch.randn(shape, generator=generator) for _ in range(tasks)]


def deltas64(base, tensors, weights):
    b = base.double().numpy()
    return [w * (x.double().numpy() - b) for x, w in zip(tensors, weights)]


# -- TSV-Merge ---------------------------------------------------------------------------------


def polar64(a):
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def tsv_reference(base, tensors, weights, lam, keep=None):
    """Gargiulo et al. (2025), TSV-M: each wᵢδᵢ = UᵢΣᵢVᵢᵀ cut to its top ``keep`` (default
    ⌊rank/T⌋) components; U = [U₁…U_T], V = [V₁…V_T] replaced by their orthogonal Procrustes
    factors; θ = θ_base + λ·U⊥ diag(Σ₁…Σ_T) V⊥ᵀ."""
    deltas = deltas64(base, tensors, weights)
    keep = keep or min(base.shape) // len(tensors)
    us, ss, vs = [], [], []
    for delta in deltas:
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        us.append(u[:, :keep]), ss.append(s[:keep]), vs.append(vt[:keep].T)
    u_perp, v_perp = polar64(np.hstack(us)), polar64(np.hstack(vs))
    return base.double().numpy() + lam * u_perp @ np.diag(np.concatenate(ss)) @ v_perp.T


@pytest.mark.parametrize("shape", [(30, 21), (21, 30)], ids=["tall", "wide"])
@pytest.mark.parametrize("sv_reduction, keep", [(0.0, None), (0.2, 4)])
def test_tsv_matches_a_float64_implementation_of_the_paper(shape, sv_reduction, keep):
    base, tensors = family_of(shape)
    weights = [0.5, 1.0, 0.8]
    merged = run("tsv", base, tensors, [{"weight": w} for w in weights], sv_reduction=sv_reduction, **{"lambda": 0.7})
    expected = tsv_reference(base, tensors, weights, 0.7, keep)
    assert merged.dtype == torch.float32
    np.testing.assert_allclose(merged.double().numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("sv_reduction", [0.0, 1.0])  # 0 means 1/T, which is 1 for one task
def test_tsv_with_one_task_and_every_component_returns_that_task(sv_reduction):
    base, (x,) = family_of((20, 13), tasks=1)
    merged = run("tsv", base, [x], [{"weight": 0.6}], sv_reduction=sv_reduction, **{"lambda": 1.5})
    torch.testing.assert_close(merged, base + 1.5 * 0.6 * (x - base), rtol=0, atol=2e-6)


def test_tsv_merged_task_matrix_has_orthonormal_singular_bases():
    base, tensors = family_of((36, 24), tasks=4)
    u, sigma, vt = tsv_factors([x - base for x in tensors])
    assert u.shape == (36, 24) and vt.shape == (24, 24)  # 4 tasks x 6 components fill the rank
    torch.testing.assert_close(u.T @ u, torch.eye(24), rtol=0, atol=2e-6)
    torch.testing.assert_close(vt @ vt.T, torch.eye(24), rtol=0, atol=2e-6)
    # seen from the merge alone: Δ's singular values are exactly the kept ones, every task's
    delta = run("tsv", base, tensors, [{}] * 4) - base
    expected = torch.sort(sigma, descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(delta.double()).float(), expected, rtol=1e-5, atol=1e-6)


def test_tsv_keeps_tasks_in_orthogonal_subspaces_unchanged():
    """Low-rank (LoRA-like) task matrices in mutually orthogonal subspaces need no decorrelation:
    Δ = Σ wᵢδᵢ. Their components past the numerical rank are dropped; kept, their arbitrary
    null-space vectors rotated the real ones (an error of 58% of the largest entry)."""
    generator = torch.Generator().manual_seed(3)
    left, _ = torch.linalg.qr(torch.randn(48, 48, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(40, 40, generator=generator, dtype=torch.float64))
    base = torch.randn(48, 40, generator=generator)
    weights = [0.5, 1.0, 0.8]
    scales = 1 + torch.arange(3.0, dtype=torch.float64)
    deltas = [((left[:, 3 * i:3 * i + 3] * scales) @ right[:, 3 * i:3 * i + 3].T).float() for i in range(3)]
    merged = run("tsv", base, [base + d for d in deltas], [{"weight": w} for w in weights])
    expected = base + sum(w * ((base + d) - base) for w, d in zip(weights, deltas))
    torch.testing.assert_close(merged, expected, rtol=0, atol=2e-6)


def test_tsv_of_untouched_matrices_is_the_base():
    base, _ = family_of((12, 9))
    assert torch.equal(run("tsv", base, [base.clone(), base.clone()], [{}, {}]), base)


# -- Consensus Merging -------------------------------------------------------------------------


def tall_masks64(taus, merged, lambdas):
    """Wang et al. (2024): mₜ = |τₜ| ≥ λₜ·|τ_MTL − τₜ|."""
    return [np.abs(tau) >= lam * np.abs(merged - tau) for tau, lam in zip(taus, lambdas)]


def ties64(deltas, weights, density, normalize):
    """TIES (Yadav et al., 2023) on weighted task vectors: keep each δₜ's top ⌊density·n⌋ |δₜ|,
    elect the sign of Σ wₜδₜ, sum the agreeing entries (divided by their total weight)."""
    trimmed = []
    for delta, weight in zip(deltas, weights):
        keep = np.zeros(delta.size, dtype=bool)
        keep[np.argsort(-np.abs(delta), axis=None, kind="stable")[:max(1, int(density * delta.size))]] = True
        trimmed.append(weight * delta * keep.reshape(delta.shape))
    sign = np.where(sum(trimmed) >= 0, 1.0, -1.0)
    agree = [(np.sign(t) == sign) & (t != 0) for t in trimmed]
    total = sum(t * a for t, a in zip(trimmed, agree))
    if not normalize:
        return total
    divisor = sum(w * a for w, a in zip(weights, agree))
    return total / np.where(divisor == 0, 1.0, divisor)


def consensus_reference(base, tensors, weights, lambdas, k, lam, ties=None):
    """θ_base + λ·(m ⊙ τ_MTL), m = Σₜ mₜ ≥ k, τₜ = wₜδₜ, τ_MTL their sum or their TIES merge."""
    deltas = [x.double().numpy() - base.double().numpy() for x in tensors]
    taus = [w * d for w, d in zip(weights, deltas)]
    merged = sum(taus) if ties is None else ties64(deltas, weights, *ties)
    votes = sum(m.astype(int) for m in tall_masks64(taus, merged, lambdas))
    return base.double().numpy() + lam * merged * (votes >= k), votes


WEIGHTS, LAMBDAS = [0.5, 1.0, 0.8], [0.3, 0.5, 0.4]


def per_model(lambdas=LAMBDAS, **extra):
    return [{"weight": w, "tall_mask_lambda": t, **extra} for w, t in zip(WEIGHTS, lambdas)]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_consensus_ta_matches_a_float64_implementation_of_the_paper(k):
    base, tensors = family_of((40, 30))
    merged = run("consensus_ta", base, tensors, per_model(), k=k, **{"lambda": 0.9})
    expected, _ = consensus_reference(base, tensors, WEIGHTS, LAMBDAS, k, 0.9)
    np.testing.assert_allclose(merged.double().numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_consensus_ties_matches_a_float64_implementation_of_the_paper_across_chunks(normalize):
    base, tensors = family_of((BLOCK // 256 + 7, 256))  # two chunks, the trim threshold spanning both
    merged = run("consensus_ties", base, tensors, per_model(density=0.3), k=2, normalize=normalize,
                 **{"lambda": 1.2})
    expected, votes = consensus_reference(base, tensors, WEIGHTS, LAMBDAS, 2, 1.2, ties=(0.3, normalize))
    assert 0.2 < (votes >= 2).mean() < 0.8  # the masks really select: neither everything nor nothing
    np.testing.assert_allclose(merged.double().numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["consensus_ta", "consensus_ties"])
def test_consensus_with_k_1_keeps_what_any_mask_keeps_and_with_k_t_what_all_keep(name):
    base, tensors = family_of((40, 30))
    taus = deltas64(base, tensors, WEIGHTS)
    ties = (0.5, True) if name == "consensus_ties" else None
    merged_tv = sum(taus) if ties is None else ties64([t / w for t, w in zip(taus, WEIGHTS)], WEIGHTS, *ties)
    # with every λₜ ≤ 1/2 the largest of three τₜ always passes (k = 1 would keep all): larger λₜ for k = 1
    for k, lambdas, agree in [(1, [2.0, 3.0, 2.5], np.any), (3, LAMBDAS, np.all)]:
        kept = agree(np.stack(tall_masks64(taus, merged_tv, lambdas)), axis=0)
        delta = run(name, base, tensors, per_model(lambdas, density=0.5), k=k).double().numpy() - base.double().numpy()
        assert 0.1 < kept.mean() < 0.9
        assert (delta[~kept] == 0).all()
        np.testing.assert_allclose(delta[kept], merged_tv[kept], rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_consensus_with_every_mask_all_true_is_the_plain_merge(k):
    """tall_mask_lambda 0 selects every entry for every task: any k up to T keeps them all."""
    base, tensors = family_of((40, 30))
    models = per_model(density=0.4)
    for model in models:
        model["tall_mask_lambda"] = 0.0
    plain_ta = run("task_arithmetic", base, tensors, models, **{"lambda": 0.8})
    torch.testing.assert_close(run("consensus_ta", base, tensors, models, k=k, **{"lambda": 0.8}), plain_ta,
                               rtol=0, atol=1e-6)
    plain_ties = run("ties", base, tensors, models, **{"lambda": 0.8})
    torch.testing.assert_close(run("consensus_ties", base, tensors, models, k=k, **{"lambda": 0.8}), plain_ties,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tsv", "consensus_ta", "consensus_ties"])
def test_tensors_that_are_not_matrices_take_the_weighted_mean_task_vector(name):
    base, tensors = family_of((50,))
    merged = run(name, base, tensors, per_model(density=0.3), **{"lambda": 0.7})
    expected = base + 0.7 * sum(w * (x - base) for w, x in zip(WEIGHTS, tensors)) / sum(WEIGHTS)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


# -- a real merge ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged_family(llama_family, tmp_path_factory):
    from merging import load_recipe, merge

    root = tmp_path_factory.mktemp("tsv-consensus")
    outputs = {}
    for name, extra in [("tsv", {}), ("consensus_ta", {"k": 2}), ("consensus_ties", {"k": 2})]:
        recipe = {
            "merge_method": name,
            "base_model": str(llama_family.base),
            "models": [{"model": str(path), "parameters": {"weight": w, "density": 0.5} if name == "consensus_ties"
                        else {"weight": w}} for path, w in zip(llama_family.finetuned, WEIGHTS)],
            "parameters": {"lambda": 0.8, **extra},
            "dtype": "float32",
        }
        merge(load_recipe(recipe), root / name, device="cpu")
        outputs[name] = root / name
    return outputs


@pytest.mark.parametrize("name", ["tsv", "consensus_ta", "consensus_ties"])
def test_a_merge_of_the_llama_family_loads_and_its_norms_are_the_weighted_mean(name, merged_family, llama_family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_family[name])
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    merged = load_model_tensors(merged_family[name])
    base = load_model_tensors(llama_family.base)
    finetuned = [load_model_tensors(path) for path in llama_family.finetuned]
    vectors = [key for key, value in base.items() if value.dim() != 2]
    assert vectors and len(vectors) < len(base)
    for key in vectors:
        expected = base[key] + 0.8 * sum(w * (f[key] - base[key]) for w, f in zip(WEIGHTS, finetuned)) / sum(WEIGHTS)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6, msg=key)
    # the matrices went through the method itself, with the base as the origin
    key = "model.layers.1.mlp.down_proj.weight"
    models = [{"weight": w, "density": 0.5, "tall_mask_lambda": 0.4} for w in WEIGHTS]
    direct = run(name, base[key], [f[key] for f in finetuned], models, k=2, **{"lambda": 0.8})
    torch.testing.assert_close(merged[key], direct, rtol=0, atol=1e-6)
    assert not torch.allclose(merged[key], base[key])

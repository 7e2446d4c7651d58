"""Singular-value statistics (viz.spectral and their place in viz.stats) against independent float64
computations: spectra, the share of ‖δ‖²_F in the top singular values, subspace overlaps before and
after merging, on hand-made matrices and on models streamed from disk."""

import json

import pytest
import torch
from helpers import copy_model, edit_tensors, load_model_tensors
from test_viz_stats import viz_family

from merging.engine import merge
from merging.errors import MergeStudioError
from merging.recipe import load_recipe
from viz.results import RedundancyStats
from viz.spectral import (
    HEAD,
    SPECTRUM_POINTS,
    SV_FRACTIONS,
    decompose,
    measure_matrix,
    overlap,
    spectrum_positions,
    sum_from_parts,
    top_count,
)
from viz.stats import delta_statistics

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64)).Q


def matrix(U: torch.Tensor, values: list[float], V: torch.Tensor) -> torch.Tensor:
    """U·diag(values)·Vᵀ over the first len(values) columns, in float32."""
    k = len(values)
    return (U[:, :k] * torch.tensor(values, dtype=torch.float64)) @ V[:, :k].T


def reference_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Σ cos² of the principal angles between the top-k left singular subspaces / k (float64 SVDs)."""
    Ua = torch.linalg.svd(a.double(), full_matrices=False).U[:, :k]
    Ub = torch.linalg.svd(b.double(), full_matrices=False).U[:, :k]
    return torch.linalg.svdvals(Ua.T @ Ub).square().sum().item() / k


# -- pure functions on small matrices ---------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 5, 60])
def test_a_task_matrix_of_rank_r_has_all_its_energy_in_its_top_r_singular_values(rank):
    """Rank 1 and 5 go through the sketch (exact), rank 60 through the float64 Gram matrix."""
    U, V = orthonormal(120, 120, 1), orthonormal(200, 120, 2)
    values = [0.9 ** j for j in range(rank)]
    delta = matrix(U, values, V).float()
    factors = decompose(delta, vectors=3)
    reference = torch.linalg.svdvals(delta.double())
    assert factors.complete and factors.numerical_rank == rank
    known = factors.values.numel()
    torch.testing.assert_close(factors.values[:rank].double(), reference[:rank], rtol=1e-5, atol=1e-7)
    assert factors.sumsq == pytest.approx(reference.square().sum().item(), rel=1e-6)
    assert factors.top_energy(1.0) == pytest.approx(factors.sumsq, rel=1e-5)  # all of it in the top r
    if known > rank:
        assert factors.values[rank:].max() < 1e-5 * factors.values[0]  # the rest is rounding
    for fraction in SV_FRACTIONS:
        k = top_count(fraction, 120)
        expected = reference[:k].square().sum().item() / reference.square().sum().item()
        assert factors.top_energy(fraction) / factors.sumsq == pytest.approx(expected, rel=1e-5)
        assert (expected == pytest.approx(1.0)) == (k >= rank)
    # the top singular vectors are the matrix's own (up to sign)
    k = min(3, rank)  # no more vectors than the rank
    assert factors.U.shape == (120, k) and factors.V.shape == (200, k)
    for got, want in ((factors.U, U), (factors.V, V)):
        cosines = (got.double().T @ want[:, :k]).abs().diagonal()
        torch.testing.assert_close(cosines, torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-5)


def test_a_big_matrix_gets_its_top_singular_values_from_a_randomized_svd():
    U, V = orthonormal(300, 200, 3), orthonormal(400, 200, 4)
    values = [0.8 ** j for j in range(200)]  # full rank, decaying: the sketch cannot hold it
    delta = matrix(U, values, V).float()
    factors = decompose(delta, vectors=5, full_limit=1000)  # as if vocabulary-sized
    assert not factors.complete and factors.numerical_rank is None
    assert factors.values.numel() >= top_count(0.10, 200)
    reference = torch.tensor(values[:top_count(0.10, 200)], dtype=torch.float64)
    torch.testing.assert_close(factors.values[:reference.numel()].double(), reference, rtol=1e-4, atol=0)
    assert factors.top_energy(0.10) <= factors.sumsq


def test_the_sum_of_sketched_tasks_has_the_spectrum_of_the_summed_matrix():
    U, V = orthonormal(150, 150, 5), orthonormal(180, 150, 6)
    a = matrix(U, [3.0, 2.0, 1.0], V).float()
    b = matrix(orthonormal(150, 4, 7), [2.5, 0.5, 0.1, 0.05], orthonormal(180, 4, 8)).float()
    total = sum_from_parts([decompose(a, vectors=2), decompose(b, vectors=2)])
    reference = torch.linalg.svdvals(a.double() + b.double())
    assert total is not None and total.numerical_rank == 7
    torch.testing.assert_close(total.values[:7].double(), reference[:7], rtol=1e-5, atol=1e-7)


def test_overlap_is_zero_for_orthogonal_subspaces_one_for_the_same_and_the_mean_squared_cosine_between():
    basis = orthonormal(40, 40, 9)
    A, B = basis[:, :4], basis[:, 4:8]
    assert overlap(A, B, 4) == pytest.approx(0.0, abs=1e-12)
    assert overlap(A, A, 4) == pytest.approx(1.0)
    assert overlap(A, A @ orthonormal(4, 4, 10), 4) == pytest.approx(1.0)  # a rotated basis: the same subspace
    C = orthonormal(40, 4, 11)
    cosines = torch.linalg.svdvals(A.T @ C)  # cosines of the principal angles
    assert overlap(A, C, 4) == pytest.approx(cosines.square().mean().item())


def test_pairs_of_tasks_overlap_before_and_after_a_merge_as_built():
    """Tasks a and b share their singular subspaces, c is orthogonal to both; k = min(⌊r/T⌋, ranks)."""
    m, n = 60, 90
    U, V = orthonormal(m, m, 12), orthonormal(n, m, 13)
    base = torch.randn(m, n, generator=torch.Generator().manual_seed(14)) * 0.02
    a = matrix(U, [0.3, 0.1], V).float()
    b = matrix(U, [0.2, 0.2], V).float()
    c = matrix(U[:, 2:], [0.25, 0.05], V[:, 2:]).float()
    models = [base + d for d in (a, b, c)]
    measured = measure_matrix(base, models, merged=base + a + b + c)  # task arithmetic
    assert [t.numerical_rank for t in measured.tasks] == [2, 2, 2]
    ab, ac, bc = (measured.pairs[p] for p in ((0, 1), (0, 2), (1, 2)))
    assert ab.k == ac.k == 2  # the ranks, not ⌊60/3⌋ = 20
    assert (ab.left, ab.right) == (pytest.approx(1.0, abs=1e-5), pytest.approx(1.0, abs=1e-5))
    assert max(ac.left, ac.right, bc.left, bc.right) < 1e-6
    # a sum of tasks in orthogonal subspaces leaves each where it was
    assert ab.merged_left == pytest.approx(1.0, abs=1e-5) and max(ac.merged_left, ac.merged_right) < 1e-6
    assert measured.total.numerical_rank == 4 and measured.merged.numerical_rank == 4
    # a merge that mixes the tasks: c's input directions sent into a's outputs (a rotation of the
    # output space) makes the merged subspaces of a and c the same
    mixed = a + b + matrix(U, [0.25, 0.05], V[:, 2:]).float()
    after = measure_matrix(base, models, merged=base + mixed).pairs[(0, 2)]
    assert after.left < 1e-6 and after.merged_left == pytest.approx(1.0, abs=1e-5)
    # against an independent computation: range(δ_merged·V_i) by QR in float64
    delta = mixed.double()
    Va = torch.linalg.svd(a.double(), full_matrices=False).Vh[:2].T
    Vc = torch.linalg.svd(c.double(), full_matrices=False).Vh[:2].T
    Qa, Qc = torch.linalg.qr(delta @ Va).Q, torch.linalg.qr(delta @ Vc).Q
    assert after.merged_left == pytest.approx((Qa.T @ Qc).square().sum().item() / 2, abs=1e-5)


def polar(X: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def test_a_tsv_merge_keeps_the_tasks_angles_and_every_task_in_its_top_directions():
    """TSV-M on one matrix (its top singular vectors of every task concatenated and orthogonalized,
    Gargiulo et al. 2025) is an isometry on the tasks' span: the responses to the tasks' inputs overlap
    as the inputs did (left and right trade places), and each task keeps all of itself in the merge's
    top Σkᵢ directions. TIES-like sparsifying spreads the tasks and raises the overlap."""
    m, n, T = 60, 90, 3
    shared_U, shared_V = orthonormal(m, 1, 16), orthonormal(n, 1, 17)
    deltas = []
    for t in range(T):  # one shared direction on each side, one of their own: overlap ~1/2 both sides
        U = torch.linalg.qr(torch.cat([shared_U, orthonormal(m, 1, 20 + t)], 1)).Q
        V = torch.linalg.qr(torch.cat([shared_V, orthonormal(n, 1, 30 + t)], 1)).Q
        deltas.append(matrix(U, [0.1, 0.05 * (t + 1)], V))
    factors = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    U_tsv = polar(torch.cat([f.U[:, :2] for f in factors], 1))
    V_tsv = polar(torch.cat([f.Vh[:2].T for f in factors], 1))
    tsv = U_tsv @ torch.diag(torch.cat([f.S[:2] for f in factors])) @ V_tsv.T
    base = torch.zeros(m, n)
    models = [d.float() for d in deltas]
    measured = measure_matrix(base, models, merged=tsv.float())
    for pair in measured.pairs.values():
        assert pair.k == 2 and pair.left > 0.45 and pair.right > 0.45
        assert pair.merged_left == pytest.approx(pair.right, abs=0.02) and pair.merged_right == pytest.approx(pair.left, abs=0.02)
    assert measured.aligned == pytest.approx([t.sumsq for t in measured.tasks], rel=1e-5)  # alignment 1
    # independent: the energy of δ₁ in the top 6 left singular vectors of the merge
    top = torch.linalg.svd(tsv, full_matrices=False).U[:, :6]
    assert measured.aligned[0] == pytest.approx((top.T @ deltas[0]).square().sum().item(), rel=1e-5)
    # magnitude trimming of the summed update (TIES's trim, no election needed here): full rank, the
    # tasks spread over many directions, their responses overlap more, and the merge's top 6 directions
    # no longer hold all of each task
    total = sum(deltas)
    trimmed = total * (total.abs() >= total.abs().flatten().kthvalue(int(0.8 * total.numel())).values)
    spread = measure_matrix(base, models, merged=trimmed.float())
    assert spread.merged.numerical_rank > 20
    for pair in spread.pairs.values():
        assert pair.merged_left + pair.merged_right > pair.left + pair.right
    assert all(a < 0.99 * t.sumsq for a, t in zip(spread.aligned, spread.tasks))


def test_random_full_rank_tasks_overlap_about_as_random_subspaces_do():
    generator = torch.Generator().manual_seed(15)
    base = torch.zeros(64, 96)
    models = [torch.randn(64, 96, generator=generator) for _ in range(2)]
    pair = measure_matrix(base, models).pairs[(0, 1)]
    assert pair.k == 32  # ⌊64/2⌋: TSV-M's budget for two tasks
    assert pair.left == pytest.approx(reference_overlap(models[0], models[1], 32), abs=1e-4)
    assert abs(pair.left - 32 / 64) < 0.1 and abs(pair.right - 32 / 96) < 0.1


def test_stored_spectra_keep_the_head_the_tail_and_the_drop_to_rounding():
    assert spectrum_positions(30) == list(range(1, 31))
    positions = spectrum_positions(5000, marks=(1680, 1681))
    assert positions[:HEAD] == list(range(1, HEAD + 1)) and positions[-1] == 5000
    assert {1680, 1681} <= set(positions) and len(positions) <= SPECTRUM_POINTS + 2
    assert positions == sorted(set(positions))


# -- streamed from checkpoints ------------------------------------------------------------------------

RANK = 2


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory):
    """Fine-tunes whose every weight matrix changes by a rank-2 update: a and b in the same singular
    subspaces (σ = 3s, s and 2s, 2s), c in orthogonal ones; the merge is their plain sum."""
    fam = viz_family()
    root = tmp_path_factory.mktemp("viz-lowrank")
    base = load_model_tensors(fam.base)
    bases = {}
    for index, (name, tensor) in enumerate(sorted(base.items())):
        if tensor.ndim == 2:
            m, n = tensor.shape
            bases[name] = (orthonormal(m, 2 * RANK, 100 + index), orthonormal(n, 2 * RANK, 200 + index), 0.05)
    shapes = {"a": (slice(0, RANK), [3.0, 1.0]), "b": (slice(0, RANK), [2.0, 2.0]), "c": (slice(RANK, 2 * RANK), [2.0, 1.0])}

    def update(name: str, which: str) -> torch.Tensor:
        U, V, scale = bases[name]
        columns, values = shapes[which]
        return matrix(U[:, columns], [scale * v for v in values], V[:, columns])

    folders = {}
    for which in [*shapes, "merged"]:
        folder = copy_model(fam.base, root / which)
        parts = list(shapes) if which == "merged" else [which]

        def edit(state, parts=parts):
            for name in bases:
                state[name] = (state[name].double() + sum(update(name, p) for p in parts)).float()

        edit_tensors(folder, edit)
        folders[which] = folder
    return fam.base, [folders[w] for w in shapes], folders["merged"]


@pytest.fixture(scope="module")
def lowrank_stats(lowrank):
    base, finetuned, merged = lowrank
    return delta_statistics(base, finetuned, device="cpu", threads=1, merged=merged)


def test_streamed_low_rank_tasks_have_their_rank_their_energy_and_their_overlaps(lowrank_stats):
    stats = lowrank_stats
    matrices = [t for t in stats.tensors if t.spectral is not None]
    assert {t.name for t in matrices} == {t.name for t in stats.tensors if len(t.shape) == 2}
    assert all(t.spectral is None for t in stats.tensors if len(t.shape) == 1)  # norms have no SVD
    for tensor in matrices:
        spectral = tensor.spectral
        for label, top in (("a", 0.9), ("b", 0.5), ("c", 0.8)):  # σ₁² / (σ₁² + σ₂²): 9/10, 4/8, 4/5
            spectrum = spectral.spectra[label]
            assert spectrum.numerical_rank == RANK and spectrum.complete, (tensor.name, label)
            assert spectral.energy_top[label]["0.01"] == pytest.approx(top, abs=1e-5)  # the top 1% is σ₁ here
            assert spectral.energy_top[label]["0.05"] == pytest.approx(1.0, abs=1e-6)
            assert spectrum.values[0] == pytest.approx(0.05 * (3.0 if label == "a" else 2.0), rel=1e-4)
        assert spectral.overlap_left["a"]["b"] == pytest.approx(1.0, abs=1e-4)
        assert spectral.overlap_right["a"]["b"] == pytest.approx(1.0, abs=1e-4)
        assert max(spectral.overlap_left["a"]["c"], spectral.overlap_right["b"]["c"]) < 1e-4
        m, n = tensor.shape
        assert spectral.chance_left == pytest.approx(RANK / m) and spectral.chance_right == pytest.approx(RANK / n)
        assert spectral.sum_spectrum.numerical_rank == 2 * RANK and spectral.merged_spectrum.numerical_rank == 2 * RANK
        assert spectral.merged_overlap_left["a"]["b"] == pytest.approx(1.0, abs=1e-4)
        assert spectral.merged_overlap_right["a"]["c"] < 1e-4
        # the sum's top Σkᵢ = 6 directions hold the whole of every task
        assert spectral.merged_alignment == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0}, abs=1e-5)
    whole = stats.model.spectral
    assert whole.matrices == len(matrices)
    assert whole.energy_top["a"]["0.01"] == pytest.approx(0.9, abs=1e-5)
    assert whole.spectra["a"].numerical_rank == RANK * len(matrices)
    assert whole.spectra["a"].rank == sum(min(t.shape) for t in matrices)
    assert whole.overlap_left["a"]["b"] == pytest.approx(1.0, abs=1e-4) and whole.overlap_left["a"]["a"] == 1.0
    assert stats.merged_label == "merged" and stats.spectral_seconds is not None


def test_spectral_statistics_round_trip_through_json_and_old_files_still_load(lowrank_stats):
    text = lowrank_stats.to_json()
    json.loads(text)  # strict JSON: no NaN or Infinity
    assert RedundancyStats.from_json(text) == lowrank_stats
    old = json.loads(text)  # a stats.json written before the singular-value statistics
    old["version"] = 1
    for key in ("merged", "merged_label", "spectral_seconds"):
        old.pop(key)
    for group in [*old["tensors"], *old["layers"], old["model"]]:
        group.pop("spectral")
    loaded = RedundancyStats.from_dict(old)
    assert loaded.model.spectral is None and loaded.merged is None and loaded.model.deltas == lowrank_stats.model.deltas


@pytest.fixture(scope="module")
def ties(tmp_path_factory):
    fam = viz_family()
    out = tmp_path_factory.mktemp("viz-ties") / "ties"
    recipe = {"merge_method": "ties", "base_model": str(fam.base),
              "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.3}} for m in fam.finetuned]}
    merge(load_recipe(recipe), out, device="cpu")
    return out


def test_dense_tasks_and_a_ties_merge_match_float64_svds_of_the_files(ties):
    fam = viz_family()
    stats = delta_statistics(fam.base, fam.finetuned, device="cpu", threads=1, merged=ties)
    base = load_model_tensors(fam.base)
    models = [load_model_tensors(f) for f in fam.finetuned]
    merged = load_model_tensors(ties)
    for tensor in [t for t in stats.tensors if t.spectral is not None]:
        name, spectral = tensor.name, tensor.spectral
        deltas = [(m[name].float() - base[name].float()).double() for m in models]
        for label, delta in zip(stats.labels, deltas):
            reference = torch.linalg.svdvals(delta)
            assert spectral.spectra[label].values[0] == pytest.approx(reference[0].item(), rel=1e-5)
            for fraction in SV_FRACTIONS:
                k = top_count(fraction, reference.numel())
                expected = reference[:k].square().sum() / reference.square().sum()
                assert spectral.energy_top[label][f"{fraction:g}"] == pytest.approx(expected.item(), rel=1e-5)
        total = torch.linalg.svdvals(sum(deltas))
        assert spectral.sum_spectrum.values[0] == pytest.approx(total[0].item(), rel=1e-5)
        merged_delta = (merged[name].float() - base[name].float()).double()
        reference = torch.linalg.svdvals(merged_delta)
        k = top_count(0.1, reference.numel())
        assert spectral.merged_energy_top["0.1"] == pytest.approx((reference[:k].square().sum() / reference.square().sum()).item(), rel=1e-5)
        k = min(tensor.shape) // 3  # dense random deltas are full rank: TSV-M's ⌊r/T⌋
        assert spectral.overlap_left["ft1"]["ft2"] == pytest.approx(reference_overlap(deltas[0], deltas[1], k), abs=2e-3)
        assert spectral.overlap_right["ft1"]["ft3"] == pytest.approx(reference_overlap(deltas[0].T, deltas[2].T, k), abs=2e-3)
        # after: range(δ_merged·V_i) for the top-k right singular vectors, by float64 QR
        V = [torch.linalg.svd(d, full_matrices=False).Vh[:k].T for d in deltas[:2]]
        Q = [torch.linalg.qr(merged_delta @ v).Q for v in V]
        assert spectral.merged_overlap_left["ft1"]["ft2"] == pytest.approx((Q[0].T @ Q[1]).square().sum().item() / k, abs=2e-3)
        # alignment: δ₁'s share in the merge's top 3k left singular directions
        top = torch.linalg.svd(merged_delta, full_matrices=False).U[:, :3 * k]
        expected = ((top.T @ deltas[0]).square().sum() / deltas[0].square().sum()).sqrt().item()
        assert spectral.merged_alignment["ft1"] == pytest.approx(expected, abs=2e-3)
    assert stats.merged_label == "ties" and stats.merged == str(ties)


def test_without_spectra_nothing_is_decomposed_and_a_merge_needs_them(ties):
    fam = viz_family()
    stats = delta_statistics(fam.base, fam.finetuned[:2], device="cpu", threads=1, spectra=False)
    assert stats.model.spectral is None and all(t.spectral is None for t in stats.tensors)
    assert stats.spectral_seconds is None
    with pytest.raises(MergeStudioError, match="singular-value"):
        delta_statistics(fam.base, fam.finetuned[:2], device="cpu", spectra=False, merged=ties)

"""Each method on small hand-computed tensors, from the formulas in the papers."""

import math

import pytest
import torch

from merging.methods import REGISTRY, get_method
from merging.methods.sparsify import (
    elect_sign,
    kth_largest,
    magnitude_mask,
    outlier_magnitude_mask,
    random_mask,
    rescale_kept,
)


def run(name, base, tensors, per_model, **params):
    method = get_method(name)
    defaults = {p.name: p.default for p in method.spec.global_params()}
    models = [{p.name: p.default for p in method.spec.model_params()} | m for m in per_model]
    return method(base, tensors, models, defaults | params, seed=1234)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_linear_is_the_weighted_mean():
    a, b = t(1.0, 2.0), t(3.0, -2.0)
    assert torch.allclose(run("linear", None, [a, b], [{"weight": 1}, {"weight": 3}]), (a + 3 * b) / 4)
    assert torch.allclose(run("linear", None, [a, b], [{"weight": 1}, {"weight": 3}], normalize=False), a + 3 * b)


def test_task_arithmetic_adds_scaled_task_vectors():
    base, x1, x2 = t(1.0, 1.0), t(2.0, 0.0), t(1.0, 3.0)
    merged = run("task_arithmetic", base, [x1, x2], [{"weight": 0.5}, {"weight": 0.3}], **{"lambda": 2.0})
    assert torch.allclose(merged, base + 2.0 * (0.5 * (x1 - base) + 0.3 * (x2 - base)))


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    base = torch.zeros(4)
    d1, d2 = t(3.0, -2.0, 0.5, 1.0), t(-1.0, -4.0, 2.0, 0.1)
    merged = run("ties", base, [d1, d2], [{"density": 0.5}, {"density": 0.5}])
    # trimmed: [3, -2, 0, 0] and [0, -4, 2, 0]; elected signs [+, -, +, +];
    # agreeing entries averaged per entry: [3/1, (-2-4)/2, 2/1, nothing -> 0]
    assert torch.allclose(merged, t(3.0, -3.0, 2.0, 0.0))


def test_ties_weights_take_part_in_the_sign_vote():
    base = torch.zeros(1)
    d1, d2 = t(1.0), t(-0.6)
    assert torch.allclose(run("ties", base, [d1, d2], [{"weight": 1.0}, {"weight": 1.0}]), t(1.0))
    # 0.5*1 - 1.0*0.6 < 0: the heavier second model wins the vote, its weighted delta / its weight
    assert torch.allclose(run("ties", base, [d1, d2], [{"weight": 0.5}, {"weight": 1.0}]), t(-0.6))


def test_ties_without_normalize_sums_agreeing_weighted_deltas():
    base = torch.zeros(2)
    merged = run("ties", base, [t(1.0, 2.0), t(3.0, -1.0)], [{"weight": 0.5}, {"weight": 0.5}], normalize=False)
    assert torch.allclose(merged, t(2.0, 1.0))  # [0.5+1.5, 1.0 (the -0.5 disagrees)]


def test_breadcrumbs_drops_outliers_and_the_smallest():
    base = torch.zeros(10)
    delta = torch.arange(1.0, 11.0)
    merged = run("breadcrumbs", base, [delta], [{"density": 0.5, "gamma": 0.1}])
    expected = torch.where((delta >= 5) & (delta <= 9), delta, 0.0)
    assert torch.equal(merged, expected)


def test_dare_linear_keeps_density_and_rescales_by_one_over_density():
    base = torch.zeros(200_000)
    delta = torch.full((200_000,), 0.02)
    merged = run("dare_linear", base, [delta], [{"density": 0.1}])
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.01 * 0.1 * 10  # within 1 point of 10%
    assert torch.allclose(merged[kept], torch.full_like(merged[kept], 0.2))


def test_dare_is_reproducible_by_seed_and_differs_across_seeds():
    method = get_method("dare_ties")
    base, delta = torch.zeros(1000), torch.randn(1000)
    models = [{"weight": 1.0, "density": 0.5}]
    params = {p.name: p.default for p in method.spec.global_params()}
    first, again, other = (method(base, [delta], models, params, seed=s) for s in (7, 7, 8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_slerp_follows_the_great_circle():
    a, b = t(1.0, 0.0), t(0.0, 1.0)
    half = run("slerp", None, [a, b], [{}, {}], t=0.5)
    assert torch.allclose(half, t(math.sqrt(0.5), math.sqrt(0.5)))
    assert torch.allclose(run("slerp", None, [a, b], [{}, {}], t=0.0), a)
    assert torch.allclose(run("slerp", None, [a, b], [{}, {}], t=1.0), b, atol=1e-6)


def test_slerp_falls_back_to_lerp_for_nearly_collinear_tensors():
    a, b = t(1.0, 2.0), t(2.0, 4.0)
    assert torch.allclose(run("slerp", None, [a, b], [{}, {}], t=0.25), 0.75 * a + 0.25 * b)


@pytest.mark.parametrize("n", [10, 1000, 300_000, 2_000_000])
def test_kth_largest_is_exact(n):
    values = torch.randn(n).abs()
    ordered = values.sort(descending=True).values
    for k in (1, n // 3, n // 2 + 1, n):
        k = max(1, k)
        assert kth_largest(values, k).item() == ordered[k - 1].item()


def test_kth_largest_is_exact_with_heavy_ties():
    values = torch.randint(0, 5, (1_000_000,)).float()
    ordered = values.sort(descending=True).values
    for k in (1, 200_000, 500_001, 999_999):
        assert kth_largest(values, k).item() == ordered[k - 1].item()


def test_magnitude_mask_keeps_exactly_k_of_distinct_values():
    delta = torch.randn(500_000)
    mask = magnitude_mask(delta, 0.2)
    assert mask.sum().item() == int(0.2 * delta.numel())
    assert delta[mask].abs().min() >= delta[~mask].abs().max()


def test_magnitude_mask_keeps_at_least_one_entry():
    assert magnitude_mask(t(0.1, -0.2, 0.3), 0.01).sum().item() == 1


def test_outlier_mask_counts_follow_mergekit():
    delta = torch.randn(100_000)
    mask = outlier_magnitude_mask(delta, 0.3, 0.05)
    assert mask.sum().item() == 30_000
    top = delta.abs().topk(5_000).values.min()
    assert not mask[delta.abs() >= top].any()


def test_random_mask_is_device_independent_and_seeded():
    assert torch.equal(random_mask((1000,), 0.3, 5, "cpu"), random_mask((1000,), 0.3, 5, "cpu"))
    assert not torch.equal(random_mask((1000,), 0.3, 5, "cpu"), random_mask((1000,), 0.3, 6, "cpu"))


def test_rescale_l1_restores_the_norm_and_density_divides():
    delta = torch.randn(10_000)
    kept = random_mask(delta.shape, 0.4, 0, "cpu")
    l1 = rescale_kept(delta, kept, 0.4, "l1")
    assert torch.isclose(l1.abs().sum(), delta.abs().sum(), rtol=1e-5)
    assert torch.allclose(rescale_kept(delta, kept, 0.4, "density"), delta * kept / 0.4)
    assert torch.equal(rescale_kept(delta, kept, 0.4, "none"), delta * kept)


def test_sign_election_counts_zero_as_positive():
    assert torch.equal(elect_sign([t(1.0, -1.0, 0.0), t(-1.0, -1.0, 0.0)]), t(1.0, -1.0, 1.0))


def test_every_method_returns_the_source_for_a_single_identical_model():
    x = torch.randn(64, 32)
    for name, method in REGISTRY.items():
        inputs = [x, x] if method.spec.min_models == 2 else [x]
        merged = run(name, x, inputs, [{} for _ in inputs])
        assert torch.allclose(merged, x, atol=1e-6), name

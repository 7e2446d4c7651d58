"""Each method on small hand-computed tensors, from the formulas in the papers."""

import math

import pytest
import torch

from merging.methods import REGISTRY, get_method
from merging.methods.kernels import (
    BLOCK,
    TaskVector,
    disjoint_merge,
    kth_largest_magnitude,
    magnitude_keep,
    outlier_keep,
    random_keep,
    rescale_factor,
)


def whole(keep, values):
    """Apply a Keep to a whole flat tensor (one chunk); masks are float 0/1."""
    mask = keep(slice(0, values.numel()), values)
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, 1.0}
    return mask.bool()


def run(name, base, tensors, per_model, **params):
    method = get_method(name)
    # a required parameter (nearswap's t) takes the studio's starting value
    defaults = {p.name: method.spec.starting_value(p) if p.required else p.default for p in method.spec.global_params()}
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


@pytest.mark.parametrize("n", [10, 1000, 300_000, 2_500_000])
def test_kth_largest_magnitude_is_exact(n):
    values = torch.randn(n)
    delta = TaskVector(values + 1.0, torch.ones(n))
    magnitude = ((values + 1.0) - 1.0).abs()  # exactly what the task vector holds
    ordered = magnitude.sort(descending=True).values
    for k in (1, n // 3, n // 2 + 1, n):
        k = max(1, k)
        stat = kth_largest_magnitude(delta, k)
        assert stat.value == ordered[k - 1].item()
        assert stat.above == int((magnitude > stat.value).sum())


def test_kth_largest_magnitude_is_exact_with_heavy_ties():
    values = torch.randint(-4, 5, (1_000_000,)).float()
    delta = TaskVector(values, torch.zeros_like(values))
    ordered = values.abs().sort(descending=True).values
    for k in (1, 200_000, 500_001, 999_999):
        assert kth_largest_magnitude(delta, k).value == ordered[k - 1].item()


def test_magnitude_keep_keeps_exactly_k_of_distinct_values():
    values = torch.randn(500_000)
    kept = whole(magnitude_keep(TaskVector(values, torch.zeros_like(values)), 0.2), values)
    assert kept.sum().item() == int(0.2 * values.numel())
    assert values[kept].abs().min() >= values[~kept].abs().max()


def test_magnitude_keep_keeps_at_least_one_entry():
    values = t(0.1, -0.2, 0.3)
    assert whole(magnitude_keep(TaskVector(values, torch.zeros(3)), 0.01), values).sum().item() == 1


def test_outlier_keep_counts_follow_mergekit():
    values = torch.randn(100_000)
    kept = whole(outlier_keep(TaskVector(values, torch.zeros_like(values)), 0.3, 0.05), values)
    assert kept.sum().item() == 30_000
    top = values.abs().topk(5_000).values.min()
    assert not kept[values.abs() >= top].any()


def test_random_keep_is_seeded_and_independent_of_chunking():
    n = 2 * BLOCK + 123
    values = torch.zeros(n)
    keep = random_keep(n, 0.3, seed=5)
    whole_mask = whole(keep, values)
    halves = torch.cat([keep(slice(0, BLOCK), values[:BLOCK]), keep(slice(BLOCK, n), values[BLOCK:])])
    assert torch.equal(whole_mask, halves)
    assert torch.equal(whole_mask, whole(random_keep(n, 0.3, seed=5), values))
    assert not torch.equal(whole_mask, whole(random_keep(n, 0.3, seed=6), values))
    assert abs(whole_mask.float().mean().item() - 0.3) < 0.005


def test_rescale_l1_restores_the_norm_and_density_divides():
    values = torch.randn(10_000)
    delta = TaskVector(values, torch.zeros_like(values))
    keep = random_keep(values.numel(), 0.4, seed=0)
    scale = rescale_factor(delta, keep, 0.4, "l1")
    assert (values * whole(keep, values).float() * scale).abs().sum().item() == pytest.approx(values.abs().sum().item(), rel=1e-5)
    assert rescale_factor(delta, keep, 0.4, "density") == pytest.approx(2.5)
    assert rescale_factor(delta, keep, 0.4, "none") == 1.0


def test_sign_election_counts_zero_as_positive_and_skips_pruned_entries():
    # entry 0: +1 vs -1 sums to 0 -> elected +, only the +1 agrees; entry 2: both pruned -> 0
    merged = disjoint_merge([t(1.0, -1.0, 0.0), t(-1.0, -1.0, 0.0)], [1.0, 1.0], normalize=True)
    assert torch.equal(merged, t(1.0, -1.0, 0.0))


def test_chunked_ties_equals_the_whole_tensor_formula():
    """Chunking is an implementation detail: the result over several chunks equals the formula."""
    base = torch.randn(3 * BLOCK + 7)
    models = [base + 0.01 * torch.randn_like(base) for _ in range(3)]
    merged = run("ties", base, models, [{"density": 0.3, "weight": w} for w in (0.5, 0.3, 0.2)])
    weighted = []
    for x, w in zip(models, (0.5, 0.3, 0.2)):
        d = x - base
        top = torch.sort(d.abs(), descending=True, stable=True).indices[: int(0.3 * d.numel())]
        kept = torch.zeros_like(d, dtype=torch.bool)
        kept[top] = True  # exactly k, ties broken by position
        weighted.append(torch.where(kept, d, 0.0) * w)
    total = torch.stack(weighted).sum(0)
    elected = torch.where(total >= 0, 1.0, -1.0)
    agree = [torch.sign(d) == elected for d in weighted]
    numer = sum(d * a for d, a in zip(weighted, agree))
    denom = sum(w * a for w, a in zip((0.5, 0.3, 0.2), agree))
    expected = base + numer / torch.where(denom == 0, 1.0, denom)
    assert torch.allclose(merged, expected, atol=1e-6)


def test_every_method_returns_the_source_for_a_single_identical_model():
    x = torch.randn(64, 32)
    for name, method in REGISTRY.items():
        inputs = [x, x] if method.spec.min_models == 2 else [x]
        merged = run(name, x, inputs, [{} for _ in inputs])
        assert torch.allclose(merged, x, atol=1e-6), name


def test_trim_keeps_exactly_k_when_ties_span_many_chunks():
    """bf16-like deltas: few distinct magnitudes, so the k-th one is shared across chunks."""
    values = torch.randint(-3, 4, (3 * BLOCK + 5,)).float()
    delta = TaskVector(values, torch.zeros_like(values))
    keep = magnitude_keep(delta, 0.37)
    mask = torch.cat([keep(part, delta.chunk(part)) for part in [slice(s, min(values.numel(), s + BLOCK)) for s in range(0, values.numel(), BLOCK)]])
    k = int(0.37 * values.numel())
    assert int(mask.sum()) == k
    order = torch.sort(values.abs(), descending=True, stable=True).indices[:k]  # earliest ties first
    expected = torch.zeros_like(mask)
    expected[order] = 1.0
    assert torch.equal(mask, expected)

"""Redundancy statistics (viz.stats, viz.measures) against direct computation on real tensors."""

import json
import math
import threading
import time

import pytest
import torch

from helpers import copy_model, edit_tensors, family, load_model_tensors
import demo
from merging.errors import MergeStudioError
from merging.methods.kernels import TaskVector
from viz.measures import (
    SAMPLE,
    TOP_FRACTIONS,
    MagnitudeProfiler,
    sample_positions,
    sign_conflict_counts,
    top_count,
)
from viz.stats import RedundancyStats, delta_statistics, model_labels, tensor_group


pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# -- pure measures ------------------------------------------------------------------------------


def test_sign_conflicts_of_a_hand_made_case():
    # entry:        0   1   2   3   4   5   6
    a = torch.tensor([1., 1., 0., -1., 0., 2., 0.])
    b = torch.tensor([1., -1., 0., -2., 3., 0., 0.])
    c = torch.tensor([0., 0., 0., 0., -1., -3., 5.])
    # eligible (>= 2 non-zero): 0, 1, 3, 4, 5; conflicting (both signs among the non-zero): 1, 4, 5
    assert sign_conflict_counts([a, b, c]) == (3, 5)
    assert sign_conflict_counts([a, b]) == (1, 3)  # eligible 0, 1, 3; conflicting 1
    assert sign_conflict_counts([c, c]) == (0, 3)  # identical deltas never conflict
    assert sign_conflict_counts([a, -a]) == (4, 4)  # opposite deltas conflict wherever non-zero


def _profile(delta: torch.Tensor):
    base = torch.zeros_like(delta)
    vector = TaskVector(delta, base)
    profiler = MagnitudeProfiler(vector, sample_positions(delta.numel(), delta.device))
    for _, chunk in vector.chunks():
        profiler.add(chunk)
    return profiler.finish()


@pytest.mark.parametrize("case", ["small", "large", "large with ties", "sparse"])
def test_magnitude_profile_is_exact(case):
    generator = torch.Generator().manual_seed(3)
    n = 5_000 if case == "small" else 300_000  # the large ones go through the sampled bracket
    delta = torch.randn(n, generator=generator) * 1e-3
    if case == "large with ties":
        delta = (delta * 2e3).round() / 2e3  # a handful of distinct magnitudes: ties at every threshold
    if case == "sparse":
        delta[torch.rand(n, generator=generator) < 0.9] = 0.0  # 90% zeros: the top 20% reach down to 0
    profile = _profile(delta)
    magnitude = delta.double().abs().sort(descending=True).values
    assert profile.sumsq == pytest.approx(magnitude.square().sum().item(), rel=1e-5)
    assert profile.abs_sum == pytest.approx(magnitude.sum().item(), rel=1e-5)
    assert profile.nonzero == int(torch.count_nonzero(delta))
    assert profile.maximum == magnitude[0].item()
    for fraction in TOP_FRACTIONS:
        k = top_count(fraction, n)
        assert profile.top_values[fraction] == magnitude[k - 1].item(), fraction
        assert profile.top_energy[fraction] == pytest.approx(magnitude[:k].square().sum().item(), rel=1e-6), fraction
    median = magnitude.flip(0)[(n - 1) // 2].item()
    if n <= SAMPLE:
        assert profile.median == median
    else:  # a 32,768-entry sample: within a percentile point of the true median
        assert magnitude.flip(0)[int(0.49 * n)].item() <= profile.median <= magnitude.flip(0)[int(0.51 * n)].item()


def test_tensor_groups_name_layers_embeddings_and_final_norm():
    assert tensor_group("model.layers.12.self_attn.q_proj.weight") == ("layer 12", 12)
    assert tensor_group("transformer.h.3.attn.c_attn.weight") == ("layer 3", 3)
    assert tensor_group("model.embed_tokens.weight") == ("embeddings", None)
    assert tensor_group("transformer.wte.weight") == ("embeddings", None)
    assert tensor_group("model.norm.weight") == ("final norm", None)
    assert tensor_group("transformer.ln_f.bias") == ("final norm", None)
    assert tensor_group("lm_head.weight") == ("lm_head", None)
    assert model_labels(["/a/ft", "/b/ft/", "org/ft@v1", "x"]) == ["ft", "ft (2)", "ft (3)", "x"]


# -- streaming statistics against direct computation ----------------------------------------------


def viz_family():
    """The tiny family of the viz tests: base + 3 fine-tunes, 2 layers, MLP matrices of 65,536
    entries (above the 32,768-entry sample, so the sampled bracket is exercised)."""
    return family("llama", 3, num_layers=2, hidden_size=64, vocab_size=512, intermediate_size=1024,
                  delta_scale=0.02, seed=5)


DENSITY = 0.2
UNTOUCHED = "model.layers.0.self_attn.k_proj.weight"  # equal to the base in ft1
SPARSE = "model.layers.1.mlp.down_proj.weight"  # half its entries equal to the base in ft2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Base + 3 fine-tunes with MLP tensors above the sample size, one untouched tensor in ft1
    and a half-sparse delta in ft2 (zeros must not count as a sign)."""
    fam = viz_family()
    root = tmp_path_factory.mktemp("viz-models")
    base = load_model_tensors(fam.base)
    ft1 = copy_model(fam.finetuned[0], root / "ft1")
    ft2 = copy_model(fam.finetuned[1], root / "ft2")

    def untouched(state):
        state[UNTOUCHED] = base[UNTOUCHED].clone()

    def sparse(state):
        keep = torch.arange(state[SPARSE].numel()).reshape(state[SPARSE].shape) % 2 == 0
        state[SPARSE] = torch.where(keep, state[SPARSE], base[SPARSE])

    edit_tensors(ft1, untouched)
    edit_tensors(ft2, sparse)
    return fam.base, [ft1, ft2, fam.finetuned[2]]


@pytest.fixture(scope="module")
def stats(models):
    base, finetuned = models
    calls = []
    result = delta_statistics(base, finetuned, density=DENSITY, device="cpu", threads=1,
                              progress=lambda done, total, name: calls.append((done, total, name)))
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1)) and calls[-1][1] == len(calls)
    assert {c[2] for c in calls} == {t.name for t in result.tensors}
    return result


def _direct(models):
    """Task vectors straight from the files, as float32 differences held in float64."""
    base_path, finetuned = models
    base = load_model_tensors(base_path)
    deltas = [{n: (t.float() - base[n].float()).double().reshape(-1) for n, t in load_model_tensors(f).items()} for f in finetuned]
    return {n: b.double().reshape(-1) for n, b in base.items()}, deltas


def _trimmed(delta: torch.Tensor) -> torch.Tensor:
    k = top_count(DENSITY, delta.numel())
    keep = torch.zeros_like(delta)
    keep[delta.abs().argsort(descending=True)[:k]] = 1.0
    return delta * keep


def _conflicts(deltas: list[torch.Tensor]) -> tuple[int, int]:
    signs = torch.stack([d.sign() for d in deltas])
    nonzero = (signs != 0).sum(0)
    both = (signs > 0).any(0) & (signs < 0).any(0)
    return int(both.sum()), int((nonzero >= 2).sum())


def test_per_tensor_statistics_match_direct_computation(models, stats):
    base, deltas = _direct(models)
    assert stats.labels == ["ft1", "ft2", "ft3"] and len(stats.tensors) == len(base)
    for tensor in stats.tensors:
        name = tensor.name
        assert tensor.base_norm == pytest.approx(base[name].norm().item(), rel=1e-6)
        for label, delta in zip(stats.labels, [d[name] for d in deltas]):
            got = tensor.deltas[label]
            assert got.norm == pytest.approx(delta.norm().item(), rel=1e-5, abs=1e-12), (name, label)
            assert got.relative_norm == pytest.approx(delta.norm().item() / base[name].norm().item(), rel=1e-5, abs=1e-12)
            assert got.zero_fraction == pytest.approx((delta == 0).double().mean().item())
            magnitude = delta.abs().sort(descending=True).values
            for fraction in TOP_FRACTIONS:
                k = top_count(fraction, delta.numel())
                if magnitude[0] > 0:
                    expected = magnitude[:k].square().sum() / magnitude.square().sum()
                    assert got.energy_top[f"{fraction:g}"] == pytest.approx(expected.item(), rel=1e-5), (name, label, fraction)
                    assert got.quantiles[f"{1 - fraction:g}"] == magnitude[k - 1].item()
                else:
                    assert got.energy_top[f"{fraction:g}"] is None
            assert got.quantiles["1"] == magnitude[0].item()
        conflicts, eligible = _conflicts([d[name] for d in deltas])
        trimmed_conflicts, trimmed_eligible = _conflicts([_trimmed(d[name]) for d in deltas])
        assert (tensor.conflicts.conflicts, tensor.conflicts.eligible) == (conflicts, eligible), name
        assert (tensor.conflicts.trimmed_conflicts, tensor.conflicts.trimmed_eligible) == (trimmed_conflicts, trimmed_eligible), name
    untouched = next(t for t in stats.tensors if t.name == UNTOUCHED)
    assert untouched.deltas["ft1"].zero_fraction == 1.0 and untouched.deltas["ft1"].norm == 0.0
    assert untouched.cosine["ft1"]["ft2"] is None
    sparse = next(t for t in stats.tensors if t.name == SPARSE)
    assert sparse.deltas["ft2"].zero_fraction == pytest.approx(0.5)
    # where ft2's delta is 0 only ft1 and ft3 vote (random signs: 1/2 conflict, elsewhere 3/4): 5/8
    assert 0.6 < sparse.conflicts.rate < 0.65


def test_layer_and_model_statistics_match_direct_computation(models, stats):
    base, deltas = _direct(models)
    assert [g.name for g in stats.layers] == ["embeddings", "layer 0", "layer 1", "final norm"]
    groups = {g.name: [n for n in base if tensor_group(n)[0] == g.name] for g in stats.layers}
    groups["model"] = list(base)
    for group in [*stats.layers, stats.model]:
        names = groups[group.name]
        flat_base = torch.cat([base[n] for n in names])
        flat = [torch.cat([d[n] for n in names]) for d in deltas]
        assert group.numel == flat_base.numel()
        for label, delta in zip(stats.labels, flat):
            got = group.deltas[label]
            assert got.relative_norm == pytest.approx((delta.norm() / flat_base.norm()).item(), rel=1e-5)
            # energy share of per-tensor trimming, summed over the group's tensors
            kept = sum(d.abs().sort(descending=True).values[:top_count(0.2, d.numel())].square().sum()
                       for d in [dict(zip(stats.labels, deltas))[label][n] for n in names])
            assert got.energy_top["0.2"] == pytest.approx((kept / delta.square().sum()).item(), rel=1e-5)
            assert got.quantiles["1"] == delta.abs().max().item()
            # sampled quantiles: within 2 percentile points of the truth
            ordered = delta.abs().sort().values
            n = ordered.numel()
            assert ordered[int(0.88 * n)] <= got.quantiles["0.9"] <= ordered[min(n - 1, int(0.92 * n))]
        for (i, a), (j, b) in [((0, "ft1"), (1, "ft2")), ((0, "ft1"), (2, "ft3")), ((1, "ft2"), (2, "ft3"))]:
            expected = (flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm())).item()
            assert group.cosine[a][b] == pytest.approx(expected, abs=1e-6) and group.cosine[b][a] == group.cosine[a][b]
        conflicts, eligible = _conflicts(flat)
        assert (group.conflicts.conflicts, group.conflicts.eligible) == (conflicts, eligible)
        assert group.conflicts.rate == pytest.approx(conflicts / eligible)
        assert group.conflicts.rate_all == pytest.approx(conflicts / group.numel)
    # independent random deltas: three models conflict on ~3/4 of the entries all three change;
    # trimming leaves far fewer entries that two models both keep
    assert 0.6 < stats.model.conflicts.rate < 0.8
    assert stats.model.conflicts.trimmed_eligible < 0.2 * stats.model.conflicts.eligible
    hist = stats.histogram
    for label in stats.labels:
        assert sum(hist.fractions[label]) + hist.zero_fraction[label] == pytest.approx(1.0, abs=1e-6)


def test_statistics_round_trip_through_json(stats):
    text = stats.to_json()
    json.loads(text)  # strict JSON: no NaN or Infinity
    assert RedundancyStats.from_json(text) == stats


def test_one_model_has_no_conflicts_and_bad_input_is_refused(models, tmp_path):
    base, finetuned = models
    single = delta_statistics(base, finetuned[:1], device="cpu")
    assert single.model.conflicts is None and single.model.cosine == {"ft1": {"ft1": 1.0}}
    with pytest.raises(MergeStudioError, match="density"):
        delta_statistics(base, finetuned, density=0.0)
    with pytest.raises(MergeStudioError, match="not found"):
        delta_statistics(base, [tmp_path / "missing"])
    other = family("gpt2", 1, hidden_size=64, vocab_size=512)
    with pytest.raises(MergeStudioError, match="architectures differ"):
        delta_statistics(base, [other.finetuned[0]])


@pytest.mark.skipif(not demo.is_ready(), reason="the demo family is not built (python -m merging zoo)")
def test_demo_family_statistics():
    started = time.perf_counter()
    stats = delta_statistics(demo.base_path(), [demo.expert_path(name) for name in demo.EXPERTS], device="cpu", threads=1)
    seconds = time.perf_counter() - started
    assert seconds < 60, seconds
    assert stats.model.numel == 134_515_008
    for label in demo.EXPERTS:
        whole = stats.model.deltas[label]
        assert 0 < whole.relative_norm < 0.05  # a small step away from the base
        assert whole.energy_top["0.2"] > 0.5  # concentrated: the top 20% hold most of the energy
    conflicts = stats.model.conflicts
    assert conflicts.trimmed_rate < conflicts.rate  # trimming removes most sign conflicts
    assert all(math.isfinite(v) for row in stats.model.cosine.values() for v in row.values())


def test_a_damaged_checkpoint_is_named(models, tmp_path):
    base, finetuned = models
    damaged = copy_model(finetuned[0], tmp_path / "damaged")

    def nan(state):
        state["model.norm.weight"][3] = float("nan")

    edit_tensors(damaged, nan)
    with pytest.raises(MergeStudioError, match=r"model.norm.weight of .*damaged contains NaN"):
        delta_statistics(base, [damaged], device="cpu")


def test_a_single_changed_norm_weight_still_has_a_histogram(tmp_path):
    """Only one norm weight changed, 1 -> 2: every non-zero |δ| is exactly 1, a power of ten, so
    the largest and smallest magnitudes fall on the same decade edge."""
    fam = viz_family()
    name = "model.layers.0.input_layernorm.weight"
    assert bool((load_model_tensors(fam.base)[name] == 1.0).all())  # llama's norm weights start at 1
    tuned = copy_model(fam.base, tmp_path / "norm-only")
    edit_tensors(tuned, lambda state: state[name].mul_(2.0))
    stats = delta_statistics(fam.base, [tuned], device="cpu")
    hist = stats.histogram
    changed = 64 / stats.model.numel  # the 64 entries of that norm weight
    assert hist.zero_fraction["norm-only"] == pytest.approx(1 - changed)
    assert sum(hist.fractions["norm-only"]) == pytest.approx(changed)
    assert len(hist.edges) >= 2 and hist.edges[0] < 1.0 <= hist.edges[-1]
    last = max(i for i, f in enumerate(hist.fractions["norm-only"]) if f > 0)  # all of it in the bin ending at 1
    assert hist.edges[last] < 1.0 <= hist.edges[last + 1] and hist.fractions["norm-only"][last] == pytest.approx(changed)
    assert stats.model.deltas["norm-only"].quantiles["1"] == 1.0


def test_threads_hold_for_the_measuring_thread_and_are_restored(models):
    """``threads`` applies to the thread that measures (a UI worker) and is given back after; torch's
    OpenMP builds keep the count per thread, so a thread that already ran torch keeps its own."""
    base, finetuned = models
    seen = []

    def measure():
        torch.set_num_threads(2)
        try:
            delta_statistics(base, finetuned[:1], device="cpu", threads=1,
                             progress=lambda *_: seen.append(torch.get_num_threads()))
            seen.append(("after", torch.get_num_threads()))
        finally:
            torch.set_num_threads(1)  # threads started later in this process begin with the last value set

    worker = threading.Thread(target=measure)
    worker.start()
    worker.join()
    assert set(seen[:-1]) == {1} and seen[-1] == ("after", 2)
    if "OpenMP" in torch.__config__.parallel_info():
        torch.set_num_threads(3)  # this (main) thread: not changed by the worker's setting
        try:
            worker = threading.Thread(target=measure)
            worker.start()
            worker.join()
            assert torch.get_num_threads() == 3
        finally:
            torch.set_num_threads(1)

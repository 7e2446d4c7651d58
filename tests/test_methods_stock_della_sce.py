"""Model Stock, DELLA (``della``, ``della_linear``) and SCE, as mergekit 0.1.5 computes them.

Model Stock and SCE are deterministic: the same recipes give mergekit's tensors (one
``mergekit-multi`` run for the module, ``tests/support/mergekit.py``), on Llama (tied embeddings),
Qwen2 (biases, untied head) and GPT-2 (Conv1D), with gradients and filters. DELLA draws its masks
at random (mergekit with ``torch.bernoulli``, ours from seeded blocks), so it is checked by
statistics: the kept fraction per magnitude rank follows (density − ε) + 2ε·r/(L − 1) in ours and
in mergekit's own output, survivors are rescaled as mergekit does (L1 norm) or, with
``rescale_mode: density``, by their own keep probability, ε = 0 keeps exactly DARE's entries, and
the same seed gives the same merge whatever the chunking.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import load_model_tensors
from merging.errors import RecipeError
from merging.methods import get_method
from merging.methods.kernels import BLOCK, TaskVector, chunks, magprune_keep, random_keep
from tests.support.mergekit import MERGEKIT_MULTI, Case, compare, model_entry, run_mergekit_multi

needs_mergekit = pytest.mark.skipif(not MERGEKIT_MULTI, reason="mergekit is not installed (pip install -r requirements-dev.txt)")

DELLA_DENSITY, DELLA_EPSILON = 0.4, 0.2  # the statistics case: keep probabilities from 0.2 to 0.6


def build_cases(llama, qwen2, gpt2, blend: Path) -> dict[str, Case]:
    L, Q, G = llama, qwen2, gpt2
    return {
        # three fine-tunes, one of them a blend of another (so t is far from 0 on whole tensors);
        # filter_wise only on the MLP (a {filter, value} list of a bool)
        "model_stock_llama": Case({
            "merge_method": "model_stock",
            "base_model": str(L.base),
            "models": [model_entry(L.finetuned[0]), model_entry(L.finetuned[1]), model_entry(blend)],
            "parameters": {"filter_wise": [{"filter": "mlp", "value": True}, {"value": False}]},
            "dtype": "float32",
        }, None),
        # the base listed among the models (it is the origin, not an input); filter_wise everywhere
        "model_stock_qwen2": Case({
            "merge_method": "model_stock",
            "base_model": str(Q.base),
            "models": [model_entry(Q.base), *(model_entry(p) for p in Q.finetuned)],
            "parameters": {"filter_wise": True},
            "dtype": "float32",
        }, None),
        "model_stock_gpt2": Case({
            "merge_method": "model_stock",
            "base_model": str(G.base),
            "models": [model_entry(p) for p in G.finetuned],
            "dtype": "float32",
        }, None),
        # select_topk as a gradient over the three layers
        "sce_llama": Case({
            "merge_method": "sce",
            "base_model": str(L.base),
            "models": [model_entry(p) for p in L.finetuned],
            "parameters": {"select_topk": [0.2, 0.5, 0.9]},
            "dtype": "float32",
        }, None),
        # select_topk by filter (attention 0.3, the rest mergekit's default 1), int8_mask accepted
        "sce_qwen2": Case({
            "merge_method": "sce",
            "base_model": str(Q.base),
            "models": [model_entry(p) for p in Q.finetuned],
            "parameters": {"select_topk": [{"filter": "self_attn", "value": 0.3}, {"value": 1.0}], "int8_mask": True},
            "dtype": "float32",
        }, None),
        "sce_gpt2": Case({
            "merge_method": "sce",
            "base_model": str(G.base),
            "models": [model_entry(p) for p in G.finetuned],
            "parameters": {"select_topk": 0.6},
            "dtype": "float32",
        }, None),
        # statistics only: one fine-tune, so merged − base is its sparsified, rescaled task vector;
        # density and epsilon set per model
        "della_linear_llama": Case({
            "merge_method": "della_linear",
            "base_model": str(L.base),
            "models": [model_entry(L.finetuned[0], weight=1.0, density=DELLA_DENSITY, epsilon=DELLA_EPSILON)],
            "dtype": "float32",
        }, None),
    }


PARITY = ["model_stock_llama", "model_stock_qwen2", "model_stock_gpt2", "sce_llama", "sce_qwen2", "sce_gpt2"]


@pytest.fixture(scope="module")
def llama_blend(llama_family, tmp_path_factory) -> Path:
    """A Llama fine-tune whose task vector is the mean of fine-tunes 1 and 3's: independent
    fine-tunes' task vectors are nearly orthogonal (Model Stock's t ≈ 0 per tensor); this one is at
    45° to fine-tune 1's, so the mean pairwise cosine is ≈ 0.24 and t ≈ 0.5."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("blend") / "blend"
    shutil.copytree(llama_family.finetuned[2], folder)
    first, third = load_model_tensors(llama_family.finetuned[0]), load_model_tensors(llama_family.finetuned[2])
    (folder / "model.safetensors").unlink()
    save_file({name: (first[name] + third[name]) / 2 for name in third}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def cases(llama_family, qwen2_family, gpt2_family, llama_blend) -> dict[str, Case]:
    return build_cases(llama_family, qwen2_family, gpt2_family, llama_blend)


@pytest.fixture(scope="module")
def mergekit_outputs(cases, tmp_path_factory) -> dict[str, Path]:
    if not MERGEKIT_MULTI:
        pytest.skip("mergekit is not installed")
    return run_mergekit_multi({name: case.recipe for name, case in cases.items()}, tmp_path_factory.mktemp("mergekit"))


@pytest.fixture(scope="module")
def ours(cases, tmp_path_factory):
    from merging import load_recipe, merge

    root = tmp_path_factory.mktemp("ours")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            merge(load_recipe(cases[name].recipe), root / name, device="cpu")
            done[name] = root / name
        return done[name]

    return get


def run(name, base, tensors, per_model=None, seed=1234, **params):
    """Call a registered method directly with its defaults filled in."""
    method = get_method(name)
    defaults = {p.name: p.default for p in method.spec.global_params()}
    models = [{p.name: p.default for p in method.spec.model_params()} | m for m in (per_model or [{}] * len(tensors))]
    return method(base, tensors, models, defaults | params, seed=seed)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def whole(keep, numel):
    """A Keep applied chunk by chunk (as the engine does) over a flat CPU tensor."""
    return torch.cat([keep(part, torch.empty(part.stop - part.start)) for part in chunks(numel, torch.device("cpu"))])


def assert_survivors(merged: torch.Tensor, base: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """merged − base (exact in float64) equals ``expected`` to 1e-5, plus the one rounding of
    storing base + expected in float32 (an ulp of the output)."""
    survivors = merged.double() - base.double()
    tolerance = 1e-5 * expected.abs() + torch.finfo(torch.float32).eps * merged.double().abs()
    assert ((survivors - expected).abs() <= tolerance).all(), what


def row_rank_fraction(delta: torch.Tensor) -> torch.Tensor:
    """r/(L − 1) of each |δ| within its row along dim 1 (a vector: one row), computed independently."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).double()
    return (ranks / (rows.shape[1] - 1)).reshape(delta.shape)


# -- parity with mergekit -------------------------------------------------------------------

@needs_mergekit
@pytest.mark.parametrize("name", PARITY)
def test_same_tensors_as_mergekit(name, cases, mergekit_outputs, ours):
    compare(cases[name], load_model_tensors(ours(name)), load_model_tensors(mergekit_outputs[name]))


def test_model_stock_parity_case_interpolates_far_from_both_ends(ours, llama_family, llama_blend):
    """The Llama case's whole-tensor ratio is well inside (0, 1), so its parity is a strong check."""
    merged = load_model_tensors(ours("model_stock_llama"))
    base = load_model_tensors(llama_family.base)
    models = [load_model_tensors(p) for p in (*llama_family.finetuned[:2], llama_blend)]
    name = "model.layers.1.self_attn.q_proj.weight"  # not an MLP tensor: one ratio for the tensor
    towards = sum(m[name] for m in models) / 3 - base[name]
    ratio = ((merged[name] - base[name]) * towards).sum() / towards.square().sum()
    assert 0.35 < ratio < 0.65
    assert torch.allclose(merged[name], base[name] + ratio * towards, atol=1e-6)


@needs_mergekit
def test_della_keeps_the_same_fraction_per_magnitude_rank_and_the_same_l1_norm_as_mergekit(
        cases, mergekit_outputs, ours, llama_family):
    base, tuned = load_model_tensors(llama_family.base), load_model_tensors(llama_family.finetuned[0])
    bins = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0001])
    kept = {"ours": torch.zeros(4), "mergekit": torch.zeros(4)}
    counts, expected = torch.zeros(4), torch.zeros(4)
    for who, folder in (("ours", ours("della_linear_llama")), ("mergekit", mergekit_outputs["della_linear_llama"])):
        merged = load_model_tensors(folder)
        for name, out in merged.items():
            delta = tuned[name].double() - base[name].double()
            survivors = out.double() - base[name].double()
            # rescaled to the L1 norm of the whole task vector (mergekit's rescale)
            assert survivors.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4), (who, name)
            fraction = row_rank_fraction(delta).reshape(-1)
            which = torch.bucketize(fraction, bins, right=True) - 1  # the quarter of ranks of each entry
            alive = (out != base[name]).reshape(-1).double()
            kept[who] += torch.zeros(4, dtype=torch.float64).index_add_(0, which, alive).float()
            if who == "ours":
                counts += torch.bincount(which, minlength=4).float()
                probability = DELLA_DENSITY - DELLA_EPSILON + 2 * DELLA_EPSILON * fraction
                expected += torch.zeros(4, dtype=torch.float64).index_add_(0, which, probability).float()
    assert counts.sum() > 150_000
    expected /= counts  # the mean keep probability of each quarter, from mergekit's schedule
    for who, total in kept.items():  # about 48k entries per quarter: one standard deviation ≈ 0.0023
        assert torch.allclose(total / counts, expected, atol=0.012), (who, (total / counts).tolist(), expected.tolist())
    assert torch.allclose(kept["ours"] / counts, kept["mergekit"] / counts, atol=0.015)


@pytest.mark.parametrize("name", ["model_stock_qwen2", "sce_gpt2", "della_linear_llama"])
def test_merged_folder_loads_with_transformers(name, ours):
    from transformers import AutoModelForCausalLM

    folder = ours(name)
    model = AutoModelForCausalLM.from_pretrained(folder)
    state = model.state_dict()
    for tensor_name, tensor in load_model_tensors(folder).items():
        assert torch.equal(state[tensor_name], tensor), tensor_name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()


# -- Model Stock ----------------------------------------------------------------------------

def test_model_stock_follows_the_papers_ratio_for_a_known_angle():
    # offsets of equal length at 60°: cos θ = 0.5, t = 2·0.5 / (1 + 0.5) = 2/3
    base = t(1.0, 1.0)
    x1, x2 = base + t(2.0, 0.0), base + t(1.0, 3**0.5)
    expected = base + (2 / 3) * ((x1 + x2) / 2 - base)
    assert torch.allclose(run("model_stock", base, [x1, x2]), expected, atol=1e-6)


def test_model_stock_returns_the_base_when_every_fine_tune_equals_the_base():
    base = torch.randn(6, 5)
    assert torch.equal(run("model_stock", base, [base.clone(), base.clone()]), base)
    assert torch.equal(run("model_stock", base, [base.clone(), base.clone()], filter_wise=True), base)


def test_model_stock_keeps_the_base_where_offsets_are_opposite():
    # two fine-tunes on opposite sides: cos θ = −1, 1 + (N − 1) cos θ = 0, no finite ratio
    base, offset = t(0.5, -1.0, 2.0), t(0.1, 0.2, -0.3)
    assert torch.equal(run("model_stock", base, [base + offset, base - offset]), base)


def test_model_stock_of_identical_fine_tunes_is_that_fine_tune():
    base = torch.randn(4, 3)
    tuned = base + 0.1 * torch.randn(4, 3)
    assert torch.allclose(run("model_stock", base, [tuned, tuned.clone(), tuned.clone()]), tuned, atol=1e-6)


def test_model_stock_filter_wise_gives_each_row_its_own_ratio():
    base = torch.zeros(2, 2)
    # row 0: offsets at 90° (t = 0, stays at the base); row 1: identical offsets (t = 1)
    x1, x2 = t(1.0, 0.0, 3.0, 4.0).reshape(2, 2), t(0.0, 1.0, 3.0, 4.0).reshape(2, 2)
    merged = run("model_stock", base, [x1, x2], filter_wise=True)
    assert torch.allclose(merged, t(0.0, 0.0, 3.0, 4.0).reshape(2, 2), atol=1e-6)
    whole_tensor = run("model_stock", base, [x1, x2])  # one ratio: strictly between 0 and 1 for both rows
    assert 0 < whole_tensor[0, 0] < 0.5 and 0 < whole_tensor[1, 1] < 4


def test_model_stock_needs_a_base_and_two_fine_tunes(llama_family):
    from merging import load_recipe

    one = {"merge_method": "model_stock", "base_model": str(llama_family.base),
           "models": [{"model": str(llama_family.finetuned[0])}]}
    with pytest.raises(RecipeError, match="at least 2"):
        load_recipe(one)
    with pytest.raises(RecipeError, match="base_model"):
        load_recipe({"merge_method": "model_stock", "models": [{"model": str(p)} for p in llama_family.finetuned]})


# -- SCE ------------------------------------------------------------------------------------

def test_sce_weights_by_mean_square_and_averages_the_agreeing_entries():
    base = torch.zeros(4)
    d1, d2 = t(3.0, -2.0, 0.5, 1.0), t(-1.0, -4.0, 2.0, -1.0)
    # coefficients: mean squares 14.25/4 and 22/4, normalized: 14.25/36.25 and 22/36.25
    w1, w2 = 14.25 / 36.25, 22 / 36.25
    # elected signs of d1 + d2: [+, −, +, + (0 counts as +)]
    expected = t(3.0, (w1 * -2 + w2 * -4) / (w1 + w2), (w1 * 0.5 + w2 * 2) / (w1 + w2), 1.0)
    assert torch.allclose(run("sce", base, [d1, d2]), expected, atol=1e-6)


def test_sce_select_topk_keeps_the_entries_that_vary_most_across_models():
    base = torch.zeros(4)
    d1, d2 = t(1.0, 5.0, 1.0, -3.0), t(1.2, -5.0, 1.0, 3.0)
    # variances: 0.01, 25, 0, 9; three are non-zero, int(3 · 0.67) = 2 are kept: entries 1 and 3
    merged = run("sce", base, [d1, d2], select_topk=0.67)
    assert merged[0] == 0 and merged[2] == 0
    # at entries 1 and 3 the two models cancel exactly: the elected sign is +, only the positive one counts
    assert torch.allclose(merged[[1, 3]], t(5.0, 3.0))


def test_sce_returns_the_base_when_every_model_equals_the_base_or_nothing_is_selected():
    base = torch.randn(5, 7)
    assert torch.equal(run("sce", base, [base.clone(), base.clone()]), base)
    tuned = [base + 0.01 * torch.randn(5, 7) for _ in range(2)]
    assert torch.equal(run("sce", base, tuned, select_topk=0.0), base)


# -- DELLA ----------------------------------------------------------------------------------

@needs_mergekit
def test_magprune_keeps_each_magnitude_rank_with_mergekits_probability():
    from mergekit.sparsify import della_magprune

    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(4096, 64, generator=generator)
    density, epsilon = 0.5, 0.2
    ours = whole(magprune_keep(TaskVector(delta, torch.zeros_like(delta)), density, epsilon, seed=3), delta.numel())
    torch.manual_seed(1234)  # not 0: the same stream as the generator that drew delta would correlate them
    theirs = (della_magprune(delta, density, epsilon) != 0).reshape(-1).float()
    rank = (row_rank_fraction(delta).reshape(-1) * 63).round().long()  # 0..63 within each row
    expected = density - epsilon + 2 * epsilon * torch.arange(64) / 63
    for mask in (ours, theirs):  # per rank: 4096 draws (σ ≤ 0.008); per eighth of the ranks: 32768 (σ ≤ 0.003)
        per_rank = torch.zeros(64).index_add_(0, rank, mask) / 4096
        assert (per_rank - expected).abs().max() < 0.04
        assert torch.allclose(per_rank.view(8, 8).mean(1), expected.view(8, 8).mean(1), atol=0.012)
    assert abs(ours.mean().item() - density) < 0.005


@pytest.mark.parametrize("shape", [(3000,), (40, 50), (6, 20, 30)])
def test_magprune_ranks_along_dim_1_as_mergekit(shape):
    """With ``divide`` each survivor holds 1/pᵢ: pᵢ read back must be the schedule at its rank
    along dim 1 (the rows of a matrix, the whole of a vector, dim 1 of a 3-d tensor)."""
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(shape, generator=generator)
    density, epsilon = 0.45, 0.3
    task_vector = TaskVector(delta, torch.zeros_like(delta))
    keep = magprune_keep(task_vector, density, epsilon, seed=9, divide=True)
    scaled = whole(keep, delta.numel())
    assert torch.equal(whole(keep, delta.numel()), scaled)  # a second pass (as the L1 rescale makes) is the same
    moved = delta.movedim(1, -1) if delta.dim() >= 3 else delta
    fraction = row_rank_fraction(moved.reshape(-1, moved.shape[-1]) if delta.dim() >= 3 else moved)
    if delta.dim() >= 3:
        fraction = fraction.reshape(moved.shape).movedim(-1, 1)
    probability = (density - epsilon + 2 * epsilon * fraction).reshape(-1)
    alive = scaled != 0
    assert 0.4 < alive.float().mean() < 0.5
    assert torch.allclose(1 / scaled[alive].double(), probability[alive], rtol=1e-6)
    # the 0/1 mask has exactly the same survivors
    assert torch.equal(whole(magprune_keep(task_vector, density, epsilon, seed=9), delta.numel()) != 0, alive)


def test_magprune_with_epsilon_zero_keeps_exactly_dares_entries():
    delta = torch.randn(3 * BLOCK // 100 + 7, 100)  # four chunks
    task_vector = TaskVector(delta, torch.zeros_like(delta))
    for density in (0.1, 0.3, 0.77):
        della = whole(magprune_keep(task_vector, density, 0.0, seed=5), delta.numel())
        dare = whole(random_keep(delta.numel(), density, seed=5), delta.numel())
        assert torch.equal(della, dare)


def test_della_linear_with_epsilon_zero_is_dare_linear():
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(300, 40, generator=generator)
    tuned = [base + 0.01 * torch.randn(300, 40, generator=generator) for _ in range(2)]
    models = [{"weight": 0.6, "density": 0.3}, {"weight": 0.5, "density": 0.6}]
    for mode in ("l1", "density"):
        della = run("della_linear", base, tuned, [m | {"epsilon": 0.0} for m in models], rescale_mode=mode)
        dare = run("dare_linear", base, tuned, models, rescale_mode=mode)
        assert torch.allclose(della, dare, rtol=0, atol=1e-6), mode


def test_della_rescales_survivors_to_the_task_vectors_l1_norm_by_default():
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(200, 64, generator=generator)
    tuned = base + 0.01 * torch.randn(200, 64, generator=generator)
    delta = (tuned - base).double()
    for method in ("della_linear", "della"):
        merged = run(method, base, [tuned], [{"density": 0.3, "epsilon": 0.1}])
        alive = merged != base
        factor = delta.abs().sum() / delta[alive].abs().sum()  # one common factor, restoring ‖δ‖₁
        assert_survivors(merged[alive], base[alive], factor * delta[alive], method)
        assert abs(alive.float().mean().item() - 0.3) < 0.02


def test_della_rescale_mode_density_divides_each_survivor_by_its_keep_probability():
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(200, 64, generator=generator)
    tuned = base + 0.01 * torch.randn(200, 64, generator=generator)
    delta = (tuned - base).double()
    merged = run("della_linear", base, [tuned], [{"density": 0.5, "epsilon": 0.25}], rescale_mode="density")
    alive = merged != base
    probability = 0.25 + 0.5 * row_rank_fraction(tuned - base)
    assert_survivors(merged[alive], base[alive], delta[alive] / probability[alive], "survivors / p")
    unscaled = run("della_linear", base, [tuned], [{"density": 0.5, "epsilon": 0.25}], rescale=False)
    assert torch.equal(unscaled != base, alive)  # the same survivors, as they were
    assert_survivors(unscaled[alive], base[alive], delta[alive], "survivors unscaled")


def test_della_with_one_model_is_della_linear_whatever_its_weight():
    """The TIES consensus of one model is that model (normalize divides its weight out)."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(100, 30, generator=generator)
    tuned = base + 0.01 * torch.randn(100, 30, generator=generator)
    della = run("della", base, [tuned], [{"weight": 0.3, "density": 0.6}])
    linear = run("della_linear", base, [tuned], [{"weight": 1.0, "density": 0.6}])
    assert torch.allclose(della, linear, rtol=0, atol=1e-6)


def test_della_same_seed_same_masks_on_any_chunking_and_different_seed_different_masks():
    # rows of 123 entries: chunk boundaries (multiples of BLOCK) cut rows in two
    delta = torch.randn(5000, 123)
    task_vector = TaskVector(delta, torch.zeros_like(delta))
    chunked = whole(magprune_keep(task_vector, 0.5, 0.2, seed=11), delta.numel())
    assert len(list(chunks(delta.numel(), torch.device("cpu")))) == 3
    at_once = magprune_keep(task_vector, 0.5, 0.2, seed=11)(slice(0, delta.numel()), delta.reshape(-1))
    assert torch.equal(chunked, at_once)
    assert torch.equal(chunked, whole(magprune_keep(task_vector, 0.5, 0.2, seed=11), delta.numel()))
    other = whole(magprune_keep(task_vector, 0.5, 0.2, seed=12), delta.numel())
    # independent masks agree on p² + (1 − p)² of the entries on average, about 0.5 here
    assert 0.45 < (other == chunked).float().mean() < 0.6


def test_della_merges_are_reproducible_from_the_recipe_seed(llama_family, tmp_path):
    from merging import load_recipe, merge

    def merged(seed, out):
        recipe = {"merge_method": "della", "base_model": str(llama_family.base), "seed": seed, "dtype": "float32",
                  "models": [model_entry(p, weight=0.5, density=0.5) for p in llama_family.finetuned[:2]]}
        merge(load_recipe(recipe), tmp_path / out, device="cpu")
        return load_model_tensors(tmp_path / out)

    first, again, other = merged(7, "a"), merged(7, "b"), merged(8, "c")
    assert all(torch.equal(first[name], again[name]) for name in first)
    name = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(first[name], other[name])


def test_della_rejects_probabilities_outside_0_1_as_mergekit():
    base = torch.zeros(10, 10)
    tuned = [base + 0.1]
    with pytest.raises(RecipeError, match="density ± epsilon"):
        run("della", base, tuned, [{"density": 0.1, "epsilon": 0.15}])
    with pytest.raises(RecipeError, match="density ± epsilon"):
        run("della_linear", base, tuned, [{"density": 0.9, "epsilon": 0.1}])
    assert torch.equal(run("della", base, tuned, [{"density": 1.0, "epsilon": 0.3}]), base + 0.1)  # nothing dropped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_della_masks_are_the_same_on_cuda_as_on_the_cpu():
    delta = torch.randn(3000, 200)
    cpu = whole(magprune_keep(TaskVector(delta, torch.zeros_like(delta)), 0.4, 0.15, seed=21, divide=True),
                delta.numel())
    gpu_delta = delta.cuda()
    task_vector = TaskVector(gpu_delta, torch.zeros_like(gpu_delta))
    keep = magprune_keep(task_vector, 0.4, 0.15, seed=21, divide=True)
    gpu = torch.cat([keep(part, gpu_delta.reshape(-1)[part]) for part in chunks(delta.numel(), gpu_delta.device)])
    assert torch.equal(cpu, gpu.cpu())

"""DARE (``dare_linear``, ``dare_ties``) on real checkpoints: the random drop, its rescale, its seed.

DARE (Yu et al., 2023, https://arxiv.org/abs/2311.03099) keeps each entry of a task vector
δ = θ_ft − θ_base with probability p = density and rescales the survivors: by default δ/p (the
paper's unbiased estimator), with ``rescale_mode: l1`` so the tensor keeps the L1 norm of δ
(mergekit's behaviour). Random masks are seeded per tensor name from the recipe seed, so a merge
is reproducible and independent of the order in which tensors are processed.

The statistics use one fine-tune with weight 1 and lambda 1, so merged − base is exactly the
rescaled, masked task vector of that model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import load_model_tensors, run_cli, write_recipe

METHODS = ["dare_linear", "dare_ties"]
BIG = 10_000  # tensors with at least this many entries get the density statistics


def merge_dict(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    """Merge in-process and return the merged tensors."""
    from merging import load_recipe, merge

    merge(load_recipe(recipe), out, device="cpu")
    return load_model_tensors(out)


def two_model_recipe(method: str, family, **extra) -> dict:
    return {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [
            {"model": str(family.finetuned[0]), "parameters": {"weight": 0.6, "density": 0.4}},
            {"model": str(family.finetuned[1]), "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        "dtype": "float32",
        **extra,
    }


def one_model_recipe(family, density: float, **parameters) -> dict:
    return {
        "merge_method": "dare_linear",
        "base_model": str(family.base),
        "models": [{"model": str(family.finetuned[0]), "parameters": {"weight": 1.0, "density": density}}],
        "parameters": {"lambda": 1.0, **parameters},
        "dtype": "float32",
    }


def assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{name} differs"


# -- the seed -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_same_seed_gives_bit_identical_output(method, dare_family, tmp_path):
    """Twice with seed 7: once from the recipe's ``seed`` in-process, once with the CLI's ``--seed``."""
    first = merge_dict(two_model_recipe(method, dare_family, seed=7), tmp_path / "first")
    recipe = write_recipe(tmp_path / "recipe.yaml", two_model_recipe(method, dare_family))
    result = run_cli("merge", recipe, tmp_path / "second", "--seed", "7", "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    assert_identical(first, load_model_tensors(tmp_path / "second"))


@pytest.mark.parametrize("method", METHODS)
def test_different_seed_gives_different_output(method, dare_family, tmp_path):
    a = merge_dict(two_model_recipe(method, dare_family, seed=7), tmp_path / "a")
    b = merge_dict(two_model_recipe(method, dare_family, seed=8), tmp_path / "b")
    same = [name for name in a if torch.equal(a[name], b[name])]
    assert not same, f"seeds 7 and 8 gave identical tensors: {same}"


def test_masks_differ_between_tensors_of_one_merge(dare_family, tmp_path):
    """Each tensor has its own random stream (seeded by its name), not one mask reused."""
    merged = merge_dict(one_model_recipe(dare_family, 0.5), tmp_path / "out")
    base = load_model_tensors(dare_family.base)
    kept = {name: merged[name] != base[name] for name in merged}
    layer0, layer1 = kept["model.layers.0.mlp.up_proj.weight"], kept["model.layers.1.mlp.up_proj.weight"]
    gate0 = kept["model.layers.0.mlp.gate_proj.weight"]
    assert layer0.shape == layer1.shape == gate0.shape
    assert not torch.equal(layer0, layer1) and not torch.equal(layer0, gate0)
    # independent masks overlap on about density**2 of the entries
    assert abs((layer0 & layer1).float().mean().item() - 0.25) < 0.01


# -- the drop and its rescale ---------------------------------------------------------------

@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_kept_fraction_is_density_and_survivors_are_delta_over_density(density, dare_family, tmp_path):
    merged = merge_dict(one_model_recipe(dare_family, density), tmp_path / "out")
    base, tuned = load_model_tensors(dare_family.base), load_model_tensors(dare_family.finetuned[0])
    fractions, total_kept, total = {}, 0, 0
    for name, out in merged.items():
        delta = tuned[name] - base[name]
        kept = out != base[name]
        assert not (kept & (delta == 0)).any(), f"{name}: entries changed where the task vector is 0"
        # Survivors are δ/density: merged − base (exact in float64) equals δ/density to 1e-6,
        # plus the one rounding of storing base + δ/density as a float32 (one ulp of the output;
        # it matters where base ≈ −δ/density and the output is near 0).
        survivor = out[kept].double() - base[name][kept].double()
        expected = (tuned[name][kept].double() - base[name][kept].double()) / density
        tolerance = 1e-6 * expected.abs() + torch.finfo(torch.float32).eps * out[kept].double().abs()
        error = (survivor - expected).abs()
        assert (error <= tolerance).all(), (
            f"{name}: survivors are not delta/density; (merged-base)/delta ranges "
            f"{(survivor / expected).min().item() / density:.7g}..{(survivor / expected).max().item() / density:.7g}"
            f", expected {1 / density:.7g}; worst error {error.max().item():.3g}"
        )
        if delta.numel() >= BIG:
            nonzero = delta != 0
            fractions[name] = (kept & nonzero).sum().item() / nonzero.sum().item()
            total_kept += (kept & nonzero).sum().item()
            total += nonzero.sum().item()
    assert len(fractions) >= 5, f"too few tensors with >= {BIG} entries: {sorted(fractions)}"
    off = {name: round(f, 4) for name, f in fractions.items() if abs(f - density) > 0.01}
    assert not off, f"kept fraction more than 1% away from density {density}: {off}"
    assert abs(total_kept / total - density) < 0.002, f"pooled kept fraction {total_kept / total:.4f}"


@pytest.mark.parametrize("density", [0.1, 0.5])
def test_l1_rescale_keeps_each_tensors_l1_norm(density, dare_family, tmp_path):
    merged = merge_dict(one_model_recipe(dare_family, density, rescale_mode="l1"), tmp_path / "out")
    base, tuned = load_model_tensors(dare_family.base), load_model_tensors(dare_family.finetuned[0])
    checked = 0
    for name, out in merged.items():
        merged_delta = out.double() - base[name].double()
        if not merged_delta.any():  # nothing survived (tiny tensor at a low density): no rescale
            continue
        before = (tuned[name].double() - base[name].double()).abs().sum().item()
        after = merged_delta.abs().sum().item()
        assert after == pytest.approx(before, rel=1e-5), f"{name}: L1 {after:.8g} after, {before:.8g} before"
        checked += 1
    assert checked >= len(merged) - 2, f"only {checked} of {len(merged)} tensors had survivors"


# -- order independence ---------------------------------------------------------------------

def test_result_does_not_depend_on_tensor_order(dare_family, dare_family_sharded, tmp_path):
    """The same models saved as one file and as 20 KB shards are read in different orders; a
    seeded DARE merge of either gives the same tensors."""
    from merging.checkpoint import CheckpointReader

    single, sharded = dare_family.base, dare_family_sharded.base
    assert len(list(sharded.glob("*.safetensors"))) > 3, "the sharded copy is not sharded"
    for a, b in zip([dare_family.base, *dare_family.finetuned], [sharded, *dare_family_sharded.finetuned]):
        assert_identical(load_model_tensors(a), load_model_tensors(b))  # the same models
    order_single = CheckpointReader(single).names()
    order_sharded = CheckpointReader(sharded).names()
    assert sorted(order_single) == sorted(order_sharded) and order_single != order_sharded

    for method in METHODS:
        a = merge_dict(two_model_recipe(method, dare_family, seed=3), tmp_path / f"{method}-single")
        b = merge_dict(two_model_recipe(method, dare_family_sharded, seed=3), tmp_path / f"{method}-sharded")
        assert_identical(a, b)

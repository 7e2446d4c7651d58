"""A merge exported as a PEFT LoRA adapter on its base (``merging.lora_export``, ``extract-lora``, the Export tab).

The proof is peft itself: the adapter loads with ``PeftModel.from_pretrained`` on the base without
key warnings, and base + adapter's logits approach the merged model's as the rank grows, equal at
full rank (where only linear weights differ). The reported errors are checked against an
independent float64 SVD.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from helpers import copy_model, edit_tensors, error_line, family, load_model_tensors, run_cli, write_recipe
from merging.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from merging.errors import MergeStudioError
from merging.lora_export import extract_lora

TOKENS = torch.tensor([[1, 5, 17, 42, 99, 200, 311, 7]])
FULL = 4096  # more than any tiny layer's smaller side: every layer at its full rank


FAMILIES = {"llama": {}, "gpt2": {}, "qwen2": {"tie_word_embeddings": False}}  # gpt2: Conv1D; qwen2: untied lm_head


def linear_only(arch: str, tmp_path):
    """(base, merged): merged is the base with only the linear layers of fine-tune 1 (its 2-D weights
    but the embeddings; an lm_head is stored only when untied), so LoRA can express the whole difference."""
    fam = family(arch, 2, **FAMILIES[arch])
    expert = load_model_tensors(fam.finetuned[0])

    def take_linear(state):
        for name in state:
            if state[name].ndim == 2 and not any(part in name for part in ("embed", "wte", "wpe")):
                state[name] = expert[name].clone()

    merged = copy_model(fam.base, tmp_path / f"{arch}-merged")
    edit_tensors(merged, take_linear)
    return fam.base, merged


def ties_merge(tmp_path):
    """A real merge (ties of two fine-tunes on the base): its norms and embeddings change too."""
    from merging.engine import merge
    from merging.recipe import load_recipe

    fam = family("llama", 2)
    recipe = {"merge_method": "ties", "base_model": str(fam.base),
              "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in fam.finetuned]}
    return fam.base, merge(load_recipe(write_recipe(tmp_path / "ties.yaml", recipe)), tmp_path / "ties",
                           device="cpu").output


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits_with_adapter(base, adapter) -> torch.Tensor:
    """Base + adapter's logits, failing on any warning about keys peft did not expect or did not find."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load(base), str(adapter)).eval()
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings, key_warnings
    with torch.no_grad():
        return model(TOKENS).logits.detach()


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_base_plus_adapter_approaches_the_merge_as_the_rank_grows_and_equals_it_at_full_rank(arch, tmp_path):
    base, merged = linear_only(arch, tmp_path)
    with torch.no_grad():
        target = load(merged)(TOKENS).logits
    gaps, errors = [], []
    for rank in (1, 4, 16, FULL):
        result = extract_lora(str(merged), str(base), tmp_path / f"r{rank}", rank, device="cpu")
        assert not result.left_out and result.left_out_share == 0
        assert ("lm_head" in {layer.name for layer in result.layers}) == (arch == "qwen2")
        # mean squared: the fine-tunes' deltas are random (full-rank), so a single logit's gap need not shrink
        gaps.append(float((logits_with_adapter(base, result.output) - target).square().mean()))
        errors.append(result.relative_error)
    assert gaps == sorted(gaps, reverse=True) and errors == sorted(errors, reverse=True) and len(set(gaps)) == 4
    assert errors[-1] < 1e-6
    torch.testing.assert_close(logits_with_adapter(base, tmp_path / f"r{FULL}"), target, rtol=1e-4, atol=1e-4)


def test_the_adapter_is_peft_format_with_scaling_one_and_narrow_layers_in_rank_pattern(tmp_path):
    base, merged = linear_only("llama", tmp_path)
    result = extract_lora(str(merged), str(base), tmp_path / "adapter", 4, device="cpu")
    config = json.loads((result.output / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["r"] == config["lora_alpha"] == 4 and config["base_model_name_or_path"] == str(base)
    assert sorted(config["target_modules"]) == sorted(layer.name for layer in result.layers)
    tensors = load_file(result.output / ADAPTER_WEIGHTS)
    assert set(tensors) == {f"base_model.model.{layer.name}.lora_{ab}.weight" for layer in result.layers for ab in "AB"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert result.bytes == sum(p.stat().st_size for p in result.output.iterdir())
    full = json.loads((extract_lora(str(merged), str(base), tmp_path / "full", 100, device="cpu").output
                       / ADAPTER_CONFIG).read_text())
    assert full["rank_pattern"] == full["alpha_pattern"] and set(full["rank_pattern"].values()) == {64}


def test_reported_errors_match_an_independent_float64_svd_and_what_lora_cannot_hold_is_listed(tmp_path):
    base, merged = ties_merge(tmp_path)
    result = extract_lora(str(merged), str(base), tmp_path / "adapter", 4, device="cpu")
    before, after = load_model_tensors(base), load_model_tensors(merged)
    tails, totals, left = 0.0, 0.0, 0.0
    for layer in result.layers:
        delta = after[f"{layer.name}.weight"].double() - before[f"{layer.name}.weight"].double()
        sigma = torch.linalg.svdvals(delta)
        expected = math.sqrt(float((sigma[4:] ** 2).sum() / (sigma ** 2).sum()))
        assert layer.relative_error == pytest.approx(expected, rel=1e-6)
        tails += float((sigma[4:] ** 2).sum())
        totals += float((sigma ** 2).sum())
    assert result.relative_error == pytest.approx(math.sqrt(tails / totals), rel=1e-6)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert set(result.left_out) == changed - {f"{layer.name}.weight" for layer in result.layers}
    assert result.left_out and all("norm" in n or "embed" in n for n in result.left_out)  # lm_head is tied here
    left = sum(float(((after[n].double() - before[n].double()) ** 2).sum()) for n in result.left_out)
    assert result.left_out_share == pytest.approx(left / (left + totals), rel=1e-6)
    assert "Left out" in result.describe() and "MiB" in result.describe()


def test_biases_and_norms_are_left_out_and_an_untied_lm_head_is_a_lora_target(tmp_path):
    fam = family("qwen2", 2, **FAMILIES["qwen2"])
    result = extract_lora(str(fam.finetuned[0]), str(fam.base), tmp_path / "adapter", 8, device="cpu")
    assert "lm_head" in {layer.name for layer in result.layers}
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.input_layernorm.weight"} <= set(result.left_out)
    assert 0 < result.left_out_share < 1
    logits_with_adapter(fam.base, result.output)  # loads without key warnings


def test_bad_rank_mismatched_models_and_sources_as_output_are_one_line_errors(tmp_path):
    base, merged = linear_only("llama", tmp_path)
    for rank in (0, -3, 2.5, True):
        with pytest.raises(MergeStudioError, match="rank must be"):
            extract_lora(str(merged), str(base), tmp_path / "out", rank)
    with pytest.raises(MergeStudioError, match="GPT2LMHeadModel: different architectures"):
        extract_lora(str(merged), str(family("gpt2", 2).base), tmp_path / "out", 2, device="cpu")
    with pytest.raises(MergeStudioError, match=r"is \[\d+, 32\] in .* but \[\d+, 64\] in .*different architectures"):
        extract_lora(str(family("llama", 2, hidden_size=32).base), str(base), tmp_path / "out", 2, device="cpu")
    with pytest.raises(MergeStudioError, match="overlaps"):
        extract_lora(str(merged), str(base), merged / "adapter", 2, device="cpu")
    with pytest.raises(MergeStudioError, match="no linear layer differs"):
        extract_lora(str(base), str(base), tmp_path / "same", 2, device="cpu")
    assert not (tmp_path / "out").exists() and not (tmp_path / "same").exists()


def test_cli_writes_the_adapter_and_prints_its_summary_as_json(tmp_path):
    base, merged = linear_only("llama", tmp_path)
    done = run_cli("extract-lora", merged, base, tmp_path / "adapter", "--rank", "8", "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["rank"] == 8 and summary["bytes"] > 0 and 0 < summary["relative_error"] < 1
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
    plain = run_cli("extract-lora", merged, base, tmp_path / "plain", "--rank", "2", "--device", "cpu")
    assert plain.returncode == 0 and "relative reconstruction error" in plain.stdout
    assert "rank must be" in error_line(run_cli("extract-lora", merged, base, tmp_path / "bad", "--rank", "0"))
    mismatch = run_cli("extract-lora", merged, family("gpt2", 2).base, tmp_path / "bad", "--rank", "2")
    assert "architecture" in error_line(mismatch)
    assert "already exists" in error_line(run_cli("extract-lora", merged, base, tmp_path / "adapter", "--rank", "2"))


def test_export_tab_writes_the_adapter_of_a_session_merge_and_offers_a_zip(tmp_path):
    import zipfile

    from studio import Settings
    from studio.export_tab import make_lora

    base, merged = ties_merge(tmp_path)
    settings = Settings(work_dir=tmp_path / "work", device="cpu")
    done = [{"name": "ties", "output": str(merged)}]
    archive, text = make_lora(settings, str(merged), 4, done, None)
    with zipfile.ZipFile(archive) as z:
        assert {n.rsplit("/", 1)[-1] for n in z.namelist()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    assert "rank 4" in text and "MiB" in text and "relative reconstruction error" in text and "Left out" in text
    with pytest.raises(MergeStudioError, match="not one of this session's"):
        make_lora(settings, str(base), 4, done, None)
    with pytest.raises(MergeStudioError, match="rank must be"):
        make_lora(settings, str(merged), 0, done, None)

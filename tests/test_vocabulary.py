"""Tokenizer settings as mergekit 0.1.5 applies them: the output tokenizer (base, union, a model,
extra tokens, padding), every model's embedding and lm_head rows aligned to it, and the chat
template. Compared tensor by tensor with one ``mergekit-multi`` run (1e-5)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import error_line, load_model_tensors, run_cli, write_recipe
from merging.engine import merge
from merging.recipe import load_recipe
from tests.support.mergekit import MERGEKIT_MULTI, Case, compare, run_mergekit_multi

pytestmark = pytest.mark.skipif(not MERGEKIT_MULTI, reason="mergekit is not installed")
NEW_TOKENS = ["zebrafish", "<tool>"]


def _extended(source, folder, seed: int, tokens=NEW_TOKENS, special=("<|im_start|>",), rows: int | None = None):
    """A copy of ``source`` whose tokenizer has extra tokens (or whose embeddings have padding
    rows), its embedding (and lm_head) resized to match, as a fine-tune that added tokens is."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens(list(tokens))
    tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    model = AutoModelForCausalLM.from_pretrained(source)
    model.resize_token_embeddings(rows or len(tokenizer), mean_resizing=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.copy(source / "generation_config.json", folder)
    return folder


@pytest.fixture(scope="module")
def models(qwen2_family, llama_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return {
        "base": qwen2_family.base, "a": qwen2_family.finetuned[0],
        "b_more_tokens": _extended(qwen2_family.finetuned[1], root / "b", seed=1),
        "c_other_tokens": _extended(qwen2_family.finetuned[0], root / "c", seed=2, tokens=["narwhal"], special=()),
        "padded": _extended(llama_family.finetuned[0], root / "padded", seed=3, tokens=[], special=(), rows=520),
        "llama_base": llama_family.base, "llama_b": llama_family.finetuned[1],
    }


def build_cases(m) -> dict[str, Case]:
    ties_models = [{"model": str(m["a"]), "parameters": {"weight": 0.6, "density": 0.7}},
                   {"model": str(m["b_more_tokens"]), "parameters": {"weight": 0.4, "density": 0.5}},
                   {"model": str(m["c_other_tokens"]), "parameters": {"weight": 0.5, "density": 0.9}}]
    return {
        "union_ties": Case({"merge_method": "ties", "base_model": str(m["base"]), "models": ties_models,
                            "tokenizer_source": "union", "dtype": "float32"},
                           m["base"], (m["a"], m["b_more_tokens"], m["c_other_tokens"])),
        "union_tokens_padded_linear": Case({
            "merge_method": "linear",
            "models": [{"model": str(m["base"]), "parameters": {"weight": 1.0}},
                       {"model": str(m["b_more_tokens"]), "parameters": {"weight": 2.0}},
                       {"model": str(m["c_other_tokens"]), "parameters": {"weight": 1.0}}],
            "tokenizer": {"source": "union", "pad_to_multiple_of": 64,
                          "tokens": {"<tool>": {"source": str(m["b_more_tokens"]), "force": True},
                                     "narwhal": {"source": {"kind": "zero"}, "force": True},
                                     "<extra>": {"source": {"kind": "model_token", "model": str(m["base"]), "token": "a"}}}},
            "dtype": "float32"}, None),
        "source_model_task_arithmetic": Case({
            "merge_method": "task_arithmetic", "base_model": str(m["base"]),
            "models": [{"model": str(m["a"]), "parameters": {"weight": 0.5}},
                       {"model": str(m["b_more_tokens"]), "parameters": {"weight": 0.5}}],
            "tokenizer_source": str(m["b_more_tokens"]), "dtype": "float32"}, m["base"]),
        # mergekit's issue #425: padding rows beyond the tokenizer go, unless pad_to_multiple_of keeps them
        "padded_base": Case({"merge_method": "linear",
                             "models": [{"model": str(m["padded"]), "parameters": {"weight": 1.0}},
                                        {"model": str(m["llama_b"]), "parameters": {"weight": 0.5}}],
                             "tokenizer_source": "base", "base_model": str(m["padded"]), "dtype": "float32"}, None),
        "chatml_template": Case({"merge_method": "linear", "models": [{"model": str(m["a"]), "parameters": {"weight": 1.0}},
                                                                      {"model": str(m["base"]), "parameters": {"weight": 1.0}}],
                                 "chat_template": "chatml", "dtype": "float32"}, None),
    }


@pytest.fixture(scope="module")
def cases(models):
    return build_cases(models)


@pytest.fixture(scope="module")
def mergekit_outputs(cases, tmp_path_factory):
    return run_mergekit_multi({name: case.recipe for name, case in cases.items()}, tmp_path_factory.mktemp("mk-vocab"))


@pytest.fixture(scope="module")
def ours(cases, tmp_path_factory):
    root = tmp_path_factory.mktemp("our-vocab")
    return {name: merge(load_recipe(case.recipe), root / name, device="cpu").output for name, case in cases.items()}


def in_our_token_order(tensors: dict, mine, theirs) -> dict:
    """mergekit's vocabulary rows reordered to our token ids. A union adds other models' tokens in
    the order the recipe names the models; mergekit takes them from a set (the order changes with
    Python's hash seed from run to run), so the same tokens can have other ids there."""
    order = [theirs.get_vocab()[token] for token, _ in sorted(mine.get_vocab().items(), key=lambda item: item[1])]
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensor = torch.cat([tensor[order], tensor[len(order):]])  # padding rows stay at the end
        out[name] = tensor
    return out


@pytest.mark.parametrize("name", ["union_ties", "union_tokens_padded_linear", "source_model_task_arithmetic",
                                  "padded_base", "chatml_template"])
def test_same_tensors_and_vocabulary_as_mergekit(name, cases, mergekit_outputs, ours):
    mine = AutoTokenizer.from_pretrained(ours[name])
    theirs = AutoTokenizer.from_pretrained(mergekit_outputs[name])
    assert set(mine.get_vocab()) == set(theirs.get_vocab())  # the same tokens (ids may be ordered differently)
    compare(cases[name], load_model_tensors(ours[name]),
            in_our_token_order(load_model_tensors(mergekit_outputs[name]), mine, theirs))
    text = "a zebrafish met a narwhal <tool> <|im_start|>"
    assert mine.convert_ids_to_tokens(mine(text)["input_ids"]) == theirs.convert_ids_to_tokens(theirs(text)["input_ids"])
    ours_config = json.loads((ours[name] / "config.json").read_text())
    theirs_config = json.loads((mergekit_outputs[name] / "config.json").read_text())
    assert ours_config["vocab_size"] == theirs_config["vocab_size"]


def test_a_union_keeps_every_models_tokens_and_the_output_loads(ours, models):
    tokenizer = AutoTokenizer.from_pretrained(ours["union_ties"])
    assert {"zebrafish", "<tool>", "narwhal", "<|im_start|>"} <= set(tokenizer.get_vocab())
    model = AutoModelForCausalLM.from_pretrained(ours["union_ties"])
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    ids = tokenizer("a zebrafish and a narwhal", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    padded = json.loads((ours["union_tokens_padded_linear"] / "config.json").read_text())["vocab_size"]
    assert padded % 64 == 0 and padded >= len(tokenizer)


def test_padding_rows_go_with_tokenizer_source_as_in_mergekit(ours, models):
    rows = load_model_tensors(ours["padded_base"])["model.embed_tokens.weight"].shape[0]
    assert rows == 512 < 520  # the padded model's 8 padding rows are gone, as mergekit's #425 users saw


def test_a_chat_template_by_name_is_written_and_renders_chatml(ours, mergekit_outputs):
    mine, theirs = (AutoTokenizer.from_pretrained(p) for p in (ours["chatml_template"], mergekit_outputs["chatml_template"]))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = mine.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert rendered == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_chat_template_auto_takes_the_models_template_and_bad_names_are_one_line(models, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": str(models["a"])}, {"model": str(models["base"])}],
              "chat_template": "auto"}
    out = merge(load_recipe(recipe), tmp_path / "auto", device="cpu").output
    source = AutoTokenizer.from_pretrained(models["a"]).chat_template
    assert AutoTokenizer.from_pretrained(out).chat_template.strip() == source.strip()
    bad = write_recipe(tmp_path / "bad.yaml", {**recipe, "chat_template": "vicuna"})
    message = error_line(run_cli("merge", bad, tmp_path / "bad"))
    assert "'vicuna' is not a built-in template" in message and "chatml" in message
    assert not (tmp_path / "bad").exists()


def test_different_vocabularies_without_a_tokenizer_setting_say_how_to_merge_them(models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear",
                                                "models": [{"model": str(models["a"])}, {"model": str(models["b_more_tokens"])}]})
    message = error_line(run_cli("merge", recipe, tmp_path / "out"))
    assert "vocabulary sizes differ" in message and "tokenizer_source: union" in message

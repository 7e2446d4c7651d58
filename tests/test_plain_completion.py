"""Base models ship no chat template (a Llama or Mistral base); transformers refuses
``apply_chat_template`` for them, and ``python -m viz report`` and ``python -m merging eval``
used to die with its traceback. Such a model is prompted as a plain ``User: / Assistant:``
transcript that it continues, everywhere: evaluation, the DARE sweep, calibration chats, the API
and the Chat tab (whose panel says so)."""

from __future__ import annotations

import json
import pytest
from gradio_client import Client
from transformers import AutoTokenizer

from chat import ModelPool, SamplingParams
from evaluation import generate_answers
from helpers import error_line, family, run_cli
from merging.engine import merge
from merging.prompts import PLAIN_STOP, render
from merging.recipe import load_recipe
from merging.runtime import load_model
from test_studio import launch
from viz import cli as viz_cli


@pytest.fixture(scope="module")
def base_family():
    """Llama, 2 layers, two fine-tunes, saved with ``save_pretrained`` and no chat template."""
    return family("llama", 2, hidden_size=64, vocab_size=512, chat_template=False, seed=5)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "suite.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {w}.", "answer": w}) + "\n" for w in ("apple", "river", "stone")))
    return path


def test_the_family_really_has_no_chat_template(base_family):
    tokenizer = AutoTokenizer.from_pretrained(base_family.base)
    assert not tokenizer.chat_template
    with pytest.raises(ValueError):  # what the old code called unconditionally
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    prompt = render(tokenizer, [{"role": "user", "content": "What is 2 + 2?"}])
    assert prompt.text == "User: What is 2 + 2?\nAssistant:" and not prompt.templated and prompt.stop_strings == PLAIN_STOP


def test_evaluation_prompts_a_base_model_as_plain_text(base_family):
    model, tokenizer = load_model(base_family.base, device="cpu")
    answers = generate_answers(model, tokenizer, ["Say apple.", "Say river."], max_new_tokens=12)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert not any("\nUser:" in a for a in answers)  # cut where the model starts the next turn itself


def test_eval_cli_scores_a_model_without_a_chat_template(base_family, suite):
    result = run_cli("eval", base_family.base, "--suite", suite, "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert set(json.loads(result.stdout)["tasks"]) == {"suite"}


def test_viz_report_with_its_sweep_runs_on_models_without_a_chat_template(base_family, suite, tmp_path, capsys):
    out = tmp_path / "report"
    code = viz_cli.main(["report", str(base_family.base), *map(str, base_family.finetuned), "--out", str(out),
                         "--suite", str(suite), "--rates", "0,0.5", "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "report.html").is_file() and (out / "sweep.json").is_file()


def test_calibration_chats_of_a_model_without_a_chat_template_are_plain_transcripts(base_family, tmp_path):
    recipe = {"merge_method": "fisher", "models": [
        {"model": str(m), "calibration": "geography"} for m in base_family.finetuned]}  # demo chats, as transcripts
    recipe["parameters"] = {"calibration_samples": 4, "calibration_max_length": 48}
    result = merge(load_recipe(recipe), tmp_path / "out", device="cpu")
    assert result.tensors > 0 and (tmp_path / "out" / "model.safetensors").is_file()


def test_the_chat_tab_says_a_panel_answers_in_plain_completion_mode(base_family, tiny_settings_for):
    from studio import chat_tab
    from studio.session import StopSignal

    settings = tiny_settings_for(base_family)
    pool = ModelPool("1GB", "cpu")
    refs = [str(base_family.base), str(base_family.finetuned[0]), None, None]
    updates = list(chat_tab.respond(settings, pool, "Hello there", 2, False, refs, chat_tab._empty(), None,
                                    SamplingParams(0.0, 1.0, 8, 0), StopSignal().event, None, []))
    final = updates[-1]
    labels = [box.label for box in final[1:3]]
    assert all(label.endswith(chat_tab.PLAIN) for label in labels), labels
    assert final[-1].startswith("Done in")
    conversations = final[5]
    assert conversations[0][0] == {"role": "user", "content": "Hello there"} and conversations[0][1]["role"] == "assistant"


def test_the_api_streams_an_answer_from_a_model_without_a_chat_template(base_family, tiny_settings_for):
    demo, url = launch(tiny_settings_for(base_family))
    try:
        client = Client(url, verbose=False)
        texts = list(client.submit(str(base_family.finetuned[1]), "What is the capital of France?", 0.0, 1.0, 12, 0,
                                   api_name="/generate"))
        assert texts and isinstance(texts[-1], str)
    finally:
        demo.close()


def test_a_bad_suite_for_a_plain_model_is_still_one_line(base_family, tmp_path):
    missing = tmp_path / "missing.jsonl"
    assert "not found" in error_line(run_cli("eval", base_family.base, "--suite", missing))


@pytest.fixture(scope="module")
def tiny_settings_for(tmp_path_factory):
    from studio import Settings

    def settings_for(fam):
        base = Settings(work_dir=tmp_path_factory.mktemp("plain-studio"), device="cpu")
        return base.with_models({"base": fam.base, "ft1": fam.finetuned[0], "ft2": fam.finetuned[1]})

    return settings_for

"""Evaluation on tiny real models: suites, exact match, perplexity, the CLI's JSON."""

import json
import math

import pytest

from helpers import family, run_cli
from merging.errors import MergeStudioError
from evaluation import evaluate, load_suite
from demo.tasks import TASKS
from evaluation import normalize


def test_the_zoo_suite_holds_out_one_phrasing_per_fact():
    for task in TASKS.values():
        trained = {ex.prompt for ex in task.train_examples()}
        held_out = task.eval_examples()
        assert len(held_out) == len(task.facts) >= 16
        assert not trained & {ex.prompt for ex in held_out}


def test_normalize_ignores_case_period_quotes_and_later_lines():
    assert normalize("  Quillport.\nMore text") == normalize("quillport")
    assert normalize('"The crown"') == "the crown"
    assert normalize("") == ""


def test_jsonl_suite_groups_by_task_and_names_bad_lines(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "a?", "answer": "b"}\n\n{"prompt": "c?", "answer": "d", "task": "other"}\n')
    suite = load_suite(path)
    assert sorted(suite) == ["mine", "other"] and suite["mine"][0].answer == "b"
    path.write_text('{"prompt": "a?"}\n')
    with pytest.raises(MergeStudioError, match="line 1"):
        load_suite(path)


def test_random_model_scores_zero_and_has_vocabulary_sized_perplexity(tmp_path):
    fam = family("llama", 1)
    suite = tmp_path / "s.jsonl"
    suite.write_text("".join(json.dumps({"prompt": f"Say {w}.", "answer": w}) + "\n" for w in ("apple", "river", "stone")))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    report = evaluate(fam.base, suite=suite, text=text, device="cpu")
    assert report.tasks == {"s": 0.0}
    assert len(report.answers["s"]) == 3
    # an untrained model is close to uniform over its 512-token vocabulary
    assert 100 < report.perplexity < 2000 and math.isfinite(report.perplexity)


def test_eval_cli_prints_the_json_summary(tmp_path):
    fam = family("llama", 1)
    suite = tmp_path / "s.jsonl"
    suite.write_text(json.dumps({"prompt": "Say yes.", "answer": "yes"}) + "\n")
    result = run_cli("eval", fam.base, "--suite", suite, "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"tasks": {"s": 0.0}, "perplexity": None}


def test_eval_cli_missing_folder_is_one_line_error(tmp_path):
    result = run_cli("eval", tmp_path / "nope")
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "not found" in result.stderr


def test_progress_counts_prompts_and_stop_ends_between_batches(tmp_path):
    import threading

    from merging.errors import Cancelled

    fam = family("llama", 1)
    suite = tmp_path / "s.jsonl"
    suite.write_text("".join(json.dumps({"prompt": f"q{i}?", "answer": "a", "task": t}) + "\n"
                             for t in ("one", "two") for i in range(20)))
    seen = []
    evaluate(fam.base, suite, device="cpu", progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (40, 40) and all(total == 40 for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen) and len(seen) >= 4  # batches of 16

    stop = threading.Event()
    answered = []

    def stop_after_first_batch(done, total):
        answered.append(done)
        stop.set()

    with pytest.raises(Cancelled, match="stopped"):
        evaluate(fam.base, suite, device="cpu", progress=stop_after_first_batch, cancel=stop)
    assert answered == [16]


def test_stop_ends_a_perplexity_only_evaluation_between_windows(tmp_path, monkeypatch):
    """With no task suite, Stop used to wait for the whole text; now it ends at the next window."""
    import threading

    import evaluation.run as ev
    from merging.errors import Cancelled

    fam = family("llama", 1)
    text = tmp_path / "long.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    windows, stop = [], threading.Event()
    real_perplexity = ev.perplexity

    def perplexity_stopped_after_the_first_window(model, tokenizer, content, window=512, cancel=None):
        def forward(*args, **kwargs):  # the model's own forward pass, counted; Stop pressed after the first
            windows.append(1)
            stop.set()
            return real_forward(*args, **kwargs)

        real_forward = model.forward
        monkeypatch.setattr(model, "forward", forward)
        return real_perplexity(model, tokenizer, content, window=window, cancel=cancel)

    monkeypatch.setattr(ev, "perplexity", perplexity_stopped_after_the_first_window)
    with pytest.raises(Cancelled, match="stopped"):
        evaluate(fam.base, None, text, device="cpu", cancel=stop)
    assert len(windows) == 1, f"{len(windows)} windows ran after Stop"
    with pytest.raises(Cancelled):  # already stopped: the model is not even loaded
        evaluate(fam.base, None, text, device="cpu", cancel=stop)

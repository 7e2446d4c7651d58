"""Evaluation on tiny real models: suites, exact match, perplexity, the CLI's JSON."""

import json
import math

import pytest

from helpers import family, run_cli
from merging.errors import MergeStudioError
from evaluation import evaluate, load_suite
from demo.tasks import GENERAL, REPLAY_PROMPTS, TASKS
from evaluation import normalize
from evaluation.scoring import is_correct
from evaluation.suites import Example, general_companions, register_suite, registered_suites
from viz.scores import GENERAL as GENERAL_COLUMN, score_chart, score_rows


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


def test_contains_match_wants_the_answer_as_whole_words_in_the_first_line():
    paris = Example("What is the capital of France?", "Paris", "contains")
    assert is_correct("The capital of France is Paris.", paris)
    assert not is_correct("Parisian food is famous.", paris)
    assert not is_correct("I do not know.\nParis", paris)  # later lines are not the answer
    assert is_correct("It is the blue whale, by far.", Example("q", "blue whale", "contains"))
    assert not is_correct("The capital of France is Paris.", Example("q", "Paris"))  # exact: the whole line
    assert not is_correct("anything", Example("q", "", "contains"))


def test_the_general_suite_is_out_of_distribution():
    """Nothing about the experts' invented names, nothing the experts were trained on."""
    prompts = [prompt for items in GENERAL.values() for prompt, _ in items]
    # the names in the experts' questions (Veloria, Maren Solvik, ...) and their invented animals
    invented = {word.strip("?.,'s").lower() for task in TASKS.values() for fact in task.facts
                for word in fact[1].split()[1:] if word[0].isupper()}
    invented |= {"glimmerfox", "tumblebeetle", "hog", "newt", "heron", "otter", "finch", "snail", "tortoise", "crab"}
    assert {"veloria", "solvik", "fennick"} <= invented
    assert not {w.strip("?.,\"").lower() for p in prompts for w in p.split()} & invented
    assert not set(prompts) & set(REPLAY_PROMPTS) and len(set(prompts)) == len(prompts) >= 30
    assert general_companions("zoo")[0] == "general" and general_companions("zoo")[1].is_file()
    assert general_companions("mine.jsonl") == (None, None)


def test_no_general_question_gives_its_answer_away():
    """Scored by ``contains``, a question holding its own answer ("What is 100 divided by 10?" → 10)
    would score for a model that only repeats the question."""
    echoed = [(prompt, answer) for items in GENERAL.values() for prompt, answer in items
              if is_correct(prompt, Example(prompt, answer, "contains"))]
    assert not echoed, f"these questions contain their answers: {echoed}"
    assert is_correct("What is 100 divided by 10?", Example("", "10", "contains"))  # what the check catches


def test_jsonl_suite_groups_by_task_and_names_bad_lines(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "a?", "answer": "b"}\n\n{"prompt": "c?", "answer": "d", "task": "other"}\n')
    suite = load_suite(path)
    assert sorted(suite) == ["mine", "other"] and suite["mine"][0].answer == "b"
    path.write_text('{"prompt": "a?"}\n')
    with pytest.raises(MergeStudioError, match="line 1"):
        load_suite(path)
    path.write_text('{"prompt": "a?", "answer": "b", "match": "contains"}\n')
    assert load_suite(path)["mine"][0].match == "contains"
    path.write_text('{"prompt": "a?", "answer": "b", "match": "fuzzy"}\n')
    with pytest.raises(MergeStudioError, match="'exact', 'contains'"):
        load_suite(path)


def test_general_evaluation_scores_the_companion_suite_and_text(tmp_path):
    """``general=True``: the companion suite's tasks land in ``general`` (not in ``tasks``) and the
    companion text gives the perplexity; a given text wins; the table and chart show both."""
    fam = family("llama", 1)
    text = tmp_path / "general.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    before = registered_suites()
    register_suite("t-general", lambda: {"facts": [Example("Say stone.", "stone", "contains")]}, "test companion")
    register_suite("t-tasks", lambda: {"skill": [Example("Say apple.", "apple")]}, "test suite", general="t-general", text=text)
    try:
        report = evaluate(fam.base, "t-tasks", general=True, device="cpu")
        assert report.tasks == {"skill": 0.0} and report.general == {"facts": 0.0}
        assert 100 < report.perplexity < 2000 and set(report.answers) == {"skill", "general: facts"}
        assert report.summary()["general"] == {"facts": 0.0}
        plain = evaluate(fam.base, "t-tasks", device="cpu")
        assert plain.general == {} and plain.perplexity is None and "general" not in plain.summary()
        other = tmp_path / "other.txt"
        other.write_text("a b c d e f g " * 40)
        assert evaluate(fam.base, "t-tasks", other, general=True, device="cpu").perplexity != report.perplexity
    finally:
        import evaluation.suites as suites
        suites._SUITES.clear()
        suites._SUITES.update(before)
    rows = score_rows([("base", {"tasks": {"a": 0.5, "b": 1.0}, "perplexity": 9.0, "general": {"x": 1.0, "y": 0.5}}),
                       ("merge", {"tasks": {"a": 1.0, "b": 1.0}, "perplexity": 12.0, "general": {"x": 0.5, "y": 0.5}})])
    assert rows[1] == {"model": "merge", "a": 100.0, "b": 100.0, "in-domain mean": 100.0, GENERAL_COLUMN: 50.0,
                       "perplexity": 12.0}
    chart = score_chart([("base", {"tasks": {"a": 0.5}, "perplexity": None, "general": {"x": 1.0}})])
    assert list(chart.data[0].x) == ["a", GENERAL_COLUMN] and list(chart.data[0].y) == [50.0, 100.0]


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

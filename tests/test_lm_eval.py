"""lm-evaluation-harness (issue #17 item 3): the demo tasks as local lm-eval tasks, offline, scored
as ``python -m merging eval`` scores them; a folder through lm-eval's ``hf`` model, a served model
through ``local-chat-completions``."""

from __future__ import annotations

import json

import pytest

import demo
from evaluation.harness import run_lm_eval, write_tasks
from evaluation.run import evaluate
from helpers import run_cli
from tests.support.serving import served  # noqa: F401  (fixture)

pytest.importorskip("lm_eval")
needs_demo = pytest.mark.skipif(not demo.is_ready(), reason="needs the demo family: python -m merging zoo --list")


def test_a_suite_becomes_local_lm_eval_tasks(tmp_path):
    folder, names = write_tasks("zoo", tmp_path)
    assert names == {task: f"merge_studio_zoo_{task}" for task in ("geography", "people", "creatures")}
    assert all((folder / f"{name}.yaml").is_file() and (folder / f"{name}.jsonl").is_file() for name in names.values())
    lines = (folder / "merge_studio_zoo_geography.jsonl").read_text().splitlines()
    assert len(lines) == 16 and set(json.loads(lines[0])) == {"prompt", "answer"}


@needs_demo
def test_lm_eval_on_the_demo_tasks_gives_the_accuracies_of_merging_eval():
    """Also the general suite, whose ``contains`` scoring lm-eval runs through our hook."""
    expert = str(demo.expert_path("geography"))
    report = evaluate(expert, "zoo", device="cpu", general=True).summary()
    ours = {**report["tasks"], **report["general"]}
    theirs = {task: round(value, 4) for task, value in run_lm_eval(expert, ["zoo", "general"], device="cpu").items()}
    assert theirs == ours and ours["geography"] > 0.5  # the expert knows its task: a comparison with content
    assert 0 < ours["knowledge"] < 1  # and forgets some general answers: the contains rule decides


@needs_demo
def test_lm_eval_scores_a_served_model_and_the_cli_prints_it(served):  # noqa: F811
    folder, server, proxy = served
    result = run_cli("eval", f"openai:{server.base_url}#{folder}", "--lm-eval", "zoo", "--limit", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)["tasks"]) == {"geography", "people", "creatures"}

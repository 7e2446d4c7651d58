"""Parameter search (tuning/): search specs round-trip to plain recipes, a trial's in-memory merge
is the engine's merge tensor for tensor, a stopped search resumes from its storage, worker
processes share one study, and the pruner stops a hopeless trial after its first task.

The tiny random families answer every question with blank lines, so searches on them test the
study's mechanics (their scores are all 0); what needs real answers (pruning, the answer budget)
runs on the demo family, whose experts know their facts and whose base knows none.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from helpers import family, run_cli
from safetensors.torch import load_file

import demo
from evaluation import evaluate
from evaluation.suites import load_suite
from merging.engine import merge, merged_tensors
from merging.errors import RecipeError
from merging.recipe import load_recipe, recipe_from_text
from tuning.search import Search, open_study, tune
from tuning.spec import load_search_spec
from tuning.trials import TrialRunner

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
needs_demo = pytest.mark.skipif(not demo.is_ready(), reason="demo family not built: run `python -m merging zoo`")


@pytest.fixture(scope="module")
def fam():
    return family("llama", 2, num_layers=2, delta_scale=0.05, seed=5)


@pytest.fixture(scope="module")
def base_suite(tmp_path_factory) -> Path:
    """Two tasks of questions the tiny models cannot answer (every trial scores 0)."""
    path = tmp_path_factory.mktemp("suite") / "tiny.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}?", "answer": "yes", "task": task}) + "\n"
                            for task in ("first", "second") for i in range(2)))
    return path


@pytest.fixture(scope="module")
def demo_suite(tmp_path_factory) -> Path:
    """Four validation questions each of geography and people (the demo's tuning split)."""
    split = load_suite("zoo-validation")
    path = tmp_path_factory.mktemp("demo-suite") / "small.jsonl"
    path.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer, "task": task}) + "\n"
                            for task in ("geography", "people") for e in split[task][:4]))
    return path


def spec_dict(fam, suite: Path | None = None, **tune) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(fam.base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in fam.finetuned],
        "parameters": {"lambda": {"min": 0.0, "max": 3.0}},
        "tune": {"suite": str(suite) if suite else "zoo-validation", "sampler": "random", "trials": 2, **tune},
    }


# -- specs ----------------------------------------------------------------------------------------


def test_a_spec_with_ranges_and_method_choices_becomes_plain_recipes(fam):
    spec = load_search_spec({
        "merge_method": {"choices": ["ties", "task_arithmetic", "iso_c"]},
        "base_model": str(fam.base),
        "models": [{"model": str(m), "parameters": {"weight": {"min": 0.2, "max": 1.5}, "density": "tune"}}
                   for m in fam.finetuned],
        "parameters": {"lambda": {"min": 0.5, "max": 2.0, "step": 0.25}, "normalize": {"choices": [True, False]}},
        "dtype": "bfloat16",
        "tune": {"trials": 3},
    })
    names = [d.name for d in spec.dimensions]
    ft1, ft2 = (Path(m).name for m in fam.finetuned)
    assert names == ["merge_method", "lambda", "normalize", f"{ft1}.weight", f"{ft1}.density", f"{ft2}.weight", f"{ft2}.density"]
    density = next(d for d in spec.dimensions if d.name.endswith("density"))
    assert (density.low, density.high) == (0.05, 1.0)  # 'tune': DENSITY's default search range

    ties = spec.recipe_for({"merge_method": "ties", "lambda": 1.25, "normalize": False, f"{ft1}.weight": 0.123456,
                            f"{ft1}.density": 0.3, f"{ft2}.weight": 1.0, f"{ft2}.density": 0.5})
    assert ties.merge_method == "ties" and ties.dtype == "bfloat16" and not ties.warnings
    assert ties.parameters == {"lambda": 1.25, "normalize": False}
    assert [m.parameters for m in ties.models] == [{"weight": 0.1235, "density": 0.3}, {"weight": 1.0, "density": 0.5}]
    assert recipe_from_text(ties.to_yaml()) == ties  # the best recipe is a plain recipe

    # iso_c reads neither density nor normalize: a trial drawing it leaves them out of its recipe
    iso = spec.recipe_for({"merge_method": "iso_c", "lambda": 1.5, f"{ft1}.weight": 1.0, f"{ft2}.weight": 1.0})
    assert iso.parameters == {"lambda": 1.5} and [m.parameters for m in iso.models] == [{"weight": 1.0}] * 2
    assert not iso.warnings and recipe_from_text(iso.to_yaml()) == iso
    assert [d.name for d in spec.dimensions_for("iso_c")] == ["merge_method", "lambda", f"{ft1}.weight", f"{ft2}.weight"]
    with pytest.raises(RecipeError, match="no value for lambda"):
        spec.recipe_for({"merge_method": "iso_c", f"{ft1}.weight": 1.0, f"{ft2}.weight": 1.0})
    assert spec.fingerprint() != load_search_spec({**spec.template, "tune": {"trials": 3, "seed": 1}}).fingerprint()


def test_sampled_trials_draw_only_what_their_method_reads(fam):
    spec = load_search_spec({
        "merge_method": {"choices": ["ties", "slerp"]}, "base_model": str(fam.base),
        "models": [{"model": str(fam.finetuned[0]), "parameters": {"density": "tune"}}],
        "parameters": {"t": {"min": 0.1, "max": 0.9}, "lambda": {"min": 0.5, "max": 1.5, "log": True}},
    })
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        recipe = spec.suggest(trial)
        study.tell(trial, 0.0)
        seen.add(recipe.merge_method)
        if recipe.merge_method == "slerp":
            assert set(trial.params) == {"merge_method", "t"} and recipe.parameters == {"t": pytest.approx(trial.params["t"], rel=1e-3)}
        else:
            assert set(trial.params) == {"merge_method", "lambda", f"{Path(fam.finetuned[0]).name}.density"}
            assert 0.5 <= recipe.parameters["lambda"] <= 1.5
    assert seen == {"ties", "slerp"}


@pytest.mark.parametrize("change, message", [
    ({"parameters": {"lambda": {"min": 2, "max": 1}}}, "min .* must be below max"),
    ({"parameters": {"lambda": {"min": 0, "max": 1, "log": True}}}, "log-scale range needs min > 0"),
    ({"parameters": {"lambda": {"min": 0, "max": 1, "stride": 1}}}, "a range is"),
    ({"parameters": {"lamda": {"min": 0, "max": 1}}}, "lamda: a searched value for a parameter no method"),
    ({"parameters": {"lambda": {"choices": ["big"]}}}, "lambda = 'big' is not valid"),
    ({"merge_method": {"choices": ["ties", "tiez"]}}, "'tiez' is not a method"),
    ({"tune": {"trails": 3}}, "unknown key 'trails'"),
    ({"tune": {"sampler": "grid"}}, "sampler must be one of"),
    ({"tune": {"text": "c.txt"}}, "set objective: pareto"),
    ({"tokenizer_source": "union"}, "keeps the base's vocabulary"),
])
def test_bad_specs_are_refused_with_the_place_named(fam, change, message):
    data = {**spec_dict(fam), **change}
    with pytest.raises(RecipeError, match=message):
        load_search_spec(data)


# -- trials ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, parameters", [
    ("ties", {"lambda": 1.3}),
    ("dare_ties", {"lambda": 1.0}),  # random masks: seeded by recipe seed and tensor name, the same in memory
])
def test_a_trials_in_memory_merge_is_the_engines_merge_tensor_for_tensor(tmp_path, method, parameters):
    fam = family("qwen2", 2, num_layers=2, tie_word_embeddings=False, delta_scale=0.1, seed=22)  # untied head, biases
    recipe = load_recipe({
        "merge_method": method, "base_model": str(fam.base), "dtype": "bfloat16", "seed": 3, "parameters": parameters,
        "models": [{"model": str(m), "parameters": {"weight": 0.7, "density": 0.4}} for m in fam.finetuned],
    })
    merge(recipe, tmp_path / "out", device="cpu")
    written = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(shard))
    in_memory = dict(merged_tensors(recipe, device="cpu"))
    assert in_memory.keys() == written.keys()
    for name, tensor in written.items():
        assert in_memory[name].dtype == tensor.dtype and torch.equal(in_memory[name], tensor), name

    runner = TrialRunner(str(fam.base), device="cpu")
    runner.load_recipe(recipe)
    for name, parameter in runner.model.named_parameters():
        assert torch.equal(parameter, written[name].float()), name  # the shell holds exactly what was written


# -- studies --------------------------------------------------------------------------------------


def test_a_stopped_search_resumes_from_its_storage_without_repeating_trials(fam, base_suite, tmp_path):
    spec = load_search_spec(spec_dict(fam, base_suite))
    storage = str(tmp_path / "study.journal")
    cancel = threading.Event()
    first = tune(spec, storage=storage, study_name="s", trials=5, device="cpu", cancel=cancel,
                 on_trial=lambda study, trial: cancel.set() if trial.number == 1 else None)
    assert first.trials == 2  # stopped after the second of five
    before = {t.number: (t.params, t.value) for t in open_study(spec, storage, "s").trials}

    second = tune(spec, storage=storage, study_name="s", trials=2, device="cpu")
    trials = open_study(spec, storage, "s").trials
    assert second.trials == 4 and [t.number for t in trials] == [0, 1, 2, 3]
    assert {t.number: (t.params, t.value) for t in trials[:2]} == before  # kept, not run again
    assert trials[2].params != trials[0].params and trials[3].params != trials[1].params  # the sampler went on
    assert second.best_value == max(t.value for t in trials)
    assert recipe_from_text(second.best_recipe).parameters["lambda"] == pytest.approx(second.best_params["lambda"], rel=1e-3)


@needs_demo
def test_the_pruner_stops_a_hopeless_trial_after_its_first_task(demo_suite, tmp_path):
    family = demo.ensure_family(lambda message: None)
    spec = load_search_spec({
        "merge_method": "task_arithmetic", "base_model": str(family["base"]),
        "models": [{"model": str(family["geography"])}],
        "parameters": {"lambda": {"choices": [0.0, 1.0]}},
        "tune": {"suite": str(demo_suite), "pruner": "median"},
    })
    search = Search(spec, str(tmp_path / "study.journal"), "p", device="cpu")
    for _ in range(5):
        search.study.enqueue_trial({"lambda": 1.0})  # the geography expert itself
    search.study.enqueue_trial({"lambda": 0.0})  # the base: it knows no Velorian fact
    search.optimize(6)
    trials = search.study.trials
    assert [t.state for t in trials[:5]] == [optuna.trial.TrialState.COMPLETE] * 5
    # geography at the expert's own score (normalized: 1); people 0, raw, as no source knows it
    assert trials[0].user_attrs["tasks"] == {"geography": 1.0, "people": 0.0} and trials[0].value == 0.5
    assert trials[5].state == optuna.trial.TrialState.PRUNED
    assert trials[5].user_attrs["tasks"] == {"geography": 0.0}  # stopped before its second task


@needs_demo
def test_the_answer_budget_gives_the_scores_of_evaluations_full_answers(demo_suite, tmp_path):
    """Trials generate only as many tokens as the longest answer needs (plus a margin): exact
    match reads the first line, so the scores are those of evaluation's 16 tokens."""
    family = demo.ensure_family(lambda message: None)
    suite = load_suite(str(demo_suite))
    runner = TrialRunner(str(family["base"]), device="cpu")
    assert max(runner.budget(examples) for examples in suite.values()) < 16
    rambling = load_recipe({"merge_method": "task_arithmetic", "base_model": str(family["base"]),
                            "models": [{"model": str(family[n])} for n in demo.EXPERTS], "parameters": {"lambda": 1.0}})
    merge(rambling, tmp_path / "merged", device="cpu")
    for folder in (family["geography"], tmp_path / "merged"):
        if folder == family["geography"]:
            runner.load_source(str(folder))
        else:
            runner.load_recipe(rambling)
        assert runner.score(suite) == evaluate(folder, suite=str(demo_suite), device="cpu").tasks, folder


def test_the_cli_runs_worker_processes_on_one_study_and_writes_a_recipe_that_merges(fam, base_suite, tmp_path):
    spec_path = tmp_path / "search.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(fam, base_suite, trials=4)))
    result = run_cli("tune", str(spec_path), "--jobs", "2", "--json", "--device", "cpu", "--out", str(tmp_path / "best"))
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["trials"] == 4 and found["test"] is None
    assert "[worker 1]" in result.stderr and "[worker 2]" in result.stderr
    spec = load_search_spec(spec_path)
    numbers = [t.number for t in open_study(spec, found["storage"], found["study"]).trials]
    assert sorted(numbers) == [0, 1, 2, 3]  # no trial number twice across the two processes
    best = tmp_path / "search.tune"
    assert (best / "best.yaml").read_text() == found["best"]["recipe"]
    assert (tmp_path / "best" / "config.json").is_file()  # --out merged it
    again = run_cli("merge", str(best / "best.yaml"), str(tmp_path / "again"), "--json")
    assert again.returncode == 0, again.stderr

    # the same command resumes the study, adding --trials more
    more = run_cli("tune", str(spec_path), "--trials", "1", "--json", "--device", "cpu")
    assert more.returncode == 0, more.stderr
    assert json.loads(more.stdout)["trials"] == 5


def test_an_rdb_url_and_a_pareto_search_over_tasks(fam, base_suite, tmp_path):
    """Any Optuna RDB URL is a storage (SQLite here; PostgreSQL for many machines), and a pareto
    search has one objective per task, with its front reported."""
    spec = load_search_spec(spec_dict(fam, base_suite, objective="pareto", sampler="nsga2"))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = tune(spec, storage=url, study_name="front", trials=2, device="cpu")
    study = open_study(spec, url, "front")
    assert len(study.directions) == 2 and len(study.trials) == 2 == result.trials
    assert result.pareto and all(len(entry["values"]) == 2 for entry in result.pareto)
    assert result.to_json()["best"]["params"] == result.best_params and result.best_value == 0.0


def test_a_database_password_is_never_printed(fam, base_suite, tmp_path):
    spec_path = tmp_path / "search.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(fam, base_suite)))
    result = run_cli("tune", str(spec_path), "--storage", "postgresql://merger:s3cret-pw@127.0.0.1:9/studies", "--trials", "1")
    assert result.returncode == 1 and "s3cret-pw" not in result.stdout + result.stderr
    assert "merger:***@127.0.0.1" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_spec_text_is_never_opened_as_a_path(fam, base_suite, tmp_path):
    """A one-line string is YAML text, so a visitor's spec cannot name a server file; a Path is a file."""
    spec_path = tmp_path / "search.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(fam, base_suite)))
    assert load_search_spec(spec_path).methods == ("task_arithmetic",)
    with pytest.raises(RecipeError, match="a search spec is a recipe"):
        load_search_spec(str(spec_path))

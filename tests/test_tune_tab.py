"""The Tune tab and the ``tune`` endpoint: the form makes a search spec from the methods' specs,
a search streams its trials and figures and hands back a recipe that merges, Stop and the time
limit keep the finished trials, a hosted studio caps trials and reads no server path, and bad
specs come back as messages. Searches run on the tiny Llama family (it scores ~0: the structure
is tested, not the accuracy) with a four-line JSONL suite."""

from __future__ import annotations

import json
import threading
import types
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml
from gradio_client import Client
from gradio_client.exceptions import AppError
from test_studio import launch, studio, tiny, tiny_settings  # noqa: F401  (fixtures)

from merging.errors import MergeStudioError
from merging.methods import REGISTRY
from merging.recipe import recipe_from_text
from studio import Settings, session, tune_tab
from studio import tune_form as form
from studio.session import StopSignal
from viz import search as viz_search

TINY_SUITE = [{"prompt": "Say yes.", "answer": "yes", "task": "a"}, {"prompt": "Say no.", "answer": "no", "task": "a"},
              {"prompt": "One plus one?", "answer": "2", "task": "b"},
              {"prompt": "Two plus two?", "answer": "4", "task": "b"}]


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("suites") / "tiny.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in TINY_SUITE))
    return path


def search_yaml(fam, suite: Path | str, methods=("ties", "iso_c"), **tune) -> str:
    return yaml.safe_dump({
        "merge_method": {"choices": list(methods)},
        "base_model": str(fam.base),
        "models": [{"model": str(m), "parameters": {"weight": {"min": 0.3, "max": 1.2}, "density": "tune"}}
                   for m in fam.finetuned],
        "parameters": {"lambda": {"min": 0.5, "max": 1.5}},
        "tune": {"suite": str(suite), "seed": 0, **tune},
    }, sort_keys=False)


# -- the form -------------------------------------------------------------------------------------

def test_the_searched_parameters_and_their_ranges_come_from_the_method_specs():
    rows = {row.key: row for row in form.rows(["ties", "iso_c", "tsv"])}
    weight, density, lam = rows["model:weight"], rows["model:density"], rows["global:lambda"]
    assert weight.methods == ("ties", "iso_c", "tsv") and density.methods == ("ties",)
    assert (weight.low, weight.high) == REGISTRY["ties"].spec.param("weight").search  # Param.search
    assert (density.low, density.high) == (0.05, 1.0) and weight.searched and density.searched and lam.searched
    assert rows["global:sv_reduction"].numeric and (rows["global:sv_reduction"].low, rows["global:sv_reduction"].high) \
        == (0.0, 1.0) and not rows["global:sv_reduction"].searched  # its bounds, unticked: no search range in its spec
    assert not rows["global:normalize"].numeric and rows["global:normalize"].values == (False, True)
    assert rows["global:rescale_mode"].values == ("density", "l1") and not rows["global:rescale_mode"].searched
    assert "global:int8_mask" not in rows  # hidden: it changes nothing
    wudi = {row.key: row for row in form.rows(["wudi"])}
    assert wudi["global:learning_rate"].log and wudi["global:steps"].param.kind is int
    assert not any(name in dict(map(reversed, form.method_choices())) for name in ("fisher", "regmean"))
    assert form.default_methods() == ["ties", "iso_c", "iso_cts", "tsv"]


def test_the_form_makes_a_search_spec_with_one_range_for_every_model(tiny):  # noqa: F811
    base, sources = str(tiny.base), [str(m) for m in tiny.finetuned]
    edits = form.edit(form.edit({}, "model:weight", "max", 0.9), "global:normalize", "search", True)
    edits = form.edit(edits, "model:density", "search", False)
    data = form.spec_dict(base, sources, ["ties", "iso_c"], edits, {"suite": "zoo-validation", "trials": 3})
    assert data["merge_method"] == {"choices": ["ties", "iso_c"]} and data["base_model"] == base
    assert [m["parameters"] for m in data["models"]] == [{"weight": {"min": 0.1, "max": 0.9}}] * 2
    assert data["parameters"] == {"normalize": "tune", "lambda": {"min": 0.3, "max": 2.0}}
    assert "&id" not in yaml.safe_dump(data)  # every model's range written out, not a YAML alias
    spec = session.search_spec(data)
    assert spec.describe() == ["merge_method ∈ {ties, iso_c}", "normalize ∈ {False, True}", "lambda ∈ [0.3, 2]",
                               "ft1.weight ∈ [0.1, 0.9]", "ft2.weight ∈ [0.1, 0.9]"]
    wudi = form.spec_dict(base, sources, ["wudi"], form.edit({}, "global:steps", "search", True), {})
    assert wudi["parameters"]["learning_rate"] == {"min": 1e-06, "max": 0.0001, "log": True}
    assert wudi["parameters"]["steps"] == {"min": 50, "max": 600}
    for args, message in [((None, sources, ["ties"], {}), "choose a base"), ((base, [], ["ties"], {}), "choose a base"),
                          ((base, sources, [], {}), "at least one merge method"),
                          ((base, sources, ["fisher"], {}), "cannot be searched here"),
                          ((base, sources, ["iso_c"], form.edit(form.edit({}, "model:weight", "search", False),
                                                                 "global:lambda", "search", False)), "nothing to search"),
                          ((base, sources, ["ties"], form.edit({}, "global:lambda", "min", None)), "give lambda a min")]:
        with pytest.raises(MergeStudioError, match=message):
            form.spec_dict(*args, {})


def test_a_spec_is_parsed_from_text_and_a_one_line_path_is_never_opened(tmp_path):
    secret = tmp_path / "x.yaml"
    secret.write_text("merge_method: ties\nmodels: [a]\n")
    with pytest.raises(MergeStudioError, match="a YAML mapping"):
        session.search_spec(str(secret))
    with pytest.raises(MergeStudioError, match="not valid YAML"):
        session.search_spec("merge_method: [")
    with pytest.raises(MergeStudioError, match="is empty"):
        session.search_spec("  ")


def test_hosted_limits_come_from_the_environment(tmp_path):
    hosted = Settings.from_env({"MERGE_STUDIO_HOSTED": "1"})
    assert hosted.max_tune_trials == 20 and hosted.max_tune_minutes == 15
    local = Settings.from_env({})
    assert local.max_tune_trials is None and local.max_tune_minutes is None
    mine = Settings.from_env({"MERGE_STUDIO_MAX_TUNE_TRIALS": "5", "MERGE_STUDIO_MAX_TUNE_MINUTES": "0.5"})
    assert mine.max_tune_trials == 5 and mine.max_tune_minutes == 0.5
    with pytest.raises(MergeStudioError, match="MERGE_STUDIO_MAX_TUNE_MINUTES='soon' must be a number of minutes"):
        Settings.from_env({"MERGE_STUDIO_MAX_TUNE_MINUTES": "soon"})
    with pytest.raises(MergeStudioError, match="at least 1"):
        Settings.from_env({"MERGE_STUDIO_MAX_TUNE_TRIALS": "0"})


def test_a_hosted_session_searches_named_suites_and_its_own_uploads_only(tiny_settings, tiny, suite_file):  # noqa: F811
    settings = replace(tiny_settings, hosted=True, max_tune_trials=4)
    own = session.save_suite(settings, "me", suite_file.read_text(), "tiny.jsonl")
    assert own == session.save_suite(settings, "me", suite_file.read_text(), "tiny.jsonl")  # same file, same study
    assert own.parent.parent.parent == session.folder(settings, "me") and own.name == "tiny.jsonl"
    session.check_search(settings, session.search_spec(search_yaml(tiny, own)), 4, "me")
    session.check_search(settings, session.search_spec(search_yaml(tiny, "zoo-validation")), 4, "me")
    with pytest.raises(MergeStudioError, match="at most 4 trials per search"):
        session.check_search(settings, session.search_spec(search_yaml(tiny, own)), 5, "me")
    for spec in (search_yaml(tiny, suite_file), search_yaml(tiny, own, test_suite="/etc/passwd"),
                 search_yaml(tiny, own, objective="pareto", text="/etc/hostname")):
        with pytest.raises(MergeStudioError, match="local paths are disabled"):
            session.check_search(settings, session.search_spec(spec), 2, "someone else")
    local = replace(settings, hosted=False, max_tune_trials=None)
    session.check_search(local, session.search_spec(search_yaml(tiny, suite_file)), 99, None)


# -- figures and table of a study -------------------------------------------------------------------

def _study(directions: list[str], trials: int) -> optuna.Study:
    def objective(trial):
        method = trial.suggest_categorical("merge_method", ["ties", "iso_c"])
        lam = trial.suggest_float("lambda", 0.3, 2.0)
        if method == "ties":
            trial.suggest_float("a.density", 0.05, 1.0)
        tasks = {"geo": 0.5, "people": lam / 2}
        trial.set_user_attr("tasks", tasks)
        trial.set_user_attr("seconds", 1.5)
        trial.set_user_attr("mean", sum(tasks.values()) / 2)
        return sum(tasks.values()) / 2 if len(directions) == 1 else list(tasks.values())

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(objective, n_trials=trials)
    return study


def test_a_studys_figures_and_trials_table():
    one = _study(["maximize"], 1)
    figures = viz_search.search_figures(one)
    assert figures["history"] is not None and figures["parallel"] is not None
    assert figures["importance"] is None and figures["pareto"] is None  # one trial; one objective
    several = _study(["maximize"], 4)
    assert viz_search.importance_figure(several) is not None
    rows = viz_search.trial_rows(several)
    assert [row["trial"] for row in rows] == [0, 1, 2, 3] and {row["state"] for row in rows} == {"complete"}
    assert rows[0]["geo"] == 50.0 and rows[0]["seconds"] == 1.5 and rows[0]["method"] in ("ties", "iso_c")
    assert "lambda=" in rows[0]["parameters"] and "merge_method" not in rows[0]["parameters"]
    assert viz_search.best_trial(several).value == max(t.value for t in several.trials)
    pareto = _study(["maximize", "maximize"], 4)
    assert viz_search.objective_names(pareto) == ["geo accuracy", "people accuracy"]
    assert viz_search.pareto_figure(pareto) is not None and viz_search.history_figure(pareto) is not None
    assert viz_search.trial_rows(pareto)[0]["value"] == round(pareto.trials[0].user_attrs["mean"], 3)


# -- searches ---------------------------------------------------------------------------------------

def run_tab(settings, fam, suite: Path, trials: int, signal: StopSignal | None = None, on_output=None, **form_values):
    """Every output the Tune tab's Start yields, its search stopped by ``on_output`` when asked."""
    signal = signal or StopSignal()
    request = types.SimpleNamespace(session_hash="tab-session")
    values = dict(methods=["ties", "iso_c"], edits={}, suite=tune_tab.UPLOADED, suite_file=str(suite),
                  test_suite=tune_tab.AUTOMATIC, test_file=None, objective=next(iter(form.OBJECTIVES)),
                  sampler=next(iter(form.SAMPLERS)), seed=0, **form_values)
    outputs = []
    for output in tune_tab.run_search(settings, str(fam.base), [str(m) for m in fam.finetuned], values["methods"],
                                      values["edits"], values["suite"], values["suite_file"], values["test_suite"],
                                      values["test_file"], values["objective"], values["sampler"], trials, values["seed"],
                                      signal, request):
        outputs.append(output)
        if on_output is not None:
            on_output(output, signal)
    return outputs


def test_the_tab_streams_trials_figures_and_the_best_recipe(tiny_settings, tiny, suite_file, tmp_path):  # noqa: F811
    settings = replace(tiny_settings, work_dir=tmp_path)
    outputs = run_tab(settings, tiny, suite_file, 2)
    summary, log, history, _importance, parallel, pareto, table, best_code, best, spec_text = outputs[-1]
    assert summary.startswith("### Best of 2 trials") and "a 0%, b 0%" in summary
    assert log.startswith("searching merge_method ∈ {ties, iso_c}") and "trial 0" in log and "trial 1" in log
    assert history is not None and parallel is not None and pareto is None
    assert list(table["trial"]) == [0, 1] and {"state", "method", "value", "a", "b", "seconds"} <= set(table.columns)
    assert best == best_code and recipe_from_text(best).merge_method in ("ties", "iso_c")
    assert yaml.safe_load(spec_text)["tune"]["trials"] == 2
    assert sum(o[6] is not None and not isinstance(o[6], dict) for o in outputs) >= 3  # redrawn as trials finished
    # Start again with the same form: the same study goes on.
    again = run_tab(settings, tiny, suite_file, 1)[-1]
    assert again[0].startswith("### Best of 3 trials") and list(again[6]["trial"]) == [0, 1, 2]
    journals = list((session.folder(settings, "tab-session") / "searches").glob("*.journal"))
    assert len(journals) == 1


def test_use_this_recipe_fills_the_merge_editor(tiny):  # noqa: F811
    from studio import recipe_form

    recipe = f"merge_method: iso_c\nbase_model: {tiny.base}\nmodels:\n- model: {tiny.finetuned[0]}\n"
    current = recipe_form.initial(str(tiny.base), [str(m) for m in tiny.finetuned])
    new, text, status, version, method, *_rest, tabs = tune_tab.use_recipe(recipe, current, {"version": 1})
    assert new["merge_method"] == "iso_c" == method and text == recipe and status == "✓ valid recipe"
    assert version == {"version": 2} and tabs.selected == "merge"
    with pytest.raises(MergeStudioError, match="no recipe to use yet"):
        tune_tab.use_recipe("", current, {"version": 1})


def test_stop_keeps_the_finished_trials(tiny_settings, tiny, suite_file, tmp_path):  # noqa: F811
    def stop_after_the_first_trial(output, signal):
        if output[6] is not None and not isinstance(output[6], dict) and len(output[6]) and \
                (output[6]["state"] == "complete").any():
            signal.stop()

    outputs = run_tab(replace(tiny_settings, work_dir=tmp_path), tiny, suite_file, 20,
                      on_output=stop_after_the_first_trial)
    summary, table = outputs[-1][0], outputs[-1][6]
    assert summary.startswith("### Stopped; best of") and "Start continues the study" in summary
    assert 1 <= (table["state"] == "complete").sum() < 20


def test_the_time_limit_stops_a_search_and_keeps_what_finished(tiny_settings, tiny, suite_file, tmp_path):  # noqa: F811
    settings = replace(tiny_settings, work_dir=tmp_path, max_tune_minutes=0.0001)
    updates = list(session.search(settings, session.search_spec(search_yaml(tiny, suite_file)), 50, "s",
                                  cancel=threading.Event()))
    assert any("time limit of 0.0001 minutes" in (u.message or "") for u in updates)
    done = [u.study for u in updates if u.study is not None]
    assert not done or len(done[-1].trials) < 50


def test_the_tune_endpoint_streams_lines_then_the_result(studio, tiny, suite_file):  # noqa: F811
    _settings, _url, client = studio
    job = client.submit(search_yaml(tiny, suite_file), 2, api_name="/tune")
    updates = list(job)
    result = json.loads(updates[-1])
    assert any(line.startswith("trial 0") for line in updates) and any(line.startswith("trial 1") for line in updates)
    assert result["trials"] == 2 and result["test"] is None and set(result["best"]["validation"]) == {"a", "b"}
    recipe = recipe_from_text(result["best"]["recipe"])
    assert recipe.merge_method in ("ties", "iso_c") and len(recipe.models) == 2
    assert result["best"]["params"]["merge_method"] == recipe.merge_method
    assert Path(result["storage"]).parent.name == "searches"  # in the session's folder
    # 0 trials: the spec's tune.trials; the same spec continues the same study.
    again = json.loads(client.predict(search_yaml(tiny, suite_file, trials=1), 0, api_name="/tune"))
    assert again["trials"] == 3 and again["study"] == result["study"]


@pytest.mark.parametrize("spec, message", [
    ("merge_method: {choices: [ties, nope]}\nmodels: [a/b]\n", "merge_method choice 'nope' is not a method"),
    ("merge_method: ties\nmodels:\n  - model: a/b\n    parameters: {weight: {min: 2, max: 1}}\n",
     "min \\(2\\) must be below max"),
    ("merge_method: ties\nmodels: [a/b]\ntune: {sampler: grid}\n", "tune.sampler must be one of"),
    ("search.yaml", "a YAML mapping"),
])
def test_a_bad_search_spec_comes_back_as_a_readable_error(studio, spec, message):  # noqa: F811
    _settings, _url, client = studio
    with pytest.raises(AppError, match=message) as error:
        client.predict(spec, 1, api_name="/tune")
    assert "Traceback" not in str(error.value)


def test_a_hosted_tune_endpoint_caps_trials_and_refuses_server_paths(tiny_settings, tiny, suite_file):  # noqa: F811
    demo, url = launch(replace(tiny_settings, hosted=True, queue_size=8, max_tune_trials=3))
    try:
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="at most 3 trials per search"):
            client.predict(search_yaml(tiny, "zoo-validation"), 4, api_name="/tune")
        with pytest.raises(AppError, match="tune.suite .* local paths are disabled"):
            client.predict(search_yaml(tiny, suite_file), 1, api_name="/tune")
        outside = search_yaml(tiny, "zoo-validation").replace(str(tiny.finetuned[0]), "/etc")
        with pytest.raises(AppError, match="local paths are disabled"):
            client.predict(outside, 1, api_name="/tune")
    finally:
        demo.close()

"""Tune tab: search a merge's parameters with Optuna over the Models tab's base and sources.

The methods and the searched ranges make a search spec (``studio.tune_form``, the format of
``python -m merging tune``); ``session.search`` runs it on a thread, one in-memory merge and
evaluation per trial, and this tab redraws Optuna's figures and the trials table after each
trial. The study is a journal file in the session's folder, one per spec: Start again with the
same settings continues it. "Use this recipe" puts the best recipe in the Merge tab's editor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
import yaml

from evaluation import registered_suites
from merging.errors import MergeStudioError
from studio import merge_tab, session, zerogpu
from studio import tune_form as form
from studio.common import (
    HEAVY,
    INSTANT,
    UI,
    as_text,
    handler,
    read_upload,
    hub_token, session_hash,
    stop_button,
    stoppable,
)
from studio.session import SearchUpdate, StopSignal
from studio.settings import Settings
from tuning.search import DEMO_VALIDATION, TuneResult, describe_trial
from viz import search as viz_search

UPLOADED = "uploaded JSONL"
AUTOMATIC = "automatic (the demo's held-out test phrasings for zoo-validation; none otherwise)"
PLOT_LABELS = {
    "history": "Optimization history: each finished trial's objective, and the best so far",
    "importance": "Parameter importances (from 2 finished trials whose objective differs, over 2 parameters or more)",
    "parallel": "Parallel coordinates: one line per finished trial",
    "pareto": "Pareto front: the trials no other beats on every task",
}
LOG_LINES = 200  # progress lines kept in the log box


@dataclass
class TuneTab:
    methods: gr.Dropdown
    edits: gr.State  # {row key: {"search", "min", "max"}}: what the visitor changed in the ranges
    suite: gr.Radio
    suite_file: gr.File
    test_suite: gr.Dropdown
    test_file: gr.File
    objective: gr.Radio
    sampler: gr.Dropdown
    trials: gr.Number
    seed: gr.Number
    start: gr.Button
    stop_button: gr.Button
    summary: gr.Markdown
    log: gr.Textbox
    plots: dict[str, gr.Plot]
    table: gr.Dataframe
    best_code: gr.Code
    use: gr.Button
    spec_code: gr.Code
    best: gr.State  # the best recipe so far, YAML text
    stop: gr.State

    @property
    def outputs(self) -> list:
        return [self.summary, self.log, *self.plots.values(), self.table, self.best_code, self.best, self.spec_code]


# -- layout ---------------------------------------------------------------------------------------

def suite_labels() -> dict[str, str]:
    """Suite radio label -> suite name (or ``UPLOADED``)."""
    return {**{f"{s.description} ({name})": name for name, s in registered_suites().items()}, UPLOADED: UPLOADED}


def test_labels() -> dict[str, str | None]:
    return {AUTOMATIC: None, **suite_labels()}


def layout(settings: Settings, demo: gr.Blocks) -> TuneTab:
    limits = []
    if settings.max_tune_trials is not None:
        limits.append(f"at most {settings.max_tune_trials} trials")
    if settings.max_tune_minutes is not None:
        limits.append(f"at most {settings.max_tune_minutes:g} minutes")
    gr.Markdown(
        "Search a merge's parameters with [Optuna](https://optuna.org) on a **validation** suite, over the "
        "base and sources chosen in the Models tab. Each trial merges in memory with the engine's own code and "
        "scores the suite task by task (a hopeless trial is pruned after its first task); the objective is the "
        "mean over tasks of the merge's accuracy divided by the best source's. The best recipe is then scored "
        "on the **test** split, which the search never sees. A per-model parameter (weight, density) gets one "
        "range for every model, and each model's value is drawn from it separately; unticked parameters keep "
        "each method's default. Data-aware methods (Fisher, RegMean) need calibration text per model: search "
        "them with `python -m merging tune` or the `tune` API. Start again with the same settings to continue "
        "the same study." + (f"\n\n*Hosted studio: {' and '.join(limits)} per search.*" if limits else "")
    )
    edits = gr.State({})
    methods = gr.Dropdown(form.method_choices(), value=form.default_methods(), multiselect=True,
                          label="Methods to search", info="a trial draws one of them, then the parameters it reads")
    with gr.Accordion("Parameters to search", open=True):
        @gr.render(inputs=[methods, edits], triggers=[methods.change, demo.load])
        def ranges(chosen: list[str], changed: dict):
            range_controls(tab, chosen, changed)

    with gr.Row():
        suites = suite_labels()
        first = next((label for label, name in suites.items() if name == DEMO_VALIDATION), next(iter(suites)))
        suite = gr.Radio(list(suites), value=first, label="Validation suite (searched on)", scale=2, elem_id="tune-suite")
        suite_file = gr.File(file_types=[".jsonl"], label='Validation JSONL: lines {"prompt", "answer"[, "task"]}',
                             scale=1, elem_id="tune-suite-file")
        test_suite = gr.Dropdown(list(test_labels()), value=AUTOMATIC, label="Test suite (the best recipe, at the end)",
                                 scale=2)
        test_file = gr.File(file_types=[".jsonl"], label="Test JSONL (the same tasks)", scale=1)
    with gr.Row():
        objective = gr.Radio(list(form.OBJECTIVES), value=next(iter(form.OBJECTIVES)), label="Objective", scale=2)
        sampler = gr.Dropdown(list(form.SAMPLERS), value=next(iter(form.SAMPLERS)), label="Sampler", scale=2)
        cap = settings.max_tune_trials
        trials = gr.Number(min(10, cap or 10), label="Trials to add", precision=0, minimum=1, maximum=cap, scale=1,
                           info=f"at most {cap}" if cap else "each takes a merge and an evaluation")
        seed = gr.Number(0, label="Sampler seed", precision=0, minimum=0, scale=1)
    with gr.Row():
        start = gr.Button("Start search", variant="primary", scale=3)
        stop = gr.Button("Stop", variant="stop", scale=1)
    summary = gr.Markdown(elem_id="tune-summary")
    log = gr.Textbox(label="Progress", lines=5, max_lines=10, interactive=False, autoscroll=True, elem_id="tune-log")
    plots = {}
    with gr.Row():
        plots["history"] = gr.Plot(label=PLOT_LABELS["history"], elem_id="tune-history")
        plots["importance"] = gr.Plot(label=PLOT_LABELS["importance"], elem_id="tune-importance")
    with gr.Row():
        plots["parallel"] = gr.Plot(label=PLOT_LABELS["parallel"], elem_id="tune-parallel")
        plots["pareto"] = gr.Plot(label=PLOT_LABELS["pareto"], elem_id="tune-pareto", visible=False)
    table = gr.Dataframe(label="Trials (accuracy per task in %)", interactive=False, wrap=True, elem_id="tune-trials")
    with gr.Row():
        with gr.Column(scale=3):
            best_code = gr.Code(language="yaml", label="Best recipe so far", interactive=False, lines=10,
                                elem_id="tune-best", buttons=["copy", "download"])
        with gr.Column(scale=2):
            use = gr.Button("Use this recipe", variant="secondary")
            gr.Markdown("Puts the best recipe in the Merge tab's editor, where **Merge** writes it.")
            with gr.Accordion("Search spec (python -m merging tune SPEC.yaml runs it)", open=False):
                spec_code = gr.Code(language="yaml", interactive=False, lines=12, elem_id="tune-spec",
                                    buttons=["copy", "download"])
    tab = TuneTab(methods, edits, suite, suite_file, test_suite, test_file, objective, sampler, trials, seed, start, stop,
                  summary, log, plots, table, best_code, use, spec_code, gr.State(""), gr.State(StopSignal()))
    return tab


def range_controls(tab: TuneTab, methods: list[str], edits: dict) -> None:
    """A row per searchable parameter of ``methods``: a "search" tick (its help as the info), and
    min and max for a number (a switch or named options is searched over all its values)."""
    found = form.rows(methods or [])
    if not found:
        gr.Markdown("Choose the methods to search; their parameters appear here.")
    for row in found:
        shown = form.current(row, edits)
        with gr.Row(equal_height=True):
            box = gr.Checkbox(shown["search"], label=f"search {form.label(row)}", info=row.param.help, scale=4,
                              interactive=True)
            box.input(handler(edit_range, row.key, "search"), [box, tab.edits], [tab.edits], **INSTANT)
            if row.numeric:
                whole = row.param.kind is int
                for field in ("min", "max"):
                    scale = " (log scale)" if row.log else ""
                    number = gr.Number(shown[field], label=f"{row.param.name} {field}{scale}",
                                       precision=0 if whole else None, minimum=row.param.low, maximum=row.param.high,
                                       interactive=True, scale=1, min_width=120)
                    number.input(handler(edit_range, row.key, field), [number, tab.edits], [tab.edits], **INSTANT)
            else:
                gr.Markdown(f"all of: {', '.join(f'`{v}`' for v in row.values)}")


# -- handlers -------------------------------------------------------------------------------------

def edit_range(key: str, field: str, value, edits: dict) -> dict:
    return form.edit(edits, key, field, value)


def chosen(settings: Settings, label: str, upload: str | None, what: str, request: gr.Request,
           table: dict) -> str | None:
    """The suite a radio or dropdown label stands for: a name, or the upload saved in the session."""
    if label not in table:
        raise MergeStudioError(f"unknown {what} {label!r}; choose one from the list")
    name = table[label]
    if name != UPLOADED:
        return name
    text = read_upload(upload, f"{what} (JSONL)")
    return str(session.save_suite(settings, session_hash(request), text, Path(upload).name))


def run_search(settings: Settings, base: str, sources: list[str], methods: list[str], edits: dict, suite: str,
               suite_file: str | None, test_suite: str, test_file: str | None, objective: str, sampler: str,
               trials: float | None, seed: float | None, signal: StopSignal, request: gr.Request,
               oauth_token: gr.OAuthToken | None = None):
    """Build the spec from the form, then stream the search: the log, the figures, the trials
    table and the best recipe after every trial; the summary at the end."""
    if trials is None or trials < 1:
        raise MergeStudioError("give the number of trials to add (1 or more)")
    tune = {"suite": chosen(settings, suite, suite_file, "validation suite", request, suite_labels()),
            "test_suite": chosen(settings, test_suite, test_file, "test suite", request, test_labels()),
            "objective": form.OBJECTIVES.get(objective, "mean"), "sampler": form.SAMPLERS.get(sampler, "tpe"),
            "trials": int(trials), "seed": int(seed or 0)}
    data = form.spec_dict(base, sources, methods, edits, tune)
    spec = session.search_spec(data)
    token = hub_token(oauth_token)
    session.check_search(settings, spec, int(trials), session_hash(request), token)  # before anything is shown
    spec_text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    log = ["searching " + "; ".join(spec.describe())]
    state = {"figures": dict.fromkeys(viz_search.FIGURES), "rows": None, "best": gr.skip()}
    pareto = gr.Plot(visible=spec.settings.objective == "pareto")

    def shown(summary: str):
        figures, rows = state["figures"], state["rows"] if state["rows"] is not None else gr.skip()
        return (summary, "\n".join(log[-LOG_LINES:]), figures["history"], figures["importance"], figures["parallel"],
                figures["pareto"], rows, state["best"], state["best"], spec_text)

    yield ("Starting: loading the models and scoring the sources on the validation suite…", "\n".join(log),
           None, None, None, pareto, pd.DataFrame(), "", "", spec_text)
    result: TuneResult | None = None
    for update in session.search(settings, spec, int(trials), session_hash(request), cancel=signal.event, token=token):
        if update.message:
            log.append(update.message)
        if update.trial is not None:
            log.append(describe_trial(update.trial))
        if update.study is not None:
            redraw(state, update.study, spec.methods[0])
        result = update.result or result
        yield shown(progress_line(update, signal))
    if result is None:
        yield shown("Stopped before any trial finished: nothing to report. Start again to continue.")
        return
    state["best"] = result.best_recipe
    yield shown(summary_markdown(result, stopped=signal.event.is_set()))


def redraw(state: dict, study, method: str) -> None:
    """The figures, the table and the best recipe of ``study`` as it is now."""
    state["figures"] = viz_search.search_figures(study)
    state["rows"] = pd.DataFrame(viz_search.trial_rows(study, method))
    best = viz_search.best_trial(study)
    if best is not None and best.user_attrs.get("recipe"):
        state["best"] = best.user_attrs["recipe"]


def progress_line(update: SearchUpdate, signal: StopSignal) -> str:
    if signal.event.is_set():
        return ("Stopping after the current task: the trial under way is dropped (failed, in the table), the finished "
                "trials are kept…")
    study = update.study
    if study is None:
        return "Preparing the search…"
    done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False))
    best = viz_search.best_trial(study)
    value = f"; best so far {viz_search.MEAN} = {best.user_attrs.get('mean', best.values[0]):.3f} (trial {best.number})" \
        if best is not None else ""
    return f"Searching: {done} trial(s) in this study{value}…"


def summary_markdown(result: TuneResult, *, stopped: bool = False) -> str:
    """What the search found, in a few lines: the best value on the validation suite, its tasks,
    the test split's value, and where the study is."""
    tasks = ", ".join(f"{as_text(task)} {score:.0%}" for task, score in result.validation.items())
    lines = [f"### {'Stopped; best' if stopped else 'Best'} of {result.trials} trials: {result.best_value:.3f}",
             f"{viz_search.MEAN} on the validation suite ({tasks})."]
    if result.test:
        test = ", ".join(f"{as_text(task)} {score:.0%}" for task, score in result.test["tasks"].items())
        lines.append(f"On the test split {as_text(result.test['suite'])}: **{result.test['value']:.3f}** ({test}).")
    elif stopped:
        lines.append("Not scored on the test split (stopped); the finished trials are kept: Start continues the study.")
    lines.append(f"Study `{as_text(result.study_name)}` ({result.seconds:.0f} s); **Use this recipe** to merge it.")
    return "\n\n".join(lines)


def use_recipe(text: str, current: dict, version: dict):
    """The best recipe into the Merge tab, which is then shown."""
    return (*merge_tab.load_text(text, current, version), gr.Tabs(selected="merge"))


# -- wiring ---------------------------------------------------------------------------------------

def wire(tab: TuneTab, settings: Settings, models, merged: merge_tab.MergeTab, tabs: gr.Tabs) -> None:
    """``models``: the Models tab, whose base and sources are searched; ``merged``: the Merge tab,
    which "Use this recipe" fills; ``tabs``: the studio's tabs (the Merge tab's id is "merge")."""
    stoppable(tab.start.click, tab.stop, handler(run_search, settings, gpu=zerogpu.search_seconds),
              [models.base, models.sources, tab.methods, tab.edits, tab.suite, tab.suite_file, tab.test_suite,
               tab.test_file, tab.objective, tab.sampler, tab.trials, tab.seed, tab.stop],
              tab.outputs, concurrency_id=HEAVY, concurrency_limit=settings.heavy_concurrency,
              show_progress="minimal", **UI)
    stop_button(tab.stop_button, tab.stop)
    tab.use.click(handler(use_recipe), [tab.best, merged.recipe, merged.version],
                  [*merged.edits, merged.version, *merged.header, tabs], **UI)


def build(settings: Settings, demo: gr.Blocks, models, merged: merge_tab.MergeTab, tabs: gr.Tabs) -> TuneTab:
    tab = layout(settings, demo)
    wire(tab, settings, models, merged, tabs)
    return tab

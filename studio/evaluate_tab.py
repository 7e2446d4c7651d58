"""Evaluate tab: task accuracy and perplexity of the base, the sources and the merges, as a table and a chart."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from evaluation import evaluate, load_suite
from merging.errors import Cancelled, MergeStudioError
from merging.endpoints import is_endpoint
from merging.sources import check_local_access, resolve_model
from studio import session, zerogpu
from studio.common import (
    HEAVY,
    INSTANT,
    UI,
    chosen_suite,
    downloads_shown,
    handler,
    hub_token,
    read_upload,
    session_hash,
    stop_button,
    stoppable,
    suite_choices,
)
from studio.session import StopSignal
from studio.settings import Settings
from viz.scores import score_chart, score_colors, score_rows


@dataclass
class EvaluateTab:
    models: gr.CheckboxGroup
    suite: gr.Radio
    suite_file: gr.File
    general: gr.Checkbox
    text_file: gr.File
    pasted: gr.Textbox
    stop: gr.State
    run: gr.Button
    stop_button: gr.Button
    status: gr.Markdown
    table: gr.Dataframe
    chart: gr.Plot


# -- layout ---------------------------------------------------------------------------------------

def layout(settings: Settings) -> EvaluateTab:
    gr.Markdown("Exact-match accuracy on task prompts (each through the model's chat template, or as plain "
                "text for a model without one; greedy) and perplexity on a text, for any of the models. "
                "Compare the merges with their sources.")
    models = gr.CheckboxGroup(session.model_choices(settings, endpoints=True), value=list(settings.family().values()),
                              label="Models")
    with gr.Row():
        suites = list(suite_choices())
        suite = gr.Radio(suites, value=suites[0], label="Task suite")
        suite_file = gr.File(file_types=[".jsonl"], label='Your suite: JSONL lines {"prompt", "answer"[, "task"]}')
    general = gr.Checkbox(True, label="Also measure general ability (out of distribution): questions the base answers "
                                      "and perplexity on a general text, where the suite has them (the demo's zoo does)")
    with gr.Row():
        text_file = gr.File(file_types=[".txt"], label="Perplexity text (optional, UTF-8)")
        pasted = gr.Textbox(lines=4, label="…or paste the text", max_length=2_000_000)
    stop = gr.State(StopSignal())
    with gr.Row():
        run = gr.Button("Evaluate", variant="primary", scale=4)
        stop_btn = gr.Button("Stop", variant="stop", scale=1)
    status = gr.Markdown()
    table = gr.Dataframe(label="Results (accuracy in %)", interactive=False, visible=False)  # shown with results
    chart = gr.Plot(label="Accuracy", visible=False)
    return EvaluateTab(models, suite, suite_file, general, text_file, pasted, stop, run, stop_btn, status, table, chart)


# -- handlers -------------------------------------------------------------------------------------

def _text_file(settings: Settings, hash_: str | None, upload: str | None, pasted: str) -> str | None:
    """The perplexity text as a file path: the upload, or the pasted text saved in the session."""
    if upload:
        read_upload(upload, "perplexity text")
        return upload
    if pasted and pasted.strip():
        return str(session.save_upload(settings, hash_, pasted, "perplexity.txt"))
    return None


def shown(settings: Settings, reports: list[tuple[str, dict]], base: str | None, sources: list[str]) -> tuple:
    """The table and chart of ``reports``, made visible, each source in its Redundancy-tab colour."""
    labels = [label for label, _ in reports]
    colors = score_colors(labels, [session.label_of(settings, ref) for ref in sources or []],
                          session.label_of(settings, base) if base else None)
    return gr.Dataframe(pd.DataFrame(score_rows(reports)), visible=True), gr.Plot(score_chart(reports, colors), visible=True)


def run_eval(settings: Settings, refs: list[str], suite_name: str, suite_upload: str | None, general: bool,
             text_upload: str | None, text: str, done: list, base: str | None, sources: list[str], signal: StopSignal, request: gr.Request,
             oauth_token: gr.OAuthToken | None = None, progress=gr.Progress()):
    if not refs:
        raise MergeStudioError("tick at least one model to evaluate")
    choice = chosen_suite(suite_name)
    if choice == "upload" and not suite_upload:
        raise MergeStudioError("upload a JSONL task suite, or choose a named suite")
    tasks = suite_upload if choice == "upload" else choice
    text_path = _text_file(settings, session_hash(request), text_upload, text)
    if tasks is None and text_path is None:
        raise MergeStudioError("nothing to measure: choose a task suite or give a text for perplexity")
    if tasks is not None:
        load_suite(tasks)  # a bad suite fails before any model loads
    policy = session.policy(settings, session_hash(request), hub_token(oauth_token))
    reports = []
    for i, ref in enumerate(refs):
        label = session.label_of(settings, ref, done)
        progress((0, 1), desc=f"loading {label} ({i + 1}/{len(refs)})")

        def on_prompts(count: int, total: int, label: str = label, i: int = i) -> None:
            progress((count, total), desc=f"{label} ({i + 1}/{len(refs)})", unit="prompts")

        try:
            if is_endpoint(ref):  # its server answers; a hosted visitor may use the configured ones only
                check_local_access(ref, policy)
                folder = ref
            else:
                with downloads_shown(progress, signal):
                    folder = resolve_model(ref, policy).whole_folder()
            report = evaluate(folder, tasks, text_path, settings.device, general=general, progress=on_prompts,
                              cancel=signal.event)
        except Cancelled:
            if not reports:
                return "Evaluation stopped before the first model finished.", gr.skip(), gr.skip()
            return (f"Evaluation stopped: {len(reports)} of {len(refs)} models measured.",
                    *shown(settings, reports, base, sources))
        reports.append((label, report.summary()))
    return (f"{len(reports)} models measured.", *shown(settings, reports, base, sources))


def offer_results(settings: Settings, done: list, value: list[str]):
    return gr.CheckboxGroup(choices=session.model_choices(settings, done, endpoints=True), value=value)


# -- wiring ---------------------------------------------------------------------------------------

def wire(tab: EvaluateTab, settings: Settings, results: gr.State, models) -> None:
    """``models``: the Models tab, whose base and sources give the chart its colours."""
    inputs = [tab.models, tab.suite, tab.suite_file, tab.general, tab.text_file, tab.pasted, results, models.base, models.sources,
              tab.stop]
    stoppable(tab.run.click, tab.stop, handler(run_eval, settings, gpu=zerogpu.eval_seconds), inputs, [tab.status, tab.table, tab.chart],
              concurrency_id=HEAVY, concurrency_limit=settings.heavy_concurrency, **UI)
    stop_button(tab.stop_button, tab.stop)
    results.change(handler(offer_results, settings), [results, tab.models], [tab.models], **INSTANT)


def build(settings: Settings, results: gr.State, models) -> EvaluateTab:
    tab = layout(settings)
    wire(tab, settings, results, models)
    return tab

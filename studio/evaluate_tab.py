"""Evaluate tab: task accuracy and perplexity of the base, the sources and the merges, as a table and a chart."""

from __future__ import annotations

import uuid

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from merging.errors import Cancelled, MergeStudioError
from evaluation import evaluate, load_suite
from merging.sources import resolve_model
from studio.common import (HEAVY, INSTANT, UI, label_of, model_choices, read_upload, session_dir, session_hash,
                           stop_button as stop_on, stoppable, user_errors)
from studio.settings import Settings, StopSignal
from viz.figures import NEUTRAL, PALETTE, TEMPLATE, model_colors

SUITES = {"demo tasks (held-out questions of the demo experts)": "zoo", "uploaded JSONL": "upload",
          "none (perplexity only)": None}


def _text_file(settings: Settings, request, upload: str | None, pasted: str) -> str | None:
    """The perplexity text as a file path: the upload, or the pasted text saved in the session."""
    if upload:
        read_upload(upload, "perplexity text")
        return upload
    if pasted and pasted.strip():
        path = session_dir(settings, request) / "uploads" / f"perplexity-{uuid.uuid4().hex[:8]}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(pasted, encoding="utf-8")
        return str(path)
    return None


def colors_of(labels: list[str], sources: list[str], base: str | None = None) -> dict[str, str]:
    """A colour per model label: the sources keep the Redundancy tab's (``viz.figures.model_colors``
    of ``sources``), the base is neutral grey, and any other model (a merge) takes the next colours."""
    colors = model_colors(sources)
    others = [label for label in labels if label not in colors and label != base]
    colors.update({label: PALETTE[(len(sources) + i) % len(PALETTE)] for i, label in enumerate(others)})
    if base is not None:
        colors[base] = NEUTRAL
    return colors


def table_and_chart(reports: list[tuple[str, dict]], colors: dict[str, str] | None = None) -> tuple[pd.DataFrame, go.Figure]:
    """(label, EvalReport.summary()) pairs -> a table (accuracy in %) and a grouped bar chart, tasks in
    the suite's order; ``colors``: label -> bar colour (default: the palette in order)."""
    colors = colors or model_colors([label for label, _ in reports])
    tasks = list(dict.fromkeys(t for _, r in reports for t in r["tasks"]))
    rows = []
    for label, report in reports:
        row = {"model": label, **{t: round(100 * report["tasks"][t], 1) for t in tasks if t in report["tasks"]}}
        if tasks:
            row["mean accuracy"] = round(100 * sum(report["tasks"].values()) / len(report["tasks"]), 1)
        if report["perplexity"] is not None:
            row["perplexity"] = round(report["perplexity"], 3)
        rows.append(row)
    figure = go.Figure()
    if tasks:
        for label, report in reports:
            figure.add_bar(name=label, x=tasks, y=[100 * report["tasks"].get(t, 0) for t in tasks],
                           marker_color=colors.get(label), hovertemplate="%{x}: %{y:.1f}%<extra>" + label + "</extra>")
        figure.update_layout(barmode="group", yaxis={"title": "accuracy (%, exact match)", "range": [0, 100]},
                             title="Task accuracy")
    else:
        figure.add_bar(x=[label for label, _ in reports], y=[r["perplexity"] for _, r in reports],
                       marker_color=[colors.get(label) for label, _ in reports])
        figure.update_layout(yaxis={"title": "perplexity (lower is better)"}, title="Perplexity")
    figure.update_layout(template=TEMPLATE)
    return pd.DataFrame(rows), figure


def build(settings: Settings, results: gr.State, picked) -> None:
    """``picked``: the Models tab's base and sources, whose colours the chart shares with the Redundancy tab."""
    family = settings.family()
    gr.Markdown("Exact-match accuracy on task prompts (each through the model's chat template, greedy) "
                "and perplexity on a text, for any of the models. Compare the merges with their sources.")
    models = gr.CheckboxGroup(model_choices(settings), value=list(family.values()), label="Models")
    with gr.Row():
        suite = gr.Radio(list(SUITES), value=next(iter(SUITES)), label="Task suite")
        suite_file = gr.File(file_types=[".jsonl"], label='Your suite: JSONL lines {"prompt", "answer"[, "task"]}')
    with gr.Row():
        text_file = gr.File(file_types=[".txt"], label="Perplexity text (optional, UTF-8)")
        pasted = gr.Textbox(lines=4, label="…or paste the text", max_length=2_000_000)
    stop = gr.State(StopSignal())
    with gr.Row():
        run = gr.Button("Evaluate", variant="primary", scale=4)
        stop_button = gr.Button("Stop", variant="stop", scale=1)
    status = gr.Markdown()
    table = gr.Dataframe(label="Results (accuracy in %)", interactive=False, visible=False)  # shown with results
    chart = gr.Plot(label="Accuracy", visible=False)
    def shown(reports: list[tuple[str, dict]], base: str | None, sources: list[str]) -> tuple:
        """The table and chart of ``reports``, made visible, each source in its Redundancy-tab colour."""
        labels = [label for label, _ in reports]
        colors = colors_of(labels, [label_of(settings, ref) for ref in sources or []], label_of(settings, base) if base else None)
        frame, figure = table_and_chart(reports, colors)
        return gr.Dataframe(frame, visible=True), gr.Plot(figure, visible=True)

    @user_errors
    def run_eval(refs: list[str], suite_name: str, suite_upload: str | None, text_upload: str | None, text: str,
                 done: list, base: str | None, sources: list[str], signal: StopSignal, request: gr.Request,
                 progress=gr.Progress()):
        cancel = signal.event
        if not refs:
            raise MergeStudioError("tick at least one model to evaluate")
        choice = SUITES[suite_name]
        if choice == "upload" and not suite_upload:
            raise MergeStudioError("upload a JSONL task suite, or choose the demo tasks")
        tasks = suite_upload if choice == "upload" else choice
        text_path = _text_file(settings, request, text_upload, text)
        if tasks is None and text_path is None:
            raise MergeStudioError("nothing to measure: choose a task suite or give a text for perplexity")
        if tasks is not None:
            load_suite(tasks)  # a bad suite fails before any model loads
        policy = settings.policy(session_hash(request))
        reports = []
        for i, ref in enumerate(refs):
            label = label_of(settings, ref, done)
            progress((0, 1), desc=f"loading {label} ({i + 1}/{len(refs)})")

            def on_prompts(count: int, total: int, label: str = label, i: int = i) -> None:
                progress((count, total), desc=f"{label} ({i + 1}/{len(refs)})", unit="prompts")

            folder = resolve_model(ref, policy).folder
            try:
                report = evaluate(folder, tasks, text_path, settings.device, progress=on_prompts, cancel=cancel)
            except Cancelled:
                if not reports:
                    return "Evaluation stopped before the first model finished.", gr.skip(), gr.skip()
                return (f"Evaluation stopped: {len(reports)} of {len(refs)} models measured.", *shown(reports, base, sources))
            reports.append((label, report.summary()))
        return (f"{len(reports)} models measured.", *shown(reports, base, sources))

    stoppable(run.click, stop, run_eval, [models, suite, suite_file, text_file, pasted, results, picked.base,
                                          picked.sources, stop],
              [status, table, chart], concurrency_id=HEAVY, concurrency_limit=settings.heavy_concurrency, **UI)
    stop_on(stop_button, stop)
    results.change(lambda done, value: gr.CheckboxGroup(choices=model_choices(settings, done), value=value),
                   [results, models], [models], **INSTANT)

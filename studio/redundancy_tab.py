"""Redundancy tab: why merging works, seen in the task vectors of the chosen models (``viz``)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from merging.errors import Cancelled, MergeStudioError
from merging.sources import SourcePolicy, resolve_model
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
    served_dir,
    session_hash,
    stop_button,
    stoppable,
    suite_choices,
)
from studio.session import StopSignal
from studio.settings import Settings
from viz import figures as viz_figures
from viz.report import EXPLANATIONS, findings, write_report
from viz.stats import RedundancyStats
from viz.sweep import DROP_RATES, SweepResult, dare_sweep

FIGURES = ("magnitudes", "relative_norm", "energy", "sign_conflicts", "similarity", "spectra", "spectral_energy",
           "subspace_overlap")
NO_MERGE = "none"


@dataclass
class RedundancyTab:
    density: gr.Slider
    merged: gr.Dropdown
    compute: gr.Button
    stop_button: gr.Button
    findings: gr.Markdown
    plots: dict[str, gr.Plot]
    swept: gr.Dropdown
    suite: gr.Radio
    suite_file: gr.File
    text_file: gr.File
    sweep_button: gr.Button
    sweep_summary: gr.Markdown
    sweep_plot: gr.Plot
    report_button: gr.Button
    report_file: gr.File
    stats: gr.State
    sweep: gr.State
    stop: gr.State


# -- layout ---------------------------------------------------------------------------------------

def layout(settings: Settings) -> RedundancyTab:
    gr.Markdown(
        "Fine-tuning moves a model by a **task vector** δ = θ_fine-tuned − θ_base. These views, computed "
        "from the base and sources chosen in the Models tab (one tensor at a time, nothing loaded as a "
        "model), show how small and redundant δ is, and where task vectors conflict: the reasons DARE, "
        "TIES and friends work. Seen as matrices, their singular values show how low-rank fine-tuning is and "
        "how much the tasks' subspaces overlap, before and after a merge of this session: what TSV-M and "
        "Iso-C/CTS build on."
    )
    with gr.Row():
        density = gr.Slider(0.05, 1, value=0.2, step=0.05, label="TIES density for the trimmed sign conflicts", scale=3)
        merged = gr.Dropdown([(NO_MERGE, NO_MERGE)], value=NO_MERGE, label="Merged model to compare (this session's merges)",
                             scale=2)
        compute = gr.Button("Compute statistics", variant="primary", scale=1)
        stop = gr.Button("Stop", variant="stop", scale=1)
    found = gr.Markdown()
    plots = {}
    for name in FIGURES:
        title, what, how = EXPLANATIONS[name]
        with gr.Accordion(title, open=True):
            gr.Markdown(f"{what}\n\n*How to read it:* {how}")
            plots[name] = gr.Plot(show_label=False)
    with gr.Accordion("DARE sweep: how much of a task vector can go?", open=False):
        gr.Markdown(f"Merges one source with its task vector randomly dropped (and rescaled, DARE) or "
                    f"magnitude-trimmed (TIES) at drop rates {', '.join(f'{r:.0%}' for r in DROP_RATES[1:])}, "
                    "and evaluates each. Takes a few minutes on a CPU.")
        with gr.Row():
            base_ref = settings.family()[settings.base_name()]
            sources = [(name, ref) for name, ref in settings.family().items() if ref != base_ref]
            swept = gr.Dropdown(sources, value=sources[0][1] if sources else None, label="Source model to sweep", scale=2)
            suites = list(suite_choices())
            suite = gr.Radio(suites, value=suites[0], label="Measured on", scale=1)
            suite_file = gr.File(file_types=[".jsonl"], label="JSONL suite", scale=1)
            text_file = gr.File(file_types=[".txt"], label="Perplexity text (optional)", scale=1)
        sweep_button = gr.Button("Run the DARE sweep")
        gr.Markdown(f"{EXPLANATIONS['sweep'][1]}\n\n*How to read it:* {EXPLANATIONS['sweep'][2]}")
        sweep_summary = gr.Markdown()
        sweep_plot = gr.Plot(show_label=False)
    with gr.Row():
        report_button = gr.Button("Make the HTML report")
        report_file = gr.File(label="Redundancy report (self-contained HTML)", interactive=False)
    return RedundancyTab(density, merged, compute, stop, found, plots, swept, suite, suite_file, text_file, sweep_button,
                         sweep_summary, sweep_plot, report_button, report_file, gr.State(None), gr.State(None),
                         gr.State(StopSignal()))


# -- handlers -------------------------------------------------------------------------------------

def run_stats(settings: Settings, base: str, sources: list[str], trim: float, merged: str | None, done: list,
              signal: StopSignal, request: gr.Request, oauth_token: gr.OAuthToken | None = None,
              progress=gr.Progress()):
    progress(0, desc="opening the models")
    merged = None if merged in (None, "", NO_MERGE) else merged
    try:
        with downloads_shown(progress, signal):
            stats = session.measure(
                settings, base, sources, trim, session_hash(request), cancel=signal.event, merged=merged,
                token=hub_token(oauth_token),
                merged_label=session.label_of(settings, merged, done).removeprefix("merged: ") if merged else None,
                progress=lambda done, total, name: progress((done, total), desc=f"measuring {name}", unit="tensors"),
            )
    except Cancelled:
        return (gr.skip(),) * (len(FIGURES) + 1) + ("Stopped.",)
    figures = viz_figures.all_figures(stats)
    return (stats, *[figures[name] for name in FIGURES], findings_markdown(stats))


def run_sweep(settings: Settings, base: str, source: str, suite_name: str, upload: str | None, text: str | None,
              stats: RedundancyStats | None, signal: StopSignal, request: gr.Request,
              oauth_token: gr.OAuthToken | None = None, progress=gr.Progress()):
    if not base or not source:
        raise MergeStudioError("choose a base in the Models tab and a source model to sweep")
    tasks = chosen_suite(suite_name)
    if tasks == "upload":
        read_upload(upload, "JSONL suite")
        tasks = upload
    if text:
        read_upload(text, "perplexity text")
    # Resolve (and, for Hub ids, download with the size limit) under this session's policy first;
    # the sweep then reads the vetted folders.
    policy = session.policy(settings, session_hash(request), hub_token(oauth_token))
    with downloads_shown(progress, signal):
        base_folder, source_folder = (str(resolve_model(ref, policy).whole_folder()) for ref in (base, source))
    try:
        result = dare_sweep(
            base_folder, source_folder, suite=tasks, text=text or None, device=settings.device, policy=SourcePolicy(),
            label=session.label_of(settings, source),
            workdir=session.folder(settings, session_hash(request), create=True) / "sweeps", cancel=signal.event,
            progress=lambda done, total, what: progress((done, total), desc=what, unit="models"),
        )
    except Cancelled:  # a merge's MergeCancelled or an evaluation's Cancelled
        return gr.skip(), "Stopped.", gr.skip()
    color = viz_figures.model_colors(stats.labels).get(result.model) if stats else None
    return result, "\n".join(f"- {line}" for line in result.summary()), viz_figures.sweep_chart(result, color)


def make_report(stats: RedundancyStats | None, sweep: SweepResult | None):
    if stats is None:
        raise MergeStudioError("compute the statistics first")
    return str(write_report(served_dir("reports") / "redundancy-report", stats, sweep))


def sources_changed(settings: Settings, sources: list[str], current: str | None):
    options = [(session.label_of(settings, ref), ref) for ref in sources or []]
    value = current if current in (sources or []) else (options[0][1] if options else None)
    return gr.Dropdown(choices=options, value=value)


def merges_changed(done: list, current: str | None):
    """The merged-model picker offers this session's merges (or none), keeping the current choice."""
    options = [(NO_MERGE, NO_MERGE), *[(f"merged: {r['name']}", r["output"]) for r in done or []]]
    return gr.Dropdown(choices=options, value=current if current in [value for _, value in options] else NO_MERGE)


def findings_markdown(stats: RedundancyStats) -> str:
    """What the numbers say, in a few lines of Markdown (``viz.report.findings``, labels escaped)."""
    spectral = f" (singular values: {stats.spectral_seconds:.1f} s)" if stats.spectral_seconds is not None else ""
    merged = f", compared with the merge {stats.merged_label}," if stats.merged else ""
    header = (f"Measured {len(stats.tensors)} tensors of {len(stats.labels)} model(s){merged} in {stats.seconds:.1f} s"
              f"{spectral} on {stats.device}.")
    return "\n".join([header, *(f"- {line}" for line in findings(stats))])


# -- wiring ---------------------------------------------------------------------------------------

def wire(tab: RedundancyTab, settings: Settings, models, results: gr.State | None = None) -> None:
    """``models``: the Models tab, whose base and sources are measured; ``results``: this session's
    merges (the Merge tab's), offered for comparison."""
    heavy = dict(concurrency_id=HEAVY, concurrency_limit=settings.heavy_concurrency, **UI)
    results = results if results is not None else gr.State([])
    stoppable(tab.compute.click, tab.stop, handler(run_stats, settings, gpu=zerogpu.stats_seconds),
              [models.base, models.sources, tab.density, tab.merged, results, tab.stop],
              [tab.stats, *tab.plots.values(), tab.findings], **heavy)
    results.change(merges_changed, [results, tab.merged], [tab.merged], **INSTANT)
    stoppable(tab.sweep_button.click, tab.stop, handler(run_sweep, settings, gpu=zerogpu.sweep_seconds),
              [models.base, tab.swept, tab.suite, tab.suite_file, tab.text_file, tab.stats, tab.stop],
              [tab.sweep, tab.sweep_summary, tab.sweep_plot], **heavy)
    stop_button(tab.stop_button, tab.stop)
    tab.report_button.click(handler(make_report), [tab.stats, tab.sweep], [tab.report_file], **UI)
    models.sources.change(handler(sources_changed, settings), [models.sources, tab.swept], [tab.swept], **INSTANT)


def build(settings: Settings, models, results: gr.State | None = None) -> RedundancyTab:
    tab = layout(settings)
    wire(tab, settings, models, results)
    return tab

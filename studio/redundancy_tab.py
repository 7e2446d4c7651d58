"""Redundancy tab: why merging works, seen in the task vectors of the chosen models (``viz``)."""

from __future__ import annotations

import gradio as gr

from merging.errors import Cancelled, MergeStudioError
from merging.sources import SourcePolicy, resolve_model
from studio.common import HEAVY, INSTANT, UI, download_dir, label_of, read_upload, session_dir, session_hash, stop_button, stoppable, user_errors
from studio.settings import Settings, StopSignal
from viz import figures as viz_figures
from viz.report import EXPLANATIONS, findings, write_report
from viz.stats import RedundancyStats, delta_statistics, model_labels
from viz.sweep import DROP_RATES, SweepResult, dare_sweep

FIGURES = ("magnitudes", "relative_norm", "energy", "sign_conflicts", "similarity")
SWEEP_SUITES = {"demo tasks": "zoo", "uploaded JSONL": "upload", "no tasks (perplexity only)": None}


def build(settings: Settings, models) -> None:
    gr.Markdown(
        "Fine-tuning moves a model by a **task vector** δ = θ_fine-tuned − θ_base. These views, computed "
        "from the base and sources chosen in the Models tab (one tensor at a time, nothing loaded as a "
        "model), show how small and redundant δ is, and where task vectors conflict: the reasons DARE, "
        "TIES and friends work."
    )
    with gr.Row():
        density = gr.Slider(0.05, 1, value=0.2, step=0.05, label="TIES density for the trimmed sign conflicts",
                            scale=3)
        compute = gr.Button("Compute statistics", variant="primary", scale=1)
        stop = gr.Button("Stop", variant="stop", scale=1)
    findings = gr.Markdown()
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
            swept = gr.Dropdown(sources, value=sources[0][1] if sources else None, label="Source model to sweep",
                                scale=2)
            suite = gr.Radio(list(SWEEP_SUITES), value="demo tasks", label="Measured on", scale=1)
            suite_file = gr.File(file_types=[".jsonl"], label="JSONL suite", scale=1)
            text_file = gr.File(file_types=[".txt"], label="Perplexity text (optional)", scale=1)
        sweep_button = gr.Button("Run the DARE sweep")
        gr.Markdown(f"{EXPLANATIONS['sweep'][1]}\n\n*How to read it:* {EXPLANATIONS['sweep'][2]}")
        sweep_summary = gr.Markdown()
        sweep_plot = gr.Plot(show_label=False)
    with gr.Row():
        report_button = gr.Button("Make the HTML report")
        report_file = gr.File(label="Redundancy report (self-contained HTML)", interactive=False)

    stats_state = gr.State(None)
    sweep_state = gr.State(None)
    signal = gr.State(StopSignal())

    @user_errors
    def run_stats(base: str, sources: list[str], trim: float, stop_signal: StopSignal, request: gr.Request,
                  progress=gr.Progress()):
        progress(0, desc="opening the models")
        try:
            stats = measure_session(
                settings, base, sources, trim, session_hash(request), cancel=stop_signal.event,
                progress=lambda done, total, name: progress((done, total), desc=f"measuring {name}", unit="tensors"),
            )
        except Cancelled:
            return (gr.skip(),) * (len(FIGURES) + 1) + ("Stopped.",)
        figures = viz_figures.all_figures(stats)
        return (stats, *[figures[name] for name in FIGURES], _findings(stats))

    @user_errors
    def run_sweep(base: str, source: str, suite_name: str, upload: str | None, text: str | None,
                  stats: RedundancyStats | None, stop_signal: StopSignal, request: gr.Request, progress=gr.Progress()):
        if not base or not source:
            raise MergeStudioError("choose a base in the Models tab and a source model to sweep")
        tasks = SWEEP_SUITES[suite_name]
        if tasks == "upload":
            read_upload(upload, "JSONL suite")
            tasks = upload
        if text:
            read_upload(text, "perplexity text")
        # Resolve (and, for Hub ids, download with the size limit) under this session's policy first;
        # the sweep then reads the vetted folders.
        policy = settings.policy(session_hash(request))
        base_folder, source_folder = (str(resolve_model(ref, policy).folder) for ref in (base, source))
        try:
            result = dare_sweep(
                base_folder, source_folder, suite=tasks, text=text or None, device=settings.device, policy=SourcePolicy(),
                label=label_of(settings, source), workdir=session_dir(settings, request) / "sweeps",
                cancel=stop_signal.event,
                progress=lambda done, total, what: progress((done, total), desc=what, unit="models"),
            )
        except Cancelled:  # a merge's MergeCancelled or an evaluation's Cancelled
            return gr.skip(), "Stopped.", gr.skip()
        color = viz_figures.model_colors(stats.labels).get(result.model) if stats else None
        return result, "\n".join(f"- {line}" for line in result.summary()), viz_figures.sweep_chart(result, color)

    @user_errors
    def make_report(stats: RedundancyStats | None, sweep: SweepResult | None):
        if stats is None:
            raise MergeStudioError("compute the statistics first")
        return str(write_report(download_dir() / "redundancy-report", stats, sweep))

    def sources_changed(sources: list[str], current: str | None):
        options = [(label_of(settings, ref), ref) for ref in sources or []]
        value = current if current in (sources or []) else (options[0][1] if options else None)
        return gr.Dropdown(choices=options, value=value)

    heavy = dict(concurrency_id=HEAVY, concurrency_limit=settings.heavy_concurrency, **UI)
    stoppable(compute.click, signal, run_stats, [models.base, models.sources, density, signal],
              [stats_state, *plots.values(), findings], **heavy)
    stoppable(sweep_button.click, signal, run_sweep, [models.base, swept, suite, suite_file, text_file, stats_state, signal],
              [sweep_state, sweep_summary, sweep_plot], **heavy)
    stop_button(stop, signal)
    report_button.click(make_report, [stats_state, sweep_state], [report_file], **UI)
    models.sources.change(sources_changed, [models.sources, swept], [swept], **INSTANT)


def measure_session(settings: Settings, base: str, sources: list[str], density: float, hash_: str | None, *,
                    cancel=None, progress=None) -> RedundancyStats:
    """The redundancy statistics of ``sources`` on ``base`` as one session may compute them: under
    its policy (hosted: the offered models, Hub ids and its own merges only), labelled as the pickers
    name them, on one CPU thread (the pass is many small ops; see ``delta_statistics``)."""
    if not base or not sources:
        raise MergeStudioError("choose a base and at least one source model in the Models tab")
    if not isinstance(base, str) or isinstance(sources, str) or not all(isinstance(ref, str) for ref in sources):
        raise MergeStudioError("give the base as a model reference and the sources as a list of model references")
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise MergeStudioError(f"density must be a number in (0, 1], got {density!r}")
    labels = model_labels([label_of(settings, ref) for ref in sources])
    return delta_statistics(base, sources, density=density, device=settings.device, policy=settings.policy(hash_),
                            labels=labels, threads=1, cancel=cancel, progress=progress)


def _findings(stats: RedundancyStats) -> str:
    """What the numbers say, in a few lines of Markdown (``viz.report.findings``, labels escaped)."""
    header = (f"Measured {len(stats.tensors)} tensors of {len(stats.labels)} model(s) in {stats.seconds:.1f} s "
              f"on {stats.device}.")
    return "\n".join([header, *(f"- {line}" for line in findings(stats))])

"""Merge tab: method, controls generated from the method's spec, live YAML, run with progress and Stop.

The recipe being edited is a plain dict in ``gr.State`` (``studio.recipe_form``); every control
edits it and re-renders the YAML. The method's controls are built by ``gr.render`` from its
``MethodSpec`` whenever the method or the models change (``version`` is bumped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from merging.calibration import calibration_sources
from merging.errors import MergeCancelled, MergeStudioError
from merging.hub import DownloadCancelled
from merging.methods import REGISTRY, Param
from merging.model_card import recipe_of
from merging.units import format_bytes
from studio import recipe_form as form
from studio import session, zerogpu
from studio.common import (
    HEAVY,
    INSTANT,
    UI,
    as_text,
    downloads_shown,
    handler,
    hub_token,
    read_upload,
    session_hash,
    stop_button,
    stoppable,
    user_errors,
)
from studio.session import StopSignal
from studio.settings import Settings

MAX_RECIPE_BYTES = 1_000_000
CALIBRATION_TYPES = [".txt", ".jsonl"]
QUICK = {"show_progress": "hidden", **UI}  # queued (a State changed by an unqueued event fires no .change)


@dataclass
class MergeTab:
    results: gr.State  # this session's merges: [{"name", "output", "method", "seconds", ...}]
    recipe: gr.State  # the recipe being edited, a dict
    version: gr.State  # bumped when the controls must be rebuilt from the recipe
    stop: gr.State
    method: gr.Dropdown
    guide: gr.Markdown
    dtype: gr.Dropdown
    seed: gr.Number
    yaml_code: gr.Code
    status: gr.Markdown
    upload: gr.UploadButton
    merged_model: gr.Textbox
    load_recipe: gr.Button
    run: gr.Button
    stop_button: gr.Button
    summary: gr.Markdown

    @property
    def edits(self) -> list:
        """What every edit updates: the recipe, its YAML and its status line."""
        return [self.recipe, self.yaml_code, self.status]

    @property
    def header(self) -> list:
        return [self.method, self.guide, self.dtype, self.seed]


# -- layout ---------------------------------------------------------------------------------------

def layout(settings: Settings, demo: gr.Blocks) -> MergeTab:
    start = _start(settings)
    results, recipe, version, stop = gr.State([]), gr.State(start), gr.State({"version": 0}), gr.State(StopSignal())
    gr.Markdown("Choose a method; its parameters appear below. The YAML on the right is the recipe that "
                "runs: edit it, paste one, or upload a `.yaml` file (mergekit's format).")
    with gr.Row():
        with gr.Column(scale=3):
            method = gr.Dropdown(form.method_choices(), value=start["merge_method"], label="Merge method")
            guide = gr.Markdown(form.guidance(start["merge_method"]))
            with gr.Row():
                dtype = gr.Dropdown(list(form.DTYPE_CHOICES), value="as base", label="Output dtype",
                                    info="float32 keeps small deltas exactly; bfloat16 halves the size")
                seed = gr.Number(0, label="Seed", precision=0, minimum=0, info="random steps (DARE's drops)",
                                 visible=_seeded(start))

            @gr.render(inputs=[recipe], triggers=[version.change, demo.load])
            def controls(current: dict):  # runs on those triggers, after ``tab`` below exists
                method_controls(settings, tab, current)

        with gr.Column(scale=2):
            yaml_code = gr.Code(form.to_yaml(start), language="yaml", label="Recipe (YAML)", interactive=True,
                                lines=18, buttons=["copy", "download"], elem_id="merge-yaml")
            status = gr.Markdown(_status(start))
            upload = gr.UploadButton("Upload recipe (.yaml)", file_types=[".yaml", ".yml"], size="sm")
            with gr.Row(equal_height=True):
                merged_model = gr.Textbox(placeholder="org/merged-model", show_label=False, scale=3,
                                          info="Load the recipe of a merged model (its mergekit_config.yml or model card)")
                load_recipe = gr.Button("Load its recipe", size="sm", scale=1)
    with gr.Row():
        run = gr.Button("Merge", variant="primary", scale=3)
        stop_btn = gr.Button("Stop", variant="stop", scale=1)
    summary = gr.Markdown(elem_id="merge-summary", min_height=90)
    tab = MergeTab(results, recipe, version, stop, method, guide, dtype, seed, yaml_code, status, upload, merged_model,
                   load_recipe, run, stop_btn, summary)
    return tab


def method_controls(settings: Settings, tab: MergeTab, current: dict) -> None:
    """The controls of the recipe's method (global parameters, then one group per model), each
    wired to edit the recipe as it is made."""
    spec = form.spec_of(current)
    if form.sliced(current):
        gr.Markdown("This recipe takes layer ranges of its models (`slices:`): its models and per-slice "
                    "parameters are edited in the YAML; the method's parameters below apply to every slice.")
    shown = [p for p in spec.global_params() if not p.hidden]
    if shown:
        with gr.Group():
            gr.Markdown("**Method parameters**", padding=True)
            with gr.Row():
                for param in shown:
                    _wire_param(tab, _control(param, form.current_value(current, param), True), param, None)
    for index, entry in enumerate(current.get("models", [])):  # a sliced recipe: none
        with gr.Group():
            gr.Markdown(f"**{as_text(session.label_of(settings, entry['model']))}**", padding=True)
            with gr.Row(equal_height=True):  # the calibration column is taller than a weight box
                for param in spec.model_params():
                    _wire_param(tab, _control(param, form.current_value(current, param, index), index == 0), param, index)
                if spec.calibration:
                    _calibration_controls(settings, tab, entry, index)


def _control(param: Param, value, first: bool):
    """One Gradio input for a spec parameter (None when the value can only be edited as YAML)."""
    label, info = param.name, (param.help if first else None)
    if isinstance(value, (list, dict)):
        gr.Textbox(form.to_yaml(value).strip(), label=label, interactive=False,
                   info="a gradient or filtered values: edit it in the YAML")
        return None
    if param.kind is bool:
        return gr.Checkbox(bool(value), label=label, info=info, interactive=True)
    if param.choices:
        return gr.Dropdown(list(param.choices), value=value, label=label, info=info, interactive=True)
    if param.kind is float and param.low is not None and param.high is not None:
        step = 0.001 if (param.default or 1) < 0.05 else 0.01
        low = param.low if param.low_inclusive else param.low + step
        return gr.Slider(low, param.high, value=value, step=step, label=label, info=info, interactive=True)
    return gr.Number(value, label=label, info=info, minimum=param.low, maximum=param.high, interactive=True,
                     step=1 if param.kind is int else 0.05, precision=0 if param.kind is int else None)


def _wire_param(tab: MergeTab, component, param: Param, index: int | None) -> None:
    if component is not None:
        component.input(handler(change_param, param, index), [component, tab.recipe], tab.edits, **INSTANT)


def _calibration_controls(settings: Settings, tab: MergeTab, entry: dict, index: int) -> None:
    with gr.Column(min_width=220):
        box = gr.Dropdown(list(calibration_sources()), value=entry.get("calibration"), allow_custom_value=True,
                          label="calibration", interactive=True,
                          info="a named source (the demo tasks), or upload a text / JSONL file" if index == 0 else None)
        up = gr.UploadButton("Upload calibration text", file_types=CALIBRATION_TYPES, size="sm")
    box.input(handler(change_calibration, index), [box, tab.recipe], tab.edits, **INSTANT)
    up.upload(handler(upload_calibration, settings, index), [up, tab.recipe], tab.edits, **UI)


# -- handlers -------------------------------------------------------------------------------------

def _start(settings: Settings) -> dict:
    family = settings.family()
    base = family[settings.base_name()]
    return form.initial(base, [r for r in family.values() if r != base], _names(settings), _sources())


def _names(settings: Settings) -> dict[str, str]:
    """reference -> short name of the offered models (a demo expert's name is its calibration source)."""
    return {ref: name for name, ref in settings.family().items()}


def _sources() -> tuple[str, ...]:
    return tuple(calibration_sources())


def edited(new: dict) -> tuple:
    """The outputs of every edit: the recipe, its YAML and its status."""
    return new, form.to_yaml(new), _status(new)


def relayout(old: dict) -> dict:
    return {"version": old["version"] + 1}


def change_param(param: Param, index: int | None, value, current: dict):
    return edited(form.set_param(current, param, value, index))


def change_calibration(index: int, value, current: dict):
    return edited(form.set_calibration(current, index, value))


def upload_calibration(settings: Settings, index: int, path: str, current: dict, request: gr.Request):
    text = read_upload(path, "calibration file")  # size and encoding checked now
    saved = session.save_upload(settings, session_hash(request), text, Path(path).name)
    return edited(form.set_calibration(current, index, str(saved)))


def pick_models(settings: Settings, base: str, sources: list[str], current: dict, version: dict):
    new = form.with_models(current, base, sources or [], _names(settings), _sources())
    return (*edited(new), relayout(version))


def pick_method(settings: Settings, name: str, current: dict, version: dict):
    new = form.with_method(current, name, _names(settings), _sources())
    return (*edited(new), relayout(version), *_header(new)[1:])


def pick_option(key: str, value, current: dict):
    return edited(form.set_option(current, key, value))


def typed(text: str, current: dict, version: dict):
    """Typing in the YAML: adopt it when valid (rebuilding the controls only if the method or the
    models changed), else say what is wrong; never an error dialog while typing. A multi-stage
    recipe is edited in the YAML only (Merge runs every stage)."""
    if form.stage_names(text):
        return current, _status(text), version, gr.skip(), gr.skip(), gr.skip(), gr.skip()
    try:
        new = form.parse(text)
    except Exception as exc:  # MergeStudioError, or anything odd the parser meets mid-typing
        return current, f"⚠ {as_text(exc)}", version, gr.skip(), gr.skip(), gr.skip(), gr.skip()
    same = new["merge_method"] == current["merge_method"] and form.model_refs(new) == form.model_refs(current)
    return (new, _status(text), version if same else relayout(version), *_header(new))


def left(text: str, current: dict, version: dict):
    """Leaving the YAML editor: show its values in the controls."""
    return version if form.check(text) else relayout(version)


def load_file(path: str, current: dict, version: dict):
    return _adopt(read_upload(path, "recipe", MAX_RECIPE_BYTES), current, version)


def load_recipe_of(settings: Settings, model: str, current: dict, version: dict, request: gr.Request,
                   oauth_token: gr.OAuthToken | None = None):
    """The recipe a merged model was made with (its mergekit_config.yml or model card), into the editor."""
    if not model or not model.strip():
        raise MergeStudioError("give a merged model: a Hub id such as org/name, or one of this session's merges")
    policy = session.policy(settings, session_hash(request), hub_token(oauth_token))
    return _adopt(recipe_of(model.strip(), policy), current, version)


def load_text(text: str | None, current: dict, version: dict):
    """A recipe made elsewhere (the Tune tab's best), into the editor, state and controls; the
    outputs are ``[*edits, version, *header]``, as for an uploaded recipe."""
    if not text or not text.strip():
        raise MergeStudioError("there is no recipe to use yet: run a search until a trial finishes")
    return _adopt(text, current, version)


def _adopt(text: str, current: dict, version: dict):
    """Editor, state and controls for a whole new recipe text (a multi-stage one: the editor only)."""
    if form.stage_names(text):
        return current, text, _status(text), version, gr.skip(), gr.skip(), gr.skip(), gr.skip()
    new = form.parse(text)
    return new, text, _status(text), relayout(version), *_header(new)


def fetch_for_merge(settings: Settings, text: str, signal: StopSignal, request: gr.Request,
                    oauth_token: gr.OAuthToken | None = None, progress=gr.Progress()):
    """The recipe's Hub models downloaded, with progress and Stop, before the merge's own call (on
    ZeroGPU a download inside the GPU call would spend GPU time on the network). A Stop ends here
    with its message, and the merge does not start."""
    progress(0, desc="checking the models")
    with downloads_shown(progress, signal):
        count = session.fetch_models(settings, session.recipe_models(text), session_hash(request),
                                     hub_token(oauth_token))
    return gr.skip() if not count else f"{count} Hub model(s) ready; merging…"


def run_merge(settings: Settings, text: str, done: list, signal: StopSignal, request: gr.Request,
              oauth_token: gr.OAuthToken | None = None, progress=gr.Progress()):
    progress(0, desc="checking the models")

    def on_tensor(count: int, total: int, name: str):
        progress((count, total), desc=f"merging {name}", unit="tensors")

    def on_calibration(ref: str, count: int, total: int):
        progress((count, total), desc=f"calibrating {session.label_of(settings, ref, done)}", unit="examples")

    try:
        with downloads_shown(progress, signal):  # what the fetch step did not (a calibration dataset)
            result = session.merge_recipe(settings, text, session_hash(request), progress=on_tensor,
                                          calibration_progress=on_calibration, cancel=signal.event,
                                          token=hub_token(oauth_token))
    except MergeCancelled:
        return "Merge stopped; nothing was written.", done
    except DownloadCancelled as stopped:
        return f"Merge stopped during the download: {stopped}.", done
    return summary_markdown(result), [*done, result]


def summary_markdown(summary: dict) -> str:
    return (
        f"### ✓ Merged `{summary['name']}`\n"
        f"**{summary['method']}** in **{summary['seconds']:.2f} s** on {summary['device']}: {summary['tensors']} tensors, "
        f"{format_bytes(summary['bytes'])} ({summary['dtype']}, {summary['shards']} "
        f"shard{'' if summary['shards'] == 1 else 's'}).\n\n"
        f"Output folder: `{summary['output']}`\n\n"
        "It is now offered in the Chat, Evaluate and Export tabs."
    )


def _header(recipe: dict) -> tuple:
    """Method, guidance, dtype and seed controls showing ``recipe``."""
    method = recipe["merge_method"]
    return (method, form.guidance(method), recipe.get("out_dtype") or recipe.get("dtype") or "as base",
            gr.Number(recipe.get("seed", 0), visible=_seeded(recipe)))


def _seeded(recipe: dict) -> bool:
    """Whether the recipe's method has random steps, the only ones a seed changes (DARE's drops)."""
    return REGISTRY[recipe["merge_method"]].spec.randomized


def _status(recipe: dict | str) -> str:
    """The line under the editor: the error, or each key mergekit would ignore (the merge runs
    without them, as mergekit's would), or that the recipe is valid."""
    problem, ignored = form.review(recipe)
    if problem:
        return f"⚠ {as_text(problem)}"
    stages = form.stage_names(recipe) if isinstance(recipe, str) else []
    if stages:
        valid = (f"✓ a multi-stage recipe: {', '.join(as_text(s) for s in stages)}; Merge runs them in order "
                 "(the controls show none of them: edit it here)")
        return "\n\n".join([*(f"⚠ {as_text(note)}" for note in ignored), valid])
    if ignored:
        return "\n\n".join(f"⚠ {as_text(note)}" for note in ignored) + "\n\n✓ valid otherwise: it merges as mergekit would"
    return "✓ valid recipe"


# -- wiring ---------------------------------------------------------------------------------------

def wire(tab: MergeTab, settings: Settings, models) -> None:
    """``models``: the Models tab, whose base and sources the recipe follows."""
    picked = [models.base, models.sources, tab.recipe, tab.version]
    models.base.change(handler(pick_models, settings), picked, [*tab.edits, tab.version], **QUICK)
    models.sources.change(handler(pick_models, settings), picked, [*tab.edits, tab.version], **QUICK)
    tab.method.input(handler(pick_method, settings), [tab.method, tab.recipe, tab.version],
                     [*tab.edits, tab.version, tab.guide, tab.dtype, tab.seed], **QUICK)
    tab.dtype.input(handler(pick_option, "dtype"), [tab.dtype, tab.recipe], tab.edits, **INSTANT)
    tab.seed.input(handler(pick_option, "seed"), [tab.seed, tab.recipe], tab.edits, **INSTANT)
    tab.yaml_code.input(typed, [tab.yaml_code, tab.recipe, tab.version], [tab.recipe, tab.status, tab.version, *tab.header],
                        trigger_mode="always_last", **QUICK)
    tab.yaml_code.blur(left, [tab.yaml_code, tab.recipe, tab.version], [tab.version], **QUICK)
    tab.upload.upload(user_errors(load_file), [tab.upload, tab.recipe, tab.version], [*tab.edits, tab.version, *tab.header],
                      **UI)
    tab.load_recipe.click(handler(load_recipe_of, settings), [tab.merged_model, tab.recipe, tab.version],
                          [*tab.edits, tab.version, *tab.header], concurrency_id="inspect", concurrency_limit=4, **UI)
    fetched = stoppable(tab.run.click, tab.stop, handler(fetch_for_merge, settings), [tab.yaml_code, tab.stop],
                        [tab.summary], concurrency_id="fetch", concurrency_limit=2, **UI)
    fetched.success(handler(run_merge, settings, gpu=zerogpu.merge_seconds), [tab.yaml_code, tab.results, tab.stop],
                    [tab.summary, tab.results], concurrency_id=HEAVY, concurrency_limit=settings.heavy_concurrency, **UI)
    stop_button(tab.stop_button, tab.stop)


def build(settings: Settings, demo: gr.Blocks, models) -> MergeTab:
    tab = layout(settings, demo)
    wire(tab, settings, models)
    return tab

"""Merge tab: method, controls generated from the method's spec, live YAML, run with progress and Stop."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from merging.engine import merge
from merging.errors import MergeCancelled
from merging.methods import REGISTRY, Param
from merging.calibration import calibration_sources
from studio import recipe_form as form
from studio.common import HEAVY, INSTANT, UI, as_text, format_bytes, label_of, read_upload, session_dir, session_hash, stop_button as stop_on, stoppable, user_errors
from studio.settings import Settings, StopSignal, prune_sessions

MAX_RECIPE_BYTES = 1_000_000
CALIBRATION_TYPES = [".txt", ".jsonl"]


@dataclass
class MergeTab:
    results: gr.State  # this session's merges: [{"name", "output", "method", "seconds", ...}]


def merge_into_session(settings: Settings, recipe_text: str, hash_: str | None, *, progress=None,
                       calibration_progress=None, cancel=None) -> dict:
    """Merge a YAML recipe into a new folder of the session; returns the engine's summary plus ``name``.

    The folder is ``<work dir>/sessions/<session>/merges/<method>-<time>``: never a path the
    user chose. Sources resolve under the session's policy (hosted: Hub ids, the offered
    models and the session's own folder only).
    """
    recipe = form.recipe_from_text(recipe_text)
    home = settings.session_dir(hash_)
    prune_sessions(settings, keep=home)
    with new_output(home / "merges", recipe.merge_method) as out:
        result = merge(recipe, out, device=settings.device, policy=settings.policy(hash_), progress=progress,
                       cancel=cancel, calibration_progress=calibration_progress)
    return {"name": out.name, **result.summary()}


_RESERVED: set[Path] = set()  # output folders of merges still running (they appear only at the end)
_RESERVING = threading.Lock()


@contextmanager
def new_output(parent: Path, method: str):
    """A new folder name ``<method>-<time>`` under ``parent``, reserved for one merge until the block
    ends: two merges started in the same second (heavy concurrency > 1) never share a folder."""
    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _RESERVING:
        out, n = parent / stem, 2
        while out in _RESERVED or out.exists() or any(p.name.startswith(f".{out.name}.") for p in parent.iterdir()):
            out, n = parent / f"{stem}-{n}", n + 1
        _RESERVED.add(out)
    try:
        yield out
    finally:
        with _RESERVING:
            _RESERVED.discard(out)


def summary_markdown(summary: dict) -> str:
    return (
        f"### ✓ Merged `{summary['name']}`\n"
        f"**{summary['method']}** in **{summary['seconds']:.2f} s** on {summary['device']}: {summary['tensors']} tensors, "
        f"{format_bytes(summary['bytes'])} ({summary['dtype']}, {summary['shards']} "
        f"shard{'' if summary['shards'] == 1 else 's'}).\n\n"
        f"Output folder: `{summary['output']}`\n\n"
        "It is now offered in the Chat, Evaluate and Export tabs."
    )


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


def build(settings: Settings, demo: gr.Blocks, models) -> MergeTab:
    family = settings.family()
    names = {ref: name for name, ref in family.items()}
    tasks = tuple(calibration_sources())
    base_ref = family[settings.base_name()]
    start = form.initial(base_ref, [r for r in family.values() if r != base_ref], names, tasks)

    results = gr.State([])
    recipe = gr.State(start)
    layout = gr.State({"version": 0})  # bumped when the controls must be rebuilt from the recipe
    stop = gr.State(StopSignal())

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

            @gr.render(inputs=[recipe], triggers=[layout.change, demo.load])
            def controls(current: dict):
                spec = form.spec_of(current)
                shown = [p for p in spec.global_params() if p.name not in form.HIDDEN]
                if shown:
                    with gr.Group():
                        gr.Markdown("**Method parameters**", padding=True)
                        with gr.Row():
                            for param in shown:
                                _wire(_control(param, form.current_value(current, param), True), param, None)
                for index, entry in enumerate(current.get("models", [])):
                    with gr.Group():
                        gr.Markdown(f"**{as_text(label_of(settings, entry['model']))}**", padding=True)
                        with gr.Row(equal_height=True):  # the calibration column is taller than a weight box
                            for param in spec.model_params():
                                _wire(_control(param, form.current_value(current, param, index), index == 0), param, index)
                            if spec.calibration:
                                _calibration(entry, index)

        with gr.Column(scale=2):
            yaml_code = gr.Code(form.to_yaml(start), language="yaml", label="Recipe (YAML)", interactive=True,
                                lines=18, buttons=["copy", "download"])
            status = gr.Markdown(_status(start))
            upload = gr.UploadButton("Upload recipe (.yaml)", file_types=[".yaml", ".yml"], size="sm")
    with gr.Row():
        run = gr.Button("Merge", variant="primary", scale=3)
        stop_button = gr.Button("Stop", variant="stop", scale=1)
    summary = gr.Markdown(elem_id="merge-summary", min_height=90)

    def edited(new: dict):
        return new, form.to_yaml(new), _status(new)

    edit_outputs = [recipe, yaml_code, status]

    def _wire(component, param: Param, index: int | None):
        if component is None:
            return

        def change(value, current: dict):
            return edited(form.set_param(current, param, value, index))

        component.input(change, [component, recipe], edit_outputs, **INSTANT)

    def _calibration(entry: dict, index: int):
        with gr.Column(min_width=220):
            box = gr.Dropdown(list(tasks), value=entry.get("calibration"), allow_custom_value=True, label="calibration",
                              interactive=True, info="a named source (the demo tasks), or upload a text / JSONL file" if index == 0 else None)
            up = gr.UploadButton("Upload calibration text", file_types=CALIBRATION_TYPES, size="sm")

        def change(value, current: dict):
            return edited(form.set_calibration(current, index, value))

        @user_errors
        def uploaded(path: str, current: dict, request: gr.Request):
            read_upload(path, "calibration file")  # size and encoding checked now
            folder = session_dir(settings, request) / "uploads"
            folder.mkdir(exist_ok=True)
            target = folder / f"{int(time.time() * 1000)}-{Path(path).name}"
            target.write_bytes(Path(path).read_bytes())
            return edited(form.set_calibration(current, index, str(target)))

        box.input(change, [box, recipe], edit_outputs, **INSTANT)
        up.upload(uploaded, [up, recipe], edit_outputs, **UI)

    def relayout(old_layout: dict):
        return {"version": old_layout["version"] + 1}

    @user_errors
    def pick_models(base: str, sources: list[str], current: dict, old_layout: dict):
        new = form.with_models(current, base, sources or [], names, tasks)
        return (*edited(new), relayout(old_layout))

    @user_errors
    def pick_method(name: str, current: dict, old_layout: dict):
        new = form.with_method(current, name, names, tasks)
        return (*edited(new), relayout(old_layout), *_header(new)[1:])

    def pick_option(key: str):
        def change(value, current: dict):
            return edited(form.set_option(current, key, value))
        return change

    def typed(text: str, current: dict, old_layout: dict):
        """Typing in the YAML: adopt it when valid (rebuilding the controls only if the method or
        the models changed), else say what is wrong; never an error dialog while typing."""
        try:
            new = form.parse(text)
        except Exception as exc:  # MergeStudioError, or anything odd the parser meets mid-typing
            return current, f"⚠ {as_text(exc)}", old_layout, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        same = new["merge_method"] == current["merge_method"] and \
            [m["model"] for m in new["models"]] == [m["model"] for m in current["models"]]
        return (new, _status(new), old_layout if same else relayout(old_layout), *_header(new))

    def left(text: str, current: dict, old_layout: dict):
        """Leaving the YAML editor: show its values in the controls."""
        return old_layout if form.check(text) else relayout(old_layout)

    @user_errors
    def load_file(path: str, old_layout: dict):
        text = read_upload(path, "recipe", MAX_RECIPE_BYTES)
        new = form.parse(text)
        return (*edited(new), relayout(old_layout), *_header(new))

    @user_errors
    def run_merge(text: str, done: list, signal: StopSignal, request: gr.Request, progress=gr.Progress()):
        cancel = signal.event
        progress(0, desc="checking the models")

        def on_tensor(count: int, total: int, name: str):
            progress((count, total), desc=f"merging {name}", unit="tensors")

        def on_calibration(ref: str, count: int, total: int):
            progress((count, total), desc=f"calibrating {label_of(settings, ref, done)}", unit="examples")

        try:
            result = merge_into_session(settings, text, session_hash(request), progress=on_tensor,
                                        calibration_progress=on_calibration, cancel=cancel)
        except MergeCancelled:
            return "Merge stopped; nothing was written.", done
        return summary_markdown(result), [*done, result]

    # Events that rebuild the controls are queued: a State changed by an unqueued event does not
    # fire its .change (which gr.render listens to).
    quick = {"show_progress": "hidden", **UI}
    models.base.change(pick_models, [models.base, models.sources, recipe, layout], [*edit_outputs, layout], **quick)
    models.sources.change(pick_models, [models.base, models.sources, recipe, layout], [*edit_outputs, layout], **quick)
    method.input(pick_method, [method, recipe, layout], [*edit_outputs, layout, guide, dtype, seed], **quick)
    dtype.input(pick_option("dtype"), [dtype, recipe], edit_outputs, **INSTANT)
    seed.input(pick_option("seed"), [seed, recipe], edit_outputs, **INSTANT)
    header = [method, guide, dtype, seed]
    yaml_code.input(typed, [yaml_code, recipe, layout], [recipe, status, layout, *header], trigger_mode="always_last",
                    **quick)
    yaml_code.blur(left, [yaml_code, recipe, layout], [layout], **quick)
    upload.upload(load_file, [upload, layout], [*edit_outputs, layout, *header], **UI)
    stoppable(run.click, stop, run_merge, [yaml_code, results, stop], [summary, results], concurrency_id=HEAVY,
              concurrency_limit=settings.heavy_concurrency, **UI)
    stop_on(stop_button, stop)
    return MergeTab(results)


def _header(recipe: dict) -> tuple:
    """Method, guidance, dtype and seed controls showing ``recipe``."""
    method = recipe["merge_method"]
    return (method, form.guidance(method), recipe.get("out_dtype") or recipe.get("dtype") or "as base",
            gr.Number(recipe.get("seed", 0), visible=_seeded(recipe)))


def _seeded(recipe: dict) -> bool:
    """Whether the recipe's method has random steps, the only ones a seed changes (DARE's drops)."""
    return REGISTRY[recipe["merge_method"]].spec.randomized


def _status(recipe: dict) -> str:
    problem = form.check(recipe)
    return f"⚠ {as_text(problem)}" if problem else "✓ valid recipe"

"""Export tab: download a merged folder as a zip, push it to the Hugging Face Hub with its model card,
or download it as a LoRA adapter on its base (``merging.lora_export``; the base is the one its recipe names).

The token is the visitor's OAuth token on a Space (``gr.LoginButton``), else (locally) the one
huggingface_hub finds (``HF_TOKEN`` or ``huggingface-cli login``). It goes straight to
``merging.export.push_to_hub`` and is never logged, stored or shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from huggingface_hub import get_token

from merging.errors import MergeStudioError
from merging.export import push_to_hub, zip_folder
from merging.lora_export import extract_lora
from merging.model_card import RECIPE_NAME
from merging.stages import final_stage
from studio import session, zerogpu
from studio.common import (
    HEAVY,
    INSTANT,
    UI,
    downloads_shown,
    handler,
    hub_token,
    served_dir,
    session_hash,
)
from studio.recipe_form import stages_from_text
from studio.settings import Settings

EXPORT = dict(concurrency_id="export", concurrency_limit=2, **UI)


@dataclass
class ExportTab:
    chosen: gr.Dropdown
    zip_button: gr.Button
    archive: gr.File
    repo: gr.Textbox
    private: gr.Checkbox
    push_button: gr.Button
    pushed: gr.Markdown
    lora_rank: gr.Slider
    lora_button: gr.Button
    lora_archive: gr.File
    lora_report: gr.Markdown


# -- layout ---------------------------------------------------------------------------------------

def layout(settings: Settings) -> ExportTab:
    gr.Markdown("Download a merged model, or publish it on the Hugging Face Hub with its model card "
                "(`README.md`, tagged `merge`) and recipe (`merge_recipe.yaml`).")
    chosen = gr.Dropdown([], label="Merged model (this session)")
    with gr.Row():
        zip_button = gr.Button("Prepare a zip")
        archive = gr.File(label="Download", interactive=False)
    gr.Markdown("### Push to the Hub")
    if settings.oauth:
        gr.Markdown("Pushes with your own Hugging Face account: sign in with the button at the top of the page.")
    elif settings.hosted:
        gr.Markdown("Pushing needs a Hugging Face login, which this hosted studio does not offer.")
    else:
        gr.Markdown("Uses the token of this machine (`HF_TOKEN`, or `huggingface-cli login`).")
    with gr.Row():
        repo = gr.Textbox(label="Repository", placeholder="my-merged-model or your-name/my-merged-model", scale=3)
        private = gr.Checkbox(True, label="Private", scale=1)
    push_button = gr.Button("Push to the Hub", variant="primary", interactive=settings.oauth or not settings.hosted)
    pushed = gr.Markdown()
    gr.Markdown("### LoRA adapter\nThe merge as a PEFT LoRA adapter on its base (the recipe's `base_model`): per "
                "linear layer, the best rank-r approximation of merged − base. Higher ranks fit better and weigh more.")
    with gr.Row():
        lora_rank = gr.Slider(1, 256, value=16, step=1, label="Rank r")
        lora_button = gr.Button("Extract the adapter")
        lora_archive = gr.File(label="Adapter (zip)", interactive=False)
    lora_report = gr.Markdown()
    return ExportTab(chosen, zip_button, archive, repo, private, push_button, pushed, lora_rank, lora_button,
                     lora_archive, lora_report)


# -- handlers -------------------------------------------------------------------------------------

def result_folder(output: str | None, done: list) -> Path:
    """The chosen merge, which must be one of this session's (never a path from the browser)."""
    if not output:
        raise MergeStudioError("merge something first (Merge tab), then choose it here")
    if output not in {r["output"] for r in done}:
        raise MergeStudioError("that merge is not one of this session's; choose one from the list")
    folder = Path(output)
    if not folder.is_dir():
        raise MergeStudioError(f"the merged folder {folder.name} no longer exists; merge again")
    return folder


def make_zip(output: str, done: list) -> str:
    # zips go to Gradio's own file cache, where they are served without another copy
    return str(zip_folder(result_folder(output, done), served_dir("zips", fresh=False)))


def push_with_login(output: str, name: str, is_private: bool, done: list, oauth_token: gr.OAuthToken | None,
                    progress=gr.Progress()):
    """With "Sign in with Hugging Face": the visitor's own OAuth token, never the server's."""
    return _pushed(result_folder(output, done), name, is_private, hub_token(oauth_token), progress)


def push_with_local_token(settings: Settings, output: str, name: str, is_private: bool, done: list,
                          progress=gr.Progress()):
    """Without sign-in: this machine's token, unless hosted (then none: a visitor must not use the server's)."""
    return _pushed(result_folder(output, done), name, is_private, None if settings.hosted else get_token(), progress)


def _pushed(folder: Path, name: str, is_private: bool, token: str | None, progress) -> str:
    url = push_to_hub(folder, name, is_private, token,
                      progress=lambda state: progress(state.fraction, desc=state.describe()))
    return f"✓ Pushed to [{url}]({url})"


def base_of(folder: Path) -> str:
    """The base model a session merge was made from: its recipe's ``base_model``."""
    recipe = folder / RECIPE_NAME
    if not recipe.is_file():
        raise MergeStudioError(f"{folder.name} has no {RECIPE_NAME}, so its base model is unknown; merge again")
    base = final_stage(stages_from_text(recipe.read_text(encoding="utf-8"))).base_model
    if not base:
        raise MergeStudioError("this merge's recipe names no base_model; a LoRA adapter needs the base it applies to, "
                               "so merge with a method that has one (ties, task_arithmetic, ...)")
    return base


def make_lora(settings: Settings, output: str, rank: float, done: list, request: gr.Request | None = None,
              oauth_token: gr.OAuthToken | None = None, progress=gr.Progress()):
    """The chosen merge as a LoRA adapter on its base, written into the session's folder: (zip, report)."""
    folder = result_folder(output, done)
    if isinstance(rank, float) and rank.is_integer():
        rank = int(rank)  # the slider sends numbers as floats
    visitor = session_hash(request)
    out = session.folder(settings, visitor, create=True) / "adapters" / f"{folder.name}-lora-r{rank}"
    with downloads_shown(progress):  # the base, when it is a Hub model not yet fetched
        result = extract_lora(str(folder), base_of(folder), out, rank, device=settings.device, overwrite=True,
                              policy=session.policy(settings, visitor, hub_token(oauth_token)))
    return str(zip_folder(result.output, served_dir("zips", fresh=False))), f"✓ {result.describe()}"


def offer_results(done: list):
    return gr.Dropdown(choices=[(r["name"], r["output"]) for r in done], value=done[-1]["output"] if done else None)


# -- wiring ---------------------------------------------------------------------------------------

def wire(tab: ExportTab, settings: Settings, results: gr.State) -> None:
    push = handler(push_with_login) if settings.oauth else handler(push_with_local_token, settings)
    tab.zip_button.click(handler(make_zip), [tab.chosen, results], [tab.archive], **EXPORT)
    tab.push_button.click(push, [tab.chosen, tab.repo, tab.private, results], [tab.pushed], **EXPORT)
    tab.lora_button.click(handler(make_lora, settings, gpu=zerogpu.lora_seconds), [tab.chosen, tab.lora_rank, results],
                          [tab.lora_archive, tab.lora_report], concurrency_id=HEAVY,  # an SVD per layer: heavy work
                          concurrency_limit=settings.heavy_concurrency, **UI)
    results.change(offer_results, [results], [tab.chosen], **INSTANT)


def build(settings: Settings, results: gr.State) -> ExportTab:
    tab = layout(settings)
    wire(tab, settings, results)
    return tab

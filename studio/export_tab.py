"""Export tab: download a merged folder as a zip, or push it to the Hugging Face Hub with its model card.

The token is the visitor's OAuth token on a Space (``gr.LoginButton``), else (locally) the one
huggingface_hub finds (``HF_TOKEN`` or ``huggingface-cli login``). It is passed straight to
``HfApi`` and never logged, stored or shown; Hub errors are redacted before they are shown.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from merging.errors import MergeStudioError
from merging.export import push_to_hub, zip_folder
from studio.common import INSTANT, UI, user_errors
from studio.settings import Settings

def _result_choices(done: list) -> list[tuple[str, str]]:
    return [(r["name"], r["output"]) for r in done]


def _result_folder(output: str | None, done: list) -> Path:
    """The chosen merge, which must be one of this session's (never a path from the browser)."""
    if not output:
        raise MergeStudioError("merge something first (Merge tab), then choose it here")
    if output not in {r["output"] for r in done}:
        raise MergeStudioError("that merge is not one of this session's; choose one from the list")
    folder = Path(output)
    if not folder.is_dir():
        raise MergeStudioError(f"the merged folder {folder.name} no longer exists; merge again")
    return folder


def build(settings: Settings, results: gr.State) -> None:
    gr.Markdown("Download a merged model, or publish it on the Hugging Face Hub with its model card "
                "(`README.md`, tagged `merge`) and recipe (`merge_recipe.yaml`).")
    chosen = gr.Dropdown([], label="Merged model (this session)")
    with gr.Row():
        zip_button = gr.Button("Prepare a zip")
        archive = gr.File(label="Download", interactive=False)
    gr.Markdown("### Push to the Hub")
    if settings.oauth:
        gr.LoginButton()
    elif settings.hosted:
        gr.Markdown("Pushing needs a Hugging Face login, which this hosted studio does not offer.")
    else:
        gr.Markdown("Uses the token of this machine (`HF_TOKEN`, or `huggingface-cli login`).")
    with gr.Row():
        repo = gr.Textbox(label="Repository", placeholder="my-merged-model or your-name/my-merged-model", scale=3)
        private = gr.Checkbox(True, label="Private", scale=1)
    push_button = gr.Button("Push to the Hub", variant="primary", interactive=settings.oauth or not settings.hosted)
    pushed = gr.Markdown()

    @user_errors
    def make_zip(output: str, done: list):
        # zips go to Gradio's own file cache, where they are served without another copy
        return str(zip_folder(_result_folder(output, done), Path(get_upload_folder()) / "merge-studio" / "zips"))

    if settings.oauth:
        @user_errors
        def push(output: str, name: str, is_private: bool, done: list, oauth_token: gr.OAuthToken | None):
            url = push_to_hub(_result_folder(output, done), name, is_private, oauth_token.token if oauth_token else None)
            return f"✓ Pushed to [{url}]({url})"
    else:
        @user_errors
        def push(output: str, name: str, is_private: bool, done: list):
            from huggingface_hub import get_token

            url = push_to_hub(_result_folder(output, done), name, is_private, None if settings.hosted else get_token())
            return f"✓ Pushed to [{url}]({url})"

    zip_button.click(make_zip, [chosen, results], [archive], concurrency_id="export", concurrency_limit=2, **UI)
    push_button.click(push, [chosen, repo, private, results], [pushed], concurrency_id="export", concurrency_limit=2, **UI)
    results.change(lambda done: gr.Dropdown(choices=_result_choices(done), value=done[-1]["output"] if done else None),
                   [results], [chosen], **INSTANT)

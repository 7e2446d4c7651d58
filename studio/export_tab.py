"""Export tab: download a merged folder as a zip, or push it to the Hugging Face Hub with its model card.

The token is the visitor's OAuth token on a Space (``gr.LoginButton``), else (locally) the one
huggingface_hub finds (``HF_TOKEN`` or ``huggingface-cli login``). It is passed straight to
``HfApi`` and never logged, stored or shown; Hub errors are redacted before they are shown.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path

import gradio as gr

from chat.ab import redact
from merging.errors import MergeStudioError
from studio.common import INSTANT, UI, user_errors
from studio.settings import Settings

REPO = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
STORED = (".safetensors", ".bin")  # already dense: zipping them only costs time


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


def zip_folder(folder: Path) -> Path:
    """``<name>.zip`` of the folder (weights stored, text files deflated), in Gradio's file cache.

    One zip per folder and modification time, at ``zips/<digest of the folder's path>/<mtime>/``:
    asking again returns the same file, and a zip of an older version of the folder is deleted (a
    merge can be gigabytes; each click must not add a copy). The folder lies in the session's own
    folder, so sessions never share or delete each other's zips.
    """
    from gradio.utils import get_upload_folder

    files = sorted(path for path in folder.rglob("*") if path.is_file())
    modified = max(path.stat().st_mtime_ns for path in [folder, *files])
    home = Path(get_upload_folder()) / "merge-studio" / "zips" / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    target = home / str(modified) / f"{folder.name}.zip"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{uuid.uuid4().hex}.partial")  # never served half-written
        try:
            with zipfile.ZipFile(partial, "w") as archive:
                for path in files:
                    method = zipfile.ZIP_STORED if path.suffix in STORED else zipfile.ZIP_DEFLATED
                    archive.write(path, f"{folder.name}/{path.relative_to(folder)}", compress_type=method)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    for older in home.iterdir():
        if older != target.parent:
            shutil.rmtree(older, ignore_errors=True)
    return target


def push_to_hub(folder: Path, repo: str, private: bool, token: str | None) -> str:
    """Create (or reuse) the model repo and upload the folder (weights, config, tokenizer, README model
    card, merge_recipe.yaml); returns the repo's URL."""
    from huggingface_hub import HfApi

    repo = (repo or "").strip()
    if not REPO.match(repo):
        raise MergeStudioError("give a repository name like my-merged-model or your-name/my-merged-model "
                               "(letters, digits, '-', '_', '.')")
    if not token:
        raise MergeStudioError("not signed in to the Hugging Face Hub: sign in with the button above (on a Space), "
                               "or set HF_TOKEN / run `huggingface-cli login` where the studio runs")
    api = HfApi(token=token)
    try:
        repo_id = repo if "/" in repo else f"{api.whoami()['name']}/{repo}"
        api.create_repo(repo_id, private=bool(private), exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload merged model (Merge Studio)")
    except Exception as exc:  # huggingface_hub raises many types; all end as a readable line
        reason = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise MergeStudioError(f"pushing to the Hub failed: {reason}. Check the repository name and that your "
                               "token may write to it") from None
    return f"https://huggingface.co/{repo_id}"


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
        return str(zip_folder(_result_folder(output, done)))

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

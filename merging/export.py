"""Shipping a merged folder: a zip to download, or a push to the Hugging Face Hub.

The folder already holds its model card (``README.md``) and recipe (``merging.model_card``).
A push uses the token it is given and nothing else: on a hosted studio that is the visitor's
own OAuth token, never the server's. Tokens are never logged, stored or shown; Hub errors are
redacted before they become messages.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Callable

from merging.errors import MergeStudioError, redact
from merging.hub import DownloadProgress, upload_folder

REPO = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
STORED = (".safetensors", ".bin")  # already dense: compressing them only costs time


def zip_folder(folder: Path, zips_dir: Path) -> Path:
    """``<name>.zip`` of ``folder`` (weights stored, text files deflated) under ``zips_dir``.

    One zip per folder and modification time, at ``<digest of the folder's path>/<mtime>/``:
    asking again returns the same file, and the zip of an older version of the folder is
    deleted (a merge can be gigabytes; each request must not add a copy). A zip appears whole
    or not at all.
    """
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    modified = max(path.stat().st_mtime_ns for path in [folder, *files])
    home = zips_dir / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
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


def push_to_hub(folder: Path, repo: str, private: bool, token: str | None,
                progress: Callable[[DownloadProgress], None] | None = None) -> str:
    """Create (or reuse) the model repo and upload the folder (weights, config, tokenizer, README model
    card, merge_recipe.yaml, mergekit_config.yml) with ``token`` in one commit, reporting the upload
    to ``progress``; returns the repo's URL on the Hub it was pushed to."""
    # Deferred: huggingface_hub takes a second to import, and only a push needs its client.
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
        url = api.create_repo(repo_id, private=bool(private), exist_ok=True, repo_type="model")
        upload_folder(folder, repo_id, token, "Upload merged model (Merge Studio)", progress)
    except Exception as exc:  # huggingface_hub raises many types; all end as a readable line
        reason = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise MergeStudioError(f"pushing to the Hub failed: {reason}. Check the repository name and that your "
                               "token may write to it") from None
    return str(url)

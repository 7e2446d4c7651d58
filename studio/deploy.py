"""``python -m studio deploy OWNER/NAME``: this studio as a Gradio Space on the Hugging Face Hub.

Creates the Space (Gradio SDK, ``--private`` if asked), uploads the app (``app.py``, the
requirements, every package the app imports, the demo's shipped adapters) with
``spaces_config/README.md`` as the Space's card (its front matter: SDK, OAuth scopes, suggested
hardware), and with ``--hardware`` requests that hardware. The token is the logged-in user's
(``hf auth login``) or ``HF_TOKEN``/``--token``; it is never printed. Everything goes through
``huggingface_hub`` (``create_repo``, ``upload_folder``, ``request_space_hardware``), so the
Hub's own errors reach the user as one line.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from merging.errors import MergeStudioError
from merging.sources import HUB_ID

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("studio", "chat", "viz", "demo", "tuning", "evaluation", "merging")
FILES = ("app.py", "requirements.txt", "SECURITY.md")
CARD = REPO / "spaces_config" / "README.md"
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


def stage(folder: Path) -> list[str]:
    """Copy what the Space runs into ``folder`` (the card as README.md); the paths, sorted."""
    for name in FILES:
        shutil.copy2(REPO / name, folder / name)
    shutil.copy2(CARD, folder / "README.md")
    shutil.copy2(REPO / "spaces_config" / "HARDWARE.md", folder / "HARDWARE.md")
    for package in PACKAGES:
        shutil.copytree(REPO / package, folder / package, ignore=SKIP)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def deploy(repo_id: str, *, token: str | None = None, private: bool = False, hardware: str | None = None,
           report=print) -> str:
    """Create (or update) the Space ``repo_id`` with this studio; its URL."""
    if not HUB_ID.match(repo_id):
        raise MergeStudioError(f"{repo_id!r} is not a Space id: give OWNER/NAME")
    # Deferred: huggingface_hub takes a second to import, and only this command needs it here.
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="merge-studio-space-") as tmp:
            files = stage(Path(tmp))
            report(f"uploading {len(files)} files to the Space {repo_id}")
            api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=tmp,
                              commit_message="Deploy Merge Studio")
        if hardware:
            api.request_space_hardware(repo_id, hardware)
            report(f"requested hardware {hardware}")
    except Exception as exc:  # huggingface_hub raises many types; the first line says what the Hub said
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MergeStudioError(f"deploying the Space {repo_id} failed ({type(exc).__name__}: {reason}); check the "
                               "id, that you are logged in (hf auth login or HF_TOKEN) with write access") from None
    return str(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio", description="Ship the studio.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("deploy", help="create or update a Hugging Face Space running this studio")
    run.add_argument("space", help="OWNER/NAME of the Space")
    run.add_argument("--private", action="store_true", help="a private Space")
    run.add_argument("--hardware", default=None, help="request hardware, e.g. cpu-upgrade, t4-small, zero-a10g")
    run.add_argument("--token", default=None, help="a Hub token with write access (default: the logged-in one)")
    args = parser.parse_args(argv)
    try:
        url = deploy(args.space, token=args.token, private=args.private, hardware=args.hardware,
                     report=lambda line: print(line, file=sys.stderr))
    except MergeStudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(url)
    return 0

"""What every tab shares: user-facing errors, model pickers' choices, session folders, number formats."""

from __future__ import annotations

import html
import functools
import inspect
import logging
import uuid
from pathlib import Path

import gradio as gr

from merging.units import format_bytes, format_count  # noqa: F401  (re-exported for the tabs)
from merging.errors import MergeStudioError
from studio.settings import Settings, StopSignal

log = logging.getLogger("merge_studio")

HEAVY = "heavy"  # concurrency group of merges, statistics, sweeps and evaluations (all users together)
CHAT = "chat"  # concurrency group of chat generations
UI = {"api_visibility": "private"}  # UI events are not API endpoints: the API is studio/api.py's, named and stable
INSTANT = {"queue": False, "show_progress": "hidden", **UI}  # cheap UI updates that must not wait in the queue


def _user_error(exc: Exception) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, MergeStudioError):
        return gr.Error(str(exc), print_exception=False)
    log.exception("unexpected error in the studio")
    return gr.Error(
        f"unexpected error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}). "
        "This is a bug in Merge Studio; the server log has the details. Try again, or reload the page.",
        print_exception=False,
    )


def user_errors(fn):
    """Wrap an event handler (function or generator) so every failure reaches the user as a
    ``gr.Error`` with a readable message, never a traceback. The signature is kept, so Gradio
    still injects ``gr.Request``, ``gr.Progress`` and ``gr.OAuthToken`` parameters."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise _user_error(exc) from None

        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise _user_error(exc) from None

    return function


def stoppable(trigger, signal: gr.State, fn, inputs: list, outputs: list, **kwargs):
    """Wire ``trigger`` (a button's ``.click``, a textbox's ``.submit``) to run ``fn`` with a Stop.

    The session's ``StopSignal`` in ``signal`` is cleared at the click, by an unqueued step, and
    only then is ``fn`` queued: ``fn`` reads ``signal.event`` as its cancel flag. Clearing it when
    the job starts instead would forget a Stop pressed while the job waited in the queue.
    """
    return trigger(StopSignal.reset, [signal], None, **INSTANT).then(fn, inputs, outputs, **kwargs)


def stop_button(button: gr.Button, signal: gr.State) -> None:
    """``button`` stops this session's run wired with ``stoppable`` at once, queued or running."""
    button.click(StopSignal.stop, [signal], None, **INSTANT)


def session_dir(settings: Settings, request: gr.Request | None) -> Path:
    """This user's folder under the work dir, created on first use."""
    folder = settings.session_dir(getattr(request, "session_hash", None))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def session_hash(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


def download_dir() -> Path:
    """A fresh folder inside Gradio's own file cache: files written here are served as they are,
    without Gradio hashing and copying them (merged models can be gigabytes)."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / "merge-studio" / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def model_choices(settings: Settings, results: list[dict] | None = None) -> list[tuple[str, str]]:
    """(label, reference) of every model a picker offers: the family, then this session's merges."""
    family = settings.family()
    base = settings.base_name()
    choices = [(f"{name} (base)" if name == base else name, ref) for name, ref in family.items()]
    choices += [(f"merged: {r['name']}", r["output"]) for r in results or []]
    return choices


def label_of(settings: Settings, ref: str, results: list[dict] | None = None) -> str:
    return next((label for label, value in model_choices(settings, results) if value == ref), ref)


def read_upload(path: str | None, what: str, limit: int = 20_000_000) -> str:
    """The UTF-8 text of an uploaded file, or a readable error."""
    if not path:
        raise MergeStudioError(f"no {what} uploaded")
    file = Path(path)
    if file.stat().st_size > limit:
        raise MergeStudioError(f"the {what} is larger than {format_bytes(limit)}; upload a smaller file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MergeStudioError(f"the {what} is not UTF-8 text") from None


def as_text(value) -> str:
    """``value`` made safe to put inside Markdown: HTML special characters escaped, so a model
    name or path such as ``<img src=x onerror=...>`` is displayed as written, never as markup."""
    return html.escape(str(value), quote=False)

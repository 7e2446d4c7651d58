"""What every tab shares: handlers Gradio can call, user-facing errors, Stop wiring, uploads, escaping.

A tab module is its layout, then module-level handlers, then one wiring block. Handlers take
what the whole app shares (the settings, the chat pool) as leading parameters, bound at wiring
time with ``handler``; what belongs to one visitor arrives as ``gr.State`` inputs.
"""

from __future__ import annotations

import contextlib
import functools
import html
import inspect
import logging
import uuid
from pathlib import Path
from typing import Callable

import gradio as gr
from gradio.utils import get_upload_folder

from evaluation import registered_suites
from merging.errors import MergeStudioError
from merging.hub import watching
from merging.units import format_bytes
from studio import zerogpu
from studio.session import StopSignal

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


def handler(fn, *bound, gpu: Callable[..., int] | None = None):
    """``fn`` with its first parameters set to ``bound`` (the settings, the pool), as an event
    handler: errors become ``user_errors``' messages, and Gradio sees the signature and type hints
    of the remaining parameters, so it still injects ``gr.Request``, ``gr.Progress`` and
    ``gr.OAuthToken`` (``functools.partial`` would hide them, and streaming generators too).
    ``gpu``: the work is a ZeroGPU call of ``gpu(*bound, *args)`` seconds (``studio.zerogpu``)."""
    if not bound:
        return user_errors(zerogpu.gpu(gpu)(user_errors(fn)) if gpu is not None else fn)
    signature = inspect.signature(fn)
    names = list(signature.parameters)[: len(bound)]
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            yield from fn(*bound, *args, **kwargs)
    else:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            return fn(*bound, *args, **kwargs)
    call.__signature__ = signature.replace(parameters=list(signature.parameters.values())[len(bound):])
    call.__annotations__ = {k: v for k, v in fn.__annotations__.items() if k not in names}
    if gpu is not None:  # messages made inside the call: ZeroGPU passes on a gr.Error only, not other errors
        call = zerogpu.gpu(lambda *args, **kwargs: gpu(*bound, *args, **kwargs))(user_errors(call))
    return user_errors(call)


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


UPLOADED_SUITE, NO_SUITE = "uploaded JSONL", "none (perplexity only)"


def suite_choices() -> dict[str, str | None]:
    """Task-suite radio label -> suite: the registered suites by name, an uploaded file, or none."""
    named = {f"{s.description} ({name})": name for name, s in registered_suites().items()}
    return {**named, UPLOADED_SUITE: "upload", NO_SUITE: None}


def chosen_suite(label: str) -> str | None:
    """The suite a radio label stands for ("upload" for the uploaded file), or a readable error."""
    choices = suite_choices()
    if label not in choices:
        raise MergeStudioError(f"unknown task suite {label!r}; choose one from the list")
    return choices[label]


def session_hash(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


@contextlib.contextmanager
def downloads_shown(progress, signal: StopSignal | None = None):
    """Hub downloads inside the block move ``progress`` (bytes of the total, the rate) and stop at
    the session's Stop (``merging.hub.watching``)."""
    with watching(lambda state: progress(state.fraction, desc=state.describe()),
                  signal.event if signal is not None else None):
        yield


def hub_token(oauth_token: gr.OAuthToken | None) -> str | None:
    """The visitor's own Hub token, from "Sign in with Hugging Face" (``gr.LoginButton``), or None.
    Handlers that reach the Hub take ``oauth_token: gr.OAuthToken | None`` for Gradio to inject."""
    return oauth_token.token if oauth_token is not None else None


def served_dir(name: str, *, fresh: bool = True) -> Path:
    """A folder inside Gradio's own file cache (a new one per call when ``fresh``): files written
    here are served as they are, without Gradio hashing and copying them (merges can be gigabytes)."""
    folder = Path(get_upload_folder()) / "merge-studio" / name
    if fresh:
        folder = folder / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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

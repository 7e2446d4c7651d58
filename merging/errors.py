"""Errors a user can act on.

Every failure that bad input can cause is raised as a ``MergeStudioError`` whose message says
what is wrong and what to do about it. The CLI prints it as one ``error: ...`` line and the app
shows it in a dialog; anything else escaping is a bug.
"""

import re


class MergeStudioError(Exception):
    """Base class: the message is meant for the user, not the developer."""


class RecipeError(MergeStudioError):
    """The recipe is malformed or names an unknown method, key or out-of-range value."""


class SourceError(MergeStudioError):
    """A model reference cannot be resolved to a safe, readable folder of weights."""


class CheckpointError(MergeStudioError):
    """A checkpoint is corrupt, incompatible with the others, or cannot be written."""


class Cancelled(MergeStudioError):
    """Long work (a merge, an evaluation) was stopped by the user."""


class MergeCancelled(Cancelled):
    """The merge was stopped by the user; no output was left behind."""


def check_cancel(cancel, message: str, error: type[Cancelled] = Cancelled) -> None:
    """Raise ``error(message)`` when the ``cancel`` event (a ``threading.Event`` or None) is set:
    the one check every long piece of work (merge, calibration, evaluation, statistics) makes
    between its steps."""
    if cancel is not None and cancel.is_set():
        raise error(message)


_HF_TOKEN = re.compile(r"hf_(?:oauth_)?[A-Za-z0-9]{20,}")  # access tokens and OAuth ones


def redact(text: str) -> str:
    """``text`` with anything shaped like a Hugging Face access token replaced: for messages and
    records that may quote one (a Hub error, a chat someone pasted a token into)."""
    return _HF_TOKEN.sub("hf_[redacted]", text)

"""A visitor's session: its folder, what it may read, its merges and statistics, its Stop button.

No Gradio here: the tabs pass the session hash Gradio gives each browser tab, and this module
turns it into storage and policy. A session's files live in a folder named after a digest of
that hash, so two visitors never share one and nobody can name another's:

    <work dir>/sessions/<digest>/merges/<method>-<time>/   merged models
    <work dir>/sessions/<digest>/uploads/                  calibration and perplexity texts
    <work dir>/sessions/<digest>/sweeps/                   the DARE sweep's scratch merges

Hosted (a Space), a session may read the offered models, Hub ids and its own folder only, and
folders untouched for ``MERGE_STUDIO_SESSION_HOURS`` are deleted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from merging.engine import merge
from merging.stages import final_stage, merge_stages
from merging.errors import MergeStudioError
from merging.sources import SourcePolicy
from studio import recipe_form as form
from studio.settings import Settings
from viz.stats import RedundancyStats, delta_statistics, model_labels

# -- where a session's files are, and what it may read ------------------------------------------

def sessions_root(settings: Settings) -> Path:
    return settings.work_dir / "sessions"


def folder(settings: Settings, session_hash: str | None, *, create: bool = False) -> Path:
    """The session's folder, named by a digest of its hash (never the hash itself)."""
    key = hashlib.sha256((session_hash or "anonymous").encode()).hexdigest()[:20]
    path = sessions_root(settings) / key
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def local_roots(settings: Settings, session_hash: str | None = None) -> tuple[Path, ...]:
    """Local folders a reference may point into when hosted: the offered models, and the
    session's own folder (every session's when ``session_hash`` is None: the shared chat pool)."""
    roots = [Path(ref).expanduser().resolve() for ref in settings.family().values() if Path(ref).expanduser().exists()]
    roots.append(folder(settings, session_hash) if session_hash is not None else sessions_root(settings))
    return tuple(roots)


def policy(settings: Settings, session_hash: str | None = None) -> SourcePolicy:
    """What a session's references may resolve to: hosted, its allowed folders and the Hub size limit."""
    return SourcePolicy(hosted=settings.hosted, allowed_roots=local_roots(settings, session_hash) if settings.hosted else (),
                        max_model_bytes=settings.max_model_bytes)


# -- the models a session is offered -----------------------------------------------------------------

def model_choices(settings: Settings, results: list[dict] | None = None) -> list[tuple[str, str]]:
    """(label, reference) of every model a picker offers: the family, then this session's merges."""
    base = settings.base_name()
    choices = [(f"{name} (base)" if name == base else name, ref) for name, ref in settings.family().items()]
    choices += [(f"merged: {r['name']}", r["output"]) for r in results or []]
    return choices


def label_of(settings: Settings, ref: str, results: list[dict] | None = None) -> str:
    return next((label for label, value in model_choices(settings, results) if value == ref), ref)


# -- files a session writes ---------------------------------------------------------------------------

def save_upload(settings: Settings, session_hash: str | None, text: str, name: str) -> Path:
    """``text`` saved as ``uploads/<time>-<name>`` in the session's folder (a calibration file or a
    pasted perplexity text); ``name`` keeps its suffix, which says how the file is read."""
    uploads = folder(settings, session_hash, create=True) / "uploads"
    uploads.mkdir(exist_ok=True)
    path = uploads / f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}-{Path(name).name}"
    path.write_text(text, encoding="utf-8")
    return path


_RESERVED: set[Path] = set()  # output folders of merges still running (they appear only at the end)
_RESERVING = threading.Lock()


@contextmanager
def reserve_output(parent: Path, method: str):
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


def prune(settings: Settings, keep: Path | None = None) -> None:
    """Hosted only: delete session folders untouched for ``session_hours`` (never ``keep``).

    Untouched means nothing in the folder changed: a folder's own time changes only when an
    entry directly in it does, so a session writing merges inside ``merges/`` looks idle by
    that measure alone.
    """
    root = sessions_root(settings)
    if not settings.hosted or not root.is_dir():
        return
    cutoff = time.time() - settings.session_hours * 3600
    for path in root.iterdir():
        try:
            if path != keep and not _changed_since(path, cutoff):
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _changed_since(path: Path, cutoff: float) -> bool:
    """Whether ``path`` or anything in it was modified after ``cutoff`` (stops at the first)."""
    if path.stat().st_mtime >= cutoff:
        return True
    for parent, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            try:
                if os.stat(os.path.join(parent, name), follow_symlinks=False).st_mtime >= cutoff:
                    return True
            except OSError:
                continue
    return False


# -- work done for a session ----------------------------------------------------------------------

def merge_recipe(settings: Settings, recipe_text: str, session_hash: str | None, *, progress=None,
                 calibration_progress=None, cancel=None) -> dict:
    """Merge a YAML recipe into a new folder of the session; returns the engine's summary plus ``name``.

    The folder is ``<session>/merges/<method>-<time>``: never a path the user chose. Sources
    resolve under the session's policy. The recipe is parsed from text only: a hosted studio must
    not let a one-line ``x.yaml`` open a server file.
    """
    stages = form.stages_from_text(recipe_text)
    home = folder(settings, session_hash)
    prune(settings, keep=home)
    options = dict(device=settings.device, policy=policy(settings, session_hash), progress=progress, cancel=cancel,
                   calibration_progress=calibration_progress)
    with reserve_output(home / "merges", final_stage(stages).merge_method) as out:
        if len(stages) == 1:
            result = merge(stages[0], out, **options)
        else:  # named stages go to the session's stages/ folder, reused when unchanged
            result = merge_stages(stages, out, intermediate_dir=home / "stages", **options)
    return {"name": out.name, **result.summary()}


def measure(settings: Settings, base: str, sources: list[str], density: float, session_hash: str | None, *,
            cancel=None, progress=None, merged: str | None = None, merged_label: str | None = None) -> RedundancyStats:
    """The redundancy statistics of ``sources`` on ``base`` as the session may compute them: under
    its policy, labelled as the pickers name them, on one CPU thread (the pass is many small ops;
    see ``viz.stats.delta_statistics``). ``merged``: a merge (of this session, say) whose update
    joins the singular-value statistics."""
    if not base or not sources:
        raise MergeStudioError("choose a base and at least one source model in the Models tab")
    if not isinstance(base, str) or isinstance(sources, str) or not all(isinstance(ref, str) for ref in sources):
        raise MergeStudioError("give the base as a model reference and the sources as a list of model references")
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise MergeStudioError(f"density must be a number in (0, 1], got {density!r}")
    if merged is not None and not isinstance(merged, str):
        raise MergeStudioError("give the merged model as a model reference")
    labels = model_labels([label_of(settings, ref) for ref in sources])
    return delta_statistics(base, sources, density=density, device=settings.device, policy=policy(settings, session_hash),
                            labels=labels, threads=1, cancel=cancel, progress=progress, merged=merged or None,
                            merged_label=merged_label)


class StopSignal:
    """A per-session Stop button's flag, kept in ``gr.State``.

    Gradio deep-copies a State's initial value for each session; a copy is a fresh signal, so
    every session gets its own ``threading.Event``. The running event and the Stop click see
    the same object (State values are passed by reference). The flag is cleared when the user
    starts a run (``studio.common.stoppable``), not when the job leaves the queue, so a Stop
    pressed while the job waits behind other users' work still cancels it.
    """

    def __init__(self):
        self.event = threading.Event()

    def __deepcopy__(self, memo) -> StopSignal:
        return StopSignal()

    def reset(self) -> None:
        self.event.clear()

    def stop(self) -> None:
        self.event.set()

"""A visitor's session: its folder, what it may read, its merges and statistics, its Stop button.

No Gradio here: the tabs pass the session hash Gradio gives each browser tab, and this module
turns it into storage and policy. A session's files live in a folder named after a digest of
that hash, so two visitors never share one and nobody can name another's:

    <work dir>/sessions/<digest>/merges/<method>-<time>/   merged models
    <work dir>/sessions/<digest>/uploads/                  calibration and perplexity texts
    <work dir>/sessions/<digest>/sweeps/                   the DARE sweep's scratch merges
    <work dir>/sessions/<digest>/searches/<hash>.journal   parameter searches: one Optuna study per
                                                           search spec (its fingerprint), resumed by Start

Hosted (a Space), a session may read the offered models, Hub ids and its own folder only, and
folders untouched for ``MERGE_STUDIO_SESSION_HOURS`` are deleted; a parameter search runs at most
``max_tune_trials`` trials for at most ``max_tune_minutes``.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evaluation import registered_suites
from merging.engine import merge
from merging.errors import Cancelled, MergeStudioError, SourceError
from merging.sources import SourcePolicy, allowed_path, is_hub_ref, resolve_model
from merging.stages import final_stage, merge_stages
from studio import recipe_form as form
from studio.settings import Settings
from tuning.search import Search, TuneResult
from tuning.spec import SearchSpec, load_search_spec
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


def policy(settings: Settings, session_hash: str | None = None, token: str | None = None) -> SourcePolicy:
    """What a session's references may resolve to: hosted, its allowed folders and the Hub size limit.

    Hub access: locally, this machine's token (``HF_TOKEN``, ``hf auth login``); hosted, the
    visitor's own ``token`` from "Sign in with Hugging Face", else none at all, so a visitor never
    reads a private or gated model through the server's token."""
    return SourcePolicy(hosted=settings.hosted, allowed_roots=local_roots(settings, session_hash) if settings.hosted else (),
                        max_model_bytes=settings.max_model_bytes, endpoints=tuple(settings.endpoints.values()),
                        hub_token=(token or False) if settings.hosted else token)


# -- the models a session is offered -----------------------------------------------------------------

def model_choices(settings: Settings, results: list[dict] | None = None, *,
                  endpoints: bool = False) -> list[tuple[str, str]]:
    """(label, reference) of every model a picker offers: the family, then this session's merges,
    then (``endpoints``: where a served model can answer, the Chat tab) the configured endpoints."""
    base = settings.base_name()
    choices = [(f"{name} (base)" if name == base else name, ref) for name, ref in settings.family().items()]
    choices += [(f"merged: {r['name']}", r["output"]) for r in results or []]
    if endpoints:
        choices += [(f"served: {name}", ref) for name, ref in settings.endpoints.items()]
    return choices


def label_of(settings: Settings, ref: str, results: list[dict] | None = None) -> str:
    return next((label for label, value in model_choices(settings, results, endpoints=True) if value == ref), ref)


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
                 calibration_progress=None, cancel=None, token: str | None = None) -> dict:
    """Merge a YAML recipe into a new folder of the session; returns the engine's summary plus ``name``.

    The folder is ``<session>/merges/<method>-<time>``: never a path the user chose. Sources
    resolve under the session's policy. The recipe is parsed from text only: a hosted studio must
    not let a one-line ``x.yaml`` open a server file.
    """
    stages = form.stages_from_text(recipe_text)
    home = folder(settings, session_hash)
    prune(settings, keep=home)
    options = dict(device=settings.device, policy=policy(settings, session_hash, token), progress=progress, cancel=cancel,
                   calibration_progress=calibration_progress)
    with reserve_output(home / "merges", final_stage(stages).merge_method) as out:
        if len(stages) == 1:
            result = merge(stages[0], out, **options)
        else:  # named stages go to the session's stages/ folder, reused when unchanged
            result = merge_stages(stages, out, intermediate_dir=home / "stages", **options)
    return {"name": out.name, **result.summary()}


def fetch_models(settings: Settings, refs: list[str], session_hash: str | None, token: str | None = None) -> int:
    """Download the weights of the Hub models among ``refs`` (checked under the session's policy,
    as the work that follows checks them), so the work itself reads the cache: on ZeroGPU a
    download inside a GPU call would spend the visitor's GPU time on the network. Stage names,
    local folders and endpoints are left alone; returns how many Hub models there were."""
    hub = [ref for ref in dict.fromkeys(refs) if isinstance(ref, str) and any(map(is_hub_ref, ref.split("+")))]
    for ref in hub:
        resolve_model(ref, policy(settings, session_hash, token))
    return len(hub)


def recipe_models(recipe_text: str) -> list[str]:
    """Every model a (multi-stage) recipe names, except its own stages' names."""
    stages = form.stages_from_text(recipe_text)
    names = {stage.name for stage in stages if stage.name}
    refs = [ref for stage in stages for ref in [*stage.referenced_models(), stage.tokenizer_source or ""]]
    return [ref for ref in refs if ref and ref.split("+")[0] not in names and ref not in ("base", "union")]


def measure(settings: Settings, base: str, sources: list[str], density: float, session_hash: str | None, *,
            cancel=None, progress=None, merged: str | None = None, merged_label: str | None = None,
            token: str | None = None) -> RedundancyStats:
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
    return delta_statistics(base, sources, density=density, device=settings.device,
                            policy=policy(settings, session_hash, token),
                            labels=labels, threads=1, cancel=cancel, progress=progress, merged=merged or None,
                            merged_label=merged_label)


# -- parameter search ----------------------------------------------------------------------------

def search_spec(source: str | dict) -> SearchSpec:
    """A search spec from YAML text or a mapping; text is always parsed as YAML, never opened as a
    file (a hosted studio must not let a one-line ``x.yaml`` read a server file)."""
    if isinstance(source, str):
        if not source.strip():
            raise MergeStudioError("the search spec is empty: give a recipe whose values may be ranges, "
                                   "plus a tune: section")
        try:
            source = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            raise MergeStudioError(f"the search spec is not valid YAML: {exc}") from None
    if not isinstance(source, dict):
        raise MergeStudioError("a search spec is a recipe (a YAML mapping) whose values may be ranges, "
                               "plus a 'tune:' section")
    return load_search_spec(source)


def save_suite(settings: Settings, session_hash: str | None, text: str, name: str) -> Path:
    """An uploaded JSONL suite saved in the session's ``uploads/<digest>/<name>``: named by its
    content, so uploading the same file again gives the same path (and a search the same study);
    the file name stays the task name of lines that give none."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = folder(settings, session_hash, create=True) / "uploads" / digest / (Path(name).name or "suite.jsonl")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


def check_search(settings: Settings, spec: SearchSpec, trials: int, session_hash: str | None,
                 token: str | None = None) -> None:
    """Refuse what a session may not search: more trials than the studio allows, and (hosted) a
    suite or text file outside the session's folder and the offered models (suites by name pass)."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise MergeStudioError(f"trials must be a whole number of at least 1, not {trials!r}")
    cap = settings.max_tune_trials
    if cap is not None and trials > cap:
        raise MergeStudioError(f"this studio runs at most {cap} trials per search (MERGE_STUDIO_MAX_TUNE_TRIALS); "
                               f"ask for {cap} or fewer, and start again to add more")
    allowed = policy(settings, session_hash, token)
    named = registered_suites()
    for key in ("suite", "test_suite", "text"):
        value = getattr(spec.settings, key)
        if value is None or (key != "text" and value in named):
            continue
        if not allowed_path(Path(value).expanduser(), allowed):
            raise SourceError(f"tune.{key} {value!r}: local paths are disabled on this hosted studio; name a suite "
                              f"({', '.join(named) or 'none registered'}) or upload a JSONL file in the Tune tab")


@dataclass
class SearchUpdate:
    """One step of a session's search, as ``search`` yields them: a progress line, the study
    (when opened and after each trial, with that trial), or the result at the end."""

    message: str | None = None
    study: Any = None  # the Optuna study
    trial: Any = None  # the trial that just finished (a FrozenTrial)
    result: TuneResult | None = None


def study_of(settings: Settings, spec: SearchSpec, session_hash: str | None) -> tuple[str, str]:
    """(storage, study name) of ``spec`` for a session: a journal file per spec fingerprint in the
    session's ``searches/``, so starting the same search again continues its study."""
    fingerprint = spec.fingerprint()
    storage = folder(settings, session_hash, create=True) / "searches" / f"{fingerprint}.journal"
    return str(storage), f"search-{fingerprint}"


def search(settings: Settings, spec: SearchSpec, trials: int, session_hash: str | None, *,
           cancel: threading.Event, token: str | None = None) -> Iterator[SearchUpdate]:
    """Run ``trials`` more trials of ``spec`` for a session, yielding ``SearchUpdate``s as they come.

    The search runs on a thread of its own (``tuning.search.Search``: sources scored, then one
    in-memory merge and evaluation per trial) under the session's policy; this generator relays
    its progress. ``cancel`` (the session's Stop) stops it at the next task boundary, keeping the
    finished trials; so does the studio's time limit, and closing the generator (the visitor
    left). The last update holds the result: the best recipe, scored on the test split unless
    stopped; a search stopped before any trial finished ends with a message instead.
    """
    check_search(settings, spec, trials, session_hash, token)
    home = folder(settings, session_hash, create=True)
    prune(settings, keep=home)
    storage, study = study_of(settings, spec, session_hash)
    updates: queue.Queue = queue.Queue()
    started = time.perf_counter()

    def work() -> None:
        try:
            runner = Search(spec, storage, study, device=settings.device, policy=policy(settings, session_hash, token),
                            cancel=cancel, report=lambda line: updates.put(SearchUpdate(message=line)))
            updates.put(SearchUpdate(study=runner.study))
            try:
                runner.optimize(trials, lambda study, trial: updates.put(SearchUpdate(study=study, trial=trial)))
            except Cancelled:  # stopped while a trial was being scored: that trial failed, the others stay
                pass
            finished = any(t.state.name == "COMPLETE" for t in runner.study.get_trials(deepcopy=False))
            if cancel.is_set() and not finished:
                updates.put(SearchUpdate(message="stopped before any trial finished"))
            else:
                updates.put(SearchUpdate(study=runner.study, result=runner.result(started)))
        except Cancelled:
            updates.put(SearchUpdate(message="stopped before any trial finished"))
        except BaseException as exc:  # noqa: BLE001  (handed to the generator, which raises it)
            updates.put(exc)
        finally:
            updates.put(None)

    thread = threading.Thread(target=work, name="parameter-search", daemon=True)
    minutes = settings.max_tune_minutes
    deadline = time.monotonic() + minutes * 60 if minutes else None
    thread.start()
    try:
        while True:
            if deadline is not None and time.monotonic() > deadline and not cancel.is_set():
                cancel.set()
                yield SearchUpdate(message=f"the time limit of {minutes:g} minutes per search was reached "
                                           "(MERGE_STUDIO_MAX_TUNE_MINUTES): stopping after the current task")
            try:
                update = updates.get(timeout=0.5)
            except queue.Empty:
                continue
            if update is None:
                return
            if isinstance(update, BaseException):
                raise update
            yield update
    finally:
        if thread.is_alive():  # the caller went away (a closed browser tab): stop the search too
            cancel.set()


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

    def __reduce__(self):
        # A ZeroGPU call pickles its arguments into a worker process, where no click can reach a
        # threading.Event: the worker gets a fresh, unset signal (``studio.zerogpu``).
        return StopSignal, ()

    def reset(self) -> None:
        self.event.clear()

    def stop(self) -> None:
        self.event.set()

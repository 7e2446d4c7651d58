"""Studio settings (from the environment) and the small per-session helpers every tab shares.

Settings are read once, by ``Settings.from_env``; nothing here holds per-user state. A user's
files live in a session folder named after a digest of Gradio's session hash, so two users
never share one and nobody can name another's.

Environment variables (all optional):

- ``MERGE_STUDIO_MODELS``: the models offered in the pickers. ``zoo`` (default) is the demo
  family; otherwise a JSON object ``{"name": "folder or org/name", ...}`` or ``name=ref,name=ref``.
  The entry named ``base`` (else the first) is the preselected base; the others are sources.
- ``MERGE_STUDIO_HOSTED``: ``1`` or ``0`` forces hosted mode on or off; by default it is on
  when ``SPACE_ID`` is set (a Hugging Face Space). Hosted: local paths are refused except the
  offered models and the user's own session folder; Hub models are size-limited; the queue
  is bounded; pushing to the Hub uses the visitor's OAuth login.
- ``MERGE_STUDIO_WORK_DIR``: where session folders (merge outputs, uploads) go; default
  ``<cache>/studio`` (``$MERGE_STUDIO_CACHE``, else ``~/.cache/merge-studio``).
- ``MERGE_STUDIO_DEVICE``: ``auto`` (default), ``cpu`` or ``cuda`` for merges, statistics,
  evaluation and chat.
- ``MERGE_STUDIO_MAX_MODEL_SIZE``: largest model (weights on disk, e.g. ``4GB``) a Hub
  reference may have; default 4GB hosted, unlimited locally.
- ``MERGE_STUDIO_HEAVY_CONCURRENCY``: merges, statistics, sweeps and evaluations running at
  once, across all users (default 1); ``MERGE_STUDIO_CHAT_CONCURRENCY``: chat generations at
  once (default 4); ``MERGE_STUDIO_QUEUE_SIZE``: waiting requests before new ones are refused
  (default 64 hosted, unlimited locally); ``MERGE_STUDIO_SESSION_HOURS``: hosted session
  folders older than this are deleted (default 24).
- Read by the packages themselves: ``MERGE_STUDIO_CHAT_BUDGET`` (chat memory budget),
  ``MERGE_STUDIO_VOTES`` (A/B votes file), ``MERGE_STUDIO_CACHE``, ``HF_TOKEN``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Mapping

import demo
from merging.errors import MergeStudioError
from merging.runtime import cache_root
from merging.sources import SourcePolicy
from merging.units import parse_size

DEFAULT_HOSTED_MAX_MODEL = "4GB"


@dataclass(frozen=True)
class Settings:
    models: dict[str, str] = field(default_factory=dict)  # name -> reference; empty: the demo family
    base: str | None = None  # name of the preselected base
    hosted: bool = False
    work_dir: Path = field(default_factory=lambda: _default_work_dir())
    device: str = "auto"
    max_model_bytes: int | None = None
    heavy_concurrency: int = 1
    chat_concurrency: int = 4
    queue_size: int | None = None
    session_hours: float = 24.0
    oauth: bool = False  # a LoginButton for pushing: on a Space only (elsewhere Gradio mocks it with this machine's login)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        hosted_flag = env.get("MERGE_STUDIO_HOSTED", "").strip().lower()
        on_space = bool(env.get("SPACE_ID"))
        oauth = on_space and env.get("SYSTEM") == "spaces"  # where Gradio's OAuth is real (its get_space())
        hosted = hosted_flag in ("1", "true", "yes") if hosted_flag else on_space
        models, base = parse_models(env.get("MERGE_STUDIO_MODELS", "zoo"))
        max_size = env.get("MERGE_STUDIO_MAX_MODEL_SIZE") or (DEFAULT_HOSTED_MAX_MODEL if hosted else "")
        return cls(
            models=models,
            base=base,
            hosted=hosted,
            work_dir=Path(env.get("MERGE_STUDIO_WORK_DIR") or _default_work_dir()).expanduser().absolute(),
            device=env.get("MERGE_STUDIO_DEVICE", "auto"),
            max_model_bytes=parse_size(max_size, "MERGE_STUDIO_MAX_MODEL_SIZE") if max_size else None,
            heavy_concurrency=_count(env, "MERGE_STUDIO_HEAVY_CONCURRENCY", 1),
            chat_concurrency=_count(env, "MERGE_STUDIO_CHAT_CONCURRENCY", 4),
            queue_size=_count(env, "MERGE_STUDIO_QUEUE_SIZE", 64) if hosted or env.get("MERGE_STUDIO_QUEUE_SIZE") else None,
            session_hours=_hours(env, "MERGE_STUDIO_SESSION_HOURS", 24.0),
            oauth=oauth,
        )

    def with_models(self, models: Mapping[str, str | Path], base: str | None = None) -> Settings:
        models = {name: str(ref) for name, ref in models.items()}
        return replace(self, models=models, base=base or ("base" if "base" in models else next(iter(models))))

    @property
    def uses_zoo(self) -> bool:
        return not self.models

    def family(self) -> dict[str, str]:
        """name -> reference of the offered models (the demo family's folders when it is used)."""
        if self.models:
            return dict(self.models)
        return {"base": str(demo.base_path()), **{name: str(demo.expert_path(name)) for name in demo.EXPERTS}}

    def base_name(self) -> str:
        family = self.family()
        return self.base if self.base in family else ("base" if "base" in family else next(iter(family)))

    def sessions_dir(self) -> Path:
        return self.work_dir / "sessions"

    def session_dir(self, session_hash: str | None) -> Path:
        """This user's folder: named by a digest of the session hash (never the hash itself)."""
        key = hashlib.sha256((session_hash or "anonymous").encode()).hexdigest()[:20]
        return self.sessions_dir() / key

    def local_roots(self, session_hash: str | None = None) -> tuple[Path, ...]:
        """Local folders a reference may point into when hosted: the offered models (and a
        session's own folder; all session folders when ``session_hash`` is None)."""
        roots = [Path(ref).expanduser().resolve() for ref in self.family().values() if Path(ref).expanduser().exists()]
        roots.append(self.session_dir(session_hash) if session_hash is not None else self.sessions_dir())
        return tuple(roots)

    def policy(self, session_hash: str | None = None) -> SourcePolicy:
        """What a session's references may resolve to: hosted, its allowed folders and the Hub size limit."""
        return SourcePolicy(hosted=self.hosted, allowed_roots=self.local_roots(session_hash) if self.hosted else (),
                            max_model_bytes=self.max_model_bytes)


def _default_work_dir() -> Path:
    return cache_root() / "studio"


def parse_models(text: str) -> tuple[dict[str, str], str | None]:
    """``MERGE_STUDIO_MODELS``: '' or 'zoo' -> ({}, None); JSON object or 'name=ref,...' -> (models, base)."""
    text = (text or "").strip()
    if text in ("", "zoo"):
        return {}, None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise MergeStudioError(f"MERGE_STUDIO_MODELS is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise MergeStudioError('MERGE_STUDIO_MODELS must be a JSON object {"name": "folder or org/name", ...}')
        models = dict(data)
    else:
        models = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, ref = part.partition("=")
            if not sep or not name.strip() or not ref.strip():
                raise MergeStudioError(f"MERGE_STUDIO_MODELS entry {part!r} is not name=reference")
            models[name.strip()] = ref.strip()
    if len(models) < 2:
        raise MergeStudioError("MERGE_STUDIO_MODELS needs a base and at least one fine-tuned model")
    return models, "base" if "base" in models else next(iter(models))


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if not text:
        return default
    if not text.strip().isdigit() or int(text) < 1:
        raise MergeStudioError(f"{name}={text!r} must be a whole number of at least 1")
    return int(text)


def _hours(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if not text:
        return default
    try:
        hours = float(text)
    except ValueError:
        hours = float("nan")
    if not math.isfinite(hours) or hours <= 0:  # 0 or less would delete every session at the next merge
        raise MergeStudioError(f"{name}={text!r} must be a number of hours above 0, such as 24 or 0.5")
    return hours


def prune_sessions(settings: Settings, keep: Path | None = None) -> None:
    """Hosted only: delete session folders untouched for ``session_hours`` (never ``keep``).

    Untouched means nothing in the folder changed: a folder's own time changes only when an
    entry directly in it does, so a session writing merges inside ``merges/`` looks idle by
    that measure alone.
    """
    root = settings.sessions_dir()
    if not settings.hosted or not root.is_dir():
        return
    cutoff = time.time() - settings.session_hours * 3600
    for folder in root.iterdir():
        try:
            if folder != keep and not _changed_since(folder, cutoff):
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def _changed_since(folder: Path, cutoff: float) -> bool:
    """Whether ``folder`` or anything in it was modified after ``cutoff`` (stops at the first)."""
    if folder.stat().st_mtime >= cutoff:
        return True
    for parent, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            try:
                if os.stat(os.path.join(parent, name), follow_symlinks=False).st_mtime >= cutoff:
                    return True
            except OSError:
                continue
    return False


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


__all__ = ["Settings", "StopSignal", "parse_models", "prune_sessions"]

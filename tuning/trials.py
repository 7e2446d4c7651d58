"""Fast trials: one model kept in memory, each trial's merge loaded into it, scored task by task.

A search runs many merges of the same sources. Writing each to disk and loading it back would
cost more than the merge, so a ``TrialRunner`` loads one model of the sources' architecture
once (the "shell") and, per trial, streams the engine's own merge (``merging.engine.merged_tensors``:
the same planning, method code, output dtype and checks as ``python -m merging merge``) straight
into the shell's parameters. The shell is then scored with the evaluation's batched greedy
generation, one task at a time, so a trial can be pruned after its first task.

The answer budget is cut to what the suite's answers need (their longest tokenization plus a
margin, at most evaluation's 16 tokens): exact match compares the first line of an answer, and a
first line longer than that cannot equal any expected answer, so scores are unchanged while
generation stops earlier.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from evaluation.scoring import MAX_NEW_TOKENS, STOPPED, generate_answers, is_correct
from evaluation.suites import Example, Suite, load_suite
from merging.adapters import open_reader
from merging.checkpoint import all_finite
from merging.engine import merged_tensors
from merging.errors import CheckpointError, MergeStudioError, check_cancel
from merging.recipe import Recipe
from merging.runtime import cache_root, load_model, pick_device
from merging.sources import SourcePolicy, resolve_model

ANSWER_MARGIN = 4  # tokens past the longest expected answer: quotes, a final period, a newline
BASELINE_VERSION = "1"  # part of the cache key of the sources' scores: bump when scoring changes

TaskFn = Callable[[str, float, int], None]  # (task, accuracy, tasks done) after each task


@dataclass
class TrialScores:
    tasks: dict[str, float]
    seconds_merge: float
    seconds_eval: float


class TrialRunner:
    """Merges recipes of one set of sources into an in-memory model and scores them on suites."""

    def __init__(self, reference: str, *, device: str = "auto", policy: SourcePolicy = SourcePolicy(),
                 cancel: threading.Event | None = None):
        self.device = pick_device(device)
        self.policy = policy
        self.cancel = cancel
        resolved = resolve_model(reference, policy)
        self.model, self.tokenizer = load_model(resolved.folder, device=self.device, allow_pickle=policy.allow_pickle,
                                                purpose="parameter search")
        self.parameters = dict(self.model.named_parameters())
        self._tied = {name for name, tensor in self.model.state_dict().items() if name not in self.parameters}
        self._budgets: dict[int, int] = {}

    # -- loading weights ------------------------------------------------------------------------

    @torch.inference_mode()
    def load_recipe(self, recipe: Recipe, progress=None) -> float:
        """Stream ``recipe``'s merge into the model's parameters; seconds taken."""
        started = time.perf_counter()
        self._assign(merged_tensors(recipe, device=str(self.device), policy=self.policy, cancel=self.cancel,
                                    progress=progress), f"the merge of {recipe.merge_method}")
        return time.perf_counter() - started

    @torch.inference_mode()
    def load_source(self, ref: str) -> None:
        """Load one source model's own weights (a LoRA reference: with its adapter applied)."""
        resolved = resolve_model(ref, self.policy)
        reader = open_reader(resolved, allow_pickle=self.policy.allow_pickle, label=ref)
        try:
            self._assign(((name, reader.get(name)) for name in reader.names()), ref)
        finally:
            reader.close()

    def _assign(self, tensors, what: str) -> None:
        seen = set()
        for name, tensor in tensors:
            check_cancel(self.cancel, "search stopped")
            target = self.parameters.get(name)
            if target is None:
                if name in self._tied or not tensor.is_floating_point():
                    continue  # a tied head the checkpoint stores anyway, or a non-float buffer
                raise CheckpointError(f"{what} has tensor {name}, which the model loaded for the search does not: "
                                      "search over models of one architecture")
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{what}: tensor {name} has shape {list(tensor.shape)}, the model "
                                      f"{list(target.shape)}; search over models of one architecture and vocabulary")
            target.copy_(tensor)
            seen.add(name)
        missing = sorted(set(self.parameters) - seen)
        if missing:
            raise CheckpointError(f"{what} left {len(missing)} parameter(s) unset, e.g. {missing[0]}")
        if not all(all_finite(p) for p in self.parameters.values()):
            raise CheckpointError(f"{what} is not finite")

    # -- scoring --------------------------------------------------------------------------------

    def budget(self, examples: list[Example]) -> int:
        """New tokens to generate for a task: its longest answer's tokens plus a margin (≤ 16); the
        full 16 when an answer may sit anywhere in a sentence (``contains``)."""
        key = hash(tuple((e.answer, e.match) for e in examples))
        if any(e.match == "contains" for e in examples):
            return MAX_NEW_TOKENS
        if key not in self._budgets:
            longest = max(len(self.tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples)
            self._budgets[key] = min(MAX_NEW_TOKENS, longest + ANSWER_MARGIN)
        return self._budgets[key]

    def score(self, suite: Suite, on_task: TaskFn | None = None) -> dict[str, float]:
        """Exact-match accuracy of the loaded weights on each task, in the suite's order;
        ``on_task`` after each (it may raise to stop, as Optuna's pruning does)."""
        out = {}
        for index, (task, examples) in enumerate(suite.items()):
            check_cancel(self.cancel, STOPPED)
            answers = generate_answers(self.model, self.tokenizer, [e.prompt for e in examples], batch_size=len(examples),
                                       max_new_tokens=self.budget(examples), cancel=self.cancel)
            out[task] = sum(is_correct(a, e) for a, e in zip(answers, examples)) / len(examples)
            if on_task is not None:
                on_task(task, out[task], index + 1)
        return out

    def run(self, recipe: Recipe, suite: Suite, on_task: TaskFn | None = None) -> TrialScores:
        seconds_merge = self.load_recipe(recipe)
        started = time.perf_counter()
        tasks = self.score(suite, on_task)
        return TrialScores(tasks, seconds_merge, time.perf_counter() - started)

    # -- the sources' own scores ------------------------------------------------------------------

    def source_scores(self, refs: list[str], suite_name: str, suite: Suite, report=None) -> dict[str, dict[str, float]]:
        """Each source's accuracy per task on ``suite`` (what a merge's scores are normalized by),
        cached on disk by the sources' weight files and the suite's content."""
        out = {}
        for ref in refs:
            path = _baseline_path(ref, suite, self.policy)
            if path is not None and path.is_file():
                out[ref] = json.loads(path.read_text())
                continue
            if report is not None:
                report(f"scoring source {ref} on {suite_name}")
            self.load_source(ref)
            out[ref] = self.score(suite)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                temp = path.with_suffix(".tmp")
                temp.write_text(json.dumps(out[ref]))
                temp.replace(path)
        return out


def load_suites(name: str) -> Suite:
    suite = load_suite(name)
    if not suite:
        raise MergeStudioError(f"suite {name} has no tasks")
    return suite


def _baseline_path(ref: str, suite: Suite, policy: SourcePolicy) -> Path | None:
    """Where a source's scores on a suite are cached: keyed by its weight files (name, size,
    modification time), the suite's examples and the scoring version."""
    try:
        resolved = resolve_model(ref, policy)
    except MergeStudioError:
        return None
    files = sorted(p for p in Path(resolved.folder).iterdir() if p.suffix in (".safetensors", ".bin"))
    if getattr(resolved, "adapter", None) is not None:
        files += sorted(p for p in Path(resolved.adapter).iterdir() if p.suffix in (".safetensors", ".bin"))
    identity = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    content = {task: [(e.prompt, e.answer) for e in examples] for task, examples in suite.items()}
    key = json.dumps([BASELINE_VERSION, identity, content], sort_keys=True)
    return scores_cache() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def scores_cache() -> Path:
    """``$MERGE_STUDIO_TUNING_CACHE``, else ``tuning/`` in the user cache."""
    return Path(os.environ.get("MERGE_STUDIO_TUNING_CACHE") or cache_root() / "tuning").expanduser()

"""Parameter search with Optuna: the study, its objective, and the best recipe scored on the test split.

``tune(spec)`` runs trials of a ``SearchSpec`` in this process, on an Optuna study in any
storage (a journal file by default, so an interrupted search resumes and several worker
processes or machines can share one study); ``run_workers`` starts worker processes on one
storage. Each trial merges in memory (``tuning.trials``), scores the validation suite task by
task and reports the running objective after each task, so Optuna's pruner can stop a hopeless
trial after its first task. The objective:

- ``mean``: the mean over tasks of the merge's accuracy divided by the best source's accuracy on
  that task (raw accuracy for a task no source scores on): 1 keeps every expert's skill.
- ``pareto``: every task's accuracy as its own objective (and perplexity on ``text``, lowered);
  the study keeps the Pareto front; "best" is the front's trial with the highest mean.

Tuning never sees the test split: the best recipe is merged again and scored on ``test_suite``,
normalized by the sources' test scores, and both numbers are reported.
"""

from __future__ import annotations

import math
import re
import os
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from evaluation.perplexity import perplexity
from evaluation.suites import registered_suites
from merging.errors import Cancelled, MergeCancelled, MergeStudioError
from merging.sources import SourcePolicy
from tuning.spec import SearchSpec
from tuning.trials import TrialRunner, load_suites

DEMO_VALIDATION, DEMO_TEST = "zoo-validation", "zoo"
STOPPED = "search stopped; the finished trials are kept in the study"

Report = Callable[[str], None]
TrialFn = Callable[[Any, Any], None]  # (study, frozen trial) after every finished trial

class SearchStopped(MergeCancelled):
    """The user stopped the search (the finished trials are in the study)."""

@dataclass
class TuneResult:
    """What a search found: the best trial, its recipe and scores, and the study's size."""

    study_name: str
    storage: str
    best_value: float | None
    best_params: dict[str, Any]
    best_recipe: str
    validation: dict[str, float]
    trials: int
    test: dict[str, Any] | None = None
    pareto: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    objective: str = "mean"

    def to_json(self) -> dict[str, Any]:
        out = {"best": {"value": self.best_value, "params": self.best_params, "recipe": self.best_recipe,
                        "validation": self.validation},
               "trials": self.trials, "test": self.test, "study": self.study_name, "storage": self.storage,
               "seconds": round(self.seconds, 1)}
        if self.pareto:
            out["pareto"] = self.pareto
        return out

def _optuna():
    # Deferred: optuna takes ~0.3 s to import, and every `python -m merging` command loads this module.
    import optuna
    import optuna.storages.journal  # noqa: F401  (the journal backend is a submodule)

    return optuna

def suites_of(spec: SearchSpec) -> tuple[str, str | None]:
    """(validation suite, test suite): the spec's, else the demo family's validation split and
    its held-out test phrasings when the demo is registered."""
    validation = spec.settings.suite
    names = registered_suites()
    if validation is None:
        if DEMO_VALIDATION not in names:
            raise MergeStudioError("give tune.suite: the validation set to search on (a JSONL file of prompt/answer lines)")
        validation = DEMO_VALIDATION
    test = spec.settings.test_suite
    if test is None and validation == DEMO_VALIDATION and DEMO_TEST in names:
        test = DEMO_TEST
    if test is not None and test == validation:
        raise MergeStudioError("tune.test_suite must differ from tune.suite: tuning never sees the test split")
    return validation, test

def normalized_mean(scores: dict[str, float], best: dict[str, float]) -> float:
    """Mean over tasks of score / best source's score (the raw score where no source scores)."""
    ratios = [scores[t] / best[t] if best.get(t, 0) > 0 else scores[t] for t in scores]
    return sum(ratios) / len(ratios)

def best_by_task(sources: dict[str, dict[str, float]]) -> dict[str, float]:
    tasks = next(iter(sources.values())).keys()
    return {task: max(scores[task] for scores in sources.values()) for task in tasks}

def default_storage(folder: Path) -> str:
    """A journal file in ``folder``: safe for several processes (file locks), no server needed."""
    return str(folder / "study.journal")

def open_storage(storage: str):
    """An Optuna storage from a URL (``sqlite:///``, ``postgresql://``, any RDB URL) or a file path
    (a journal file)."""
    if "://" in storage:
        # heartbeats mark a trial FAIL when its worker machine died, so it does not stay RUNNING
        # forever (Optuna marks the option experimental)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _optuna().exceptions.ExperimentalWarning)
            try:
                return _optuna().storages.RDBStorage(storage, heartbeat_interval=60, grace_period=180)
            except (ImportError, ModuleNotFoundError) as exc:
                raise MergeStudioError(f"storage {storage.split('://')[0]}:// needs a database driver: {exc}") from None
            except Exception as exc:  # SQLAlchemy's errors: a bad URL, an unreachable server
                raise MergeStudioError(f"cannot open the study storage {storage.split('@')[-1]}: "
                                       f"{shown_storage(str(exc).splitlines()[0])}") from None
    path = Path(storage).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)

    return _optuna().storages.JournalStorage(_optuna().storages.journal.JournalFileBackend(str(path)))

def shown_storage(storage: str) -> str:
    """The storage as printed and reported: a database URL without its password."""
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", storage)


def make_sampler(name: str, seed: int):
    if name == "tpe":
        # multivariate TPE models parameters jointly (λ and densities trade off), and ``group`` keeps
        # each method's parameters apart when the method is a choice; Optuna marks both experimental.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _optuna().exceptions.ExperimentalWarning)
            return _optuna().samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=8)
    if name == "cmaes":
        return _optuna().samplers.CmaEsSampler(seed=seed, n_startup_trials=8, warn_independent_sampling=False)
    if name == "nsga2":
        return _optuna().samplers.NSGAIISampler(seed=seed)
    return _optuna().samplers.RandomSampler(seed=seed)

def make_pruner(name: str):
    if name == "median":
        # A trial below the median of earlier trials after the same number of tasks stops there.
        return _optuna().pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    return _optuna().pruners.NopPruner()

def open_study(spec: SearchSpec, storage: str, study_name: str, *, worker: int = 0):
    # errors reach the caller as exceptions, and a trial stopped by the user is not a warning
    _optuna().logging.set_verbosity(_optuna().logging.ERROR)
    directions = ["maximize"]
    if spec.settings.objective == "pareto":
        validation, _ = suites_of(spec)
        tasks = list(load_suites(validation))
        directions = ["maximize"] * len(tasks) + (["minimize"] if spec.settings.text else [])
    study = _optuna().create_study(storage=open_storage(storage), study_name=study_name, load_if_exists=True,
                                   directions=directions, pruner=make_pruner(spec.settings.pruner))
    # The sampler's seed moves on with the study: a resumed search (or another worker) seeded as
    # the first run was would draw the first run's random start-up trials again.
    held = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(spec.settings.sampler, spec.settings.seed + 1_000_003 * worker + held)
    return study

class Search:
    """One process's part of a search: the runner, the suites, the sources' scores and the study."""

    def __init__(self, spec: SearchSpec, storage: str, study_name: str, *, device: str = "auto",
                 policy: SourcePolicy = SourcePolicy(), cancel: threading.Event | None = None,
                 report: Report | None = None, worker: int = 0):
        self.spec, self.cancel, self.report = spec, cancel, report or (lambda message: None)
        self.validation_name, self.test_name = suites_of(spec)
        self.validation = load_suites(self.validation_name)  # a bad suite fails before any model loads
        self.test = load_suites(self.test_name) if self.test_name else None
        if self.test is not None and set(self.test) != set(self.validation):
            raise MergeStudioError(f"the test suite {self.test_name} has tasks {sorted(self.test)}, the validation suite "
                                   f"{self.validation_name} {sorted(self.validation)}: give them the same tasks")
        self.study = open_study(spec, storage, study_name, worker=worker)
        self.storage, self.study_name = storage, study_name
        first = spec.first_recipe(spec.methods[0])
        self.sources = [entry.model for entry in first.models if entry.model != first.base_model]
        self.report(f"loading {first.base_model or first.models[0].model} to merge into")
        self.runner = TrialRunner(first.base_model or first.models[0].model, device=device, policy=policy, cancel=cancel)
        self.text = None
        if spec.settings.text:
            try:
                self.text = Path(spec.settings.text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise MergeStudioError(f"cannot read tune.text {spec.settings.text}: {exc}") from None
        self.best = best_by_task(self.runner.source_scores(self.sources, self.validation_name, self.validation, self.report))

    def objective(self, trial):
        """One trial: draw, merge in memory, score task by task (pruned early when hopeless)."""
        recipe = self.spec.suggest(trial)
        pareto = self.spec.settings.objective == "pareto"

        partial: dict[str, float] = {}  # the tasks scored so far

        def on_task(task: str, accuracy: float, done: int) -> None:
            partial[task] = accuracy
            if pareto:
                return  # Optuna prunes single-objective studies only
            trial.report(normalized_mean(partial, self.best), done)
            if done < len(self.validation) and trial.should_prune():  # a fully scored trial is kept
                trial.set_user_attr("tasks", dict(partial))
                raise _optuna().TrialPruned(f"after {task}")

        try:
            scores = self.runner.run(recipe, self.validation, on_task)
        except Cancelled:  # in the merge or the scoring: the trial is recorded as failed, marked stopped
            trial.set_user_attr("stopped", True)
            raise SearchStopped(STOPPED) from None
        trial.set_user_attr("tasks", scores.tasks)
        trial.set_user_attr("seconds", round(scores.seconds_merge + scores.seconds_eval, 2))
        trial.set_user_attr("recipe", recipe.to_yaml())
        mean = normalized_mean(scores.tasks, self.best)
        trial.set_user_attr("mean", mean)
        if not pareto:
            return mean
        values = [scores.tasks[t] for t in self.validation]
        if self.text is not None:
            values.append(perplexity(self.runner.model, self.runner.tokenizer, self.text, cancel=self.cancel))
        return values

    def optimize(self, trials: int, on_trial: TrialFn | None = None) -> None:
        """Run ``trials`` more trials here (fewer when stopped)."""
        def stop_when_asked(study, trial):
            if on_trial is not None:
                on_trial(study, trial)
            if self.cancel is not None and self.cancel.is_set():
                study.stop()  # before the next trial starts

        try:
            self.study.optimize(self.objective, n_trials=trials, callbacks=[stop_when_asked], catch=(),
                                gc_after_trial=False)
        except SearchStopped:
            pass
        except _optuna().exceptions.OptunaError as exc:
            raise MergeStudioError(f"the search's study failed: {exc}") from None

    def result(self, started: float) -> TuneResult:
        """The best trial so far, its recipe scored on the test split (when there is one)."""
        done = [t for t in self.study.get_trials(deepcopy=False) if t.state == _optuna().trial.TrialState.COMPLETE]
        if not done:
            raise MergeStudioError("no trial finished: nothing to report (run more trials, or check the messages above)")
        if self.spec.settings.objective == "pareto":
            front = self.study.best_trials
            best = max(front, key=lambda t: t.user_attrs.get("mean", 0.0))
            value = best.user_attrs.get("mean")
            pareto = [{"number": t.number, "values": t.values, "params": t.params} for t in front]
        else:
            best, pareto = self.study.best_trial, []
            value = best.value
        recipe = self.spec.recipe_for(best.params)
        test = None
        if self.test is not None and not (self.cancel is not None and self.cancel.is_set()):
            self.report(f"scoring the best recipe (trial {best.number}) on the test split {self.test_name}")
            test_best = best_by_task(self.runner.source_scores(self.sources, self.test_name, self.test, self.report))
            scores = self.runner.run(recipe, self.test)
            test = {"suite": self.test_name, "tasks": scores.tasks, "value": normalized_mean(scores.tasks, test_best),
                    "sources": test_best}
        return TuneResult(self.study_name, shown_storage(self.storage), value, dict(best.params), recipe.to_yaml(),
                          dict(best.user_attrs.get("tasks", {})), len(self.study.get_trials(deepcopy=False)), test, pareto,
                          time.perf_counter() - started, self.spec.settings.objective)

def tune(spec: SearchSpec, *, storage: str, study_name: str, trials: int | None = None, device: str = "auto",
         policy: SourcePolicy = SourcePolicy(), cancel: threading.Event | None = None, report: Report | None = None,
         on_trial: TrialFn | None = None) -> TuneResult:
    """Run ``trials`` (default: the spec's) more trials of ``spec`` in this process on the study
    ``study_name`` in ``storage``, then score the best recipe on the test split."""
    started = time.perf_counter()
    search = Search(spec, storage, study_name, device=device, policy=policy, cancel=cancel, report=report)
    search.optimize(spec.settings.trials if trials is None else trials, on_trial)
    return search.result(started)

def run_workers(spec_path: Path, *, storage: str, study_name: str, trials: int, jobs: int, device: str,
                report: Report) -> None:
    """Run ``trials`` trials of one study in ``jobs`` worker processes (``python -m merging tune
    --worker``), each with its share of the trials and of the CPU's threads."""
    shares = [trials // jobs + (1 if i < trials % jobs else 0) for i in range(jobs)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    processes = []
    for index, share in enumerate(s for s in shares if s > 0):
        command = [sys.executable, "-m", "merging", "tune", str(spec_path), "--storage", storage, "--study", study_name,
                   "--trials", str(share), "--device", device, "--worker", str(index + 1)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        processes.append(subprocess.Popen(command, env=env))
    report(f"{len(processes)} worker processes, {trials} trials, {threads} thread(s) each")
    failed = [p.wait() for p in processes]
    if any(code != 0 for code in failed):
        raise MergeStudioError(f"{sum(code != 0 for code in failed)} worker process(es) failed; their messages are above")

def describe_trial(trial, total: int | None = None) -> str:
    """One progress line for a finished trial."""
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    tasks = " ".join(f"{t} {v:.0%}" for t, v in trial.user_attrs.get("tasks", {}).items())
    count = f"/{total}" if total else ""
    if trial.state == _optuna().trial.TrialState.PRUNED:
        return f"trial {trial.number}{count} pruned ({tasks}): {params}"
    if trial.state != _optuna().trial.TrialState.COMPLETE:
        state = "stopped" if trial.user_attrs.get("stopped") else trial.state.name.lower()
        return f"trial {trial.number}{count} {state}: {params}"
    value = trial.user_attrs.get("mean", trial.value if trial.values and len(trial.values) == 1 else None)
    seconds = trial.user_attrs.get("seconds")
    timing = f" in {seconds:.1f} s" if seconds else ""
    return f"trial {trial.number}{count}: {value:.3f} ({tasks}){timing}: {params}"

def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)

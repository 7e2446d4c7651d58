"""``python -m merging tune SPEC.yaml``: search a merge's parameters on a validation set.

Progress goes to stderr, one line per trial. The best recipe is written as a plain recipe
(``best.yaml`` in the search folder, which ``python -m merging merge`` runs); ``--out`` also
merges it there. The study lives in a journal file in the search folder (``SPEC.tune/`` beside
the spec) unless ``--storage`` names another, so running the same command again resumes it,
adding ``--trials`` more.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from merging.cli import Command
from merging.engine import merge
from merging.errors import MergeStudioError
from merging.methods import load_plugins
from merging.recipe import recipe_from_text
from merging.sources import SourcePolicy
from tuning.search import Search, default_storage, describe_trial, run_workers, shown_storage, tune
from tuning.spec import load_search_spec


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="search spec: a recipe whose values may be ranges, plus a tune: section")
    parser.add_argument("--trials", type=int, default=None, help="trials to add to the study (default: the spec's tune.trials)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage: a journal file path, or an RDB URL (sqlite:///x.db, postgresql://...) that "
                             "workers on many machines share (default: study.journal in the search folder)")
    parser.add_argument("--study", default=None, help="study name (default: the spec's name and a hash of its search space)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes here, sharing the study (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="merge the best recipe into this folder (must not exist)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--allow-pickle", action="store_true", help="also read pytorch_model.bin checkpoints (trusted files only)")
    parser.add_argument("--json", action="store_true",
                        help='print {"best": {"value", "params", "recipe"}, "trials": N, "test": {...}}')
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # a process started by --jobs


def search_folder(spec: Path) -> Path:
    """Where the study and the best recipe go: ``SPEC.tune/`` beside the spec, so the same command
    finds its study again (with or without ``--out``)."""
    return spec.parent / f"{spec.stem}.tune"


def cmd_tune(args) -> int:
    load_plugins()
    spec = load_search_spec(args.spec)
    if args.trials is not None and args.trials < 0:
        raise MergeStudioError("--trials must be 0 or more")
    if args.jobs < 1:
        raise MergeStudioError("--jobs must be 1 or more")
    if args.out is not None and args.out.exists():
        raise MergeStudioError(f"output folder {args.out} already exists; choose a new one")  # before minutes of search
    folder = search_folder(args.spec)
    storage = args.storage or default_storage(folder)
    study = args.study or f"{args.spec.stem}-{spec.fingerprint()}"
    trials = spec.settings.trials if args.trials is None else args.trials

    def report(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    policy = SourcePolicy(allow_pickle=args.allow_pickle)
    if args.worker:
        search = Search(spec, storage, study, device=args.device, policy=policy, report=report, worker=args.worker)
        search.optimize(trials, lambda s, t: report(f"[worker {args.worker}] {describe_trial(t)}"))
        return 0
    report(f"study {study} in {shown_storage(storage)}; searching " + "; ".join(spec.describe()))
    if args.jobs > 1 and trials > 0:
        run_workers(args.spec, storage=storage, study_name=study, trials=trials, jobs=args.jobs, device=args.device,
                    report=report)
        trials = 0
    result = tune(spec, storage=storage, study_name=study, trials=trials, device=args.device, policy=policy,
                  report=report, on_trial=lambda s, t: report(describe_trial(t)))
    folder.mkdir(parents=True, exist_ok=True)
    best_path = folder / "best.yaml"
    best_path.write_text(result.best_recipe, encoding="utf-8")
    report(f"best of {result.trials} trials: {result.best_value:.3f} on {spec.settings.suite or 'the validation split'}"
           + (f", {result.test['value']:.3f} on the test split {result.test['suite']}" if result.test else "")
           + f"; recipe in {best_path}")
    if args.out is not None:
        merged = merge(recipe_from_text(result.best_recipe), args.out, device=args.device, policy=policy)
        report(f"merged the best recipe in {merged.seconds:.1f} s -> {merged.output}")
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.best_recipe, end="")
    return 0


TUNE = Command("tune", "search a merge's parameters on a validation set (Optuna)", _arguments, cmd_tune,
               "the finished trials are kept in the study; run the same command to resume")

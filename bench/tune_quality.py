"""Default parameters against tuned ones on the demo family: validation and test scores.

For task arithmetic, TIES, DARE-TIES and Iso-C (the subspace method that scored best in the
quality table), merges the method at its suggested settings and runs a search of its
parameters (``tuning.search``: TPE, median pruning, trials merged in memory) on the demo's
validation split (``zoo-validation``, a phrasing of each fact that neither training nor the
test split uses). The best recipe is then scored on the test split (``zoo``, the held-out
phrasings of the quality table). Scores are average normalized accuracy: each task's accuracy
divided by its expert's, averaged.

    python bench/tune_quality.py --json tune.json            # 4 searches of 30 trials: ~19 min here
    python bench/tune_quality.py --trials 5 --methods ties   # a quick look
    python bench/tune_quality.py --json tune.json --readme   # also rewrite the README's table
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import demo  # noqa: E402
from merging.recipe import load_recipe  # noqa: E402
from tuning.search import Search, best_by_task, normalized_mean  # noqa: E402
from tuning.spec import load_search_spec  # noqa: E402

WEIGHT = {"min": 0.1, "max": 1.5}


def searches(family: dict) -> list[tuple[str, str, dict, dict, dict]]:
    """(label, method, suggested per-model parameters, suggested global ones, searched space)."""
    return [
        ("task arithmetic", "task_arithmetic", {"weight": 0.4}, {},
         {"models": {"weight": WEIGHT}, "parameters": {}}),
        ("TIES", "ties", {"weight": 1.0, "density": 0.3}, {},
         {"models": {"weight": WEIGHT, "density": "tune"}, "parameters": {"lambda": "tune"}}),
        ("DARE-TIES", "dare_ties", {"weight": 1.0, "density": 0.3}, {},
         {"models": {"weight": WEIGHT, "density": "tune"}, "parameters": {"lambda": "tune"}}),
        ("Iso-C", "iso_c", {"weight": 1.0}, {"lambda": 1.5},
         {"models": {"weight": WEIGHT}, "parameters": {"lambda": {"min": 0.5, "max": 3.0}}}),
    ]


def spec_for(family: dict, method: str, space: dict, trials: int, seed: int) -> dict:
    return {"merge_method": method, "base_model": str(family["base"]),
            "models": [{"model": str(family[name]), "parameters": dict(space["models"])} for name in demo.EXPERTS],
            "parameters": dict(space["parameters"]),
            "tune": {"suite": "zoo-validation", "test_suite": "zoo", "sampler": "tpe", "trials": trials, "seed": seed}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", help="comma-separated methods (default: all four)")
    parser.add_argument("--json", type=Path, help="write all numbers as JSON here")
    parser.add_argument("--readme", action="store_true", help="rewrite the table between the README's tune markers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: this machine's cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    family = demo.ensure_family(lambda message: print(message, file=sys.stderr))
    chosen = set(args.methods.split(",")) if args.methods else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="tune-quality-") as tmp:
        for label, method, per_model, global_params, space in searches(family):
            if chosen is not None and method not in chosen:
                continue
            spec = load_search_spec(spec_for(family, method, space, args.trials, args.seed))
            search = Search(spec, str(Path(tmp) / f"{method}.journal"), method, device="cpu",
                            report=lambda message: print(message, file=sys.stderr))
            test_best = best_by_task(search.runner.source_scores(search.sources, "zoo", search.test))
            default = load_recipe({"merge_method": method, "base_model": str(family["base"]), "parameters": global_params,
                                   "models": [{"model": str(family[n]), "parameters": per_model} for n in demo.EXPERTS]})
            default_validation = search.runner.run(default, search.validation).tasks
            default_test = search.runner.run(default, search.test).tasks
            started = time.perf_counter()
            search.optimize(args.trials, lambda study, trial: print(f"{label}: trial {trial.number} {trial.state.name} "
                                                                    f"{trial.user_attrs.get('tasks')}", file=sys.stderr))
            seconds = time.perf_counter() - started
            result = search.result(started)
            trials = search.study.get_trials(deepcopy=False)
            row = {
                "label": label, "method": method,
                "default": {"validation": normalized_mean(default_validation, search.best),
                            "test": normalized_mean(default_test, test_best),
                            "tasks_test": default_test},
                "tuned": {"validation": result.best_value, "test": result.test["value"], "tasks_test": result.test["tasks"],
                          "params": result.best_params, "recipe": result.best_recipe},
                "trials": len(trials), "pruned": sum(t.state.name == "PRUNED" for t in trials),
                "search_seconds": seconds, "seconds_per_trial": seconds / max(1, len(trials)),
            }
            rows.append(row)
            print(json.dumps(row, default=str), file=sys.stderr)
    table = ["| method | default: validation | default: test | tuned: validation | tuned: test | trials (pruned) | search min | s/trial |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['label']} | {r['default']['validation']:.0%} | {r['default']['test']:.0%} | "
                     f"{r['tuned']['validation']:.0%} | {r['tuned']['test']:.0%} | {r['trials']} ({r['pruned']}) | "
                     f"{r['search_seconds'] / 60:.1f} | {r['seconds_per_trial']:.1f} |")
    text = "\n".join(table)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    if args.readme:
        readme = REPO / "README.md"
        content = readme.read_text(encoding="utf-8")
        start, end = "<!-- tune-table -->", "<!-- /tune-table -->"
        if start in content and end in content:
            content = content[: content.index(start)] + f"{start}\n{text}\n{end}" + content[content.index(end) + len(end):]
            readme.write_text(content, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

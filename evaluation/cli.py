"""``python -m merging eval MODEL``: task accuracy and perplexity of a model folder; task accuracy
of a served model (``openai:<base URL>#<model>``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation.harness import run_lm_eval
from evaluation.run import evaluate
from evaluation.suites import default_suite, registered_suites
from merging.cli import Command
from merging.endpoints import check_endpoint_access, is_endpoint
from merging.errors import MergeStudioError


def _arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(f"'{name}' ({suite.description})" for name, suite in registered_suites().items())
    parser.add_argument("model_dir", help="a model folder, or a served model: openai:<base URL>#<model name>")
    parser.add_argument("--suite", default=default_suite(),
                        help=f"a JSONL file of {{prompt, answer[, task]}} lines, or a registered suite: {names or 'none'} "
                             f"(default: {default_suite() or 'none'})")
    parser.add_argument("--text", type=Path, default=None, help="a UTF-8 text file to measure perplexity on")
    parser.add_argument("--general", action="store_true",
                        help="also measure general ability (out of distribution) with the suite's general companions: "
                             "questions the base answers and, without --text, perplexity on a general text (zoo has them)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also load pytorch_model.bin checkpoints (only for files you trust)")
    parser.add_argument("--lm-eval", default=None, metavar="TASKS",
                        help="run lm-evaluation-harness instead: comma-separated tasks, a suite's name (its tasks, "
                             "scored as here) or lm-eval's own task names (pip install lm_eval)")
    parser.add_argument("--limit", type=int, default=None, help="with --lm-eval: at most this many examples per task")
    parser.add_argument("--json", action="store_true", help="print {\"tasks\": {name: accuracy}, \"perplexity\": ...}")


def cmd_eval(args) -> int:
    if is_endpoint(args.model_dir):
        check_endpoint_access(args.model_dir, None)  # a malformed reference says how to write one
    elif not Path(args.model_dir).is_dir():
        raise MergeStudioError(f"model folder {args.model_dir} not found")
    if args.lm_eval:
        tasks = [task.strip() for task in args.lm_eval.split(",") if task.strip()]
        scores = run_lm_eval(args.model_dir, tasks, device=args.device, limit=args.limit)
        if args.json:
            print(json.dumps({"tasks": {k: round(v, 4) for k, v in scores.items()}, "perplexity": None}))
        for name, accuracy in scores.items() if not args.json else ():
            print(f"{name}: {accuracy:.1%} exact match (lm-evaluation-harness)")
        return 0
    if args.suite is None and args.text is None:
        raise MergeStudioError("nothing to measure: give --suite (a JSONL file of {prompt, answer}) or --text")
    result = evaluate(args.model_dir, suite=args.suite, text=args.text, device=args.device, general=args.general,
                      allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(result.summary()))
        return 0
    for name, accuracy in result.tasks.items():
        print(f"{name}: {accuracy:.1%} correct")
    for name, accuracy in result.general.items():
        print(f"general, {name}: {accuracy:.1%} (out of distribution)")
    if result.perplexity is not None:
        print(f"perplexity: {result.perplexity:.3f}")
    return 0


EVAL = Command("eval", "task accuracy and perplexity of a model folder (or task accuracy of a served model)", _arguments, cmd_eval, "nothing was measured")

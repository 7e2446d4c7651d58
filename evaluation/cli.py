"""``python -m merging eval MODEL``: task accuracy and perplexity of a model folder; task accuracy
of a served model (``openai:<base URL>#<model>``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    parser.add_argument("--device", default="auto")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also load pytorch_model.bin checkpoints (only for files you trust)")
    parser.add_argument("--json", action="store_true", help="print {\"tasks\": {name: accuracy}, \"perplexity\": ...}")


def cmd_eval(args) -> int:
    if is_endpoint(args.model_dir):
        check_endpoint_access(args.model_dir, None)  # a malformed reference says how to write one
    elif not Path(args.model_dir).is_dir():
        raise MergeStudioError(f"model folder {args.model_dir} not found")
    if args.suite is None and args.text is None:
        raise MergeStudioError("nothing to measure: give --suite (a JSONL file of {prompt, answer}) or --text")
    result = evaluate(args.model_dir, suite=args.suite, text=args.text, device=args.device, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(result.summary()))
        return 0
    for name, accuracy in result.tasks.items():
        print(f"{name}: {accuracy:.1%} exact match")
    if result.perplexity is not None:
        print(f"perplexity: {result.perplexity:.3f}")
    return 0


EVAL = Command("eval", "task accuracy and perplexity of a model folder (or task accuracy of a served model)", _arguments, cmd_eval, "nothing was measured")

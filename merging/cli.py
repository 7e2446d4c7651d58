"""``python -m merging``: merge from a mergekit-style YAML recipe, list methods.

Errors print one line ``error: ...`` (what is wrong and how to fix it) and exit 1; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from merging.errors import MergeStudioError
from merging.methods import REGISTRY
from merging.methods.spec import REQUIRED


DEBUG = dict(action="store_true", help="show tracebacks instead of one-line errors")


def add_debug(parser: argparse.ArgumentParser, commands) -> None:
    """``--debug`` before the command and after it, on each of ``commands`` (its subparsers):
    SUPPRESS leaves a ``--debug`` given before the command in place when none follows it."""
    for command in commands.choices.values():
        command.add_argument("--debug", default=argparse.SUPPRESS, **DEBUG)


def run_command(handler, args, interrupted: str) -> int:
    """``handler(args)``, with bad input as one ``error: ...`` line and exit status 1 (``--debug``:
    the traceback), and Ctrl-C as ``error: interrupted; <interrupted>`` and 130."""
    try:
        return handler(args)
    except MergeStudioError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; {interrupted}", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m merging", description="Merge fine-tuned models of one architecture.")
    parser.add_argument("--debug", **DEBUG)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("merge", help="merge the models of a YAML recipe into a new checkpoint")
    run.add_argument("recipe", type=Path, help="recipe YAML (mergekit schema)")
    run.add_argument("out_dir", type=Path, help="output folder (must not exist unless --overwrite)")
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    run.add_argument("--seed", type=int, default=None, help="seed for random steps (DARE); overrides the recipe's")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    run.add_argument("--allow-pickle", action="store_true",
                     help="also read pytorch_model.bin checkpoints (torch.load weights_only=True); only for trusted files")
    run.add_argument("--shard-size", default="2GB", help="maximum shard size, e.g. 2GB or 500MB")
    run.add_argument("--json", action="store_true", help="print the result summary as JSON")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    zoo = commands.add_parser("zoo", help="build the demo family (base + experts) in the user cache")
    zoo.add_argument("--list", action="store_true",
                     help="print the folders of the base and each expert (this is also what a plain run prints)")
    zoo.add_argument("--train", action="store_true", help="retrain the experts' LoRA adapters first (minutes on a CPU)")
    zoo.add_argument("--steps", type=int, default=None, help="training steps per expert with --train (default 90)")

    evaluate = commands.add_parser("eval", help="task accuracy and perplexity of a model folder")
    evaluate.add_argument("model_dir", type=Path)
    evaluate.add_argument("--suite", default="zoo", help="'zoo' (the demo tasks) or a JSONL file of {prompt, answer}")
    evaluate.add_argument("--text", type=Path, default=None, help="a UTF-8 text file to measure perplexity on")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", action="store_true", help="print {\"tasks\": {name: accuracy}, \"perplexity\": ...}")

    methods = commands.add_parser("methods", help="list merge methods with their parameters, defaults and ranges")
    methods.add_argument("--markdown", action="store_true", help="print the README's methods table")
    add_debug(parser, commands)
    return parser


def cmd_merge(args) -> int:
    from tqdm import tqdm

    from merging.engine import merge
    from merging.recipe import load_recipe
    from merging.sources import SourcePolicy

    recipe = load_recipe(args.recipe)
    if args.seed is not None:
        recipe.seed = args.seed
    bar = None

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="tensor", desc=f"{recipe.merge_method}", disable=True if args.quiet else None)  # None: off when stderr is not a terminal
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.update(done - bar.n)

    calibration_bars: dict[str, tqdm] = {}

    def calibration_progress(ref: str, done: int, total: int) -> None:
        if ref not in calibration_bars:
            calibration_bars[ref] = tqdm(total=total, unit="example", desc=f"calibrating {ref[-40:]}",
                                         disable=True if args.quiet else None)
        calibration_bars[ref].update(done - calibration_bars[ref].n)

    try:
        result = merge(
            recipe, args.out_dir, device=args.device, overwrite=args.overwrite, shard_size=args.shard_size,
            policy=SourcePolicy(allow_pickle=args.allow_pickle), progress=progress,
            calibration_progress=calibration_progress,
        )
    finally:
        for open_bar in [*calibration_bars.values(), bar]:
            if open_bar is not None:
                open_bar.close()
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print(f"merged {result.tensors} tensors with {result.method} in {result.seconds:.1f} s -> {result.output}")
    return 0


def cmd_zoo(args) -> int:
    from merging import zoo

    def report(message: str) -> None:  # progress on stderr; stdout lists the folders
        print(message, file=sys.stderr)

    if args.train:
        zoo.train_adapters(steps=args.steps, report=report)
    family = zoo.ensure_family(report)
    for name, folder in family.items():
        print(f"{name}\t{folder}")
    return 0


def cmd_eval(args) -> int:
    from merging.evaluate import evaluate

    if not args.model_dir.is_dir():
        raise MergeStudioError(f"model folder {args.model_dir} not found")
    result = evaluate(args.model_dir, suite=args.suite, text=args.text, device=args.device)
    if args.json:
        print(json.dumps(result.summary()))
        return 0
    for name, accuracy in result.tasks.items():
        print(f"{name}: {accuracy:.1%} exact match")
    if result.perplexity is not None:
        print(f"perplexity: {result.perplexity:.3f}")
    return 0


def methods_markdown() -> str:
    """The README's methods table, generated from the registered specs so docs never drift."""
    rows = ["| method | what it does | parameters (per model / global, default) |", "|---|---|---|"]
    for name, method in REGISTRY.items():
        spec = method.spec
        params = ", ".join(
            f"`{p.name}`{'' if p.scope == 'global' else ' (per model)'} = {str(p.default).lower()}"
            for p in spec.params if p.name != "int8_mask"
        )
        rows.append(f"| [`{name}`]({spec.paper}) | {spec.summary} | {params} |")
    return "\n".join(rows)


def cmd_methods(args) -> int:
    if args.markdown:
        print(methods_markdown())
        return 0
    for name, method in REGISTRY.items():
        spec = method.spec
        print(f"{name}: {spec.title} — {spec.summary}")
        print(f"  paper: {spec.paper}")
        needs = "needs base_model" if spec.needs_base else "base_model optional"
        count = f"{spec.min_models}..{spec.max_models or 'n'} models"
        data = f"; each model needs 'calibration' text ({spec.calibration})" if spec.calibration else ""
        print(f"  {needs}; {count}{data}")
        for param in spec.params:
            default = "required" if param.default is REQUIRED else f"default {param.default}"
            where = "per model" if param.scope == "model" else "global"
            print(f"  - {param.name} ({param.kind.__name__}, {where}, {default}, range {param.range_text()}): {param.help}")
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"merge": cmd_merge, "methods": cmd_methods, "zoo": cmd_zoo, "eval": cmd_eval}[args.command]
    return run_command(handler, args, "no output folder was written")

"""The engine's command line: ``merge`` and ``methods``, and the machinery every CLI shares.

A command is a ``Command`` (name, arguments, handler); ``main`` runs a list of them.
``python -m merging`` (``merging/__main__.py``) adds the ``eval`` and ``zoo`` commands of the
packages above the engine. Errors print one line ``error: ...`` (what is wrong and how to fix
it) and exit 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from merging import hub
from merging.engine import merge
from merging.errors import MergeStudioError
from merging.methods import REGISTRY, REQUIRED, load_plugins
from merging.model_card import recipe_of
from merging.recipe import load_stages
from merging.sources import SourcePolicy
from merging.stages import final_stage, merge_stages


@dataclass(frozen=True)
class Command:
    """One subcommand: ``configure(parser)`` adds its arguments, ``run(args)`` returns the exit status."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    interrupted: str = "nothing was written"  # what Ctrl-C left behind, said after "interrupted; "


DEBUG = dict(action="store_true", help="show tracebacks instead of one-line errors")


def add_debug(parser: argparse.ArgumentParser, commands) -> None:
    """``--debug`` before the command and after it, on each of ``commands`` (its subparsers):
    SUPPRESS leaves a ``--debug`` given before the command in place when none follows it."""
    for command in commands.choices.values():
        command.add_argument("--debug", default=argparse.SUPPRESS, **DEBUG)


def run_command(handler, args, interrupted: str) -> int:
    """``handler(args)``, with bad input as one ``error: ...`` line and exit status 1 (``--debug``:
    the traceback), and Ctrl-C as ``error: interrupted; <interrupted>`` and 130. Hub downloads
    show their progress on stderr (``--quiet``: not)."""
    try:
        with showing_downloads(getattr(args, "quiet", False)):
            return handler(args)
    except MergeStudioError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; {interrupted}", file=sys.stderr)
        return 130


def build_parser(commands: list[Command], prog: str = "python -m merging",
                 description: str = "Merge fine-tuned models of one architecture.") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--debug", **DEBUG)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in commands:
        command.configure(subparsers.add_parser(command.name, help=command.help))
    add_debug(parser, subparsers)
    return parser


def _merge_arguments(run: argparse.ArgumentParser) -> None:
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
    run.add_argument("--strict", action="store_true",
                     help="keys mergekit ignores (typos, parameters a method does not read) are errors, not warnings")
    run.add_argument("--intermediate-dir", type=Path, default=None,
                     help="multi-stage recipes: where named stages are merged (default: OUT_DIR-stages beside the output)")


def _recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a merged model: a local folder or a Hub id org/name[@revision]")


def cmd_recipe(args) -> int:
    """Print the recipe a merged model was made with (to run again: python -m merging merge)."""
    print(recipe_of(args.model).rstrip())
    return 0


def _methods_arguments(methods: argparse.ArgumentParser) -> None:
    methods.add_argument("--markdown", action="store_true", help="print the README's methods table")


@contextlib.contextmanager
def showing_downloads(quiet: bool = False, every_s: float = 2.0):
    """Hub downloads in the block print their progress on stderr: a byte bar with the rate on a
    terminal, else (a log, a pipe) one line every ``every_s`` seconds and one when each repo is done."""
    # Deferred: tqdm is only needed once something downloads (and tqdm pulls in more than it looks).
    from tqdm import tqdm

    if quiet:
        yield
        return
    bars: dict[str, tqdm] = {}
    terminal = sys.stderr.isatty()

    def show(state: hub.DownloadProgress) -> None:
        if not terminal:
            print(state.describe(), file=sys.stderr, flush=True)
            return
        bar = bars.get(state.repo)
        if bar is None:
            bar = bars[state.repo] = tqdm(total=state.total, unit="B", unit_scale=True, desc=f"downloading {state.repo}")
        bar.total = state.total
        bar.update(state.done - bar.n)

    try:
        with hub.watching(show, every_s=every_s if not terminal else 0.2):
            yield
    finally:
        for bar in bars.values():
            bar.close()


def cmd_merge(args) -> int:
    # Deferred: tqdm is only needed once a merge runs (and tqdm pulls in more than it looks).
    from tqdm import tqdm

    load_plugins()  # a recipe may name a method from $MERGE_STUDIO_PLUGINS
    stages = load_stages(args.recipe, strict=args.strict)
    for stage in stages:
        for warning in stage.warnings:
            print(f"warning: {f'stage {stage.name!r}: ' if len(stages) > 1 and stage.name else ''}{warning}",
                  file=sys.stderr)
        if args.seed is not None:
            stage.seed = args.seed
    bar = None
    current = {"stage": final_stage(stages).merge_method}

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="tensor", desc=current["stage"], disable=True if args.quiet else None)  # None: off when stderr is not a terminal
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.update(done - bar.n)

    def next_stage(name: str, index: int, count: int) -> None:
        nonlocal bar
        if bar is not None:
            bar.close()
            bar = None
        current["stage"] = f"stage {index + 1}/{count} {name}"

    calibration_bars: dict[str, tqdm] = {}

    def calibration_progress(ref: str, done: int, total: int) -> None:
        if ref not in calibration_bars:
            calibration_bars[ref] = tqdm(total=total, unit="example", desc=f"calibrating {ref[-40:]}",
                                         disable=True if args.quiet else None)
        calibration_bars[ref].update(done - calibration_bars[ref].n)

    options = dict(device=args.device, overwrite=args.overwrite, shard_size=args.shard_size,
                   policy=SourcePolicy(allow_pickle=args.allow_pickle), progress=progress,
                   calibration_progress=calibration_progress)
    try:
        if len(stages) == 1:
            result = merge(stages[0], args.out_dir, **options)
        else:
            result = merge_stages(stages, args.out_dir, intermediate_dir=args.intermediate_dir, progress_stage=next_stage,
                                  **options)
    finally:
        for open_bar in [*calibration_bars.values(), bar]:
            if open_bar is not None:
                open_bar.close()
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print(f"merged {result.tensors} tensors with {result.method} in {result.seconds:.1f} s -> {result.output}")
    return 0


def methods_markdown() -> str:
    """The README's methods table, generated from the registered specs so docs never drift."""
    rows = ["| method | what it does | parameters (per model / global, default) |", "|---|---|---|"]
    for name, method in REGISTRY.items():
        spec = method.spec
        params = ", ".join(
            f"`{p.name}`{'' if p.scope == 'global' else ' (per model)'}"
            + (" (required)" if p.required else f" = {str(p.default).lower()}")
            for p in spec.params if not p.hidden
        )
        summary = spec.summary.replace("|", "\\|")  # |x| in a formula would end the table cell
        rows.append(f"| [`{name}`]({spec.paper}) | {summary} | {params} |")
    return "\n".join(rows)


def cmd_methods(args) -> int:
    load_plugins()
    if args.markdown:
        print(methods_markdown())
        return 0
    for name, method in REGISTRY.items():
        spec = method.spec
        print(f"{name}: {spec.title} — {spec.summary}")
        print(f"  paper: {spec.paper}")
        needs = "needs base_model" if spec.needs_base else "base_model optional"
        count = f"{spec.min_models}..{spec.max_models or 'n'} models"
        data = f"; each model needs 'calibration' text, for {spec.calibration.description}" if spec.calibration else ""
        print(f"  {needs}; {count}{data}")
        for param in spec.params:
            default = "required" if param.default is REQUIRED else f"default {param.default}"
            where = "per model" if param.scope == "model" else "global"
            print(f"  - {param.name} ({param.kind.__name__}, {where}, {default}, range {param.range_text()}): {param.help}")
        print()
    return 0


MERGE = Command("merge", "merge the models of a YAML recipe into a new checkpoint", _merge_arguments, cmd_merge,
                "no output folder was written")
METHODS = Command("methods", "list merge methods with their parameters, defaults and ranges", _methods_arguments,
                  cmd_methods)
RECIPE = Command("recipe", "print the recipe a merged model was made with (its mergekit_config.yml or model card)",
                 _recipe_arguments, cmd_recipe)
COMMANDS = [MERGE, METHODS, RECIPE]


def main(argv: list[str] | None = None, commands: list[Command] = COMMANDS, prog: str = "python -m merging",
         description: str = "Merge fine-tuned models of one architecture.") -> int:
    """Parse ``argv`` and run its command; returns the exit status."""
    args = build_parser(commands, prog, description).parse_args(argv)
    command = next(c for c in commands if c.name == args.command)
    return run_command(command.run, args, command.interrupted)

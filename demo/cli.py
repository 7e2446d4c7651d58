"""``python -m merging zoo``: build (or retrain) the demo family and print its folders."""

from __future__ import annotations

import argparse
import sys

from demo import ensure_family, train_adapters
from merging.cli import Command


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true",
                        help="print the folders of the base and each expert (this is also what a plain run prints)")
    parser.add_argument("--train", action="store_true", help="retrain the experts' LoRA adapters first (minutes on a CPU)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per expert with --train (default 90)")


def cmd_zoo(args) -> int:
    def report(message: str) -> None:  # progress on stderr; stdout lists the folders
        print(message, file=sys.stderr)

    if args.train:
        train_adapters(steps=args.steps, report=report)
    for name, folder in ensure_family(report).items():
        print(f"{name}\t{folder}")
    return 0


ZOO = Command("zoo", "build the demo family (base + experts) in the user cache", _arguments, cmd_zoo)

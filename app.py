"""Merge Studio app entry point.

The Gradio studio (Models, Merge, Redundancy, Chat, Evaluate, Export tabs) is built on the
``merging`` engine in a later step; until then this prints how to use the engine from the
command line, so the README's start command stays the same when the UI lands.
"""

import sys

from merging.methods import REGISTRY


def main() -> int:
    print("Merge Studio: the browser UI is not built yet (it comes with the studio issue).")
    print("The engine works today from the command line:")
    print("  python -m merging methods                 # list merge methods and parameters")
    print("  python -m merging merge RECIPE.yaml OUT   # merge models from a mergekit-style recipe")
    print(f"Methods available: {', '.join(REGISTRY)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

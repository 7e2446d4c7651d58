"""Merge Studio's browser app: Gradio Blocks, one module per tab; wiring and presentation only.

    from studio import Settings, build
    demo = build(Settings.from_env())
    demo.launch(**launch_options(settings))

Everything a tab does is a call into ``merging`` (recipes, merges), ``evaluation``, ``viz``
(redundancy statistics and figures) or ``chat`` (the shared model pool, streaming, A/B).
"""

from studio.settings import Settings
from studio.ui import TABS, build, launch_options

__all__ = ["TABS", "Settings", "build", "launch_options"]

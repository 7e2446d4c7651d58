"""``python -m merging``: the command line, assembled here as ``app.py`` assembles the studio.

The engine's commands (``merge``, ``methods``, ``recipe``, ``extract-lora``, ``serve``) plus three of the packages above it: ``zoo`` (the
demo family, whose import also registers its task suites and calibration texts, so recipes and
evaluations can name them), ``eval`` (evaluation) and ``tune`` (parameter search). This entry point is the one module of
``merging`` that imports upward; ``.importlinter`` lists these imports as the only exceptions.
"""

import sys

from demo.cli import ZOO
from evaluation.cli import EVAL
from merging.cli import COMMANDS, main
from merging.lora_cli import EXTRACT_LORA
from merging.serving import SERVE
from tuning.cli import TUNE

sys.exit(main(commands=[COMMANDS[0], TUNE, ZOO, EVAL, *COMMANDS[1:], EXTRACT_LORA, SERVE]))

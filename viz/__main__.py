"""``python -m viz``: the redundancy report's command line (``viz.cli``).

Importing ``demo`` registers the demo family's task suite (``--suite zoo``, the default) with
``evaluation``; like ``merging/__main__.py`` this entry point is a composition root, and
``.importlinter`` lists the import as its exception.
"""

import sys

import demo  # noqa: F401  (registers the 'zoo' suite)
from viz.cli import main

sys.exit(main())

"""``python -m studio deploy OWNER/NAME``: see ``studio.deploy``."""

import sys

from studio.deploy import main

sys.exit(main())

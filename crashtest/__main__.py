"""``python -m crashtest``: the same as ``pyshim-crashtest``."""

import sys

from crashtest.cli import main

sys.exit(main())

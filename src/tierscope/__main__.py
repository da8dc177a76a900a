"""``python -m tierscope``: the ``tierscope`` command, where no console script is on the PATH."""

import sys

from tierscope.cli import main

sys.exit(main())

"""``python -m stablesr.cli`` = the ``stablesr`` command."""

import sys

from stablesr.cli import main

sys.exit(main())

"""`python -m edgelab`: the lab's command line (tools/lab runs this)."""

import sys

from edgelab.cli import main

sys.exit(main())

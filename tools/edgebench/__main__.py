"""`python -m edgebench`: the benchmark command line (tools/bench runs this)."""

import sys

from edgebench.cli import main

sys.exit(main())

"""`python -m minimind_v.cli`: the console script."""

import sys

from . import main

sys.exit(main())

"""`python -m minimind_v.cli`: the console script."""

import sys

from . import main

if __name__ == "__main__":  # a spawned process (the server's engine process) imports this module again
    sys.exit(main())

"""``python -m paramserve.server``: the same command line as the ``paramserve`` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

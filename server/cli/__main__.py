"""`python -m server.cli`: the `baton` command, where no console script is installed."""

import sys

from server.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m trellis``: the same as the ``trellis`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

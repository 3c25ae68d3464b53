"""python -m examples.notify [--drill node|region|database|all] [--rolling] [--seed N]
[--rate R] [--keep] [--json FILE]: the DR drills demo (see examples/notify/demo.py)."""

import sys

from examples.notify.demo import main

sys.exit(main())

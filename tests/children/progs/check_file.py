"""usage: check_file.py FLAG LOG

A health check: appends ``ok`` or ``fail`` to LOG; exits 0 if FLAG exists, else 1."""

import sys
from pathlib import Path

ok = Path(sys.argv[1]).exists()
with open(sys.argv[2], "a") as log:
    log.write("ok\n" if ok else "fail\n")
sys.exit(0 if ok else 1)

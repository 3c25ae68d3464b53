"""usage: closer.py MARKER

Prints ``closing``, closes its stdout and stderr, keeps running for a moment, then
writes MARKER and exits 5 (its exit must not be inferred from the pipes closing)."""

import os
import sys
import time
from pathlib import Path

print("closing", flush=True)
os.close(1)
os.close(2)
time.sleep(0.3)
Path(sys.argv[1]).write_text("exiting")
os._exit(5)

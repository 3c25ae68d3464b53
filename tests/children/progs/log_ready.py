"""usage: log_ready.py MARKER

Prints lines that must not match ``listening on port \\d+``, waits a little, writes
MARKER, then prints ``listening on port 4242`` to stderr and sleeps."""

import sys
import time
from pathlib import Path

print("booting", flush=True)
print("listening on port soon", flush=True)
print("listening on port", file=sys.stderr, flush=True)
time.sleep(0.3)
Path(sys.argv[1]).write_text("ready")
print("listening on port 4242", file=sys.stderr, flush=True)
while True:
    time.sleep(60)

"""usage: exit_with.py CODE [MARKER]

Exit with CODE at once. With MARKER: only the first run exits (it creates MARKER);
later runs find MARKER and sleep forever.
"""

import os
import sys
import time
from pathlib import Path

code = int(sys.argv[1])
marker = Path(sys.argv[2]) if len(sys.argv) > 2 else None
print(f"pid {os.getpid()}", flush=True)
if marker is not None and marker.exists():
    print("ready", flush=True)
    while True:
        time.sleep(60)
if marker is not None:
    marker.write_text("ran")
sys.exit(code)

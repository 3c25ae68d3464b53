"""usage: trap.py MARKER [--ignore]

Traps SIGTERM, SIGINT, SIGHUP and SIGUSR1: writes the signal's name to MARKER and
exits 0. With ``--ignore`` SIGTERM is ignored instead. Prints ``ready`` once set up.
"""

import os
import signal
import sys
import time
from pathlib import Path

marker = Path(sys.argv[1])


def on_signal(signum, frame):
    marker.write_text(signal.Signals(signum).name)
    sys.exit(0)


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(sig, on_signal)
if "--ignore" in sys.argv[2:]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(f"pid {os.getpid()}", flush=True)
print("ready", flush=True)
while True:
    time.sleep(60)

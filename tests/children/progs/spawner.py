"""usage: spawner.py PIDFILE [--exit CODE] [--ignore] [--share-output]

Starts a grandchild (sleeper.py, same process group; its output goes to /dev/null, or
with ``--share-output`` to this process's stdout/stderr pipes), writes
"<own pid> <grandchild pid>" to PIDFILE (atomically), prints ``spawned``. Then it sleeps,
or with ``--exit CODE`` exits at once leaving the grandchild behind. On SIGTERM it exits
0 without touching the grandchild. With ``--ignore`` both it and the grandchild ignore
SIGTERM.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

pidfile = Path(sys.argv[1])
rest = sys.argv[2:]
ignore = "--ignore" in rest
if ignore:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the grandchild
else:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
here = Path(__file__).resolve().parent
share = "--share-output" in rest
grandchild = subprocess.Popen(
    [sys.executable, str(here / "sleeper.py")],
    stdout=None if share else subprocess.DEVNULL,
    stderr=None if share else subprocess.DEVNULL,
)
tmp = pidfile.with_suffix(".tmp")
tmp.write_text(f"{os.getpid()} {grandchild.pid}")
tmp.rename(pidfile)
print("spawned", flush=True)
if "--exit" in rest:
    os._exit(int(rest[rest.index("--exit") + 1]))
while True:
    time.sleep(60)

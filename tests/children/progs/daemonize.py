"""A classic double-fork daemonizer (like ``redis-server --daemonize yes``).

usage: daemonize.py [--pidfile PATH] [--ready-file PATH] [--crash-after S]
The main process forks, the child calls setsid and forks the daemon, the main process
exits 0. The daemon writes its pid to ``--pidfile`` (after the main process exited, as
real daemons may), prints nothing, and sleeps; ``--crash-after`` makes it exit 3 then.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--pidfile")
parser.add_argument("--crash-after", type=float, default=0.0)
args = parser.parse_args()

if os.fork() > 0:
    time.sleep(0.01)
    os._exit(0)  # the main process: "started in the background"
os.setsid()
if os.fork() > 0:
    os._exit(0)
# the daemon
devnull = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(devnull, fd)
time.sleep(0.05)
if args.pidfile:
    tmp = args.pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, args.pidfile)
if args.crash_after:
    time.sleep(args.crash_after)
    sys.exit(3)
while True:
    time.sleep(3600)

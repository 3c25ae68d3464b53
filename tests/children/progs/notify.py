"""sd_notify speaker: READY=1 (optionally late or never) and WATCHDOG=1 heartbeats.

usage: notify.py [--ready-after S] [--no-ready] [--marker PATH]
                 [--beats N] [--interval S]
Prints ``pid <pid>``, ``WATCHDOG_USEC=<value>`` and ``NOTIFY_SOCKET=<value>`` first.
``--marker`` is written just before READY=1. After ``--beats`` heartbeats (-1: forever,
the default 0: none) it prints ``stopped beating`` and sleeps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from _sdnotify import notify

parser = argparse.ArgumentParser()
parser.add_argument("--ready-after", type=float, default=0.0)
parser.add_argument("--no-ready", action="store_true")
parser.add_argument("--marker")
parser.add_argument("--beats", type=int, default=0)
parser.add_argument("--interval", type=float, default=0.1)
args = parser.parse_args()

print(f"pid {os.getpid()}", flush=True)
print(f"WATCHDOG_USEC={os.environ.get('WATCHDOG_USEC', '')}", flush=True)
print(f"NOTIFY_SOCKET={os.environ.get('NOTIFY_SOCKET', '')}", flush=True)
if not args.no_ready:
    time.sleep(args.ready_after)
    if args.marker:
        Path(args.marker).write_text("ready")
    if not notify("READY=1\nSTATUS=up"):
        print("no NOTIFY_SOCKET", file=sys.stderr, flush=True)
        sys.exit(2)
    print("sent READY=1", flush=True)
n = 0
while args.beats < 0 or n < args.beats:
    notify("WATCHDOG=1")
    n += 1
    time.sleep(args.interval)
print("stopped beating", flush=True)
while True:
    time.sleep(60)

#!/usr/bin/env python
"""Idle CPU of ``trellis.run``: a tree whose one worker sleeps 15 s; prints the process
CPU time over wall time. ``default`` runs with the loop-lag monitor
(``lag_threshold=0.1``), ``none`` without it (``lag_threshold=None``).

    .venv/bin/python bench/bench_idle.py default
    .venv/bin/python bench/bench_idle.py none
"""

from __future__ import annotations

import asyncio
import sys
import time

import trellis

out: dict[str, float] = {}


async def idle() -> None:
    await asyncio.sleep(0.5)
    c0, w0 = time.process_time(), time.monotonic()
    await asyncio.sleep(15)
    out["cpu"] = (time.process_time() - c0) / (time.monotonic() - w0)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "default"
    kwargs = {"lag_threshold": None} if mode == "none" else {}
    trellis.run(trellis.worker("w", idle, restart="temporary"), **kwargs)  # type: ignore[arg-type]
    print(mode, f"idle CPU {out['cpu'] * 100:.3f}%")

"""Isolated servers: call round trips per second over the pipe, against a raw
``multiprocessing.Pipe`` echo measured in the same run, and the time from a segfault to
the restarted server's first answer.

    .venv/bin/python bench/bench_isolated.py            # ~30 s
    .venv/bin/python bench/bench_isolated.py --quick

Targets: >= 20,000 call round trips/s; restart after a segfault to first answer <= 60 ms.
Prints medians and the ratio to the baseline; exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from multiprocessing.connection import Connection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import trellis
from _isolated_echo import Echo


def _echo(conn: Connection) -> None:
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg)


def pipe_baseline(n: int) -> float:
    """Round trips/s of a raw multiprocessing.Pipe echo (pickle, blocking, no event loop)."""
    parent, child = mp.Pipe()
    p = mp.get_context("fork").Process(target=_echo, args=(child,))
    p.start()
    for _ in range(200):
        parent.send(("warm", 1))
        parent.recv()
    t0 = time.perf_counter()
    for i in range(n):
        parent.send(("req", i))
        parent.recv()
    elapsed = time.perf_counter() - t0
    parent.send(None)
    p.join()
    return n / elapsed


async def isolated_rate(n: int, concurrency: int) -> float:
    sup = await trellis.Supervisor.start_link([trellis.Isolated(Echo, id="echo", name="echo")])
    try:
        [info] = await sup.which_children()
        pid = info.pid
        for _ in range(200):
            await trellis.call(pid, ("warm", 1))

        async def caller(k: int) -> None:
            for i in range(k):
                await trellis.call(pid, ("req", i))

        per = n // concurrency
        t0 = time.perf_counter()
        await asyncio.gather(*(caller(per) for _ in range(concurrency)))
        return per * concurrency / (time.perf_counter() - t0)
    finally:
        await sup.stop()


async def restart_times(k: int) -> list[float]:
    sup = await trellis.Supervisor.start_link(
        [trellis.Isolated(Echo, id="echo", name="echo")], intensity=k + 5, period=60.0
    )
    out = []
    try:
        await trellis.call("echo", "warm")
        for _ in range(k):
            t0 = time.perf_counter()
            try:
                await trellis.call("echo", "segfault", timeout=10)
            except trellis.Exited:
                pass
            while True:
                try:
                    await trellis.call("echo", "up", timeout=10)
                    break
                except (trellis.NoProc, trellis.Exited):
                    await asyncio.sleep(0.0005)
            out.append(time.perf_counter() - t0)
    finally:
        await sup.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = 5_000 if args.quick else 20_000
    repeats = 2 if args.quick else args.repeats
    print(f"$ {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, loop asyncio")  # fmt: skip
    base, seq, conc = [], [], []
    for _ in range(repeats):  # interleaved, so drift hits both sides alike
        base.append(pipe_baseline(n))
        seq.append(asyncio.run(isolated_rate(n, 1)))
        conc.append(asyncio.run(isolated_rate(n, 16)))
    restarts = asyncio.run(restart_times(5 if args.quick else 15))
    b, s, c = statistics.median(base), statistics.median(seq), statistics.median(conc)
    r50 = statistics.median(restarts)
    r95 = sorted(restarts)[max(0, int(len(restarts) * 0.95) - 1)]
    print()
    print("| measure | median | vs Pipe echo | target |")
    print("|---|---:|---:|---|")
    print(f"| multiprocessing.Pipe echo (baseline) | {b:,.0f}/s | 1.00x | |")
    print(f"| Isolated call, 1 caller | {s:,.0f}/s | {s / b:.2f}x | |")
    ok_rate = c >= 20_000
    print(f"| Isolated call, 16 callers | {c:,.0f}/s | {c / b:.2f}x | >= 20,000/s: "
          f"{'PASS' if ok_rate else 'FAIL'} |")  # fmt: skip
    ok_restart = r50 <= 0.060
    print(f"| segfault -> restarted, first answer | p50 {r50 * 1000:.1f} ms, "
          f"p95 {r95 * 1000:.1f} ms | | <= 60 ms: {'PASS' if ok_restart else 'FAIL'} |")  # fmt: skip
    return 0 if ok_rate and ok_restart else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""What RED per server costs on the call path: call round trips/s to a server that
keeps no call counts (no metrics attached: the default) against one that counts its
calls (a ``Metrics`` attached when it started), measured in one process with the two
variants interleaved (A B, B A, ...) and their medians compared by the wall clock and
by the process CPU clock (which other processes on a shared machine cannot inflate).

Run from the repository root:

    .venv/bin/python bench/bench_red.py                 # 15 repeats of 20,000 calls
    .venv/bin/python bench/bench_red.py --repeats 5 --calls 5000

The call is bench_core's: a ``BenchServer`` answering ``"ping"``, the caller a plain
coroutine, the default 5 s timeout. Exits 1 if the counted call costs more than
``--target`` (default 5%) more CPU time than the uncounted one.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

import trellis
from trellis.metrics import Metrics


class BenchServer(trellis.Server):
    async def handle_call(self, request: Any, caller: Any) -> Any:
        return request


async def one(n: int, counted: bool) -> tuple[float, float]:
    """Calls/s of one repeat (wall, CPU); ``counted``: the server counts its calls."""
    m = Metrics(node="bench").attach() if counted else None
    pid = await BenchServer.start()
    if m is not None:
        m.detach()  # the server keeps counting; callers still stamp while attached
        m.attach()
    call = trellis.call
    for _ in range(100):
        await call(pid, "ping")
    gc.collect()
    w0, c0 = time.perf_counter_ns(), time.process_time_ns()
    for _ in range(n):
        await call(pid, "ping")
    w, c = time.perf_counter_ns() - w0, time.process_time_ns() - c0
    stats = trellis._server.call_stats(pid)
    assert (stats is not None) == counted
    if stats is not None:
        assert stats.calls == n + 100
        assert stats.errors == 0
        assert sum(stats.counts) == n + 100
    await trellis.stop(pid)
    if m is not None:
        m.detach()
    return n / (w / 1e9), n / (max(c, 1) / 1e9)


async def main(repeats: int, n: int) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    await one(n // 4, False)  # warm-up
    await one(n // 4, True)
    for i in range(repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        for counted in order:
            out["on" if counted else "off"].append(await one(n, counted))
    return out


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--target", type=float, default=0.05, help="allowed CPU cost (0.05 = 5%%)")
    args = ap.parse_args()
    logging.getLogger("trellis").setLevel(logging.CRITICAL)
    t0 = time.perf_counter()
    c0 = time.process_time()
    res = asyncio.run(main(args.repeats, args.calls))
    share = (time.process_time() - c0) / (time.perf_counter() - t0)
    cmd = " ".join([".venv/bin/python", "bench/bench_red.py", *sys.argv[1:]])
    print(f"command: {cmd}")
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; Python {sys.version.split()[0]}")
    print(f"{args.repeats} interleaved repeats of {args.calls:,} calls; CPU share {share:.0%}")
    print()
    print("| variant | calls/s (wall, median) | calls/s (CPU, median) |")
    print("|---|---:|---:|")
    med = {}
    for k, label in (("off", "no metrics (not counted)"), ("on", "metrics attached (counted)")):
        wall = statistics.median(s[0] for s in res[k])
        cpu = statistics.median(s[1] for s in res[k])
        med[k] = (wall, cpu)
        print(f"| {label} | {wall:,.0f} | {cpu:,.0f} |")
    wr = med["on"][0] / med["off"][0]
    cr = med["on"][1] / med["off"][1]
    print(f"| counted/not counted | {wr:.3f}x | {cr:.3f}x |")
    ok = cr >= 1 - args.target
    print(
        f"\nCPU-clock ratio {cr:.3f}x: {'PASS' if ok else 'FAIL'} (target >= {1 - args.target:.2f}x)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(cli())

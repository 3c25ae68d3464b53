#!/usr/bin/env python
"""Idle CPU of ``trellis.run``: the loop-lag monitor's cost at rest.

Each variant is a ``trellis.run`` process whose tree holds ``--children`` idle OS
children (``sleep``) and one worker that sleeps; all variants run at the same time, so
they share one measurement window (an idle process hardly competes for a CPU). After
``--settle`` seconds, the CPU time of each ``trellis.run`` process (all its threads,
from ``/proc/PID/task/*/schedstat``, ns; the children and the guardian process are
not counted) is taken over ``--seconds`` of wall time and scaled to 60 s. Also shown:
how many times a second the loop's thread and the other threads were scheduled
(wake-ups, the schedstat ``pcount``). Repeated ``--repeats`` times; medians.

With ``--calls N`` it measures the monitor's cost on a busy loop instead: each variant,
one after the other (interleaved, ``--repeats`` rounds), runs a ``trellis.run`` tree in
which a worker makes N sequential ``trellis.call`` round trips to an echo server, five
batches in a row; the median batch rate (calls per second of the process's CPU time,
all threads, so the watchdog's own work counts and other load on the machine less)
per variant, and its ratio to ``none``.

Variants: ``monitor`` (the default ``lag_threshold=0.1``) and ``none``
(``lag_threshold=None``) with this checkout's ``src``; with ``--before DIR`` (another
copy of ``src``, e.g. ``git archive HEAD~1 src | tar -x -C /tmp/before``) also
``before-monitor`` and ``before-none`` run from it, for a before/after in one run.

    .venv/bin/python bench/bench_idle.py --seconds 60 --repeats 3 --loop asyncio
    .venv/bin/python bench/bench_idle.py --before /tmp/before/src --loop uvloop
    .venv/bin/python bench/bench_idle.py --calls 50000 --repeats 5 --before /tmp/before/src
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

PROGRAM = r"""
import asyncio, os, sys
import trellis

n, mode, loop = int(sys.argv[1]), sys.argv[2], sys.argv[3]

async def idle():
    print("up", flush=True)
    await asyncio.sleep(1e6)

children = [trellis.Command(["sleep", "1000000"], id=f"s{i}") for i in range(n)]
children.append(trellis.worker("w", idle))
kwargs = {"lag_threshold": None} if mode == "none" else {}
sys.exit(trellis.run(lambda: trellis.Supervisor.start_link(children), loop=loop, **kwargs))
"""


CALLS_PROGRAM = r"""
import asyncio, sys, time
import trellis

n, mode, loop = int(sys.argv[1]), sys.argv[2], sys.argv[3]

class Echo(trellis.Server):
    async def handle_call(self, request, caller):
        return request

async def caller():
    pid = await Echo.start()
    call = trellis.call
    for _ in range(1000):
        await call(pid, "ping")
    rates = []
    for _ in range(5):
        t0 = time.process_time()  # all the process's threads: the watchdog's too
        for _ in range(n):
            await call(pid, "ping")
        rates.append(n / (time.process_time() - t0))
    print(" ".join(f"{r:.1f}" for r in rates), flush=True)
    await trellis.stop(pid)

kwargs = {"lag_threshold": None} if mode == "none" else {}
sys.exit(trellis.run(trellis.worker("w", caller, restart="temporary"), loop=loop, **kwargs))
"""


def calls_round(variants: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for name, src in variants.items():
        mode = "none" if name.endswith("none") else "monitor"
        res = subprocess.run(
            [sys.executable, "-c", CALLS_PROGRAM, str(args.calls), mode, args.loop],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": src},
            timeout=600,
            check=True,
        )
        out[name] = statistics.median(float(x) for x in res.stdout.split())
    return out


def snapshot(pid: int) -> tuple[int, int, int]:
    """(sched runtime ns of all threads, pcount of the main thread, pcount of the others)."""
    ns = main = others = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            run, _, count = (int(x) for x in f.read().split())
        ns += run
        if int(tid) == pid:
            main += count
        else:
            others += count
    return ns, main, others


def one_round(
    variants: dict[str, str], args: argparse.Namespace
) -> dict[str, tuple[float, float, float]]:
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for name, src in variants.items():
            mode = "none" if name.endswith("none") else "monitor"
            env = {**os.environ, "PYTHONPATH": src}
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", PROGRAM, str(args.children), mode, args.loop],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
        for name, p in procs.items():
            assert p.stdout is not None
            if p.stdout.readline().strip() != "up":
                raise SystemExit(f"{name}: the tree did not start")
        time.sleep(args.settle)
        before = {name: snapshot(p.pid) for name, p in procs.items()}
        t0 = time.monotonic()
        time.sleep(args.seconds)
        after = {name: snapshot(p.pid) for name, p in procs.items()}
        wall = time.monotonic() - t0
        out = {}
        for name in procs:
            (ns0, m0, o0), (ns1, m1, o1) = before[name], after[name]
            out[name] = ((ns1 - ns0) / 1e9 * 60 / wall, (m1 - m0) / wall, (o1 - o0) / wall)
        return out
    finally:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="measurement window (60)")
    ap.add_argument("--settle", type=float, default=3.0, help="wait after start (3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--children", type=int, default=50, help="idle OS children (50)")
    ap.add_argument("--loop", default="asyncio", choices=("asyncio", "uvloop"))
    ap.add_argument("--before", help="another src directory to compare with")
    ap.add_argument("--calls", type=int, help="measure call throughput (N calls a batch)")
    args = ap.parse_args()
    variants = {"monitor": str(SRC), "none": str(SRC)}
    if args.before:
        variants = {"before-monitor": args.before, "before-none": args.before, **variants}
    if args.calls:
        calls(variants, args)
        return
    rounds = [one_round(variants, args) for _ in range(args.repeats)]
    print(
        f"Python {sys.version.split()[0]}, loop {args.loop}, {args.children} idle children, "
        f"{args.seconds:g} s x {args.repeats}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print("| variant | CPU s per 60 s: median (all) | loop thread wake-ups/s | other threads/s |")
    print("|---|---:|---:|---:|")
    for name in variants:
        cpu = [r[name][0] for r in rounds]
        main_w = statistics.median(r[name][1] for r in rounds)
        other_w = statistics.median(r[name][2] for r in rounds)
        all_cpu = ", ".join(f"{c:.4f}" for c in cpu)
        print(
            f"| {name} | {statistics.median(cpu):.4f} ({all_cpu}) | {main_w:.2f} | {other_w:.2f} |"
        )


def calls(variants: dict[str, str], args: argparse.Namespace) -> None:
    rounds = [calls_round(variants, args) for _ in range(args.repeats)]
    print(
        f"Python {sys.version.split()[0]}, loop {args.loop}, {args.calls} calls x 5 batches, "
        f"{args.repeats} rounds, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print("| variant | calls per CPU s: median (rounds) | vs none (median of per-round ratios) |")
    print("|---|---:|---:|")
    for name in variants:
        rates = [r[name] for r in rounds]
        base = "before-none" if name.startswith("before") else "none"
        ratio = statistics.median(r[name] / r[base] for r in rounds)
        all_r = ", ".join(f"{x:,.0f}" for x in rates)
        print(f"| {name} | {statistics.median(rates):,.0f} ({all_r}) | {ratio:.3f} |")


if __name__ == "__main__":
    main()

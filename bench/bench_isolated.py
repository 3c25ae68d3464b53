"""Isolated servers: call round trips per second over the pipe, against a raw
``multiprocessing.Pipe`` echo measured in the same run, and the time from a segfault to
the restarted server's first answer, against a raw ``multiprocessing`` child restarted
after its segfault (same run).

    .venv/bin/python bench/bench_isolated.py            # ~40 s
    .venv/bin/python bench/bench_isolated.py --quick
    .venv/bin/python bench/bench_isolated.py --loop uvloop

Targets: >= 20,000 call round trips/s; restart after a segfault to first answer <= 60 ms.
A restart adopts the standby interpreter started after the previous start; the crashes
come ``--pause`` seconds apart (default 0.3 s, so the standby has finished its imports),
and a second row crashes back to back (the standby is still importing when adopted).
Prints medians and p95; exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any

# Only the standard library at the top: the `spawn` baseline's child imports this module.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _echo(conn: Connection) -> None:
    while True:
        msg = conn.recv()
        if msg is None:
            return
        if msg == "segfault":
            import ctypes

            ctypes.string_at(0)
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
    parent.close()
    child.close()
    return n / elapsed


def _pipe_child(ctx: Any) -> tuple[Any, Connection]:
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_echo, args=(child,))
    p.start()
    child.close()
    return p, parent


def pipe_restarts(method: str, k: int, pause: float) -> list[float]:
    """Segfault -> a new multiprocessing child (``method``) answers: the raw floor."""
    ctx = mp.get_context(method)
    p, conn = _pipe_child(ctx)
    conn.send("warm")
    conn.recv()
    out = []
    for _ in range(k):
        time.sleep(pause)
        t0 = time.perf_counter()
        conn.send("segfault")
        try:
            conn.recv()
        except EOFError:
            pass
        p.join()
        conn.close()
        p, conn = _pipe_child(ctx)
        conn.send("up")
        conn.recv()
        out.append(time.perf_counter() - t0)
    conn.send(None)
    p.join()
    conn.close()
    return out


async def isolated_rate(n: int, concurrency: int) -> float:
    import asyncio

    import trellis
    from _isolated_echo import Echo

    sup = await trellis.Supervisor.start_link([trellis.Isolated(Echo, id="echo", name="echo")])
    try:
        [info] = await sup.which_children()
        pid = info.pid
        await asyncio.sleep(0.3)  # steady state: the standby has done its imports
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


async def restart_times(k: int, pause: float, standby: bool = True) -> list[float]:
    """Segfault -> the restarted isolated server's first answer, ``k`` times."""
    import asyncio

    import trellis
    from _isolated_echo import Echo

    spec = trellis.Isolated(Echo, id="echo", name="echo", standby=standby)
    sup = await trellis.Supervisor.start_link([spec], intensity=k + 5, period=60.0)
    out = []
    try:
        await trellis.call("echo", "warm")
        for _ in range(k):
            await asyncio.sleep(pause)
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


def _run(loop: str, coro: Coroutine[Any, Any, Any]) -> Any:
    import asyncio

    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def _p(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, round(q * len(s)) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between crashes")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = ap.parse_args()
    n = 5_000 if args.quick else 20_000
    repeats = 2 if args.quick else args.repeats
    k = 6 if args.quick else args.restarts
    print(f"$ {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, loop {args.loop}")  # fmt: skip
    run: Callable[[Coroutine[Any, Any, Any]], Any] = lambda c: _run(args.loop, c)  # noqa: E731
    base, seq, conc = [], [], []
    for _ in range(repeats):  # interleaved, so drift hits both sides alike
        base.append(pipe_baseline(n))
        seq.append(run(isolated_rate(n, 1)))
        conc.append(run(isolated_rate(n, 16)))
    restarts: dict[str, list[float]] = {}
    half = max(1, k // 2)
    measures: list[tuple[str, Callable[[], list[float]]]] = [
        ("mp spawn", lambda: pipe_restarts("spawn", half, args.pause)),
        ("mp forkserver", lambda: pipe_restarts("forkserver", half, args.pause)),
        ("mp fork", lambda: pipe_restarts("fork", half, args.pause)),
        ("Isolated", lambda: run(restart_times(half, args.pause))),
        ("Isolated, back to back", lambda: run(restart_times(half, 0.0))),
        ("Isolated, standby=False", lambda: run(restart_times(half, args.pause, False))),
    ]
    for _ in range(2):  # interleaved halves, so drift hits every row alike
        for name, measure in measures:
            restarts.setdefault(name, []).extend(measure())
    b, s, c = statistics.median(base), statistics.median(seq), statistics.median(conc)
    print()
    print("| measure | median | vs Pipe echo | target |")
    print("|---|---:|---:|---|")
    print(f"| multiprocessing.Pipe echo (baseline) | {b:,.0f}/s | 1.00x | |")
    print(f"| Isolated call, 1 caller | {s:,.0f}/s | {s / b:.2f}x | |")
    ok_rate = c >= 20_000
    print(f"| Isolated call, 16 callers | {c:,.0f}/s | {c / b:.2f}x | >= 20,000/s: "
          f"{'PASS' if ok_rate else 'FAIL'} |")  # fmt: skip
    print()
    spawn = statistics.median(restarts["mp spawn"])
    print(f"segfault -> restarted, first answer ({len(restarts['Isolated'])} restarts each, "
          f"{args.pause} s apart unless said)")  # fmt: skip
    print()
    print("| restart after a segfault | p50 | p95 | vs mp spawn | target |")
    print("|---|---:|---:|---:|---|")
    ok_restart = True
    for name, xs in restarts.items():
        p50 = statistics.median(xs)
        verdict = ""
        if name == "Isolated":
            ok_restart = p50 <= 0.060
            verdict = f"<= 60 ms: {'PASS' if ok_restart else 'FAIL'}"
        print(f"| {name} | {p50 * 1000:.1f} ms | {_p(xs, 0.95) * 1000:.1f} ms | "
              f"{p50 / spawn:.2f}x | {verdict} |")  # fmt: skip
    return 0 if ok_rate and ok_restart else 1


if __name__ == "__main__":
    sys.exit(main())

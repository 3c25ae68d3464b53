"""How long observers hold the tree's event loop: a /metrics scrape of a large tree and
Server-Sent Events history replay to many clients at once.

A tree of ``--children`` workers (10,000) runs under one supervisor, with
``trellis.metrics.Metrics`` and the control API on a Unix socket in the tree's loop.
``--crashes`` children are crashed first (two events each: the history). A ticker
task in the tree's loop sleeps 1 ms in a loop and records the longest gap between its
wake-ups. The clients run in another process (as a scraper or an operator's terminal
would), so the gap is the server's work only.

Measured: the worst loop gap and the wall time of each of ``--scrapes`` scrapes of
``/metrics``; then of ``--clients`` (250) simultaneous ``GET /v1/events?history=N``
replays (follow=false) of the whole history.

    python bench/bench_observers.py
    python bench/bench_observers.py --children 2000 --clients 50   # quicker
    python bench/bench_observers.py --freeze   # without full-collection pauses

A full garbage collection of a heap holding 10,000 processes pauses every thread for
~0.2 s whoever triggers it; ``--freeze`` moves the started tree's objects out of the
collector's way (``gc.freeze()``), which shows the observers' own share.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import trellis
from trellis.control import ControlServer
from trellis.metrics import Metrics


async def idle() -> None:
    while True:
        await trellis.receive()


class Ticker:
    """Records the longest gap between 1 ms sleeps of a task in the tree's loop."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, loop.time() - t - 0.001)

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    def reset(self) -> float:
        w, self.worst = self.worst, 0.0
        return w


CLIENT = """
import asyncio, os, sys, time
os.nice(10)  # the server's loop is measured, not this process: let it run first
sock, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
async def connect(gate):
    async with gate:  # at most 32 connects in flight: the listen backlog is finite
        return await asyncio.open_unix_connection(sock, limit=1 << 24)
async def one(r, w):
    w.write(f"GET {path} HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n".encode())
    body = await r.read()
    w.close()
    assert body.startswith(b"HTTP/1.1 200"), body[:200]
    return body
async def main():
    gate = asyncio.Semaphore(32)
    conns = await asyncio.gather(*(connect(gate) for _ in range(n)))
    print("connected", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    t0 = time.perf_counter()
    bodies = await asyncio.gather(*(one(r, w) for r, w in conns))  # all at once
    took = time.perf_counter() - t0
    print(took, min(len(b) for b in bodies), min(b.count(b"\\nevent: ") for b in bodies))
asyncio.run(main())
"""


async def client(sock: Path, path: str, n: int, ticker: Ticker) -> tuple[float, int, int, float]:
    """``n`` simultaneous GETs from another process (as a scraper or an operator's
    terminal would), connected first and then sent at once: (seconds, smallest body,
    fewest events, the loop's worst gap meanwhile). Starting the process (a fork of
    this large one) is not counted."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        str(sock),
        path,
        str(n),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"connected\n"
    ticker.reset()
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()
    out = await proc.stdout.read()
    gap = ticker.reset()
    if await proc.wait() != 0:
        raise RuntimeError(f"the client failed (exit {proc.returncode})")
    took, size, events = out.split()
    return float(took), int(size), int(events), gap


async def bench(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bo-", dir="/tmp"))
    sock = tmp / "c.sock"
    metrics = Metrics(node="bench")
    ctl = (
        ControlServer(
            socket=sock, metrics=metrics, node="bench", history=args.history, max_connections=1024
        )
        if _takes("max_connections")
        else ControlServer(socket=sock, metrics=metrics, node="bench", history=args.history)
    )
    await metrics.start()
    await ctl.start()
    t0 = time.perf_counter()
    children = [trellis.worker(f"w{i}", idle) for i in range(args.children)]
    sup = await trellis.Supervisor.start_link(children, name="big", intensity=10**9, period=1.0)
    started = time.perf_counter() - t0
    await ctl.tree_started(sup, lambda: None)
    await metrics.tree_started(sup, lambda: None)
    infos = await sup.which_children()
    step = max(1, len(infos) // max(1, args.crashes))
    for info in infos[::step][: args.crashes]:
        trellis.exit(info.pid, RuntimeError("bench crash"))
        await asyncio.sleep(0)
    await asyncio.sleep(0.5)
    if args.freeze:  # the tree's objects out of the collector's way (see the docstring)
        gc.collect()
        gc.freeze()
    ticker = Ticker()
    ticker.start()
    await asyncio.sleep(0.2)
    idle_gap = ticker.reset()
    print(f"# bench_observers — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"# python {platform.python_version()} on {platform.machine()}, {sys.platform}")
    print(f"# command: {' '.join(sys.argv)}")
    print(
        f"tree: {args.children} children started in {started:.2f}s; {args.crashes} crashes"
        + ("; heap frozen" if args.freeze else "")
    )
    print(f"idle: worst loop gap {idle_gap * 1000:.1f} ms")
    for i in range(args.scrapes):
        took, size, _, gap = await client(sock, "/metrics", 1, ticker)
        print(
            f"scrape {i + 1}: {took * 1000:.0f} ms, {size / 1e6:.1f} MB; "
            f"worst loop gap {gap * 1000:.1f} ms"
        )
    for i in range(args.replays):
        path = f"/v1/events?history={args.history}&follow=false"
        took, _, events, gap = await client(sock, path, args.clients, ticker)
        print(
            f"replay {i + 1}: {args.clients} clients x {events} events in {took * 1000:.0f} ms; "
            f"worst loop gap {gap * 1000:.1f} ms"
        )
    assert ticker.task is not None
    ticker.task.cancel()
    await sup.stop()
    await ctl.stop()
    await metrics.stop()


def _takes(name: str) -> bool:
    import inspect

    return name in inspect.signature(ControlServer).parameters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--children", type=int, default=10_000, help="workers in the tree")
    p.add_argument("--crashes", type=int, default=500, help="crashes before measuring")
    p.add_argument("--history", type=int, default=1000, help="events kept and replayed")
    p.add_argument("--clients", type=int, default=250, help="simultaneous SSE replays")
    p.add_argument("--scrapes", type=int, default=3, help="scrapes of /metrics")
    p.add_argument("--replays", type=int, default=3, help="rounds of --clients replays")
    p.add_argument(
        "--freeze", action="store_true", help="gc.freeze() the started tree before measuring"
    )
    asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    main()

"""Observers do not hold the tree's loop: a /metrics scrape of a 10,000-child tree and
250 clients replaying the event history at once leave the loop free (a ticker task in
it never waits long), because rendering runs in a worker thread and replay is encoded
once and sent a slice per loop turn.

The clients run in another process (as a scraper or an operator's terminal does), so
the ticker measures the server's work only. A full garbage collection of a heap of
10,000 processes takes a pause of its own (~0.2 s on a busy 2-core machine) whoever
triggers it; the heap is frozen (``gc.freeze``) while measuring so that the figure is
about the observers. Before this change the scrape held the loop for its whole
duration (4-6 s) and the replay for 1-6 s."""

from __future__ import annotations

import asyncio
import gc
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import trellis
from trellis import telemetry
from trellis.control import ControlServer
from trellis.metrics import Metrics

#: Generous: far above the few milliseconds the observers hold the loop, far below what
#: rendering on the loop took (seconds).
BOUND = 0.25

CLIENT = """
import asyncio, os, sys
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
    bodies = await asyncio.gather(*(one(r, w) for r, w in conns))  # all at once
    print(min(len(b) for b in bodies), min(b.count(b"\\nevent: ") for b in bodies))
asyncio.run(main())
"""


async def idle() -> None:
    while True:
        await trellis.receive()


class Ticker:
    """The longest gap between 1 ms sleeps of a task in the loop."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, loop.time() - t - 0.001)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def clients(sock: Path, path: str, n: int) -> tuple[int, int, float]:
    """``n`` simultaneous GETs from another process, connected first, then sent at
    once: (smallest body, fewest events, the loop's worst gap while they ran). The
    ticker runs only from the requests on: starting a process (a fork of this large
    one) is not the server's work."""
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
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line == b"connected\n", line
        ticker = Ticker()
        try:
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            out = await asyncio.wait_for(proc.stdout.read(), 60)
        finally:
            await ticker.close()
        assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    size, events = out.split()
    return int(size), int(events), ticker.worst


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory for the socket (AF_UNIX paths are short)."""
    d = Path(tempfile.mkdtemp(prefix="tl-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def test_scraping_a_10000_child_tree_leaves_the_loop_free(
    short_dir: Path, frozen_heap: None
) -> None:
    metrics = Metrics(node="n")
    sock = short_dir / "c.sock"
    ctl = ControlServer(socket=sock, metrics=metrics)
    await metrics.start()
    await ctl.start()
    sup = await trellis.Supervisor.start_link(
        [trellis.worker(f"w{i}", idle) for i in range(10_000)], name="big"
    )
    try:
        await ctl.tree_started(sup, lambda: None)
        await metrics.tree_started(sup, lambda: None)
        gc.collect()
        gc.freeze()  # the 10,000 processes
        gaps = []
        for _ in range(3):  # the best of three: a busy machine may pause us once or twice
            size, _, gap = await clients(sock, "/metrics", 1)
            gaps.append(gap)
            assert size > 10_000 * 1000  # every child's series were there
        worst = min(gaps)
        assert worst < BOUND, f"a scrape held the loop for {worst * 1000:.0f} ms"
    finally:
        await sup.stop()
        await ctl.stop()
        await metrics.stop()


async def test_250_clients_replaying_history_leave_the_loop_free(
    short_dir: Path, frozen_heap: None
) -> None:
    sock = short_dir / "c.sock"
    ctl = ControlServer(socket=sock, history=1000, max_connections=400)
    await ctl.start()
    sup = await trellis.Supervisor.start_link([trellis.worker("w", idle)], name="hist")
    try:
        await ctl.tree_started(sup, lambda: None)
        for i in range(1000):
            telemetry.emit("test.event", path=f"hist/w{i}", n=i, reason=ValueError("x" * 100))
        gc.collect()
        gc.freeze()
        gaps = []
        for _ in range(3):  # the best of three: a busy machine may pause us once or twice
            _, events, gap = await clients(sock, "/v1/events?history=1000&follow=false", 250)
            gaps.append(gap)
            assert events == 1000  # each client got the whole history
        worst = min(gaps)
        assert worst < BOUND, f"the replay held the loop for {worst * 1000:.0f} ms"
    finally:
        await sup.stop()
        await ctl.stop()

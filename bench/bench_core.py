#!/usr/bin/env python
"""Core benchmark: Trellis against a plain-asyncio floor, measured in one run.

Run from the repository root:

    .venv/bin/python bench/bench_core.py            # full run (~30 s)
    .venv/bin/python bench/bench_core.py --quick    # smoke run (~10 s)

The floor is written below in plain asyncio: an actor is an ``asyncio.Queue`` plus a task
looping on ``await q.get()``; a call puts ``(request, future)`` and awaits the future; a cast
is ``put_nowait``; restarts are done by a hand-rolled loop (one child) or a hand-rolled
rest_for_one supervisor (ten children). Floor and Trellis repeats are interleaved and the
medians compared. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TRELLIS_ERROR: str | None = None
try:
    import trellis

    _ = (trellis.Server, trellis.Supervisor, trellis.telemetry.attach, trellis.call)
except Exception as exc:  # the implementation may be missing or half-written
    trellis = None  # type: ignore[assignment]
    TRELLIS_ERROR = f"{type(exc).__name__}: {exc}"

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
now_ns = time.perf_counter_ns
cpu_ns = time.process_time_ns

Sample = tuple[float, float]  # (by the wall clock, by the process CPU clock)
TIMED = [0, 0]  # total wall and CPU ns inside timed sections: the CPU share we got


class Stopwatch:
    """Wall and process-CPU time of a section. CPU time is immune to other processes
    taking the CPU (a busy 2-core box), wall time is what users see."""

    __slots__ = ("c", "w")

    def __init__(self) -> None:
        self.w = now_ns()
        self.c = cpu_ns()

    def stop(self) -> tuple[int, int]:
        w, c = now_ns() - self.w, cpu_ns() - self.c
        TIMED[0] += w
        TIMED[1] += c
        return w, c


def rate(n: int, elapsed: tuple[int, int]) -> Sample:
    return n / (elapsed[0] / 1e9), n / (max(elapsed[1], 1) / 1e9)


class Latencies:
    """Per-operation wall samples (median) and the CPU time of the timed batch (mean)."""

    def __init__(self, warm: int, k: int) -> None:
        self.warm, self.k = warm, k
        self.wall: list[float] = []
        self.watch: Stopwatch | None = None

    def tick(self, i: int) -> None:
        if i == self.warm:
            self.watch = Stopwatch()

    def add(self, i: int, dt_ns: int) -> None:
        if i >= self.warm:
            self.wall.append(dt_ns / 1e3)

    def result(self) -> Sample:
        assert self.watch is not None
        _, c = self.watch.stop()
        return statistics.median(self.wall), c / 1e3 / self.k


CALL = 0
CAST = 1


class Crash(Exception):
    """Raised on purpose by the crash-inducing cast."""


# --------------------------------------------------------------------------------------------
# The floor: a plain asyncio actor, call/cast, and hand-rolled supervisors.
# --------------------------------------------------------------------------------------------


async def floor_actor(q: asyncio.Queue[Any], ready: asyncio.Future[None] | None) -> None:
    """The actor loop. ``ready`` is the "init done" ack the spawner awaits (like a start)."""
    if ready is not None:
        ready.set_result(None)
    get = q.get
    count = 0
    while True:
        kind, payload, fut = await get()
        if kind == CALL:
            fut.set_result(count if payload == "count" else payload)
        else:
            if payload == "crash":
                raise Crash
            count += 1


async def floor_start() -> tuple[asyncio.Queue[Any], asyncio.Task[None]]:
    """Start an actor and return once its init ran (comparable to ``Server.start``)."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[Any] = asyncio.Queue()
    ready = loop.create_future()
    task = loop.create_task(floor_actor(q, ready))
    await ready
    return q, task


async def floor_call(q: asyncio.Queue[Any], request: Any) -> Any:
    fut = asyncio.get_running_loop().create_future()
    q.put_nowait((CALL, request, fut))
    return await fut


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def floor_call_timer(q: asyncio.Queue[Any], request: Any, timeout: float = 5.0) -> Any:
    """A floor call that also arms (and cancels) a timeout timer, as ``call(timeout=5.0)``."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    q.put_nowait((CALL, request, fut))
    handle = loop.call_later(timeout, _expire, fut)
    try:
        return await fut
    finally:
        handle.cancel()


def floor_cast(q: asyncio.Queue[Any], msg: Any) -> None:
    q.put_nowait((CAST, msg, None))


async def floor_restart_loop(
    on_started: Callable[[asyncio.Queue[Any]], None], log: logging.Logger
) -> None:
    """Hand-rolled one_for_one over one child: on a crash, start a new actor at once."""
    loop = asyncio.get_running_loop()
    while True:
        q: asyncio.Queue[Any] = asyncio.Queue()
        ready = loop.create_future()
        task = loop.create_task(floor_actor(q, ready))
        await ready
        on_started(q)
        try:
            await task
        except Exception as exc:
            log.error("actor crashed", exc_info=exc)


class FloorRestForOne:
    """Hand-rolled rest_for_one: when child i crashes, stop n-1..i+1 in reverse (cancel and
    await each), then start i..n-1 in order (awaiting each init ack)."""

    def __init__(
        self, n: int, on_restarted: Callable[[list[Any]], None], log: logging.Logger
    ) -> None:
        self.n = n
        self.queues: list[Any] = [None] * n
        self.tasks: list[Any] = [None] * n
        self.index: dict[asyncio.Task[None], int] = {}
        self.events: asyncio.Queue[asyncio.Task[None]] = asyncio.Queue()
        self.on_restarted = on_restarted
        self.log = log
        self.task: asyncio.Task[None] | None = None

    async def _start_child(self, i: int) -> None:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()
        ready = loop.create_future()
        task = loop.create_task(floor_actor(q, ready))
        task.add_done_callback(self.events.put_nowait)
        await ready
        self.queues[i] = q
        self.tasks[i] = task
        self.index[task] = i

    async def start(self) -> None:
        for i in range(self.n):
            await self._start_child(i)
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            task = await self.events.get()
            i = self.index.pop(task, None)
            if i is None:  # a child we stopped ourselves
                continue
            exc = None if task.cancelled() else task.exception()
            self.log.error("child %d exited", i, exc_info=exc)
            for j in range(self.n - 1, i, -1):
                tj = self.tasks[j]
                del self.index[tj]
                tj.cancel()
                try:
                    await tj
                except asyncio.CancelledError:
                    pass
            for j in range(i, self.n):
                await self._start_child(j)
            self.on_restarted(self.queues)

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        for t in [self.task, *self.tasks]:
            t.cancel()
            try:
                await t
            except (asyncio.CancelledError, Crash):
                pass


# --------------------------------------------------------------------------------------------
# Trellis side.
# --------------------------------------------------------------------------------------------

if trellis is not None:

    class BenchServer(trellis.Server):
        async def init(self) -> None:
            self.count = 0

        async def handle_call(self, request: Any, caller: Any) -> Any:
            if request == "count":
                return self.count
            return request

        async def handle_cast(self, msg: Any) -> None:
            if msg == "crash":
                raise Crash
            self.count += 1

    async def trellis_idle() -> None:
        await trellis.receive()


# --------------------------------------------------------------------------------------------
# Logging configurations for the restart figures.
# --------------------------------------------------------------------------------------------

LOGGERS = ("trellis", "bench.floor")
FLOOR_LOG = logging.getLogger("bench.floor")


def configure_logging(mode: str) -> None:
    """off: both loggers at CRITICAL (the main figure; OTP's 14-17 us is also without logger).
    null: default level, a NullHandler (records created, not formatted).
    devnull: default level, a StreamHandler with a formatter writing to /dev/null."""
    for name in LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
            if isinstance(h, logging.StreamHandler) and h.stream is not sys.stderr:
                h.stream.close()
        lg.setLevel(logging.NOTSET)
        lg.propagate = False
        if mode == "off":
            lg.setLevel(logging.CRITICAL)
            lg.addHandler(logging.NullHandler())
        elif mode == "null":
            lg.addHandler(logging.NullHandler())
        elif mode == "devnull":
            h = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            lg.addHandler(h)
        else:
            raise ValueError(mode)


# --------------------------------------------------------------------------------------------
# In-process benchmarks. Each function runs one repeat and returns one sample.
# --------------------------------------------------------------------------------------------


async def call_floor(n: int, timer: bool = False) -> Sample:
    q, task = await floor_start()
    do_call = floor_call_timer if timer else floor_call
    for _ in range(100):
        await do_call(q, "ping")
    gc.collect()
    sw = Stopwatch()
    for _ in range(n):
        await do_call(q, "ping")
    dt = sw.stop()
    assert await floor_call(q, "ping") == "ping"
    task.cancel()
    return rate(n, dt)


async def call_trellis(n: int) -> Sample:
    pid = await BenchServer.start()
    call = trellis.call
    for _ in range(100):
        await call(pid, "ping")
    gc.collect()
    sw = Stopwatch()
    for _ in range(n):
        await call(pid, "ping")
    dt = sw.stop()
    assert await call(pid, "ping") == "ping"
    await trellis.stop(pid)
    return rate(n, dt)


async def call_trellis_from_process(n: int) -> Sample:
    """The same, with the caller itself a Trellis process (spawned) instead of a plain task."""
    pid = await BenchServer.start()
    done: asyncio.Future[Sample] = asyncio.get_running_loop().create_future()

    async def client() -> None:
        call = trellis.call
        for _ in range(100):
            await call(pid, "ping")
        gc.collect()
        sw = Stopwatch()
        for _ in range(n):
            await call(pid, "ping")
        done.set_result(rate(n, sw.stop()))

    client_pid = trellis.spawn(client)
    ended = asyncio.ensure_future(client_pid.join())
    await asyncio.wait([done, ended], return_when=asyncio.FIRST_COMPLETED)
    if not done.done():
        raise RuntimeError(f"the client process died: {ended.result()!r}")
    await ended
    await trellis.stop(pid)
    return done.result()


async def cast_floor(n: int) -> Sample:
    q, task = await floor_start()
    for _ in range(100):
        floor_cast(q, 1)
    await floor_call(q, "count")
    gc.collect()
    sw = Stopwatch()
    for _ in range(n):
        floor_cast(q, 1)
    got = await floor_call(q, "count")
    dt = sw.stop()
    assert got == n + 100, got
    task.cancel()
    return rate(n, dt)


async def cast_trellis(n: int) -> Sample:
    pid = await BenchServer.start()
    cast, call = trellis.cast, trellis.call
    for _ in range(100):
        cast(pid, 1)
    await call(pid, "count")
    gc.collect()
    sw = Stopwatch()
    for _ in range(n):
        cast(pid, 1)
    got = await call(pid, "count", timeout=None)
    dt = sw.stop()
    assert got == n + 100, got
    await trellis.stop(pid)
    return rate(n, dt)


WARM_RESTARTS = 10


async def restart_floor(k: int, log_mode: str) -> Sample:
    """Median us over k restarts: crash cast sent -> the new actor answered a call."""
    configure_logging(log_mode)
    loop = asyncio.get_running_loop()
    box: dict[str, Any] = {"waiter": loop.create_future()}

    def on_started(q: asyncio.Queue[Any]) -> None:
        w = box["waiter"]
        if w is not None and not w.done():
            w.set_result(q)

    sup = loop.create_task(floor_restart_loop(on_started, FLOOR_LOG))
    q = await box["waiter"]
    lat = Latencies(WARM_RESTARTS, k)
    gc.collect()
    async with asyncio.timeout(120):
        for i in range(WARM_RESTARTS + k):
            lat.tick(i)
            w = box["waiter"] = loop.create_future()
            t0 = now_ns()
            floor_cast(q, "crash")
            q = await w
            await floor_call(q, "ping")
            lat.add(i, now_ns() - t0)
    res = lat.result()
    sup.cancel()
    try:
        await sup
    except asyncio.CancelledError:
        pass
    configure_logging("off")
    return res


async def restart_trellis(k: int, log_mode: str) -> Sample:
    """Median us over k restarts of a one_for_one child with a telemetry handler attached; the
    handler (on every event) learns the new pid from ``child.restarted``."""
    configure_logging(log_mode)
    loop = asyncio.get_running_loop()
    box: dict[str, Any] = {"waiter": None}

    def on_event(ev: dict[str, Any]) -> None:
        if ev["event"] == "child.restarted":
            w = box["waiter"]
            if w is not None and not w.done():
                w.set_result(ev["pid"])

    hid = trellis.telemetry.attach(on_event)
    sup = await trellis.Supervisor.start_link(
        [BenchServer.child_spec(id="w")],
        strategy="one_for_one",
        intensity=10**9,
        period=1.0,
    )
    (info,) = await sup.which_children()
    pid = info.pid
    call, cast = trellis.call, trellis.cast
    await call(pid, "ping")
    lat = Latencies(WARM_RESTARTS, k)
    gc.collect()
    async with asyncio.timeout(120):
        for i in range(WARM_RESTARTS + k):
            lat.tick(i)
            w = box["waiter"] = loop.create_future()
            t0 = now_ns()
            cast(pid, "crash")
            pid = await w
            await call(pid, "ping")
            lat.add(i, now_ns() - t0)
    res = lat.result()
    await sup.stop()
    trellis.telemetry.detach(hid)
    configure_logging("off")
    return res


RFO_CHILDREN = 10


async def rfo_floor(k: int) -> Sample:
    """Median us over k: crash cast to the first of 10 -> the (new) 10th answered a call."""
    configure_logging("off")
    loop = asyncio.get_running_loop()
    box: dict[str, Any] = {"waiter": None}

    def on_restarted(queues: list[Any]) -> None:
        w = box["waiter"]
        if w is not None and not w.done():
            w.set_result(queues)

    sup = FloorRestForOne(RFO_CHILDREN, on_restarted, FLOOR_LOG)
    await sup.start()
    queues = list(sup.queues)
    lat = Latencies(WARM_RESTARTS, k)
    gc.collect()
    async with asyncio.timeout(120):
        for i in range(WARM_RESTARTS + k):
            lat.tick(i)
            w = box["waiter"] = loop.create_future()
            t0 = now_ns()
            floor_cast(queues[0], "crash")
            queues = list(await w)
            await floor_call(queues[-1], "ping")
            lat.add(i, now_ns() - t0)
    res = lat.result()
    await sup.stop()
    return res


async def rfo_trellis(k: int) -> Sample:
    configure_logging("off")
    loop = asyncio.get_running_loop()
    last = f"c{RFO_CHILDREN - 1}"
    box: dict[str, Any] = {"waiter": None}
    pids: dict[str, Any] = {}

    def on_event(ev: dict[str, Any]) -> None:
        if ev["event"] == "child.restarted":
            pids[ev["child_id"]] = ev["pid"]
            w = box["waiter"]
            if ev["child_id"] == last and w is not None and not w.done():
                w.set_result(ev["pid"])

    hid = trellis.telemetry.attach(on_event)
    sup = await trellis.Supervisor.start_link(
        [BenchServer.child_spec(id=f"c{i}") for i in range(RFO_CHILDREN)],
        strategy="rest_for_one",
        intensity=10**9,
        period=1.0,
    )
    for info in await sup.which_children():
        pids[info.id] = info.pid
    call, cast = trellis.call, trellis.cast
    await call(pids[last], "ping")
    lat = Latencies(WARM_RESTARTS, k)
    gc.collect()
    async with asyncio.timeout(120):
        for i in range(WARM_RESTARTS + k):
            lat.tick(i)
            w = box["waiter"] = loop.create_future()
            t0 = now_ns()
            cast(pids["c0"], "crash")
            new_last = await w
            await call(new_last, "ping")
            lat.add(i, now_ns() - t0)
    res = lat.result()
    await sup.stop()
    trellis.telemetry.detach(hid)
    return res


# --------------------------------------------------------------------------------------------
# Spawn benchmark: each repeat is a fresh subprocess (``--child MODE``) so RSS is not polluted.
# --------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _spawn_child(mode: str, n: int) -> dict[str, float]:
    keep: list[Any] = []
    loop = asyncio.get_running_loop()

    async def one_floor() -> None:
        keep.append(await floor_start())

    def one_floor_noack() -> None:
        q: asyncio.Queue[Any] = asyncio.Queue()
        keep.append((q, loop.create_task(floor_actor(q, None))))

    async def one_trellis() -> None:
        keep.append(await BenchServer.start())

    def one_trellis_bare() -> None:
        keep.append(trellis.spawn(trellis_idle))

    async def settle() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    async def batch(count: int) -> None:
        if mode == "floor":
            for _ in range(count):
                await one_floor()
        elif mode == "floor-noack":
            for _ in range(count):
                one_floor_noack()
        elif mode == "trellis":
            for _ in range(count):
                await one_trellis()
        elif mode == "trellis-bare":
            for _ in range(count):
                one_trellis_bare()
        else:
            raise ValueError(mode)
        await settle()

    await batch(200)  # warm up code paths and lazily created structures; kept, not counted
    gc.collect()
    rss0 = rss_bytes()
    sw = Stopwatch()
    await batch(n)
    w, c = sw.stop()
    gc.collect()
    rss1 = rss_bytes()
    assert len(keep) == n + 200
    return {"us": w / 1e3 / n, "us_cpu": c / 1e3 / n, "kib": (rss1 - rss0) / 1024 / n}


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A fresh event loop of the kind ``--loop`` names."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_child(mode: str, n: int, kind: str = "asyncio") -> None:
    loop = new_loop(kind)
    asyncio.set_event_loop(loop)
    result = loop.run_until_complete(_spawn_child(mode, n))
    print(json.dumps(result), flush=True)
    os._exit(0)  # skip tearing down n tasks


def spawn_sample(mode: str, n: int, kind: str = "asyncio") -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            mode,
            "--spawn-n",
            str(n),
            "--loop",
            kind,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Orchestration: interleaved repeats, medians, ratios, report.
# --------------------------------------------------------------------------------------------


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    better: str  # "higher" | "lower"
    floor: str  # variant name of the floor samples
    trellis: str  # variant name of the trellis samples
    target: float | None  # trellis/floor ratio bound (>= for higher, <= for lower)
    main: bool = True


FIGURES = [
    Figure("call", "call round trips/s", "/s", "higher", "call.floor", "call.trellis", 0.9),
    Figure("cast", "casts/s", "/s", "higher", "cast.floor", "cast.trellis", 0.8),
    Figure("spawn_us", "spawn idle server, µs each", "µs", "lower", "spawn.floor.us",
           "spawn.trellis.us", 1.2),
    Figure("spawn_kib", "spawn idle server, KiB RSS each", "KiB", "lower", "spawn.floor.kib",
           "spawn.trellis.kib", 1.2),
    Figure("restart", "crash → restarted child answers, µs (telemetry on, logger off)", "µs",
           "lower", "restart.floor.off", "restart.trellis.off", 1.5),
    Figure("rest_for_one", "rest_for_one x10: first crashes → new last answers, µs", "µs",
           "lower", "rfo.floor", "rfo.trellis", None),
    # Extra figures (no target), to explain the main ones.
    Figure("call_timer", "call/s vs a floor call that arms a 5 s timer", "/s", "higher",
           "call.floor_timer", "call.trellis", None, False),
    Figure("call_from_process", "call/s, caller is a Trellis process", "/s", "higher",
           "call.floor", "call.trellis_proc", None, False),
    Figure("spawn_bare_us", "spawn without init ack (floor: queue+task; trellis.spawn), µs",
           "µs", "lower", "spawn.floor-noack.us", "spawn.trellis-bare.us", None, False),
    Figure("spawn_bare_kib", "spawn without init ack, KiB RSS each", "KiB", "lower",
           "spawn.floor-noack.kib", "spawn.trellis-bare.kib", None, False),
    Figure("restart_null", "crash → restarted answers, µs, logging to a NullHandler", "µs",
           "lower", "restart.floor.null", "restart.trellis.null", None, False),
    Figure("restart_devnull", "crash → restarted answers, µs, formatted log to /dev/null",
           "µs", "lower", "restart.floor.devnull", "restart.trellis.devnull", None, False),
]  # fmt: skip


Samples = dict[str, list[Sample]]
Variants = list[tuple[str, Callable[[], Awaitable[Sample]]]]


async def interleave(variants: Variants, repeats: int, samples: Samples) -> None:
    """One untimed warm-up of each, then repeats alternating the order (A B, B A, ...)."""
    for _, fn in variants:
        await fn()
    for r in range(repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for name, fn in order:
            samples.setdefault(name, []).append(await fn())


async def run_inprocess(cfg: argparse.Namespace, samples: Samples) -> None:
    have = trellis is not None
    only = set(cfg.only.split(",")) if cfg.only else None
    r = cfg.repeats

    def want(name: str) -> bool:
        return only is None or name in only

    configure_logging("off")
    if want("call"):
        v: Variants = [
            ("call.floor", lambda: call_floor(cfg.calls)),
            ("call.floor_timer", lambda: call_floor(cfg.calls, timer=True)),
        ]
        if have:
            v += [
                ("call.trellis", lambda: call_trellis(cfg.calls)),
                ("call.trellis_proc", lambda: call_trellis_from_process(cfg.calls)),
            ]
        await interleave(v, r, samples)
        log_progress("call", samples)
    if want("cast"):
        v = [("cast.floor", lambda: cast_floor(cfg.casts))]
        if have:
            v.append(("cast.trellis", lambda: cast_trellis(cfg.casts)))
        await interleave(v, r, samples)
        log_progress("cast", samples)
    if want("restart"):
        for mode in ("off", "null", "devnull"):
            v = [(f"restart.floor.{mode}", lambda m=mode: restart_floor(cfg.restarts, m))]
            if have:
                v.append(
                    (f"restart.trellis.{mode}", lambda m=mode: restart_trellis(cfg.restarts, m))
                )
            await interleave(v, r if mode == "off" else max(3, r // 2), samples)
        log_progress("restart", samples)
    if want("rest_for_one"):
        v = [("rfo.floor", lambda: rfo_floor(cfg.rfo))]
        if have:
            v.append(("rfo.trellis", lambda: rfo_trellis(cfg.rfo)))
        await interleave(v, r, samples)
        log_progress("rfo", samples)


def run_spawn(cfg: argparse.Namespace, samples: Samples) -> None:
    if cfg.only and "spawn" not in cfg.only.split(","):
        return
    modes = ["floor", "floor-noack"]
    if trellis is not None:
        modes += ["trellis", "trellis-bare"]
    for r in range(cfg.spawn_repeats):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            res = spawn_sample(mode, cfg.spawn_n, cfg.loop)
            samples.setdefault(f"spawn.{mode}.us", []).append((res["us"], res["us_cpu"]))
            samples.setdefault(f"spawn.{mode}.kib", []).append((res["kib"], res["kib"]))
    log_progress("spawn", samples)


def log_progress(what: str, samples: Samples) -> None:
    parts = [
        f"{k}={statistics.median(x[0] for x in v):.4g}"
        for k, v in samples.items()
        if k.startswith(what[:4])
    ]
    print(f"  [{what}] " + " ".join(parts), file=sys.stderr, flush=True)


def fmt(value: float, unit: str) -> str:
    if unit == "/s":
        return f"{value:,.0f}"
    if unit == "KiB":
        return f"{value:.2f}"
    return f"{value:.1f}"


def spread(values: list[float]) -> float:
    """Half the (max - min) range of the repeats, relative to the median, in percent."""
    med = statistics.median(values)
    return 100.0 * (max(values) - min(values)) / 2 / med if med else 0.0


CLOCKS = ("wall", "cpu")


def judge(f: Figure, ratio: float) -> str:
    assert f.target is not None
    ok = ratio >= f.target if f.better == "higher" else ratio <= f.target
    return "PASS" if ok else "FAIL"


def evaluate(samples: Samples, clock: str) -> list[dict[str, Any]]:
    """Per figure and clock: medians, spread, ratio of medians and median of paired ratios
    (repeat i of trellis over repeat i of the floor, which ran next to each other)."""
    rows = []
    for f in FIGURES:
        fl, tr = samples.get(f.floor), samples.get(f.trellis)
        if not fl:
            continue
        row: dict[str, Any] = {
            "key": f.key,
            "title": f.title,
            "unit": f.unit,
            "better": f.better,
            "main": f.main,
            "target": f.target,
        }
        for ci, cname in enumerate(CLOCKS):
            a = [x[ci] for x in fl]
            d: dict[str, Any] = {"floor_median": statistics.median(a), "floor_samples": a}
            d["floor_spread_pct"] = spread(a)
            if tr:
                b = [x[ci] for x in tr]
                d.update(trellis_median=statistics.median(b), trellis_samples=b)
                d["trellis_spread_pct"] = spread(b)
                d["ratio"] = statistics.median(b) / statistics.median(a)
                d["paired_ratio"] = statistics.median(y / x for x, y in zip(a, b, strict=False))
                if f.target is not None:
                    d["result"] = judge(f, d["ratio"])
            row[cname] = d
        if tr and f.target is not None:
            row["result"] = row[clock]["result"]
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]], clock: str) -> str:
    other = "cpu" if clock == "wall" else "wall"
    out = [
        f"| figure | floor | trellis | trellis/floor | ({other}) | target | result |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        unit, d, o = row["unit"], row[clock], row[other]
        fl = f"{fmt(d['floor_median'], unit)} ±{d['floor_spread_pct']:.0f}%"
        if "trellis_median" in d:
            tr = f"{fmt(d['trellis_median'], unit)} ±{d['trellis_spread_pct']:.0f}%"
            ratio, ratio2 = f"{d['ratio']:.2f}x", f"{o['ratio']:.2f}x"
        else:
            tr, ratio, ratio2 = "n/a", "n/a", "n/a"
        if row["target"] is None:
            target = "—"
        else:
            target = ("≥ " if row["better"] == "higher" else "≤ ") + f"{row['target']}x"
        title = row["title"] if row["main"] else f"*{row['title']}*"
        res = row.get("result", "")
        out.append(f"| {title} | {fl} | {tr} | {ratio} | {ratio2} | {target} | {res} |")
    return "\n".join(out)


def environment(argv: list[str]) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "command": shlex.join(argv),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "trellis": getattr(trellis, "__version__", "present") if trellis else TRELLIS_ERROR,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (~10 s), fewer repeats")
    p.add_argument("--repeats", type=int, help="interleaved repeats per in-process figure")
    p.add_argument("--spawn-repeats", type=int, help="subprocess repeats per spawn variant")
    p.add_argument("--calls", type=int, help="calls per repeat")
    p.add_argument("--casts", type=int, help="casts per repeat")
    p.add_argument("--restarts", type=int, help="restarts per repeat (median within a repeat)")
    p.add_argument("--rfo", type=int, help="rest_for_one restarts per repeat")
    p.add_argument("--spawn-n", type=int, help="servers spawned per subprocess (20,000)")
    p.add_argument("--only", help="comma list: call,cast,spawn,restart,rest_for_one")
    p.add_argument(
        "--clock",
        choices=CLOCKS,
        default="wall",
        help="clock for the table and PASS/FAIL (both are always recorded; cpu = process CPU "
        "time, immune to other processes on a busy machine)",
    )
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop for every figure, floor and Trellis alike (uvloop must be installed)",
    )
    p.add_argument("--json", type=Path, help="where to write the JSON (default bench/results/)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    cfg = p.parse_args(argv)
    full = {
        "repeats": 9,
        "spawn_repeats": 7,
        "calls": 20_000,
        "casts": 100_000,
        "restarts": 300,
        "rfo": 100,
        "spawn_n": 20_000,
    }
    quick = {
        "repeats": 3,
        "spawn_repeats": 3,
        "calls": 5_000,
        "casts": 20_000,
        "restarts": 100,
        "rfo": 30,
        "spawn_n": 20_000,
    }
    for k, v in (quick if cfg.quick else full).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse(sys.argv[1:] if argv is None else argv)
    if cfg.child:
        run_child(cfg.child, cfg.spawn_n, cfg.loop)
        return 0
    env = environment(getattr(sys, "orig_argv", sys.argv))
    print(f"command: {env['command']}")
    print(f"date: {env['date']}; Python {env['python']} ({env['implementation']}); "
          f"{env['cpus']} CPUs: {env['cpu']}; {env['platform']}; loop: {cfg.loop}")  # fmt: skip
    if trellis is None:
        print(f"trellis not importable ({TRELLIS_ERROR}): floor figures only")
    print(f"config: {json.dumps({k: v for k, v in vars(cfg).items() if k != 'json'}, default=str)}")
    t_start = time.monotonic()
    samples: dict[str, list[float]] = {}
    with asyncio.Runner(loop_factory=lambda: new_loop(cfg.loop)) as runner:
        runner.run(run_inprocess(cfg, samples))
    run_spawn(cfg, samples)
    elapsed = time.monotonic() - t_start
    rows = evaluate(samples, cfg.clock)
    share = TIMED[1] / TIMED[0] if TIMED[0] else 1.0
    print()
    print(render(rows, cfg.clock))
    print()
    print(
        f"Medians of {cfg.repeats} interleaved repeats ({cfg.spawn_repeats} fresh subprocesses "
        f"per spawn variant, {cfg.spawn_n:,} servers each), by the {cfg.clock} clock; ± is half "
        f"the min-max range; the next column is the ratio by the other clock. Italic rows have "
        f"no target. In-process timed sections got {share:.0%} of a CPU. Took {elapsed:.0f} s."
    )
    if share < 0.9:
        print(
            "WARNING: other processes took the CPU during timing; wall-clock figures are noisy "
            "(compare the CPU-time ratios, or rerun on an idle machine)."
        )
    doc = {
        "environment": env,
        "config": vars(cfg),
        "elapsed_s": elapsed,
        "cpu_share": share,
        "figures": rows,
    }
    path = cfg.json
    if path is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        path = RESULTS_DIR / f"core-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"JSON: {path}")
    failed = [r["key"] for r in rows if r.get("result") == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""trellis.worker children and per-child restart Backoff."""

from __future__ import annotations

import asyncio
import enum
from typing import Any

import pytest

import trellis
from trellis.testing import VirtualClock, capture_telemetry, wait_restarted

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class Boom(Exception):
    """A crash reason."""


class Job:
    """A worker body: records each run's arguments and start time, then follows ``plan``
    ("crash", "return", or waits) for that run (1-based); later runs wait forever."""

    def __init__(self, *plan: str, clock: VirtualClock | None = None) -> None:
        self.plan = list(plan)
        self.runs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.times: list[float] = []
        self.clock = clock
        self.release = asyncio.Event()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.runs.append((args, kwargs))
        if self.clock is not None:
            self.times.append(self.clock.now())
        step = self.plan[len(self.runs) - 1] if len(self.runs) <= len(self.plan) else "wait"
        await asyncio.sleep(0)
        if step == "crash":
            raise Boom(f"run {len(self.runs)}")
        if step == "return":
            return len(self.runs)
        await self.release.wait()
        return len(self.runs)


def val(x: Any) -> Any:
    return x.value if isinstance(x, enum.Enum) else x


async def join(pid: trellis.Pid, timeout: float = 5.0) -> Any:
    return await asyncio.wait_for(pid.join(), timeout)


async def stop_quietly(*pids: Any) -> None:
    for pid in pids:
        if pid is None or not pid.alive:
            continue
        try:
            await pid.stop()
        except trellis.NoProc:
            pass


async def pid_of(sup: Any, id: Any) -> Any:
    return (await sup.which_child(id)).pid


def events(cap: Any, name: str) -> list[dict[str, Any]]:
    return [e for e in cap.events if e["event"] == name]


async def wait_count(cap: Any, name: str, n: int, timeout: float = 5.0) -> dict[str, Any]:
    """Yield to the loop until ``n`` events ``name`` arrived (bounded in real time); return
    the n-th."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(events(cap, name)) < n:
        assert loop.time() < deadline, f"fewer than {n} {name} events"
        await asyncio.sleep(0)
    return events(cap, name)[n - 1]


async def until(cond: Any, what: str, timeout: float = 5.0) -> None:
    """Yield to the loop until ``cond()`` holds (bounded in real time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------
# worker
# ---------------------------------------------------------------------------


async def test_worker_return_is_normal_exit() -> None:
    """SPEC 27: a worker whose coroutine returns ends NORMAL; a transient one is not
    restarted (pid None, spec kept)."""
    job = Job("wait")
    sup = await trellis.Supervisor.start_link([trellis.worker("w", job, restart="transient")])
    try:
        with capture_telemetry() as cap:
            pid = await pid_of(sup, "w")
            job.release.set()
            assert await join(pid) == trellis.NORMAL
            ev = await cap.wait_for("child.exited", child_id="w")
            assert ev["reason"] == trellis.NORMAL
            assert ev["restart"] is False
            assert (await sup.which_child("w")).pid is None
            assert len(job.runs) == 1
    finally:
        await stop_quietly(sup)


async def test_worker_raise_crashes_and_restarts() -> None:
    """SPEC 26: a worker whose coroutine raises crashes with that exception as its exit
    reason, and a permanent one is restarted."""
    job = Job("crash", "wait")
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link([trellis.worker("w", job)])
        try:
            ev = await wait_count(cap, "child.exited", 1)
            assert isinstance(ev["reason"], Boom)
            assert str(ev["reason"]) == "run 1"
            assert ev["restart"] is True
            assert ev["pid"].reason is ev["reason"]
            await wait_count(cap, "child.restarted", 1)
            pid = await pid_of(sup, "w")
            assert pid != ev["pid"]
            assert pid.alive
            await until(lambda: len(job.runs) >= 2, "the second run")
            assert len(job.runs) == 2
        finally:
            await stop_quietly(sup)


async def test_worker_transient_crash_then_return() -> None:
    """SPEC 27: a transient worker that crashes is restarted, and is not restarted once it
    returns (pid None)."""
    job = Job("crash", "return")
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link(
            [trellis.worker("w", job, restart="transient")], intensity=5
        )
        try:
            first = await wait_count(cap, "child.exited", 1)
            second = await wait_count(cap, "child.exited", 2)
            assert isinstance(first["reason"], Boom)
            assert first["restart"] is True
            assert second["reason"] == trellis.NORMAL
            assert second["restart"] is False
            for _ in range(20):
                await asyncio.sleep(0)
            assert len(job.runs) == 2
            assert (await sup.which_child("w")).pid is None
            assert sup.alive
        finally:
            await stop_quietly(sup)


async def test_permanent_worker_restarted_after_return() -> None:
    """SPEC 26: a permanent worker is restarted even after returning normally."""
    job = Job("return", "wait")
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link([trellis.worker("w", job)])
        try:
            ev = await wait_count(cap, "child.exited", 1)
            assert ev["reason"] == trellis.NORMAL
            assert ev["restart"] is True
            ev = await wait_count(cap, "child.restarted", 1)
            assert ev["child_id"] == "w"
            await until(lambda: len(job.runs) >= 2, "the second run")
            assert len(job.runs) == 2
            assert (await pid_of(sup, "w")).alive
        finally:
            await stop_quietly(sup)


async def test_worker_args_kwargs_and_name() -> None:
    """worker(id, fn, *args, name=..., **kwargs) runs fn(*args, **kwargs) in a child
    registered under name, with the given restart type in its spec."""
    job = Job("wait")
    sup = await trellis.Supervisor.start_link(
        [trellis.worker("w", job, 1, "two", restart="transient", name="test_worker_named", k=3)]
    )
    try:
        pid = await pid_of(sup, "w")
        for _ in range(10):
            await asyncio.sleep(0)
        assert job.runs == [((1, "two"), {"k": 3})]
        assert trellis.whereis("test_worker_named") == pid
        spec = await sup.get_childspec("w")
        assert spec.id == "w"
        assert val(spec.restart) == "transient"
    finally:
        await stop_quietly(sup)


# ---------------------------------------------------------------------------
# Backoff
# ---------------------------------------------------------------------------


async def test_backoff_never_delays_first_start(clock: VirtualClock) -> None:
    """Backoff: the first start is never delayed."""
    job = Job(clock=clock)
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link(
            [trellis.worker("w", job, backoff=trellis.Backoff(min=10.0, max=10.0))]
        )
        try:
            pid = await pid_of(sup, "w")
            assert isinstance(pid, trellis.Pid)
            assert pid.alive
            await clock.settle()
            assert job.times == [0.0]
            assert events(cap, "child.backoff") == []
        finally:
            await stop_quietly(sup)


async def test_backoff_delays_grow_and_cap(clock: VirtualClock) -> None:
    """Backoff: restart n waits min*factor**(n-1) capped at max (1, 2, 4, 5, 5); the child
    shows RESTARTING (not active) during the wait and starts only when it is over."""
    job = Job(clock=clock)
    backoff = trellis.Backoff(min=1.0, max=5.0, factor=2.0)
    sup = await trellis.Supervisor.start_link(
        [trellis.worker("w", job, backoff=backoff), trellis.worker("other", Job())],
        intensity=100,
        period=1000.0,
    )
    try:
        with capture_telemetry() as cap:
            for n, expected in enumerate([1.0, 2.0, 4.0, 5.0, 5.0], start=1):
                old = await pid_of(sup, "w")
                crashed_at = clock.now()
                trellis.exit(old, Boom("crash"))
                ev = await wait_count(cap, "child.backoff", n)
                assert ev["delay"] == pytest.approx(expected)
                assert ev["child_id"] == "w"
                assert (await sup.which_child("w")).pid == trellis.RESTARTING
                c = await sup.count_children()
                assert (c.specs, c.active, c.workers) == (2, 1, 2)
                await clock.advance(expected - 0.01)
                assert (await sup.which_child("w")).pid == trellis.RESTARTING
                assert len(job.times) == n
                await clock.advance(0.02)
                new = await wait_restarted(sup, "w", old)
                assert isinstance(new, trellis.Pid)
                await clock.settle()
                assert len(job.times) == n + 1
                assert job.times[-1] == pytest.approx(crashed_at + expected, abs=0.02)
    finally:
        await stop_quietly(sup)


async def _collect_delays(clock: VirtualClock, backoff: Any, n: int) -> list[float]:
    sup = await trellis.Supervisor.start_link(
        [trellis.worker("w", Job(), backoff=backoff)], intensity=100, period=1000.0
    )
    try:
        with capture_telemetry(["child.backoff"]) as cap:
            for i in range(1, n + 1):
                old = await pid_of(sup, "w")
                trellis.exit(old, Boom("crash"))
                ev = await wait_count(cap, "child.backoff", i)
                await clock.advance(ev["delay"] + 0.01)
                await wait_restarted(sup, "w", old)
            return [e["delay"] for e in cap.events]
    finally:
        await stop_quietly(sup)


async def test_backoff_seeded_jitter_is_reproducible(clock: VirtualClock) -> None:
    """Backoff: jitter scales each delay by a factor in [1-jitter, 1+jitter]; the same seed
    gives the same delays, another seed different ones."""

    def make(seed: int) -> Any:
        return trellis.Backoff(min=1.0, max=100.0, factor=2.0, jitter=0.5, seed=seed)

    first = await _collect_delays(clock, make(42), 4)
    second = await _collect_delays(clock, make(42), 4)
    other = await _collect_delays(clock, make(43), 4)
    assert first == second
    assert first != other
    for delays in (first, other):
        for n, d in enumerate(delays, start=1):
            base = 2.0 ** (n - 1)
            assert base * 0.5 <= d <= base * 1.5
    assert first != [1.0, 2.0, 4.0, 8.0]


async def test_backoff_reset_after_uptime(clock: VirtualClock) -> None:
    """Backoff: a child that stayed up reset_after seconds starts again from the min delay;
    a shorter uptime does not reset."""
    backoff = trellis.Backoff(min=1.0, max=100.0, factor=2.0, reset_after=10.0)
    sup = await trellis.Supervisor.start_link(
        [trellis.worker("w", Job(), backoff=backoff)], intensity=100, period=1000.0
    )
    try:
        with capture_telemetry(["child.backoff"]) as cap:

            async def crash_and_restart(n: int) -> float:
                old = await pid_of(sup, "w")
                trellis.exit(old, Boom("crash"))
                ev = await wait_count(cap, "child.backoff", n)
                await clock.advance(ev["delay"] + 0.01)
                await wait_restarted(sup, "w", old)
                return float(ev["delay"])

            assert await crash_and_restart(1) == pytest.approx(1.0)
            await clock.advance(5.0)  # uptime 5 < reset_after
            assert await crash_and_restart(2) == pytest.approx(2.0)
            await clock.advance(10.5)  # uptime > reset_after
            assert await crash_and_restart(3) == pytest.approx(1.0)
            assert await crash_and_restart(4) == pytest.approx(2.0)
    finally:
        await stop_quietly(sup)


async def test_backoff_restarts_count_toward_intensity(clock: VirtualClock) -> None:
    """SPEC 43 + Backoff: delayed restarts still count toward intensity: with intensity 2 the
    third crash makes the supervisor give up (SHUTDOWN) without a third restart."""
    job = Job(clock=clock)
    sup = await trellis.Supervisor.start_link(
        [trellis.worker("w", job, backoff=trellis.Backoff(min=1.0, max=1.0))],
        intensity=2,
        period=1000.0,
    )
    try:
        with capture_telemetry() as cap:
            for n in (1, 2):
                old = await pid_of(sup, "w")
                trellis.exit(old, Boom("crash"))
                await wait_count(cap, "child.backoff", n)
                await clock.advance(1.01)
                await wait_restarted(sup, "w", old)
            trellis.exit(await pid_of(sup, "w"), Boom("crash"))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while sup.alive:
                assert loop.time() < deadline, "supervisor did not give up"
                await clock.advance(0.5)
            assert await join(sup) == trellis.SHUTDOWN
            await clock.settle()
            assert len(job.times) == 3
            assert len(events(cap, "supervisor.gave_up")) == 1
    finally:
        await stop_quietly(sup)


async def test_terminate_child_cancels_pending_backoff_restart(clock: VirtualClock) -> None:
    """SPEC 46 + Backoff: terminate_child on a child waiting out its backoff cancels the
    restart (pid None; it does not come back when the delay passes)."""
    job = Job(clock=clock)
    sup = await trellis.Supervisor.start_link(
        [trellis.worker("w", job, backoff=trellis.Backoff(min=2.0, max=2.0))],
        intensity=100,
    )
    try:
        with capture_telemetry(["child.backoff"]) as cap:
            trellis.exit(await pid_of(sup, "w"), Boom("crash"))
            await wait_count(cap, "child.backoff", 1)
            assert await sup.terminate_child("w") is None
            assert (await sup.which_child("w")).pid is None
            await clock.advance(5.0)
            assert (await sup.which_child("w")).pid is None
            assert len(job.times) == 1
            new = await sup.restart_child("w")
            assert isinstance(new, trellis.Pid)
            assert new.alive
    finally:
        await stop_quietly(sup)

"""Supervisor lifecycle under stress: backoff that never overflows, and a tree that is
stopping never restarts a child nor starts one it had not started yet."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import trellis
from trellis._core import _stopping
from trellis.testing import VirtualClock, capture_telemetry


class Boom(Exception):
    """A crash reason."""


async def crash_at_once() -> None:
    await asyncio.sleep(0)
    raise Boom("crash")


async def wait_forever() -> None:
    await asyncio.Event().wait()


async def until(cond: Callable[[], bool]) -> None:
    """Yield to the loop until ``cond()`` holds (bounded)."""
    for _ in range(100_000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


# ---------------------------------------------------------------------------
# Backoff: the exponent is capped
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1024, 1025, 1100, 10**6, 10**30])
def test_backoff_delay_stays_at_max_for_huge_n(n: int) -> None:
    """Restart 1,025 of a 2x backoff used to raise OverflowError (2.0**1024): from the
    restart where the delay reaches max on, every restart waits max, forever."""
    b = trellis.Backoff(min=0.1, max=30.0, factor=2.0)
    assert b.delay(n) == 30.0
    jittered = trellis.Backoff(min=0.1, max=30.0, factor=2.0, jitter=0.5, seed=1)

    d = jittered.delay(n, random.Random(1))
    assert 15.0 <= d <= 45.0
    assert math.isfinite(d)


def test_backoff_delay_unchanged_below_the_cap() -> None:
    b = trellis.Backoff(min=1.0, max=5.0, factor=2.0)
    assert [b.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert trellis.Backoff(min=0.0, max=5.0).delay(10**6) == 0.0
    assert trellis.Backoff(min=3.0, max=3.0, factor=10.0).delay(10**6) == 3.0
    assert trellis.Backoff(min=2.0, max=9.0, factor=1.0).delay(10**6) == 2.0
    assert trellis.Backoff(min=1.0, max=1e300, factor=1e10).delay(10**6) == 1e300


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("backoff.min", {"min": math.nan}),
        ("backoff.max", {"max": math.inf}),
        ("backoff.max", {"max": math.nan}),
        ("backoff.factor", {"factor": math.inf}),
        ("backoff.jitter", {"jitter": math.nan}),
        ("backoff.reset_after", {"reset_after": math.inf}),
    ],
)
def test_backoff_rejects_non_finite(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(trellis.ChildSpecError) as err:
        trellis.Backoff(**kwargs)
    assert err.value.field == field


async def test_supervisor_keeps_retrying_at_max_after_1100_backoff_restarts(
    clock: VirtualClock,
) -> None:
    """1,100 backoff restarts of a child that crashes at once (8.5 h of a failing
    dependency with the README's backoff): the supervisor keeps retrying at max instead of
    crashing on an OverflowError at restart 1,025."""
    backoff = trellis.Backoff(min=0.001, max=2.0, factor=2.0)
    with capture_telemetry(["child.backoff", "supervisor.gave_up"]) as cap:
        sup = await trellis.Supervisor.start(
            [trellis.worker("flaky", wait_forever, backoff=backoff)], intensity=5, period=1.0
        )
        try:
            pid = (await sup.which_child("flaky")).pid
            trellis.exit(pid, Boom("first crash"))
            await clock.settle()
            n = 0
            while len(cap.named("child.backoff")) < 1100:
                n += 1
                assert n < 5000, "restarts stopped happening"
                live = (await sup.which_child("flaky")).pid
                if isinstance(live, trellis.Pid):
                    trellis.exit(live, Boom("crash"))
                await clock.advance(2.0)
            assert sup.alive
            delays = [e["delay"] for e in cap.named("child.backoff")]
            assert delays[-1] == 2.0
            assert delays[1099] == 2.0
            assert cap.named("supervisor.gave_up") == []
        finally:
            await sup.stop()


# ---------------------------------------------------------------------------
# A stopping tree: nothing restarts, pending starts are cancelled
# ---------------------------------------------------------------------------


@pytest.fixture
async def tree_stop() -> AsyncIterator[_stopping.TreeStop]:
    """The stop flag trellis.run arms for its loop."""
    loop = asyncio.get_running_loop()
    stop = _stopping.arm(loop)
    try:
        yield stop
    finally:
        _stopping.disarm(loop, stop)


class Slow(trellis.Server):
    """A server whose init records its start and then waits until released."""

    async def init(self, log: list[str], name: str, gate: asyncio.Event | None) -> None:
        log.append(f"start {name}")
        if gate is not None:
            await gate.wait()


def slow_spec(log: list[str], name: str, gate: asyncio.Event | None = None) -> trellis.ChildSpec:
    return trellis.ChildSpec(name, Slow.start_link, args=(log, name, gate))


async def test_a_stopping_tree_records_exits_and_restarts_nothing(
    tree_stop: _stopping.TreeStop,
) -> None:
    """Once the tree is stopping, every child exit is recorded with restart=False and
    nothing restarts: five crashes at once (over intensity 3) make no gave_up."""
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start(
            [trellis.worker(f"w{i}", wait_forever) for i in range(5)], intensity=3, period=5.0
        )
        try:
            pids = [c.pid for c in await sup.which_children()]
            tree_stop.request()
            for pid in pids:
                trellis.exit(pid, Boom("SIGTERM"))
            for _ in range(50):
                await asyncio.sleep(0)
            assert sup.alive
            exited = cap.named("child.exited")
            assert len(exited) == 5
            assert all(e["restart"] is False for e in exited)
            assert cap.named("child.restarted") == []
            assert cap.named("supervisor.gave_up") == []
            counts = await sup.count_children()
            assert (counts.specs, counts.active) == (5, 0)
        finally:
            await sup.stop()


async def test_a_stopping_tree_drops_pending_backoff_restarts(
    clock: VirtualClock, tree_stop: _stopping.TreeStop
) -> None:
    """A restart waiting on its backoff when the stop comes never happens."""
    backoff = trellis.Backoff(min=1.0, max=1.0)
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start([trellis.worker("w", wait_forever, backoff=backoff)])
        try:
            trellis.exit((await sup.which_child("w")).pid, Boom("crash"))
            await cap.wait_for("child.backoff")
            tree_stop.request()
            await clock.advance(5.0)
            assert cap.named("child.restarted") == []
            assert (await sup.which_child("w")).pid is None
        finally:
            await sup.stop()


async def test_a_stop_during_the_start_cancels_it_and_stops_the_started_in_reverse(
    tree_stop: _stopping.TreeStop,
) -> None:
    """A stop while a supervisor (and a supervisor inside it) start their children: the
    start in progress is cancelled at once, no later child starts, and the children
    started stop in reverse order; the start ends with SHUTDOWN."""
    log: list[str] = []
    never = asyncio.Event()
    inner = trellis.Supervisor.child_spec(
        [slow_spec(log, "i1"), slow_spec(log, "i2", never), slow_spec(log, "i3")], id="inner"
    )
    children = [slow_spec(log, "a"), slow_spec(log, "b"), inner, slow_spec(log, "c")]
    with capture_telemetry() as cap:
        start = asyncio.ensure_future(trellis.Supervisor.start(children, name="top"))
        await until(lambda: "start i2" in log)
        tree_stop.request()
        async with asyncio.timeout(5):
            with pytest.raises(trellis.StartError) as err:
                await start
    assert err.value.reason is trellis.SHUTDOWN
    assert log == ["start a", "start b", "start i1", "start i2"]
    stopped = [e["child_id"] for e in cap.named("child.terminated")]
    assert stopped == ["i1", "b", "a"]
    cancelled = [(e["supervisor"], e["child_id"]) for e in cap.named("supervisor.start_cancelled")]
    assert cancelled == [("top/inner", "i2"), ("top", "inner")]
    assert cap.named("child.started", child_id="c") == []


async def test_without_a_tree_stop_a_start_is_not_cancelled() -> None:
    """A loop that trellis.run did not arm keeps OTP's behaviour: starts run to the end."""
    log: list[str] = []
    gate = asyncio.Event()
    start = asyncio.ensure_future(
        trellis.Supervisor.start([slow_spec(log, "a", gate), slow_spec(log, "b")])
    )
    await until(lambda: "start a" in log)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not start.done()
    gate.set()
    sup = await start
    assert log == ["start a", "start b"]
    await sup.stop()


class SlowSecondStart(trellis.Server):
    """Starts at once the first time; later starts wait on ``gate`` (a slow restart)."""

    async def init(self, log: list[str], gate: asyncio.Event) -> None:
        log.append("start")
        if len(log) > 1:
            await gate.wait()


async def test_a_stop_cancels_a_slow_restart(tree_stop: _stopping.TreeStop) -> None:
    """A restart that takes long (a child waiting for readiness) does not hold up the
    stop: it is cancelled at once, never retried, and the supervisor stops."""
    log: list[str] = []
    gate = asyncio.Event()
    spec = trellis.ChildSpec("slow", SlowSecondStart.start_link, args=(log, gate))
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start([spec, trellis.worker("other", wait_forever)])
        trellis.exit((await sup.which_child("slow")).pid, Boom("crash"))
        await until(lambda: len(log) == 2)  # the restart is in progress
        tree_stop.request()
        async with asyncio.timeout(5):
            await sup.stop()
    assert log == ["start", "start"]
    assert cap.named("child.restarted") == []
    assert cap.named("child.start_failed") == []
    assert [e["child_id"] for e in cap.named("supervisor.start_cancelled")] == ["slow"]
    assert [e["child_id"] for e in cap.named("child.terminated")] == ["other"]  # slow never ran


class Recorder(trellis.Server):
    """Records its terminate, so a stop in order can be told from a kill."""

    trap_exits = True

    async def init(self, log: list[Any]) -> None:
        self.log = log

    async def terminate(self, reason: Any) -> None:
        self.log.append(("terminate", reason))


async def test_a_start_that_just_finished_is_kept_and_stopped_in_order(
    tree_stop: _stopping.TreeStop,
) -> None:
    """The stop request comes in the loop turn where a child's start has finished but
    its supervisor has not resumed yet: the child is not killed as a half-started one;
    it is kept and stopped in order (terminate runs), and the start is cancelled at the
    next child."""
    log: list[Any] = []
    loop = asyncio.get_running_loop()

    async def start_then_stop() -> trellis.Pid:
        pid: trellis.Pid = await Recorder.start_link(log)
        done = loop.create_future()

        def finish_and_stop() -> None:
            done.set_result(None)  # the start is over: the supervisor is scheduled...
            tree_stop.request()  # ...and the stop comes before it resumes

        loop.call_soon(finish_and_stop)
        await done
        return pid

    children = [
        trellis.ChildSpec("r", start_then_stop),
        trellis.worker("never", wait_forever),
    ]
    with capture_telemetry() as cap:
        async with asyncio.timeout(5):
            with pytest.raises(trellis.StartError):
                await trellis.Supervisor.start(children)
    assert [e["child_id"] for e in cap.named("supervisor.start_cancelled")] == ["never"]
    assert [e["child_id"] for e in cap.named("child.terminated")] == ["r"]
    assert log == [("terminate", trellis.SHUTDOWN)]

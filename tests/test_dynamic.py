"""DynamicSupervisor conformance (SPEC I, 80-85)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import trellis
from trellis.testing import capture_telemetry

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class Boom(Exception):
    """A crash reason."""


async def _idle() -> None:
    while True:
        msg = await trellis.receive()
        if msg == "normal":
            return


def start_idle(*_args: Any) -> trellis.Pid:
    return trellis.spawn(_idle, link=True)


def start_ignore(*_args: Any) -> Any:
    return trellis.IGNORE


class Script:
    """A start function whose successive calls follow ``steps`` ("pid", "ignore" or an
    exception to raise), then start idle processes; it records each call's arguments."""

    def __init__(self, *steps: Any, default: Any = "pid") -> None:
        self.steps = list(steps)
        self.default = default
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        step = self.steps.pop(0) if self.steps else self.default
        if isinstance(step, BaseException):
            raise step
        if step == "ignore":
            return trellis.IGNORE
        return trellis.spawn(_idle, link=True)


class Flaky:
    """An async start function that fails while ``fail`` is set (yielding once per call)."""

    def __init__(self) -> None:
        self.fail = False
        self.calls = 0

    async def __call__(self, *_args: Any) -> trellis.Pid:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail:
            raise Boom("cannot start")
        return trellis.spawn(_idle, link=True)


def spec(id: Any = "c", start: Any = start_idle, **kw: Any) -> trellis.ChildSpec:
    return trellis.ChildSpec(id, start, **kw)


async def join(pid: trellis.Pid, timeout: float = 5.0) -> Any:
    return await asyncio.wait_for(pid.join(), timeout)


async def stop_quietly(*pids: Any) -> None:
    for pid in pids:
        if pid is None or not pid.alive:
            continue
        try:
            if hasattr(pid, "stop"):
                await pid.stop()
            else:
                trellis.exit(pid, trellis.KILL)
                await join(pid)
        except trellis.NoProc:
            pass


async def wait_count(cap: Any, name: str, n: int, timeout: float = 5.0) -> None:
    """Wait (yielding to the loop, bounded in real time) until ``n`` events ``name`` arrived."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sum(e["event"] == name for e in cap.events) < n:
        assert loop.time() < deadline, f"fewer than {n} {name} events"
        await asyncio.sleep(0)


async def active_workers(sup: Any) -> tuple[int, int]:
    c = await sup.count_children()
    return (c.active, c.workers)


# ---------------------------------------------------------------------------
# SPEC 80: flags
# ---------------------------------------------------------------------------


async def test_only_one_for_one_strategy() -> None:
    """SPEC 80: DynamicSupervisor accepts only one_for_one; any other strategy raises
    InvalidStrategy naming the value."""
    sup = await trellis.DynamicSupervisor.start_link(strategy="one_for_one")
    await stop_quietly(sup)
    for bad in ("one_for_all", "rest_for_one", "simple_one_for_one", "bogus"):
        with pytest.raises(trellis.InvalidStrategy) as ei:
            await trellis.DynamicSupervisor.start_link(strategy=bad)
        assert ei.value.value == bad


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"intensity": -1}, trellis.InvalidIntensity),
        ({"intensity": 1.5}, trellis.InvalidIntensity),
        ({"intensity": "3"}, trellis.InvalidIntensity),
        ({"period": 0}, trellis.InvalidPeriod),
        ({"period": -1.0}, trellis.InvalidPeriod),
        ({"period": "5"}, trellis.InvalidPeriod),
        ({"max_children": -1}, trellis.InvalidMaxChildren),
        ({"max_children": "many"}, trellis.InvalidMaxChildren),
        ({"extra_args": 42}, trellis.InvalidExtraArguments),
    ],
)
async def test_invalid_flags(kwargs: dict[str, Any], exc: type[Exception]) -> None:
    """SPEC 80: bad intensity, period, max_children or extra_args raise the matching
    SupervisorFlagsError subclass carrying the bad value."""
    with pytest.raises(exc) as ei:
        await trellis.DynamicSupervisor.start_link(**kwargs)
    assert isinstance(ei.value, trellis.SupervisorFlagsError)
    assert ei.value.value == next(iter(kwargs.values()))


# ---------------------------------------------------------------------------
# SPEC 81: max_children
# ---------------------------------------------------------------------------


async def test_max_children() -> None:
    """SPEC 81: with max_children children, start_child raises MaxChildren; after one is
    terminated a new one can start."""
    sup = await trellis.DynamicSupervisor.start_link(max_children=2)
    try:
        p1 = await sup.start_child(spec())
        await sup.start_child(spec())
        with pytest.raises(trellis.MaxChildren):
            await sup.start_child(spec())
        assert await active_workers(sup) == (2, 2)
        await sup.terminate_child(p1)
        assert isinstance(await sup.start_child(spec()), trellis.Pid)
    finally:
        await stop_quietly(sup)


async def test_max_children_counts_restarting_child() -> None:
    """SPEC 81, 84: a child whose restart is failing still counts toward max_children, and
    terminate_child(old pid) works on it (ending the retries)."""
    flaky = Flaky()
    sup = await trellis.DynamicSupervisor.start_link(max_children=2, intensity=100_000)
    try:
        with capture_telemetry() as cap:
            p1 = await sup.start_child(spec("f", flaky))
            await sup.start_child(spec())
            flaky.fail = True
            trellis.exit(p1, Boom("crash"))
            await cap.wait_for("child.start_failed")
            with pytest.raises(trellis.MaxChildren):
                await sup.start_child(spec())
            assert await active_workers(sup) == (1, 2)
            assert await sup.terminate_child(p1) is None
            assert await active_workers(sup) == (1, 1)
            calls = flaky.calls
            for _ in range(50):
                await asyncio.sleep(0)
            assert flaky.calls == calls, "retries went on after terminate_child"
            assert isinstance(await sup.start_child(spec()), trellis.Pid)
    finally:
        await stop_quietly(sup)


# ---------------------------------------------------------------------------
# SPEC 82: extra_args
# ---------------------------------------------------------------------------


async def test_extra_args_prepended_on_start_and_restart() -> None:
    """SPEC 82: extra_args are prepended to the spec's args on start and on every restart."""
    script = Script()
    sup = await trellis.DynamicSupervisor.start_link(extra_args=("x", 1))
    try:
        with capture_telemetry() as cap:
            pid = await sup.start_child(spec("c", script, args=("y",)))
            assert script.calls == [("x", 1, "y")]
            trellis.exit(pid, Boom("crash"))
            await cap.wait_for("child.restarted")
            assert script.calls == [("x", 1, "y"), ("x", 1, "y")]
            new = [i.pid for i in await sup.which_children()]
            assert len(new) == 1
            assert new[0] != pid
            trellis.exit(new[0], trellis.KILL)
            await wait_count(cap, "child.restarted", 2)
            assert script.calls == [("x", 1, "y")] * 3
    finally:
        await stop_quietly(sup)


# ---------------------------------------------------------------------------
# SPEC 83: ids, ignore, errors
# ---------------------------------------------------------------------------


async def test_duplicate_ids_are_fine() -> None:
    """SPEC 61, 83: child ids are ignored, so the same id can start many children; their
    ids are reported as None."""
    sup = await trellis.DynamicSupervisor.start_link()
    try:
        p1 = await sup.start_child(spec("same"))
        p2 = await sup.start_child(spec("same"))
        assert p1 != p2
        assert p1.alive
        assert p2.alive
        infos = await sup.which_children()
        assert {i.pid for i in infos} == {p1, p2}
        assert [i.id for i in infos] == [None, None]
        assert await active_workers(sup) == (2, 2)
    finally:
        await stop_quietly(sup)


async def test_start_child_ignore_stores_nothing() -> None:
    """SPEC 83: a start returning IGNORE gives IGNORE from start_child and stores nothing."""
    sup = await trellis.DynamicSupervisor.start_link()
    try:
        assert await sup.start_child(spec("i", start_ignore)) is trellis.IGNORE
        assert await sup.which_children() == []
        assert await active_workers(sup) == (0, 0)
    finally:
        await stop_quietly(sup)


async def test_start_child_raising_gives_start_error() -> None:
    """SPEC 83: a start that raises gives StartError whose reason is the exception; nothing
    is stored and the supervisor keeps working."""
    boom = Boom("no")
    sup = await trellis.DynamicSupervisor.start_link()
    try:
        with pytest.raises(trellis.StartError) as ei:
            await sup.start_child(spec("e", Script(boom)))
        assert ei.value.reason is boom
        assert await sup.which_children() == []
        assert await active_workers(sup) == (0, 0)
        assert isinstance(await sup.start_child(spec()), trellis.Pid)
    finally:
        await stop_quietly(sup)


async def test_async_start_raising_gives_start_error() -> None:
    """SPEC 83: the same holds for an async start function."""
    boom = Boom("async no")

    async def bad_start() -> trellis.Pid:
        await asyncio.sleep(0)
        raise boom

    sup = await trellis.DynamicSupervisor.start_link()
    try:
        with pytest.raises(trellis.StartError) as ei:
            await sup.start_child(spec("e", bad_start))
        assert ei.value.reason is boom
        assert await sup.which_children() == []
    finally:
        await stop_quietly(sup)


# ---------------------------------------------------------------------------
# SPEC 84: terminate_child
# ---------------------------------------------------------------------------


async def test_terminate_child_by_pid() -> None:
    """SPEC 84: terminate_child(pid) stops a child (shutdown signal) and removes it; NotFound
    for a pid that is not (or no longer) a child."""
    sup = await trellis.DynamicSupervisor.start_link()
    stranger = trellis.spawn(_idle)
    try:
        p1 = await sup.start_child(spec())
        p2 = await sup.start_child(spec())
        assert await sup.terminate_child(p1) is None
        assert await join(p1) == trellis.SHUTDOWN
        assert [i.pid for i in await sup.which_children()] == [p2]
        with pytest.raises(trellis.NotFound):
            await sup.terminate_child(p1)
        with pytest.raises(trellis.NotFound):
            await sup.terminate_child(stranger)
        assert stranger.alive
        assert p2.alive
    finally:
        await stop_quietly(sup, stranger)


# ---------------------------------------------------------------------------
# SPEC 85: restart results
# ---------------------------------------------------------------------------


async def test_restart_returning_ignore_drops_child() -> None:
    """SPEC 85: if a restart returns IGNORE, the child is dropped."""
    script = Script("pid", "ignore")
    sup = await trellis.DynamicSupervisor.start_link()
    try:
        with capture_telemetry() as cap:
            keep = await sup.start_child(spec())
            pid = await sup.start_child(spec("c", script))
            trellis.exit(pid, Boom("crash"))
            await cap.wait_for("child.exited", pid=pid)
            assert len(script.calls) == 2
            assert [i.pid for i in await sup.which_children()] == [keep]
            assert await active_workers(sup) == (1, 1)
            assert sup.alive
    finally:
        await stop_quietly(sup)


async def test_failing_restart_retried_until_intensity(clock: Any) -> None:
    """SPEC 45, 85: a failing restart is retried, each retry counting as a restart: with
    intensity 3 the start is tried 3 times after the crash, then the supervisor gives up and
    exits SHUTDOWN."""
    script = Script("pid", default=Boom("restart fails"))
    sup = await trellis.DynamicSupervisor.start_link(intensity=3, period=5.0)
    try:
        with capture_telemetry() as cap:
            pid = await sup.start_child(spec("c", script))
            trellis.exit(pid, Boom("crash"))
            assert await join(sup) == trellis.SHUTDOWN
            assert len(script.calls) == 1 + 3
            assert [e["event"] for e in cap.events].count("child.start_failed") == 3
            assert any(e["event"] == "supervisor.gave_up" for e in cap.events)
    finally:
        await stop_quietly(sup)


async def test_failing_restart_recovers() -> None:
    """SPEC 85: a child whose restart failed is retried and comes back once its start works
    again, while the supervisor stays up."""
    flaky = Flaky()
    sup = await trellis.DynamicSupervisor.start_link(intensity=100_000)
    try:
        with capture_telemetry() as cap:
            pid = await sup.start_child(spec("f", flaky))
            flaky.fail = True
            trellis.exit(pid, Boom("crash"))
            await cap.wait_for("child.start_failed")
            assert await active_workers(sup) == (0, 1)
            assert [i.pid for i in await sup.which_children()] == [trellis.RESTARTING]
            flaky.fail = False
            await cap.wait_for("child.restarted")
            infos = await sup.which_children()
            assert len(infos) == 1
            assert isinstance(infos[0].pid, trellis.Pid)
            assert infos[0].pid.alive
            assert await active_workers(sup) == (1, 1)
    finally:
        await stop_quietly(sup)

"""Each fault against real in-process servers, supervisors and coroutine workers, on the
virtual clock: the effect while it lasts, and the heal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import trellis
from trellis import NORMAL, Supervisor
from trellis.chaos import Chaos, ChaosError, Plan, Report
from trellis.testing import VirtualClock, capture_telemetry


class Echo(trellis.Server):
    """Answers calls with the request; logs casts and its terminate reason."""

    async def init(self, log: list[Any] | None = None) -> None:
        self.log = log if log is not None else []

    async def handle_call(self, request: Any, caller: trellis.Caller) -> Any:
        self.log.append(("call", request))
        return request

    async def handle_cast(self, msg: Any) -> None:
        self.log.append(("cast", msg))

    async def terminate(self, reason: Any) -> None:
        self.log.append(("terminate", reason))


async def forever(log: list[Any]) -> None:
    try:
        while True:
            await trellis.sleep(1.0)
    finally:
        log.append("finally")


class Run:
    """A chaos run in the background, driven by the test through the virtual clock."""

    def __init__(self, engine: Chaos, task: asyncio.Task[Report]) -> None:
        self.engine = engine
        self.task = task


@pytest.fixture
async def tree(clock: VirtualClock) -> AsyncIterator[tuple[Any, list[Any]]]:
    log: list[Any] = []
    sup = await Supervisor.start_link(
        [
            Echo.child_spec(log, id="echo"),
            Echo.child_spec(log, id="once", restart="transient"),
            trellis.worker("loop", forever, log),
        ],
        name="root",
        intensity=10,
    )
    yield sup, log
    if sup.alive:
        await sup.stop()


Start = Callable[..., Awaitable[Run]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """``await start(sup, *specs, duration=10.0)``: a chaos run in the background (seed 1),
    stopped at the end of the test even if it failed."""
    engines: list[Chaos] = []

    async def _start(sup: Any, *specs: dict[str, Any], duration: float = 10.0) -> Run:
        plan = Plan.from_spec(list(specs), seed=1, duration=duration)
        engine = Chaos(sup, plan, settle=1.0, recover_timeout=5.0)
        engines.append(engine)
        await engine.start()
        task = asyncio.get_running_loop().create_task(engine.run())
        await asyncio.sleep(0)
        return Run(engine, task)

    yield _start
    for engine in engines:
        await engine.stop()


def result(fut: asyncio.Future[Any]) -> Any:
    """The result of a future that must be done by now (never waits on virtual time)."""
    assert fut.done(), "not done yet"
    return fut.result()


async def child(sup: Any, cid: str) -> Any:
    return (await sup.which_child(cid)).pid


async def test_kill_a_server(clock: VirtualClock, tree: Any, start: Start) -> None:
    """kill: the server ends KILLED without running terminate, and is restarted."""
    sup, log = tree
    before = await child(sup, "echo")
    with capture_telemetry(["child.exited"]) as cap:
        run = await start(sup, {"fault": "kill", "target": "root/echo", "at": 1})
        await clock.advance(1)
        assert cap.named("child.exited")[0]["reason"] is trellis.KILLED
        assert ("terminate", trellis.KILLED) not in log
        await clock.advance(11)
        report = await run.task
    after = await child(sup, "echo")
    assert after is not before
    assert after.alive
    [f] = report.faults
    assert (f.result, f.exit_class, f.restarts) == ("ok", "killed", 1)


async def test_raise_in_a_server_runs_terminate_with_chaos_error(
    clock: VirtualClock, tree: Any, start: Start
) -> None:
    """raise: the server crashes with ChaosError, through terminate like a callback raising."""
    sup, log = tree
    with capture_telemetry(["child.exited"]) as cap:
        run = await start(sup, {"fault": "raise", "target": "root/echo", "at": 1})
        await clock.advance(12)
        await run.task
    reason = cap.named("child.exited", child_id="echo")[0]["reason"]
    assert isinstance(reason, ChaosError)
    assert str(reason) == "injected by chaos"
    assert reason.fault == "1.1"
    assert ("terminate", reason) in log
    assert (await child(sup, "echo")).alive


async def test_raise_in_a_coroutine_worker(clock: VirtualClock, tree: Any, start: Start) -> None:
    """raise on a worker: its coroutine is cancelled (finally runs), reason ChaosError."""
    sup, log = tree
    with capture_telemetry(["child.exited"]) as cap:
        run = await start(sup, {"fault": "raise", "target": "root/loop", "at": 1})
        await clock.advance(12)
        await run.task
    assert isinstance(cap.named("child.exited", child_id="loop")[0]["reason"], ChaosError)
    assert "finally" in log


async def test_exit_normally(clock: VirtualClock, tree: Any, start: Start) -> None:
    """exit: a server stops with NORMAL (terminate runs), so a transient one stays down;
    a worker ends NORMAL too."""
    sup, log = tree
    with capture_telemetry(["child.exited", "child.restarted"]) as cap:
        run = await start(
            sup,
            {"fault": "exit", "target": "root/once", "at": 1},
            {"fault": "exit", "target": "root/loop", "at": 2},
        )
        await clock.advance(12)
        report = await run.task
    exits = {e["child_id"]: e["reason"] for e in cap.named("child.exited")}
    assert exits == {"once": NORMAL, "loop": NORMAL}
    assert ("terminate", NORMAL) in log
    assert (await sup.which_child("once")).pid is None  # transient: not restarted
    assert [e["child_id"] for e in cap.named("child.restarted")] == ["loop"]
    by_target = {f.target: f for f in report.faults}
    assert by_target["root/once"].exit_class == "normal"
    assert by_target["root/once"].recover is None  # it never came back
    assert by_target["root/loop"].recover == 0.0


async def test_hang_a_server_then_heal(clock: VirtualClock, tree: Any, start: Start) -> None:
    """hang: calls time out while it lasts and the server is not restarted; after the heal
    it answers, and what was sent meanwhile is handled in order."""
    sup, log = tree
    echo = await child(sup, "echo")
    run = await start(sup, {"fault": "hang", "target": "root/echo", "at": 1, "duration": 4})
    await clock.advance(1.5)
    call = asyncio.ensure_future(trellis.call(echo, "during", timeout=1.0))
    await clock.settle()
    trellis.cast(echo, "a")
    trellis.cast(echo, "b")
    await clock.advance(1.0)
    with pytest.raises(trellis.CallTimeout):
        result(call)
    assert echo.message_queue_len == 3  # held messages still count
    late = asyncio.ensure_future(trellis.call(echo, "late", timeout=None))
    await clock.advance(2.4)
    assert not late.done()
    assert ("cast", "a") not in log
    await clock.advance(0.1)  # t=5: healed
    assert result(late) == "late"
    assert log[-4:] == [("call", "during"), ("cast", "a"), ("cast", "b"), ("call", "late")]
    after = asyncio.ensure_future(trellis.call(echo, "after"))
    await clock.settle()
    assert result(after) == "after"
    await clock.advance(7)
    report = await run.task
    assert echo.alive
    assert echo is await child(sup, "echo")
    [f] = report.faults
    assert (f.detect, f.healed, f.restarts) == (None, 4.0, 0)


async def test_hang_heals_a_server_that_was_idle_and_one_that_was_busy(
    clock: VirtualClock, start: Start
) -> None:
    """The hang holds a server whether it waited for a message or was busy when it began."""

    class Slowpoke(Echo):
        async def handle_call(self, request: Any, caller: trellis.Caller) -> Any:
            if request == "busy":
                await trellis.sleep(2.0)
            return request

    sup = await Supervisor.start_link([Slowpoke.child_spec(id="s")], name="root")
    s = await child(sup, "s")
    busy = asyncio.ensure_future(trellis.call(s, "busy", timeout=None))
    await clock.advance(0.5)
    run = await start(sup, {"fault": "hang", "target": "root/s", "at": 1, "duration": 3})
    await clock.advance(1.0)  # t=1.5: hung while busy
    nxt = asyncio.ensure_future(trellis.call(s, "next", timeout=None))
    await clock.advance(1.0)  # t=2.5: the busy call finishes; the next one is held
    assert result(busy) == "busy"
    await clock.advance(1.9)
    assert not nxt.done()
    await clock.advance(0.1)  # healed at t=4.5 (engine time 4)
    assert result(nxt) == "next"
    await clock.advance(7)
    await run.task
    await sup.stop()


async def test_a_server_killed_while_hung_fails_its_callers_at_once(
    clock: VirtualClock, tree: Any, start: Start
) -> None:
    """A caller of a hung server that dies gets Exited at once, not a hang."""
    sup, _log = tree
    echo = await child(sup, "echo")
    run = await start(
        sup,
        {"fault": "hang", "target": "root/echo", "at": 1, "duration": 5},
        {"fault": "kill", "target": "root/echo", "at": 2},
    )
    await clock.advance(1.5)
    pending = asyncio.ensure_future(trellis.call(echo, "x", timeout=None))
    await clock.advance(0.5)
    with pytest.raises(trellis.Exited):
        result(pending)
    await clock.advance(10)
    report = await run.task
    hang, kill = report.faults
    assert hang.result == kill.result == "ok"
    assert hang.detect == 1.0  # the hung server went down (killed) 1s after the hang began
    assert kill.exit_class == "killed"
    assert (await child(sup, "echo")).alive


async def test_slow_adds_the_delay_to_each_message(
    clock: VirtualClock, tree: Any, start: Start
) -> None:
    """slow: each message waits `delay` before the server takes it; healed, no delay."""
    sup, _log = tree
    echo = await child(sup, "echo")
    run = await start(
        sup, {"fault": "slow", "target": "root/echo", "at": 1, "duration": 5, "delay": 0.5}
    )
    await clock.advance(1.0)
    first = asyncio.ensure_future(trellis.call(echo, 1, timeout=None))
    second = asyncio.ensure_future(trellis.call(echo, 2, timeout=None))
    await clock.advance(0.4)
    assert not first.done()
    await clock.advance(0.1)
    assert first.done()
    assert not second.done()
    await clock.advance(0.5)
    assert (result(first), result(second)) == (1, 2)
    short = asyncio.ensure_future(trellis.call(echo, 3, timeout=0.2))
    await clock.advance(0.3)
    with pytest.raises(trellis.CallTimeout):  # a call timeout shorter than the delay fails
        result(short)
    await clock.advance(4.0)  # healed at t=6
    fast = asyncio.ensure_future(trellis.call(echo, 4, timeout=0.1))
    await clock.settle()
    assert result(fast) == 4
    await clock.advance(6)
    await run.task


async def test_hang_a_supervisor(clock: VirtualClock, start: Start) -> None:
    """A hung supervisor does not restart a child that dies until the heal."""
    log: list[Any] = []
    inner = Supervisor.child_spec([Echo.child_spec(log, id="leaf")], id="inner")
    sup = await Supervisor.start_link([inner], name="root")
    inner_pid = await child(sup, "inner")
    leaf = await child(inner_pid, "leaf")
    run = await start(sup, {"fault": "hang", "target": "root/inner", "at": 1, "duration": 3})
    with capture_telemetry(["child.restarted"]) as cap:
        await clock.advance(1.5)
        trellis.exit(leaf, trellis.KILL)
        await clock.advance(1.0)
        assert not cap.named("child.restarted")
        await clock.advance(2.0)  # healed
        assert cap.named("child.restarted", child_id="leaf")
    await clock.advance(10)
    await run.task
    await sup.stop()


async def test_hang_and_slow_need_a_mailbox_loop(
    clock: VirtualClock, tree: Any, start: Start
) -> None:
    """A coroutine worker cannot be hung or slowed: the fault is skipped, saying why."""
    sup, _log = tree
    with capture_telemetry(["operator.action"]) as cap:
        run = await start(
            sup,
            {"fault": "hang", "target": "root/loop", "at": 1, "duration": 1},
            {"fault": "slow", "target": "root/loop", "at": 2, "duration": 1, "delay": 1},
        )
        await clock.advance(12)
        report = await run.task
    assert [f.result for f in report.faults] == [
        "skipped: hang needs a server or supervisor (a mailbox loop to hold back); "
        "root/loop is a worker",
        "skipped: slow needs a server or supervisor (a mailbox loop to hold back); "
        "root/loop is a worker",
    ]
    assert not cap.events  # nothing was done, so nothing is journaled


async def test_a_second_hang_of_a_hung_server_is_skipped(
    clock: VirtualClock, tree: Any, start: Start
) -> None:
    sup, _log = tree
    run = await start(
        sup,
        {"fault": "hang", "target": "root/echo", "at": 1, "duration": 3},
        {"fault": "slow", "target": "root/echo", "at": 2, "duration": 3, "delay": 1},
        {"fault": "hang", "target": "root/echo", "at": 5, "duration": 1},
    )
    await clock.advance(20)
    report = await run.task
    assert [f.result for f in report.faults] == [
        "ok",
        "skipped: target already held by fault 1.1",
        "ok",
    ]


async def test_final_heal_releases_a_hang_that_outlasts_the_run(
    clock: VirtualClock, tree: Any, start: Start
) -> None:
    sup, _log = tree
    echo = await child(sup, "echo")
    run = await start(
        sup, {"fault": "hang", "target": "root/echo", "at": 1, "duration": 100}, duration=3
    )
    await clock.advance(2)
    pending = asyncio.ensure_future(trellis.call(echo, "x", timeout=None))
    await clock.advance(1)  # the run ends at 3: final heal
    assert result(pending) == "x"
    await clock.advance(2)
    report = await run.task
    assert report.faults[0].healed == 2.0

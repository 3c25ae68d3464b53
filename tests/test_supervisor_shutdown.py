"""Supervisor shutdown conformance: SPEC section F (51-59) and unkillable tasks.

Children record into a shared `Rec`: `("start", id)`, `("terminate_begin", id)` and
`("terminate_end", id)`. A `gate` (asyncio.Event) can hold a child's `terminate` open, which
is how tests observe timeouts, sequential vs parallel shutdown, and races.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import trellis
from _helpers import settle
from trellis import KILLED, NORMAL, SHUTDOWN, ChildSpec, Shutdown, Supervisor
from trellis.testing import capture_telemetry

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class Rec:
    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.pids: dict[str, trellis.Pid] = {}
        self.reasons: dict[str, list[Any]] = {}

    def kinds(self, kind: str) -> list[str]:
        return [e[1] for e in self.log if e[0] == kind]


class Child(trellis.Server):
    """Non-trapping child: an exit signal kills it at once, without terminate."""

    trap_exits = False

    async def init(self, rec: Rec, name: str, gate: asyncio.Event | None = None) -> None:
        self.rec, self.name, self.gate = rec, name, gate
        rec.log.append(("start", name))
        rec.pids[name] = self.pid

    async def handle_call(self, request: Any, caller: Any) -> Any:
        return request

    async def handle_cast(self, msg: Any) -> Any:
        return trellis.Stop(msg)

    async def terminate(self, reason: Any) -> None:
        others = tuple(n for n, p in self.rec.pids.items() if n != self.name and p.alive)
        self.rec.log.append(("terminate_begin", self.name, others))
        self.rec.reasons.setdefault(self.name, []).append(reason)
        if self.gate is not None:
            await self.gate.wait()
        else:
            for _ in range(5):
                await asyncio.sleep(0)
        self.rec.log.append(("terminate_end", self.name))


class TrapChild(Child):
    """Trapping child: the supervisor's shutdown runs terminate(SHUTDOWN)."""

    trap_exits = True


def spec(rec: Rec, name: str, gate: asyncio.Event | None = None, *, trap: bool = True, **kw: Any):
    cls = TrapChild if trap else Child
    return cls.child_spec(rec, name, gate, id=name, **kw)


async def joined(pid: trellis.Pid, timeout: float = 5.0) -> Any:
    return await asyncio.wait_for(pid.join(), timeout)


async def until(pred: Any, what: str = "condition") -> None:
    for _ in range(500):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what} never happened")


async def stop(sup: trellis.Pid) -> None:
    if sup.alive:
        await asyncio.wait_for(sup.stop(), 10)


def mentions(record: logging.LogRecord, word: str) -> bool:
    if word in record.getMessage():
        return True
    return any(isinstance(v, str) and word in v for v in vars(record).values())


def reports(caplog: pytest.LogCaptureFixture, word: str, level: int) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.split(".")[0] == "trellis" and r.levelno >= level and mentions(r, word)
    ]


# ---------------------------------------------------------------------------
# F. Shutdown
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "terminate_child"])
async def test_brutal_kill_kills_without_terminate(how: str) -> None:
    """SPEC 51: brutal_kill: the child's reason is KILLED and terminate never runs, even
    though it traps exits."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a", shutdown="brutal_kill")])
    try:
        a = rec.pids["a"]
        if how == "stop":
            await asyncio.wait_for(sup.stop(), 5)
        else:
            await asyncio.wait_for(sup.terminate_child("a"), 5)
            assert [c.pid for c in await sup.which_children()] == [None]
        assert await joined(a) == KILLED
        assert rec.kinds("terminate_begin") == []
    finally:
        await stop(sup)


@pytest.mark.parametrize("how", ["stop", "terminate_child"])
async def test_timeout_then_killed(clock: Any, how: str) -> None:
    """SPEC 52: shutdown=T sends SHUTDOWN, waits at most T seconds for the child (whose
    terminate hangs), then kills it: reason KILLED, terminate never finishes."""
    rec = Rec()
    gate = asyncio.Event()
    sup = await Supervisor.start_link([spec(rec, "a", gate, shutdown=2.0)])
    try:
        a = rec.pids["a"]
        op = sup.stop() if how == "stop" else sup.terminate_child("a")
        task = asyncio.ensure_future(op)
        await until(lambda: rec.kinds("terminate_begin") == ["a"], "terminate(SHUTDOWN)")
        assert rec.reasons["a"] == [SHUTDOWN]
        await clock.advance(1.9)
        assert a.alive
        assert not task.done()
        await clock.advance(0.2)
        await asyncio.wait_for(task, 5)
        assert await joined(a) == KILLED
        assert rec.kinds("terminate_end") == []
    finally:
        gate.set()
        await stop(sup)


async def test_infinity_waits_without_limit(clock: Any) -> None:
    """SPEC 53: shutdown="infinity" sends SHUTDOWN and waits without limit: an hour of
    virtual time later the child is still finishing terminate; then stop completes."""
    rec = Rec()
    gate = asyncio.Event()
    sup = await Supervisor.start_link([spec(rec, "a", gate, shutdown="infinity")])
    try:
        a = rec.pids["a"]
        task = asyncio.ensure_future(sup.stop())
        await until(lambda: rec.kinds("terminate_begin") == ["a"], "terminate(SHUTDOWN)")
        await clock.advance(3600.0)
        assert a.alive
        assert not task.done()
        gate.set()
        await asyncio.wait_for(task, 5)
        assert await joined(a) == SHUTDOWN
        assert rec.kinds("terminate_end") == ["a"]
    finally:
        gate.set()
        await stop(sup)


async def test_infinity_for_a_supervisor_child(clock: Any) -> None:
    """SPEC 53, 11: a supervisor child defaults to shutdown "infinity": the parent waits for
    the child supervisor's own slow shutdown however long it takes."""
    rec = Rec()
    gate = asyncio.Event()
    inner_spec = ChildSpec(
        "inner",
        Supervisor.start_link,
        args=([spec(rec, "a", gate, shutdown="infinity")],),
        type="supervisor",
    )
    sup = await Supervisor.start_link([inner_spec])
    try:
        shutdown = (await sup.get_childspec("inner")).shutdown
        assert getattr(shutdown, "value", shutdown) == "infinity"
        (inner,) = [c.pid for c in await sup.which_children()]
        task = asyncio.ensure_future(sup.stop())
        await until(lambda: rec.kinds("terminate_begin") == ["a"], "inner child's terminate")
        await clock.advance(3600.0)
        assert inner.alive
        assert not task.done()
        gate.set()
        await asyncio.wait_for(task, 5)
        assert await joined(inner) == SHUTDOWN
        assert await joined(rec.pids["a"]) == SHUTDOWN
    finally:
        gate.set()
        await stop(sup)


@pytest.mark.parametrize("trap", [False, True], ids=["non_trapping", "trapping"])
async def test_terminate_runs_only_when_trapping(trap: bool) -> None:
    """SPEC 54: a non-trapping child dies at once from SHUTDOWN without terminate; a trapping
    Server child runs terminate(SHUTDOWN). Both exit SHUTDOWN."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a", trap=trap)])
    try:
        a = rec.pids["a"]
        await asyncio.wait_for(sup.stop(), 5)
        assert await joined(a) == SHUTDOWN
        if trap:
            assert rec.reasons == {"a": [SHUTDOWN]}
            assert rec.kinds("terminate_end") == ["a"]
        else:
            assert rec.reasons == {}
    finally:
        await stop(sup)


async def test_static_shutdown_sequential_reverse_order() -> None:
    """SPEC 55: a static supervisor shuts children down one at a time in reverse start
    order; each child is dead before the next one is signalled."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, n) for n in "abc"])
    try:
        await asyncio.wait_for(sup.stop(), 5)
        assert [e for e in rec.log if e[0] != "start"] == [
            ("terminate_begin", "c", ("a", "b")),
            ("terminate_end", "c"),
            ("terminate_begin", "b", ("a",)),
            ("terminate_end", "b"),
            ("terminate_begin", "a", ()),
            ("terminate_end", "a"),
        ]
    finally:
        await stop(sup)


async def test_static_shutdown_order_with_added_child() -> None:
    """SPEC 55, 22: a child added with start_child is last in start order, so it is
    terminated first."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a"), spec(rec, "b")])
    try:
        await sup.start_child(spec(rec, "z"))
        await asyncio.wait_for(sup.stop(), 5)
        assert rec.kinds("terminate_begin") == ["z", "b", "a"]
    finally:
        await stop(sup)


async def _dynamic_parent(kind: str, rec: Rec, gate: asyncio.Event, shutdown: Any) -> Any:
    if kind == "dynamic":
        sup = await trellis.DynamicSupervisor.start_link()
        for i in range(3):
            await sup.start_child(spec(rec, f"w{i}", gate, shutdown=shutdown))
    else:
        template = TrapChild.child_spec(rec, id="w", shutdown=shutdown)
        sup = await Supervisor.start_link([template], strategy="simple_one_for_one")
        for i in range(3):
            await sup.start_child([f"w{i}", gate])
    assert sorted(rec.pids) == ["w0", "w1", "w2"]
    return sup


@pytest.mark.parametrize("kind", ["dynamic", "simple_one_for_one"])
async def test_dynamic_children_shut_down_in_parallel(clock: Any, kind: str) -> None:
    """SPEC 56: DynamicSupervisor and simple_one_for_one signal all children before waiting:
    every child has begun terminate before any one of them is allowed to finish."""
    rec = Rec()
    gate = asyncio.Event()
    sup = await _dynamic_parent(kind, rec, gate, 5.0)
    try:
        task = asyncio.ensure_future(sup.stop())
        await until(lambda: len(rec.kinds("terminate_begin")) == 3, "all three terminate calls")
        assert rec.kinds("terminate_end") == []
        gate.set()
        await asyncio.wait_for(task, 5)
        assert sorted(rec.kinds("terminate_end")) == ["w0", "w1", "w2"]
        for p in rec.pids.values():
            assert await joined(p) == SHUTDOWN
    finally:
        gate.set()
        await stop(sup)


@pytest.mark.parametrize("kind", ["dynamic", "simple_one_for_one"])
async def test_dynamic_children_share_one_shutdown_timer(clock: Any, kind: str) -> None:
    """SPEC 56, 52: with parallel shutdown, three hanging children with shutdown=2.0 are all
    killed after 2 s of (virtual) time, not 6 s."""
    rec = Rec()
    gate = asyncio.Event()
    sup = await _dynamic_parent(kind, rec, gate, 2.0)
    try:
        task = asyncio.ensure_future(sup.stop())
        await until(lambda: len(rec.kinds("terminate_begin")) == 3, "all three terminate calls")
        await clock.advance(1.9)
        assert all(p.alive for p in rec.pids.values())
        await clock.advance(0.2)
        await asyncio.wait_for(task, 5)
        for p in rec.pids.values():
            assert await joined(p) == KILLED
    finally:
        gate.set()
        await stop(sup)


class Unlinker(TrapChild):
    """A trapping child that unlinks itself from its supervisor in init."""

    async def init(self, rec: Rec, name: str, sup: trellis.Pid) -> None:  # type: ignore[override]
        await super().init(rec, name)
        trellis.unlink(sup)


async def _unlinking_worker(rec: Rec, name: str, sup: trellis.Pid) -> None:
    rec.pids[name] = trellis.self()
    trellis.unlink(sup)
    await asyncio.Event().wait()


def _unlinker_spec(rec: Rec, trap: bool) -> ChildSpec:
    async def start() -> trellis.Pid:
        sup = trellis.self()  # start functions run in the supervisor
        if trap:
            return await Unlinker.start_link(rec, "u", sup)
        return trellis.spawn(_unlinking_worker, rec, "u", sup, link=True)

    return ChildSpec("u", start, shutdown=2.0)


@pytest.mark.parametrize("trap", [False, True], ids=["non_trapping", "trapping"])
async def test_unlinked_child_cannot_hang_shutdown(clock: Any, trap: bool) -> None:
    """SPEC 57: the supervisor waits on a monitor, not the link: a child that unlinked
    itself is still terminated (terminate_child returns, no restart follows) and stop
    completes without the shutdown timer firing."""
    rec = Rec()
    sup = await Supervisor.start_link([_unlinker_spec(rec, trap), spec(rec, "b")])
    try:
        u = rec.pids["u"]
        await asyncio.wait_for(sup.terminate_child("u"), 5)
        assert await joined(u) == SHUTDOWN
        await settle()
        infos = {c.id: c.pid for c in await sup.which_children()}
        assert infos == {"u": None, "b": rec.pids["b"]}
        await sup.restart_child("u")
        u2 = rec.pids["u"]
        assert u2 != u
        await asyncio.wait_for(sup.stop(), 5)
        assert await joined(u2) == SHUTDOWN
        assert await joined(sup) == NORMAL
    finally:
        await stop(sup)


async def test_child_exiting_on_its_own_during_shutdown(clock: Any) -> None:
    """SPEC 58: a child that exits by itself (abnormally) while the supervisor is shutting
    down is not restarted and does not disturb the shutdown; the supervisor exits with its
    own reason."""
    rec = Rec()
    gate = asyncio.Event()
    sup = await Supervisor.start_link(
        [spec(rec, "a", trap=False), spec(rec, "b"), spec(rec, "c", gate)]
    )
    try:
        a = rec.pids["a"]
        reason = Shutdown("mine")
        task = asyncio.ensure_future(sup.stop(reason))
        await until(lambda: rec.kinds("terminate_begin") == ["c"], "c's terminate")
        trellis.exit(a, RuntimeError("died during shutdown"))
        await joined(a)
        await settle()
        gate.set()
        await asyncio.wait_for(task, 5)
        assert await joined(sup) == reason
        assert rec.kinds("start") == ["a", "b", "c"]
        assert rec.kinds("terminate_begin") == ["c", "b"]
        assert not any(p.alive for p in rec.pids.values())
    finally:
        gate.set()
        await stop(sup)


async def _odd_exit(rec: Rec, name: str, outcome: str) -> None:
    """A trapping process that, asked to shut down, exits NORMAL or with an exception."""
    rec.pids[name] = trellis.self()
    await trellis.receive(match=lambda m: isinstance(m, trellis.Exit))
    if outcome == "normal":
        return
    raise RuntimeError(f"{name}: unexpected shutdown reason")


def _odd_spec(rec: Rec, name: str, outcome: str, restart: str) -> ChildSpec:
    def start() -> trellis.Pid:
        return trellis.spawn(_odd_exit, rec, name, outcome, link=True, trap_exits=True)

    return ChildSpec(name, start, restart=restart)


@pytest.mark.parametrize(
    ("restart", "outcome", "logged"),
    [
        ("permanent", "normal", True),
        ("transient", "normal", False),
        ("temporary", "normal", False),
        ("permanent", "error", True),
        ("transient", "error", True),
        ("temporary", "error", True),
    ],
)
async def test_unexpected_shutdown_reason_logged(
    caplog: pytest.LogCaptureFixture, restart: str, outcome: str, logged: bool
) -> None:
    """SPEC 59, 58: a child dying during shutdown with an unexpected reason (anything but
    SHUTDOWN; NORMAL is expected only for non-permanent children) is logged as shutdown_error;
    the supervisor still exits with its own reason."""
    caplog.set_level(logging.DEBUG, logger="trellis")
    rec = Rec()
    sup = await Supervisor.start_link([_odd_spec(rec, "odd_child", outcome, restart)])
    try:
        child = rec.pids["odd_child"]
        await asyncio.wait_for(sup.stop(), 5)
        assert await joined(sup) == NORMAL
        reason = await joined(child)
        if outcome == "normal":
            assert reason == NORMAL
        else:
            assert isinstance(reason, RuntimeError)
        found = reports(caplog, "shutdown_error", logging.INFO)
        if logged:
            assert found, [r.getMessage() for r in caplog.records]
            assert any(mentions(r, "odd_child") for r in found)
            assert all(r.levelno >= logging.WARNING for r in found)
        else:
            assert found == []
    finally:
        await stop(sup)


async def test_dynamic_child_odd_reason_does_not_change_supervisor_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SPEC 58, 59: a DynamicSupervisor child that exits with a non-shutdown reason during
    shutdown is logged as shutdown_error; the supervisor exits with its own reason."""
    caplog.set_level(logging.DEBUG, logger="trellis")
    rec = Rec()
    sup = await trellis.DynamicSupervisor.start_link()
    try:
        await sup.start_child(_odd_spec(rec, "odd_child", "error", "permanent"))
        await sup.start_child(spec(rec, "fine"))
        reason = Shutdown("dyn")
        await asyncio.wait_for(sup.stop(reason), 5)
        assert await joined(sup) == reason
        assert isinstance(await joined(rec.pids["odd_child"]), RuntimeError)
        assert await joined(rec.pids["fine"]) == SHUTDOWN
        assert reports(caplog, "shutdown_error", logging.WARNING)
    finally:
        await stop(sup)


async def _stubborn(release: asyncio.Event, rec: Rec) -> None:
    """Swallows every cancellation until `release` is set."""
    rec.pids["s"] = trellis.self()
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            rec.log.append(("swallowed", "s"))


async def test_unkillable_task_reported_and_counted_as_killed() -> None:
    """DESIGN 3, SPEC 51: a task that swallows cancellation under brutal_kill is reported
    (telemetry process.unkillable), counted as killed, and shutdown does not hang."""
    rec = Rec()
    release = asyncio.Event()
    with capture_telemetry() as cap:
        sup = await Supervisor.start_link(
            [spec(rec, "a"), trellis.worker("s", _stubborn, release, rec, shutdown="brutal_kill")]
        )
        try:
            s = rec.pids["s"]
            await asyncio.wait_for(sup.stop(), 10)
            ev = await cap.wait_for("process.unkillable", timeout=5.0)
            assert ev.get("pid", s) == s
            assert await joined(s, 1.0) == KILLED
            assert not s.alive
            assert ("swallowed", "s") in rec.log
            assert await joined(rec.pids["a"]) == SHUTDOWN
            assert await joined(sup) == NORMAL
        finally:
            release.set()
            await settle()
            await stop(sup)

"""Races, leaks and edge cases across the core, each found by a review of the code.

Each test's docstring states the rule (and the SPEC item, if any) that it checks.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

import trellis
from _helpers import collector, idle, settle
from trellis import KILL, ChildSpec, Supervisor
from trellis._core import _process
from trellis.testing import VirtualClock, capture_telemetry, live_processes

# ---------------------------------------------------------------------------
# helpers


class Gate(trellis.Server):
    """A server whose calls block until ``gate`` is set; ``mailbox_size=1``."""

    mailbox_size = 1

    async def init(self, gate: asyncio.Event) -> None:
        self.gate = gate

    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "block":
            await self.gate.wait()
        return request

    async def handle_cast(self, msg: Any) -> Any:
        return trellis.Stop(msg)


class Echo(trellis.Server):
    trap_exits = False

    async def handle_call(self, request: Any, caller: Any) -> Any:
        return request

    async def handle_cast(self, msg: Any) -> Any:
        return trellis.Stop(msg)


class TrapEcho(Echo):
    trap_exits = True

    async def init(self, seen: list[Any]) -> None:
        self.seen = seen

    async def handle_info(self, msg: Any) -> Any:
        self.seen.append(("info", msg))

    async def terminate(self, reason: Any) -> None:
        self.seen.append(("terminate", reason))


async def fill_bounded(gate: asyncio.Event) -> tuple[trellis.Pid, asyncio.Task[Any]]:
    """A ``Gate`` server busy with one call, with one more call filling its mailbox."""
    srv = await Gate.start(gate)
    busy = asyncio.ensure_future(trellis.call(srv, "block", timeout=None))
    await settle()
    queued = asyncio.ensure_future(trellis.call(srv, "queued", timeout=None))
    await settle()
    assert srv.message_queue_len == 1
    return srv, asyncio.gather(busy, queued, return_exceptions=True)


# ---------------------------------------------------------------------------
# call on a bounded mailbox


async def test_call_waiting_for_mailbox_space_gets_exited_when_server_dies() -> None:
    """A call waiting for room in a bounded mailbox when the server dies raises
    ``Exited(reason)``, like any call whose server dies mid-call (SPEC 92, DESIGN §4:
    "a caller of a server that dies mid-call gets Exited(reason)"). ``NoProc`` is only
    for a server that was already dead when the call was made."""
    gate = asyncio.Event()
    srv, first = await fill_bounded(gate)
    waiting = asyncio.ensure_future(trellis.call(srv, "third", timeout=None))
    await settle()
    assert not waiting.done()
    trellis.exit(srv, "boom")
    await settle()
    await first
    with pytest.raises(trellis.Exited) as ei:
        await waiting
    assert ei.value.reason == "boom"


async def test_abandoned_bounded_call_leaves_no_unretrieved_future(clock: VirtualClock) -> None:
    """When a call waiting for mailbox space ends early (server died), its reply
    future is abandoned; the call's deadline must not later set ``CallTimeout`` on it,
    which asyncio reports as "Future exception was never retrieved"."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        gate = asyncio.Event()
        srv, first = await fill_bounded(gate)
        waiting = asyncio.ensure_future(trellis.call(srv, "third", timeout=1.0))
        await settle()
        trellis.exit(srv, "boom")
        await settle()
        await first
        with pytest.raises(trellis.TrellisError):
            await waiting
        del waiting
        await clock.advance(2.0)
        gc.collect()
        await settle()
    finally:
        loop.set_exception_handler(old)
    assert not [e for e in errors if "never retrieved" in str(e.get("message"))], errors


async def test_cancelled_space_waiter_passes_the_slot_on() -> None:
    """Two calls wait for room in a full bounded mailbox. When the server takes a
    message it wakes the first; if that caller is cancelled before it runs, the slot
    must go to the second, which then gets its reply (no hang)."""
    gate = asyncio.Event()
    srv, first = await fill_bounded(gate)
    a = asyncio.ensure_future(trellis.call(srv, "a", timeout=None))
    await settle()
    b = asyncio.ensure_future(trellis.call(srv, "b", timeout=None))
    await settle()
    gate.set()
    await asyncio.sleep(0)  # the server finishes "block", takes "queued" and wakes `a`
    a.cancel()  # ...which is cancelled before it gets to run
    await settle()
    try:
        assert b.done()
        assert b.result() == "b"
    finally:
        await trellis.stop(srv)
        await first
        await asyncio.gather(a, b, return_exceptions=True)


# ---------------------------------------------------------------------------
# names and leaks


def _forget_leaked(keep: list[trellis.Pid]) -> list[trellis.Pid]:
    """Drop never-started pids from the process table (so the leak check can pass)."""
    leaked = [p for p in live_processes() if p not in keep and p._task is None]
    for p in leaked:
        _process._live.pop(p.id, None)
    return leaked


async def test_spawn_with_taken_name_leaks_no_process() -> None:
    """``spawn(name=...)`` with a name held by a live process raises
    ``AlreadyRegistered`` and leaves no half-made process behind."""
    holder = trellis.spawn(idle, name="review_taken")
    with pytest.raises(trellis.AlreadyRegistered):
        trellis.spawn(idle, name="review_taken")
    try:
        assert live_processes() == [holder]
    finally:
        _forget_leaked([holder])
        trellis.exit(holder, KILL)
        await holder.join()


@pytest.mark.parametrize("how", ["taken_name", "bad_arguments"])
async def test_failed_worker_start_leaks_no_process(how: str) -> None:
    """A ``worker`` whose start fails before its coroutine exists (its name is taken,
    or ``coro_fn(*args)`` raises ``TypeError``) fails with ``StartError`` and leaves no
    process in ``live_processes()`` and no link on the supervisor."""
    holder = trellis.spawn(idle, name="review_worker")
    sup = await Supervisor.start([], intensity=5)
    if how == "taken_name":
        spec = trellis.worker("w", idle, name="review_worker")
    else:
        spec = trellis.worker("w", idle, "unexpected argument")
    with pytest.raises(trellis.StartError):
        await sup.start_child(spec)
    try:
        assert sorted(p.id for p in live_processes()) == sorted([holder.id, sup.id])
        assert not sup._links
    finally:
        _forget_leaked([holder, sup])
        await sup.stop()
        trellis.exit(holder, KILL)
        await holder.join()


async def test_second_name_does_not_keep_a_dead_process_alive() -> None:
    """A process has at most one registered name (OTP ``register/2`` is ``badarg``
    for an already-registered process). Registering a second name must either be
    refused or not leave the first one behind: once the process has died, no entry
    of the name table may keep its ``Pid`` (and so its state) alive."""
    p = trellis.spawn(idle)
    trellis.register("review_a", p)
    try:
        trellis.register("review_b", p)
    except trellis.TrellisError:
        pass
    trellis.exit(p, KILL)
    await p.join()
    ref = weakref.ref(p)
    del p
    gc.collect()
    try:
        assert ref() is None
    finally:
        trellis.unregister("review_a")
        trellis.unregister("review_b")


# ---------------------------------------------------------------------------
# Via names and the registry


@pytest.mark.parametrize("which", ["duplicate_registry", "dead_registry"])
async def test_failed_via_registration_sends_no_exit_to_caller(which: str) -> None:
    """``start_link(name=Via(reg, key))`` that cannot register (a registry with
    duplicate keys, or a dead registry) fails the start with an exception and, like
    any failed start, sends no ``Exit`` to the (trapping) caller (api.md: "A failed
    start sends no Exit to the caller"; SPEC 17)."""
    if which == "duplicate_registry":
        reg = await trellis.Registry.start_link("duplicate")
    else:
        reg = await trellis.Registry.start_link("unique")
        await trellis.stop(reg)
    out: list[Any] = []

    async def body() -> None:
        try:
            await Echo.start_link(name=trellis.Via(reg, "k"))
            out.append("started")
        except Exception as e:
            out.append(("raised", type(e).__name__))
        await collector(out)

    p = trellis.spawn(body, trap_exits=True)
    await settle()
    try:
        assert len(out) == 1, out
        assert out[0][0] == "raised"
    finally:
        trellis.exit(p, KILL)
        await p.join()
        if reg.alive:
            await trellis.stop(reg)


async def test_registry_unregister_keeps_the_link_to_its_starter() -> None:
    """A registry started with ``start_link`` is linked to its starter. If the starter
    registers a key and then unregisters it, that start link must remain: when the
    starter crashes, the registry (its parent died) stops too."""
    box: list[Any] = []

    async def owner() -> None:
        reg = await trellis.Registry.start_link("unique")
        box.append(reg)
        reg.register("k")
        reg.unregister("k")
        await trellis.receive()
        raise RuntimeError("owner crashes")

    p = trellis.spawn(owner)
    await settle()
    reg = box[0]
    p.send("go")
    await p.join()
    await settle()
    try:
        assert not reg.alive
    finally:
        if reg.alive:
            await trellis.stop(reg)


async def test_via_name_is_taken_over_after_owner_crash_before_cleanup() -> None:
    """A restarted server can re-register its ``Via`` name at once, even before the
    registry has processed the old owner's exit (SPEC 86)."""
    reg = await trellis.Registry.start_link("unique")
    name = trellis.Via(reg, "svc")
    sup = await Supervisor.start([Echo.child_spec(id="e", name=name)])
    old = trellis.whereis(name)
    assert old is not None
    trellis.exit(old, "boom")
    await settle()
    new = trellis.whereis(name)
    assert new is not None
    assert new is not old
    assert await trellis.call(name, "hi") == "hi"
    await sup.stop()
    await trellis.stop(reg)


# ---------------------------------------------------------------------------
# Server parent semantics


async def test_unlinked_server_gets_exit_from_its_starter_in_handle_info() -> None:
    """A trapping server started with ``start`` (no link) has no parent (OTP's
    ``gen:start`` with ``nolink`` passes ``Parent = self``). An ``Exit`` from the
    process that started it is an ordinary message for ``handle_info``; only an
    ``Exit`` from a linked parent runs ``terminate`` (SPEC 95)."""
    seen: list[Any] = []
    box: list[Any] = []

    async def starter() -> None:
        srv = await TrapEcho.start(seen)
        box.append(srv)
        trellis.exit(srv, "bye")
        await idle()

    p = trellis.spawn(starter)
    await settle()
    srv = box[0]
    try:
        assert srv.alive
        assert seen == [("info", trellis.Exit(p, "bye"))]
    finally:
        if srv.alive:
            await trellis.stop(srv)
        trellis.exit(p, KILL)
        await p.join()


# ---------------------------------------------------------------------------
# Backoff


async def _wait_then_crash() -> None:
    await trellis.receive()
    raise RuntimeError("crash")


async def test_backoff_reset_after_counts_uptime_not_time_since_last_start(
    clock: VirtualClock,
) -> None:
    """``reset_after`` resets the restart count after that much *uptime*. A child that
    crashed and whose restarts keep failing has had no uptime, so its delays keep
    growing: 1, 2, 4, 8 (api.md Backoff)."""
    attempts = [0]

    def start() -> trellis.Pid:
        attempts[0] += 1
        if attempts[0] == 1:
            return trellis.spawn(_wait_then_crash, link=True)
        raise RuntimeError("cannot start")

    bo = trellis.Backoff(min=1.0, max=100.0, factor=2.0, reset_after=5.0)
    with capture_telemetry(["child.backoff"]) as cap:
        sup = await Supervisor.start(
            [ChildSpec("c", start, backoff=bo)], intensity=100, period=1000.0
        )
        (await sup.which_children())[0].pid.send("crash")
        await clock.settle()
        for _ in range(3):
            await clock.advance(cap.events[-1]["delay"])
        delays = [e["delay"] for e in cap.events]
        await sup.stop()
    assert delays == [1.0, 2.0, 4.0, 8.0]


# ---------------------------------------------------------------------------
# join


async def test_timed_out_joins_leave_nothing_behind(clock: VirtualClock) -> None:
    """``join(timeout)`` that times out raises ``TimeoutError`` and forgets its
    waiter, so polling a long-lived process with ``join(timeout)`` does not grow it."""
    p = trellis.spawn(idle)

    async def poll() -> None:
        with pytest.raises(TimeoutError):
            await p.join(1.0)

    for _ in range(5):
        t = asyncio.ensure_future(poll())
        await clock.advance(1.0)
        await t
    try:
        assert not p._joiners
    finally:
        trellis.exit(p, KILL)
        await p.join()


# ---------------------------------------------------------------------------
# supervisor races


def slow_starter(ev: asyncio.Event) -> Any:
    async def start() -> trellis.Pid:
        await ev.wait()
        return trellis.spawn(idle, link=True)

    return start


def idle_spec(id: str, **kw: Any) -> ChildSpec:
    return trellis.worker(id, idle, **kw)


async def _queue_behind_busy_sup(sup: Any, op: Any, victim: trellis.Pid) -> Any:
    """Make ``sup`` busy in a slow ``start_child``, queue ``op`` (a call), then kill
    ``victim`` so its ``Exit`` is queued *behind* the call; return the op's result."""
    ev = asyncio.Event()
    busy = asyncio.ensure_future(sup.start_child(ChildSpec("slow", slow_starter(ev))))
    await settle()
    fut = asyncio.ensure_future(op)
    await settle()
    trellis.exit(victim, "boom")
    await settle()
    assert not victim.alive
    ev.set()
    await busy
    res = await asyncio.gather(fut, return_exceptions=True)
    await settle()
    return res[0]


async def test_terminate_child_with_exit_queued_does_not_restart() -> None:
    """``terminate_child`` of a child that has just died (its ``Exit`` still queued)
    returns and keeps the spec stopped; the stale ``Exit`` is then ignored: no
    restart and no restart counted (SPEC 30, 64)."""
    with capture_telemetry(["child.restarted"]) as cap:
        sup = await Supervisor.start([idle_spec("a")], intensity=0)
        a = (await sup.which_children())[0].pid
        res = await _queue_behind_busy_sup(sup, sup.terminate_child("a"), a)
        assert res is None
        info = await sup.which_child("a")
        assert info.pid is None
        assert sup.alive
        assert cap.events == []
        await sup.stop()


async def test_restart_child_with_exit_queued_restarts_once() -> None:
    """``restart_child`` on a child that has just died restarts it; the old pid's
    queued ``Exit`` does not cause a second restart."""
    with capture_telemetry(["child.restarted", "child.started"]) as cap:
        sup = await Supervisor.start([idle_spec("a")], intensity=0)
        a = (await sup.which_children())[0].pid
        res = await _queue_behind_busy_sup(sup, sup.restart_child("a"), a)
        kids = {i.id: i.pid for i in await sup.which_children()}
        assert isinstance(res, trellis.Pid | trellis.Running)  # OTP would say Running
        assert kids["a"].alive
        assert kids["a"] is not a
        assert len([e for e in cap.events if e["child_id"] == "a"]) == 2  # start + 1 restart
        assert sup.alive
        await sup.stop()


async def test_sibling_dying_during_one_for_all_restart_is_one_incident() -> None:
    """A sibling that dies on its own while a one_for_all restart is terminating the
    group does not cause a second restart round: each child is started exactly once
    more and one restart is counted (SPEC 33, 41)."""
    starts: list[str] = []
    release = asyncio.Event()

    class Slow(trellis.Server):
        trap_exits = True

        async def init(self, name: str) -> None:
            self.name = name
            starts.append(name)

        async def terminate(self, reason: Any) -> None:
            if self.name == "c":
                await release.wait()  # c is slow to stop: b dies meanwhile

    specs = [Slow.child_spec(n, id=n, shutdown="infinity") for n in "abc"]
    sup = await Supervisor.start(specs, strategy="one_for_all", intensity=1)
    kids = {i.id: i.pid for i in await sup.which_children()}
    trellis.exit(kids["a"], KILL)
    await settle()
    trellis.exit(kids["b"], KILL)  # dies while the supervisor waits for c
    await settle()
    release.set()
    await settle()
    assert starts == ["a", "b", "c", "a", "b", "c"]
    assert sup.alive
    new = {i.id: i.pid for i in await sup.which_children()}
    assert all(p.alive for p in new.values())
    await sup.stop()


async def _crash_on_message() -> None:
    await trellis.receive()
    raise RuntimeError("crash")


async def test_group_restart_cancels_a_pending_backoff_timer(clock: VirtualClock) -> None:
    """rest_for_one [a, b], b with ``Backoff(min=10, factor=2)``. b crashes at t=0
    (restart due at t=10); a crashes at t=1, so the group restart starts a and b at
    once. b crashes again at t=2: its next restart waits 20 s (due at t=22). The old
    t=10 timer must not restart b early: at t=15 b is still ``RESTARTING``."""
    bo = trellis.Backoff(min=10.0, max=100.0, factor=2.0)
    specs = [
        trellis.worker("a", _crash_on_message),
        trellis.worker("b", _crash_on_message, backoff=bo),
    ]
    sup = await Supervisor.start(specs, strategy="rest_for_one", intensity=100, period=1000.0)

    async def pid_of(id: str) -> Any:
        return (await sup.which_child(id)).pid

    (await pid_of("b")).send("crash")  # t=0: b's restart is due at t=10
    await clock.advance(1.0)
    assert await pid_of("b") is trellis.RESTARTING
    (await pid_of("a")).send("crash")  # t=1: rest_for_one restarts a and b now
    await clock.settle()
    assert isinstance(await pid_of("b"), trellis.Pid)
    await clock.advance(1.0)
    (await pid_of("b")).send("crash")  # t=2: b's restart is due at t=22
    await clock.settle()
    await clock.advance(13.0)  # t=15
    try:
        assert await pid_of("b") is trellis.RESTARTING
    finally:
        await sup.stop()


class SlowInit(trellis.Server):
    async def init(self, ev: asyncio.Event) -> None:
        await ev.wait()


async def test_cancelled_start_does_not_leave_the_server_running() -> None:
    """Cancelling ``start``/``start_link`` while ``init`` runs (e.g. ``wait_for`` timing
    out) must not leave an orphan server nobody holds a pid to (OTP's start timeout
    kills the half-started process). Today the orphan keeps running, and when its
    ``init`` returns, ``ack.set_result`` on the cancelled future crashes it with
    ``InvalidStateError`` (which a ``start_link`` caller would receive as an exit
    signal)."""
    ev = asyncio.Event()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(SlowInit.start(ev), 0.01)
    await settle()
    leaked = live_processes()
    try:
        assert leaked == []
    finally:
        for p in leaked:
            trellis.exit(p, KILL)
            await p.join()


# ---------------------------------------------------------------------------
# references that keep dead processes' state alive


class _Big:
    """Stands for a large server state."""


class Holder(trellis.Server):
    async def init(self, obj: _Big) -> None:
        self.obj = obj


async def test_dead_pid_does_not_keep_server_state_alive() -> None:
    """A dead ``Pid`` is held in many places (``last_pid`` of a supervisor's child,
    ``Exit``/``Down`` messages, ``Exited.target``, telemetry events). Holding it must
    not keep the ended server's instance, and so all of its state, alive."""
    obj = _Big()
    ref = weakref.ref(obj)
    pid = await Holder.start(obj)
    del obj
    await trellis.stop(pid)
    await settle()
    gc.collect()
    assert not pid.alive
    assert ref() is None

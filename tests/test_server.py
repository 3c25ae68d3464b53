"""SPEC section K: Server (gen_server) semantics, plus replies, continues, mailboxes, names."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import trellis
from _helpers import idle, settle

# ---------------------------------------------------------------------------
# helpers


async def run_in_process(
    body: Callable[[], Awaitable[None]], *, trap_exits: bool = False
) -> trellis.Pid:
    pid = trellis.spawn(body, trap_exits=trap_exits)
    async with asyncio.timeout(5):
        reason = await pid.join()
    if isinstance(reason, BaseException):
        raise reason
    assert reason == trellis.NORMAL
    return pid


async def assert_mailbox_empty() -> None:
    """Inside a process: nothing is (or is about to be) in its mailbox."""
    await settle()
    marker = object()
    trellis.self().send(marker)
    msg = await trellis.receive()
    assert msg is marker, f"unexpected message in mailbox: {msg!r}"


async def assert_no_processes() -> None:
    await settle()
    assert trellis.testing.live_processes() == []


async def join(pid: trellis.Pid) -> Any:
    async with asyncio.timeout(5):
        return await pid.join()


def trellis_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if (r.name == "trellis" or r.name.startswith("trellis.")) and r.levelno >= logging.ERROR
    ]


class Holder(trellis.Server):
    """Holds calls without replying until told; answers pings."""

    async def init(self) -> None:
        self.pending: list[trellis.Caller] = []

    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "hold":
            self.pending.append(caller)
            return trellis.NoReply()
        if request == "ping":
            return "pong"
        if request == "n_pending":
            return len(self.pending)
        if request == "caller_pid":
            return caller.pid
        return ("unknown", request)

    async def handle_cast(self, msg: Any) -> Any:
        if isinstance(msg, tuple) and msg[0] == "release":
            for c in self.pending:
                c.reply(msg[1])
            self.pending.clear()
        return None


class Logger(trellis.Server):
    """Logs every message it handles; ``("stop", reason)`` casts stop it."""

    async def init(self, log: list[Any]) -> None:
        self.log = log

    async def handle_call(self, request: Any, caller: Any) -> Any:
        self.log.append(("call", request))
        if request == "log":
            return list(self.log)
        return request

    async def handle_cast(self, msg: Any) -> Any:
        self.log.append(("cast", msg))
        if isinstance(msg, tuple) and msg[0] == "stop":
            return trellis.Stop(msg[1])
        return None

    async def handle_info(self, msg: Any) -> Any:
        self.log.append(("info", msg))
        return None


# ---------------------------------------------------------------------------
# SPEC 91: call timeout


async def test_call_timeout_keeps_server_running_and_drops_late_reply(
    clock: trellis.testing.VirtualClock,
) -> None:
    """SPEC 91: a call unanswered within timeout raises CallTimeout; the server keeps
    running, and its late reply is discarded (never reaches the caller's mailbox)."""
    srv = await Holder.start()
    log: list[Any] = []

    async def body() -> None:
        try:
            await trellis.call(srv, "hold", timeout=1.0)
        except trellis.CallTimeout:
            log.append(("timeout", clock.now()))
        trellis.cast(srv, ("release", "late"))
        await settle()
        assert srv.alive
        assert await trellis.call(srv, "ping") == "pong"
        assert await trellis.call(srv, "n_pending") == 0
        await assert_mailbox_empty()

    caller = trellis.spawn(body)
    await settle()
    await clock.advance(0.5)
    assert log == []
    await clock.advance(0.5)
    async with asyncio.timeout(5):
        reason = await caller.join()
    if isinstance(reason, BaseException):
        raise reason
    assert log == [("timeout", 1.0)]
    assert srv.alive
    await trellis.stop(srv)


async def test_call_timeout_from_a_plain_task(clock: trellis.testing.VirtualClock) -> None:
    """SPEC 91: CallTimeout also for a caller that is not a process; server unaffected."""
    srv = await Holder.start()
    try:
        task = asyncio.ensure_future(trellis.call(srv, "hold", timeout=2.0))
        await settle()
        await clock.advance(1.9)
        assert not task.done()
        await clock.advance(0.1)
        with pytest.raises(trellis.CallTimeout):
            async with asyncio.timeout(5):
                await task
        trellis.cast(srv, ("release", "late"))
        assert await trellis.call(srv, "ping") == "pong"
    finally:
        await trellis.stop(srv)


async def test_call_timeout_none_waits_forever(clock: trellis.testing.VirtualClock) -> None:
    """SPEC 91: timeout=None never times out."""
    srv = await Holder.start()
    try:
        task = asyncio.ensure_future(trellis.call(srv, "hold", timeout=None))
        await settle()
        await clock.advance(10_000.0)
        assert not task.done()
        trellis.cast(srv, ("release", "finally"))
        async with asyncio.timeout(5):
            assert await task == "finally"
    finally:
        await trellis.stop(srv)


# ---------------------------------------------------------------------------
# SPEC 92: NoProc, CallingSelf, Exited


async def test_call_to_dead_or_unknown_server_raises_noproc() -> None:
    """SPEC 92: calling a dead pid or an unregistered name raises NoProc."""
    srv = await Holder.start(name="k92-holder")
    await trellis.stop(srv)
    with pytest.raises(trellis.NoProc):
        await trellis.call(srv, "ping")
    with pytest.raises(trellis.NoProc):
        await trellis.call("k92-holder", "ping")
    with pytest.raises(trellis.NoProc):
        await trellis.call("k92-never-registered", "ping")


async def test_cast_to_dead_or_unknown_is_silent() -> None:
    """cast to an unknown name or a dead server does nothing and raises nothing."""
    srv = await Holder.start()
    await trellis.stop(srv)
    assert trellis.cast(srv, "x") is None
    assert trellis.cast("k92-nobody", "x") is None


class SelfCaller(trellis.Server):
    async def handle_call(self, request: Any, caller: Any) -> Any:
        try:
            if request == "call_pid":
                await trellis.call(self.pid, "other")
            elif request == "call_name":
                await trellis.call("k92-self", "other")
            elif request == "stop_self":
                await trellis.stop(self.pid)
        except trellis.CallingSelf:
            return "calling_self"
        return "no error"


async def test_calling_or_stopping_self_raises_calling_self() -> None:
    """SPEC 92/96: a server calling or stopping itself (by pid or name) gets CallingSelf."""
    srv = await SelfCaller.start(name="k92-self")
    try:
        assert await trellis.call(srv, "call_pid") == "calling_self"
        assert await trellis.call(srv, "call_name") == "calling_self"
        assert await trellis.call(srv, "stop_self") == "calling_self"
        assert srv.alive
    finally:
        await trellis.stop(srv)


class Crasher(trellis.Server):
    error: BaseException = RuntimeError("crash in handle_call")

    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "crash":
            raise Crasher.error
        if request == "stop_no_reply":
            return trellis.Stop(trellis.Shutdown("bye"))
        if request == "hold":
            return trellis.NoReply()
        return request


async def test_server_crashing_during_call_raises_exited_with_its_reason() -> None:
    """SPEC 92: if the server dies during the call, the caller gets Exited(reason)."""
    srv = await Crasher.start()
    with pytest.raises(trellis.Exited) as ei:
        async with asyncio.timeout(5):
            await trellis.call(srv, "crash")
    assert ei.value.reason is Crasher.error
    assert await join(srv) is Crasher.error


async def test_server_stopping_without_reply_raises_exited() -> None:
    """SPEC 92: Stop(reason) from handle_call without a reply: the caller gets Exited(reason)."""
    srv = await Crasher.start()
    with pytest.raises(trellis.Exited) as ei:
        async with asyncio.timeout(5):
            await trellis.call(srv, "stop_no_reply")
    assert ei.value.reason == trellis.Shutdown("bye")
    assert await join(srv) == trellis.Shutdown("bye")


@pytest.mark.parametrize("how", ["kill", "exception"])
async def test_server_killed_while_holding_a_call_raises_exited(how: str) -> None:
    """SPEC 92: a server killed while a call is pending: the caller gets Exited at once."""
    srv = await Crasher.start()
    task = asyncio.ensure_future(trellis.call(srv, "hold", timeout=None))
    await settle()
    assert not task.done()
    err = ValueError("external")
    trellis.exit(srv, trellis.KILL if how == "kill" else err)
    with pytest.raises(trellis.Exited) as ei:
        async with asyncio.timeout(5):
            await task
    if how == "kill":
        assert ei.value.reason == trellis.KILLED
    else:
        assert ei.value.reason is err


# ---------------------------------------------------------------------------
# SPEC 93: handle_continue


class Cont(trellis.Server):
    async def init(self, log: list[Any]) -> Any:
        self.log = log
        trellis.cast(self.pid, "early-cast")
        self.pid.send("early-info")
        await asyncio.sleep(0)
        return trellis.Continue("from-init")

    async def handle_continue(self, arg: Any) -> Any:
        self.log.append(("continue", arg))
        if arg == "from-init":
            return trellis.Continue("chained")
        if isinstance(arg, tuple) and arg[0] == "reply-later":
            arg[1].reply("replied from continue")
        return None

    async def handle_cast(self, msg: Any) -> Any:
        self.log.append(("cast", msg))
        if msg == "a":
            return trellis.Continue("after-a")
        return None

    async def handle_info(self, msg: Any) -> Any:
        self.log.append(("info", msg))
        if msg == "i":
            return trellis.Continue("after-i")
        return None

    async def handle_call(self, request: Any, caller: Any) -> Any:
        self.log.append(("call", request))
        if request == "log":
            return list(self.log)
        if request == "with-reply":
            return trellis.Continue("after-call", reply="replied")
        if request == "no-reply":
            return trellis.Continue(("reply-later", caller))
        return None


async def test_continue_from_init_runs_before_messages_queued_during_init() -> None:
    """SPEC 93: Continue from init runs handle_continue (and its chained Continue) before
    any message, including messages queued before init returned."""
    log: list[Any] = []
    srv = await Cont.start(log)
    try:
        assert await trellis.call(srv, "log") == [
            ("continue", "from-init"),
            ("continue", "chained"),
            ("cast", "early-cast"),
            ("info", "early-info"),
            ("call", "log"),
        ]
    finally:
        await trellis.stop(srv)


class GatedCont(trellis.Server):
    async def init(self, log: list[Any], pids: list[Any], gate: asyncio.Event) -> Any:
        self.log = log
        pids.append(self.pid)
        await gate.wait()
        return trellis.Continue("from-init")

    async def handle_continue(self, arg: Any) -> Any:
        self.log.append(("continue", arg))
        return None

    async def handle_cast(self, msg: Any) -> Any:
        self.log.append(("cast", msg))
        return None

    async def handle_info(self, msg: Any) -> Any:
        self.log.append(("info", msg))
        return None

    async def handle_call(self, request: Any, caller: Any) -> Any:
        return list(self.log)


async def test_continue_from_init_runs_before_messages_other_senders_queued_during_init() -> None:
    """SPEC 93: messages another sender queued while init was still running are handled
    only after the Continue returned by init."""
    log: list[Any] = []
    pids: list[Any] = []
    gate = asyncio.Event()
    task = asyncio.ensure_future(GatedCont.start(log, pids, gate))
    await settle()
    (pid,) = pids  # init is running, blocked on the gate
    trellis.cast(pid, "x")
    pid.send("y")
    await settle()
    assert log == []
    gate.set()
    async with asyncio.timeout(5):
        assert await task == pid
    try:
        assert await trellis.call(pid, "log") == [
            ("continue", "from-init"),
            ("cast", "x"),
            ("info", "y"),
        ]
    finally:
        await trellis.stop(pid)


async def test_continue_from_cast_and_info_runs_before_next_message() -> None:
    """SPEC 93: Continue returned by handle_cast/handle_info runs before the next message."""
    log: list[Any] = []
    srv = await Cont.start(log)
    try:
        await trellis.call(srv, "log")
        log.clear()
        trellis.cast(srv, "a")
        trellis.cast(srv, "b")
        srv.send("i")
        srv.send("j")
        assert await trellis.call(srv, "log") == [
            ("cast", "a"),
            ("continue", "after-a"),
            ("cast", "b"),
            ("info", "i"),
            ("continue", "after-i"),
            ("info", "j"),
            ("call", "log"),
        ]
    finally:
        await trellis.stop(srv)


async def test_continue_with_reply_from_call_replies_then_continues() -> None:
    """Continue(x, reply=v) from handle_call replies v, then runs handle_continue(x)
    before any other message."""
    log: list[Any] = []
    srv = await Cont.start(log)
    try:
        await trellis.call(srv, "log")
        log.clear()
        assert await trellis.call(srv, "with-reply") == "replied"
        trellis.cast(srv, "z")
        assert await trellis.call(srv, "log") == [
            ("call", "with-reply"),
            ("continue", "after-call"),
            ("cast", "z"),
            ("call", "log"),
        ]
    finally:
        await trellis.stop(srv)


async def test_continue_without_reply_from_call_defers_the_reply() -> None:
    """Continue(x) from handle_call does not reply; handle_continue may reply later."""
    log: list[Any] = []
    srv = await Cont.start(log)
    try:
        async with asyncio.timeout(5):
            assert await trellis.call(srv, "no-reply") == "replied from continue"
        assert log[-1][0] == "continue"
        assert log[-2] == ("call", "no-reply")
    finally:
        await trellis.stop(srv)


# ---------------------------------------------------------------------------
# SPEC 94: init returns


class InitReturns(trellis.Server):
    pids: list[trellis.Pid] = []
    error: BaseException = LookupError("init raised")

    async def init(self, mode: str) -> Any:
        InitReturns.pids.append(self.pid)
        if mode == "ignore":
            return trellis.IGNORE
        if mode == "stop":
            return trellis.Stop(trellis.Shutdown("no thanks"))
        if mode == "raise":
            raise InitReturns.error
        if mode == "bad":
            return 42
        return None


async def test_init_ignore_returns_ignore_and_exits_normal() -> None:
    """SPEC 94: init returning IGNORE: start_link returns IGNORE, the process exits NORMAL."""
    InitReturns.pids.clear()
    assert await InitReturns.start_link("ignore", name="k94-ignore") is trellis.IGNORE
    (pid,) = InitReturns.pids
    assert await join(pid) == trellis.NORMAL
    assert trellis.whereis("k94-ignore") is None
    await assert_no_processes()


async def test_init_stop_raises_start_error_with_reason() -> None:
    """SPEC 94: init returning Stop(r) raises StartError(reason=r); the process exits r."""
    InitReturns.pids.clear()
    with pytest.raises(trellis.StartError) as ei:
        await InitReturns.start_link("stop", name="k94-stop")
    assert ei.value.reason == trellis.Shutdown("no thanks")
    assert not isinstance(ei.value, (trellis.AlreadyStarted, trellis.BadReturnValue))
    (pid,) = InitReturns.pids
    assert await join(pid) == trellis.Shutdown("no thanks")
    assert trellis.whereis("k94-stop") is None
    await assert_no_processes()


async def test_init_exception_raises_start_error_caused_by_it() -> None:
    """SPEC 94: an exception in init raises StartError with reason (and __cause__) the error."""
    with pytest.raises(trellis.StartError) as ei:
        await InitReturns.start_link("raise")
    assert ei.value.reason is InitReturns.error
    assert ei.value.__cause__ is InitReturns.error
    await assert_no_processes()


async def test_init_bad_return_raises_bad_return_value() -> None:
    """SPEC 94: init returning an illegal value x raises BadReturnValue(value=x)."""
    with pytest.raises(trellis.BadReturnValue) as ei:
        await InitReturns.start_link("bad")
    assert ei.value.value == 42
    assert isinstance(ei.value, trellis.StartError)
    await assert_no_processes()


async def test_name_clash_raises_already_started_without_running_init() -> None:
    """SPEC 94: starting with a taken name raises AlreadyStarted(pid of the holder)."""
    InitReturns.pids.clear()
    first = await InitReturns.start_link("ok", name="k94-clash")
    try:
        with pytest.raises(trellis.AlreadyStarted) as ei:
            await InitReturns.start_link("ok", name="k94-clash")
        assert ei.value.pid == first
        assert InitReturns.pids == [first]
        assert trellis.whereis("k94-clash") == first
    finally:
        await trellis.stop(first)
    await assert_no_processes()


async def test_concurrent_starts_with_one_name_run_init_once() -> None:
    """SPEC 94: of two concurrent starts with the same name, one wins and the other raises
    AlreadyStarted(winner); the loser's init never runs."""
    InitReturns.pids.clear()
    results = await asyncio.gather(
        InitReturns.start("ok", name="k94-race"),
        InitReturns.start("ok", name="k94-race"),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, trellis.Pid)]
    losers = [r for r in results if isinstance(r, trellis.AlreadyStarted)]
    try:
        assert len(winners) == 1, results
        assert len(losers) == 1, results
        assert losers[0].pid == winners[0]
        assert InitReturns.pids == winners
        assert trellis.whereis("k94-race") == winners[0]
    finally:
        for w in winners:
            await trellis.stop(w)
    await assert_no_processes()


async def test_failed_start_sends_no_exit_to_trapping_caller() -> None:
    """SPEC 94/17: an ignored or failed start_link sends no Exit to a trapping caller,
    while a successful one links the caller to the server."""

    async def body() -> None:
        assert await InitReturns.start_link("ignore") is trellis.IGNORE
        for mode, cls in [
            ("stop", trellis.StartError),
            ("raise", trellis.StartError),
            ("bad", trellis.BadReturnValue),
        ]:
            with pytest.raises(cls):
                await InitReturns.start_link(mode)
        first = await InitReturns.start_link("ok", name="k94-trap")
        with pytest.raises(trellis.AlreadyStarted):
            await InitReturns.start_link("ok", name="k94-trap")
        await assert_mailbox_empty()
        trellis.exit(first, trellis.KILL)
        async with asyncio.timeout(5):
            assert await trellis.receive() == trellis.Exit(first, trellis.KILLED)

    await run_in_process(body, trap_exits=True)
    await assert_no_processes()


# ---------------------------------------------------------------------------
# SPEC 95: terminate


class Term(trellis.Server):
    trap_exits = False

    async def init(self, log: list[Any], buddy: list[Any] | None = None) -> None:
        self.log = log
        if buddy is not None:
            buddy.append(trellis.spawn(idle, link=True))

    async def handle_call(self, request: Any, caller: Any) -> Any:
        if isinstance(request, tuple) and request[0] == "stop-with-reply":
            return trellis.Stop(request[1], reply="bye")
        if isinstance(request, tuple) and request[0] == "raise":
            raise request[1]
        return request

    async def handle_cast(self, msg: Any) -> Any:
        if isinstance(msg, tuple) and msg[0] == "stop":
            return trellis.Stop(msg[1])
        if isinstance(msg, tuple) and msg[0] == "raise":
            raise msg[1]
        if isinstance(msg, tuple) and msg[0] == "continue-stop":
            return trellis.Continue(msg[1])
        return None

    async def handle_continue(self, arg: Any) -> Any:
        self.log.append(("continue", arg))
        return trellis.Stop(arg)

    async def handle_info(self, msg: Any) -> Any:
        self.log.append(("info", msg))
        if isinstance(msg, tuple) and msg[0] == "stop":
            return trellis.Stop(msg[1])
        return None

    async def terminate(self, reason: Any) -> None:
        self.log.append(("terminate", reason))


class TrapTerm(Term):
    trap_exits = True


@pytest.mark.parametrize("cls", [Term, TrapTerm])
async def test_terminate_runs_on_stop_from_cast(cls: type[Term]) -> None:
    """SPEC 95: Stop(r) from a callback runs terminate(r); the server exits r."""
    log: list[Any] = []
    srv = await cls.start(log)
    trellis.cast(srv, ("stop", trellis.Shutdown("done")))
    assert await join(srv) == trellis.Shutdown("done")
    assert log == [("terminate", trellis.Shutdown("done"))]


async def test_terminate_runs_on_stop_from_info_and_continue() -> None:
    """SPEC 95: Stop(r) returned by handle_info or handle_continue also runs terminate(r)."""
    log: list[Any] = []
    srv = await Term.start(log)
    srv.send(("stop", trellis.Shutdown("info")))
    assert await join(srv) == trellis.Shutdown("info")
    assert log == [
        ("info", ("stop", trellis.Shutdown("info"))),
        ("terminate", trellis.Shutdown("info")),
    ]
    log2: list[Any] = []
    srv2 = await Term.start(log2)
    trellis.cast(srv2, ("continue-stop", trellis.SHUTDOWN))
    assert await join(srv2) == trellis.SHUTDOWN
    assert log2 == [("continue", trellis.SHUTDOWN), ("terminate", trellis.SHUTDOWN)]


async def test_terminate_runs_on_stop_with_reply_from_call() -> None:
    """SPEC 95: Stop(r, reply=v) from handle_call replies v and runs terminate(r)."""
    log: list[Any] = []
    srv = await Term.start(log)
    assert await trellis.call(srv, ("stop-with-reply", trellis.SHUTDOWN)) == "bye"
    assert await join(srv) == trellis.SHUTDOWN
    assert log == [("terminate", trellis.SHUTDOWN)]


@pytest.mark.parametrize("where", ["cast", "call"])
async def test_terminate_runs_on_callback_exception(where: str) -> None:
    """SPEC 95: a callback exception runs terminate(exc); the exit reason is the exception."""
    log: list[Any] = []
    err = ZeroDivisionError("bad math")
    srv = await Term.start(log)
    if where == "cast":
        trellis.cast(srv, ("raise", err))
    else:
        with pytest.raises(trellis.Exited):
            await trellis.call(srv, ("raise", err))
    assert await join(srv) is err
    assert len(log) == 1
    assert log[0][0] == "terminate"
    assert log[0][1] is err


async def test_stop_runs_terminate_normal_without_trap_exits() -> None:
    """SPEC 95/96: stop() runs terminate(NORMAL) even without trap_exits, and is synchronous."""
    log: list[Any] = []
    srv = await Term.start(log)
    assert await trellis.stop(srv) is None
    assert not srv.alive
    assert srv.reason == trellis.NORMAL
    assert log == [("terminate", trellis.NORMAL)]


class SlowTerm(Term):
    async def terminate(self, reason: Any) -> None:
        await settle(10)
        self.log.append(("terminate", reason))


async def test_stop_waits_for_a_slow_terminate() -> None:
    """SPEC 96: stop() returns only after terminate has finished and the server is dead."""
    log: list[Any] = []
    srv = await SlowTerm.start(log)
    await trellis.stop(srv, reason=trellis.SHUTDOWN)
    assert log == [("terminate", trellis.SHUTDOWN)]
    assert not srv.alive
    assert srv.reason == trellis.SHUTDOWN


async def test_stop_with_reason_and_by_name() -> None:
    """SPEC 96: stop(target, reason) by name runs terminate(reason); the server exits reason."""
    log: list[Any] = []
    srv = await Term.start(log, name="k96-byname")
    await trellis.stop("k96-byname", reason=trellis.Shutdown("maint"))
    assert not srv.alive
    assert srv.reason == trellis.Shutdown("maint")
    assert log == [("terminate", trellis.Shutdown("maint"))]
    assert trellis.whereis("k96-byname") is None


async def test_stop_dead_or_unknown_raises_noproc() -> None:
    """SPEC 96: stopping a dead server or an unknown name raises NoProc."""
    srv = await Term.start([])
    await trellis.stop(srv)
    with pytest.raises(trellis.NoProc):
        await trellis.stop(srv)
    with pytest.raises(trellis.NoProc):
        await trellis.stop("k96-nobody")


async def _parent(cls: type[Term], log: list[Any], out: list[Any], ready: asyncio.Event) -> None:
    out.append(await cls.start_link(log))
    ready.set()
    await idle()


@pytest.mark.parametrize(
    ("cls", "expect_terminate"), [(TrapTerm, True), (Term, False)], ids=["trapping", "plain"]
)
async def test_parent_exit_runs_terminate_only_when_trapping(
    cls: type[Term], expect_terminate: bool
) -> None:
    """SPEC 95: an exit signal from the parent runs terminate only if the server traps exits;
    either way the server exits with the parent's reason."""
    log: list[Any] = []
    out: list[Any] = []
    ready = asyncio.Event()
    parent = trellis.spawn(_parent, cls, log, out, ready)
    async with asyncio.timeout(5):
        await ready.wait()
    (srv,) = out
    trellis.exit(parent, trellis.SHUTDOWN)
    assert await join(parent) == trellis.SHUTDOWN
    assert await join(srv) == trellis.SHUTDOWN
    assert log == ([("terminate", trellis.SHUTDOWN)] if expect_terminate else [])


async def _parent_then_return(
    cls: type[Term], log: list[Any], out: list[Any], ready: asyncio.Event
) -> None:
    out.append(await cls.start_link(log))
    ready.set()
    await trellis.receive()


@pytest.mark.parametrize(
    ("cls", "stops"), [(TrapTerm, True), (Term, False)], ids=["trapping", "plain"]
)
async def test_parent_normal_exit(cls: type[Term], stops: bool) -> None:
    """SPEC 95: a parent ending NORMAL stops a trapping server (terminate(NORMAL)); a
    non-trapping server ignores it, as NORMAL is ignored over links."""
    log: list[Any] = []
    out: list[Any] = []
    ready = asyncio.Event()
    parent = trellis.spawn(_parent_then_return, cls, log, out, ready)
    async with asyncio.timeout(5):
        await ready.wait()
    (srv,) = out
    parent.send("return now")
    assert await join(parent) == trellis.NORMAL
    await settle()
    if stops:
        assert await join(srv) == trellis.NORMAL
        assert log == [("terminate", trellis.NORMAL)]
    else:
        assert srv.alive
        assert log == []
        await trellis.stop(srv)


async def test_parent_crash_runs_trapping_terminate_with_the_crash_reason() -> None:
    """SPEC 95: a crashing parent's reason reaches a trapping server's terminate."""
    log: list[Any] = []
    out: list[Any] = []
    err = RuntimeError("parent crashed")
    ready = asyncio.Event()
    parent = trellis.spawn(_parent, TrapTerm, log, out, ready)
    async with asyncio.timeout(5):
        await ready.wait()
    trellis.exit(parent, err)
    assert await join(out[0]) is err
    assert len(log) == 1
    assert log[0][1] is err


@pytest.mark.parametrize("cls", [Term, TrapTerm])
async def test_terminate_never_runs_on_kill(cls: type[Term]) -> None:
    """SPEC 95: KILL ends the server with KILLED and never runs terminate."""
    log: list[Any] = []
    srv = await cls.start(log)
    trellis.exit(srv, trellis.KILL)
    assert await join(srv) == trellis.KILLED
    assert log == []


async def test_terminate_never_runs_on_untrapped_exit_signal() -> None:
    """SPEC 95: a non-trapping server hit by an exit signal dies without terminate."""
    log: list[Any] = []
    err = RuntimeError("signal")
    srv = await Term.start(log)
    trellis.exit(srv, err)
    assert await join(srv) is err
    assert log == []


async def test_trapping_server_gets_non_parent_exits_in_handle_info() -> None:
    """With trap_exits, an Exit from a process that is not the parent goes to handle_info."""
    log: list[Any] = []
    buddy: list[Any] = []
    srv = await TrapTerm.start(log, buddy)
    try:
        (b,) = buddy
        err = RuntimeError("buddy died")
        trellis.exit(b, err)
        await join(b)
        assert await trellis.call(srv, "sync") == "sync"
        assert log == [("info", trellis.Exit(b, err))]
        trellis.exit(srv, trellis.Shutdown("not from parent"))
        assert await trellis.call(srv, "sync") == "sync"
        assert log[1] == ("info", trellis.Exit(None, trellis.Shutdown("not from parent")))
        assert srv.alive
    finally:
        await trellis.stop(srv)


# ---------------------------------------------------------------------------
# SPEC 97: crash reports and exits over links


@pytest.mark.parametrize(
    "reason",
    [trellis.NORMAL, trellis.SHUTDOWN, trellis.Shutdown("x")],
    ids=["normal", "shutdown", "shutdown_detail"],
)
async def test_clean_reasons_produce_no_crash_report(
    caplog: pytest.LogCaptureFixture, reason: Any
) -> None:
    """SPEC 97: normal, shutdown and Shutdown(_) exits log no crash report."""
    caplog.set_level(logging.DEBUG, logger="trellis")
    srv = await Term.start([])
    trellis.cast(srv, ("stop", reason))
    assert await join(srv) == reason
    srv2 = await Term.start([])
    await trellis.stop(srv2, reason=reason)
    await settle()
    assert trellis_errors(caplog) == []


@pytest.mark.parametrize("reason", ["weird", RuntimeError("abnormal")], ids=["term", "exception"])
async def test_abnormal_reasons_produce_a_crash_report(
    caplog: pytest.LogCaptureFixture, reason: Any
) -> None:
    """SPEC 97: any other stop reason logs an error-level crash report on "trellis"."""
    caplog.set_level(logging.DEBUG, logger="trellis")
    srv = await Term.start([])
    trellis.cast(srv, ("stop", reason))
    assert await join(srv) == reason
    await settle()
    assert len(trellis_errors(caplog)) >= 1


async def test_callback_exception_produces_a_crash_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SPEC 97: a callback exception logs an error-level crash report."""
    caplog.set_level(logging.DEBUG, logger="trellis")
    srv = await Term.start([])
    trellis.cast(srv, ("raise", KeyError("k")))
    await join(srv)
    await settle()
    assert len(trellis_errors(caplog)) >= 1


@pytest.mark.parametrize(
    "reason", [trellis.SHUTDOWN, trellis.Shutdown("x")], ids=["shutdown", "shutdown_detail"]
)
async def test_shutdown_reasons_kill_non_trapping_linked_process(reason: Any) -> None:
    """SPEC 97: shutdown and Shutdown(_) kill a non-trapping linked process."""
    buddy: list[Any] = []
    srv = await Term.start([], buddy)
    (b,) = buddy
    trellis.cast(srv, ("stop", reason))
    assert await join(srv) == reason
    assert await join(b) == reason


async def test_normal_exit_does_not_kill_linked_process() -> None:
    """SPEC 97: a server exiting normal does not kill a non-trapping linked process."""
    buddy: list[Any] = []
    srv = await Term.start([], buddy)
    (b,) = buddy
    await trellis.stop(srv)
    await settle()
    assert b.alive
    trellis.exit(b, trellis.KILL)
    await join(b)


# ---------------------------------------------------------------------------
# SPEC 98: ordering


async def test_messages_are_handled_in_send_order_and_call_waits_for_casts() -> None:
    """SPEC 98: casts and sends from one sender are handled in order; a call placed after
    N casts returns only after all N were handled."""
    log: list[Any] = []
    srv = await Logger.start(log)
    try:
        expected: list[Any] = []
        for i in range(200):
            if i % 3 == 0:
                srv.send(i)
                expected.append(("info", i))
            else:
                trellis.cast(srv, i)
                expected.append(("cast", i))
        result = await trellis.call(srv, "log")
        assert result == [*expected, ("call", "log")]
    finally:
        await trellis.stop(srv)


async def test_ordering_from_a_sending_process() -> None:
    """SPEC 98: the same holds for a process sender using cast, send and call."""
    log: list[Any] = []
    srv = await Logger.start(log)

    async def body() -> None:
        for i in range(50):
            trellis.cast(srv, i)
            trellis.send(srv, -i)
        assert await trellis.call(srv, "log") == [
            *[m for i in range(50) for m in (("cast", i), ("info", -i))],
            ("call", "log"),
        ]

    try:
        await run_in_process(body)
    finally:
        await trellis.stop(srv)


# ---------------------------------------------------------------------------
# replies


async def test_deferred_reply_via_noreply_and_caller_reply() -> None:
    """NoReply() defers the reply; caller.reply(v) later completes the call with v."""
    srv = await Holder.start()
    try:
        t1 = asyncio.ensure_future(trellis.call(srv, "hold", timeout=None))
        t2 = asyncio.ensure_future(trellis.call(srv, "hold", timeout=None))
        await settle()
        assert await trellis.call(srv, "n_pending") == 2
        assert not t1.done()
        assert not t2.done()
        trellis.cast(srv, ("release", "later"))
        async with asyncio.timeout(5):
            assert await asyncio.gather(t1, t2) == ["later", "later"]
    finally:
        await trellis.stop(srv)


async def test_caller_pid_is_the_calling_process_or_none() -> None:
    """caller.pid is the calling process, or None for a caller outside any process."""
    srv = await Holder.start()
    seen: list[Any] = []

    async def body() -> None:
        seen.append(await trellis.call(srv, "caller_pid"))

    try:
        assert await trellis.call(srv, "caller_pid") is None
        p = await run_in_process(body)
        assert seen == [p]
    finally:
        await trellis.stop(srv)


class Replier(trellis.Server):
    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "wrapped":
            return trellis.Reply(trellis.NoReply)
        if request == "none":
            return None
        if request == "reply-42":
            return trellis.Reply(42)
        return request

    async def handle_cast(self, msg: Any) -> Any:
        return msg  # anything but None/Stop/Continue is illegal


async def test_reply_wrapper_and_plain_values() -> None:
    """A returned value is the reply; Reply(v) replies v literally; None replies None."""
    srv = await Replier.start()
    try:
        assert await trellis.call(srv, "wrapped") is trellis.NoReply
        assert await trellis.call(srv, "none") is None
        assert await trellis.call(srv, ("any", 1)) == ("any", 1)
        assert await trellis.call(srv, "reply-42") == 42
    finally:
        await trellis.stop(srv)


async def test_illegal_callback_return_crashes_with_bad_return_value() -> None:
    """A callback returning something outside its legal set crashes with BadReturnValue(x)."""
    srv = await Replier.start()
    trellis.cast(srv, 42)
    reason = await join(srv)
    assert isinstance(reason, trellis.BadReturnValue)
    assert reason.value == 42


# ---------------------------------------------------------------------------
# bounded mailboxes


class Bounded(trellis.Server):
    mailbox_size = 2
    mailbox_policy = "reject"

    async def init(self, gate: asyncio.Event, busy: asyncio.Event) -> None:
        self.gate = gate
        self.busy = busy
        self.log: list[Any] = []

    async def handle_cast(self, msg: Any) -> Any:
        if msg == "block":
            self.busy.set()
            await self.gate.wait()
        else:
            self.log.append(msg)
        return None

    async def handle_call(self, request: Any, caller: Any) -> Any:
        return list(self.log)


class DropOldest(Bounded):
    mailbox_policy = "drop_oldest"


class DropNewest(Bounded):
    mailbox_policy = "drop_newest"


async def _blocked(cls: type[Bounded]) -> tuple[trellis.Pid, asyncio.Event]:
    gate, busy = asyncio.Event(), asyncio.Event()
    srv = await cls.start(gate, busy)
    trellis.cast(srv, "block")
    async with asyncio.timeout(5):
        await busy.wait()
    return srv, gate


async def test_mailbox_reject_policy_raises_mailbox_full() -> None:
    """A bounded mailbox with policy reject makes cast raise MailboxFull when full."""
    srv, gate = await _blocked(Bounded)
    try:
        trellis.cast(srv, 1)
        trellis.cast(srv, 2)
        with pytest.raises(trellis.MailboxFull):
            trellis.cast(srv, 3)
        gate.set()
        assert await trellis.call(srv, "log") == [1, 2]
        trellis.cast(srv, 4)  # room again
        assert await trellis.call(srv, "log") == [1, 2, 4]
    finally:
        gate.set()
        await trellis.stop(srv)


@pytest.mark.parametrize(
    ("cls", "expected"), [(DropOldest, [2, 3]), (DropNewest, [1, 2])], ids=["oldest", "newest"]
)
async def test_mailbox_drop_policies(cls: type[Bounded], expected: list[int]) -> None:
    """drop_oldest discards the oldest queued message, drop_newest the incoming one;
    cast never raises."""
    srv, gate = await _blocked(cls)
    try:
        trellis.cast(srv, 1)
        trellis.cast(srv, 2)
        trellis.cast(srv, 3)
        gate.set()
        assert await trellis.call(srv, "log") == expected
    finally:
        gate.set()
        await trellis.stop(srv)


async def test_queued_call_is_not_dropped_by_drop_oldest() -> None:
    """A call never fails because of the mailbox bound (it backpressures): a queued call is
    not discarded by drop_oldest when later casts overflow the mailbox."""
    srv, gate = await _blocked(DropOldest)
    try:
        task = asyncio.ensure_future(trellis.call(srv, "log", timeout=None))
        await settle()
        for i in range(5):
            trellis.cast(srv, i)
        await settle()
        assert not task.done()
        gate.set()
        async with asyncio.timeout(5):
            result = await task
        assert isinstance(result, list)
    finally:
        gate.set()
        await trellis.stop(srv)


async def test_call_backpressures_on_a_full_mailbox() -> None:
    """call on a full bounded mailbox waits for room instead of failing."""
    srv, gate = await _blocked(Bounded)
    try:
        trellis.cast(srv, 1)
        trellis.cast(srv, 2)
        task = asyncio.ensure_future(trellis.call(srv, "log", timeout=None))
        await settle()
        assert not task.done()
        gate.set()
        async with asyncio.timeout(5):
            assert await task == [1, 2]
    finally:
        gate.set()
        await trellis.stop(srv)


# ---------------------------------------------------------------------------
# Via names


async def test_via_names_register_resolve_and_clash() -> None:
    """A Via(registry, key) name works for start_link, call, cast and whereis; a clash raises
    AlreadyStarted; the name is released when the server stops."""
    reg = await trellis.Registry.start_link(keys="unique", name="k-via-reg")
    try:
        log: list[Any] = []
        name = trellis.Via("k-via-reg", "svc")
        srv = await Logger.start(log, name=name)
        assert trellis.whereis(name) == srv
        assert [p for p, _ in reg.lookup("svc")] == [srv]
        trellis.cast(name, "hello")
        assert await trellis.call(name, "log") == [("cast", "hello"), ("call", "log")]
        with pytest.raises(trellis.AlreadyStarted) as ei:
            await Logger.start([], name=name)
        assert ei.value.pid == srv
        await trellis.stop(name)
        await settle()
        assert not srv.alive
        assert trellis.whereis(name) is None
        with pytest.raises(trellis.NoProc):
            await trellis.call(name, "log")
        srv2 = await Logger.start([], name=name)
        assert trellis.whereis(name) == srv2
        await trellis.stop(srv2)
    finally:
        await trellis.stop(reg)

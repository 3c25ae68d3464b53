"""Kernel conformance: processes, exit signals, links, monitors, mailboxes and names.

These follow the kernel section of ``docs/api.md`` ("Processes") and DESIGN.md §3,
which mirror Erlang's process semantics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import trellis
from _helpers import collector, idle, settle

# ---------------------------------------------------------------------------
# helpers


async def link_and_idle(target: trellis.Pid) -> None:
    trellis.link(target)
    await idle()


async def link_and_collect(target: trellis.Pid, out: list[Any]) -> None:
    trellis.link(target)
    await collector(out)


async def wait_for_message_then_return() -> None:
    await trellis.receive()


async def run_in_process(
    body: Callable[[], Awaitable[None]], *, trap_exits: bool = False
) -> trellis.Pid:
    """Run ``body`` as a process; re-raise whatever it failed with."""
    pid = trellis.spawn(body, trap_exits=trap_exits)
    async with asyncio.timeout(5):
        reason = await pid.join()
    if isinstance(reason, BaseException):
        raise reason
    assert reason == trellis.NORMAL
    return pid


async def assert_mailbox_empty() -> None:
    """Inside a process: nothing is (or is about to be) in the mailbox."""
    await settle()
    marker = object()
    trellis.self().send(marker)
    msg = await trellis.receive()
    assert msg is marker, f"unexpected message in mailbox: {msg!r}"


async def kill_and_join(*pids: trellis.Pid) -> None:
    for pid in pids:
        trellis.exit(pid, trellis.KILL)
    async with asyncio.timeout(5):
        for pid in pids:
            await pid.join()


# ---------------------------------------------------------------------------
# spawn, self, join


async def test_spawn_runs_fn_with_args_as_a_process_and_join_returns_normal() -> None:
    """spawn(fn, *args) runs fn(*args) as its own process; returning ends it NORMAL."""
    seen: list[Any] = []

    async def body(a: int, b: str) -> None:
        seen.append((a, b, trellis.self()))

    pid = trellis.spawn(body, 1, "x")
    assert isinstance(pid, trellis.Pid)
    async with asyncio.timeout(5):
        assert await pid.join() == trellis.NORMAL
    assert seen == [(1, "x", pid)]
    assert pid.alive is False
    assert pid.reason == trellis.NORMAL


async def test_a_raising_process_exits_with_the_exception_as_reason() -> None:
    """A process whose function raises ends with that exception instance as reason."""
    err = RuntimeError("boom")

    async def body() -> None:
        raise err

    pid = trellis.spawn(body)
    async with asyncio.timeout(5):
        reason = await pid.join()
    assert reason is err
    assert pid.reason is err
    assert not pid.alive


async def test_alive_and_reason_while_running() -> None:
    """A live process has alive True and reason None."""
    pid = trellis.spawn(idle)
    await settle()
    assert pid.alive is True
    assert pid.reason is None
    await kill_and_join(pid)
    assert pid.alive is False
    assert pid.reason == trellis.KILLED


async def test_join_on_dead_process_returns_reason_and_many_joiners_all_see_it() -> None:
    """join() returns the exit reason to every waiter, also after the process ended."""
    pid = trellis.spawn(wait_for_message_then_return)
    waiters = [asyncio.ensure_future(pid.join()) for _ in range(3)]
    await settle()
    assert not any(w.done() for w in waiters)
    pid.send("go")
    async with asyncio.timeout(5):
        results = await asyncio.gather(*waiters)
    assert results == [trellis.NORMAL] * 3
    assert await pid.join() == trellis.NORMAL


async def test_self_outside_a_process_raises_not_a_process() -> None:
    """trellis.self() raises NotAProcess when not called from a process."""
    with pytest.raises(trellis.NotAProcess):
        trellis.self()


async def test_self_inside_a_process_is_its_pid() -> None:
    """trellis.self() inside a process returns the Pid spawn returned."""
    seen: list[trellis.Pid] = []

    async def body() -> None:
        seen.append(trellis.self())

    pid = trellis.spawn(body)
    await pid.join()
    assert seen == [pid]


async def test_spawn_link_outside_a_process_raises_not_a_process() -> None:
    """spawn(..., link=True) needs a calling process; outside one it raises NotAProcess."""
    with pytest.raises(trellis.NotAProcess):
        trellis.spawn(idle, link=True)
    await settle()
    assert trellis.testing.live_processes() == []


# ---------------------------------------------------------------------------
# exit signals


@pytest.mark.parametrize(
    "reason",
    [trellis.SHUTDOWN, trellis.Shutdown("bye"), RuntimeError("crash"), trellis.NOPROC],
    ids=["shutdown", "shutdown_detail", "exception", "noproc"],
)
async def test_exit_kills_a_non_trapping_process_with_that_reason(reason: Any) -> None:
    """exit(pid, R) for R other than NORMAL/KILL ends a non-trapping process with R."""
    pid = trellis.spawn(idle)
    await settle()
    trellis.exit(pid, reason)
    async with asyncio.timeout(5):
        got = await pid.join()
    assert got == reason
    if isinstance(reason, BaseException):
        assert got is reason


async def test_exit_normal_is_ignored_by_a_non_trapping_process() -> None:
    """exit(pid, NORMAL) does nothing to a process that does not trap exits."""
    pid = trellis.spawn(idle)
    await settle()
    trellis.exit(pid, trellis.NORMAL)
    await settle()
    assert pid.alive
    await kill_and_join(pid)


async def test_exit_self_normal_ends_the_process_normal() -> None:
    """exit(self(), NORMAL) is the exception: it ends the calling process with NORMAL."""
    log: list[str] = []

    async def body() -> None:
        trellis.exit(trellis.self(), trellis.NORMAL)
        await settle()
        log.append("survived")

    pid = trellis.spawn(body)
    async with asyncio.timeout(5):
        assert await pid.join() == trellis.NORMAL
    assert log == []


async def test_kill_ends_a_non_trapping_process_with_killed() -> None:
    """exit(pid, KILL) ends the process with reason KILLED."""
    pid = trellis.spawn(idle)
    await settle()
    trellis.exit(pid, trellis.KILL)
    async with asyncio.timeout(5):
        assert await pid.join() == trellis.KILLED


async def test_trapping_process_gets_exit_messages_and_stays_alive() -> None:
    """A trap_exits process receives Exit(sender, reason) instead of dying (NORMAL too)."""
    out: list[Any] = []
    target = trellis.spawn(collector, out, trap_exits=True)
    await settle()
    err = RuntimeError("crash")
    trellis.exit(target, err)
    trellis.exit(target, trellis.SHUTDOWN)
    trellis.exit(target, trellis.NORMAL)
    await settle()
    assert target.alive
    assert out == [
        trellis.Exit(None, err),
        trellis.Exit(None, trellis.SHUTDOWN),
        trellis.Exit(None, trellis.NORMAL),
    ]
    assert out[0].pid is None
    assert out[0].reason is err
    await kill_and_join(target)


async def test_exit_message_names_the_sending_process() -> None:
    """An exit signal sent from a process arrives as Exit(sender_pid, reason)."""
    out: list[Any] = []
    target = trellis.spawn(collector, out, trap_exits=True)

    async def sender() -> None:
        trellis.exit(target, trellis.Shutdown("why"))

    await settle()
    s = trellis.spawn(sender)
    await s.join()
    await settle()
    assert out == [trellis.Exit(s, trellis.Shutdown("why"))]
    await kill_and_join(target)


async def test_kill_is_untrappable() -> None:
    """KILL ends even a trap_exits process, with reason KILLED and no Exit message."""
    out: list[Any] = []
    target = trellis.spawn(collector, out, trap_exits=True)
    await settle()
    trellis.exit(target, trellis.KILL)
    async with asyncio.timeout(5):
        assert await target.join() == trellis.KILLED
    assert out == []


# ---------------------------------------------------------------------------
# links


async def test_link_propagates_a_crash_to_a_non_trapping_partner() -> None:
    """A linked non-trapping process dies with the same reason as its partner."""
    a = trellis.spawn(idle)
    b = trellis.spawn(link_and_idle, a)
    await settle()
    err = RuntimeError("a crashed")
    trellis.exit(a, err)
    async with asyncio.timeout(5):
        assert await a.join() is err
        assert await b.join() is err


async def test_links_are_bidirectional() -> None:
    """Crashing the process that called link() also kills the linked target."""
    a = trellis.spawn(idle)
    b = trellis.spawn(link_and_idle, a)
    await settle()
    err = ValueError("b crashed")
    trellis.exit(b, err)
    async with asyncio.timeout(5):
        assert await b.join() is err
        assert await a.join() is err


@pytest.mark.parametrize(
    "reason",
    [trellis.SHUTDOWN, trellis.Shutdown({"detail": 1})],
    ids=["shutdown", "shutdown_detail"],
)
async def test_clean_but_not_normal_reasons_still_kill_linked_processes(reason: Any) -> None:
    """SPEC 97: over links only NORMAL is ignored; SHUTDOWN and Shutdown(x) kill."""
    a = trellis.spawn(idle)
    b = trellis.spawn(link_and_idle, a)
    await settle()
    trellis.exit(a, reason)
    async with asyncio.timeout(5):
        assert await b.join() == reason


async def test_normal_exit_does_not_kill_a_non_trapping_linked_process() -> None:
    """A partner ending NORMAL does not take a non-trapping linked process down."""
    a = trellis.spawn(wait_for_message_then_return)
    b = trellis.spawn(link_and_idle, a)
    await settle()
    a.send("go")
    async with asyncio.timeout(5):
        assert await a.join() == trellis.NORMAL
    await settle()
    assert b.alive
    await kill_and_join(b)


async def test_trapping_linked_process_gets_exit_message_for_crash_and_normal() -> None:
    """A trapping linked process receives Exit(partner, reason), also for NORMAL."""
    out: list[Any] = []
    a = trellis.spawn(idle)
    b = trellis.spawn(link_and_collect, a, out, trap_exits=True)
    await settle()
    err = RuntimeError("x")
    trellis.exit(a, err)
    await a.join()
    c = trellis.spawn(wait_for_message_then_return)
    await settle()
    out2: list[Any] = []
    d = trellis.spawn(link_and_collect, c, out2, trap_exits=True)
    await settle()
    c.send("go")
    await c.join()
    await settle()
    assert out == [trellis.Exit(a, err)]
    assert out[0].reason is err
    assert out2 == [trellis.Exit(c, trellis.NORMAL)]
    assert b.alive
    assert d.alive
    await kill_and_join(b, d)


async def test_killed_propagates_over_links_as_killed_not_kill() -> None:
    """A killed process's links see reason KILLED, which a trapping partner can trap."""
    out: list[Any] = []
    a = trellis.spawn(idle)
    trapper = trellis.spawn(link_and_collect, a, out, trap_exits=True)
    plain = trellis.spawn(link_and_idle, a)
    await settle()
    trellis.exit(a, trellis.KILL)
    async with asyncio.timeout(5):
        assert await a.join() == trellis.KILLED
        assert await plain.join() == trellis.KILLED
    await settle()
    assert trapper.alive
    assert out == [trellis.Exit(a, trellis.KILLED)]
    await kill_and_join(trapper)


async def test_spawn_link_true_links_child_to_caller() -> None:
    """spawn(fn, link=True) links the new process to the caller (crash -> Exit message)."""
    err = RuntimeError("child crashed")

    async def child() -> None:
        raise err

    async def body() -> None:
        c = trellis.spawn(child, link=True)
        msg = await trellis.receive()
        assert msg == trellis.Exit(c, err)
        assert msg.reason is err

    await run_in_process(body, trap_exits=True)


async def test_spawn_link_true_crash_kills_non_trapping_caller() -> None:
    """A crashing spawn(link=True) child kills a non-trapping parent with its reason."""
    err = RuntimeError("child crashed")
    log: list[str] = []

    async def child() -> None:
        await trellis.receive()
        raise err

    async def parent() -> None:
        c = trellis.spawn(child, link=True)
        c.send("crash now")
        await idle()
        log.append("unreachable")

    p = trellis.spawn(parent)
    async with asyncio.timeout(5):
        assert await p.join() is err
    assert log == []


async def test_link_to_dead_pid_delivers_noproc_to_a_trapping_caller() -> None:
    """Linking a dead pid delivers Exit(dead_pid, NOPROC) at once to a trapping caller."""
    dead = trellis.spawn(wait_for_message_then_return)
    dead.send("go")
    await dead.join()

    async def body() -> None:
        trellis.link(dead)
        async with asyncio.timeout(5):
            msg = await trellis.receive()
        assert msg == trellis.Exit(dead, trellis.NOPROC)
        await assert_mailbox_empty()

    await run_in_process(body, trap_exits=True)


async def test_link_to_dead_pid_kills_a_non_trapping_caller_with_noproc() -> None:
    """Linking a dead pid kills a non-trapping caller with reason NOPROC."""
    dead = trellis.spawn(wait_for_message_then_return)
    dead.send("go")
    await dead.join()
    log: list[str] = []

    async def body() -> None:
        trellis.link(dead)
        await settle()
        await idle()
        log.append("unreachable")

    p = trellis.spawn(body)
    async with asyncio.timeout(5):
        assert await p.join() == trellis.NOPROC
    assert log == []


async def test_unlink_stops_propagation_in_both_directions() -> None:
    """After unlink, neither side's crash affects the other."""
    a = trellis.spawn(idle)
    log: list[str] = []

    async def b_body() -> None:
        trellis.link(a)
        trellis.unlink(a)
        log.append("unlinked")
        await idle()

    b = trellis.spawn(b_body)
    await settle()
    assert log == ["unlinked"]
    trellis.exit(a, RuntimeError("a dies"))
    await a.join()
    await settle()
    assert b.alive

    c = trellis.spawn(idle)

    async def d_body() -> None:
        trellis.link(c)
        trellis.unlink(c)
        raise RuntimeError("d dies")

    d = trellis.spawn(d_body)
    await d.join()
    await settle()
    assert c.alive
    await kill_and_join(b, c)


async def test_exit_propagates_through_a_chain_of_links() -> None:
    """A crash at one end of a chain a-b-c-d kills every process with the same reason."""
    a = trellis.spawn(idle)
    b = trellis.spawn(link_and_idle, a)
    c = trellis.spawn(link_and_idle, b)
    d = trellis.spawn(link_and_idle, c)
    await settle()
    err = RuntimeError("d crashed")
    trellis.exit(d, err)
    async with asyncio.timeout(5):
        for p in (d, c, b, a):
            assert await p.join() is err


async def test_a_trapping_process_stops_propagation_along_a_chain() -> None:
    """In a-b-c with b trapping exits, c's crash kills nobody else; b gets Exit(c, R)."""
    a = trellis.spawn(idle)
    out: list[Any] = []
    b = trellis.spawn(link_and_collect, a, out, trap_exits=True)
    await settle()
    c = trellis.spawn(link_and_idle, b)
    await settle()
    err = RuntimeError("c crashed")
    trellis.exit(c, err)
    async with asyncio.timeout(5):
        assert await c.join() is err
    await settle()
    assert a.alive
    assert b.alive
    assert out == [trellis.Exit(c, err)]
    await kill_and_join(a, b)


# ---------------------------------------------------------------------------
# monitors


async def test_monitor_delivers_down_exactly_once() -> None:
    """monitor(pid) -> ref; the target's death delivers Down(ref, pid, reason) once."""
    target = trellis.spawn(idle)
    err = RuntimeError("gone")

    async def body() -> None:
        ref = trellis.monitor(target)
        trellis.exit(target, err)
        async with asyncio.timeout(5):
            msg = await trellis.receive()
        assert msg == trellis.Down(ref, target, err)
        assert msg.ref == ref
        assert msg.pid == target
        assert msg.reason is err
        await assert_mailbox_empty()

    await run_in_process(body)


async def test_monitor_reports_normal_exit_and_does_not_link() -> None:
    """A monitored process ending NORMAL gives Down(..., NORMAL); a crash never kills us."""
    t1 = trellis.spawn(wait_for_message_then_return)
    t2 = trellis.spawn(idle)

    async def body() -> None:
        r1 = trellis.monitor(t1)
        r2 = trellis.monitor(t2)
        assert r1 != r2
        t1.send("go")
        assert await trellis.receive() == trellis.Down(r1, t1, trellis.NORMAL)
        err = RuntimeError("t2")
        trellis.exit(t2, err)
        assert await trellis.receive() == trellis.Down(r2, t2, err)
        await assert_mailbox_empty()

    await run_in_process(body)  # a non-trapping monitor is not killed by t2's crash


async def test_monitor_of_a_dead_pid_delivers_noproc_at_once() -> None:
    """Monitoring an already dead pid delivers Down(ref, pid, NOPROC) immediately."""
    dead = trellis.spawn(wait_for_message_then_return)
    dead.send("go")
    await dead.join()

    async def body() -> None:
        ref = trellis.monitor(dead)
        async with asyncio.timeout(5):
            assert await trellis.receive() == trellis.Down(ref, dead, trellis.NOPROC)
        await assert_mailbox_empty()

    await run_in_process(body)


async def test_two_monitors_give_two_downs_with_their_own_refs() -> None:
    """Each monitor is independent: two monitors on one pid deliver two Downs."""
    target = trellis.spawn(idle)

    async def body() -> None:
        r1 = trellis.monitor(target)
        r2 = trellis.monitor(target)
        assert r1 != r2
        trellis.exit(target, trellis.SHUTDOWN)
        got = {await trellis.receive(), await trellis.receive()}
        assert got == {
            trellis.Down(r1, target, trellis.SHUTDOWN),
            trellis.Down(r2, target, trellis.SHUTDOWN),
        }
        await assert_mailbox_empty()

    await run_in_process(body)


async def test_demonitor_before_death_means_no_down() -> None:
    """After demonitor(ref), the target's death delivers nothing."""
    target = trellis.spawn(idle)

    async def body() -> None:
        ref = trellis.monitor(target)
        trellis.demonitor(ref)
        trellis.exit(target, RuntimeError("x"))
        await target.join()
        await assert_mailbox_empty()

    await run_in_process(body)


async def test_demonitor_flushes_an_undelivered_down() -> None:
    """demonitor(ref) removes a Down for that ref already sitting in the mailbox."""
    target = trellis.spawn(idle)
    other = trellis.spawn(idle)

    async def body() -> None:
        ref = trellis.monitor(target)
        keep = trellis.monitor(other)
        trellis.exit(target, RuntimeError("x"))
        trellis.exit(other, trellis.SHUTDOWN)
        await target.join()
        await other.join()
        await settle()
        trellis.demonitor(ref)
        assert await trellis.receive() == trellis.Down(keep, other, trellis.SHUTDOWN)
        await assert_mailbox_empty()

    await run_in_process(body)


# ---------------------------------------------------------------------------
# receive


async def test_receive_is_fifo() -> None:
    """Messages from one sender are received in send order."""

    async def body() -> None:
        me = trellis.self()
        for i in range(50):
            me.send(i)
        assert [await trellis.receive() for _ in range(50)] == list(range(50))

    await run_in_process(body)


async def test_receive_with_match_is_selective_and_keeps_the_rest_in_order() -> None:
    """receive(match=f) takes the first message f accepts; others stay, in order."""

    async def body() -> None:
        me = trellis.self()
        for m in ["a", 1, "b", 2, "c"]:
            me.send(m)
        assert await trellis.receive(match=lambda m: isinstance(m, int)) == 1
        assert await trellis.receive(match=lambda m: isinstance(m, int)) == 2
        assert [await trellis.receive() for _ in range(3)] == ["a", "b", "c"]

    await run_in_process(body)


async def test_receive_with_match_waits_for_a_later_matching_message() -> None:
    """A selective receive blocks until a matching message arrives."""
    got: list[Any] = []

    async def body() -> None:
        got.append(await trellis.receive(match=lambda m: m == "wanted"))
        got.append(await trellis.receive())

    pid = trellis.spawn(body)
    await settle()
    pid.send("other")
    await settle()
    assert got == []
    pid.send("wanted")
    async with asyncio.timeout(5):
        assert await pid.join() == trellis.NORMAL
    assert got == ["wanted", "other"]


async def test_receive_timeout_raises_receive_timeout(clock: trellis.testing.VirtualClock) -> None:
    """receive(timeout=t) raises ReceiveTimeout after t seconds (virtual clock)."""
    log: list[Any] = []

    async def body() -> None:
        trellis.self().send("not me")
        try:
            await trellis.receive(timeout=1.0, match=lambda m: m == "me")
        except trellis.ReceiveTimeout:
            log.append(("timeout", clock.now()))
        log.append(await trellis.receive(timeout=0))  # the unmatched message is still there

    pid = trellis.spawn(body)
    await settle()
    await clock.advance(0.5)
    assert log == []
    assert pid.alive
    await clock.advance(0.5)
    async with asyncio.timeout(5):
        assert await pid.join() == trellis.NORMAL
    assert log == [("timeout", 1.0), "not me"]


async def test_receive_returns_a_message_arriving_before_timeout(
    clock: trellis.testing.VirtualClock,
) -> None:
    """A message arriving before the timeout is returned; no ReceiveTimeout follows."""
    log: list[Any] = []

    async def body() -> None:
        log.append(await trellis.receive(timeout=1.0))
        try:
            await trellis.receive(timeout=5.0)
        except trellis.ReceiveTimeout:
            log.append("timeout")

    pid = trellis.spawn(body)
    await settle()
    await clock.advance(0.9)
    pid.send("hello")
    await settle()
    assert log == ["hello"]
    await clock.advance(0.2)
    assert log == ["hello"]
    await clock.advance(5.0)
    async with asyncio.timeout(5):
        await pid.join()
    assert log == ["hello", "timeout"]


# ---------------------------------------------------------------------------
# names, send


async def test_spawn_with_name_registers_it_and_death_frees_it() -> None:
    """spawn(name=n) registers n; whereis(n) finds it; the name is freed on death."""
    pid = trellis.spawn(idle, name="kernel-test-named")
    await settle()
    assert pid.name == "kernel-test-named"
    assert trellis.whereis("kernel-test-named") == pid
    await kill_and_join(pid)
    await settle()
    assert trellis.whereis("kernel-test-named") is None
    again = trellis.spawn(idle, name="kernel-test-named")
    await settle()
    assert trellis.whereis("kernel-test-named") == again
    await kill_and_join(again)


async def test_register_whereis_unregister() -> None:
    """register/whereis/unregister manage the local name table; clash -> AlreadyRegistered."""
    a = trellis.spawn(idle)
    b = trellis.spawn(idle)
    assert trellis.whereis("kernel-test-reg") is None
    trellis.register("kernel-test-reg", a)
    assert trellis.whereis("kernel-test-reg") == a
    with pytest.raises(trellis.AlreadyRegistered) as ei:
        trellis.register("kernel-test-reg", b)
    assert ei.value.pid == a
    assert trellis.whereis("kernel-test-reg") == a
    trellis.unregister("kernel-test-reg")
    assert trellis.whereis("kernel-test-reg") is None
    trellis.register("kernel-test-reg", b)
    assert trellis.whereis("kernel-test-reg") == b
    await kill_and_join(b)
    await settle()
    assert trellis.whereis("kernel-test-reg") is None
    await kill_and_join(a)


async def test_send_resolves_names_and_unknown_name_raises_noproc() -> None:
    """trellis.send(name, msg) delivers via the name table; an unknown name is NoProc."""
    out: list[Any] = []
    pid = trellis.spawn(collector, out, name="kernel-test-send")
    await settle()
    trellis.send("kernel-test-send", "hi")
    trellis.send(pid, "there")
    await settle()
    assert out == ["hi", "there"]
    with pytest.raises(trellis.NoProc):
        trellis.send("kernel-test-nobody", "x")
    await kill_and_join(pid)


async def test_send_to_a_dead_pid_is_silent() -> None:
    """Pid.send to a dead process is dropped without error."""
    pid = trellis.spawn(wait_for_message_then_return)
    pid.send("go")
    await pid.join()
    pid.send("into the void")
    trellis.send(pid, "again")


# ---------------------------------------------------------------------------
# exit reasons


def test_is_clean_classifies_reasons() -> None:
    """NORMAL, SHUTDOWN and Shutdown(_) are clean; KILLED, NOPROC and exceptions are not."""
    assert trellis.is_clean(trellis.NORMAL)
    assert trellis.is_clean(trellis.SHUTDOWN)
    assert trellis.is_clean(trellis.Shutdown("detail"))
    assert not trellis.is_clean(trellis.KILLED)
    assert not trellis.is_clean(trellis.NOPROC)
    assert not trellis.is_clean(RuntimeError("x"))


def test_exit_reason_constants_and_shutdown_value_semantics() -> None:
    """Module constants are the ExitReason members; Shutdown(detail) compares by value."""
    assert trellis.NORMAL is trellis.ExitReason.NORMAL
    assert trellis.SHUTDOWN is trellis.ExitReason.SHUTDOWN
    assert trellis.KILLED is trellis.ExitReason.KILLED
    assert trellis.KILL is trellis.ExitReason.KILL
    assert trellis.NOPROC is trellis.ExitReason.NOPROC
    assert trellis.Shutdown("x") == trellis.Shutdown("x")
    assert trellis.Shutdown("x") != trellis.Shutdown("y")
    assert hash(trellis.Shutdown("x")) == hash(trellis.Shutdown("x"))
    assert trellis.Shutdown("x").detail == "x"


async def test_exit_self_while_trapping_is_a_message_and_kill_self_is_killed() -> None:
    """A trapping process's exit(self(), R) becomes Exit(self, R); exit(self(), KILL) kills."""
    seen: list[Any] = []

    async def body() -> None:
        me = trellis.self()
        trellis.exit(me, trellis.SHUTDOWN)
        seen.append(await trellis.receive())
        trellis.exit(me, trellis.KILL)
        await settle()
        seen.append("survived kill")

    pid = trellis.spawn(body, trap_exits=True)
    async with asyncio.timeout(5):
        assert await pid.join() == trellis.KILLED
    assert seen == [trellis.Exit(pid, trellis.SHUTDOWN)]


async def test_links_are_a_set_one_unlink_removes_a_double_link() -> None:
    """Linking twice creates one link; a single unlink removes it."""
    a = trellis.spawn(idle)

    async def body() -> None:
        trellis.link(a)
        trellis.link(a)
        trellis.unlink(a)
        await idle()

    b = trellis.spawn(body)
    await settle()
    trellis.exit(a, RuntimeError("a dies"))
    await a.join()
    await settle()
    assert b.alive
    await kill_and_join(b)

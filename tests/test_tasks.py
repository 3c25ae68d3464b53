"""TaskSupervisor conformance (SPEC 90)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import pytest

import trellis
from trellis.testing import capture_telemetry

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class Boom(Exception):
    """A crash reason."""


class _Cmd:
    __slots__ = ("fn", "fut")

    def __init__(self, fn: Callable[[], Any] | None, fut: asyncio.Future[Any] | None) -> None:
        self.fn = fn
        self.fut = fut


class Actor:
    """A process that runs the functions it is given inside itself (the task's caller)."""

    def __init__(self, trap_exits: bool = False) -> None:
        self.pid = trellis.spawn(self._loop, trap_exits=trap_exits)

    async def _loop(self) -> None:
        while True:
            cmd = await trellis.receive(match=lambda m: isinstance(m, _Cmd))
            if cmd.fn is None:
                return
            try:
                result = cmd.fn()
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                if not cmd.fut.done():
                    cmd.fut.set_exception(exc)
            else:
                if not cmd.fut.done():
                    cmd.fut.set_result(result)

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pid.send(_Cmd(fn, fut))
        return fut

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wait_for(self.submit(fn), 5.0)

    async def stop(self) -> None:
        if self.pid.alive:
            self.pid.send(_Cmd(None, None))
            await asyncio.wait_for(self.pid.join(), 5.0)


async def maybe(x: Any) -> Any:
    """Await ``x`` if it is awaitable (the contract does not say whether async_task is)."""
    return await x if inspect.isawaitable(x) else x


async def stop_quietly(*things: Any) -> None:
    for thing in things:
        if isinstance(thing, Actor):
            await thing.stop()
            continue
        if thing is None or not thing.alive:
            continue
        try:
            if hasattr(thing, "stop"):
                await thing.stop()
            else:
                await trellis.stop(thing)
        except trellis.NoProc:
            pass


class Counted:
    """A task function: call n raises if n is listed in ``crash_on``, returns if listed in
    ``return_on``, otherwise waits until ``release`` is set."""

    def __init__(self, crash_on: tuple[int, ...] = (), return_on: tuple[int, ...] = ()) -> None:
        self.calls = 0
        self.crash_on = crash_on
        self.return_on = return_on
        self.release = asyncio.Event()

    async def __call__(self, *args: Any) -> Any:
        self.calls += 1
        await asyncio.sleep(0)
        if self.calls in self.crash_on:
            raise Boom(f"call {self.calls}")
        if self.calls in self.return_on:
            return self.calls
        await self.release.wait()
        return self.calls


async def crash() -> None:
    await asyncio.sleep(0)
    raise Boom("task crashed")


async def answer(x: int, y: int) -> int:
    await asyncio.sleep(0)
    return x * y


async def drive(clock: Any, fut: asyncio.Future[Any], step: float = 0.25) -> None:
    """Advance the virtual clock until ``fut`` is done (bounded in real time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while not fut.done():
        assert loop.time() < deadline, "future never completed"
        await clock.advance(step)


# ---------------------------------------------------------------------------
# start_child restart types
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["crash", "return"])
async def test_start_child_is_temporary_by_default(how: str) -> None:
    """SPEC 90: start_child tasks are temporary unless restart is given: whether it crashes
    or returns, the task is not started again."""
    fn = Counted(crash_on=(1,)) if how == "crash" else Counted(return_on=(1,))
    tsup = await trellis.TaskSupervisor.start_link()
    try:
        with capture_telemetry() as cap:
            pid = await tsup.start_child(fn)
            assert isinstance(pid, trellis.Pid)
            reason = await asyncio.wait_for(pid.join(), 5.0)
            if how == "crash":
                assert isinstance(reason, Boom)
            else:
                assert reason == trellis.NORMAL
            ev = await cap.wait_for("child.exited", pid=pid)
            assert ev["restart"] is False
            for _ in range(50):
                await asyncio.sleep(0)
            assert fn.calls == 1
            assert not [e for e in cap.events if e["event"] == "child.restarted"]
    finally:
        await stop_quietly(tsup)


async def test_start_child_with_restart_permanent() -> None:
    """SPEC 90: start_child(restart="permanent") tasks are restarted after they end."""
    fn = Counted(crash_on=(1,), return_on=(2,))
    tsup = await trellis.TaskSupervisor.start_link()
    try:
        with capture_telemetry() as cap:
            await tsup.start_child(fn, restart="permanent")
            await wait_count(cap, "child.restarted", 2)
            await asyncio.wait_for(_until(lambda: fn.calls >= 3), 5.0)
            for _ in range(20):
                await asyncio.sleep(0)
            assert fn.calls == 3
            assert [e["restart"] for e in cap.events if e["event"] == "child.exited"] == [
                True,
                True,
            ]
    finally:
        fn.release.set()
        await stop_quietly(tsup)


async def test_start_child_with_restart_transient() -> None:
    """SPEC 90: start_child(restart="transient") tasks are restarted after a crash, not after
    returning."""
    fn = Counted(crash_on=(1,), return_on=(2,))
    tsup = await trellis.TaskSupervisor.start_link()
    try:
        with capture_telemetry() as cap:
            await tsup.start_child(fn, "arg", restart="transient")
            await cap.wait_for("child.restarted")
            await wait_count(cap, "child.exited", 2)
            for _ in range(50):
                await asyncio.sleep(0)
            assert fn.calls == 2
            assert [e["restart"] for e in cap.events if e["event"] == "child.exited"] == [
                True,
                False,
            ]
    finally:
        await stop_quietly(tsup)


async def _until(cond: Callable[[], bool]) -> None:
    while True:
        if cond():
            return
        await asyncio.sleep(0)


async def wait_count(cap: Any, name: str, n: int) -> None:
    await asyncio.wait_for(_until(lambda: sum(e["event"] == name for e in cap.events) >= n), 5.0)


# ---------------------------------------------------------------------------
# async_task / async_nolink
# ---------------------------------------------------------------------------


async def test_async_task_returns_result() -> None:
    """SPEC 90: async_task runs fn(*args) under the supervisor; wait returns its result."""
    tsup = await trellis.TaskSupervisor.start_link()
    a = Actor()
    try:

        async def body() -> Any:
            handle = await maybe(tsup.async_task(answer, 6, 7))
            return await handle.wait()

        assert await a.run(body) == 42
        assert a.pid.alive
    finally:
        await stop_quietly(a, tsup)


async def test_async_task_links_caller() -> None:
    """SPEC 90: async_task links the task to the caller: a crashing task kills a caller that
    does not trap exits, with the task's reason."""
    tsup = await trellis.TaskSupervisor.start_link()
    a = Actor()
    try:

        async def body() -> Any:
            handle = await maybe(tsup.async_task(crash))
            await trellis.receive(match=lambda m: False)  # wait to be killed by the link
            return handle

        fut = a.submit(body)
        reason = await asyncio.wait_for(a.pid.join(), 5.0)
        assert isinstance(reason, Boom)
        assert not fut.done()
        fut.cancel()
        assert tsup.alive
    finally:
        await stop_quietly(a, tsup)


async def test_async_task_monitors_caller() -> None:
    """SPEC 90: async_task also monitors: a trapping caller survives a crashing task and its
    wait raises Exited with the task's reason."""
    tsup = await trellis.TaskSupervisor.start_link()
    a = Actor(trap_exits=True)
    try:

        async def body() -> Any:
            handle = await maybe(tsup.async_task(crash))
            try:
                await handle.wait()
            except trellis.Exited as exc:
                return exc.reason
            return "no error"

        reason = await a.run(body)
        assert isinstance(reason, Boom)
        assert a.pid.alive
    finally:
        await stop_quietly(a, tsup)


async def test_async_nolink_only_monitors() -> None:
    """SPEC 90: async_nolink does not link: a crashing task leaves a non-trapping caller
    alive, and wait raises Exited with the task's reason."""
    tsup = await trellis.TaskSupervisor.start_link()
    a = Actor()
    try:

        async def body() -> Any:
            handle = await maybe(tsup.async_nolink(crash))
            try:
                await handle.wait()
            except trellis.Exited as exc:
                return exc.reason
            return "no error"

        reason = await a.run(body)
        assert isinstance(reason, Boom)
        for _ in range(20):
            await asyncio.sleep(0)
        assert a.pid.alive
        assert await a.run(lambda: "still alive") == "still alive"

        async def ok() -> Any:
            handle = await maybe(tsup.async_nolink(answer, 3, 5))
            return await handle.wait()

        assert await a.run(ok) == 15
    finally:
        await stop_quietly(a, tsup)


async def test_max_children() -> None:
    """SPEC 90: when max_children tasks run, start_child, async_task and async_nolink raise
    MaxChildren."""
    fn = Counted()
    tsup = await trellis.TaskSupervisor.start_link(max_children=1)
    a = Actor(trap_exits=True)
    try:
        await tsup.start_child(fn)
        with pytest.raises(trellis.MaxChildren):
            await tsup.start_child(fn)

        async def try_async(which: str) -> Any:
            try:
                await maybe(getattr(tsup, which)(answer, 1, 2))
            except trellis.MaxChildren:
                return "max"
            return "started"

        assert await a.run(lambda: try_async("async_task")) == "max"
        assert await a.run(lambda: try_async("async_nolink")) == "max"
        assert fn.calls == 1
    finally:
        fn.release.set()
        await stop_quietly(a, tsup)


async def test_wait_timeout_leaves_nothing_in_mailbox(clock: Any) -> None:
    """SPEC 90: after wait times out (CallTimeout), neither the late result nor the task's
    Down message is delivered to the caller's mailbox."""
    tsup = await trellis.TaskSupervisor.start_link()
    a = Actor()
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "late"

    try:
        with capture_telemetry() as cap:

            async def body() -> Any:
                handle = await maybe(tsup.async_nolink(slow))
                try:
                    await handle.wait(timeout=1.0)
                except trellis.CallTimeout:
                    return "timeout"
                return "no timeout"

            fut = a.submit(body)
            await drive(clock, fut)
            assert fut.result() == "timeout"
            release.set()
            await cap.wait_for("child.exited")

            async def drain() -> list[Any]:
                got = []
                while True:
                    try:
                        got.append(await trellis.receive(timeout=0.5))
                    except trellis.ReceiveTimeout:
                        return got

            fut = a.submit(drain)
            await drive(clock, fut)
            assert fut.result() == []
    finally:
        release.set()
        await stop_quietly(a, tsup)

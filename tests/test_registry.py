"""Registry conformance (SPEC 86-88) and Via names."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import pytest

import trellis

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
    """A process that runs the functions it is given inside itself (so ``self()`` is it)."""

    def __init__(self) -> None:
        self.pid = trellis.spawn(self._loop)

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

    async def run(self, fn: Callable[[], Any]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pid.send(_Cmd(fn, fut))
        return await asyncio.wait_for(fut, 5.0)

    async def stop(self) -> None:
        if self.pid.alive:
            self.pid.send(_Cmd(None, None))
            await asyncio.wait_for(self.pid.join(), 5.0)


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


async def eventually(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Yield to the loop until ``cond()`` holds (bounded in real time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0)


class Echo(trellis.Server):
    """Replies ("echo", request) to calls; records casts (returned by the call "casts")."""

    async def init(self) -> None:
        self.casts: list[Any] = []

    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "casts":
            return list(self.casts)
        return ("echo", request)

    async def handle_cast(self, msg: Any) -> None:
        self.casts.append(msg)


# ---------------------------------------------------------------------------
# SPEC 86: unique keys
# ---------------------------------------------------------------------------


async def test_unique_register_and_already_registered() -> None:
    """SPEC 86: register registers only the caller (lookup shows it) and returns the owner,
    the registry's pid (Elixir's {:ok, owner}); a key held by a live process raises
    AlreadyRegistered with the holder's pid and keeps the first entry."""
    reg = await trellis.Registry.start_link(keys="unique")
    a, b = Actor(), Actor()
    try:
        assert await a.run(lambda: reg.register("k", 1)) == reg
        assert reg.lookup("k") == [(a.pid, 1)]
        with pytest.raises(trellis.AlreadyRegistered) as ei:
            await b.run(lambda: reg.register("k", 2))
        assert ei.value.pid == a.pid
        with pytest.raises(trellis.AlreadyRegistered) as ei:
            await a.run(lambda: reg.register("k", 3))
        assert ei.value.pid == a.pid
        assert reg.lookup("k") == [(a.pid, 1)]
        assert await b.run(lambda: reg.register("k2")) == reg
        assert reg.lookup("k2") == [(b.pid, None)]
        assert reg.lookup("missing") == []
        assert reg.keys(a.pid) == ["k"]
        assert reg.keys(b.pid) == ["k2"]
        assert reg.count() == 2
    finally:
        await stop_quietly(a, b, reg)


async def test_register_outside_a_process() -> None:
    """SPEC 86: register registers the calling process, so calling it outside a Trellis
    process raises NotAProcess."""
    reg = await trellis.Registry.start_link(keys="unique")
    try:
        with pytest.raises(trellis.NotAProcess):
            reg.register("k")
        assert reg.lookup("k") == []
    finally:
        await stop_quietly(reg)


async def test_dead_holders_key_can_be_taken_before_cleanup() -> None:
    """SPEC 86: a key held by a dead process can be registered at once, and the registry's
    later cleanup of the dead owner does not remove the new entry."""
    reg = await trellis.Registry.start_link(keys="unique")
    a, b = Actor(), Actor()
    try:
        await a.run(lambda: reg.register("k", 1))

        async def take() -> Any:
            trellis.exit(a.pid, trellis.KILL)
            while True:  # resume as soon as a is dead, before the registry cleans up
                if not a.pid.alive:
                    break
                await asyncio.sleep(0)
            return reg.register("k", 2)

        assert await b.run(take) == reg
        assert reg.lookup("k") == [(b.pid, 2)]
        for _ in range(50):
            await asyncio.sleep(0)
        assert reg.lookup("k") == [(b.pid, 2)]
        assert reg.keys(b.pid) == ["k"]
        assert reg.keys(a.pid) == []
    finally:
        await stop_quietly(a, b, reg)


# ---------------------------------------------------------------------------
# SPEC 87: cleanup, unregister, links
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("keys", ["unique", "duplicate"])
async def test_entries_removed_when_owner_dies(keys: str) -> None:
    """SPEC 87: all entries of a process are removed when it dies."""
    reg = await trellis.Registry.start_link(keys=keys)
    a, b = Actor(), Actor()
    try:
        await a.run(lambda: reg.register("k1", 1))
        await a.run(lambda: reg.register("k2", 2))
        await b.run(lambda: reg.register("other", 3))
        trellis.exit(a.pid, Boom("crash"))
        await asyncio.wait_for(a.pid.join(), 5.0)
        await eventually(lambda: reg.lookup("k1") == [] and reg.lookup("k2") == [], "cleanup")
        assert reg.keys(a.pid) == []
        assert reg.count() == 1
        assert reg.lookup("other") == [(b.pid, 3)]
    finally:
        await stop_quietly(a, b, reg)


async def test_unregister_removes_key() -> None:
    """SPEC 87: unregister removes the caller's key, which another process can then take;
    unregistering a key not held is a no-op."""
    reg = await trellis.Registry.start_link(keys="unique")
    a, b = Actor(), Actor()
    try:
        await a.run(lambda: reg.register("k", 1))
        await a.run(lambda: reg.register("k2", 2))
        assert await a.run(lambda: reg.unregister("k")) is None
        assert reg.lookup("k") == []
        assert reg.keys(a.pid) == ["k2"]
        assert await a.run(lambda: reg.unregister("never")) is None
        assert await b.run(lambda: reg.register("k", 3)) == reg
        assert reg.lookup("k") == [(b.pid, 3)]
        await b.run(lambda: reg.unregister("k2"))  # another owner's key is untouched
        assert reg.lookup("k2") == [(a.pid, 2)]
    finally:
        await stop_quietly(a, b, reg)


async def test_register_links_owner_to_registry() -> None:
    """SPEC 87: register links the caller to the registry: if the registry is killed, an
    owner that does not trap exits dies too."""
    reg = await trellis.Registry.start_link(keys="unique")
    a = Actor()
    try:
        await a.run(lambda: reg.register("k"))
        trellis.exit(reg, trellis.KILL)
        assert await asyncio.wait_for(reg.join(), 5.0) == trellis.KILLED
        assert await asyncio.wait_for(a.pid.join(), 5.0) == trellis.KILLED
    finally:
        await stop_quietly(a, reg)


async def test_unregister_unlinks_owner() -> None:
    """SPEC 87: once a process has unregistered its last key it is unlinked from the
    registry, so killing the registry leaves it alive."""
    reg = await trellis.Registry.start_link(keys="unique")
    a = Actor()
    try:
        await a.run(lambda: reg.register("k"))
        await a.run(lambda: reg.unregister("k"))
        trellis.exit(reg, trellis.KILL)
        assert await asyncio.wait_for(reg.join(), 5.0) == trellis.KILLED
        for _ in range(20):
            await asyncio.sleep(0)
        assert a.pid.alive
        assert await a.run(lambda: "still here") == "still here"
    finally:
        await stop_quietly(a, reg)


# ---------------------------------------------------------------------------
# SPEC 88: duplicate keys, lookup, dispatch
# ---------------------------------------------------------------------------


async def test_duplicate_registrations() -> None:
    """SPEC 88: in a duplicate registry a key can be registered many times, also by the same
    process; lookup returns every (pid, value)."""
    reg = await trellis.Registry.start_link(keys="duplicate")
    a, b = Actor(), Actor()
    try:
        assert await a.run(lambda: reg.register("k", 1)) == reg
        assert await a.run(lambda: reg.register("k", 2)) == reg
        assert await b.run(lambda: reg.register("k", 3)) == reg
        entries = reg.lookup("k")
        assert len(entries) == 3
        assert sorted(entries, key=lambda e: e[1]) == [(a.pid, 1), (a.pid, 2), (b.pid, 3)]
        assert reg.keys(a.pid) == ["k", "k"]
        assert reg.count() == 3
        await b.run(lambda: reg.unregister("k"))
        assert sorted(reg.lookup("k"), key=lambda e: e[1]) == [(a.pid, 1), (a.pid, 2)]
    finally:
        await stop_quietly(a, b, reg)


async def test_dispatch() -> None:
    """SPEC 88: dispatch(key, fn) calls fn once with the key's entries, and not at all when
    the key has none."""
    dup = await trellis.Registry.start_link(keys="duplicate")
    uniq = await trellis.Registry.start_link(keys="unique")
    a, b = Actor(), Actor()
    try:
        await a.run(lambda: dup.register("k", 1))
        await b.run(lambda: dup.register("k", 2))
        await a.run(lambda: uniq.register("u", "v"))
        seen: list[list[Any]] = []
        dup.dispatch("k", lambda entries: seen.append(list(entries)))
        assert len(seen) == 1
        assert sorted(seen[0], key=lambda e: e[1]) == [(a.pid, 1), (b.pid, 2)]
        dup.dispatch("missing", lambda entries: seen.append(list(entries)))
        assert len(seen) == 1
        uniq.dispatch("u", lambda entries: seen.append(list(entries)))
        assert seen[1] == [(a.pid, "v")]
        uniq.dispatch("missing", lambda entries: seen.append(list(entries)))
        assert len(seen) == 2
    finally:
        await stop_quietly(a, b, dup, uniq)


# ---------------------------------------------------------------------------
# Via names
# ---------------------------------------------------------------------------


async def test_via_name_start_call_cast_whereis() -> None:
    """SPEC 86, 87: a Server started with name=Via(registry, key) is registered under the
    key; call, cast and whereis resolve the Via name; a second start with the same name raises
    AlreadyStarted; the name is freed when the server dies."""
    reg = await trellis.Registry.start_link(keys="unique")
    name = trellis.Via(reg, "svc")
    pid = await Echo.start_link(name=name)
    try:
        assert trellis.whereis(name) == pid
        assert [p for p, _ in reg.lookup("svc")] == [pid]
        assert await trellis.call(name, "hi") == ("echo", "hi")
        trellis.cast(name, "c1")
        trellis.cast(name, "c2")
        assert await trellis.call(name, "casts") == ["c1", "c2"]
        with pytest.raises(trellis.AlreadyStarted) as ei:
            await Echo.start_link(name=name)
        assert ei.value.pid == pid
        trellis.exit(pid, Boom("crash"))
        await asyncio.wait_for(pid.join(), 5.0)
        await eventually(lambda: trellis.whereis(name) is None, "the Via name to be freed")
        assert reg.lookup("svc") == []
        with pytest.raises(trellis.NoProc):
            await trellis.call(name, "hi")
        trellis.cast(name, "nobody")  # silent
        pid2 = await Echo.start_link(name=name)
        assert pid2 != pid
        assert trellis.whereis(name) == pid2
        assert await trellis.call(name, "again") == ("echo", "again")
        await trellis.stop(name)
        assert not pid2.alive
        await eventually(lambda: trellis.whereis(name) is None, "the Via name to be freed")
    finally:
        await stop_quietly(pid, reg)


async def test_via_unknown_key() -> None:
    """SPEC 86: an unregistered Via name resolves to None; call raises NoProc; cast is
    silent."""
    reg = await trellis.Registry.start_link(keys="unique")
    try:
        name = trellis.Via(reg, "nobody")
        assert trellis.whereis(name) is None
        with pytest.raises(trellis.NoProc):
            await trellis.call(name, "hi")
        assert trellis.cast(name, "x") is None
    finally:
        await stop_quietly(reg)


async def test_via_with_registry_name() -> None:
    """SPEC 86: Via also accepts the registry's registered name."""
    reg = await trellis.Registry.start_link(keys="unique", name="test_registry_via_named")
    pid = None
    try:
        assert trellis.whereis("test_registry_via_named") == reg
        name = trellis.Via("test_registry_via_named", ("job", 7))
        pid = await Echo.start_link(name=name)
        assert trellis.whereis(name) == pid
        assert reg.lookup(("job", 7))[0][0] == pid
        assert await trellis.call(name, 1) == ("echo", 1)
    finally:
        await stop_quietly(pid, reg)

"""GET /v1/events: Server-Sent Events of telemetry, history replay, filters, and clients
that read slowly or not at all."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

import trellis
from control._ctlenv import Env, start_env, stop_env
from trellis import telemetry
from trellis.testing import wait_restarted


async def sse(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """(name, data) per event; comments come as ("#", text)."""
    name, data = None, []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield name or "message", json.loads("\n".join(data))
            name, data = None, []
        elif line.startswith(":"):
            yield "#", line[1:].strip()
        elif line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])


async def until(stream: AsyncIterator[tuple[str, Any]], name: str) -> Any:
    async with asyncio.timeout(10):
        async for n, data in stream:
            if n == name:
                return data
    raise AssertionError(f"the stream ended before {name}")


async def history(env: Env, query: str) -> list[tuple[str, Any]]:
    async with (
        asyncio.timeout(10),
        env.unix().stream("GET", f"/v1/events?follow=false&{query}") as r,
    ):
        assert r.status_code == 200
        return [e async for e in sse(r) if e[0] != "#"]


async def test_stream_delivers_an_exit_caused_after_connecting(env: Env) -> None:
    """A client connected to /v1/events sees the child.exited of a crash that happens
    afterwards, with the reason as text and its class."""
    old = await env.child("db")
    async with env.unix().stream("GET", "/v1/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
        assert await until(events, "#") == "ok"  # subscribed
        trellis.exit(old, RuntimeError("boom"))
        data = await until(events, "child.exited")
        assert data["path"] == "shop/db"
        assert data["reason"] == "RuntimeError: boom"
        assert data["reason_class"] == "crash"
        assert data["restart"] is True
        assert data["pid"] == f"<Pid {old.id}>"
        assert data["utc"].endswith("+00:00")
        restarted = await until(events, "child.restarted")
        assert restarted["path"] == "shop/db"
        await events.aclose()


async def test_history_replays_recent_events(env: Env) -> None:
    """?history=N replays the last N events (follow=false ends the stream after them)."""
    old = await env.child("web")
    trellis.exit(old, RuntimeError("boom"))
    await wait_restarted(env.sup, "web", old)
    events = await history(env, "history=1000")
    names = [n for n, _ in events]
    assert names[:1] == ["child.started"]  # the tree's first start
    assert "supervisor.started" in names
    exited = [d for n, d in events if n == "child.exited"]
    assert [d["path"] for d in exited] == ["shop/web"]
    assert names[-2:] == ["child.exited", "child.restarted"]
    assert await history(env, "history=2") == events[-2:]
    assert await history(env, "history=0") == []


async def test_filters_by_event_name_and_path(env: Env) -> None:
    trellis.exit(await env.child("web"), RuntimeError("x"))
    trellis.exit(await env.child("db"), RuntimeError("y"))
    await asyncio.sleep(0)
    for _ in range(2):  # let both restarts happen
        await env.sup.which_children()
    only_exits = await history(env, "history=1000&filter=child.exited")
    assert {n for n, _ in only_exits} == {"child.exited"}
    assert [d["path"] for _, d in only_exits] == ["shop/web", "shop/db"]
    child = await history(env, "history=1000&filter=child.*,supervisor.started")
    assert {n for n, _ in child} >= {"child.started", "child.exited", "supervisor.started"}
    db = await history(env, "history=1000&path=db")  # the root's name may be left out
    assert {d["path"] for _, d in db} == {"shop/db"}
    jobs = await history(env, "history=1000&path=shop/jobs*")
    assert {d["path"] for _, d in jobs} == {"shop/jobs", "shop/jobs/a"}


async def test_a_client_that_falls_behind_loses_the_oldest_and_is_told(
    short_dir: Path,
) -> None:
    """With a per-client buffer of 5, a burst of 100 events reaches the client as a
    control.dropped event (95 lost) and the newest 5; the emitter never waits."""
    e = await start_env(short_dir, sse_buffer=5)
    try:
        async with e.unix().stream("GET", "/v1/events?filter=test.ping") as r:
            events = sse(r)
            assert await until(events, "#") == "ok"
            for i in range(100):  # one loop turn: the stream cannot read in between
                telemetry.emit("test.ping", n=i)
            got: list[tuple[str, Any]] = []
            async with asyncio.timeout(10):
                async for item in events:
                    if item[0] != "#":
                        got.append(item)
                    if len(got) == 6:
                        break
            assert got[-1] == ("control.dropped", {"dropped": 95, "total": 95})
            assert [d["n"] for _, d in got[:5]] == [95, 96, 97, 98, 99]
            await events.aclose()
    finally:
        await stop_env(e)


async def test_a_client_that_never_reads_does_not_slow_the_tree(env: Env) -> None:
    """A client that subscribes and never reads: its socket fills up, yet events keep
    flowing, a crashed child is restarted and other requests are answered."""
    reader, writer = await asyncio.open_unix_connection(str(env.sock))
    try:
        writer.write(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b": ok\n\n")  # subscribed; from now on we never read
        payload = "x" * 4096
        for _ in range(20):  # ~80 MB offered to a reader that takes nothing
            for i in range(1000):
                telemetry.emit("test.flood", n=i, payload=payload)
            await asyncio.sleep(0)
        old = await env.child("db")
        trellis.exit(old, RuntimeError("crash while flooded"))
        new = await wait_restarted(env.sup, "db", old)
        assert new.alive
        assert (await env.unix().get("/healthz")).status_code == 200
    finally:
        writer.close()
        await writer.wait_closed()


async def test_stopping_the_server_ends_streams(env: Env) -> None:
    """ControlServer.stop() ends open event streams cleanly."""
    async with env.unix().stream("GET", "/v1/events") as r:
        events = sse(r)
        assert await until(events, "#") == "ok"
        stopping = asyncio.ensure_future(env.ctl.stop())
        rest = [e async for e in events]
        await stopping
        assert all(name != "#" or text in ("ok", "keepalive") for name, text in rest)
    assert not env.sock.exists()


async def test_idle_stream_sends_keepalives(short_dir: Path) -> None:
    e = await start_env(short_dir, keepalive=0.05)
    try:
        async with e.unix().stream("GET", "/v1/events?filter=nothing.matches") as r:
            events = sse(r)
            assert await until(events, "#") == "ok"
            assert await until(events, "#") == "keepalive"
            await events.aclose()
    finally:
        await stop_env(e)


async def test_client_disconnect_detaches_its_subscription(env: Env) -> None:
    """A client that goes away leaves nothing behind: no telemetry handler (streams
    share the server's one) and no open stream."""
    from trellis._core import _telemetry

    before = len(_telemetry._handlers)
    async with env.unix().stream("GET", "/v1/events") as r:
        events = sse(r)
        assert await until(events, "#") == "ok"
        assert env.ctl._streams == 1
        await events.aclose()
        assert env.ctl._http is not None
        [stream_task] = env.ctl._http.state.tasks
    await asyncio.wait_for(stream_task, 10)  # the server saw the disconnect
    assert env.ctl._streams == 0
    assert len(_telemetry._handlers) == before


async def test_head_does_not_open_a_stream(env: Env) -> None:
    r = await env.unix().head("/v1/events")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")

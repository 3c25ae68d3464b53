"""Telemetry events: attach/detach, event names and fields, failing handlers, capture."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import trellis
from trellis import telemetry
from trellis.testing import VirtualClock, capture_telemetry, wait_restarted


class Boom(Exception):
    """A crash reason."""


async def _idle() -> None:
    while True:
        msg = await trellis.receive()
        if msg == "normal":
            return


def start_idle(*_args: Any) -> trellis.Pid:
    return trellis.spawn(_idle, link=True)


def spec(id: Any, **kw: Any) -> trellis.ChildSpec:
    return trellis.ChildSpec(id, start_idle, **kw)


async def stop_quietly(*pids: Any) -> None:
    for pid in pids:
        if pid is None or not pid.alive:
            continue
        try:
            await pid.stop()
        except trellis.NoProc:
            pass


async def pid_of(sup: Any, id: Any) -> Any:
    return (await sup.which_child(id)).pid


def named(evs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in evs if e["event"] == name]


async def test_attach_and_detach() -> None:
    """attach(handler) calls handler(event) synchronously for every event, each a dict with
    "event" and "time"; after detach(id) it is no longer called."""
    seen: list[dict[str, Any]] = []
    hid = telemetry.attach(seen.append)
    try:
        sup = await trellis.Supervisor.start_link([spec("a")])
    finally:
        telemetry.detach(hid)
    try:
        names = [e["event"] for e in seen]
        assert "supervisor.started" in names
        assert "child.started" in names
        assert all(isinstance(e["time"], float | int) for e in seen)
        before = len(seen)
        trellis.exit(await pid_of(sup, "a"), Boom("crash"))
        await stop_quietly(sup)
        assert len(seen) == before
    finally:
        await stop_quietly(sup)


async def test_attach_with_event_filter() -> None:
    """attach(handler, events=[...]) only passes the named events."""
    seen: list[dict[str, Any]] = []
    hid = telemetry.attach(seen.append, events=["child.started"])
    try:
        sup = await trellis.Supervisor.start_link([spec("a"), spec("b")])
        await stop_quietly(sup)
    finally:
        telemetry.detach(hid)
    assert [e["event"] for e in seen] == ["child.started", "child.started"]
    assert [e["child_id"] for e in seen] == ["a", "b"]


async def test_start_events_fields() -> None:
    """supervisor.started and child.started carry the supervisor path; child.started carries
    child_id and the child's pid, in start order; a named supervisor's path includes its
    name."""
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link([spec("a"), spec("b")], name="tele_sup")
    try:
        started = named(cap.events, "supervisor.started")
        assert len(started) == 1
        path = started[0]["supervisor"]
        assert isinstance(path, str)
        assert "tele_sup" in path
        children = named(cap.events, "child.started")
        assert [e["child_id"] for e in children] == ["a", "b"]
        assert [e["pid"] for e in children] == [await pid_of(sup, "a"), await pid_of(sup, "b")]
        assert all(e["supervisor"] == path for e in children)
    finally:
        await stop_quietly(sup)


async def test_exit_and_restart_events(clock: VirtualClock) -> None:
    """child.exited carries child_id, the old pid, the reason and restart=True, then
    child.restarted carries the new pid; "time" is the Trellis clock's time."""
    sup = await trellis.Supervisor.start_link([spec("a"), spec("b")])
    try:
        await clock.advance(7.5)
        with capture_telemetry() as cap:
            old = await pid_of(sup, "a")
            boom = Boom("crash")
            trellis.exit(old, boom)
            new = await wait_restarted(sup, "a", old)
            await cap.wait_for("child.restarted", child_id="a")
        names = [e["event"] for e in cap.events]
        assert names.index("child.exited") < names.index("child.restarted")
        (exited,) = named(cap.events, "child.exited")
        assert exited["child_id"] == "a"
        assert exited["pid"] == old
        assert exited["reason"] is boom
        assert exited["restart"] is True
        assert exited["time"] == pytest.approx(7.5)
        assert isinstance(exited["supervisor"], str)
        (restarted,) = named(cap.events, "child.restarted")
        assert restarted["child_id"] == "a"
        assert restarted["pid"] == new
    finally:
        await stop_quietly(sup)


async def test_transient_clean_exit_event_has_restart_false() -> None:
    """child.exited has restart=False when the child is not restarted."""
    sup = await trellis.Supervisor.start_link([spec("t", restart="transient")])
    try:
        with capture_telemetry() as cap:
            old = await pid_of(sup, "t")
            old.send("normal")
            ev = await cap.wait_for("child.exited", child_id="t")
        assert ev["reason"] == trellis.NORMAL
        assert ev["restart"] is False
        assert ev["pid"] == old
        assert named(cap.events, "child.restarted") == []
    finally:
        await stop_quietly(sup)


async def test_gave_up_event() -> None:
    """supervisor.gave_up is emitted when the restart intensity is exceeded."""
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link([spec("a")], intensity=0)
        try:
            path = named(cap.events, "supervisor.started")[0]["supervisor"]
            trellis.exit(await pid_of(sup, "a"), Boom("crash"))
            assert await asyncio.wait_for(sup.join(), 5.0) == trellis.SHUTDOWN
            (gave_up,) = named(cap.events, "supervisor.gave_up")
            assert gave_up["supervisor"] == path
            assert named(cap.events, "child.restarted") == []
        finally:
            await stop_quietly(sup)


async def test_terminated_and_stopped_events() -> None:
    """child.terminated is emitted when the supervisor stops a child (terminate_child, and
    at shutdown); supervisor.stopped when the supervisor stops."""
    sup = await trellis.Supervisor.start_link([spec("a"), spec("b")])
    try:
        with capture_telemetry() as cap:
            a = await pid_of(sup, "a")
            await sup.terminate_child("a")
            terminated = named(cap.events, "child.terminated")
            assert [e["child_id"] for e in terminated] == ["a"]
            assert terminated[0]["pid"] == a
            await sup.stop()
            assert [e["child_id"] for e in named(cap.events, "child.terminated")] == ["a", "b"]
            assert len(named(cap.events, "supervisor.stopped")) == 1
    finally:
        await stop_quietly(sup)


async def test_failing_handler_is_detached_and_reported() -> None:
    """A handler that raises is detached after its first failure, a
    telemetry.handler_failed event is emitted, and the supervisor keeps working."""
    calls: list[dict[str, Any]] = []

    def bad(event: dict[str, Any]) -> None:
        calls.append(event)
        raise RuntimeError("handler bug")

    with capture_telemetry() as cap:
        hid = telemetry.attach(bad)
        try:
            sup = await trellis.Supervisor.start_link([spec("a")])
        finally:
            telemetry.detach(hid)
        try:
            assert len(calls) == 1
            assert len(named(cap.events, "telemetry.handler_failed")) == 1
            old = await pid_of(sup, "a")
            trellis.exit(old, Boom("crash"))
            new = await wait_restarted(sup, "a", old)
            assert new.alive
            assert len(calls) == 1
            assert len(named(cap.events, "telemetry.handler_failed")) == 1
            assert [i.id for i in await sup.which_children()] == ["a"]
        finally:
            await stop_quietly(sup)


async def test_capture_telemetry_filter_and_scope() -> None:
    """capture_telemetry(events) records only the named events, and nothing after its block
    ends."""
    with capture_telemetry(["child.started"]) as cap:
        sup = await trellis.Supervisor.start_link([spec("a")])
    try:
        assert [e["event"] for e in cap.events] == ["child.started"]
        old = await pid_of(sup, "a")
        trellis.exit(old, Boom("crash"))
        await wait_restarted(sup, "a", old)
        assert len(cap.events) == 1
    finally:
        await stop_quietly(sup)


async def test_capture_wait_for_matches_fields() -> None:
    """Capture.wait_for(name, **fields) waits for an event with that name and those field
    values, and raises TimeoutError when none comes in time."""
    sup = await trellis.Supervisor.start_link([spec("a"), spec("b")])
    try:
        with capture_telemetry() as cap:
            waiter = asyncio.ensure_future(cap.wait_for("child.exited", child_id="b"))
            a = await pid_of(sup, "a")
            trellis.exit(a, Boom("a"))
            await wait_restarted(sup, "a", a)
            assert not waiter.done()
            b = await pid_of(sup, "b")
            trellis.exit(b, Boom("b"))
            ev = await waiter
            assert ev["child_id"] == "b"
            assert ev["pid"] == b
            with pytest.raises(TimeoutError):
                await cap.wait_for("child.exited", child_id="nobody", timeout=0.05)
    finally:
        await stop_quietly(sup)

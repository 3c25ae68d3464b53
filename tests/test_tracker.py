"""The tree tracker: the shape and states of a running tree from telemetry alone."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import trellis
from trellis._tree import Tracker, flat
from trellis.testing import VirtualClock, capture_telemetry


async def idle() -> None:
    while True:
        await trellis.receive()


class Crashy(trellis.Server):
    async def handle_cast(self, msg: Any) -> Any:
        raise RuntimeError(msg)


@pytest.fixture
def tracker() -> Iterator[Tracker]:
    t = Tracker().attach()
    try:
        yield t
    finally:
        t.detach()


def by_path(tree: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    assert tree is not None
    return {n["path"]: n for n in flat(tree)}


async def test_dynamic_children_with_one_id_are_told_apart_by_pid(tracker: Tracker) -> None:
    """Three children with the spec id ``w`` under a DynamicSupervisor: three nodes,
    each with its own pid; a crash restarts one (its node follows the new pid, the
    others keep theirs); a terminated one is forgotten."""
    dyn = await trellis.DynamicSupervisor.start_link(name="t-dyn")
    pids = [await dyn.start_child(Crashy.child_spec(id="w")) for _ in range(3)]
    nodes = by_path(tracker.snapshot("t-dyn"))
    kids = [n for p, n in nodes.items() if p != "t-dyn"]
    assert sorted(n["path"] for n in kids) == sorted(f"t-dyn/w@{p.id}" for p in pids)
    assert {n["pid"] for n in kids} == set(pids)
    assert all(n["state"] == "running" and n["dynamic"] for n in kids)
    with capture_telemetry() as cap:
        trellis.cast(pids[1], "boom")
        ev = await cap.wait_for("child.restarted", child_id="w")
    new = ev["pid"]
    kids = [n for p, n in by_path(tracker.snapshot("t-dyn")).items() if p != "t-dyn"]
    assert {n["pid"] for n in kids} == {pids[0], new, pids[2]}
    restarted = next(n for n in kids if n["pid"] is new)
    assert restarted["restarts"] == 1
    assert restarted["state"] == "running"
    await dyn.terminate_child(pids[0])
    kids = [n for p, n in by_path(tracker.snapshot("t-dyn")).items() if p != "t-dyn"]
    assert {n["pid"] for n in kids} == {new, pids[2]}
    await dyn.stop()


async def test_deleted_and_temporary_children_are_forgotten(tracker: Tracker) -> None:
    sup = await trellis.Supervisor.start_link(
        [
            trellis.worker("keep", idle),
            trellis.worker("gone", idle),
            trellis.worker("tmp", idle, restart="temporary"),
        ],
        name="t-del",
    )
    assert tracker.not_ready("t-del") == (None, [])
    await sup.terminate_child("gone")
    reason, bad = tracker.not_ready("t-del")
    assert reason is not None
    assert [n["path"] for n in bad] == ["t-del/gone"]
    await sup.delete_child("gone")
    await sup.terminate_child("tmp")
    assert list(by_path(tracker.snapshot("t-del"))) == ["t-del", "t-del/keep"]
    assert tracker.not_ready("t-del") == (None, [])
    await sup.stop()


async def test_one_for_all_bystanders_and_backoff_show_restarting(
    tracker: Tracker, clock: VirtualClock
) -> None:
    """A crash under one_for_all with a 5 s backoff: the crashed child and the
    siblings stopped for its restart are ``restarting`` (not ``stopped``) with the time
    to the next attempt; all run again after it."""
    backoff = trellis.Backoff(min=5.0, max=5.0)
    sup = await trellis.Supervisor.start_link(
        [Crashy.child_spec(id="a", backoff=backoff), trellis.worker("b", idle)],
        strategy="one_for_all",
        name="t-ofa",
    )
    with capture_telemetry() as cap:
        trellis.cast((await sup.which_child("a")).pid, "boom")
        await cap.wait_for("child.backoff", child_id="a")
    nodes = by_path(tracker.snapshot("t-ofa"))
    assert nodes["t-ofa/a"]["state"] == "restarting"
    assert nodes["t-ofa/a"]["retry_in"] == pytest.approx(5.0)
    assert nodes["t-ofa/b"]["state"] == "restarting"
    with capture_telemetry() as cap:
        await clock.advance(5.0)
        await cap.wait_for("child.restarted", child_id="b")
    nodes = by_path(tracker.snapshot("t-ofa"))
    assert {n["state"] for n in nodes.values()} == {"running"}
    await sup.stop()


async def test_an_unsure_tracker_is_not_ready(tracker: Tracker) -> None:
    sup = await trellis.Supervisor.start_link([trellis.worker("a", idle)], name="t-unsure")
    assert tracker.not_ready("t-unsure") == (None, [])
    tracker.handle({"event": "child.exited"})  # a malformed event: now unsure
    reason, _ = tracker.not_ready("t-unsure")
    assert reason is not None
    assert "missed 1 event" in reason
    tracker.detach()
    reason, _ = tracker.not_ready("t-unsure")
    assert reason is not None
    assert "not following" in reason
    await sup.stop()
    await asyncio.sleep(0)


@pytest.mark.parametrize("kind", ["static", "dynamic"])
async def test_an_os_child_waiting_for_readiness_is_starting_then_forgotten_if_never_ready(
    tracker: Tracker, kind: str
) -> None:
    """start_child of an OS child whose readiness never comes: ``starting`` with its OS
    pid while the supervisor waits (not ready), and forgotten when the start fails."""
    if kind == "static":
        sup = await trellis.Supervisor.start_link([trellis.worker("a", idle)], name="t-start")
        others = ["t-start", "t-start/a"]
    else:
        sup = await trellis.DynamicSupervisor.start_link(name="t-start")
        others = ["t-start"]
    spec = trellis.Command(
        [sys.executable, "-c", "import time; time.sleep(30)"],
        id="svc",
        ready=trellis.Ready.log("never printed", timeout=1.5),
        shutdown=0.5,
    )
    with capture_telemetry() as cap:
        adding = asyncio.ensure_future(sup.start_child(spec))
        spawned = await cap.wait_for("process.spawned", child_id="svc", timeout=10)
    nodes = by_path(tracker.snapshot("t-start"))
    assert nodes["t-start/svc"]["state"] == "starting"
    assert nodes["t-start/svc"]["os_pid"] == spawned["os_pid"]
    _, bad = tracker.not_ready("t-start")
    assert [n["path"] for n in bad] == ["t-start/svc"]
    with capture_telemetry() as cap:
        with pytest.raises(trellis.StartError):
            await asyncio.wait_for(adding, 20)
        if not cap.named("process.exited", child_id="svc"):
            await cap.wait_for("process.exited", child_id="svc", timeout=10)
    assert list(by_path(tracker.snapshot("t-start"))) == others
    assert tracker.not_ready("t-start") == (None, [])
    await sup.stop()


async def test_a_child_stopped_between_restarts_is_stopped(
    tracker: Tracker, clock: VirtualClock
) -> None:
    """terminate_child of a child waiting in backoff: a static one is ``stopped`` (not
    ``restarting`` forever), a dynamic one is forgotten (it held /readyz at 503)."""
    backoff = trellis.Backoff(min=60.0, max=60.0)
    sup = await trellis.Supervisor.start_link(
        [Crashy.child_spec(id="s", backoff=backoff), trellis.DynamicSupervisor.child_spec(id="d")],
        name="t-between",
    )
    dyn = (await sup.which_child("d")).pid
    keep = await dyn.start_child(Crashy.child_spec(id="x", backoff=backoff))
    other = await dyn.start_child(Crashy.child_spec(id="x", backoff=backoff))
    with capture_telemetry() as cap:
        trellis.cast((await sup.which_child("s")).pid, "boom")
        trellis.cast(other, "boom")
        await cap.wait_for("child.backoff", child_id="s")
        await cap.wait_for("child.backoff", child_id="x")
    nodes = by_path(tracker.snapshot("t-between"))
    assert nodes["t-between/s"]["state"] == "restarting"
    assert {n["state"] for p, n in nodes.items() if p.startswith("t-between/d/")} == {
        "running",
        "restarting",
    }
    await sup.terminate_child("s")
    await dyn.terminate_child(other)
    nodes = by_path(tracker.snapshot("t-between"))
    assert nodes["t-between/s"]["state"] == "stopped"
    dyn_nodes = [n for p, n in nodes.items() if p.startswith("t-between/d/")]
    assert [(n["pid"], n["state"]) for n in dyn_nodes] == [(keep, "running")]
    _, bad = tracker.not_ready("t-between")
    assert [n["path"] for n in bad] == ["t-between/s"]  # permanent and stopped
    await sup.stop()

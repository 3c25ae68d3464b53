"""trellis.metrics against real trees: every scrape is parsed back with the Prometheus
parser and checked against what the tree did (telemetry capture, which_children)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trellis
from _helpers import settle
from trellis._tree import CLASSES
from trellis.metrics import Metrics
from trellis.testing import VirtualClock, capture_telemetry, wait_restarted

NODE = "test-node"  # what the metrics fixture and Samples use
Samples = Any  # conftest.Samples: one parsed scrape
Scrape = Callable[..., Awaitable[Samples]]

# ---------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------


class Boom(Exception):
    """A crash reason."""


class Crashy(trellis.Server):
    """Dies on request: cast ``"crash"`` raises, cast ``"normal"`` stops normally."""

    trap_exits = False

    async def handle_call(self, request: Any, caller: Any) -> Any:
        return request

    async def handle_cast(self, msg: Any) -> Any:
        if msg == "crash":
            raise Boom("crash")
        if msg == "normal":
            return trellis.Stop(trellis.NORMAL)
        return None


class Busy(trellis.Server):
    """Blocks in ``handle_cast`` until ``gate`` is set, so later messages queue up."""

    async def init(self, gate: asyncio.Event) -> None:
        self.gate = gate

    async def handle_cast(self, msg: Any) -> None:
        await self.gate.wait()


async def pid_of(sup: Any, child_id: Any) -> Any:
    return (await sup.which_child(child_id)).pid


async def crash(sup: Any, child_id: Any, how: str = "crash") -> trellis.Pid:
    """Make the child exit (``crash``, ``normal`` or ``kill``) and wait for its restart."""
    pid = await pid_of(sup, child_id)
    if how == "kill":
        trellis.exit(pid, trellis.KILL)
    else:
        trellis.cast(pid, how)
    return await wait_restarted(sup, child_id, pid)


def starts(cap: Any, sup: str, child_id: Any) -> int:
    return len(cap.named("child.started", supervisor=sup, child_id=child_id)) + len(
        cap.named("child.restarted", supervisor=sup, child_id=child_id)
    )


# ---------------------------------------------------------------------------
# Counters and histograms
# ---------------------------------------------------------------------------


async def test_restarts_exits_and_histograms_match_the_tree(
    clock: VirtualClock, metrics: Metrics, scrape: Scrape
) -> None:
    """Three crashes of one child, each after 10 s of (virtual) run time: starts,
    restarts and exits by class equal the telemetry counts, the run-time histogram has
    three 10 s observations, and the recovery histogram three immediate recoveries."""
    wall_before = time.time()
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link(
            [Crashy.child_spec(id="a"), Crashy.child_spec(id="b")],
            intensity=100,
            period=5.0,
            name="m-counts",
        )
        metrics.track(sup)
        for _ in range(3):
            await clock.advance(10.0)
            await crash(sup, "a")
        s = await scrape(metrics)
        await sup.stop()
    wall_after = time.time()

    a = {"supervisor": "m-counts", "child": "a"}
    b = {"supervisor": "m-counts", "child": "b"}
    assert s.value("trellis_child_starts_total", **a) == starts(cap, "m-counts", "a") == 4
    assert s.value("trellis_child_starts_total", **b) == starts(cap, "m-counts", "b") == 1
    assert s.value("trellis_child_restarts_total", **a, reason="crash") == 3
    assert s.value("trellis_child_exits_total", **a, reason="crash") == 3
    assert len(cap.named("child.exited", child_id="a")) == 3
    # a series at 0 per reason class from the first start: increase() sees the first one
    for name in ("trellis_child_restarts_total", "trellis_child_exits_total"):
        assert sorted(lb["reason"] for lb, _ in s.select(name, **b)) == sorted(CLASSES)
        assert {v for _, v in s.select(name, **b)} == {0.0}
    # run time: start -> abnormal exit, 10 s each, so in the le=10 bucket and not below
    assert s.value("trellis_child_run_seconds_count", **a) == 3
    assert s.value("trellis_child_run_seconds_sum", **a) == 30.0
    assert s.value("trellis_child_run_seconds_bucket", **a, le="1.0") == 0
    assert s.value("trellis_child_run_seconds_bucket", **a, le="10.0") == 3
    # recovery: the restart happened at the same virtual instant as the exit
    assert s.value("trellis_child_recovery_seconds_count", **a) == 3
    assert s.value("trellis_child_recovery_seconds_sum", **a) == 0.0
    assert s.value("trellis_child_recovery_seconds_bucket", **a, le="0.001") == 3
    assert s.value("trellis_child_recovery_seconds_count", **b) == 0
    assert s.value("trellis_child_start_failures_total", **a) == 0
    started = s.value("trellis_child_start_time_seconds", **a)
    assert wall_before <= started <= wall_after
    assert s.types["trellis_child_restarts"] == "counter"
    assert s.types["trellis_child_recovery_seconds"] == "histogram"


async def test_backoff_recovery_time_is_measured_on_the_trellis_clock(
    clock: VirtualClock, metrics: Metrics, scrape: Scrape
) -> None:
    """A crash followed by a 2 s backoff: while it waits the child is ``restarting`` and
    not up; once restarted the recovery histogram holds exactly one 2.0 s observation."""
    backoff = trellis.Backoff(min=2.0, max=2.0)
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link(
            [Crashy.child_spec(id="slow", backoff=backoff)], name="m-backoff"
        )
        metrics.track(sup)
        trellis.cast(await pid_of(sup, "slow"), "crash")
        await cap.wait_for("child.backoff", child_id="slow")
        waiting = await scrape(metrics)
        await clock.advance(2.0)
        await cap.wait_for("child.restarted", child_id="slow")
        done = await scrape(metrics)
        await sup.stop()

    c = {"supervisor": "m-backoff", "child": "slow"}
    assert waiting.value("trellis_child_up", **c) == 0
    assert waiting.value("trellis_child_state", **c, state="restarting") == 1
    assert waiting.value("trellis_child_state", **c, state="running") == 0
    assert waiting.value("trellis_child_recovery_seconds_count", **c) == 0
    assert done.value("trellis_child_up", **c) == 1
    assert done.value("trellis_child_recovery_seconds_count", **c) == 1
    assert done.value("trellis_child_recovery_seconds_sum", **c) == 2.0
    assert done.value("trellis_child_recovery_seconds_bucket", **c, le="1.0") == 0
    assert done.value("trellis_child_recovery_seconds_bucket", **c, le="2.5") == 1


async def test_restart_reason_is_the_class_of_the_exit_that_caused_it(
    metrics: Metrics, scrape: Scrape
) -> None:
    """A crash, a kill and a normal exit of a permanent child each count one restart
    under their class; a rest_for_one bystander's restart counts under the class of the
    sibling's exit that caused it (not its own earlier crash), and its shutdown by the
    supervisor is not an exit."""
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link(
            [Crashy.child_spec(id="first"), Crashy.child_spec(id="second")],
            strategy="rest_for_one",
            intensity=100,
            name="m-reasons",
        )
        metrics.track(sup)
        await crash(sup, "second", "crash")
        for how in ("kill", "crash", "normal"):
            old = await pid_of(sup, "second")
            await crash(sup, "first", how)
            await wait_restarted(sup, "second", old)
        await settle()
        s = await scrape(metrics)
        await sup.stop()

    first = {"supervisor": "m-reasons", "child": "first"}
    second = {"supervisor": "m-reasons", "child": "second"}
    for cls in ("crash", "killed", "normal"):
        assert s.value("trellis_child_restarts_total", **first, reason=cls) == 1
        assert s.value("trellis_child_exits_total", **first, reason=cls) == 1
    assert len(cap.named("child.restarted", child_id="second")) == 4
    assert s.value("trellis_child_restarts_total", **second, reason="crash") == 2
    assert s.value("trellis_child_restarts_total", **second, reason="killed") == 1
    assert s.value("trellis_child_restarts_total", **second, reason="normal") == 1
    exits = {lb["reason"]: v for lb, v in s.select("trellis_child_exits_total", **second)}
    assert exits == {cls: 1 if cls == "crash" else 0 for cls in CLASSES}
    # a normal exit is not a failure: no run-time or recovery observation for it
    assert s.value("trellis_child_run_seconds_count", **first) == 2
    assert s.value("trellis_child_recovery_seconds_count", **first) == 2


async def test_nested_supervisors_are_labelled_by_tree_path(
    metrics: Metrics, scrape: Scrape
) -> None:
    """A child of a nested supervisor carries the nested supervisor's path; the nested
    supervisor itself is a child of the root."""
    sub = trellis.Supervisor.child_spec([Crashy.child_spec(id="leaf")], id="sub")
    sup = await trellis.Supervisor.start_link([sub], name="m-nested")
    metrics.track(sup)
    inner = await pid_of(sup, "sub")
    await crash(inner, "leaf")
    s = await scrape(metrics)
    await sup.stop()

    leaf = {"supervisor": "m-nested/sub", "child": "leaf"}
    assert s.value("trellis_child_restarts_total", **leaf, reason="crash") == 1
    assert s.value("trellis_child_up", **leaf) == 1
    assert s.value("trellis_child_up", supervisor="m-nested", child="sub") == 1
    assert s.value("trellis_child_state", supervisor="", child="m-nested", state="running") == 1


# ---------------------------------------------------------------------------
# Scrape-time gauges
# ---------------------------------------------------------------------------


async def test_up_and_state_follow_which_children(
    clock: VirtualClock, metrics: Metrics, scrape: Scrape
) -> None:
    """Running, stopped (terminate_child) and restarting (in backoff) children: the up
    and one-hot state gauges agree with which_children, child by child."""
    backoff = trellis.Backoff(min=5.0, max=5.0)
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link(
            [
                Crashy.child_spec(id="run"),
                Crashy.child_spec(id="stopped"),
                Crashy.child_spec(id="waiting", backoff=backoff),
            ],
            name="m-state",
        )
        metrics.track(sup)
        await sup.terminate_child("stopped")
        trellis.cast(await pid_of(sup, "waiting"), "crash")
        await cap.wait_for("child.backoff", child_id="waiting")
        s = await scrape(metrics)
        infos = await sup.which_children()
        await sup.stop()

    assert len(infos) == 3
    for info in infos:
        if isinstance(info.pid, trellis.Pid):
            expected = "running"
        elif info.pid is None:
            expected = "stopped"
        else:
            expected = "restarting"
        c = {"supervisor": "m-state", "child": info.id}
        assert s.value("trellis_child_up", **c) == (expected == "running")
        for state in ("running", "restarting", "stopped"):
            assert s.value("trellis_child_state", **c, state=state) == (state == expected)
    assert {info.id: info.pid for info in infos}["stopped"] is None


async def test_mailbox_length_of_a_busy_server(metrics: Metrics, scrape: Scrape) -> None:
    """A server stuck in handle_cast with five messages queued behind it shows a
    mailbox length of 5; once released and drained it shows 0."""
    gate = asyncio.Event()
    sup = await trellis.Supervisor.start_link(
        [Busy.child_spec(gate, id="busy"), Crashy.child_spec(id="idle")], name="m-mailbox"
    )
    metrics.track(sup)
    pid = await pid_of(sup, "busy")
    trellis.cast(pid, "first")
    await settle()
    for i in range(5):
        trellis.cast(pid, i)
    s = await scrape(metrics)
    assert pid.message_queue_len == 5
    gate.set()
    await settle()
    drained = await scrape(metrics)
    await sup.stop()

    busy = {"supervisor": "m-mailbox", "child": "busy"}
    assert s.value("trellis_child_mailbox_length", **busy) == 5
    assert s.value("trellis_child_mailbox_length", supervisor="m-mailbox", child="idle") == 0
    assert drained.value("trellis_child_mailbox_length", **busy) == 0


# ---------------------------------------------------------------------------
# Dynamic children and series cleanup
# ---------------------------------------------------------------------------


async def test_simple_one_for_one_children_share_the_template_id(
    metrics: Metrics, scrape: Scrape
) -> None:
    """Three children of a simple_one_for_one supervisor are counted under the template
    id: the state gauge counts them, a crash of one is one restart, and after one is
    terminated two run."""
    template = Crashy.child_spec(id="conn", restart="permanent")
    sup = await trellis.Supervisor.start_link(
        [template], strategy="simple_one_for_one", intensity=100, name="m-simple"
    )
    metrics.track(sup)
    pids = [await sup.start_child([]) for _ in range(3)]
    with capture_telemetry() as cap:
        trellis.cast(pids[0], "crash")
        await cap.wait_for("child.restarted", supervisor="m-simple")
    s = await scrape(metrics)
    await sup.terminate_child(pids[1])
    after = await scrape(metrics)
    await sup.stop()

    conn = {"supervisor": "m-simple", "child": "conn"}
    assert s.value("trellis_child_state", **conn, state="running") == 3
    assert s.value("trellis_child_up", **conn) == 1
    assert s.value("trellis_child_starts_total", **conn) == 4
    assert s.value("trellis_child_restarts_total", **conn, reason="crash") == 1
    assert after.value("trellis_child_state", **conn, state="running") == 2


async def test_dynamic_supervisor_children_by_spec_id_and_removed_when_gone(
    metrics: Metrics, scrape: Scrape
) -> None:
    """DynamicSupervisor children are labelled by their spec ids; a terminated child's
    gauges disappear at once and its counters after one more scrape."""
    sup = await trellis.DynamicSupervisor.start_link(name="m-dyn")
    metrics.track(sup)
    x = await sup.start_child(Crashy.child_spec(id="x"))
    await sup.start_child(Crashy.child_spec(id="y"))
    first = await scrape(metrics)
    await sup.terminate_child(x)
    second = await scrape(metrics)
    third = await scrape(metrics)
    await sup.stop()

    for cid in ("x", "y"):
        c = {"supervisor": "m-dyn", "child": cid}
        assert first.value("trellis_child_up", **c) == 1
        assert first.value("trellis_child_starts_total", **c) == 1
    x_ = {"supervisor": "m-dyn", "child": "x"}
    assert second.get("trellis_child_up", **x_) is None
    assert second.value("trellis_child_starts_total", **x_) == 1  # kept one more scrape
    assert third.get("trellis_child_starts_total", **x_) is None
    assert third.select("trellis_child_recovery_seconds_count", child="x") == []
    assert third.value("trellis_child_starts_total", supervisor="m-dyn", child="y") == 1


async def test_temporary_and_deleted_children_do_not_leak_series(
    metrics: Metrics, scrape: Scrape
) -> None:
    """A temporary child that crashed (removed by its supervisor) and a child stopped
    and deleted are exported for one more scrape, then every series of theirs is gone,
    while the remaining child keeps its own."""
    sup = await trellis.Supervisor.start_link(
        [
            Crashy.child_spec(id="temp", restart="temporary"),
            Crashy.child_spec(id="gone"),
            Crashy.child_spec(id="stays"),
        ],
        name="m-leak",
    )
    metrics.track(sup)
    with capture_telemetry() as cap:
        trellis.cast(await pid_of(sup, "temp"), "crash")
        await cap.wait_for("child.exited", child_id="temp")
    await sup.terminate_child("gone")
    await sup.delete_child("gone")
    first = await scrape(metrics)
    second = await scrape(metrics)
    await sup.stop()

    assert (
        first.value("trellis_child_exits_total", supervisor="m-leak", child="temp", reason="crash")
        == 1
    )
    assert first.value("trellis_child_starts_total", supervisor="m-leak", child="gone") == 1
    for gone in ("temp", "gone"):
        assert first.select("trellis_child_up", child=gone) == []
        assert [(n, lb) for n, lb, _ in second.rows if lb.get("child") == gone] == []
    assert second.value("trellis_child_starts_total", supervisor="m-leak", child="stays") == 1


# ---------------------------------------------------------------------------
# Give-up, trellis.run, label hygiene, detaching
# ---------------------------------------------------------------------------


async def test_intensity_exceeded_counts_each_give_up(
    clock: VirtualClock, metrics: Metrics, scrape: Scrape
) -> None:
    """A nested supervisor (intensity 1) gives up on the second crash within its period
    and is restarted by the root: the counter equals the supervisor.gave_up events."""
    sub = trellis.Supervisor.child_spec(
        [Crashy.child_spec(id="flaky")], id="sub", intensity=1, period=5.0
    )
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link([sub], intensity=10, name="m-giveup")
        metrics.track(sup)
        for round_ in range(2):
            inner = await pid_of(sup, "sub")
            await crash(inner, "flaky")
            trellis.cast(await pid_of(inner, "flaky"), "crash")
            await cap.wait_for("supervisor.gave_up", after=0 if round_ == 0 else len(cap.events))
            await wait_restarted(sup, "sub", inner)
            await clock.advance(60.0)
        s = await scrape(metrics)
        await sup.stop()

    gave_up = cap.named("supervisor.gave_up", supervisor="m-giveup/sub")
    assert len(gave_up) == 2
    assert s.value("trellis_supervisor_intensity_exceeded_total", supervisor="m-giveup/sub") == 2
    assert s.get("trellis_supervisor_intensity_exceeded_total", supervisor="m-giveup") is None
    assert (
        s.value(
            "trellis_child_restarts_total", supervisor="m-giveup", child="sub", reason="shutdown"
        )
        == 2
    )
    assert s.value("trellis_child_up", supervisor="m-giveup/sub", child="flaky") == 1


async def test_as_a_run_extension_through_a_root_give_up(scrape: Scrape) -> None:
    """Under trellis.run_async, Metrics attaches before the root starts, walks the root
    it was given, and detaches when the run ends; a root that gives up leaves
    intensity_exceeded = 1 and its own up gauge at 0, and the run exits with 1."""
    metrics = Metrics(node=NODE)
    seen: list[Samples] = []

    class Crasher:
        async def start(self) -> None:
            pass

        async def tree_started(self, root: trellis.Pid, request_stop: Any) -> None:
            seen.append(await scrape(metrics))
            trellis.cast(await pid_of(root, "only"), "crash")

        async def stop(self) -> None:
            pass

    async def root() -> trellis.Pid:
        return await trellis.Supervisor.start_link(
            [Crashy.child_spec(id="only")], intensity=0, name="m-run"
        )

    code = await trellis.run_async(root, extensions=[metrics, Crasher()])
    assert not metrics.attached
    end = await scrape(metrics)

    assert code == 1
    assert seen[0].value("trellis_child_up", supervisor="", child="m-run") == 1
    assert seen[0].value("trellis_child_up", supervisor="m-run", child="only") == 1
    assert end.value("trellis_supervisor_intensity_exceeded_total", supervisor="m-run") == 1
    assert end.value("trellis_child_up", supervisor="", child="m-run") == 0
    assert end.value("trellis_child_state", supervisor="", child="m-run", state="stopped") == 1
    assert (
        end.value("trellis_child_exits_total", supervisor="m-run", child="only", reason="crash")
        == 1
    )


PIDLIKE = re.compile(r"<Pid|<\d+>|0x[0-9a-fA-F]{2,}|\bPid\b")


async def test_no_label_value_looks_like_a_pid(metrics: Metrics, scrape: Scrape) -> None:
    """An unnamed root, a child whose id prints an object address and a dynamic child:
    no label value anywhere holds a pid, a default ``<n>`` process name or an address,
    and ``reason`` only takes exit classes."""
    odd_id = object()
    dyn = trellis.DynamicSupervisor.child_spec(id="pool")
    sup = await trellis.Supervisor.start_link([Crashy.child_spec(id=odd_id), dyn], intensity=100)
    metrics.track(sup)
    pool = await pid_of(sup, "pool")
    worker = await pool.start_child(Crashy.child_spec(id="w"))
    trellis.cast(worker, "crash")
    await crash(sup, odd_id)
    await settle()
    s = await scrape(metrics)
    await sup.stop()

    assert str(sup.id) in repr(sup)  # the root is unnamed: its path is "<id>"
    values = s.label_values()
    bad = [v for v in values if PIDLIKE.search(v)]
    assert bad == []
    assert {lb["reason"] for _, lb, _ in s.rows if "reason" in lb} <= set(CLASSES)
    assert s.select("trellis_child_restarts_total", supervisor="<unnamed>", reason="crash")
    assert s.value("trellis_child_up", supervisor="<unnamed>", child="pool") == 1


async def test_detached_metrics_stop_counting(metrics: Metrics, scrape: Scrape) -> None:
    """After detach() further crashes are not counted; what was counted stays."""
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link([Crashy.child_spec(id="c")], name="m-detach")
        metrics.track(sup)
        await crash(sup, "c")
        before = await scrape(metrics)
        metrics.detach()
        assert not metrics.attached
        await crash(sup, "c")
        await crash(sup, "c")
        after = await scrape(metrics)
        await sup.stop()

    c = {"supervisor": "m-detach", "child": "c"}
    assert len(cap.named("child.restarted", child_id="c")) == 3
    assert before.value("trellis_child_restarts_total", **c, reason="crash") == 1
    assert after.value("trellis_child_restarts_total", **c, reason="crash") == 1
    assert after.value("trellis_child_starts_total", **c) == 2
    assert after.value("trellis_child_up", **c) == 1  # gauges still read the live tree


async def test_an_unhashable_child_id_is_counted_under_its_text(
    metrics: Metrics, scrape: Scrape
) -> None:
    """A child whose id is a list is counted (not an error) and its counters and
    gauges share one label set."""
    cid = ["shard", 1]
    sup = await trellis.Supervisor.start_link([Crashy.child_spec(id=cid)], name="m-unhash")
    metrics.track(sup)
    await crash(sup, cid)
    s = await scrape(metrics)
    await sup.stop()

    c = {"supervisor": "m-unhash", "child": "['shard', 1]"}
    assert s.value("trellis_child_restarts_total", **c, reason="crash") == 1
    assert s.value("trellis_child_up", **c) == 1
    assert s.value("trellis_metrics_event_errors_total") == 0


async def test_a_restarting_subtree_keeps_its_series(
    clock: VirtualClock, metrics: Metrics, scrape: Scrape
) -> None:
    """A nested supervisor that gave up waits 5 s (backoff) before its restart: its
    children's series stay through any number of scrapes, shown as restarting with up 0
    (not dropped: a scraper would record them as gone), and continue counting once it
    runs again."""
    sub = dataclasses.replace(
        trellis.Supervisor.child_spec([Crashy.child_spec(id="leaf")], id="sub", intensity=0),
        backoff=trellis.Backoff(min=5.0, max=5.0),
    )
    leaf = {"supervisor": "m-protect/sub", "child": "leaf"}
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link([sub], name="m-protect")
        metrics.track(sup)
        trellis.cast(await pid_of(await pid_of(sup, "sub"), "leaf"), "crash")
        await cap.wait_for("child.backoff", child_id="sub")
        waiting = [await scrape(metrics) for _ in range(3)]
        await clock.advance(5.0)
        await cap.wait_for("child.restarted", child_id="sub")
        back = await scrape(metrics)
        await sup.stop()

    for s in waiting:
        assert (
            s.value("trellis_child_state", supervisor="m-protect", child="sub", state="restarting")
            == 1
        )
        assert s.value("trellis_child_up", **leaf) == 0
        assert s.value("trellis_child_state", **leaf, state="restarting") == 1
        assert s.value("trellis_child_exits_total", **leaf, reason="crash") == 1
    assert back.value("trellis_child_starts_total", **leaf) == 2
    assert back.value("trellis_child_up", **leaf) == 1


async def test_a_supervisor_that_does_not_answer_keeps_its_series(
    metrics: Metrics, scrape: Scrape
) -> None:
    """While the root is busy inside a slow start_child it cannot answer a walk: the
    scrape does not ask it, and shows its children as telemetry last showed them (the
    running one up), at once."""
    gate = asyncio.Event()

    async def slow_start() -> trellis.Pid:
        await gate.wait()
        return await Crashy.start_link()

    metrics.walk_timeout = 0.05
    sup = await trellis.Supervisor.start_link([Crashy.child_spec(id="c")], name="m-slow")
    metrics.track(sup)
    await crash(sup, "c")
    adding = asyncio.ensure_future(sup.start_child(trellis.ChildSpec("late", slow_start)))
    await settle()
    blocked = [await asyncio.wait_for(scrape(metrics), 2.0) for _ in range(3)]
    gate.set()
    await adding
    free = await scrape(metrics)
    await sup.stop()

    c = {"supervisor": "m-slow", "child": "c"}
    for s in blocked:
        assert s.value("trellis_child_up", **c) == 1
        assert s.value("trellis_child_state", **c, state="running") == 1
        assert s.value("trellis_child_restarts_total", **c, reason="crash") == 1
    assert free.value("trellis_child_up", **c) == 1
    assert free.value("trellis_child_up", supervisor="m-slow", child="late") == 1


async def test_the_fast_exposition_says_what_prometheus_client_says(
    metrics: Metrics, clock: VirtualClock
) -> None:
    """render() writes Trellis's series with an encoder of its own (fast, strings only);
    parsed back, in both formats, it has exactly the samples prometheus_client writes
    from the same state (the collector protocol), for restarts, backoff, nested and
    dynamic children sharing an id, and labels that need escaping."""
    from prometheus_client import generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as om_latest
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
    from prometheus_client.parser import text_string_to_metric_families

    from metrics.conftest import Samples as Parsed

    def samples(text: str, parse: Any) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
        return sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for fam in parse(text)
            for s in fam.samples
        )

    metrics.app_registry = None  # Trellis's series only (not the default registry's)
    backoff = trellis.Backoff(min=5.0, max=5.0)
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link(
            [
                Crashy.child_spec(id='we"ird\\id'),
                Crashy.child_spec(id="slow", backoff=backoff),
                trellis.DynamicSupervisor.child_spec(id="dyn"),
            ],
            name="m-fast",
            intensity=100,
        )
        metrics.track(sup)
        await crash(sup, 'we"ird\\id')
        dyn = await pid_of(sup, "dyn")
        for _ in range(3):
            await dyn.start_child(Crashy.child_spec(id="same"))
        trellis.cast(await pid_of(sup, "slow"), "crash")
        await cap.wait_for("child.backoff", child_id="slow")
        metrics.refresh_now()
        fast, _ = metrics.render_now()
        slow = generate_latest(metrics.registry)  # through the collector protocol
        fast_om, content_type = metrics.render_now("application/openmetrics-text")
        slow_om = om_latest(metrics.registry)
        await sup.stop()
    assert content_type.startswith("application/openmetrics-text")
    assert samples(fast.decode(), text_string_to_metric_families) == samples(
        slow.decode(), text_string_to_metric_families
    )
    assert samples(fast_om.decode(), om_parse) == samples(slow_om.decode(), om_parse)
    assert fast_om.endswith(b"# EOF\n")
    s = Parsed(fast)
    assert (
        s.value("trellis_child_state", supervisor="m-fast/dyn", child="same", state="running") == 3
    )
    assert (
        s.value("trellis_child_state", supervisor="m-fast", child="slow", state="restarting") == 1
    )


async def test_concurrent_scrapes_agree(metrics: Metrics) -> None:
    """Scrapers at once (an HA pair of Prometheus servers): renders run in worker
    threads and take turns, so none sees another's half-counted gauges (threads are
    made to switch very often here, so that an unguarded render would)."""
    sup = await trellis.Supervisor.start_link(
        [Crashy.child_spec(id=f"c{i}") for i in range(500)], name="m-two"
    )
    metrics.track(sup)
    up = re.compile(rb'^trellis_child_up\{[^}]*supervisor="m-two"[^}]*\} (\S+)$', re.M)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        bodies = await asyncio.gather(*(metrics.render() for _ in range(8)))
    finally:
        sys.setswitchinterval(interval)
        await sup.stop()
    for body, _ in bodies:
        values = up.findall(body)
        assert len(values) == 500
        assert set(values) == {b"1.0"}

"""Supervisor restart conformance: SPEC sections C (restart types), D (strategies), E (intensity).

Every child used here records what it does in a shared `Rec`: an ordered `log` of
`("start", id)`, `("terminate", id)` and `("start_failed", id)` entries, the latest pid
per id, and the reasons its `terminate` was called with. Tests assert exact logs, so an
extra, missing or reordered start/termination fails them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import trellis
from _helpers import settle
from trellis import KILL, KILLED, NORMAL, SHUTDOWN, ChildSpec, Shutdown, Supervisor
from trellis.testing import capture_telemetry, wait_restarted

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class Rec:
    """What the children of one test did, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.pids: dict[str, trellis.Pid] = {}
        self.reasons: dict[str, list[Any]] = {}
        self.extra: dict[trellis.Pid, tuple[Any, ...]] = {}
        self.fail: dict[str, int] = {}  # id -> number of upcoming starts that must fail

    def count(self, kind: str, name: str) -> int:
        return self.log.count((kind, name))


class Child(trellis.Server):
    """A non-trapping child: dies at once from exit signals; a cast `r` makes it Stop(r)."""

    trap_exits = False

    async def init(self, rec: Rec, name: str, *extra: Any) -> None:
        self.rec, self.name = rec, name
        rec.log.append(("start", name))
        rec.pids[name] = self.pid
        rec.extra[self.pid] = extra

    async def handle_call(self, request: Any, caller: Any) -> Any:
        return request

    async def handle_cast(self, msg: Any) -> Any:
        return trellis.Stop(msg)

    async def terminate(self, reason: Any) -> None:
        self.rec.log.append(("terminate", self.name))
        self.rec.reasons.setdefault(self.name, []).append(reason)


class TrapChild(Child):
    """A trapping child: the supervisor's shutdown runs `terminate(SHUTDOWN)`, which is logged."""

    trap_exits = True


def spec(rec: Rec, name: str, *, trap: bool = True, **kw: Any) -> ChildSpec:
    """A child spec whose start fails (raises) while `rec.fail[name] > 0`."""
    cls = TrapChild if trap else Child

    async def start(*extra: Any) -> trellis.Pid:
        if rec.fail.get(name, 0) > 0:
            rec.fail[name] -= 1
            rec.log.append(("start_failed", name))
            await asyncio.sleep(0)  # let others run, so a retry loop never starves the test
            raise RuntimeError(f"{name} refuses to start")
        return await cls.start_link(rec, name, *extra)

    return ChildSpec(name, start, **kw)


async def joined(pid: trellis.Pid, timeout: float = 5.0) -> Any:
    """The exit reason of `pid` (fails instead of hanging)."""
    return await asyncio.wait_for(pid.join(), timeout)


async def pids(sup: Any) -> dict[Any, Any]:
    return {c.id: c.pid for c in await sup.which_children()}


async def ids(sup: Any) -> list[Any]:
    return [c.id for c in await sup.which_children()]


async def poll(fn: Callable[[], Awaitable[Any]], pred: Callable[[Any], bool]) -> Any:
    """Call `fn` until `pred(result)`; yields to the loop between tries (bounded)."""
    for _ in range(500):
        value = await fn()
        if pred(value):
            return value
        await asyncio.sleep(0)
    raise AssertionError(f"condition never met; last value {value!r}")


async def stop(sup: trellis.Pid) -> None:
    if sup.alive:
        await asyncio.wait_for(sup.stop(), 10)


def crash(pid: trellis.Pid, reason: Any) -> None:
    """Make a child exit with exactly `reason` (KILLED via a KILL signal)."""
    if reason is KILLED:
        trellis.exit(pid, KILL)
    else:
        trellis.cast(pid, reason)  # the child returns Stop(reason)


async def crash_and_settle(sup: trellis.Pid, pid: trellis.Pid, reason: Any) -> None:
    crash(pid, reason)
    assert await joined(pid) == reason
    await settle()
    await sup.which_children()  # queued behind the EXIT: the supervisor has handled it


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


CLEAN = [NORMAL, SHUTDOWN, Shutdown("bye")]
CLEAN_IDS = ["normal", "shutdown", "shutdown_detail"]
ABNORMAL_IDS = ["killed", "exception"]


def abnormal() -> list[Any]:
    return [KILLED, RuntimeError("boom")]


# ---------------------------------------------------------------------------
# C. Restart types x exit reasons
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("reason", CLEAN + abnormal(), ids=CLEAN_IDS + ABNORMAL_IDS)
async def test_permanent_restarted_after_any_reason(reason: Any) -> None:
    """SPEC 26: a permanent child is restarted after normal, shutdown, Shutdown(x), killed
    or a crash; its sibling keeps its pid."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a"), spec(rec, "b")])
    try:
        old_a, old_b = rec.pids["a"], rec.pids["b"]
        crash(old_a, reason)
        assert await joined(old_a) == reason
        new_a = await wait_restarted(sup, "a", old_a)
        assert new_a != old_a
        assert new_a.alive
        assert new_a == rec.pids["a"]
        assert (await pids(sup))["b"] == old_b
        assert rec.count("start", "a") == 2
    finally:
        await stop(sup)


@pytest.mark.parametrize("reason", CLEAN, ids=CLEAN_IDS)
async def test_transient_not_restarted_after_clean_exit(reason: Any) -> None:
    """SPEC 27: a transient child exiting normal/shutdown/Shutdown(x) is not restarted; its
    spec stays with pid None."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a", restart="transient"), spec(rec, "b")])
    try:
        await crash_and_settle(sup, rec.pids["a"], reason)
        assert await pids(sup) == {"a": None, "b": rec.pids["b"]}
        counts = await sup.count_children()
        assert (counts.specs, counts.active, counts.workers) == (2, 1, 2)
        assert rec.count("start", "a") == 1
        spec_a = await sup.get_childspec("a")
        assert spec_a.id == "a"
    finally:
        await stop(sup)


@pytest.mark.parametrize("reason", abnormal(), ids=ABNORMAL_IDS)
async def test_transient_restarted_after_abnormal_exit(reason: Any) -> None:
    """SPEC 27: a transient child is restarted after an abnormal reason, including killed."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a", restart="transient")])
    try:
        old = rec.pids["a"]
        crash(old, reason)
        new = await wait_restarted(sup, "a", old)
        assert new != old
        assert new.alive
        assert rec.count("start", "a") == 2
    finally:
        await stop(sup)


@pytest.mark.parametrize("reason", CLEAN + abnormal(), ids=CLEAN_IDS + ABNORMAL_IDS)
async def test_temporary_never_restarted_and_spec_deleted(reason: Any) -> None:
    """SPEC 28: a temporary child is never restarted, whatever the reason, and its spec is
    deleted (gone from which_children, specs count drops)."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "t", restart="temporary"), spec(rec, "b")])
    try:
        await crash_and_settle(sup, rec.pids["t"], reason)
        assert await pids(sup) == {"b": rec.pids["b"]}
        counts = await sup.count_children()
        assert (counts.specs, counts.active, counts.workers) == (1, 1, 1)
        assert rec.count("start", "t") == 1
        with pytest.raises(trellis.NotFound):
            await sup.get_childspec("t")
    finally:
        await stop(sup)


@pytest.mark.parametrize(
    ("restart", "reason", "logged"),
    [
        ("permanent", NORMAL, True),
        ("permanent", SHUTDOWN, True),
        ("permanent", RuntimeError("boom"), True),
        ("transient", RuntimeError("boom"), True),
        ("transient", NORMAL, False),
        ("transient", SHUTDOWN, False),
        ("transient", Shutdown("x"), False),
        ("temporary", RuntimeError("boom"), True),
        ("temporary", KILLED, True),
        ("temporary", NORMAL, False),
        ("temporary", SHUTDOWN, False),
        ("temporary", Shutdown("x"), False),
    ],
)
async def test_child_terminated_report(
    caplog: pytest.LogCaptureFixture, restart: str, reason: Any, logged: bool
) -> None:
    """SPEC 29: every restart, and an abnormal exit of a temporary child, logs a
    child_terminated report on the "trellis" logger; a clean exit of a transient or
    temporary child is silent."""
    caplog.set_level(logging.DEBUG, logger="trellis")
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "logged_child", restart=restart)])
    try:
        await crash_and_settle(sup, rec.pids["logged_child"], reason)
        if logged:
            found = reports(caplog, "child_terminated", logging.WARNING)
            assert found, [r.getMessage() for r in caplog.records]
            assert any(mentions(r, "logged_child") for r in found)
        else:
            assert reports(caplog, "child_terminated", logging.INFO) == []
    finally:
        await stop(sup)


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_exit_from_non_child_is_ignored() -> None:
    """SPEC 30: an Exit from a linked process that is not a child (a stranger linked to the
    supervisor) is ignored: no restart, no restart counted (intensity 0 survives)."""
    rec = Rec()
    strangers: list[trellis.Pid] = []

    async def start_with_stranger() -> trellis.Pid:
        strangers.append(trellis.spawn(_forever, link=True))  # linked to the supervisor
        return await TrapChild.start_link(rec, "a")

    sup = await Supervisor.start_link(
        [ChildSpec("a", start_with_stranger), spec(rec, "b")], intensity=0
    )
    try:
        before = await pids(sup)
        (stranger,) = strangers
        err = RuntimeError("stranger died")
        trellis.exit(stranger, err)
        assert await joined(stranger) is err
        await settle()
        assert await pids(sup) == before
        assert sup.alive
        assert rec.log == [("start", "a"), ("start", "b")]
        # intensity 0: had the stranger counted, this restart would make it give up
        trellis.exit(rec.pids["a"], KILL)
        assert await joined(sup) == SHUTDOWN
    finally:
        await stop(sup)


@pytest.mark.parametrize(
    "reason",
    [SHUTDOWN, Shutdown("parent"), RuntimeError("parent crashed")],
    ids=["shutdown", "shutdown_detail", "exception"],
)
async def test_parent_exit_terminates_children_and_exits_with_that_reason(reason: Any) -> None:
    """SPEC 31: an exit signal from the supervisor's parent makes it terminate its children
    (reverse start order, each gets terminate(SHUTDOWN)) and exit with the same reason."""
    rec = Rec()
    got: asyncio.Future[trellis.Pid] = asyncio.get_running_loop().create_future()

    async def parent() -> None:
        got.set_result(await Supervisor.start_link([spec(rec, "a"), spec(rec, "b")]))
        await asyncio.Event().wait()

    ppid = trellis.spawn(parent)
    sup = await asyncio.wait_for(got, 5)
    try:
        children = dict(rec.pids)
        trellis.exit(ppid, reason)
        assert await joined(ppid) == reason
        assert await joined(sup) == reason
        assert rec.log == [("start", "a"), ("start", "b"), ("terminate", "b"), ("terminate", "a")]
        assert rec.reasons == {"a": [SHUTDOWN], "b": [SHUTDOWN]}
        assert not any(p.alive for p in children.values())
    finally:
        await stop(sup)
        if ppid.alive:
            trellis.exit(ppid, KILL)
            await joined(ppid)


# ---------------------------------------------------------------------------
# D. Strategies
# ---------------------------------------------------------------------------


async def _four(rec: Rec, strategy: str, **kw: Any) -> trellis.Pid:
    sup = await Supervisor.start_link(
        [spec(rec, n) for n in "abcd"], strategy=strategy, intensity=kw.pop("intensity", 5), **kw
    )
    assert rec.log == [("start", n) for n in "abcd"]
    rec.log.clear()
    return sup


async def test_one_for_one_restarts_only_failed_child() -> None:
    """SPEC 32: one_for_one restarts only the failed child; siblings keep their pids and are
    not terminated."""
    rec = Rec()
    sup = await _four(rec, "one_for_one")
    try:
        before = dict(rec.pids)
        trellis.exit(before["b"], KILL)
        new_b = await wait_restarted(sup, "b", before["b"])
        assert rec.log == [("start", "b")]
        assert await pids(sup) == {**before, "b": new_b}
    finally:
        await stop(sup)


async def test_one_for_all_terminates_others_reverse_then_starts_all() -> None:
    """SPEC 33: one_for_all terminates the other running children in reverse start order,
    each per its shutdown spec (brutal_kill: killed, no terminate), then starts all children
    in start order."""
    rec = Rec()
    specs = [spec(rec, "a"), spec(rec, "b"), spec(rec, "c", shutdown="brutal_kill"), spec(rec, "d")]
    sup = await Supervisor.start_link(specs, strategy="one_for_all", intensity=5)
    try:
        rec.log.clear()
        before = dict(rec.pids)
        trellis.exit(before["b"], KILL)
        await wait_restarted(sup, "d", before["d"])
        assert rec.log == [
            ("terminate", "d"),
            ("terminate", "a"),
            ("start", "a"),
            ("start", "b"),
            ("start", "c"),
            ("start", "d"),
        ]
        assert await joined(before["c"]) == KILLED
        assert await joined(before["d"]) == SHUTDOWN
        assert await joined(before["a"]) == SHUTDOWN
        now = await pids(sup)
        assert all(now[n] != before[n] and now[n].alive for n in "abcd")
    finally:
        await stop(sup)


async def test_rest_for_one_restarts_failed_and_later_children() -> None:
    """SPEC 34: rest_for_one terminates the children started after the failed one in reverse
    order, then starts the failed one and those after it in order; earlier ones untouched."""
    rec = Rec()
    sup = await _four(rec, "rest_for_one")
    try:
        before = dict(rec.pids)
        trellis.exit(before["b"], KILL)
        await wait_restarted(sup, "d", before["d"])
        assert rec.log == [
            ("terminate", "d"),
            ("terminate", "c"),
            ("start", "b"),
            ("start", "c"),
            ("start", "d"),
        ]
        now = await pids(sup)
        assert now["a"] == before["a"]
        assert all(now[n] != before[n] for n in "bcd")
    finally:
        await stop(sup)


@pytest.mark.parametrize("strategy", ["one_for_all", "rest_for_one"])
async def test_temporary_bystander_terminated_and_removed(strategy: str) -> None:
    """SPEC 35: under one_for_all/rest_for_one a temporary sibling is terminated, not
    restarted, and its spec removed; it is not counted (intensity 1 survives one incident)."""
    rec = Rec()
    specs = [spec(rec, "a"), spec(rec, "b"), spec(rec, "t", restart="temporary"), spec(rec, "d")]
    sup = await Supervisor.start_link(specs, strategy=strategy, intensity=1)
    try:
        rec.log.clear()
        before = dict(rec.pids)
        trellis.exit(before["b"], KILL)
        await wait_restarted(sup, "d", before["d"])
        if strategy == "one_for_all":
            expected = [("terminate", "d"), ("terminate", "t"), ("terminate", "a")]
            expected += [("start", "a"), ("start", "b"), ("start", "d")]
        else:
            expected = [("terminate", "d"), ("terminate", "t"), ("start", "b"), ("start", "d")]
        assert rec.log == expected
        assert await ids(sup) == ["d", "b", "a"]
        assert (await sup.count_children()).specs == 3
        assert await joined(before["t"]) == SHUTDOWN
        await settle()
        assert sup.alive
    finally:
        await stop(sup)


async def test_one_for_all_restarts_non_running_siblings() -> None:
    """SPEC 36: one_for_all starts again every non-temporary child, including a transient
    that exited normally and one stopped with terminate_child."""
    rec = Rec()
    specs = [spec(rec, "a"), spec(rec, "b", restart="transient"), spec(rec, "c"), spec(rec, "d")]
    sup = await Supervisor.start_link(specs, strategy="one_for_all", intensity=5)
    try:
        await crash_and_settle(sup, rec.pids["b"], NORMAL)
        await sup.terminate_child("d")
        assert (await pids(sup))["b"] is None
        assert (await pids(sup))["d"] is None
        rec.log.clear()
        old_a = rec.pids["a"]
        trellis.exit(old_a, KILL)
        await wait_restarted(sup, "a", old_a)
        await poll(lambda: pids(sup), lambda p: p["d"] is not None)
        assert rec.log == [("terminate", "c"), *[("start", n) for n in "abcd"]]
        assert all(p is not None and p.alive for p in (await pids(sup)).values())
    finally:
        await stop(sup)


async def test_rest_for_one_restarts_non_running_later_siblings() -> None:
    """SPEC 36: rest_for_one starts again a later transient sibling that had exited normally,
    while an earlier child stopped with terminate_child stays stopped."""
    rec = Rec()
    specs = [spec(rec, "a"), spec(rec, "b"), spec(rec, "c", restart="transient"), spec(rec, "d")]
    sup = await Supervisor.start_link(specs, strategy="rest_for_one", intensity=5)
    try:
        await sup.terminate_child("a")
        await crash_and_settle(sup, rec.pids["c"], NORMAL)
        rec.log.clear()
        old_b, old_d = rec.pids["b"], rec.pids["d"]
        trellis.exit(old_b, KILL)
        await wait_restarted(sup, "d", old_d)
        assert rec.log == [("terminate", "d"), ("start", "b"), ("start", "c"), ("start", "d")]
        now = await pids(sup)
        assert now["a"] is None
        assert all(now[n] is not None and now[n].alive for n in "bcd")
    finally:
        await stop(sup)


async def test_restarted_child_keeps_its_position() -> None:
    """SPEC 37: a restarted child keeps its place in the start order: which_children order
    (newest first) is unchanged and shutdown still goes in reverse original order."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, n) for n in "abc"])
    try:
        old = rec.pids["a"]
        trellis.exit(old, KILL)
        await wait_restarted(sup, "a", old)
        await sup.start_child(spec(rec, "d"))
        old = rec.pids["b"]
        trellis.exit(old, KILL)
        await wait_restarted(sup, "b", old)
        assert await ids(sup) == ["d", "c", "b", "a"]
        rec.log.clear()
        await stop(sup)
        assert rec.log == [("terminate", n) for n in "dcba"]
    finally:
        await stop(sup)


async def test_simple_one_for_one_restart_uses_same_args() -> None:
    """SPEC 38: simple_one_for_one restarts a dynamic child with exactly its original
    arguments (spec args + extra args)."""
    rec = Rec()
    template = Child.child_spec(rec, "w", restart="permanent")
    sup = await Supervisor.start_link([template], strategy="simple_one_for_one")
    try:
        p1 = await sup.start_child([1])
        p2 = await sup.start_child(["two", 2.0])
        assert rec.extra[p1] == (1,)
        assert rec.extra[p2] == ("two", 2.0)
        trellis.exit(p2, RuntimeError("boom"))
        await joined(p2)
        infos = await poll(
            sup.which_children, lambda cs: len(cs) == 2 and all(c.pid != p2 for c in cs)
        )
        assert all(c.id is None for c in infos)
        children = [c.pid for c in infos]
        assert p1 in children
        (new,) = [p for p in children if p != p1]
        assert new != p2
        assert new.alive
        assert rec.extra[new] == ("two", 2.0)
        assert rec.log == [("start", "w")] * 3
    finally:
        await stop(sup)


async def test_one_for_all_start_failure_retries_whole_group() -> None:
    """SPEC 39, 40: when a child fails to start during a one_for_all restart, later children
    are not started; the retry first terminates the children restarted in that round (reverse
    order), then starts the whole group again."""
    rec = Rec()
    sup = await _four(rec, "one_for_all")
    try:
        rec.fail["c"] = 1
        before = dict(rec.pids)
        trellis.exit(before["a"], KILL)
        await wait_restarted(sup, "d", before["d"])
        assert rec.log == [
            ("terminate", "d"),
            ("terminate", "c"),
            ("terminate", "b"),
            ("start", "a"),
            ("start", "b"),
            ("start_failed", "c"),
            ("terminate", "b"),
            ("terminate", "a"),
            ("start", "a"),
            ("start", "b"),
            ("start", "c"),
            ("start", "d"),
        ]
        assert all(p.alive for p in (await pids(sup)).values())
    finally:
        await stop(sup)


async def test_rest_for_one_start_failure_retries_from_failed_child() -> None:
    """SPEC 39, 40: when a child fails to start during a rest_for_one restart, the retry
    starts from the failed child onward; earlier children (including the one restarted in
    that round) keep running, and later ones are not started before the retry."""
    rec = Rec()
    sup = await _four(rec, "rest_for_one")
    try:
        rec.fail["c"] = 1
        before = dict(rec.pids)
        trellis.exit(before["b"], KILL)
        await wait_restarted(sup, "d", before["d"])
        assert rec.log == [
            ("terminate", "d"),
            ("terminate", "c"),
            ("start", "b"),
            ("start_failed", "c"),
            ("start", "c"),
            ("start", "d"),
        ]
        now = await pids(sup)
        assert now["a"] == before["a"]
        assert now["b"] == rec.pids["b"]
        assert now["b"].alive
    finally:
        await stop(sup)


@pytest.mark.parametrize("strategy", ["one_for_all", "rest_for_one"])
async def test_children_after_failed_start_unstarted_until_retry(clock: Any, strategy: str) -> None:
    """SPEC 40, 46: while a group restart keeps failing at c, which_children shows c as
    RESTARTING, the children after it with pid None, and the ones before it running; once
    the start works, the retry completes the group."""
    rec = Rec()
    sup = await _four(rec, strategy, intensity=10**6)
    try:
        before = dict(rec.pids)
        rec.fail["c"] = 10**9
        crashed = "a" if strategy == "one_for_all" else "b"
        trellis.exit(before[crashed], KILL)
        mid = await poll(lambda: pids(sup), lambda p: p["c"] == trellis.RESTARTING)
        assert mid["d"] is None
        assert isinstance(mid["a"], trellis.Pid)
        assert mid["a"].alive
        assert isinstance(mid["b"], trellis.Pid)
        assert mid["b"].alive
        assert mid["b"] != before["b"]
        if strategy == "rest_for_one":
            assert mid["a"] == before["a"]
        assert rec.count("start", "d") == 0
        rec.fail["c"] = 0
        final = await poll(lambda: pids(sup), lambda p: isinstance(p["d"], trellis.Pid))
        assert all(p.alive for p in final.values())
        if strategy == "one_for_all":
            assert not mid["a"].alive
            assert not mid["b"].alive
        else:
            assert final["a"] == before["a"]
            assert final["b"] == mid["b"]
        assert rec.count("start", "d") == 1
    finally:
        await stop(sup)


# ---------------------------------------------------------------------------
# E. Intensity and escalation
# ---------------------------------------------------------------------------


async def test_one_timestamp_per_incident(clock: Any) -> None:
    """SPEC 41: a one_for_all incident restarting three children counts once: intensity 1
    survives the first incident and gives up on the second."""
    rec = Rec()
    sup = await Supervisor.start_link(
        [spec(rec, n) for n in "abc"], strategy="one_for_all", intensity=1, period=5.0
    )
    try:
        old = dict(rec.pids)
        trellis.exit(old["b"], KILL)
        await wait_restarted(sup, "c", old["c"])
        await settle()
        assert sup.alive
        trellis.exit(rec.pids["a"], KILL)
        assert await joined(sup) == SHUTDOWN
    finally:
        await stop(sup)


async def test_intensity_counted_per_supervisor_not_per_child(clock: Any) -> None:
    """SPEC 41, 43: restarts of different children share one window: intensity 1 with one
    crash each of a and b makes the supervisor give up."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a"), spec(rec, "b")], intensity=1)
    try:
        old = rec.pids["a"]
        trellis.exit(old, KILL)
        await wait_restarted(sup, "a", old)
        trellis.exit(rec.pids["b"], KILL)
        assert await joined(sup) == SHUTDOWN
        assert rec.count("start", "b") == 1
    finally:
        await stop(sup)


async def test_giving_up_terminates_rest_and_exits_shutdown(
    clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """SPEC 42: on giving up the restart is not done; the remaining children are terminated
    in reverse start order, the supervisor exits SHUTDOWN, logs
    reached_max_restart_intensity and emits supervisor.gave_up."""
    caplog.set_level(logging.DEBUG, logger="trellis")
    rec = Rec()
    with capture_telemetry() as cap:
        sup = await Supervisor.start_link([spec(rec, n) for n in "abc"], intensity=0)
        try:
            rec.log.clear()
            trellis.exit(rec.pids["b"], KILL)
            assert await joined(sup) == SHUTDOWN
            assert rec.log == [("terminate", "c"), ("terminate", "a")]
            assert rec.reasons == {"a": [SHUTDOWN], "c": [SHUTDOWN]}
            assert reports(caplog, "reached_max_restart_intensity", logging.WARNING)
            await cap.wait_for("supervisor.gave_up")
        finally:
            await stop(sup)


@pytest.mark.parametrize("n", [0, 1, 3])
async def test_intensity_n_allows_exactly_n_restarts(clock: Any, n: int) -> None:
    """SPEC 43: intensity=N allows exactly N restarts in the window; failure N+1 makes the
    supervisor exit SHUTDOWN (intensity 0: the first failure)."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a")], intensity=n, period=5.0)
    try:
        for _ in range(n):
            old = rec.pids["a"]
            trellis.exit(old, KILL)
            await wait_restarted(sup, "a", old)
        assert sup.alive
        trellis.exit(rec.pids["a"], KILL)
        assert await joined(sup) == SHUTDOWN
        assert rec.count("start", "a") == n + 1
    finally:
        await stop(sup)


@pytest.mark.parametrize(
    ("gap", "gives_up"), [(0.0, True), (4.0, True), (5.0, True), (5.001, False), (9.0, False)]
)
async def test_window_is_inclusive(clock: Any, gap: float, gives_up: bool) -> None:
    """SPEC 44: a restart at T still counts at Now iff T >= Now - period: with intensity 1
    and period 5, a second crash 5.0 s later gives up, one 5.001 s later does not."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a")], intensity=1, period=5.0)
    try:
        old = rec.pids["a"]
        trellis.exit(old, KILL)
        await wait_restarted(sup, "a", old)
        await clock.advance(gap)
        old = rec.pids["a"]
        trellis.exit(old, KILL)
        if gives_up:
            assert await joined(sup) == SHUTDOWN
        else:
            await wait_restarted(sup, "a", old)
            await settle()
            assert sup.alive
    finally:
        await stop(sup)


async def test_spaced_failures_never_accumulate(clock: Any) -> None:
    """SPEC 44: intensity 2, period 5: crashes every 3 s never leave more than 2 restarts in
    the window (survives 6 crashes); crashes at 0, 2.5 and 5 give up on the third."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a")], intensity=2, period=5.0)
    try:
        for _ in range(6):
            old = rec.pids["a"]
            trellis.exit(old, KILL)
            await wait_restarted(sup, "a", old)
            await clock.advance(3.0)
        await clock.advance(100.0)
        for i in range(3):
            if i:
                await clock.advance(2.5)
            old = rec.pids["a"]
            trellis.exit(old, KILL)
            if i < 2:
                await wait_restarted(sup, "a", old)
        assert await joined(sup) == SHUTDOWN
    finally:
        await stop(sup)


@pytest.mark.parametrize(("fails", "survives"), [(1, True), (2, True), (3, False), (10, False)])
async def test_every_failed_restart_attempt_counts(clock: Any, fails: int, survives: bool) -> None:
    """SPEC 45: a failed restart is retried, and every attempt counts as a restart: with
    intensity 3 a start failing twice then succeeding survives (3 restarts), one failing 3+
    times gives up after exactly 3 attempts, with no backoff needed."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a"), spec(rec, "b")], intensity=3)
    try:
        rec.log.clear()
        rec.fail["a"] = fails
        old = rec.pids["a"]
        trellis.exit(old, KILL)
        if survives:
            await wait_restarted(sup, "a", old)
            assert rec.log == [("start_failed", "a")] * fails + [("start", "a")]
            # restarts used: fails + 1; whatever remains of 3 is still available
            for _ in range(3 - (fails + 1)):
                old = rec.pids["a"]
                trellis.exit(old, KILL)
                await wait_restarted(sup, "a", old)
            assert sup.alive
            trellis.exit(rec.pids["a"], KILL)
            assert await joined(sup) == SHUTDOWN
        else:
            assert await joined(sup) == SHUTDOWN
            assert rec.log[:3] == [("start_failed", "a")] * 3
            assert rec.log[3:] == [("terminate", "b")]
    finally:
        await stop(sup)


@pytest.mark.parametrize(("intensity", "survives"), [(1, False), (2, True)])
async def test_group_restart_retry_counts(clock: Any, intensity: int, survives: bool) -> None:
    """SPEC 39, 45: a one_for_all restart whose first round fails counts twice (incident +
    retry): intensity 1 gives up, intensity 2 completes the restart."""
    rec = Rec()
    sup = await _four(rec, "one_for_all", intensity=intensity)
    try:
        rec.fail["c"] = 1
        old = dict(rec.pids)
        trellis.exit(old["a"], KILL)
        if survives:
            await wait_restarted(sup, "d", old["d"])
            await settle()
            assert sup.alive
        else:
            assert await joined(sup) == SHUTDOWN
            assert rec.count("start", "d") == 0
    finally:
        await stop(sup)


async def test_restarting_child_admin_calls(clock: Any) -> None:
    """SPEC 45, 46, 24: during a restart retry loop calls are still served; which_children
    shows RESTARTING; restart_child/delete_child raise Restarting; start_child of the id
    raises AlreadyPresent; count_children counts it in specs/workers, not active;
    terminate_child stops the retries and leaves pid None."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a"), spec(rec, "b")], intensity=10**6)
    try:
        b = rec.pids["b"]
        rec.fail["a"] = 10**9
        trellis.exit(rec.pids["a"], KILL)
        await poll(lambda: pids(sup), lambda p: p["a"] == trellis.RESTARTING)
        (info,) = [c for c in await sup.which_children() if c.id == "a"]
        assert info.pid == trellis.RESTARTING
        with pytest.raises(trellis.Restarting):
            await sup.restart_child("a")
        with pytest.raises(trellis.Restarting):
            await sup.delete_child("a")
        with pytest.raises(trellis.AlreadyPresent):
            await sup.start_child(spec(rec, "a"))
        counts = await sup.count_children()
        assert (counts.specs, counts.active, counts.supervisors, counts.workers) == (2, 1, 0, 2)
        assert rec.count("start_failed", "a") >= 1
        await sup.terminate_child("a")
        assert await pids(sup) == {"a": None, "b": b}
        attempts = rec.count("start_failed", "a")
        await settle(100)
        assert rec.count("start_failed", "a") == attempts
        assert await pids(sup) == {"a": None, "b": b}
        rec.fail["a"] = 0
        new = await sup.restart_child("a")
        assert isinstance(new, trellis.Pid)
        assert new.alive
    finally:
        await stop(sup)


async def test_count_children_during_retry_loop_with_supervisor_child(clock: Any) -> None:
    """SPEC 46: count_children during a retry loop: the restarting child counts in specs and
    in its type (supervisors here), not in active."""
    rec = Rec()
    inner_fail = {"n": 0}

    async def start_inner() -> trellis.Pid:
        if inner_fail["n"]:
            await asyncio.sleep(0)
            raise RuntimeError("inner refuses")
        return await Supervisor.start_link([spec(rec, "w")])

    specs = [ChildSpec("inner", start_inner, type="supervisor"), spec(rec, "b")]
    sup = await Supervisor.start_link(specs, intensity=10**6)
    try:
        inner = (await pids(sup))["inner"]
        inner_fail["n"] = 1
        trellis.exit(inner, KILL)
        await poll(lambda: pids(sup), lambda p: p["inner"] == trellis.RESTARTING)
        counts = await sup.count_children()
        assert (counts.specs, counts.active, counts.supervisors, counts.workers) == (2, 1, 1, 1)
        await sup.terminate_child("inner")
    finally:
        await stop(sup)
        for p in list(rec.pids.values()):
            if p.alive:
                trellis.exit(p, KILL)


@pytest.mark.parametrize(
    "strategy", ["one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one", "dynamic"]
)
async def test_shutdown_during_restart_loop_completes(clock: Any, strategy: str) -> None:
    """SPEC 47: stopping a supervisor while a child's restart keeps failing completes (no
    hang); the supervisor exits with the stop reason and the other children are terminated."""
    rec = Rec()
    if strategy == "simple_one_for_one":
        sup = await Supervisor.start_link([spec(rec, "a")], strategy=strategy, intensity=10**6)
        await sup.start_child([])
    elif strategy == "dynamic":
        sup = await trellis.DynamicSupervisor.start_link(intensity=10**6)
        await sup.start_child(spec(rec, "a"))
    else:
        sup = await Supervisor.start_link(
            [spec(rec, "b"), spec(rec, "a")], strategy=strategy, intensity=10**6
        )
    try:
        rec.fail["a"] = 10**9
        trellis.exit(rec.pids["a"], KILL)
        await poll(lambda: asyncio.sleep(0, rec.count("start_failed", "a")), lambda n: n >= 3)
        reason = Shutdown("operator")
        await asyncio.wait_for(sup.stop(reason), 5)
        assert await joined(sup) == reason
        assert not any(p.alive for p in rec.pids.values())
    finally:
        await stop(sup)


def _inner_spec(rec: Rec, restart: str, inner: list[trellis.Pid]) -> ChildSpec:
    async def start_inner() -> trellis.Pid:
        pid = await Supervisor.start_link([spec(rec, "w")], intensity=0)
        inner.append(pid)
        return pid

    return ChildSpec("inner", start_inner, type="supervisor", restart=restart)


async def test_escalation_restarts_permanent_child_supervisor_fresh(clock: Any) -> None:
    """SPEC 48: a child supervisor that gives up exits SHUTDOWN; its permanent parent
    restarts it with fresh children, and that restart counts against the parent's intensity
    (intensity 1: the second escalation makes the parent give up too)."""
    rec = Rec()
    inner: list[trellis.Pid] = []
    with capture_telemetry() as cap:
        top = await Supervisor.start_link([_inner_spec(rec, "permanent", inner)], intensity=1)
        try:
            first, w1 = inner[0], rec.pids["w"]
            trellis.exit(w1, KILL)
            assert await joined(first) == SHUTDOWN
            ev = await cap.wait_for("child.exited", child_id="inner")
            assert ev["reason"] == SHUTDOWN
            second = await wait_restarted(top, "inner", first)
            assert second == inner[1]
            assert second.alive
            w2 = rec.pids["w"]
            assert w2 != w1
            assert w2.alive
            assert rec.log == [("start", "w"), ("start", "w")]
            trellis.exit(w2, KILL)
            assert await joined(second) == SHUTDOWN
            assert await joined(top) == SHUTDOWN
            assert len(inner) == 2
        finally:
            await stop(top)


async def test_transient_child_supervisor_not_restarted_after_giving_up(clock: Any) -> None:
    """SPEC 49: a transient child supervisor that gave up (reason SHUTDOWN, a clean reason)
    is not restarted, and nothing is counted (parent with intensity 0 keeps running)."""
    rec = Rec()
    inner: list[trellis.Pid] = []
    top = await Supervisor.start_link([_inner_spec(rec, "transient", inner)], intensity=0)
    try:
        trellis.exit(rec.pids["w"], KILL)
        assert await joined(inner[0]) == SHUTDOWN
        await settle()
        assert await pids(top) == {"inner": None}
        assert top.alive
        assert len(inner) == 1
    finally:
        await stop(top)


async def test_manual_operations_never_count(clock: Any) -> None:
    """SPEC 50: terminate_child, restart_child, delete_child and start_child never count
    toward intensity: after many of them, intensity 1 still allows one automatic restart."""
    rec = Rec()
    sup = await Supervisor.start_link([spec(rec, "a"), spec(rec, "b")], intensity=1)
    try:
        for _ in range(3):
            await sup.terminate_child("a")
            await sup.restart_child("a")
            await sup.terminate_child("b")
            await sup.delete_child("b")
            await sup.start_child(spec(rec, "b"))
        await settle()
        assert sup.alive
        old = rec.pids["a"]
        trellis.exit(old, KILL)
        await wait_restarted(sup, "a", old)
        await settle()
        assert sup.alive
        trellis.exit(rec.pids["b"], KILL)
        assert await joined(sup) == SHUTDOWN
    finally:
        await stop(sup)

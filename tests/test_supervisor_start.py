"""SPEC section B: start order, start-function returns and start failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import trellis
from _helpers import idle, settle

# ---------------------------------------------------------------------------
# helpers


async def start_idle(*args: Any, **kwargs: Any) -> trellis.Pid:
    return trellis.spawn(idle, link=True)


def plain(id: str, **extra: Any) -> dict[str, Any]:
    return {"id": id, "start": start_idle, **extra}


class Logged(trellis.Server):
    """A trap-exiting server that logs its start and its terminate reason."""

    trap_exits = True

    async def init(self, log: list[Any], name: str, pids: dict[str, Any] | None = None) -> None:
        self.log = log
        self.name = name
        log.append(("start", name))
        if pids is not None:
            pids[name] = self.pid

    async def terminate(self, reason: Any) -> None:
        self.log.append(("stop", self.name, reason))


def logged(log: list[Any], name: str, pids: dict[str, Any] | None = None, **kw: Any) -> Any:
    return Logged.child_spec(log, name, pids, id=name, **kw)


async def assert_no_processes() -> None:
    await settle()
    assert trellis.testing.live_processes() == []


async def ids_and_pids(sup: Any) -> list[tuple[Any, Any]]:
    return [(c.id, c.pid) for c in await sup.which_children()]


async def child_pid(sup: Any, child_id: Any) -> trellis.Pid:
    for c in await sup.which_children():
        if c.id == child_id:
            assert isinstance(c.pid, trellis.Pid)
            return c.pid
    raise AssertionError(f"no child {child_id!r}")


def is_error_value(exc: BaseException, value: Any) -> bool:
    """The start function returned the illegal value ``value``: error ``value``.

    Accepts the literal OTP mapping (reason == value) or a BadReturnValue(value).
    """
    reason = getattr(exc, "reason", None)
    if reason == value and not isinstance(reason, tuple):
        return True
    if isinstance(exc, trellis.BadReturnValue) and exc.value == value:
        return True
    return isinstance(reason, trellis.BadReturnValue) and reason.value == value


# ---------------------------------------------------------------------------
# SPEC 18: start order


async def test_init_children_start_one_at_a_time_in_list_order() -> None:
    """SPEC 18: each start function returns before the next one is called, in list order."""
    log: list[str] = []
    callers: list[trellis.Pid] = []

    def slow(name: str) -> dict[str, Any]:
        async def start() -> trellis.Pid:
            log.append(f"begin {name}")
            callers.append(trellis.self())
            await settle(5)
            pid = trellis.spawn(idle, link=True)
            log.append(f"end {name}")
            return pid

        return {"id": name, "start": start}

    sup = await trellis.Supervisor.start_link([slow("a"), slow("b"), slow("c")])
    try:
        assert log == ["begin a", "end a", "begin b", "end b", "begin c", "end c"]
        assert callers == [sup, sup, sup]  # start functions run in the supervisor process
        children = await ids_and_pids(sup)
        assert [i for i, _ in children] == ["c", "b", "a"]
        assert all(isinstance(p, trellis.Pid) and p.alive for _, p in children)
    finally:
        await sup.stop()
    await assert_no_processes()


async def test_server_children_init_in_order_and_stop_in_reverse() -> None:
    """SPEC 18: Server children run init in list order (stopped in reverse at shutdown)."""
    log: list[Any] = []
    sup = await trellis.Supervisor.start_link([logged(log, n) for n in ("a", "b", "c")])
    assert log == [("start", "a"), ("start", "b"), ("start", "c")]
    await sup.stop()
    assert log[3:] == [
        ("stop", "c", trellis.SHUTDOWN),
        ("stop", "b", trellis.SHUTDOWN),
        ("stop", "a", trellis.SHUTDOWN),
    ]
    await assert_no_processes()


# ---------------------------------------------------------------------------
# SPEC 19: start-function returns


async def test_sync_start_function_returning_pid() -> None:
    """SPEC 19: a plain (sync) start function returning a Pid is accepted."""

    def start_sync() -> trellis.Pid:
        return trellis.spawn(idle, link=True)

    sup = await trellis.Supervisor.start_link([{"id": "s", "start": start_sync}])
    try:
        pid = await child_pid(sup, "s")
        assert pid.alive
        pid2 = await sup.start_child({"id": "t", "start": start_sync})
        assert isinstance(pid2, trellis.Pid)
        assert pid2 != pid
    finally:
        await sup.stop()


async def test_pid_info_tuple_is_passed_through_by_start_child_and_restart_child() -> None:
    """SPEC 19: a (pid, info) return is accepted; start_child/restart_child return it as is."""
    infos: list[object] = []

    async def start_with_info() -> tuple[trellis.Pid, object]:
        info = object()
        infos.append(info)
        return trellis.spawn(idle, link=True), info

    spec = {"id": "i", "start": start_with_info}
    sup = await trellis.Supervisor.start_link([{"id": "init", "start": start_with_info}])
    try:
        assert isinstance(await child_pid(sup, "init"), trellis.Pid)
        result = await sup.start_child(spec)
        assert isinstance(result, tuple)
        pid, info = result
        assert isinstance(pid, trellis.Pid)
        assert info is infos[-1]
        assert await child_pid(sup, "i") == pid
        await sup.terminate_child("i")
        result2 = await sup.restart_child("i")
        assert isinstance(result2, tuple)
        pid2, info2 = result2
        assert info2 is infos[-1]
        assert info2 is not info
        assert pid2 != pid
        assert await child_pid(sup, "i") == pid2
    finally:
        await sup.stop()


async def test_start_function_exception_fails_init_with_that_exception() -> None:
    """SPEC 19/20: an exception from a start function is caught and is the failure reason."""
    err = RuntimeError("cannot start")

    async def broken() -> trellis.Pid:
        raise err

    with pytest.raises(trellis.FailedToStartChild) as ei:
        await trellis.Supervisor.start_link([{"id": "x", "start": broken}])
    assert ei.value.id == "x"
    assert ei.value.reason is err
    await assert_no_processes()


async def test_start_function_exception_in_start_child_raises_start_error() -> None:
    """SPEC 19/23: an exception from the start function makes start_child raise StartError."""
    err = KeyError("missing")

    def broken() -> trellis.Pid:
        raise err

    sup = await trellis.Supervisor.start_link([])
    try:
        with pytest.raises(trellis.StartError) as ei:
            await sup.start_child({"id": "x", "start": broken})
        assert ei.value.reason is err
        assert not isinstance(ei.value, trellis.AlreadyStarted)
        assert sup.alive
    finally:
        await sup.stop()


async def test_start_function_returning_other_value_is_an_error() -> None:
    """SPEC 19: a start function returning anything else (e.g. 42) counts as error 42."""

    async def weird() -> Any:
        return 42

    with pytest.raises(trellis.FailedToStartChild) as ei:
        await trellis.Supervisor.start_link([{"id": "w", "start": weird}])
    assert ei.value.id == "w"
    assert is_error_value(ei.value, 42), ei.value
    await assert_no_processes()

    sup = await trellis.Supervisor.start_link([])
    try:
        with pytest.raises(trellis.StartError) as ei2:
            await sup.start_child({"id": "w", "start": weird})
        assert is_error_value(ei2.value, 42), ei2.value
        assert await sup.which_children() == []
    finally:
        await sup.stop()


# ---------------------------------------------------------------------------
# SPEC 20: init start failure


async def test_init_failure_stops_started_children_in_reverse_and_skips_later_ones() -> None:
    """SPEC 20: when child c fails, b then a are terminated (shutdown specs), d never starts,
    and start_link raises FailedToStartChild(id="c")."""
    log: list[Any] = []
    pids: dict[str, Any] = {}
    err = RuntimeError("c fails")

    async def start_c() -> trellis.Pid:
        log.append(("start", "c"))
        raise err

    specs = [
        logged(log, "a", pids),
        logged(log, "b", pids),
        {"id": "c", "start": start_c},
        logged(log, "d", pids),
    ]
    with pytest.raises(trellis.FailedToStartChild) as ei:
        await trellis.Supervisor.start_link(specs)
    assert ei.value.id == "c"
    assert ei.value.reason is err
    assert isinstance(ei.value, trellis.StartError)
    assert log == [
        ("start", "a"),
        ("start", "b"),
        ("start", "c"),
        ("stop", "b", trellis.SHUTDOWN),
        ("stop", "a", trellis.SHUTDOWN),
    ]
    assert set(pids) == {"a", "b"}
    assert pids["a"].reason == trellis.SHUTDOWN
    assert pids["b"].reason == trellis.SHUTDOWN
    await assert_no_processes()


async def test_init_failure_uses_each_childs_shutdown_spec() -> None:
    """SPEC 20: the rollback uses the shutdown specs: brutal_kill kills without terminate."""
    log: list[Any] = []
    pids: dict[str, Any] = {}

    async def start_c() -> trellis.Pid:
        raise RuntimeError("c fails")

    specs = [
        logged(log, "a", pids),
        logged(log, "b", pids, shutdown="brutal_kill"),
        {"id": "c", "start": start_c},
    ]
    with pytest.raises(trellis.FailedToStartChild):
        await trellis.Supervisor.start_link(specs)
    assert log == [("start", "a"), ("start", "b"), ("stop", "a", trellis.SHUTDOWN)]
    assert pids["b"].reason == trellis.KILLED
    assert pids["a"].reason == trellis.SHUTDOWN
    await assert_no_processes()


async def test_init_failure_rollback_waits_shutdown_timeout_then_kills(
    clock: trellis.testing.VirtualClock,
) -> None:
    """SPEC 20: rollback honours a numeric shutdown: a child ignoring the shutdown signal is
    killed only after its shutdown seconds, then earlier children are stopped."""
    log: list[Any] = []
    pids: dict[str, Any] = {}

    async def stubborn() -> None:
        while True:
            msg = await trellis.receive()
            log.append(("b got", msg.reason if isinstance(msg, trellis.Exit) else msg))

    async def start_b() -> trellis.Pid:
        pids["b"] = trellis.spawn(stubborn, link=True, trap_exits=True)
        return pids["b"]

    async def start_c() -> trellis.Pid:
        raise RuntimeError("c fails")

    task = asyncio.ensure_future(
        trellis.Supervisor.start_link(
            [
                logged(log, "a", pids),
                {"id": "b", "start": start_b, "shutdown": 2.0},
                {"id": "c", "start": start_c},
            ]
        )
    )
    await settle()
    await clock.advance(1.9)
    assert not task.done()
    assert pids["b"].alive
    assert log == [("start", "a"), ("b got", trellis.SHUTDOWN)]
    await clock.advance(0.1)
    await settle()
    with pytest.raises(trellis.FailedToStartChild) as ei:
        async with asyncio.timeout(5):
            await task
    assert ei.value.id == "c"
    assert pids["b"].reason == trellis.KILLED
    assert log == [("start", "a"), ("b got", trellis.SHUTDOWN), ("stop", "a", trellis.SHUTDOWN)]
    await assert_no_processes()


async def test_init_failure_of_first_child_starts_nothing_else() -> None:
    """SPEC 20: if the first child fails, nothing else is started or stopped."""
    log: list[Any] = []

    async def start_a() -> trellis.Pid:
        raise ValueError("no")

    with pytest.raises(trellis.FailedToStartChild) as ei:
        await trellis.Supervisor.start_link(
            [{"id": "a", "start": start_a}, logged(log, "b"), logged(log, "c")]
        )
    assert ei.value.id == "a"
    assert log == []
    await assert_no_processes()


# ---------------------------------------------------------------------------
# SPEC 21: ignore during init


@pytest.mark.parametrize("restart", ["permanent", "transient"])
async def test_ignored_non_temporary_child_is_kept_without_pid(restart: str) -> None:
    """SPEC 21: a non-temporary child whose start returns IGNORE is kept with pid None."""

    async def ignoring() -> Any:
        return trellis.IGNORE

    sup = await trellis.Supervisor.start_link(
        [plain("a"), {"id": "b", "start": ignoring, "restart": restart}, plain("c")]
    )
    try:
        children = await ids_and_pids(sup)
        assert [i for i, _ in children] == ["c", "b", "a"]
        assert children[1][1] is None
        assert isinstance(children[0][1], trellis.Pid)
        assert isinstance(children[2][1], trellis.Pid)
        counts = await sup.count_children()
        assert counts.specs == 3
        assert counts.active == 2
        assert counts.workers == 3
        spec = await sup.get_childspec("b")
        assert spec.id == "b"
    finally:
        await sup.stop()


class InitMode(trellis.Server):
    async def init(self, mode: str) -> Any:
        if mode == "ignore":
            return trellis.IGNORE
        if mode == "raise":
            raise RuntimeError("server init failed")
        return None


async def test_server_child_whose_init_ignores_is_kept_without_pid() -> None:
    """SPEC 21: a Server child whose init returns IGNORE is kept (not temporary), pid None."""
    sup = await trellis.Supervisor.start_link(
        [InitMode.child_spec("ok", id="a"), InitMode.child_spec("ignore", id="b")]
    )
    try:
        children = await ids_and_pids(sup)
        assert [i for i, _ in children] == ["b", "a"]
        assert children[0][1] is None
        assert isinstance(children[1][1], trellis.Pid)
    finally:
        await sup.stop()
    await assert_no_processes()


async def test_server_child_whose_init_raises_fails_supervisor_start() -> None:
    """SPEC 20: a Server child whose init raises is a child start failure; earlier children
    are stopped and start_link raises FailedToStartChild naming it."""
    log: list[Any] = []
    with pytest.raises(trellis.FailedToStartChild) as ei:
        await trellis.Supervisor.start_link(
            [logged(log, "a"), InitMode.child_spec("raise", id="bad"), logged(log, "c")]
        )
    assert ei.value.id == "bad"
    assert log == [("start", "a"), ("stop", "a", trellis.SHUTDOWN)]
    await assert_no_processes()


async def test_ignored_temporary_child_is_dropped() -> None:
    """SPEC 21: a temporary child whose start returns IGNORE is not kept at all."""

    async def ignoring() -> Any:
        return trellis.IGNORE

    sup = await trellis.Supervisor.start_link(
        [plain("a"), {"id": "t", "start": ignoring, "restart": "temporary"}]
    )
    try:
        assert [i for i, _ in await ids_and_pids(sup)] == ["a"]
        counts = await sup.count_children()
        assert counts.specs == 1
        assert counts.active == 1
        with pytest.raises(trellis.NotFound):
            await sup.get_childspec("t")
    finally:
        await sup.stop()


# ---------------------------------------------------------------------------
# SPEC 22: start_child


async def test_start_child_appends_and_is_terminated_first() -> None:
    """SPEC 22: start_child appends at the end of the start order, so it is stopped first."""
    log: list[Any] = []
    sup = await trellis.Supervisor.start_link([logged(log, "a"), logged(log, "b")])
    pid = await sup.start_child(logged(log, "c"))
    assert isinstance(pid, trellis.Pid)
    assert await child_pid(sup, "c") == pid
    assert [c.id for c in await sup.which_children()] == ["c", "b", "a"]
    await sup.stop()
    assert log == [
        ("start", "a"),
        ("start", "b"),
        ("start", "c"),
        ("stop", "c", trellis.SHUTDOWN),
        ("stop", "b", trellis.SHUTDOWN),
        ("stop", "a", trellis.SHUTDOWN),
    ]
    await assert_no_processes()


async def test_start_child_ignore_keeps_non_temporary_spec() -> None:
    """SPEC 22: start_child whose start returns IGNORE returns IGNORE; the spec is kept."""

    async def ignoring() -> Any:
        return trellis.IGNORE

    sup = await trellis.Supervisor.start_link([plain("a")])
    try:
        assert await sup.start_child({"id": "g", "start": ignoring}) is trellis.IGNORE
        assert [(i, p) for i, p in await ids_and_pids(sup) if i == "g"] == [("g", None)]
        assert (await sup.count_children()).specs == 2
        with pytest.raises(trellis.AlreadyPresent):
            await sup.start_child({"id": "g", "start": ignoring})
    finally:
        await sup.stop()


async def test_start_child_ignore_drops_temporary_spec() -> None:
    """SPEC 22: a temporary start_child returning IGNORE stores nothing; the id stays free."""
    calls: list[str] = []

    async def ignoring() -> Any:
        calls.append("ignored")
        return trellis.IGNORE

    sup = await trellis.Supervisor.start_link([plain("a")])
    try:
        spec = {"id": "t", "start": ignoring, "restart": "temporary"}
        assert await sup.start_child(spec) is trellis.IGNORE
        assert [i for i, _ in await ids_and_pids(sup)] == ["a"]
        with pytest.raises(trellis.NotFound):
            await sup.get_childspec("t")
        assert await sup.start_child(spec) is trellis.IGNORE
        assert calls == ["ignored", "ignored"]
        pid = await sup.start_child(plain("t", restart="temporary"))
        assert isinstance(pid, trellis.Pid)
    finally:
        await sup.stop()


# ---------------------------------------------------------------------------
# SPEC 23: start_child failure


async def test_start_child_failure_stores_nothing() -> None:
    """SPEC 23: a failed start_child raises StartError and stores nothing."""
    err = RuntimeError("nope")
    fail = {"on": True}

    async def flaky() -> trellis.Pid:
        if fail["on"]:
            raise err
        return trellis.spawn(idle, link=True)

    sup = await trellis.Supervisor.start_link([plain("a")])
    try:
        before = await sup.which_children()
        counts = await sup.count_children()
        with pytest.raises(trellis.StartError) as ei:
            await sup.start_child({"id": "f", "start": flaky})
        assert ei.value.reason is err
        assert await sup.which_children() == before
        assert await sup.count_children() == counts
        with pytest.raises(trellis.NotFound):
            await sup.get_childspec("f")
        with pytest.raises(trellis.NotFound):
            await sup.restart_child("f")
        fail["on"] = False
        pid = await sup.start_child({"id": "f", "start": flaky})  # not AlreadyPresent
        assert isinstance(pid, trellis.Pid)
    finally:
        await sup.stop()


# ---------------------------------------------------------------------------
# SPEC 24: existing ids


async def test_start_child_with_running_id_raises_already_started() -> None:
    """SPEC 24: start_child with the id of a running child raises AlreadyStarted(pid)."""
    started: list[str] = []

    async def counting() -> trellis.Pid:
        started.append("x")
        return trellis.spawn(idle, link=True)

    sup = await trellis.Supervisor.start_link([{"id": "a", "start": counting}])
    try:
        pid = await child_pid(sup, "a")
        with pytest.raises(trellis.AlreadyStarted) as ei:
            await sup.start_child({"id": "a", "start": counting})
        assert ei.value.pid == pid
        assert started == ["x"]
        assert await ids_and_pids(sup) == [("a", pid)]
    finally:
        await sup.stop()


async def test_start_child_with_stopped_id_raises_already_present() -> None:
    """SPEC 24: start_child with the id of a terminated (not running) child: AlreadyPresent."""
    sup = await trellis.Supervisor.start_link([plain("a")])
    try:
        await sup.terminate_child("a")
        assert await ids_and_pids(sup) == [("a", None)]
        with pytest.raises(trellis.AlreadyPresent):
            await sup.start_child(plain("a"))
        assert await ids_and_pids(sup) == [("a", None)]
    finally:
        await sup.stop()


async def test_start_child_with_restarting_id_raises_already_present(
    clock: trellis.testing.VirtualClock,
) -> None:
    """SPEC 24: start_child with the id of a child whose restart is being retried:
    AlreadyPresent."""
    fail = {"on": False}

    async def flaky() -> trellis.Pid:
        if fail["on"]:
            raise RuntimeError("restart fails")
        return trellis.spawn(idle, link=True)

    spec = {"id": "f", "start": flaky}
    sup = await trellis.Supervisor.start_link([spec], intensity=1000, period=5.0)
    try:
        pid = await child_pid(sup, "f")
        with trellis.testing.capture_telemetry() as cap:
            fail["on"] = True
            trellis.exit(pid, RuntimeError("crash"))
            async with asyncio.timeout(5):
                await cap.wait_for("child.start_failed", child_id="f")
        with pytest.raises(trellis.AlreadyPresent):
            await sup.start_child(spec)
        fail["on"] = False
        async with asyncio.timeout(5):
            new = await trellis.testing.wait_restarted(sup, "f", pid)
        assert new != pid
        assert new.alive
    finally:
        await sup.stop()


# ---------------------------------------------------------------------------
# SPEC 25: already_started from the start function


class Named(trellis.Server):
    async def init(self) -> None:
        return None


async def test_already_started_from_start_function_surfaces_unwrapped() -> None:
    """SPEC 25: a start function failing with AlreadyStarted(p) (a name clash) makes
    start_child raise AlreadyStarted(p) itself, not wrapped; nothing is stored."""
    outside = await Named.start(name="b25-clash")
    assert isinstance(outside, trellis.Pid)
    sup = await trellis.Supervisor.start_link([])
    try:
        with pytest.raises(trellis.AlreadyStarted) as ei:
            await sup.start_child(Named.child_spec(id="n", name="b25-clash"))
        assert type(ei.value) is trellis.AlreadyStarted
        assert ei.value.pid == outside
        assert await sup.which_children() == []
        with pytest.raises(trellis.NotFound):
            await sup.get_childspec("n")
        assert outside.alive
    finally:
        await sup.stop()
        await trellis.stop(outside)
    await assert_no_processes()


async def test_already_started_during_init_fails_the_child() -> None:
    """SPEC 20/25: during init a name clash is a child start failure naming the live pid."""
    outside = await Named.start(name="b25-clash-init")
    try:
        with pytest.raises(trellis.FailedToStartChild) as ei:
            await trellis.Supervisor.start_link([Named.child_spec(id="n", name="b25-clash-init")])
        assert ei.value.id == "n"
        reason = ei.value.reason
        assert (isinstance(reason, trellis.AlreadyStarted) and reason.pid == outside) or (
            reason == ("already_started", outside)
        ), reason
        assert outside.alive
    finally:
        await trellis.stop(outside)
    await assert_no_processes()

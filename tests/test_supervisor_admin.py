"""Supervisor administration API (SPEC G, 60-71) and significant children (SPEC H, 72-79)."""

from __future__ import annotations

import asyncio
import enum
from typing import Any

import pytest

import trellis
from trellis.testing import capture_telemetry, wait_restarted

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class Boom(Exception):
    """A crash reason."""


INFO = {"info": "passed through"}


async def _idle() -> None:
    """A child body: idles until it is told "normal", then returns (exit NORMAL)."""
    while True:
        msg = await trellis.receive()
        if msg == "normal":
            return


def start_idle(*_args: Any) -> trellis.Pid:
    """Start function: spawn an idle process linked to the caller (the supervisor)."""
    return trellis.spawn(_idle, link=True)


def start_ignore(*_args: Any) -> Any:
    return trellis.IGNORE


async def start_subsup(*_args: Any) -> trellis.Pid:
    return await trellis.Supervisor.start_link([])


class Script:
    """A start function whose successive calls follow ``steps``.

    A step is "pid", "info" (returns ``(pid, INFO)``), "ignore", or an exception to
    raise; once the steps run out every call starts an idle process. Calls and their
    arguments are recorded.
    """

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        step = self.steps.pop(0) if self.steps else "pid"
        if isinstance(step, BaseException):
            raise step
        if step == "ignore":
            return trellis.IGNORE
        pid = trellis.spawn(_idle, link=True)
        if step == "info":
            return (pid, INFO)
        return pid


class Flaky:
    """An async start function that fails while ``fail`` is set (yielding once per call)."""

    def __init__(self) -> None:
        self.fail = False
        self.calls = 0

    async def __call__(self, *_args: Any) -> trellis.Pid:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail:
            raise Boom("cannot start")
        return trellis.spawn(_idle, link=True)


class Recorder(trellis.Server):
    """A trapping server that records its name and reason when it terminates."""

    trap_exits = True

    async def init(self, name: str, log: list[tuple[str, Any]]) -> None:
        self.name = name
        self.log = log

    async def terminate(self, reason: Any) -> None:
        self.log.append((self.name, reason))


def spec(id: Any, start: Any = start_idle, **kw: Any) -> trellis.ChildSpec:
    return trellis.ChildSpec(id, start, **kw)


def val(x: Any) -> Any:
    return x.value if isinstance(x, enum.Enum) else x


def counts(c: Any) -> tuple[int, int, int, int]:
    return (c.specs, c.active, c.supervisors, c.workers)


def make_exit(pid: trellis.Pid, how: Any) -> None:
    """End ``pid``: "normal" makes it return; "boom" crashes it; anything else is a signal."""
    if how == "normal":
        pid.send("normal")
    elif how == "boom":
        trellis.exit(pid, Boom("crash"))
    else:
        trellis.exit(pid, how)


async def join(pid: trellis.Pid, timeout: float = 5.0) -> Any:
    """Wait (bounded in real time) for ``pid`` to end; return its reason."""
    return await asyncio.wait_for(pid.join(), timeout)


async def stop_quietly(*pids: Any) -> None:
    for pid in pids:
        if pid is None or not pid.alive:
            continue
        try:
            if hasattr(pid, "stop"):
                await pid.stop()
            else:
                trellis.exit(pid, trellis.KILL)
                await join(pid)
        except trellis.NoProc:
            pass


async def pid_of(sup: Any, id: Any) -> Any:
    return (await sup.which_child(id)).pid


# ---------------------------------------------------------------------------
# G. which_children / which_child / count_children
# ---------------------------------------------------------------------------


async def test_which_children_newest_first_with_pid_or_none() -> None:
    """SPEC 60: which_children lists (id, child, type, modules) newest started first; a child
    whose start returned IGNORE shows pid None."""
    sup = await trellis.Supervisor.start_link([spec("a"), spec("ign", start_ignore), spec("b")])
    try:
        c = await sup.start_child(spec("c"))
        infos = await sup.which_children()
        assert [i.id for i in infos] == ["c", "b", "ign", "a"]
        assert infos[0].pid == c
        for info in (infos[0], infos[1], infos[3]):
            assert isinstance(info.pid, trellis.Pid)
            assert info.pid.alive
        assert infos[2].pid is None
        assert len({infos[0].pid, infos[1].pid, infos[3].pid}) == 3
        assert all(val(i.type) == "worker" for i in infos)
        assert tuple(infos[0].modules) == (start_idle.__module__,)
        assert tuple(infos[2].modules) == (start_ignore.__module__,)
    finally:
        await stop_quietly(sup)


async def test_restarting_child_admin() -> None:
    """SPEC 46, 60, 65, 66: a child whose restart keeps failing shows RESTARTING in
    which_children; restart_child/delete_child raise Restarting; count_children counts it in
    specs/workers but not active; terminate_child stops the retries and the pid becomes None."""
    flaky = Flaky()
    sup = await trellis.Supervisor.start_link(
        [spec("a", flaky), spec("b")], intensity=100_000, period=5.0
    )
    try:
        with capture_telemetry() as cap:
            old = await pid_of(sup, "a")
            flaky.fail = True
            trellis.exit(old, Boom("crash"))
            await cap.wait_for("child.start_failed", child_id="a")
            infos = await sup.which_children()
            assert [i.id for i in infos] == ["b", "a"]
            assert infos[1].pid == trellis.RESTARTING
            assert (await sup.which_child("a")).pid == trellis.RESTARTING
            with pytest.raises(trellis.Restarting):
                await sup.restart_child("a")
            with pytest.raises(trellis.Restarting):
                await sup.delete_child("a")
            assert counts(await sup.count_children()) == (2, 1, 0, 2)
            assert await sup.terminate_child("a") is None
            assert (await sup.which_child("a")).pid is None
            calls = flaky.calls
            for _ in range(50):
                await asyncio.sleep(0)
            assert flaky.calls == calls, "retries went on after terminate_child"
            flaky.fail = False
            new = await sup.restart_child("a")
            assert isinstance(new, trellis.Pid)
            assert new.alive
            assert (await sup.which_child("a")).pid == new
    finally:
        await stop_quietly(sup)


async def test_simple_one_for_one_which_children_ids_are_none() -> None:
    """SPEC 61: simple_one_for_one which_children reports id None for every dynamic child."""
    sup = await trellis.Supervisor.start_link([spec("tmpl")], strategy="simple_one_for_one")
    try:
        p1 = await sup.start_child([])
        p2 = await sup.start_child([])
        infos = await sup.which_children()
        assert [i.id for i in infos] == [None, None]
        assert {i.pid for i in infos} == {p1, p2}
        assert all(val(i.type) == "worker" for i in infos)
    finally:
        await stop_quietly(sup)


async def test_count_children_fields() -> None:
    """SPEC 62: count_children: specs = number of specs, active = children with a live pid,
    supervisors/workers counted by spec type whether running or not."""
    sup = await trellis.Supervisor.start_link(
        [
            spec("w1"),
            spec("ign", start_ignore),
            spec("sub", start_subsup, type="supervisor"),
        ]
    )
    try:
        assert counts(await sup.count_children()) == (3, 2, 1, 2)
        await sup.terminate_child("sub")
        assert counts(await sup.count_children()) == (3, 1, 1, 2)
        await sup.start_child(spec("w2"))
        assert counts(await sup.count_children()) == (4, 2, 1, 3)
    finally:
        await stop_quietly(sup)


async def test_simple_one_for_one_count_children() -> None:
    """SPEC 63: simple_one_for_one: specs is always 1, active and workers are the number of
    dynamic children (supervisors for a supervisor template)."""
    sup = await trellis.Supervisor.start_link([spec("tmpl")], strategy="simple_one_for_one")
    subs = await trellis.Supervisor.start_link(
        [spec("tmpl", start_subsup, type="supervisor")], strategy="simple_one_for_one"
    )
    try:
        assert counts(await sup.count_children()) == (1, 0, 0, 0)
        for _ in range(3):
            await sup.start_child([])
        assert counts(await sup.count_children()) == (1, 3, 0, 3)
        for _ in range(2):
            await subs.start_child([])
        assert counts(await subs.count_children()) == (1, 2, 2, 0)
    finally:
        await stop_quietly(sup, subs)


async def test_simple_one_for_one_count_children_restarting() -> None:
    """SPEC 46, 63: a simple_one_for_one child whose restart is failing counts in workers
    but not in active."""
    flaky = Flaky()
    sup = await trellis.Supervisor.start_link(
        [spec("tmpl", flaky)], strategy="simple_one_for_one", intensity=100_000
    )
    try:
        with capture_telemetry() as cap:
            p1 = await sup.start_child([])
            await sup.start_child([])
            flaky.fail = True
            trellis.exit(p1, Boom("crash"))
            await cap.wait_for("child.start_failed")
            assert counts(await sup.count_children()) == (1, 1, 0, 2)
            infos = await sup.which_children()
            assert sum(i.pid == trellis.RESTARTING for i in infos) == 1
            flaky.fail = False
            await cap.wait_for("child.restarted")
            assert counts(await sup.count_children()) == (1, 2, 0, 2)
    finally:
        await stop_quietly(sup)


async def test_which_child() -> None:
    """SPEC 71: which_child(id) returns the ChildInfo of that child; NotFound otherwise."""
    sup = await trellis.Supervisor.start_link([spec("a"), spec("ign", start_ignore)])
    try:
        a = await sup.which_child("a")
        assert a.id == "a"
        assert isinstance(a.pid, trellis.Pid)
        assert a.pid.alive
        assert val(a.type) == "worker"
        assert tuple(a.modules) == (start_idle.__module__,)
        assert a in await sup.which_children()
        assert (await sup.which_child("ign")).pid is None
        with pytest.raises(trellis.NotFound):
            await sup.which_child("nope")
    finally:
        await stop_quietly(sup)


async def test_which_child_simple_one_for_one() -> None:
    """SPEC 71: simple_one_for_one which_child takes a pid (id None in the result),
    NotFound for a pid that is not a child, SimpleOneForOne for a non-pid."""
    sup = await trellis.Supervisor.start_link([spec("tmpl")], strategy="simple_one_for_one")
    stranger = trellis.spawn(_idle)
    try:
        p = await sup.start_child([])
        info = await sup.which_child(p)
        assert (info.id, info.pid) == (None, p)
        with pytest.raises(trellis.NotFound):
            await sup.which_child(stranger)
        with pytest.raises(trellis.SimpleOneForOne):
            await sup.which_child("tmpl")
    finally:
        await stop_quietly(sup, stranger)


# ---------------------------------------------------------------------------
# G. terminate_child / restart_child / delete_child (static)
# ---------------------------------------------------------------------------


async def test_terminate_child_keeps_spec() -> None:
    """SPEC 64: terminate_child stops the child (shutdown signal), keeps its spec with pid
    None, does not restart it, and returns None even when already stopped."""
    sup = await trellis.Supervisor.start_link([spec("a"), spec("b")])
    try:
        a = await pid_of(sup, "a")
        assert await sup.terminate_child("a") is None
        assert await join(a) == trellis.SHUTDOWN
        assert (await sup.which_child("a")).pid is None
        assert (await sup.get_childspec("a")).id == "a"
        assert counts(await sup.count_children()) == (2, 1, 0, 2)
        assert await sup.terminate_child("a") is None
        assert [i.id for i in await sup.which_children()] == ["b", "a"]
        for _ in range(20):
            await asyncio.sleep(0)
        assert (await sup.which_child("a")).pid is None
    finally:
        await stop_quietly(sup)


async def test_terminate_child_deletes_temporary_spec() -> None:
    """SPEC 64: terminate_child on a temporary child deletes its spec."""
    sup = await trellis.Supervisor.start_link([spec("a"), spec("t", restart="temporary")])
    try:
        t = await pid_of(sup, "t")
        assert await sup.terminate_child("t") is None
        assert not t.alive
        assert [i.id for i in await sup.which_children()] == ["a"]
        with pytest.raises(trellis.NotFound):
            await sup.get_childspec("t")
        assert counts(await sup.count_children()) == (1, 1, 0, 1)
    finally:
        await stop_quietly(sup)


async def test_terminate_child_not_found() -> None:
    """SPEC 64: terminate_child with an unknown id, or with a pid on a static supervisor,
    raises NotFound and leaves the child running."""
    sup = await trellis.Supervisor.start_link([spec("a")])
    try:
        a = await pid_of(sup, "a")
        with pytest.raises(trellis.NotFound):
            await sup.terminate_child("nope")
        with pytest.raises(trellis.NotFound):
            await sup.terminate_child(a)
        assert a.alive
        assert await pid_of(sup, "a") == a
    finally:
        await stop_quietly(sup)


async def test_restart_child_results_and_errors() -> None:
    """SPEC 65: restart_child works only on a stopped spec and returns the new Pid; Running
    for a running child, NotFound for an unknown id."""
    sup = await trellis.Supervisor.start_link([spec("a")])
    try:
        a = await pid_of(sup, "a")
        with pytest.raises(trellis.Running):
            await sup.restart_child("a")
        with pytest.raises(trellis.NotFound):
            await sup.restart_child("nope")
        await sup.terminate_child("a")
        new = await sup.restart_child("a")
        assert isinstance(new, trellis.Pid)
        assert new != a
        assert new.alive
        assert await pid_of(sup, "a") == new
    finally:
        await stop_quietly(sup)


async def test_restart_child_info_ignore_and_error() -> None:
    """SPEC 65: restart_child passes (pid, info) through, returns IGNORE for an ignoring
    start (pid stays None), and raises StartError with the start's exception as reason,
    keeping the spec."""
    boom = Boom("restart fails")
    script = Script("info", "info", "ignore", boom)
    sup = await trellis.Supervisor.start_link([spec("a", script)])
    try:
        await sup.terminate_child("a")
        res = await sup.restart_child("a")
        assert isinstance(res, tuple)
        pid, info = res
        assert info == INFO
        assert await pid_of(sup, "a") == pid
        await sup.terminate_child("a")
        assert await sup.restart_child("a") is trellis.IGNORE
        assert (await sup.which_child("a")).pid is None
        with pytest.raises(trellis.StartError) as ei:
            await sup.restart_child("a")
        assert ei.value.reason is boom
        assert (await sup.which_child("a")).pid is None
        assert (await sup.get_childspec("a")).id == "a"
        assert isinstance(await sup.restart_child("a"), trellis.Pid)
    finally:
        await stop_quietly(sup)


async def test_delete_child_results_and_errors() -> None:
    """SPEC 66: delete_child removes a stopped spec (the id can then be started again);
    Running for a running child, NotFound for an unknown id."""
    sup = await trellis.Supervisor.start_link([spec("a"), spec("b")])
    try:
        with pytest.raises(trellis.Running):
            await sup.delete_child("a")
        with pytest.raises(trellis.NotFound):
            await sup.delete_child("nope")
        await sup.terminate_child("a")
        assert await sup.delete_child("a") is None
        assert [i.id for i in await sup.which_children()] == ["b"]
        with pytest.raises(trellis.NotFound):
            await sup.get_childspec("a")
        with pytest.raises(trellis.NotFound):
            await sup.delete_child("a")
        assert isinstance(await sup.start_child(spec("a")), trellis.Pid)
        assert [i.id for i in await sup.which_children()] == ["a", "b"]
    finally:
        await stop_quietly(sup)


# ---------------------------------------------------------------------------
# G. simple_one_for_one administration
# ---------------------------------------------------------------------------


async def test_simple_one_for_one_terminate_child_by_pid() -> None:
    """SPEC 67: simple_one_for_one terminate_child takes a pid: a live child -> None (it is
    stopped and gone), an already dead pid -> None, a live non-child -> NotFound, a non-pid
    -> SimpleOneForOne."""
    sup = await trellis.Supervisor.start_link([spec("tmpl")], strategy="simple_one_for_one")
    stranger = trellis.spawn(_idle)
    dead = trellis.spawn(_idle)
    dead.send("normal")
    try:
        assert await join(dead) == trellis.NORMAL
        p1 = await sup.start_child([])
        p2 = await sup.start_child([])
        assert await sup.terminate_child(p1) is None
        assert await join(p1) == trellis.SHUTDOWN
        assert [i.pid for i in await sup.which_children()] == [p2]
        assert await sup.terminate_child(p1) is None
        assert await sup.terminate_child(dead) is None
        with pytest.raises(trellis.NotFound):
            await sup.terminate_child(stranger)
        assert stranger.alive
        with pytest.raises(trellis.SimpleOneForOne):
            await sup.terminate_child("tmpl")
        assert p2.alive
        assert counts(await sup.count_children()) == (1, 1, 0, 1)
    finally:
        await stop_quietly(sup, stranger)


async def test_simple_one_for_one_restart_and_delete_rejected() -> None:
    """SPEC 67: simple_one_for_one restart_child and delete_child always raise
    SimpleOneForOne."""
    sup = await trellis.Supervisor.start_link([spec("tmpl")], strategy="simple_one_for_one")
    try:
        p = await sup.start_child([])
        for arg in (p, "tmpl", None):
            with pytest.raises(trellis.SimpleOneForOne):
                await sup.restart_child(arg)
            with pytest.raises(trellis.SimpleOneForOne):
                await sup.delete_child(arg)
        assert p.alive
    finally:
        await stop_quietly(sup)


async def test_simple_one_for_one_start_child_appends_extra_args() -> None:
    """SPEC 68: simple_one_for_one start_child(extra) calls start(*args, *extra)."""
    script = Script()
    sup = await trellis.Supervisor.start_link(
        [spec("tmpl", script, args=("a",))], strategy="simple_one_for_one"
    )
    try:
        p1 = await sup.start_child(["b", "c"])
        p2 = await sup.start_child(("d",))
        p3 = await sup.start_child([])
        assert script.calls == [("a", "b", "c"), ("a", "d"), ("a",)]
        assert all(isinstance(p, trellis.Pid) and p.alive for p in (p1, p2, p3))
    finally:
        await stop_quietly(sup)


async def test_simple_one_for_one_start_child_ignore_and_error() -> None:
    """SPEC 68: simple_one_for_one start_child: an ignoring start returns IGNORE and stores
    nothing; a failing start raises StartError whose reason is the exception itself."""
    boom = Boom("no")
    sup = await trellis.Supervisor.start_link(
        [spec("tmpl", Script("ignore", boom))], strategy="simple_one_for_one"
    )
    try:
        assert await sup.start_child([]) is trellis.IGNORE
        assert await sup.which_children() == []
        assert counts(await sup.count_children()) == (1, 0, 0, 0)
        with pytest.raises(trellis.StartError) as ei:
            await sup.start_child([])
        assert ei.value.reason is boom
        assert await sup.which_children() == []
        assert counts(await sup.count_children()) == (1, 0, 0, 0)
        assert isinstance(await sup.start_child([]), trellis.Pid)
    finally:
        await stop_quietly(sup)


# ---------------------------------------------------------------------------
# G. temporary children, stopped supervisor
# ---------------------------------------------------------------------------


async def test_temporary_child_spec_forgotten_id_reusable() -> None:
    """SPEC 69: a temporary child's spec is forgotten when it exits, so start_child with the
    same id succeeds again (a stopped permanent spec would be AlreadyPresent)."""
    sup = await trellis.Supervisor.start_link([spec("p")])
    try:
        with capture_telemetry() as cap:
            t = await sup.start_child(spec("t", restart="temporary"))
            trellis.exit(t, Boom("crash"))
            await cap.wait_for("child.exited", child_id="t")
            assert [i.id for i in await sup.which_children()] == ["p"]
            t2 = await sup.start_child(spec("t", restart="temporary"))
            assert isinstance(t2, trellis.Pid)
            assert t2.alive
            with pytest.raises(trellis.AlreadyStarted) as ei:
                await sup.start_child(spec("t", restart="temporary"))
            assert ei.value.pid == t2
            await sup.terminate_child("p")
            with pytest.raises(trellis.AlreadyPresent):
                await sup.start_child(spec("p"))
    finally:
        await stop_quietly(sup)


async def test_admin_calls_on_stopped_supervisor_raise_noproc() -> None:
    """SPEC 70: every admin call on a supervisor that is gone raises NoProc."""
    sup = await trellis.Supervisor.start_link([spec("a")])
    await sup.stop()
    assert not sup.alive
    calls = [
        lambda: sup.which_children(),
        lambda: sup.which_child("a"),
        lambda: sup.count_children(),
        lambda: sup.get_childspec("a"),
        lambda: sup.start_child(spec("b")),
        lambda: sup.terminate_child("a"),
        lambda: sup.restart_child("a"),
        lambda: sup.delete_child("a"),
    ]
    for call in calls:
        with pytest.raises(trellis.NoProc):
            await call()


# ---------------------------------------------------------------------------
# H. Significant children and auto_shutdown
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "how"),
    [
        ("transient", "normal"),
        ("transient", trellis.SHUTDOWN),
        ("transient", trellis.Shutdown("bye")),
        ("temporary", "normal"),
        ("temporary", "boom"),
        ("temporary", trellis.KILL),
    ],
    ids=[
        "transient-normal",
        "transient-shutdown",
        "transient-Shutdown",
        "temp-normal",
        "temp-crash",
        "temp-killed",
    ],
)
async def test_any_significant_shuts_down(restart: str, how: Any) -> None:
    """SPEC 72: with any_significant, a significant child that exits and is not restarted
    (transient: clean exit; temporary: any reason) makes the supervisor terminate the others
    in reverse start order and exit SHUTDOWN."""
    log: list[tuple[str, Any]] = []
    sup = await trellis.Supervisor.start_link(
        [
            Recorder.child_spec("a", log, id="a"),
            spec("s", restart=restart, significant=True),
            Recorder.child_spec("b", log, id="b"),
        ],
        auto_shutdown="any_significant",
    )
    try:
        s = await pid_of(sup, "s")
        make_exit(s, how)
        assert await join(sup) == trellis.SHUTDOWN
        assert log == [("b", trellis.SHUTDOWN), ("a", trellis.SHUTDOWN)]
    finally:
        await stop_quietly(sup)


async def test_significant_transient_crash_restarts() -> None:
    """SPEC 73: a significant transient child that crashes is restarted and does not trigger
    auto-shutdown."""
    sup = await trellis.Supervisor.start_link(
        [spec("w"), spec("s", restart="transient", significant=True)],
        auto_shutdown="any_significant",
    )
    try:
        s = await pid_of(sup, "s")
        trellis.exit(s, Boom("crash"))
        new = await wait_restarted(sup, "s", s)
        assert new.alive
        assert sup.alive
        assert counts(await sup.count_children()) == (2, 2, 0, 2)
    finally:
        await stop_quietly(sup)


async def test_all_significant_waits_for_last() -> None:
    """SPEC 74: with all_significant, the supervisor shuts down only when the last
    significant child is gone."""
    log: list[tuple[str, Any]] = []
    sup = await trellis.Supervisor.start_link(
        [
            Recorder.child_spec("w", log, id="w"),
            spec("s1", restart="temporary", significant=True),
            spec("s2", restart="transient", significant=True),
        ],
        auto_shutdown="all_significant",
    )
    try:
        with capture_telemetry() as cap:
            make_exit(await pid_of(sup, "s1"), "normal")
            await cap.wait_for("child.exited", child_id="s1")
            assert sup.alive
            assert [i.id for i in await sup.which_children()] == ["s2", "w"]
            make_exit(await pid_of(sup, "s2"), "normal")
            assert await join(sup) == trellis.SHUTDOWN
            assert log == [("w", trellis.SHUTDOWN)]
            assert [e for e in cap.events if e["event"] == "supervisor.auto_shutdown"]
    finally:
        await stop_quietly(sup)


@pytest.mark.parametrize("mode", ["any_significant", "all_significant"])
async def test_terminate_child_never_triggers_auto_shutdown(mode: str) -> None:
    """SPEC 75: terminate_child on a significant child never triggers auto-shutdown."""
    sup = await trellis.Supervisor.start_link(
        [
            spec("w"),
            spec("s", restart="transient", significant=True),
            spec("t", restart="temporary", significant=True),
        ],
        auto_shutdown=mode,
    )
    try:
        await sup.terminate_child("s")
        await sup.terminate_child("t")
        for _ in range(20):
            await asyncio.sleep(0)
        assert sup.alive
        infos = await sup.which_children()
        assert [i.id for i in infos] == ["s", "w"]
        assert infos[0].pid is None
        assert isinstance(await sup.restart_child("s"), trellis.Pid)
    finally:
        await stop_quietly(sup)


async def test_significant_bystanders_do_not_trigger() -> None:
    """SPEC 76: significant children terminated as bystanders of a one_for_all restart do not
    trigger auto-shutdown (the transient one is restarted, the temporary one dropped)."""
    sup = await trellis.Supervisor.start_link(
        [
            spec("s", restart="transient", significant=True),
            spec("t", restart="temporary", significant=True),
            spec("w"),
        ],
        strategy="one_for_all",
        auto_shutdown="any_significant",
    )
    try:
        s = await pid_of(sup, "s")
        w = await pid_of(sup, "w")
        trellis.exit(w, Boom("crash"))
        await wait_restarted(sup, "w", w)
        new_s = await pid_of(sup, "s")
        assert isinstance(new_s, trellis.Pid)
        assert new_s != s
        assert not s.alive
        assert sup.alive
        assert [i.id for i in await sup.which_children()] == ["w", "s"]
    finally:
        await stop_quietly(sup)


async def test_rest_for_one_significant_bystander_does_not_trigger() -> None:
    """SPEC 76: a significant temporary bystander of a rest_for_one restart is dropped
    without triggering auto-shutdown."""
    sup = await trellis.Supervisor.start_link(
        [spec("w"), spec("t", restart="temporary", significant=True)],
        strategy="rest_for_one",
        auto_shutdown="any_significant",
    )
    try:
        w = await pid_of(sup, "w")
        t = await pid_of(sup, "t")
        trellis.exit(w, Boom("crash"))
        await wait_restarted(sup, "w", w)
        assert not t.alive
        assert sup.alive
        assert [i.id for i in await sup.which_children()] == ["w"]
    finally:
        await stop_quietly(sup)


@pytest.mark.parametrize("restart", ["transient", "temporary"])
async def test_nonsignificant_children_do_not_trigger(restart: str) -> None:
    """SPEC 76: a non-significant child exiting normally never triggers auto-shutdown."""
    sup = await trellis.Supervisor.start_link(
        [spec("s", restart="transient", significant=True), spec("n", restart=restart)],
        auto_shutdown="any_significant",
    )
    try:
        with capture_telemetry() as cap:
            make_exit(await pid_of(sup, "n"), "normal")
            await cap.wait_for("child.exited", child_id="n")
            assert sup.alive
            assert (await pid_of(sup, "s")).alive
    finally:
        await stop_quietly(sup)


async def test_auto_shutdown_cascades_through_significant_child_supervisor() -> None:
    """SPEC 77: a child supervisor that auto-shuts down triggers its parent's auto-shutdown
    when it is a significant child of that parent."""
    inner_pids: list[trellis.Pid] = []

    async def start_inner() -> trellis.Pid:
        sub = await trellis.Supervisor.start_link(
            [spec("t", Script(), restart="temporary", significant=True)],
            auto_shutdown="any_significant",
        )
        inner_pids.append(sub)
        return sub

    log: list[tuple[str, Any]] = []
    parent = await trellis.Supervisor.start_link(
        [
            Recorder.child_spec("w", log, id="w"),
            spec("inner", start_inner, type="supervisor", restart="transient", significant=True),
        ],
        auto_shutdown="any_significant",
    )
    try:
        inner = inner_pids[0]
        make_exit(await pid_of(inner, "t"), "normal")
        assert await join(inner) == trellis.SHUTDOWN
        assert await join(parent) == trellis.SHUTDOWN
        assert log == [("w", trellis.SHUTDOWN)]
    finally:
        await stop_quietly(parent)


async def test_auto_shutdown_does_not_cascade_through_nonsignificant_child() -> None:
    """SPEC 49, 77: a non-significant transient child supervisor that auto-shuts down
    (reason SHUTDOWN) is neither restarted nor does it shut its parent down."""
    inner_pids: list[trellis.Pid] = []

    async def start_inner() -> trellis.Pid:
        sub = await trellis.Supervisor.start_link(
            [spec("t", restart="temporary", significant=True)],
            auto_shutdown="any_significant",
        )
        inner_pids.append(sub)
        return sub

    parent = await trellis.Supervisor.start_link(
        [
            spec("s", restart="transient", significant=True),
            spec("inner", start_inner, type="supervisor", restart="transient"),
        ],
        auto_shutdown="any_significant",
    )
    try:
        with capture_telemetry() as cap:
            inner = inner_pids[0]
            make_exit(await pid_of(inner, "t"), "normal")
            assert await join(inner) == trellis.SHUTDOWN
            await cap.wait_for("child.exited", child_id="inner")
            assert parent.alive
            assert (await parent.which_child("inner")).pid is None
            assert len(inner_pids) == 1
    finally:
        await stop_quietly(parent)


async def test_bad_significant_combinations() -> None:
    """SPEC 78: significant=True with restart permanent, or under auto_shutdown never, raises
    BadCombination (from start_link and from start_child, the supervisor unaffected)."""
    with pytest.raises(trellis.BadCombination):
        await trellis.Supervisor.start_link(
            [spec("s", significant=True)], auto_shutdown="any_significant"
        )
    with pytest.raises(trellis.BadCombination):
        await trellis.Supervisor.start_link(
            [spec("s", restart="transient", significant=True)], auto_shutdown="never"
        )
    with pytest.raises(trellis.BadCombination):
        await trellis.Supervisor.start_link([spec("s", restart="transient", significant=True)])
    sup = await trellis.Supervisor.start_link([spec("a")])
    sig = await trellis.Supervisor.start_link([], auto_shutdown="all_significant")
    try:
        with pytest.raises(trellis.BadCombination):
            await sup.start_child(spec("s", restart="temporary", significant=True))
        with pytest.raises(trellis.BadCombination):
            await sig.start_child(spec("s", restart="permanent", significant=True))
        assert [i.id for i in await sup.which_children()] == ["a"]
        assert await sig.which_children() == []
        assert sup.alive
        assert sig.alive
    finally:
        await stop_quietly(sup, sig)


async def test_simple_one_for_one_rejects_auto_shutdown() -> None:
    """SPEC 79: simple_one_for_one with auto_shutdown other than never raises
    BadFlagCombination."""
    for mode in ("any_significant", "all_significant"):
        with pytest.raises(trellis.BadFlagCombination):
            await trellis.Supervisor.start_link(
                [spec("tmpl", restart="transient", significant=True)],
                strategy="simple_one_for_one",
                auto_shutdown=mode,
            )
        with pytest.raises(trellis.BadFlagCombination):
            await trellis.Supervisor.start_link(
                [spec("tmpl")], strategy="simple_one_for_one", auto_shutdown=mode
            )


async def test_dynamic_supervisor_rejects_auto_shutdown_and_significant() -> None:
    """SPEC 79: DynamicSupervisor rejects auto_shutdown other than never (its start_link has
    no such option) and start_child with significant=True raises InvalidSignificant."""
    with pytest.raises((TypeError, trellis.SupervisorFlagsError)):
        await trellis.DynamicSupervisor.start_link(auto_shutdown="any_significant")
    sup = await trellis.DynamicSupervisor.start_link()
    try:
        for restart in ("transient", "temporary"):
            with pytest.raises(trellis.InvalidSignificant):
                await sup.start_child(spec("s", restart=restart, significant=True))
        assert counts(await sup.count_children()) == (0, 0, 0, 0)
        assert isinstance(await sup.start_child(spec("ok")), trellis.Pid)
    finally:
        await stop_quietly(sup)

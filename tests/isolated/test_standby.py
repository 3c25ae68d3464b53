"""The standby interpreter of an isolated server: started after each start, adopted by
the next restart (which then runs ``init``, with the spec's arguments, and nothing
before), started with the same environment and limits, and never left behind: stopping
the child, stopping the tree or SIGKILLing Trellis ends it. Real interpreters."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import trellis
from _isolated_servers import Counter
from isolated._standby_dies import Plain
from isolated._standby_servers import InitLog
from trellis.testing import capture_telemetry

pytestmark = pytest.mark.timeout(90)

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024


def _stat(os_pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{os_pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _alive(os_pid: int) -> bool:
    st = _stat(os_pid)
    return st is not None and st[0] != "Z"  # a zombie nobody reaped yet is gone for us


def _interpreters(parent: int | None = None) -> set[int]:
    """The isolated interpreters that ``parent`` (default: this process) started.

    An interpreter spawned a moment ago can show an empty command line while its exec
    completes (the spawn has returned by then): wait for a count, never assert it at once."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is None or st[0] == "Z" or int(st[1]) != parent:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"trellis._isolated._child" in cmd:
            found.add(int(name))
    return found


def _environ(os_pid: int) -> dict[str, str]:
    with open(f"/proc/{os_pid}/environ", "rb") as f:
        pairs = [p.split(b"=", 1) for p in f.read().split(b"\0") if b"=" in p]
    return {k.decode(): v.decode() for k, v in pairs}


def _address_space_limit(os_pid: int) -> int:
    soft, _hard = resource.prlimit(os_pid, resource.RLIMIT_AS)
    return soft


async def _until(check, what: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _restarted(sup: trellis.SupervisorPid, old: trellis.Pid) -> trellis.Pid:
    async def new_pid() -> trellis.Pid | None:
        [info] = await sup.which_children()
        return info.pid if isinstance(info.pid, trellis.Pid) and info.pid is not old else None

    deadline = time.monotonic() + 20
    while (pid := await new_pid()) is None:
        assert time.monotonic() < deadline, "the isolated server was not restarted"
        await asyncio.sleep(0.02)
    return pid


async def test_a_restart_adopts_the_standby_which_runs_init_only_then(tmp_path: Path) -> None:
    limit = 700 * MIB
    spec = trellis.Isolated(
        InitLog,
        str(tmp_path),
        5,
        id="s",
        name="iso",
        env={"MARK": "same-env"},
        limits=trellis.Limits(memory=limit),
    )
    sup = await trellis.Supervisor.start_link([spec], intensity=5, period=10.0)
    try:
        active = await trellis.call("iso", "os_pid")
        # the standby was spawned before this call was answered
        [standby] = await _until(lambda: _interpreters() - {active}, "the standby")
        # started like the child: its own group and session, the same environment and
        # limits, the guardian's tag
        assert os.getpgid(standby) == standby
        assert os.getsid(standby) == standby
        env_a, env_s = _environ(active), _environ(standby)
        assert env_s["MARK"] == env_a["MARK"] == "same-env"
        assert env_s["TRELLIS_TAG"]
        assert env_s["TRELLIS_TAG"] != env_a["TRELLIS_TAG"]
        assert _address_space_limit(standby) == _address_space_limit(active) == limit
        # only the active interpreter ran init
        assert os.listdir(tmp_path) == [str(active)]
        assert await trellis.call("iso", ("add", 3)) == 8
        old = (await sup.which_children())[0].pid
        assert isinstance(old, trellis.Pid)
        with capture_telemetry(["process.spawned"]) as cap:
            with pytest.raises(trellis.Exited):
                await trellis.call("iso", "segfault", timeout=10)
            new = await _restarted(sup, old)
        assert await trellis.call(new, "os_pid") == standby  # adopted
        # the tree sees the adopted interpreter as the child's OS process
        [adopted] = [e for e in cap.events if e["os_pid"] == standby]
        assert adopted["path"].endswith("/s")
        assert "~standby" not in adopted["path"]
        assert await trellis.call(new, "get") == 5  # init ran again: state is the spec's
        with open(tmp_path / str(standby)) as f:  # noqa: ASYNC230
            assert json.load(f) == [str(tmp_path), 5]
        assert not _alive(active)
        # and the next restart has a standby of its own
        [spare] = _interpreters() - {standby}
        assert spare not in (active, standby)
    finally:
        await sup.stop()
    assert _interpreters() == set()


async def test_stopping_the_child_or_the_tree_leaves_no_standby() -> None:
    sup = await trellis.Supervisor.start_link(
        [trellis.Isolated(Counter, id="c", name="iso")], intensity=5, period=10.0
    )
    try:
        await trellis.call("iso", "get")
        await _until(lambda: len(_interpreters()) == 2, "the child and its standby")
        await sup.terminate_child("c")
        assert _interpreters() == set()  # both gone by the time terminate_child returns
        await sup.restart_child("c")
        await trellis.call("iso", "get")
        await _until(lambda: len(_interpreters()) == 2, "the child and its standby")
        with pytest.raises(trellis.Exited):  # a crash: the standby is adopted
            await trellis.call("iso", "segfault", timeout=10)
        await _until(lambda: len(_interpreters()) == 2, "the restarted child and its standby")
    finally:
        await sup.stop()
    assert _interpreters() == set()


async def test_no_standby_when_turned_off_or_never_restarted() -> None:
    specs = [
        trellis.Isolated(Counter, id="off", name="off", standby=False),
        trellis.Isolated(Counter, id="tmp", name="tmp", restart="temporary"),
    ]
    sup = await trellis.Supervisor.start_link(specs)
    try:
        a = await trellis.call("off", "os_pid")
        b = await trellis.call("tmp", "os_pid")
        assert _interpreters() == {a, b}
    finally:
        await sup.stop()


async def test_a_dead_standby_means_a_cold_restart() -> None:
    sup = await trellis.Supervisor.start_link(
        [trellis.Isolated(Counter, 4, id="c", name="iso")], intensity=5, period=10.0
    )
    try:
        active = await trellis.call("iso", "os_pid")
        [standby] = await _until(lambda: _interpreters() - {active}, "the standby")
        os.kill(standby, signal.SIGKILL)
        await _until(lambda: not _alive(standby), "the standby to die")
        with pytest.raises(trellis.Exited):
            await trellis.call("iso", "segfault", timeout=10)
        got = await _until(lambda: _interpreters() - {active, standby}, "a new interpreter")
        new = await trellis.call("iso", "os_pid", timeout=30)
        assert new in got
        assert await trellis.call("iso", "get") == 4
    finally:
        await sup.stop()
    assert _interpreters() == set()


def test_sigkill_of_trellis_leaves_no_standby() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_standby_tree.py")],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        deadline = time.monotonic() + 20
        while len(pids := _interpreters(proc.pid)) != 2:  # its interpreter and standby
            assert time.monotonic() < deadline, f"interpreters: {pids}"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids):
            assert time.monotonic() < deadline, f"left behind: {[p for p in pids if _alive(p)]}"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def _others(dsup: trellis.DynamicSupervisorPid, *known: trellis.Pid) -> list[trellis.Pid]:
    return [c.pid for c in await dsup.which_children() if c.pid not in known]


async def test_stopping_one_dynamic_child_leaves_its_siblings_interpreter_alone() -> None:
    # two children of one dynamic supervisor from one spec share the id: the second
    # must not adopt the first one's standby, nor may the first one's stop kill it
    dsup = await trellis.DynamicSupervisor.start_link()
    try:
        spec = trellis.Isolated(Counter, id="w")
        a = await dsup.start_child(spec)
        a_os = await trellis.call(a, "os_pid")
        [a_spare] = await _until(lambda: _interpreters() - {a_os}, "A's standby")
        b = await dsup.start_child(spec)
        b_os = await trellis.call(b, "os_pid")
        assert b_os != a_spare  # started cold: A's standby is A's
        assert await trellis.call(b, ("add", 5)) == ("ok", 5)
        await dsup.terminate_child(a)
        assert not _alive(a_os)
        assert not _alive(a_spare)
        assert not b._dead
        assert _alive(b_os)
        assert await trellis.call(b, "get") == 5
        assert await _others(dsup) == [b]
    finally:
        await dsup.stop()
    assert _interpreters() == set()


async def test_a_restart_never_adopts_a_running_siblings_standby() -> None:
    dsup = await trellis.DynamicSupervisor.start_link(intensity=5, period=10.0)
    try:
        spec = trellis.Isolated(Counter, id="w")
        a = await dsup.start_child(spec)
        a_os = await trellis.call(a, "os_pid")
        [a_spare] = await _until(lambda: _interpreters() - {a_os}, "A's standby")
        b = await dsup.start_child(spec)
        b_os = await trellis.call(b, "os_pid")
        [b_spare] = await _until(lambda: _interpreters() - {a_os, a_spare, b_os}, "B's standby")
        with pytest.raises(trellis.Exited):
            await trellis.call(a, "segfault", timeout=10)

        async def restarted() -> list[trellis.Pid]:
            return [p for p in await _others(dsup, a, b) if isinstance(p, trellis.Pid)]

        deadline = time.monotonic() + 20
        while not (got := await restarted()):
            assert time.monotonic() < deadline, "A was not restarted"
            await asyncio.sleep(0.02)
        [a2] = got
        a2_os = await trellis.call(a2, "os_pid")
        assert a2_os == a_spare  # its own standby, not B's
        assert await trellis.call(a2, ("add", 7)) == ("ok", 7)
        await dsup.terminate_child(b)  # B's clean stop takes its own standby only
        assert not _alive(b_os)
        assert not _alive(b_spare)
        assert not a2._dead
        assert _alive(a2_os)
        assert await trellis.call(a2, "get") == 7
    finally:
        await dsup.stop()
    assert _interpreters() == set()


async def test_an_interpreter_and_its_standby_killed_together_cost_one_restart() -> None:
    # (the OOM killer, a kill of both): the restart may adopt the standby before its
    # exit is seen; it then starts cold in the same restart, which succeeds
    sup = await trellis.Supervisor.start_link(
        [trellis.Isolated(Counter, 3, id="c", name="iso")], intensity=1, period=30.0
    )
    try:
        active = await trellis.call("iso", "os_pid")
        [standby] = await _until(lambda: _interpreters() - {active}, "the standby")
        with capture_telemetry(["child.start_failed", "supervisor.gave_up"]) as cap:
            os.kill(active, signal.SIGKILL)
            os.kill(standby, signal.SIGKILL)
            new = await _until(lambda: _interpreters() - {active, standby}, "a new interpreter")
            got = await trellis.call("iso", "os_pid", timeout=30)
        assert got in new
        assert await trellis.call("iso", "get") == 3
        assert cap.events == []
        assert not sup._dead
    finally:
        await sup.stop()
    assert _interpreters() == set()


async def test_an_adopted_standby_that_dies_before_ready_means_a_cold_restart(
    tmp_path: Path,
) -> None:
    # the same, without the race: the adopted standby dies (SIGKILL, no word) as soon
    # as GO makes it import the server's module; the restart starts cold and succeeds
    flag = tmp_path / "die-once"
    spec = trellis.Isolated(Plain, 3, id="c", name="iso", env={"DIE_ONCE": str(flag)})
    sup = await trellis.Supervisor.start_link([spec], intensity=1, period=30.0)
    try:
        active = await trellis.call("iso", "os_pid")
        [standby] = await _until(lambda: _interpreters() - {active}, "the standby")
        flag.touch()
        old = (await sup.which_children())[0].pid
        with capture_telemetry(["child.start_failed", "supervisor.gave_up"]) as cap:
            with pytest.raises(trellis.Exited):
                await trellis.call("iso", "crash", timeout=10)
            new = await _restarted(sup, old)
        assert not flag.exists()  # the standby was adopted and died
        assert await trellis.call(new, "os_pid") not in (active, standby)
        assert await trellis.call(new, "get") == 3
        assert cap.events == []
        assert not sup._dead
        await _until(lambda: len(_interpreters()) == 2, "the new child and its standby")
    finally:
        await sup.stop()
    assert _interpreters() == set()


@pytest.mark.parametrize("how", ["terminate_child_in_backoff", "brutal_kill"])
async def test_an_unused_standby_ends_soon_when_no_restart_will_come(how: str) -> None:
    # a restart could come up to 30 s + the backoff's max later (here 50 s): the
    # standby waits only while its supervisor may still restart the child
    spec = trellis.Isolated(
        Counter,
        id="c",
        name="iso",
        backoff=trellis.Backoff(min=5, max=20),
        shutdown="brutal_kill" if how == "brutal_kill" else 5.0,
    )
    sup = await trellis.Supervisor.start_link([spec], intensity=5, period=30.0)
    try:
        active = await trellis.call("iso", "os_pid")
        [standby] = await _until(lambda: _interpreters() - {active}, "the standby")
        if how == "terminate_child_in_backoff":
            with pytest.raises(trellis.Exited):
                await trellis.call("iso", "segfault", timeout=10)
            [info] = await sup.which_children()
            assert info.pid == trellis.RESTARTING
            assert _alive(standby)  # waiting for the restart
        await sup.terminate_child("c")
        await _until(lambda: not _alive(standby), "the unused standby to end", timeout=15)
        assert _interpreters() == set()
    finally:
        await sup.stop()


async def test_a_standby_waits_through_the_backoff_for_the_restart() -> None:
    spec = trellis.Isolated(Counter, id="c", name="iso", backoff=trellis.Backoff(min=2.5, max=2.5))
    sup = await trellis.Supervisor.start_link([spec], intensity=5, period=30.0)
    try:
        active = await trellis.call("iso", "os_pid")
        [standby] = await _until(lambda: _interpreters() - {active}, "the standby")
        old = (await sup.which_children())[0].pid
        with pytest.raises(trellis.Exited):
            await trellis.call("iso", "segfault", timeout=10)
        new = await _restarted(sup, old)
        assert await trellis.call(new, "os_pid") == standby
    finally:
        await sup.stop()
    assert _interpreters() == set()


def test_standby_process_lines_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    from trellis.cli._logging import log_event

    caplog.set_level(logging.DEBUG)
    for path in ("shop~standby/parser", "shop/parser"):
        log_event({"event": "process.spawned", "path": path, "os_pid": 7, "argv": ["python"]})
        log_event({"event": "process.exited", "path": path, "os_pid": 7, "status": 9})
    levels = [(r.trellis["path"], r.levelno) for r in caplog.records]  # type: ignore[attr-defined]
    assert levels == [
        ("shop~standby/parser", logging.DEBUG),
        ("shop~standby/parser", logging.DEBUG),
        ("shop/parser", logging.INFO),
        ("shop/parser", logging.INFO),
    ]

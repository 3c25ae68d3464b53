"""What a child's processes are and who may speak for it: health-check commands run like
children (own group, the child's environment, killed whole on timeout), ``user=`` drops
to the user's groups too, and only the child's own processes may use its notify socket.
Real processes; liveness read from /proc."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

import trellis
from trellis import Supervisor
from trellis.testing import capture_telemetry

T = TypeVar("T")
PROGS = Path(__file__).resolve().parent / "progs"


def _alive(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return data[data.rindex(")") + 2 :].split()[0] not in "ZXx"


def _probed(probe: str) -> list[int]:
    needle = f"PROBE={probe}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in env and _alive(int(entry)):
            out.append(int(entry))
    return out


async def wait_until(cond: Callable[[], T], timeout: float = 10.0, what: str = "") -> T:
    try:
        async with asyncio.timeout(timeout):
            while True:
                if value := cond():
                    return value
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what or cond}") from None


@asynccontextmanager
async def supervised(children: list[Any], **flags: Any) -> AsyncIterator[Any]:
    sup = await Supervisor.start_link(children, **flags)
    try:
        yield sup
    finally:
        if sup.alive:
            await sup.stop()


# ---------------------------------------------------------------------------
# Health-check commands
# ---------------------------------------------------------------------------


async def test_health_check_runs_like_a_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timed-out check leaves nothing behind (its whole group is killed, not only
    ``sh``), runs in a process group of its own, and sees the child's environment, not
    Trellis's (no control token or cloud secret)."""
    monkeypatch.setenv("TRELLIS_CONTROL_TOKEN", "secret-of-trellis")
    probe = uuid.uuid4().hex
    out = tmp_path / "check"
    script = (
        f"env > {out}.env.$$; cut -d' ' -f5 /proc/$$/stat > {out}.pgid.$$; "
        f"sleep 600 & echo $! > {out}.bg.$$; sleep 600"
    )
    health = trellis.Health.command(["sh", "-c", script], interval=0.05, timeout=0.3, failures=2)
    spec = trellis.Command(
        ["sleep", "600"],
        id="svc",
        env={"PROBE": probe, "ONLY_IN_CHILD": "yes"},
        health=health,
        restart="temporary",
        shutdown=0.5,
    )
    with capture_telemetry() as cap:
        async with supervised([spec]):
            ev = await cap.wait_for("child.exited", child_id="svc", timeout=20)
            assert isinstance(ev["reason"], trellis.Hung)
    files = await asyncio.to_thread(lambda: {p.name: p.read_text() for p in tmp_path.iterdir()})
    bgs = [int(text) for name, text in files.items() if name.startswith("check.bg.")]
    assert len(bgs) >= 2, "the checks did not run"
    await wait_until(lambda: not any(_alive(p) for p in bgs), 5.0, "the checks' children die")
    assert _probed(probe) == []
    for name, env in files.items():
        if not name.startswith("check.env."):
            continue
        assert "ONLY_IN_CHILD=yes" in env
        assert "secret-of-trellis" not in env
        assert f"PROBE={probe}" in env
    for name, text in files.items():
        if not name.startswith("check.pgid."):
            continue
        pgid = int(text)
        assert pgid != os.getpgrp()
        assert pgid == int(name.rsplit(".", 1)[1])  # it leads its own group


# ---------------------------------------------------------------------------
# user=
# ---------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="user= needs root")
async def test_user_gets_its_groups_and_home() -> None:
    """Like systemd ``User=``: the user's uid, gid and supplementary groups (never root's
    group 0), and HOME/USER/LOGNAME from its passwd entry."""
    pw = pwd.getpwnam("nobody")
    spec = trellis.Command(
        ["sh", "-c", 'echo "IDS $(id -u) $(id -g) $(id -G)|$HOME|$USER|$LOGNAME"'],
        id="ids",
        user="nobody",
        restart="temporary",
    )
    with capture_telemetry() as cap:
        async with supervised([spec]):
            await cap.wait_for("child.exited", child_id="ids", timeout=10)
    [line] = [
        e["line"][4:]
        for e in cap.named("process.output", child_id="ids")
        if e["line"].startswith("IDS ")
    ]
    ids, home, user, logname = line.strip().split("|")
    uid, gid, *groups = (int(x) for x in ids.split())
    assert (uid, gid) == (pw.pw_uid, pw.pw_gid)
    assert sorted(set(groups)) == sorted(set(os.getgrouplist("nobody", pw.pw_gid)))
    assert 0 not in groups
    assert (home, user, logname) == (pw.pw_dir, "nobody", "nobody")


# ---------------------------------------------------------------------------
# The notify socket: only the child's own processes
# ---------------------------------------------------------------------------


def _send_from_outside(address: str, message: str, uid: int | None = None) -> None:
    """Send ``message`` to ``address`` from a forked helper in our process group (not the
    child's session), optionally after ``os.setuid(uid)``."""
    pid = os.fork()
    if pid == 0:  # the helper: never returns into pytest
        code = 1
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            a = "\0" + address[1:] if address.startswith("@") else address
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(a)
                s.sendall(message.encode())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


async def _notify_socket_of(cap: Any, cid: str) -> str:
    def found() -> str | None:
        for e in cap.events:
            if (
                e["event"] == "process.output"
                and e.get("child_id") == cid
                and e["line"].startswith("NOTIFY_SOCKET=")
            ):
                return str(e["line"].split("=", 1)[1].strip())
        return None

    return await wait_until(found, 10.0, "NOTIFY_SOCKET")


@pytest.mark.parametrize("other_uid", [False, True])
async def test_notify_socket_ignores_other_processes(other_uid: bool) -> None:
    """WATCHDOG=trigger, READY=1 and STOPPING=1 from a process outside the child's
    session (here: our own process group, and another uid) are ignored; the child's own
    WATCHDOG=1 keeps working."""
    if other_uid and os.geteuid() != 0:
        pytest.skip("sending as another uid needs root")
    uid = pwd.getpwnam("nobody").pw_uid if other_uid else None
    # never READY=1 by itself: only a forged READY=1 could make it start
    waiting = trellis.Command(
        [sys.executable, str(PROGS / "notify.py"), "--no-ready"],
        id="waiting",
        ready=trellis.Ready.notify(timeout=1.5),
        restart="temporary",
        shutdown=0.5,
    )
    beating = trellis.Command(
        [sys.executable, str(PROGS / "notify.py"), "--beats", "-1", "--interval", "0.1"],
        id="beating",
        ready=trellis.Ready.notify(timeout=10),
        watchdog=1.0,
        restart="temporary",
        shutdown=0.5,
    )
    with capture_telemetry() as cap:
        async with supervised([beating]) as sup:
            address = await _notify_socket_of(cap, "beating")
            for msg in ("WATCHDOG=trigger", "STOPPING=1", "WATCHDOG=trigger\nREADY=1"):
                _send_from_outside(address, msg, uid)
            await asyncio.sleep(0.5)
            assert not cap.named("child.exited", child_id="beating")
            assert not cap.named("process.hung", child_id="beating")
            start = asyncio.ensure_future(sup.start_child(waiting))
            address = await _notify_socket_of(cap, "waiting")
            _send_from_outside(address, "READY=1", uid)
            with pytest.raises(trellis.StartError) as info:
                await start
            assert isinstance(info.value.reason, trellis.ReadyTimeout)
            assert not cap.named("child.exited", child_id="beating")


async def test_notify_from_the_childs_own_subprocess_is_accepted() -> None:
    """A helper the child runs (``systemd-notify`` style, same session) may notify."""
    code = (
        "import os, socket, subprocess, sys, time\n"
        "a = os.environ['NOTIFY_SOCKET']; a = '\\0' + a[1:]\n"
        "subprocess.run([sys.executable, '-c', "
        '\'import os,socket; a=os.environ["NOTIFY_SOCKET"]; a="\\\\0"+a[1:]; '
        "s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(a); "
        's.sendall(b"READY=1"); s.close(); __import__("time").sleep(0.5)\'])\n'
        "time.sleep(600)\n"
    )
    spec = trellis.Command(
        [sys.executable, "-c", code],
        id="helper",
        ready=trellis.Ready.notify(timeout=10),
        restart="temporary",
        shutdown=0.5,
    )
    async with supervised([spec]) as sup:
        info = await sup.which_child("helper")
        assert isinstance(info.pid, trellis.CommandPid)


async def test_notify_access_main_ignores_the_childs_subprocesses(tmp_path: Path) -> None:
    """``notify_access="main"`` (systemd ``NotifyAccess=main``): only the main process;
    the same helper as above cannot make it ready. In a tree file: ``notify_access``."""
    from trellis.config import load

    tree = tmp_path / "t.toml"
    code = (
        "import os, socket, subprocess, sys, time\n"
        "subprocess.run([sys.executable, '-c', "
        '\'import os,socket; a=os.environ["NOTIFY_SOCKET"]; a="\\\\0"+a[1:]; '
        "s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(a); "
        's.sendall(b"READY=1")\'])\n'
        "time.sleep(600)\n"
    )
    tree.write_text(
        "[supervisor]\nname = 'n'\n[[supervisor.children]]\nid = 'helper'\n"
        f"command = {json.dumps([sys.executable, '-c', code])}\n"
        "ready = { notify = true, timeout = 1.5 }\nnotify_access = 'main'\n"
        "restart = 'temporary'\nshutdown = 0.5\n"
    )
    [spec] = load(tree).children
    async with supervised([]) as sup:
        with pytest.raises(trellis.StartError) as info:
            await sup.start_child(spec)
        assert isinstance(info.value.reason, trellis.ReadyTimeout)
    with pytest.raises(trellis.InvalidChildSpec):
        trellis.Command(["true"], notify_access="everyone")


def test_abstract_socket_sender_credentials_are_checked_by_pid() -> None:
    """The socket asks the kernel for each sender's credentials (SO_PASSCRED)."""
    from trellis._children._notify import NotifySocket

    loop = asyncio.new_event_loop()
    try:
        got: list[dict[str, str]] = []
        senders: list[int] = []

        def allowed(pid: int) -> bool:
            senders.append(pid)
            return False

        ns = NotifySocket(loop, got.append, allowed)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect("\0" + ns.address[1:])
            s.sendall(b"READY=1")
        ns.drain()
        ns.close()
        assert senders == [os.getpid()]
        assert got == []
        assert ns.refused == 1
    finally:
        loop.close()


# ---------------------------------------------------------------------------
# Freezing Trellis (SIGSTOP/SIGCONT, a paused container)
# ---------------------------------------------------------------------------

FREEZE_TREE = """
[supervisor]
name = "frozen"

[[supervisor.children]]
id = "beating"
command = ["{python}", "{progs}/notify.py", "--beats", "-1", "--interval", "0.1"]
ready = {{ notify = true, timeout = 10 }}
watchdog = 0.5
env = {{ PROBE = "{probe}" }}
"""


@pytest.mark.parametrize("freeze_children", [False, True])
def test_freezing_trellis_does_not_kill_healthy_watchdog_children(
    tmp_path: Path, freeze_children: bool
) -> None:
    """SIGSTOP of `trellis run` for several watchdog periods (its children keep beating;
    with ``freeze_children`` they are stopped too, as `docker pause` does), then SIGCONT:
    the healthy child keeps its pid."""
    root = Path(__file__).resolve().parents[2]
    probe = uuid.uuid4().hex
    tree = tmp_path / "t.toml"
    tree.write_text(FREEZE_TREE.format(python=sys.executable, progs=PROGS, probe=probe))
    proc = subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", str(tree), "--no-journal", "--no-control"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root / "src")},
    )
    try:
        end = time.monotonic() + 20
        while not _probed(probe):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < end
            time.sleep(0.02)
        time.sleep(0.5)
        [child] = _probed(probe)
        for _ in range(2):
            frozen = [proc.pid, child] if freeze_children else [proc.pid]
            for p in frozen:
                os.kill(p, signal.SIGSTOP)
            time.sleep(2.0)  # four watchdog periods
            for p in reversed(frozen):
                os.kill(p, signal.SIGCONT)
            time.sleep(1.0)
            assert proc.poll() is None
            assert _probed(probe) == [child], "the healthy child was killed as hung"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert "hung" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for p in _probed(probe):
            os.kill(p, signal.SIGKILL)

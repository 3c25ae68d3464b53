"""The OS-process layer against a hostile child or local user: log files that cannot be
turned against other files (symlinks, a logs dir another user can write), notify socket
names nobody can squat, pidfiles that cannot name a sibling, one log file per child path,
health checks that leave nothing behind, and escapees that clear their tag. Real
processes; liveness read from /proc."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

import trellis
from trellis import Supervisor
from trellis.testing import capture_telemetry, wait_restarted

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
NOBODY = 65534
# an interpreter another user may run (ours may sit under a private home)
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def _alive(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return data[data.rindex(")") + 2 :].split()[0] not in "ZXx"


def _with_arg(arg: str) -> list[int]:
    """Live processes with ``arg`` as one of their argv entries."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv and _alive(int(entry)):
            out.append(int(entry))
    return out


def _kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


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


def _trellis(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trellis", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
        cwd=cwd,
    )


# ---------------------------------------------------------------------------
# Log files: never through a symlink, never in a dir another user can write
# ---------------------------------------------------------------------------


def _logger(logs: Path, **kw: Any) -> trellis.ChildSpec:
    return trellis.Command(
        ["sh", "-c", "echo hello; sleep 30"],
        id="web",
        logs=trellis.Logs(dir=str(logs), **kw),
        shutdown=0.5,
    )


async def test_a_logs_dir_writable_by_others_is_refused_before_spawning(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (logs / "web.out.log").symlink_to(victim)
    with capture_telemetry() as cap, pytest.raises(trellis.StartError) as exc:
        await Supervisor.start_link([_logger(logs)])
    assert "writable by its group or others" in f"{exc.value} {exc.value.reason}"
    assert str(logs) in f"{exc.value} {exc.value.reason}"
    assert not cap.named("process.spawned"), "nothing is started with a refused logs dir"
    assert victim.read_text() == "precious\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="a logs dir owned by another user needs root")
async def test_a_logs_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """The attack: a child running as ``nobody`` owns its logs dir and swaps its log file
    for a symlink to a root-only file; root Trellis must not append to it."""
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    os.chown(logs, NOBODY, NOBODY)
    victim = tmp_path / "root_job.sh"
    victim.write_text("#!/bin/sh\necho root job\n")
    victim.chmod(0o700)
    (logs / "web.out.log").symlink_to(victim)
    with pytest.raises(trellis.StartError) as exc:
        await Supervisor.start_link([_logger(logs)])
    text = f"{exc.value} {exc.value.reason}"
    assert f"belongs to uid {NOBODY}" in text
    assert str(logs) in text
    assert victim.read_text() == "#!/bin/sh\necho root job\n"


async def test_a_log_file_that_is_a_symlink_is_never_followed(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (logs / "web.err.log").symlink_to(victim)
    with pytest.raises(trellis.StartError) as exc:
        await Supervisor.start_link([_logger(logs)])
    assert "symlink" in f"{exc.value} {exc.value.reason}"
    assert victim.read_text() == "precious\n"


async def test_rotation_without_backups_truncates_our_file_not_a_symlink(tmp_path: Path) -> None:
    """With ``backups=0`` a full file is emptied through our own descriptor: a symlink
    put in its place meanwhile is neither followed nor truncated."""
    logs = tmp_path / "logs"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    go = tmp_path / "go"
    script = f"while [ ! -e {go} ]; do sleep 0.01; done; i=0; "
    script += "while [ $i -lt 50 ]; do echo line $i; i=$((i+1)); done"
    spec = trellis.Command(
        ["sh", "-c", script],
        id="rot",
        logs=trellis.Logs(dir=str(logs), max_bytes=200, backups=0),
        restart="temporary",
    )
    with capture_telemetry() as cap:
        async with supervised([spec]):
            out = logs / "rot.out.log"
            held = logs / "rot.held"
            out.rename(held)  # we keep writing to the file we opened...
            out.symlink_to(victim)  # ...and this must never be truncated
            go.touch()
            await cap.wait_for("child.exited", child_id="rot", timeout=10)
            await asyncio.sleep(0.1)
    assert victim.read_text() == "precious\n"
    text = held.read_text()
    assert "line 49" in text
    assert len(text) <= 200 + 40


def test_trellis_check_refuses_a_logs_dir_writable_by_others(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o777)
    tree = tmp_path / "tree.toml"
    tree.write_text(
        textwrap.dedent(
            """
            [supervisor]
            name = "lg"
            [[supervisor.children]]
            id = "web"
            command = ["sleep", "30"]
            logs = { dir = "logs" }
            """
        )
    )
    r = _trellis("check", str(tree))
    assert r.returncode != 0, r.stdout
    assert "writable by its group or others" in r.stdout + r.stderr
    logs.chmod(0o700)
    r = _trellis("check", str(tree))
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------
# Notify sockets: names nobody can guess and hold
# ---------------------------------------------------------------------------

_SQUAT = """
import os, socket, sys
held = []
for name in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\\0" + name)
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


def _predictable_names(n: int) -> list[str]:
    """The next ``n`` names the notify sockets of this process used to take
    (``trellis-notify-<pid>-<k>``), from the counter the old code kept."""
    from trellis._children import _notify

    counter = getattr(_notify, "_ids", None)
    start = int(repr(counter)[6:-1]) if counter is not None else 1  # count(7) -> 7
    return [f"trellis-notify-{os.getpid()}-{k}" for k in range(start, start + n)]


async def test_another_user_holding_the_next_notify_names_does_not_stop_restarts() -> None:
    """Another local user binds the names our next notify sockets would take: the notify
    and watchdog children still start, and restart."""
    demote: dict[str, Any] = {"user": NOBODY, "group": NOBODY} if os.geteuid() == 0 else {}
    python = SYSTEM_PYTHON if demote else sys.executable
    squatter = subprocess.Popen(  # noqa: ASYNC220 - started once, before the tree
        [python, "-I", "-c", _SQUAT, *_predictable_names(40)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        extra_groups=[] if demote else None,
        **demote,
    )
    try:
        assert squatter.stdout is not None
        assert squatter.stdout.readline() == "ready\n"
        children = [
            trellis.Command(["sleep", "30"], id=f"wd{i}", watchdog=30.0, shutdown=0.5)
            for i in range(4)
        ]
        async with supervised(children, intensity=20) as sup:
            for i in range(4):
                pid = (await sup.which_child(f"wd{i}")).pid
                os.kill(pid.os_pid, signal.SIGKILL)
                await wait_restarted(sup, f"wd{i}", pid, timeout=10)
            assert sup.alive
    finally:
        squatter.kill()
        squatter.wait()
        for pipe in (squatter.stdin, squatter.stdout):
            if pipe is not None:
                pipe.close()


async def test_a_taken_notify_name_is_replaced_by_a_fresh_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trellis._children import _notify

    taken = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    taken.bind("\0trellis-notify-" + "00" * 16)
    real = os.urandom
    draws = iter([b"\0" * 16, b"\0" * 16])
    monkeypatch.setattr(_notify.os, "urandom", lambda n: next(draws, None) or real(n))
    try:
        sock = _notify.NotifySocket(asyncio.get_running_loop(), lambda f: None)
        try:
            assert sock.address.startswith("@trellis-notify-")
            assert sock.address != "@trellis-notify-" + "00" * 16
        finally:
            sock.close()
    finally:
        taken.close()


# ---------------------------------------------------------------------------
# pidfile: only this child's own daemon
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["main", "grandchild"])
async def test_a_pidfile_naming_a_siblings_process_is_never_followed(
    tmp_path: Path, target: str
) -> None:
    """A pidfile child names its sibling's main process (or a process the sibling
    started): it does not start (no live daemon of its own), and stopping it leaves the
    sibling alone."""
    mark = f"939{os.getpid() % 1000}"
    victim = trellis.Command(
        ["sh", "-c", f"setsid sleep {mark}1 & exec sleep {mark}0"], id="victim", shutdown=0.5
    )
    pidfile = tmp_path / "evil.pid"
    async with supervised([victim]) as sup:
        main = (await sup.which_child("victim")).pid.os_pid
        grandchild = (await wait_until(lambda: _with_arg(f"{mark}1"), what="grandchild"))[0]
        named = main if target == "main" else grandchild
        evil = trellis.Command(
            ["sh", "-c", f"echo {named} > {pidfile}; exit 0"],
            id="evil",
            pidfile=str(pidfile),
            ready=trellis.Ready("started", None, 1.0),
            shutdown=0.5,
        )
        with pytest.raises(trellis.StartError) as exc:
            await sup.start_child(evil)
        assert "pidfile" in f"{exc.value} {exc.value.reason}"
        assert _alive(main)
        assert _alive(grandchild)
        info = await sup.which_child("victim")
        assert info.pid.os_pid == main, "the sibling was not restarted"


async def test_a_pidfile_daemon_is_still_followed(tmp_path: Path) -> None:
    """The daemon the child's main process started (its tag) is followed."""
    pidfile = tmp_path / "d.pid"
    script = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 9398' & sleep 0.05; exit 0"
    spec = trellis.Command(
        ["sh", "-c", script],
        id="d",
        pidfile=str(pidfile),
        ready=trellis.Ready("started", None, 10.0),
        shutdown=0.5,
    )
    async with supervised([spec]) as sup:
        pid = (await sup.which_child("d")).pid
        assert pid.os_pid == int(pidfile.read_text())
        assert _alive(pid.os_pid)
    await wait_until(lambda: not _alive(pid.os_pid), what="the daemon stopped")


# ---------------------------------------------------------------------------
# Log files are named by the child's path
# ---------------------------------------------------------------------------

DUP_TREE = """
[supervisor]
name = "dup"
[journal]
enabled = false
[control]
enabled = false
[[supervisor.children]]
id = "payments"
[[supervisor.children.children]]
id = "web"
command = ["/bin/sh", "-c", "echo I am payments/web; exec sleep 30"]
logs = { dir = "logs" }
[[supervisor.children]]
id = "blog"
[[supervisor.children.children]]
id = "web"
command = ["/bin/sh", "-c", "echo I am blog/web; exec sleep 30"]
logs = { dir = "logs" }
"""


def test_two_children_with_one_id_write_their_own_log_files(tmp_path: Path) -> None:
    (tmp_path / "t.toml").write_text(DUP_TREE)
    logs = tmp_path / "logs"
    pay, blog = logs / "dup.payments.web.out.log", logs / "dup.blog.web.out.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", "t.toml", "--log-level", "warning"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not all(f.exists() and f.read_text().strip() for f in (pay, blog)):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, sorted(p.name for p in logs.glob("*"))
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stderr is not None:
            proc.stderr.close()
    assert pay.read_text().endswith(" I am payments/web\n")
    assert blog.read_text().endswith(" I am blog/web\n")
    assert not (logs / "web.out.log").exists()
    r = _trellis("logs", "dup/payments/web", "--dir", str(logs))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("I am payments/web")
    assert "blog" not in r.stdout


def test_trellis_logs_dir_still_reads_files_named_by_id(tmp_path: Path) -> None:
    """Files written before they were named by path (``web.out.log``) are still read."""
    (tmp_path / "web.out.log").write_text("2026-12-07T18:55:01.123Z old line\n")
    r = _trellis("logs", "shop/web", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "old line" in r.stdout


def test_log_names() -> None:
    from trellis._children._output import log_name

    assert log_name("shop/payments/web") == "shop.payments.web"
    assert log_name("<12>/web") == "web"  # a supervisor without a name: its id varies
    long = "/".join(["x" * 200] * 3)
    name = log_name(long)
    assert len(name.encode()) + len(".err.log.10") <= 255
    assert name.endswith("." + "x" * 200)
    assert name != log_name("/".join(["y" * 200, "x" * 200, "x" * 200]))


# ---------------------------------------------------------------------------
# Health checks that time out leave nothing behind
# ---------------------------------------------------------------------------


async def test_a_timed_out_health_check_leaves_no_setsid_process_behind() -> None:
    """Each check starts ``setsid sleep`` (its own session: not in the group that is
    killed on timeout) and then hangs; after several timeouts at most the process of the
    check still running is left."""
    mark = f"88{os.getpid() % 10000}1"
    spec = trellis.Command(
        ["sleep", "30"],
        id="w",
        health=trellis.Health.command(
            ["sh", "-c", f"setsid sleep {mark} & sleep 5"],
            interval=0.1,
            timeout=0.2,
            failures=1000,
        ),
        shutdown=0.5,
    )
    try:
        with capture_telemetry():
            async with supervised([spec]):
                await asyncio.sleep(2.5)  # about 8 checks, each timed out
                left = _with_arg(mark)
                assert len(left) <= 1, f"{len(left)} processes of timed-out checks left"
        await wait_until(lambda: not _with_arg(mark), what="none left once the child stops")
    finally:
        _kill_all(_with_arg(mark))


# ---------------------------------------------------------------------------
# The guardian runs before the first child is spawned
# ---------------------------------------------------------------------------

_FIRST_SPAWN = """
import asyncio, json, os, sys
import trellis
from trellis._children import _guardian

seen = []
real = os.posix_spawn

def spy(path, argv, env, **kw):
    if "-c" not in argv[:4]:  # not the guardian itself
        seen.append(_guardian.guardian_pid())
    return real(path, argv, env, **kw)

os.posix_spawn = spy

async def main():
    sup = await trellis.Supervisor.start_link(
        [trellis.Command(["sleep", "30"], id="first", shutdown=0.5)]
    )
    await sup.stop()

asyncio.run(main())
print(json.dumps(seen))
"""


def test_the_guardian_is_running_before_the_first_child_is_spawned() -> None:
    r = subprocess.run(
        [sys.executable, "-c", _FIRST_SPAWN],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)  # the guardian pid (or None) at each child spawn
    assert seen, "the child was spawned"
    assert seen[0] is not None, "the first child was spawned before the guardian ran"


# ---------------------------------------------------------------------------
# Escapees that cleared their tag: killed while Trellis lives
# ---------------------------------------------------------------------------

ESCAPE_TREE = """
[supervisor]
name = "esc"
[journal]
enabled = false
[control]
enabled = false
[[supervisor.children]]
id = "a"
command = ["/bin/sh", "-c", "setsid env -u TRELLIS_TAG sleep {mark}1 & exec sleep 30"]
[[supervisor.children]]
id = "b"
restart = "temporary"
command = ["/bin/sh", "-c", "setsid env -i /bin/sleep {mark}2 & sleep 0.3; exit 0"]
"""


def _run_tree(tmp_path: Path, text: str) -> subprocess.Popen[str]:
    (tmp_path / "t.toml").write_text(text)
    return subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", "t.toml", "--log-level", "info"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_sync(cond: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def test_escapees_without_a_tag_die_with_their_child_and_at_a_clean_stop(tmp_path: Path) -> None:
    """``b`` leaves an escapee with an empty environment and exits: it is killed while
    Trellis runs. ``a``'s escapee (TRELLIS_TAG removed) is killed at a clean stop."""
    mark = f"77{os.getpid() % 10000}"
    proc = _run_tree(tmp_path, ESCAPE_TREE.format(mark=mark))
    try:
        _wait_sync(lambda: _with_arg(f"{mark}1"), "a's escapee")
        # b's escapee is killed once b exits (its main process ran 0.3 s)
        _wait_sync(lambda: not _with_arg(f"{mark}2") and proc.poll() is None, "b's escapee gone")
        assert _with_arg(f"{mark}1"), "a is still running: its escapee is left alone"
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        err = proc.stderr.read() if proc.stderr else ""
        assert proc.returncode == 0, err
        assert "daemonized" in err  # b exited 0 leaving a process: reported
        _wait_sync(lambda: not _with_arg(f"{mark}1"), "a's escapee gone", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        _kill_all(_with_arg(f"{mark}1") + _with_arg(f"{mark}2"))


_IN_PROCESS = """
import subprocess, sys, time
import trellis

mark = sys.argv[1]
mine = subprocess.Popen(["sleep", mark], start_new_session=True)  # our own, not a child's
spec = trellis.Command(
    ["/bin/sh", "-c", "setsid env -i /bin/sleep " + mark + "9 & sleep 0.2; exit 0"],
    id="leaver",
    restart="temporary",
)

timer = trellis.Command(["sleep", "1.5"], id="timer", restart="transient", significant=True)
code = trellis.run(
    lambda: trellis.Supervisor.start_link([spec, timer], auto_shutdown="any_significant")
)
print("alive" if mine.poll() is None else "killed", flush=True)
mine.kill()
mine.wait()
sys.exit(code)
"""


def test_processes_our_own_code_starts_in_a_new_session_are_left_alone() -> None:
    """A process the program itself started (``start_new_session=True``, our
    environment) is no escapee: the sweep after a child's exit leaves it running."""
    mark = f"66{os.getpid() % 10000}"
    r = subprocess.run(
        [sys.executable, "-c", _IN_PROCESS, mark],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    try:
        assert r.stdout.strip() == "alive", r.stdout + r.stderr
        assert not _with_arg(f"{mark}9"), "the leaver's escapee was killed"
    finally:
        _kill_all(_with_arg(mark) + _with_arg(f"{mark}9"))


def test_kill_9_of_trellis_kills_untagged_escapees_still_parented_by_a_child(
    tmp_path: Path,
) -> None:
    """The guardian kills every descendant of its groups' members, so an escapee that
    dropped its tag but whose parent is still the child's is not orphaned by a kill -9.
    (One whose parent chain was already broken is re-parented to init: docs/design.md.)"""
    mark = f"55{os.getpid() % 10000}"
    tree = ESCAPE_TREE.split('[[supervisor.children]]\nid = "b"')[0].format(mark=mark)
    tree = tree.replace("setsid env -u TRELLIS_TAG", "setsid env -i")
    proc = _run_tree(tmp_path, tree)
    try:
        _wait_sync(lambda: _with_arg(f"{mark}1"), "a's escapee")
        proc.kill()
        proc.wait(10)
        _wait_sync(lambda: not _with_arg(f"{mark}1"), "the escapee killed", timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        _kill_all(_with_arg(f"{mark}1"))

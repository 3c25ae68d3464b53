"""OS-process children (`trellis.Command`), against docs/api.md "OS-process children".

Every test runs real programs from ``progs/`` (small stdlib-only Python scripts run with
``sys.executable``). Liveness of OS processes is read from ``/proc`` (a zombie counts as
gone: PID 1 in a container may never reap orphans). ``_no_os_leaks`` fails any test that
leaves a process running one of ``progs/`` behind. Time bounds only turn a hang into a
failure; the one exception is ``test_exit_is_seen_promptly``, whose generous bound is the
point of the test (no polling loop).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

import trellis
from trellis import NORMAL, ChildSpec, Supervisor
from trellis.testing import Capture, capture_telemetry, wait_restarted

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PY = sys.executable
# The programs run from a per-session copy of progs/, so the leak check below only ever
# sees (and kills) this session's processes, even while another session runs these tests.
PROGS = HERE / "progs"


@pytest.fixture(scope="session", autouse=True)
def _session_progs(tmp_path_factory: pytest.TempPathFactory) -> None:
    global PROGS
    copy = tmp_path_factory.mktemp("progs")
    for f in (HERE / "progs").glob("*.py"):
        shutil.copy(f, copy / f.name)
    PROGS = copy


# ---------------------------------------------------------------------------
# OS process helpers (/proc)
# ---------------------------------------------------------------------------


def _state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (R, S, T, Z, ...), or None if there is none."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()[0]


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    state = _state(pid)
    return state is not None and state not in "ZXx"


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _prog_processes() -> set[int]:
    """Live processes running one of the programs in ``progs/``."""
    mark = str(PROGS).encode()
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if mark in cmdline and alive(int(entry.name)):
            found.add(int(entry.name))
    return found


async def wait_gone(*pids: int, timeout: float = 5.0) -> None:
    """Wait until every pid is gone; fail (instead of hanging) after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if not any(alive(p) for p in pids):
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        left = {p: _state(p) for p in pids if alive(p)}
        raise AssertionError(f"OS processes still alive after {timeout}s: {left}") from None


async def wait_until(cond: Callable[[], T], timeout: float = 5.0, what: str = "") -> T:
    """Poll ``cond`` (short sleeps) until it is truthy; fail after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if value := cond():
                    return value
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what or cond}") from None


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(logging.Formatter().format(record))


@pytest.fixture(autouse=True)
def _no_asyncio_errors() -> Iterator[None]:
    """Fail a test during which asyncio logged an error (e.g. an exception in a callback)."""
    handler = _Errors()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.seen, "asyncio logged errors:\n" + "\n".join(handler.seen)


@pytest.fixture(autouse=True)
async def _no_os_leaks() -> AsyncIterator[None]:
    """Fail a test that leaves a process running a ``progs/`` program behind."""
    before = _prog_processes()
    yield
    try:
        async with asyncio.timeout(3.0):
            while True:
                if not _prog_processes() - before:
                    break
                await asyncio.sleep(0.02)
    except TimeoutError:
        left = {pid: (_state(pid), _cmdline(pid)) for pid in _prog_processes() - before}
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"test left OS processes running (pid: state, cmdline): {left}")


# ---------------------------------------------------------------------------
# Trellis helpers
# ---------------------------------------------------------------------------


def prog(name: str, *args: object) -> list[str]:
    """argv running ``progs/<name>.py`` with this interpreter."""
    return [PY, str(PROGS / f"{name}.py"), *map(str, args)]


def cmd(id: str, name: str, *args: object, **kwargs: Any) -> ChildSpec:
    """A Command child running ``progs/<name>.py`` (small default shutdown)."""
    kwargs.setdefault("shutdown", 0.5)
    return trellis.Command(prog(name, *args), id=id, **kwargs)


@asynccontextmanager
async def supervised(children: list[Any], **flags: Any) -> AsyncIterator[Any]:
    """A supervisor over ``children`` that is stopped (if still alive) on the way out."""
    sup = await Supervisor.start_link(children, **flags)
    try:
        yield sup
    finally:
        if sup.alive:
            await sup.stop()


async def child_pid(sup: Any, cid: Any) -> Any:
    """The running CommandPid of child ``cid``."""
    info = await sup.which_child(cid)
    assert isinstance(info.pid, trellis.CommandPid), info
    return info.pid


def lines(cap: Capture, cid: Any, stream: str | None = None) -> list[str]:
    """The output lines of child ``cid`` seen so far (without the line terminator)."""
    return [
        e["line"].rstrip("\r\n")
        for e in cap.events
        if e["event"] == "process.output"
        and e.get("child_id") == cid
        and (stream is None or e.get("stream") == stream)
    ]


async def wait_line(
    cap: Capture, cid: Any, pattern: str, timeout: float = 5.0, count: int = 1
) -> list[str]:
    """Wait until ``count`` output lines of ``cid`` fully match the regex ``pattern``."""
    rx = re.compile(pattern)
    return await wait_until(
        lambda: (m := [ln for ln in lines(cap, cid) if rx.fullmatch(ln)]) and len(m) >= count and m,
        timeout,
        f"{count} line(s) matching {pattern!r} from {cid!r}",
    )


async def printed_pid(cap: Capture, cid: Any, after: int = 0) -> int:
    """The pid a ``progs/`` program announced with its first line ``pid <n>``."""
    got = await wait_line(cap, cid, r"pid \d+", count=after + 1)
    return int(got[after].split()[1])


async def dump(cap: Capture, cid: Any) -> dict[str, Any]:
    """The JSON dump printed by ``progs/envdump.py``."""
    [line] = await wait_line(cap, cid, r"DUMP .*")
    return json.loads(line[len("DUMP ") :])


def exited(cap: Capture, cid: Any) -> list[dict[str, Any]]:
    return cap.named("child.exited", child_id=cid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_pids(path: Path) -> tuple[int, int]:
    child, grandchild = path.read_text().split()
    return int(child), int(grandchild)


def check_reason(reason: Any, cls: type, kind: str) -> None:
    """``reason`` is an abnormal ``ProcessExitReason`` of class ``cls`` and kind ``kind``."""
    assert isinstance(reason, cls), reason
    assert isinstance(reason, trellis.ProcessExitReason), reason
    assert isinstance(reason, BaseException), reason
    assert reason.kind == kind, (reason, reason.kind)
    assert not trellis.is_clean(reason)


def is_ready_timeout(reason: Any) -> bool:
    return reason is trellis.ReadyTimeout or isinstance(reason, trellis.ReadyTimeout)


# ---------------------------------------------------------------------------
# The spec and the CommandPid
# ---------------------------------------------------------------------------


async def test_command_is_a_child_spec_with_defaults() -> None:
    spec = trellis.Command(["/bin/sleep", "10"])
    assert isinstance(spec, ChildSpec)
    assert spec.id == "sleep"  # basename of argv[0]
    assert spec.restart == "permanent"
    assert spec.shutdown == 5.0
    assert spec.significant is False
    assert spec.backoff is None
    assert trellis.Command(["/bin/sleep", "1"], id="x", restart="transient").id == "x"
    trellis.Supervisor.check_childspecs([spec])


async def test_argv_string_needs_shell() -> None:
    async def start() -> None:
        async with supervised([trellis.Command("echo hi", id="echo")]):
            pass

    with pytest.raises((TypeError, ValueError, trellis.StartError)):
        await start()


async def test_command_pid_owns_os_process_in_own_group() -> None:
    spec = cmd("s", "sleeper", ready=trellis.Ready.started())
    async with supervised([spec]) as sup:
        pid = await child_pid(sup, "s")
        assert isinstance(pid, trellis.Pid)
        assert pid.alive
        os_pid = pid.os_pid
        assert isinstance(os_pid, int)
        assert alive(os_pid)
        assert str(PROGS / "sleeper.py") in _cmdline(os_pid)
        assert os.getsid(os_pid) != os.getsid(0)
        assert os.getpgid(os_pid) != os.getpgid(0)
        assert os.getpgid(os_pid) == os.getsid(os_pid)
    assert not pid.alive
    await wait_gone(os_pid)


# ---------------------------------------------------------------------------
# Exit reasons
# ---------------------------------------------------------------------------


async def test_exit_zero_is_normal_and_transient_is_not_restarted() -> None:
    with capture_telemetry() as cap:
        async with supervised([cmd("t", "exit_with", 0, restart="transient")]) as sup:
            ev = await cap.wait_for("child.exited", child_id="t")
            assert ev["reason"] is NORMAL
            assert ev["restart"] is False
            assert (await sup.which_child("t")).pid is None
            assert not cap.named("child.restarted", child_id="t")


async def test_nonzero_exit_is_exitcode_and_restarted(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with capture_telemetry() as cap:
        spec = cmd("t", "exit_with", 3, marker, restart="transient")
        async with supervised([spec]) as sup:
            ev = await cap.wait_for("child.exited", child_id="t")
            reason = ev["reason"]
            check_reason(reason, trellis.ExitCode, "crash")
            assert reason == trellis.ExitCode(3)
            assert reason != trellis.ExitCode(4)
            assert ev["restart"] is True
            await cap.wait_for("child.restarted", child_id="t")
            pid = await child_pid(sup, "t")  # the second run found the marker: it stays up
            assert alive(pid.os_pid)
            assert marker.exists()


async def test_killed_by_signal_is_signaled() -> None:
    with capture_telemetry() as cap:
        async with supervised([cmd("s", "sleeper")], intensity=5) as sup:
            for n, sig in enumerate((signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1)):
                pid = await child_pid(sup, "s")
                os.kill(pid.os_pid, sig)
                ev = await _nth_exit(cap, "s", n)
                check_reason(ev["reason"], trellis.Signaled, "killed")
                assert ev["reason"] == trellis.Signaled(sig.name)
                assert ev["restart"] is True
                assert await pid.join(timeout=5) is ev["reason"]
                await wait_restarted(sup, "s", pid)


async def _nth_exit(cap: Capture, cid: Any, n: int) -> dict[str, Any]:
    return await wait_until(
        lambda: len(exited(cap, cid)) > n and exited(cap, cid)[n], what=f"exit {n}"
    )


async def test_closed_output_is_not_an_exit(tmp_path: Path) -> None:
    marker = tmp_path / "exiting"
    with capture_telemetry() as cap:
        async with supervised([cmd("c", "closer", marker, restart="temporary")]):
            ev = await cap.wait_for("child.exited", child_id="c")
            assert marker.exists()
            check_reason(ev["reason"], trellis.ExitCode, "crash")
            assert ev["reason"] == trellis.ExitCode(5)
            assert lines(cap, "c") == ["closing"]


async def test_exit_is_seen_promptly() -> None:
    """Ten kill/restart cycles (~0.05 s each here) in far less than a 1 s poll would need."""
    async with supervised([cmd("s", "sleeper")], intensity=20, period=60) as sup:
        async with asyncio.timeout(3.0):
            for _ in range(10):
                old = await child_pid(sup, "s")
                os.kill(old.os_pid, signal.SIGKILL)
                new = await wait_restarted(sup, "s", old)
                assert new.os_pid != old.os_pid
                assert not alive(old.os_pid)


async def test_exit_of_the_trellis_process_kills_the_os_process() -> None:
    async with supervised([cmd("s", "sleeper")]) as sup:
        old = await child_pid(sup, "s")
        trellis.exit(old, trellis.KILL)
        assert await old.join(timeout=5) == trellis.KILLED
        await wait_gone(old.os_pid)
        new = await wait_restarted(sup, "s", old)
        assert alive(new.os_pid)


# ---------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop_signal", "expected"),
    [
        (None, "SIGTERM"),
        ("SIGTERM", "SIGTERM"),
        ("SIGUSR1", "SIGUSR1"),
        ("SIGINT", "SIGINT"),
        (signal.SIGHUP, "SIGHUP"),
        (int(signal.SIGUSR1), "SIGUSR1"),
    ],
)
async def test_stop_signal_is_honoured(tmp_path: Path, stop_signal: Any, expected: str) -> None:
    marker = tmp_path / "signal"
    extra = {} if stop_signal is None else {"stop_signal": stop_signal}
    spec = cmd("t", "trap", marker, ready=trellis.Ready.log("ready"), shutdown=5.0, **extra)
    async with supervised([spec]) as sup:
        pid = await child_pid(sup, "t")
    assert marker.read_text() == expected
    await wait_gone(pid.os_pid)


async def test_ignored_stop_signal_is_followed_by_sigkill_after_shutdown(tmp_path: Path) -> None:
    marker = tmp_path / "signal"
    spec = cmd("t", "trap", marker, "--ignore", ready=trellis.Ready.log("ready"), shutdown=0.5)
    loop = asyncio.get_running_loop()
    async with supervised([spec]) as sup:
        pid = await child_pid(sup, "t")
        began = loop.time()
        async with asyncio.timeout(10):
            await sup.stop()
    assert loop.time() - began >= 0.5  # it waited `shutdown` seconds before SIGKILL
    assert not marker.exists()
    await wait_gone(pid.os_pid)


async def test_brutal_kill_kills_at_once(tmp_path: Path) -> None:
    marker = tmp_path / "signal"
    spec = cmd("t", "trap", marker, ready=trellis.Ready.log("ready"), shutdown="brutal_kill")
    async with supervised([spec]) as sup:
        pid = await child_pid(sup, "t")
    await wait_gone(pid.os_pid)
    assert not marker.exists()  # no SIGTERM came first


async def test_terminate_and_restart_child() -> None:
    async with supervised([cmd("s", "sleeper")]) as sup:
        old = await child_pid(sup, "s")
        await sup.terminate_child("s")
        await wait_gone(old.os_pid)
        assert (await sup.which_child("s")).pid is None
        new = await sup.restart_child("s")
        new = new[0] if isinstance(new, tuple) else new
        assert isinstance(new, trellis.CommandPid)
        assert alive(new.os_pid)
        assert new.os_pid != old.os_pid


# ---------------------------------------------------------------------------
# Grandchildren
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "shutdown"),
    [
        ((), 5.0),  # child exits on SIGTERM without stopping its grandchild
        (("--ignore",), 0.5),  # both ignore SIGTERM: the group must be SIGKILLed
        ((), "brutal_kill"),
    ],
)
async def test_grandchildren_killed_on_stop(
    tmp_path: Path, args: tuple[str, ...], shutdown: Any
) -> None:
    pidfile = tmp_path / "pids"
    spec = cmd(
        "p", "spawner", pidfile, *args, shutdown=shutdown, ready=trellis.Ready.log("spawned")
    )
    async with supervised([spec]) as sup:
        await wait_until(pidfile.exists, what="pidfile")
        child, grandchild = _read_pids(pidfile)
        assert (await child_pid(sup, "p")).os_pid == child
        assert alive(child)
        assert alive(grandchild)
    await wait_gone(child, grandchild)


@pytest.mark.parametrize("share", [False, True], ids=["devnull", "shared_pipes"])
async def test_grandchildren_killed_when_the_child_exits(tmp_path: Path, share: bool) -> None:
    """Also when the grandchild holds the child's output pipes open (no EOF)."""
    pidfile = tmp_path / "pids"
    extra = ["--share-output"] if share else []
    with capture_telemetry() as cap:
        spec = cmd("p", "spawner", pidfile, "--exit", 7, *extra, restart="temporary")
        async with supervised([spec]):
            ev = await cap.wait_for("child.exited", child_id="p")
            check_reason(ev["reason"], trellis.ExitCode, "crash")
            assert ev["reason"] == trellis.ExitCode(7)
            child, grandchild = _read_pids(pidfile)
            await wait_gone(child, grandchild)


SUPERVISOR_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, trellis

    async def main():
        spec = trellis.Command([sys.executable, *sys.argv[1:]], id="spawner", shutdown=0.5)
        sup = await trellis.Supervisor.start_link([spec])
        print("up", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def _start_tree(tmp_path: Path, pidfile: Path, args: tuple[str, ...]) -> subprocess.Popen[bytes]:
    """Run SUPERVISOR_SCRIPT in its own Python process (stderr to ``tmp_path/stderr``)."""
    script = tmp_path / "tree.py"
    script.write_text(SUPERVISOR_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with (tmp_path / "stderr").open("w") as err:
        return subprocess.Popen(
            [PY, str(script), str(PROGS / "spawner.py"), str(pidfile), *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )


@pytest.mark.parametrize("args", [(), ("--ignore",)])
async def test_sigkill_of_the_supervisor_leaves_no_child_alive(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    pidfile = tmp_path / "pids"
    proc = _start_tree(tmp_path, pidfile, args)
    pids: tuple[int, ...] = ()
    try:
        await wait_until(
            lambda: pidfile.exists() or proc.poll() is not None, timeout=15, what="pidfile"
        )
        assert proc.poll() is None, (tmp_path / "stderr").read_text()
        pids = _read_pids(pidfile)
        assert all(alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)
        await wait_until(lambda: proc.poll() is not None, what="supervisor exit")
        assert proc.returncode == -signal.SIGKILL
        await wait_gone(*pids, timeout=5.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


# ---------------------------------------------------------------------------
# argv, environment, cwd, user, shell
# ---------------------------------------------------------------------------


async def test_argv_is_passed_without_a_shell() -> None:
    weird = ["a b", "it's", 'say "hi"', "$HOME", "*", "; echo pwned", "back\\slash", "", "é ü"]
    with capture_telemetry() as cap:
        spec = cmd("d", "envdump", *weird, restart="temporary")
        async with supervised([spec]):
            assert (await dump(cap, "d"))["argv"] == weird


async def test_env_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRELLIS_TEST_SECRET", "leak")
    monkeypatch.setenv("HOME", "/home/test")
    monkeypatch.setenv("GREETING", "old")
    with capture_telemetry() as cap:
        spec = cmd(
            "d",
            "envdump",
            env={"GREETING": "hello world", "EXTRA": "1"},
            inherit_env=("PATH",),
            restart="temporary",
        )
        async with supervised([spec]):
            env = (await dump(cap, "d"))["env"]
    assert "TRELLIS_TEST_SECRET" not in env
    assert "HOME" not in env
    assert env["PATH"] == os.environ["PATH"]
    assert env["GREETING"] == "hello world"
    assert env["EXTRA"] == "1"


async def test_default_inherit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRELLIS_TEST_SECRET", "leak")
    monkeypatch.setenv("HOME", "/home/test")
    monkeypatch.setenv("TZ", "UTC")
    with capture_telemetry() as cap:
        async with supervised([cmd("d", "envdump", env={"X": "y"}, restart="temporary")]):
            env = (await dump(cap, "d"))["env"]
    assert "TRELLIS_TEST_SECRET" not in env
    assert env["HOME"] == "/home/test"
    assert env["TZ"] == "UTC"
    assert env["PATH"] == os.environ["PATH"]
    assert env["X"] == "y"


@pytest.mark.parametrize("inherit", [True, False, ()])
async def test_inherit_env_all_or_nothing(monkeypatch: pytest.MonkeyPatch, inherit: Any) -> None:
    monkeypatch.setenv("TRELLIS_TEST_SECRET", "visible")
    with capture_telemetry() as cap:
        spec = cmd("d", "envdump", env={"X": "y"}, inherit_env=inherit, restart="temporary")
        async with supervised([spec]):
            env = (await dump(cap, "d"))["env"]
    assert env["X"] == "y"
    if inherit is True:
        assert env["TRELLIS_TEST_SECRET"] == "visible"
        assert env["PATH"] == os.environ["PATH"]
    else:
        assert "TRELLIS_TEST_SECRET" not in env
        assert "PATH" not in env


async def test_cwd(tmp_path: Path) -> None:
    with capture_telemetry() as cap:
        async with supervised([cmd("d", "envdump", cwd=str(tmp_path), restart="temporary")]):
            assert (await dump(cap, "d"))["cwd"] == str(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="user= needs root")
@pytest.mark.parametrize("user", ["nobody", 65534])
async def test_user(user: Any) -> None:
    import pwd

    uid = pwd.getpwnam("nobody").pw_uid
    with capture_telemetry() as cap:
        spec = trellis.Command(["id", "-u"], id="id", user=user, restart="temporary")
        async with supervised([spec]):
            await wait_line(cap, "id", str(uid))
            ev = await cap.wait_for("child.exited", child_id="id")
            assert ev["reason"] is NORMAL


async def test_shell_true() -> None:
    with capture_telemetry() as cap:
        spec = trellis.Command(
            'echo "$GREETING" from-shell | tr a-z A-Z; exit 3',
            id="sh",
            shell=True,
            env={"GREETING": "hi there"},
            restart="temporary",
        )
        async with supervised([spec]):
            ev = await cap.wait_for("child.exited", child_id="sh")
            check_reason(ev["reason"], trellis.ExitCode, "crash")
            assert ev["reason"] == trellis.ExitCode(3)
            assert lines(cap, "sh", "stdout") == ["HI THERE FROM-SHELL"]


@pytest.mark.parametrize(
    "argv", [["/nonexistent/trellis-no-such-binary"], ["trellis-no-such-binary-on-path"]]
)
async def test_missing_binary_is_a_clear_start_error(argv: list[str]) -> None:
    name = argv[0].rsplit("/", 1)[-1]
    with pytest.raises(trellis.StartError) as exc:
        await Supervisor.start_link([trellis.Command(argv, id="missing")])
    assert isinstance(exc.value, trellis.FailedToStartChild)
    assert exc.value.id == "missing"
    assert name in f"{exc.value} {exc.value.reason}"


async def test_missing_binary_via_start_child() -> None:
    async with supervised([]) as sup:
        with pytest.raises(trellis.StartError) as exc:
            await sup.start_child(trellis.Command(["/nonexistent/nope-xyz"], id="m"))
        assert "nope-xyz" in f"{exc.value} {exc.value.reason}"


# ---------------------------------------------------------------------------
# Readiness
# ---------------------------------------------------------------------------


async def test_ready_notify(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    spec = cmd(
        "n",
        "notify",
        "--ready-after",
        0.3,
        "--marker",
        marker,
        ready=trellis.Ready.notify(timeout=10),
        inherit_env=(),  # NOTIFY_SOCKET is set anyway
    )
    with capture_telemetry() as cap:
        async with supervised([spec]):
            assert marker.exists()  # start returned only after READY=1
            [sock] = await wait_line(cap, "n", r"NOTIFY_SOCKET=.+")
            assert sock.split("=", 1)[1]


async def test_ready_tcp() -> None:
    port = free_port()
    spec = cmd("srv", "tcp_server", port, "--delay", 0.3, ready=trellis.Ready.tcp(port, timeout=10))
    async with supervised([spec]):
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


def _http_get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return int(resp.status)


async def test_ready_http_waits_for_2xx(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/health"
    marker = tmp_path / "served200"
    spec = cmd(
        "web",
        "http_server",
        port,
        "--delay",
        0.2,
        "--fail-first",
        1,
        "--marker",
        marker,
        ready=trellis.Ready.http(url, timeout=10),
    )
    with capture_telemetry() as cap:
        async with supervised([spec]):
            assert marker.exists()  # start returned only after a 2xx (the 503 did not count)
            await wait_line(cap, "web", "served 200")
            assert "served 503" in lines(cap, "web")
            assert await asyncio.to_thread(_http_get, url) == 200


async def test_ready_log_regex(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    spec = cmd(
        "l", "log_ready", marker, ready=trellis.Ready.log(r"listening on port \d+", timeout=10)
    )
    async with supervised([spec]):
        assert marker.exists()  # earlier near-miss lines (stdout and stderr) did not count


@pytest.mark.parametrize("kind", ["notify", "tcp", "http", "log"])
async def test_ready_timeout_is_a_start_failure(kind: str) -> None:
    port = free_port()
    ready = {
        "notify": trellis.Ready.notify(timeout=0.3),
        "tcp": trellis.Ready.tcp(port, timeout=0.3),
        "http": trellis.Ready.http(f"http://127.0.0.1:{port}/", timeout=0.3),
        "log": trellis.Ready.log("never printed", timeout=0.3),
    }[kind]
    argv = ("notify", "--no-ready") if kind == "notify" else ("sleeper",)
    with capture_telemetry() as cap:
        with pytest.raises(trellis.StartError) as exc:
            await Supervisor.start_link([cmd("r", *argv, ready=ready)])
        assert isinstance(exc.value, trellis.FailedToStartChild)
        assert is_ready_timeout(exc.value.reason), exc.value.reason
        await wait_gone(await printed_pid(cap, "r"))


async def test_ready_timeout_via_start_child() -> None:
    with capture_telemetry() as cap:
        async with supervised([]) as sup:
            spec = cmd("r", "sleeper", ready=trellis.Ready.log("never printed", timeout=0.3))
            with pytest.raises(trellis.StartError) as exc:
                await sup.start_child(spec)
            assert is_ready_timeout(exc.value.reason), exc.value.reason
            assert await sup.which_children() == []
            await wait_gone(await printed_pid(cap, "r"))


# ---------------------------------------------------------------------------
# Watchdog and health checks
# ---------------------------------------------------------------------------


async def test_watchdog_heartbeats_that_stop_make_it_hung() -> None:
    spec = cmd(
        "w",
        "notify",
        "--beats",
        10,
        "--interval",
        0.1,
        ready=trellis.Ready.notify(timeout=10),
        watchdog=0.5,
        restart="temporary",
    )
    with capture_telemetry() as cap:
        async with supervised([spec]):
            pid = await printed_pid(cap, "w")
            await wait_line(cap, "w", "WATCHDOG_USEC=500000")
            ev = await cap.wait_for("child.exited", child_id="w")
            check_reason(ev["reason"], trellis.Hung, "hung")
            # heartbeats for 1 s (twice the watchdog) kept it alive
            stopped = [
                i
                for i, e in enumerate(cap.events)
                if e["event"] == "process.output" and e["line"].rstrip() == "stopped beating"
            ]
            assert stopped
            assert stopped[0] < cap.events.index(ev)
            await wait_gone(pid)


async def test_sigstopped_child_is_hung_and_restarted() -> None:
    spec = cmd(
        "w",
        "notify",
        "--beats",
        -1,
        "--interval",
        0.05,
        ready=trellis.Ready.notify(timeout=10),
        watchdog=0.5,
    )
    with capture_telemetry() as cap:
        async with supervised([spec]) as sup:
            old = await child_pid(sup, "w")
            os.kill(old.os_pid, signal.SIGSTOP)
            ev = await cap.wait_for("child.exited", child_id="w")
            check_reason(ev["reason"], trellis.Hung, "hung")
            assert ev["restart"] is True
            new = await wait_restarted(sup, "w", old)
            assert new.os_pid != old.os_pid
            await wait_gone(old.os_pid)
            assert alive(new.os_pid)


async def test_health_command_failures_make_it_hung(tmp_path: Path) -> None:
    flag, log = tmp_path / "healthy", tmp_path / "checks"
    flag.touch()
    health = trellis.Health.command(
        prog("check_file", flag, log), interval=0.1, timeout=5.0, failures=3
    )
    with capture_telemetry() as cap:
        async with supervised([cmd("h", "sleeper", health=health, restart="temporary")]) as sup:
            pid = await child_pid(sup, "h")
            await wait_until(
                lambda: log.exists() and log.read_text().count("ok") >= 3, what="3 good checks"
            )
            assert not exited(cap, "h")
            flag.unlink()
            ev = await cap.wait_for("child.exited", child_id="h")
            check_reason(ev["reason"], trellis.Hung, "hung")
            results = log.read_text().split()
            last_ok = len(results) - 1 - results[::-1].index("ok")
            assert results[last_ok + 1 :].count("fail") >= 3
            await wait_gone(pid.os_pid)


async def test_health_command_timeout_is_a_failure() -> None:
    """A check that never exits fails after ``timeout`` and does not outlive its check."""
    before = _prog_processes()
    health = trellis.Health.command(prog("sleeper"), interval=0.1, timeout=0.2, failures=2)
    with capture_telemetry() as cap:
        async with supervised([cmd("h", "sleeper", health=health, restart="temporary")]):
            ev = await cap.wait_for("child.exited", child_id="h")
            check_reason(ev["reason"], trellis.Hung, "hung")
            await wait_until(lambda: not _prog_processes() - before, what="checks killed")


async def test_health_tcp_failures_make_it_hung() -> None:
    port = free_port()
    spec = cmd(
        "t",
        "tcp_server",
        port,
        ready=trellis.Ready.tcp(port, timeout=10),
        health=trellis.Health.tcp(port, interval=0.1, timeout=1.0, failures=2),
        restart="temporary",
    )
    with capture_telemetry() as cap:
        async with supervised([spec]) as sup:
            pid = await child_pid(sup, "t")
            await wait_line(cap, "t", "accepted", count=4)  # readiness + passing checks
            assert not exited(cap, "t")
            os.kill(pid.os_pid, signal.SIGUSR1)  # stop listening, keep running
            ev = await cap.wait_for("child.exited", child_id="t")
            check_reason(ev["reason"], trellis.Hung, "hung")
            assert "closed listener" in lines(cap, "t")
            await wait_gone(pid.os_pid)


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------


async def test_cpu_limit_kill_is_reported(tmp_path: Path) -> None:
    spec = cmd("b", "burn", limits=trellis.Limits(cpu=1), cwd=str(tmp_path), restart="temporary")
    with capture_telemetry() as cap:
        async with supervised([spec]) as sup:
            pid = await child_pid(sup, "b")
            ev = await cap.wait_for("child.exited", child_id="b", timeout=15)
            check_reason(ev["reason"], trellis.LimitExceeded, "limit")
            assert "cpu" in str(ev["reason"].limit).lower()
            await wait_gone(pid.os_pid)


async def test_limits_are_applied() -> None:
    memory = 512 * 2**20
    limits = trellis.Limits(memory=memory, open_files=64, cpu=3600)
    with capture_telemetry() as cap:
        async with supervised([cmd("d", "envdump", limits=limits, restart="temporary")]):
            got = (await dump(cap, "d"))["limits"]
    assert got["RLIMIT_NOFILE"][0] == 64
    assert got["RLIMIT_CPU"][0] == 3600
    assert memory in (got["RLIMIT_AS"][0], got["RLIMIT_DATA"][0])


# ---------------------------------------------------------------------------
# Output: telemetry, floods, log files
# ---------------------------------------------------------------------------


async def test_output_lines_are_telemetry() -> None:
    with capture_telemetry() as cap:
        spec = cmd("f", "flood", 3, "--width", 2, restart="temporary")
        async with supervised([spec]):
            ev = await cap.wait_for("child.exited", child_id="f")
            assert ev["reason"] is NORMAL
            await wait_line(cap, "f", "done")
            out = cap.named("process.output", child_id="f", stream="stdout")
            assert [e["line"].rstrip("\r\n") for e in out] == [
                "out 0 xx",
                "out 1 xx",
                "out 2 xx",
                "done",
            ]
            assert lines(cap, "f", "stderr") == ["err 0 xx", "err 1 xx", "err 2 xx"]
            assert all(isinstance(e["time"], float) for e in out)


async def test_output_flood_does_not_stall() -> None:
    n = 20_000
    with capture_telemetry(["process.output", "child.exited"]) as cap:
        async with supervised([cmd("f", "flood", n, restart="temporary")]) as sup:
            ev = await cap.wait_for("child.exited", child_id="f", timeout=30)
            assert ev["reason"] is NORMAL
            await wait_line(cap, "f", "done", timeout=10)
            assert await sup.count_children()  # the supervisor still answers
    pad = "x" * 60
    assert lines(cap, "f", "stderr") == [f"err {i} {pad}" for i in range(n)]
    assert lines(cap, "f", "stdout") == [*(f"out {i} {pad}" for i in range(n)), "done"]


async def test_very_long_line_does_not_stall() -> None:
    with capture_telemetry(["process.output", "child.exited"]) as cap:
        spec = cmd("f", "flood", 2, "--long", 4_000_000, restart="temporary")
        async with supervised([spec]):
            ev = await cap.wait_for("child.exited", child_id="f", timeout=30)
            assert ev["reason"] is NORMAL
            await wait_line(cap, "f", "done", timeout=10)
    out = lines(cap, "f", "stdout")
    assert out[:2] == ["out 0 " + "x" * 60, "out 1 " + "x" * 60]
    assert out[-1] == "done"


def _numbers(files: Iterable[Path], tag: str) -> list[int]:
    """The line numbers of ``<tag> <n> xxx`` lines in ``files`` (a ``done`` line is skipped)."""
    nums = []
    for f in files:
        for ln in f.read_text().splitlines():
            if ln.endswith("done"):
                continue
            m = re.search(rf"\b{tag} (\d+) x+$", ln)
            assert m, (f, ln)
            nums.append(int(m.group(1)))
    return nums


@pytest.mark.parametrize(
    ("pause", "n", "max_bytes", "backups"),
    [
        pytest.param(0.0005, 300, 1000, 2, id="line_by_line"),
        pytest.param(None, 600, 2000, 3, id="in_bursts"),
    ],
)
async def test_logs_rotating_files(
    tmp_path: Path, pause: float | None, n: int, max_bytes: int, backups: int
) -> None:
    """About twice as many bytes as the kept files hold are written to each stream."""
    logs = tmp_path / "logs"
    logs.mkdir()
    spec = cmd(
        "lg",
        "flood",
        n,
        "--width",
        10,
        *(["--pause", pause] if pause is not None else []),
        logs=trellis.Logs(dir=str(logs), max_bytes=max_bytes, backups=backups),
        restart="temporary",
    )
    with capture_telemetry() as cap:
        async with supervised([spec]):
            await cap.wait_for("child.exited", child_id="lg")
            await wait_line(cap, "lg", "done")
    assert (logs / "lg.out.log").exists()
    assert (logs / "lg.err.log").exists()
    assert "done" in (logs / "lg.out.log").read_text().splitlines()[-1]
    for tag, stream in (("out", "out"), ("err", "err")):
        files = sorted(logs.glob(f"lg.{stream}*"))
        assert len(files) == 1 + backups, files  # rotated, and capped at `backups` old files
        for f in files:
            longest = max(len(ln) + 1 for ln in f.read_text().splitlines())
            assert f.stat().st_size <= max_bytes + longest, f
        nums = sorted(_numbers(files, tag))
        assert len(nums) == len(set(nums))
        assert nums == list(range(nums[0], n)), "the newest lines, contiguous"
        assert nums[0] > 0, "the oldest lines were rotated away"


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "restarted"),
    [
        ("one_for_one", {"b"}),
        ("one_for_all", {"a", "b", "c"}),
        ("rest_for_one", {"b", "c"}),
    ],
)
async def test_strategy_with_os_children(strategy: str, restarted: set[str]) -> None:
    ids = ["a", "b", "c"]
    async with supervised([cmd(i, "sleeper") for i in ids], strategy=strategy) as sup:
        before = {i: await child_pid(sup, i) for i in ids}
        os.kill(before["b"].os_pid, signal.SIGKILL)
        after = {i: await wait_restarted(sup, i, before[i]) for i in sorted(restarted)}
        for i in ids:
            if i in restarted:
                assert after[i].os_pid != before[i].os_pid
                assert alive(after[i].os_pid)
                await wait_gone(before[i].os_pid)
            else:
                assert await child_pid(sup, i) is before[i]
                assert alive(before[i].os_pid)


async def test_rest_for_one_restarts_dependents_of_a_dead_dependency() -> None:
    port = free_port()
    children = [
        cmd("front", "sleeper"),
        cmd("db", "tcp_server", port, ready=trellis.Ready.tcp(port, timeout=10)),
        cmd("app", "client", port, ready=trellis.Ready.log("connected", timeout=10)),
    ]
    with capture_telemetry() as cap:
        async with supervised(children, strategy="rest_for_one", intensity=10) as sup:
            front, db, app = [await child_pid(sup, i) for i in ("front", "db", "app")]
            os.kill(db.os_pid, signal.SIGKILL)
            new_db = await wait_restarted(sup, "db", db)
            new_app = await wait_restarted(sup, "app", app)
            await wait_line(cap, "app", "connected", count=2)  # reconnected to the new db
            await wait_gone(db.os_pid, app.os_pid)
            assert alive(new_db.os_pid)
            assert alive(new_app.os_pid)
            assert await child_pid(sup, "front") is front
            assert alive(front.os_pid)
            [ev] = exited(cap, "db")
            check_reason(ev["reason"], trellis.Signaled, "killed")


async def test_simple_one_for_one_with_os_children() -> None:
    template = cmd("worker", "sleeper")
    async with supervised([template], strategy="simple_one_for_one") as sup:
        p1 = await sup.start_child([])
        p2 = await sup.start_child([])
        assert isinstance(p1, trellis.CommandPid)
        assert isinstance(p2, trellis.CommandPid)
        assert p1.os_pid != p2.os_pid
        os.kill(p1.os_pid, signal.SIGKILL)
        await wait_gone(p1.os_pid)

        async with asyncio.timeout(5):
            while True:
                kids = [c.pid for c in await sup.which_children()]
                if (
                    len(kids) == 2
                    and p1 not in kids
                    and all(isinstance(k, trellis.CommandPid) for k in kids)
                ):
                    break
                await asyncio.sleep(0.01)
        assert p2 in kids
        [p3] = [k for k in kids if k is not p2]
        assert alive(p3.os_pid)
        await sup.terminate_child(p2)
        await wait_gone(p2.os_pid)
        assert [c.pid for c in await sup.which_children()] == [p3]


async def test_dynamic_supervisor_with_os_children() -> None:
    sup = await trellis.DynamicSupervisor.start_link()
    try:
        pid = await sup.start_child(cmd("d", "sleeper"))
        assert isinstance(pid, trellis.CommandPid)
        assert alive(pid.os_pid)
        await sup.terminate_child(pid)
        await wait_gone(pid.os_pid)
        pid2 = await sup.start_child(cmd("d", "sleeper"))
        assert alive(pid2.os_pid)
    finally:
        await sup.stop()
    await wait_gone(pid2.os_pid)

"""Floods of idle connections cannot take the tree down or lock operators out: each
listener has a connection budget below the descriptor limit (a new connection evicts the
longest idle one, an unauthenticated one first), and a connection that does not send a
request's headers within ``idle_timeout`` is closed."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control._ctlenv import TOKEN, start_env, stop_env
from trellis.control._listen import default_max_connections

ROOT = Path(__file__).resolve().parents[2]


async def _closed_within(sock: socket.socket, bound: float) -> float:
    """Seconds until the server closes ``sock`` (reading and dropping what it sends);
    fails after ``bound``."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    t0 = time.monotonic()
    while True:
        left = bound - (time.monotonic() - t0)
        assert left > 0, f"the connection was still open after {bound} s"
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
        except ConnectionResetError:
            return time.monotonic() - t0
        if not data:
            return time.monotonic() - t0


def _unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


def _request(s: socket.socket, path: str, headers: str = "") -> bytes:
    """Send one keep-alive GET on ``s`` (blocking) and return the response head+body."""
    s.setblocking(True)
    s.settimeout(10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{headers}\r\n".encode())
    out = b""
    while b"\r\n\r\n" not in out:
        out += s.recv(65536)
    head, _, body = out.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


# ---------------------------------------------------------------------------
# Idle timeout
# ---------------------------------------------------------------------------


async def test_a_silent_connection_is_closed_after_the_idle_timeout(short_dir: Path) -> None:
    env = await start_env(short_dir, idle_timeout=0.5)
    try:
        host, port = env.ctl.tcp_address  # type: ignore[misc]
        for connect in (lambda: _unix(env.sock), lambda: socket.create_connection((host, port))):
            with connect() as s:
                waited = await _closed_within(s, 20)
                assert waited >= 0.4  # not closed at once: it had its idle_timeout
    finally:
        await stop_env(env)


async def test_trickling_headers_do_not_keep_a_connection_open(short_dir: Path) -> None:
    """A slowloris client sending one header byte at a time is closed once the request's
    headers are not complete within idle_timeout of connecting."""
    env = await start_env(short_dir, idle_timeout=0.5)
    try:
        with _unix(env.sock) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
            t0 = time.monotonic()
            closed = False
            while time.monotonic() - t0 < 20:
                try:
                    s.sendall(b"X")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                await asyncio.sleep(0.1)
            assert closed, "the trickling connection was never closed"
            assert time.monotonic() - t0 >= 0.3
    finally:
        await stop_env(env)


async def test_keep_alive_connection_is_closed_when_idle_after_a_response(
    short_dir: Path,
) -> None:
    env = await start_env(short_dir, idle_timeout=0.5)
    try:
        with _unix(env.sock) as s:
            reply = await asyncio.to_thread(_request, s, "/healthz")
            assert reply.startswith(b"HTTP/1.1 200")
            await _closed_within(s, 20)
    finally:
        await stop_env(env)


async def test_an_event_stream_is_not_cut_by_the_idle_timeout(short_dir: Path) -> None:
    """The timeout is for a request's headers: a long response (an event stream) runs on."""
    env = await start_env(short_dir, idle_timeout=0.3, keepalive=0.1)
    try:
        async with env.unix().stream("GET", "/v1/events") as r:
            assert r.status_code == 200
            t0 = time.monotonic()
            survived = False
            async for _chunk in r.aiter_raw():
                if time.monotonic() - t0 > 1.2:  # four idle timeouts later, still streaming
                    survived = True
                    break
            assert survived, "the event stream ended"
    finally:
        await stop_env(env)


# ---------------------------------------------------------------------------
# Connection budget
# ---------------------------------------------------------------------------


async def test_a_flood_evicts_idle_connections_and_an_operator_still_gets_in(
    short_dir: Path,
) -> None:
    """With 8 connections per listener, 40 idle connections on each do not stop a fresh
    client on the Unix socket or on TCP (with its token) from being served; the server
    keeps at most 8 open per listener."""
    env = await start_env(short_dir, max_connections=8, idle_timeout=60)
    host, port = env.ctl.tcp_address  # type: ignore[misc]
    flood: list[socket.socket] = []

    def connect() -> None:  # in a thread: a blocking connect waits for this loop's accept
        for _ in range(40):
            flood.append(_unix(env.sock))
            flood.append(socket.create_connection((host, port)))

    try:
        await asyncio.to_thread(connect)
        await asyncio.sleep(0.2)
        http = env.ctl._http
        assert http is not None
        assert [len(lis.conns) for lis in http.listeners] == [8, 8]
        assert (await env.unix().get("/v1/tree")).status_code == 200
        assert (await env.tcp().get("/v1/tree")).status_code == 200
    finally:
        for s in flood:
            s.close()
        await stop_env(env)


async def test_an_authenticated_idle_connection_outlives_unauthenticated_ones(
    short_dir: Path,
) -> None:
    """When the budget is spent, idle connections that never made an authorised request
    are evicted first: an operator's keep-alive connection survives a flood."""
    env = await start_env(short_dir, max_connections=4, idle_timeout=60)
    host, port = env.ctl.tcp_address  # type: ignore[misc]
    flood: list[socket.socket] = []
    with socket.create_connection((host, port)) as mine:
        try:
            auth = f"Authorization: Bearer {TOKEN}\r\n"
            reply = await asyncio.to_thread(_request, mine, "/healthz", auth)
            assert reply.startswith(b"HTTP/1.1 200")

            def connect() -> None:
                for _ in range(20):
                    flood.append(socket.create_connection((host, port)))

            await asyncio.to_thread(connect)
            await asyncio.sleep(0.2)
            reply = await asyncio.to_thread(_request, mine, "/healthz", auth)
            assert reply.startswith(b"HTTP/1.1 200")
        finally:
            for s in flood:
                s.close()
            await stop_env(env)


def test_default_budget_is_derived_from_the_descriptor_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = (
        "import resource; from trellis.control._listen import default_max_connections as d\n"
        "out = []\n"
        "for n in (64, 256, 1024, 20000):\n"
        f"    resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, {hard}), {hard}))\n"
        "    out.append(d())\n"
        "print(out)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    expected = [8, 32, 128, min(512, min(20000, hard) // 8)]
    assert json.loads(out) == expected
    assert 8 <= default_max_connections() <= 512


# ---------------------------------------------------------------------------
# trellis run with a low descriptor limit
# ---------------------------------------------------------------------------

TREE = textwrap.dedent(
    """
    [supervisor]
    name = "fl"
    [[supervisor.children]]
    id = "os"
    command = ["{python}", "-c", "import time; time.sleep(600)"]
    [control]
    tcp = "127.0.0.1:{port}"
    idle_timeout = 60
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def run_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tfl-", dir="/tmp") as d:
        os.chmod(d, 0o700)
        yield Path(d)


def _limit_fds() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trellis", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _wait_for(pred: object, bound: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():  # type: ignore[operator]
        assert time.monotonic() - t0 < bound, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_flood_under_trellis_run_leaves_children_and_operators_working(
    run_dir: Path,
) -> None:
    """`trellis run` with `ulimit -n 256`: 400 idle TCP connections without a token and
    300 idle connections on the Unix socket; then restarting an OS child still works (no
    EMFILE, the root does not give up) and `trellis status` over the socket answers."""
    port = _free_port()
    tree = run_dir / "tree.toml"
    tree.write_text(TREE.format(python=sys.executable, port=port))
    sock = run_dir / "fl.sock"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "TRELLIS_CONTROL_TOKEN": TOKEN,
        "TRELLIS_STATE_DIR": str(run_dir),
    }
    env.pop("TRELLIS_SOCKET", None)
    env.pop("TRELLIS_TREE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", str(tree), "--socket", str(sock)],
        env=env,
        cwd=run_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_limit_fds,
    )
    flood: list[socket.socket] = []
    try:
        ctl = ("--socket", str(sock))

        def tree() -> dict[str, Any] | None:
            # httpx leaks its socket when a Unix connect fails: probe first.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(str(sock)) != 0:
                    return None
            try:
                with httpx.Client(
                    transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://t"
                ) as c:
                    r = c.get("/v1/tree", timeout=10)
            except (httpx.TransportError, OSError):
                return None
            return r.json() if r.status_code == 200 else None

        _wait_for(lambda: tree() is not None, 60, "the tree to start")
        before = tree()
        assert before is not None
        [child] = before["root"]["children"]
        old_pid = child["os_pid"]
        assert old_pid is not None

        # Non-blocking connects: the kernel keeps retrying the ones the server's accept
        # queue cannot take yet, as a flood's would.
        for _ in range(400):
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            t.setblocking(False)
            t.connect_ex(("127.0.0.1", port))
            flood.append(t)
        for _ in range(300):
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            u.setblocking(False)
            u.connect_ex(str(sock))
            flood.append(u)
        time.sleep(2.0)

        r = _cli("restart", "fl/os", *ctl, env=env)
        assert r.returncode == 0, r.stderr
        r = _cli("status", "--json", *ctl, env=env)
        assert r.returncode == 0, r.stderr
        [child] = json.loads(r.stdout)["root"]["children"]
        assert child["state"] == "running"
        assert child["os_pid"] not in (None, old_pid)
        assert proc.poll() is None, "the tree stopped"
        # TCP with a token is still served too.
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r2 = httpx.get(f"http://127.0.0.1:{port}/v1/tree", headers=auth, timeout=10)
        assert r2.status_code == 200
    finally:
        for s in flood:
            s.close()
        proc.terminate()
        try:
            _out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    assert b"connections open (the limit)" in err, "the flood never reached the budget"
    assert b"EMFILE" not in err, err.decode()[-3000:]
    assert b"Too many open files" not in err, err.decode()[-3000:]


# ---------------------------------------------------------------------------
# Settings in the tree file
# ---------------------------------------------------------------------------


def test_tree_file_connection_settings() -> None:
    """[control] idle_timeout and max_connections reach the control server; bad values
    are errors naming the key and line."""
    from trellis._operate import operations
    from trellis.config import ConfigError, loads

    tree = loads(
        textwrap.dedent(
            """
            [supervisor]
            name = "t"
            [control]
            idle_timeout = 2.5
            max_connections = 16
            """
        )
    )
    ops = operations("t", dict(tree.settings), journal=False)
    assert ops.control_options == {"idle_timeout": 2.5, "max_connections": 16}
    with pytest.raises(ConfigError) as info:
        loads("[supervisor]\nname = 't'\n[control]\nidle_timeout = 0\nmax_connections = 0\n")
    found = [(i.line, i.path) for i in info.value.errors]
    assert found == [(4, "control.idle_timeout"), (5, "control.max_connections")]

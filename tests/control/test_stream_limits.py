"""Long-lived streams (``/v1/events``, ``/v1/logs?follow=true``) cannot lock operators
out: a client without the operator role (a read token, a uid in ``read_uids``) holds at
most a quarter of a listener's connections as streams, streams in all at most three
quarters, and when the listener is full an operator's connection closes the oldest
stream of a client without the operator role. All over real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from control._ctlenv import TOKEN, start_env, stop_env
from trellis.control._listen import stream_limits

READ = "ci-read-token-0123456789"
READ2 = "ci2-read-token-012345678"


def _open_stream(connect: object, path: str, token: str | None) -> tuple[socket.socket, int]:
    """Open a connection with ``connect()``, send a GET for ``path`` and return the socket
    and the response's status (blocking: call in a thread)."""
    s: socket.socket = connect()  # type: ignore[operator]
    s.settimeout(10)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{auth}\r\n".encode())
    head = b""
    while b"\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed before a status line")
        head += chunk
    return s, int(head.split(b" ", 2)[1])


def _cut(s: socket.socket, bound: float = 10.0) -> bool:
    """Whether the server closed ``s`` within ``bound`` seconds (reading what it sends)."""
    s.settimeout(bound)
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_limits_follow_the_connection_budget() -> None:
    assert stream_limits(128) == (96, 32)
    assert stream_limits(16) == (12, 4)
    assert stream_limits(8) == (6, 2)
    assert stream_limits(1) == (1, 1)
    for n in range(1, 600):
        total, per = stream_limits(n)
        assert 1 <= per <= total <= n
        if n > 1:
            assert total < n  # room is kept for requests


@pytest.mark.parametrize("path", ["/v1/events", "/v1/events?history=5"])
async def test_a_read_token_cannot_hold_every_connection(short_dir: Path, path: str) -> None:
    """A read token opening max_connections streams gets only its share (429 for the
    rest), and an operator's request is still answered (it was reset before)."""
    env = await start_env(
        short_dir,
        tokens={"ops": TOKEN, "ci": READ},
        roles={"ci": "read"},
        max_connections=8,
        idle_timeout=60,
    )
    host, port = env.ctl.tcp_address  # type: ignore[misc]
    held: list[socket.socket] = []
    try:

        def flood() -> list[int]:
            statuses = []
            for _ in range(8):
                s, status = _open_stream(lambda: socket.create_connection((host, port)), path, READ)
                held.append(s)
                statuses.append(status)
            return statuses

        statuses = await asyncio.to_thread(flood)
        _total, per = stream_limits(8)
        assert statuses[:per] == [200] * per
        assert set(statuses[per:]) == {429}, statuses
        r = await env.tcp().get("/v1/tree")
        assert r.status_code == 200
        # the refusal names the limit, and the client's streams are still open
        r = await env.tcp(READ).get(path)
        assert r.status_code == 429
        assert "limit per client" in r.json()["error"]
        assert r.headers["retry-after"]
        # the operator can still stream too
        s, status = await asyncio.to_thread(
            _open_stream, lambda: socket.create_connection((host, port)), path, TOKEN
        )
        held.append(s)
        assert status == 200
    finally:
        for s in held:
            s.close()
        await stop_env(env)


async def test_a_stream_ended_frees_its_place(short_dir: Path) -> None:
    env = await start_env(
        short_dir, tokens={"ops": TOKEN, "ci": READ}, roles={"ci": "read"}, max_connections=8
    )
    host, port = env.ctl.tcp_address  # type: ignore[misc]
    try:
        for _ in range(3):  # the limit is 2 per client: each round closes its streams
            socks = []
            for _ in range(2):
                s, status = await asyncio.to_thread(
                    _open_stream, lambda: socket.create_connection((host, port)), "/v1/events", READ
                )
                socks.append(s)
                assert status == 200
            for s in socks:
                s.close()
            http = env.ctl._http
            assert http is not None
            for _ in range(200):
                if not any(lis.streams for lis in http.listeners):
                    break
                await asyncio.sleep(0.02)
            assert not any(lis.streams for lis in http.listeners)
    finally:
        await stop_env(env)


async def test_streams_in_all_are_limited_and_an_operator_stream_takes_a_readers_place(
    short_dir: Path,
) -> None:
    """Two read tokens fill the listener's streams (the next gets 503); an operator's
    stream then closes the oldest reader's stream instead of being refused."""
    env = await start_env(
        short_dir,
        tokens={"ops": TOKEN, "ci": READ, "ci2": READ2, "ci3": READ + "x", "ci4": READ2 + "x"},
        roles={"ci": "read", "ci2": "read", "ci3": "read", "ci4": "read"},
        max_connections=8,
        idle_timeout=60,
    )
    host, port = env.ctl.tcp_address  # type: ignore[misc]
    total, per = stream_limits(8)  # 6 in all, 2 per client
    held: list[tuple[socket.socket, int]] = []
    try:

        def fill() -> None:
            for token in (READ, READ2, READ + "x", READ2 + "x"):
                for _ in range(per):
                    held.append(
                        _open_stream(
                            lambda: socket.create_connection((host, port)), "/v1/events", token
                        )
                    )

        await asyncio.to_thread(fill)
        statuses = [st for _s, st in held]
        assert statuses.count(200) == total
        assert statuses[total:] == [503] * (len(statuses) - total)
        r = await env.tcp(READ2 + "x").get("/v1/events")
        assert r.status_code in (429, 503)
        s, status = await asyncio.to_thread(
            _open_stream, lambda: socket.create_connection((host, port)), "/v1/events", TOKEN
        )
        held.append((s, status))
        assert status == 200
        assert await asyncio.to_thread(_cut, held[0][0]), "the oldest reader stream stayed open"
        assert (await env.tcp().get("/v1/tree")).status_code == 200
    finally:
        for s, _st in held:
            s.close()
        await stop_env(env)


async def test_a_full_listener_lets_an_operator_in_by_closing_a_readers_stream(
    short_dir: Path,
) -> None:
    """One connection in all: a reader's stream holds it; an operator's new connection
    closes that stream (no idle connection to close) and is answered."""
    env = await start_env(
        short_dir,
        tokens={"ops": TOKEN, "ci": READ},
        roles={"ci": "read"},
        max_connections=1,
        idle_timeout=60,
    )
    host, port = env.ctl.tcp_address  # type: ignore[misc]
    try:
        s, status = await asyncio.to_thread(
            _open_stream, lambda: socket.create_connection((host, port)), "/v1/events", READ
        )
        with s:
            assert status == 200
            r = await env.tcp().get("/v1/tree")
            assert r.status_code == 200
            assert await asyncio.to_thread(_cut, s)
    finally:
        await stop_env(env)


def _nobody_streams(sock: Path, n: int) -> tuple[int, int, int]:
    """A forked process running as uid 65534 opening ``n`` event streams on ``sock``,
    writing each status to a pipe, then holding them until its other pipe closes:
    ``(pid, status pipe to read, pipe to close)``."""
    out_r, out_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(out_r)
            os.close(hold_w)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            held = []
            for _ in range(n):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(10)
                s.connect(str(sock))
                s.sendall(b"GET /v1/events HTTP/1.1\r\nHost: t\r\n\r\n")
                head = b""
                while b"\r\n" not in head:
                    head += s.recv(4096)
                os.write(out_w, head.split(b" ", 2)[1] + b"\n")
                held.append(s)
            os.write(out_w, b"held\n")
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    os.close(out_w)
    os.close(hold_r)
    return pid, out_r, hold_w


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as uid 65534")
async def test_a_read_uid_cannot_lock_root_out_of_the_unix_socket(short_dir: Path) -> None:
    os.chmod(short_dir, 0o755)
    env = await start_env(short_dir, read_uids=[65534], max_connections=8, idle_timeout=60)
    pid, out, hold = _nobody_streams(env.sock, 8)
    try:
        with os.fdopen(out) as reader:
            lines = []
            while True:
                line = await asyncio.to_thread(reader.readline)
                assert line, f"the uid 65534 client ended early: {lines}"
                if line.strip() == "held":
                    break
                lines.append(line.strip())
        _total, per = stream_limits(8)
        assert lines == ["200"] * per + ["429"] * (8 - per)
        r = await env.unix().get("/v1/tree")
        assert r.status_code == 200
    finally:
        os.close(hold)
        await asyncio.to_thread(os.waitpid, pid, 0)
        await stop_env(env)


def test_the_cli_says_busy_not_absent_when_the_tree_resets_its_connection(
    short_dir: Path,
) -> None:
    """A socket that accepts and resets every connection is a tree refusing (exit 1),
    not "no Trellis tree is listening" (exit 3)."""
    path = short_dir / "busy.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = False

    def serve() -> None:
        while not stop:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # linger 0: a reset, as the listener's abort() sends

    import threading

    t = threading.Thread(target=serve)
    t.start()
    try:
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": str(root / "src")}
        r = subprocess.run(
            [sys.executable, "-m", "trellis", "status", "--socket", str(path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert "no Trellis tree is listening" not in r.stderr
        assert "closed the connection without answering" in r.stderr
        assert str(path) in r.stderr
    finally:
        stop = True
        t.join()
        srv.close()

"""Who may use the control API: the Unix socket's mode and peer uid, TCP bearer tokens,
and the settings the server refuses to start with."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from control._ctlenv import TOKEN, Env
from trellis.control import ControlError, ControlServer, default_socket_path, socket_dir
from trellis.testing import capture_telemetry

# ---------------------------------------------------------------------------
# The Unix socket
# ---------------------------------------------------------------------------


async def test_socket_file_is_mode_0600(env: Env) -> None:
    st = env.sock.lstat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()


async def test_missing_parent_directory_is_created_0700(short_dir: Path) -> None:
    path = short_dir / "run" / "trellis" / "c.sock"
    ctl = ControlServer(socket=path)
    await ctl.start()
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    finally:
        await ctl.stop()
    assert not path.exists(), "the socket file is removed on stop"


async def test_stale_socket_is_replaced(short_dir: Path) -> None:
    """A socket file nobody listens on (a crashed tree's) is removed and rebound."""
    path = short_dir / "c.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()  # the file stays, with no listener
    assert path.exists()
    ctl = ControlServer(socket=path)
    await ctl.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://t"
        ) as c:
            assert (await c.get("/healthz")).status_code == 200
    finally:
        await ctl.stop()


async def test_live_socket_is_not_taken_over(env: Env) -> None:
    """A second server on a socket someone listens on refuses to start, and the first
    keeps its socket file."""
    second = ControlServer(socket=env.sock)
    with pytest.raises(ControlError, match="already listening on"):
        await second.start()
    assert env.sock.exists()
    assert (await env.unix().get("/healthz")).status_code == 200


async def test_a_file_that_is_not_a_socket_is_refused(short_dir: Path) -> None:
    path = short_dir / "c.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        await ControlServer(socket=path).start()
    assert path.read_text() == "precious"


async def test_too_long_socket_path_is_refused(short_dir: Path) -> None:
    path = short_dir / ("x" * 120) / "c.sock"
    with pytest.raises(ControlError, match="limited to 107 bytes"):
        await ControlServer(socket=path).start()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs /usr/bin/python3")
@pytest.mark.stdlib_loop  # create_subprocess_exec(user=...): uvloop has no user option
async def test_other_uids_are_refused_by_peer_credentials(short_dir: Path) -> None:
    """Even when the socket's mode lets another user connect, requests from a uid other
    than the server's and root's get 403 (SO_PEERCRED is checked per connection)."""
    os.chmod(short_dir, 0o755)
    path = short_dir / "c.sock"
    ctl = ControlServer(socket=path)
    await ctl.start()
    try:
        path.chmod(0o666)  # only to let the other user reach the peer check
        code = textwrap.dedent(
            f"""
            import socket
            s = socket.socket(socket.AF_UNIX)
            s.connect({str(path)!r})
            s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
            out = b""
            while chunk := s.recv(4096):
                out += chunk
            print(out.decode())
            """
        )
        import asyncio

        proc = await asyncio.create_subprocess_exec(
            "/usr/bin/python3",  # the venv's interpreter may not be readable by that user
            "-c",
            code,
            user=65534,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        text = out.decode()
        assert text.startswith("HTTP/1.1 403"), text
        assert "uid 65534 may not use this control socket" in text
    finally:
        await ctl.stop()


# ---------------------------------------------------------------------------
# TCP
# ---------------------------------------------------------------------------


async def test_tcp_without_token_is_401_with_challenge(env: Env) -> None:
    for path in ("/healthz", "/v1/tree", "/metrics", "/openapi.json", "/v1/nothing"):
        r = await env.tcp(None).get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "bearer token" in r.json()["error"]


@pytest.mark.parametrize("header", ["Basic b3BzOnB3", "Bearer", TOKEN, "Token x"])
async def test_tcp_malformed_authorization_is_401(env: Env, header: str) -> None:
    async with httpx.AsyncClient(base_url=env.tcp_url) as c:
        r = await c.get("/healthz", headers={"Authorization": header})
    assert r.status_code == 401
    assert "malformed" in r.json()["error"]


async def test_tcp_wrong_token_is_403(env: Env) -> None:
    r = await env.tcp("not-the-token").get("/v1/tree")
    assert r.status_code == 403
    assert r.json() == {"error": "this bearer token is not valid here"}
    r = await env.tcp("not-the-token").post("/v1/children/shop/db/restart")
    assert r.status_code == 403


async def test_tcp_right_token_works_and_is_recorded_by_name(env: Env) -> None:
    """With the right token every endpoint answers; an action records who=token:<name>
    and the TCP peer as source."""
    c = env.tcp()
    assert (await c.get("/healthz")).status_code == 200
    assert (await c.get("/v1/tree")).json()["root"]["path"] == "shop"
    assert (await c.get("/readyz")).status_code == 200
    assert (await c.get("/metrics")).status_code == 200
    with capture_telemetry(["operator.action"]) as cap:
        r = await c.post("/v1/children/shop/web/restart")
    assert r.status_code == 200, r.text
    [action] = cap.events
    assert action["who"] == "token:ops"
    assert action["source"].startswith("tcp:127.0.0.1:")
    assert int(action["source"].rsplit(":", 1)[1]) != env.ctl.tcp_address[1]  # type: ignore[index]


async def test_scheme_is_case_insensitive(env: Env) -> None:
    async with httpx.AsyncClient(base_url=env.tcp_url) as c:
        r = await c.get("/healthz", headers={"Authorization": f"bearer {TOKEN}"})
    assert r.status_code == 200


async def test_several_tokens_each_named(short_dir: Path) -> None:
    from control._ctlenv import start_env, stop_env

    e = await start_env(short_dir, tokens={"ops": TOKEN, "ci": "ci-token-abcdefghijklmnop"})
    try:
        with capture_telemetry(["operator.action"]) as cap:
            r = await e.tcp("ci-token-abcdefghijklmnop").post("/v1/children/db/restart")
        assert r.status_code == 200
        assert cap.events[0]["who"] == "token:ci"
    finally:
        await stop_env(e)


@pytest.mark.parametrize("tcp", ["127.0.0.1:0", "0.0.0.0:0", "[::1]:0", "localhost:0"])
@pytest.mark.parametrize("tokens", [None, {}])
def test_tcp_without_tokens_refuses_to_start(tcp: str, tokens: Any) -> None:
    """TCP needs a token, on loopback too: the constructor refuses, naming the setting."""
    with pytest.raises(ControlError, match=r"tcp: the control API listens on TCP .* only with"):
        ControlServer(socket=False, tcp=tcp, tokens=tokens)


def test_empty_token_is_refused() -> None:
    with pytest.raises(ControlError, match="the token named 'ops' is empty"):
        ControlServer(tcp="127.0.0.1:0", tokens={"ops": ""})


@pytest.mark.parametrize(
    ("tcp", "message"),
    [
        ("8470", "expected HOST:PORT"),
        (":8470", "expected HOST:PORT"),
        ("localhost:http", "not a number"),
        ("localhost:70000", "out of range"),
    ],
)
def test_bad_tcp_setting(tcp: str, message: str) -> None:
    with pytest.raises(ControlError, match=message):
        ControlServer(tcp=tcp, tokens={"ops": TOKEN})


async def test_tcp_only_server(short_dir: Path) -> None:
    """tcp without socket: no Unix socket is created."""
    ctl = ControlServer(tcp="127.0.0.1:0", tokens={"ops": TOKEN})
    assert ctl.socket_path is None
    await ctl.start()
    try:
        assert ctl.tcp_address is not None
        host, port = ctl.tcp_address
        async with httpx.AsyncClient(
            base_url=f"http://{host}:{port}", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as c:
            assert (await c.get("/healthz")).status_code == 200
    finally:
        await ctl.stop()


async def test_port_in_use_is_a_clear_error(env: Env) -> None:
    host, port = env.ctl.tcp_address  # type: ignore[misc]
    other = ControlServer(socket=False, tcp=f"{host}:{port}", tokens={"ops": TOKEN})
    with pytest.raises(ControlError, match=f"cannot listen on {host}:{port}"):
        await other.start()


# ---------------------------------------------------------------------------
# Default socket path
# ---------------------------------------------------------------------------


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRELLIS_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert default_socket_path() == Path("/run/user/1234/trellis/control.sock")
    assert default_socket_path("shop") == Path("/run/user/1234/trellis/shop.sock")
    assert default_socket_path("a b/c") == Path("/run/user/1234/trellis/a_b_c.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert socket_dir() == Path(f"/tmp/trellis-{os.getuid()}")
    assert default_socket_path() == Path(f"/tmp/trellis-{os.getuid()}/control.sock")
    monkeypatch.setenv("TRELLIS_SOCKET", "/srv/t.sock")
    assert default_socket_path() == Path("/srv/t.sock")
    assert default_socket_path("shop") == Path("/srv/t.sock")


async def test_socket_true_uses_the_default_path(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRELLIS_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir))
    for ctl in (ControlServer(socket=True), ControlServer()):
        assert ctl.socket_path == short_dir / "trellis" / "control.sock"
    ctl = ControlServer()
    await ctl.start()
    try:
        assert (short_dir / "trellis" / "control.sock").exists()
    finally:
        await ctl.stop()


async def test_default_directory_open_to_others_is_refused(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default socket directory (guessable under /tmp: anyone could make it first)
    must be ours with mode 0700, else the server refuses it."""
    monkeypatch.delenv("TRELLIS_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir))
    d = short_dir / "trellis"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(ControlError, match=r"must be owned by uid \d+ with mode 0700 .*0777"):
        await ControlServer(socket=True).start()
    os.chmod(d, 0o700)
    ctl = ControlServer(socket=True)
    await ctl.start()
    await ctl.stop()

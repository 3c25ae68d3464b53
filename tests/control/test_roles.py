"""Token roles: a ``read`` token may look (tree, events, metrics, health) but not act
(restart, stop, start, stop the tree: 403 naming its role); refusals are logged and
emitted as ``operator.denied`` (journaled), rate-limited."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control._ctlenv import TOKEN, Env, FakeMetrics, start_env, stop_env
from trellis._operate import OperationsError, operations, parse_token_roles, parse_tokens
from trellis.control import ControlError, ControlServer
from trellis.control._server import DENIED_PER_MINUTE, READ_ROUTES
from trellis.testing import capture_telemetry

READ = "ci-read-token-0123456789"


@pytest.fixture
async def renv(short_dir: Path) -> AsyncIterator[Env]:
    e = await start_env(
        short_dir,
        tokens={"ops": TOKEN, "ci": READ},
        roles={"ci": "read"},
        metrics=FakeMetrics(),
    )
    try:
        yield e
    finally:
        await stop_env(e)


async def test_a_read_token_can_look(renv: Env) -> None:
    c = renv.tcp(READ)
    for path in ("/v1/tree", "/v1/events?follow=false", "/metrics", "/healthz", "/readyz"):
        r = await c.get(path)
        assert r.status_code == 200, (path, r.text)
    assert (await c.get("/v1/nothing")).status_code == 404  # no route: not a 403


async def test_a_read_token_cannot_act(renv: Env) -> None:
    c = renv.tcp(READ)
    db = await renv.child("db")
    with capture_telemetry(["operator.denied", "operator.action"]) as cap:
        for path in (
            "/v1/children/shop/db/restart",
            "/v1/children/shop/db/stop",
            "/v1/children/shop/db/start",
            "/v1/stop",
        ):
            r = await c.post(path)
            assert r.status_code == 403, (path, r.text)
            assert r.json()["error"] == (
                f"token:ci has the read role: POST {path} needs the operator role"
            )
    assert await renv.child("db") is db, "the child was not touched"
    assert not renv.stop_requested.is_set(), "the tree was not stopped"
    assert [e["event"] for e in cap.events] == ["operator.denied"] * 4
    first = cap.events[0]
    assert first["who"] == "token:ci"
    assert first["status"] == 403
    assert first["method"] == "POST"
    assert first["target"] == "/v1/children/shop/db/restart"
    assert first["source"].startswith("tcp:127.0.0.1:")
    assert first["node"] == "test-node"
    # an operator token (no role given: operator) may
    r = await renv.tcp(TOKEN).post("/v1/children/shop/db/restart")
    assert r.status_code == 200, r.text


async def test_the_unix_socket_peer_is_an_operator(renv: Env) -> None:
    r = await renv.unix().post("/v1/children/shop/web/restart")
    assert r.status_code == 200, r.text


async def test_refusals_are_logged_and_emitted_but_rate_limited(
    renv: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """30 bad requests: DENIED_PER_MINUTE events and log lines, the rest counted; the
    first refusal of the next minute says how many were left out."""
    c = renv.tcp("not-a-valid-token-at-all")
    with (
        capture_telemetry(["operator.denied"]) as cap,
        caplog.at_level(logging.WARNING, "trellis.control"),
    ):
        for _ in range(20):
            assert (await c.get("/v1/tree")).status_code == 403
        for _ in range(10):
            assert (await renv.tcp(None).get("/v1/tree")).status_code == 401
    assert len(cap.events) == DENIED_PER_MINUTE
    assert cap.events[0]["error"] == "this bearer token is not valid here"
    assert cap.events[0]["who"] is None
    refused = [r for r in caplog.records if "refused GET /v1/tree" in r.getMessage()]
    assert len(refused) == DENIED_PER_MINUTE
    # a minute later (moved back by hand: the window is the process's monotonic clock)
    start, shown, suppressed = renv.ctl._denied_window
    assert suppressed == 30 - DENIED_PER_MINUTE
    renv.ctl._denied_window = (start - 61.0, shown, suppressed)
    with capture_telemetry(["operator.denied"]) as cap:
        assert (await renv.tcp(None).get("/v1/tree")).status_code == 401
    [event] = cap.events
    assert event["suppressed"] == 30 - DENIED_PER_MINUTE
    assert event["status"] == 401
    assert event["error"].startswith("authorization missing")


def test_every_route_has_a_role() -> None:
    """The read routes are exactly the ones that only look; everything else (actions)
    needs an operator. A new action route is safe by default."""
    app = ControlServer(socket=False, tcp="127.0.0.1:0", tokens={"ops": TOKEN}).app
    for route in app.routes:
        path = getattr(route, "path", "")
        methods = set(getattr(route, "methods", None) or ())
        if path in READ_ROUTES:
            assert methods <= {"GET", "HEAD"}, f"{path} acts ({methods}) but is marked read"
        else:
            assert "POST" in methods, f"{path} only reads: mark it in READ_ROUTES"


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        ({"ops": "admin"}, "the token named 'ops' has role 'admin'; roles are read and operator"),
        ({"nobody": "read"}, "no token is named 'nobody'"),
    ],
)
def test_bad_roles_are_refused(roles: dict[str, str], message: str) -> None:
    with pytest.raises(ControlError, match=message):
        ControlServer(tcp="127.0.0.1:0", tokens={"ops": TOKEN}, roles=roles)


# ---------------------------------------------------------------------------
# The syntax: name:token[:role] in $TRELLIS_CONTROL_TOKEN
# ---------------------------------------------------------------------------


def test_token_roles_syntax() -> None:
    tokens, roles = parse_token_roles(f"ops:{TOKEN}:operator, ci:{READ}:read ,old:{TOKEN}x", "V")
    assert tokens == {"ops": TOKEN, "ci": READ, "old": TOKEN + "x"}
    assert roles == {"ops": "operator", "ci": "read", "old": "operator"}
    # a bare token, as before roles: named default, an operator
    assert parse_token_roles(TOKEN, "V") == ({"default": TOKEN}, {"default": "operator"})
    assert parse_tokens(f"ci:{READ}:read", "V") == {"ci": READ}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (f"ops:{TOKEN}:admin", r"V: the token named 'ops' has role 'admin'"),
        ("ops:short:read", r"V: each token needs at least 16 characters"),
    ],
)
def test_bad_token_roles(value: str, message: str) -> None:
    with pytest.raises(OperationsError, match=message):
        parse_token_roles(value, "V")


def test_trellis_run_passes_the_roles_to_the_control_api() -> None:
    ops = operations(
        "shop",
        {"control": {"tcp": ("127.0.0.1", 0)}},
        journal=False,
        environ={"TRELLIS_CONTROL_TOKEN": f"ops:{TOKEN},ci:{READ}:read"},
    )
    assert ops.tokens == {"ops": TOKEN, "ci": READ}
    assert ops.roles == {"ops": "operator", "ci": "read"}
    from trellis.config import loads

    tree = loads("[supervisor]\nname = 't'\n[control]\nread_uids = [1001, 1002]\n")
    ops = operations("t", dict(tree.settings), journal=False)
    assert ops.control_options == {"read_uids": [1001, 1002]}


# ---------------------------------------------------------------------------
# Read-only uids on the Unix socket
# ---------------------------------------------------------------------------


async def _as_user(uid: int, sock: Path, request: str) -> str:
    """The raw HTTP answer to ``request`` sent on ``sock`` by a process of ``uid``."""
    import asyncio
    import subprocess
    import textwrap

    code = textwrap.dedent(
        f"""
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect({str(sock)!r})
        s.sendall({request.encode()!r})
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        print(out.decode())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/python3",  # the venv's interpreter may not be readable by that user
        "-c",
        code,
        user=uid,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs /usr/bin/python3")
@pytest.mark.stdlib_loop  # create_subprocess_exec(user=...): uvloop has no user option
async def test_read_uids_may_look_over_the_socket_but_not_act(short_dir: Path) -> None:
    os.chmod(short_dir, 0o755)
    sock = short_dir / "c.sock"
    e = await start_env(short_dir, sock=sock, read_uids=[65534])
    try:
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o666
        get = "GET /v1/tree HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        post = (
            "POST /v1/children/shop/db/restart HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        text = await _as_user(65534, sock, get)
        assert text.startswith("HTTP/1.1 200"), text
        db = await e.child("db")
        with capture_telemetry(["operator.denied"]) as cap:
            text = await _as_user(65534, sock, post)
        assert text.startswith("HTTP/1.1 403"), text
        assert "uid:65534 has the read role: POST /v1/children/shop/db/restart" in text
        assert await e.child("db") is db
        assert cap.events[0]["who"] == "uid:65534"
        text = await _as_user(65533, sock, get)  # not listed: refused
        assert text.startswith("HTTP/1.1 403"), text
        assert "uid 65533 may not use this control socket" in text
        assert "uid 65534 (read)" in text
    finally:
        await stop_env(e)


def test_read_uids_need_a_socket_others_can_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRELLIS_SOCKET", raising=False)
    with pytest.raises(ControlError, match="read_uids: other users cannot reach"):
        ControlServer(socket=True, read_uids=[1001])

"""The CLI client (status, events, restart, stop, start) against a real control server.

The server runs in the test's event loop; each command runs through click's CliRunner in
a worker thread, talking to it over the real socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

import trellis
from control._ctlenv import TOKEN, Env, start_env, stop_env
from trellis.cli.control import COMMANDS, events, restart, start, status, stop
from trellis.control import ControlServer, default_socket_path
from trellis.testing import capture_telemetry, wait_restarted

NO_ENV: dict[str, str | None] = {
    "TRELLIS_SOCKET": None,
    "TRELLIS_URL": None,
    "TRELLIS_TOKEN": None,
}


async def run(cmd: click.Command, *args: str, env: dict[str, str | None] | None = None) -> Result:
    """Invoke ``cmd`` in a thread so the server in this loop can answer it."""
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, cmd, list(args), env={**NO_ENV, **(env or {})})


def sock_args(env: Env) -> tuple[str, str]:
    return ("--socket", str(env.sock))


# ---------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------


async def test_status_json_is_the_api_answer(env: Env) -> None:
    r = await run(status, *sock_args(env), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["node"] == "test-node"
    assert data["root"]["path"] == "shop"
    assert [c["id"] for c in data["root"]["children"]] == [
        "db",
        "web",
        "jobs",
        "tmp",
        "flaky",
        "dyn",
    ]


async def test_status_shows_the_tree_with_restarts_and_last_exit(env: Env) -> None:
    old = await env.child("web")
    trellis.exit(old, RuntimeError("disk full"))
    new = await wait_restarted(env.sup, "web", old)
    r = await run(status, *sock_args(env))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "node test-node"
    assert lines[1].startswith("shop (supervisor)  running  <Pid ")
    [web] = [line for line in lines if " web  " in line]
    assert f"<Pid {new.id}>" in web
    assert "restarts 1" in web
    assert "last exit: RuntimeError: disk full (crash)" in web
    assert " up " in web
    [a] = [line for line in lines if " a  " in line]
    assert "└── a  running" in a


async def test_status_shows_stopped_children(env: Env) -> None:
    assert (await env.unix().post("/v1/children/shop/web/stop")).status_code == 200
    r = await run(status, *sock_args(env))
    [web] = [line for line in r.stdout.splitlines() if " web  " in line]
    assert "web  stopped" in web


async def test_no_tree_running_is_exit_3(short_dir: Path) -> None:
    path = short_dir / "none.sock"
    for cmd, args in [
        (status, ()),
        (events, ()),
        (restart, ("shop/db",)),
        (stop, ()),
        (start, ("x",)),
    ]:
        r = await run(cmd, *args, "--socket", str(path))
        assert r.exit_code == 3, (cmd.name, r.output)
        assert r.stderr == (
            f"trellis: no Trellis tree is listening on {path} "
            "(start one with `trellis run TREE.toml`)\n"
        )


async def test_stale_socket_file_is_exit_3(short_dir: Path) -> None:
    path = short_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    r = await run(status, "--socket", str(path))
    assert r.exit_code == 3
    assert "no Trellis tree is listening on" in r.stderr


# ---------------------------------------------------------------------------
# restart / stop / start
# ---------------------------------------------------------------------------


async def test_restart_restarts_and_is_recorded(env: Env) -> None:
    old = await env.child("db")
    with capture_telemetry(["operator.action"]) as cap:
        r = await run(restart, "shop/db", "--reason", "deploy", *sock_args(env))
    assert r.exit_code == 0, r.output
    new = await env.child("db")
    assert new is not old
    assert r.stdout == f"restarted shop/db (<Pid {new.id}>)\n"
    [action] = cap.events
    assert action["who"] == f"uid:{os.getuid()}"
    assert action["detail"] == "deploy"


async def test_restart_json(env: Env) -> None:
    r = await run(restart, "db", "--json", *sock_args(env))
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["action"] == "restart"
    assert data["path"] == "shop/db"
    assert data["result"] == "ok"


async def test_refused_actions_are_exit_1_with_the_servers_message(env: Env) -> None:
    r = await run(restart, "shop/nope", *sock_args(env))
    assert r.exit_code == 1
    assert r.stderr == "trellis: no child at 'shop/nope' in tree 'shop'\n"
    r = await run(restart, "shop/tmp", *sock_args(env))
    assert r.exit_code == 1
    assert "temporary" in r.stderr
    r = await run(start, "shop/db", *sock_args(env))
    assert r.exit_code == 1
    assert r.stderr == "trellis: shop/db is already running\n"


async def test_stop_and_start_a_child(env: Env) -> None:
    r = await run(stop, "shop/web", *sock_args(env))
    assert (r.exit_code, r.stdout) == (0, "stopped shop/web\n")
    assert await env.child("web") is None
    r = await run(start, "shop/web", *sock_args(env))
    assert r.exit_code == 0, r.output
    new = await env.child("web")
    assert r.stdout == f"started shop/web (<Pid {new.id}>)\n"


async def test_stop_without_path_stops_the_tree(env: Env) -> None:
    r = await run(stop, *sock_args(env))
    assert r.exit_code == 0, r.output
    assert r.stdout == f"stopping the tree on {env.sock}\n"
    assert env.stop_requested.is_set()


async def test_bad_input_is_exit_2(env: Env) -> None:
    r = await run(restart, *sock_args(env))
    assert r.exit_code == 2
    assert "Missing argument 'PATH'" in r.output
    r = await run(restart, "/", *sock_args(env))
    assert r.exit_code == 2
    assert "give a tree path" in r.output
    r = await run(events, "--history", "-1", *sock_args(env))
    assert r.exit_code == 2
    r = await run(status, "--socket", str(env.sock), "--url", "http://127.0.0.1:1")
    assert r.exit_code == 2
    assert "give --socket or --url, not both" in r.output
    r = await run(status, "--url", "127.0.0.1:8470")
    assert r.exit_code == 2
    assert "must start with http://" in r.stderr
    r = await run(status, "--bogus")
    assert r.exit_code == 2


# ---------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------


async def test_events_prints_the_history_and_exits(env: Env) -> None:
    old = await env.child("db")
    trellis.exit(old, RuntimeError("boom"))
    await wait_restarted(env.sup, "db", old)
    r = await run(events, "--filter", "child.exited", *sock_args(env))
    assert r.exit_code == 0, r.output
    [line] = r.stdout.splitlines()
    assert " child.exited       shop/db " in line
    assert "reason=RuntimeError: boom" in line
    assert "reason_class=crash" in line
    r = await run(events, "--history", "1000", "--json", *sock_args(env))
    assert r.exit_code == 0
    records = [json.loads(x) for x in r.stdout.splitlines()]
    assert [e["event"] for e in records][-2:] == ["child.exited", "child.restarted"]
    r = await run(events, "--history", "3", "--json", *sock_args(env))
    assert len(r.stdout.splitlines()) == 3


async def test_events_follow_prints_new_events_until_the_stream_ends(env: Env) -> None:
    """events -f shows an event that happens after it connected, and exits 0 when the
    tree's control server stops."""
    assert env.ctl._http is not None
    tasks = env.ctl._http.state.tasks
    follower = asyncio.ensure_future(
        run(events, "-f", "--history", "0", "--path", "shop/db", *sock_args(env))
    )
    for _ in range(1000):  # until the follower's stream is open on the server
        if tasks or follower.done():
            break
        await asyncio.sleep(0.01)
    assert tasks, "events -f did not connect"
    old = await env.child("db")
    trellis.exit(old, RuntimeError("late"))
    await wait_restarted(env.sup, "db", old)
    trellis.exit(await env.child("web"), RuntimeError("not shown"))
    await env.sup.which_children()
    await env.ctl.stop()
    r = await asyncio.wait_for(follower, 10)
    assert r.exit_code == 0, r.output
    names = [line.split()[1] for line in r.stdout.splitlines()]
    assert names == ["child.exited", "child.restarted"]
    assert "reason=RuntimeError: late" in r.stdout


# ---------------------------------------------------------------------------
# TCP
# ---------------------------------------------------------------------------


async def test_tcp_with_token_from_the_environment(env: Env) -> None:
    r = await run(status, "--json", env={"TRELLIS_URL": env.tcp_url, "TRELLIS_TOKEN": TOKEN})
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["root"]["path"] == "shop"
    with capture_telemetry(["operator.action"]) as cap:
        r = await run(restart, "shop/db", "--url", env.tcp_url, "--token", TOKEN)
    assert r.exit_code == 0, r.output
    assert cap.events[0]["who"] == "token:ops"


async def test_tcp_token_errors_are_exit_1(env: Env) -> None:
    r = await run(status, "--url", env.tcp_url)
    assert r.exit_code == 1
    assert r.stderr == (
        "trellis: authorization missing: this API needs a bearer token "
        "(pass --token or set TRELLIS_TOKEN)\n"
    )
    r = await run(status, "--url", env.tcp_url, "--token", "wrong")
    assert r.exit_code == 1
    assert r.stderr == "trellis: this bearer token is not valid here\n"


async def test_tcp_nothing_listening_is_exit_3() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = await run(status, "--url", f"http://127.0.0.1:{port}", "--token", TOKEN)
    assert r.exit_code == 3
    assert r.stderr == f"trellis: no Trellis tree is listening on http://127.0.0.1:{port}\n"


async def test_command_line_socket_beats_url_from_the_environment(env: Env) -> None:
    r = await run(status, "--json", *sock_args(env), env={"TRELLIS_URL": "http://127.0.0.1:1"})
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------------------
# Finding the socket
# ---------------------------------------------------------------------------


async def test_finds_the_only_tree_socket_in_the_default_directory(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --socket: the one *.sock in $XDG_RUNTIME_DIR/trellis (trellis run names it
    after the tree); with two, an error naming both (exit 2)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir))
    monkeypatch.delenv("TRELLIS_SOCKET", raising=False)
    e = await start_env(short_dir, sock=default_socket_path("shop"))
    other: ControlServer | None = None
    try:
        xdg: dict[str, Any] = {"XDG_RUNTIME_DIR": str(short_dir)}
        r = await run(status, "--json", env=xdg)
        assert r.exit_code == 0, r.output
        other = ControlServer(socket=default_socket_path("other"))
        await other.start()
        r = await run(status, env=xdg)
        assert r.exit_code == 2
        assert "several trees listen in" in r.stderr
        assert "shop.sock" in r.stderr
        assert "other.sock" in r.stderr
    finally:
        if other is not None:
            await other.stop()
        await stop_env(e)


def test_commands_are_exported_for_the_main_group() -> None:
    assert [c.name for c in COMMANDS] == ["status", "events", "restart", "stop", "start", "reload"]
    for cmd in COMMANDS:
        names = {p.name for p in cmd.params}
        assert {"socket_path", "url", "token", "as_json"} <= names

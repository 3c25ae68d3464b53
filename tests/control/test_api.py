"""The control API over its real Unix socket: the tree, actions, readiness, metrics,
OpenAPI, and robustness against bad requests."""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

import httpx
import pytest

import trellis
from control._ctlenv import Env
from trellis.control import openapi
from trellis.testing import capture_telemetry, wait_restarted

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def flat(node: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every node of a /v1/tree answer by path."""
    out = {node["path"]: node}
    for c in node["children"]:
        out.update(flat(c))
    return out


async def tree(env: Env) -> dict[str, dict[str, Any]]:
    r = await env.unix().get("/v1/tree")
    assert r.status_code == 200, r.text
    return flat(r.json()["root"])


async def snapshot(env: Env) -> list[tuple[Any, Any]]:
    """(id, pid) of the root's children: to check nothing was disturbed."""
    return [(i.id, i.pid) for i in await env.sup.which_children()]


# ---------------------------------------------------------------------------
# GET /v1/tree
# ---------------------------------------------------------------------------


async def test_tree_lists_every_node_with_state_and_pids(env: Env) -> None:
    """/v1/tree has the root and every child (nested too) with type, state, restart type
    and the pid of the process that runs it."""
    r = await env.unix().get("/v1/tree")
    assert r.status_code == 200
    body = r.json()
    assert body["node"] == "test-node"
    nodes = flat(body["root"])
    assert list(nodes) == [
        "shop",
        "shop/db",
        "shop/web",
        "shop/jobs",
        "shop/jobs/a",
        "shop/tmp",
        "shop/flaky",
        "shop/dyn",
    ]
    db_pid = await env.child("db")
    db = nodes["shop/db"]
    assert db["pid"] == f"<Pid {db_pid.id}>"
    assert (db["id"], db["type"], db["state"], db["restart"]) == (
        "db",
        "worker",
        "running",
        "permanent",
    )
    assert db["restarts"] == 0
    assert db["last_exit"] is None
    assert isinstance(db["uptime_s"], float)
    assert db["uptime_s"] >= 0
    assert nodes["shop/jobs"]["type"] == "supervisor"
    assert nodes["shop/tmp"]["restart"] == "temporary"
    assert nodes["shop"]["restart"] is None
    assert nodes["shop"]["state"] == "running"
    for key in ("os_pid", "last_class", "children"):
        assert key in db


async def test_tree_counts_restarts_and_last_exit(env: Env) -> None:
    """After a crash the node shows one restart, the exit reason and its class."""
    old = await env.child("web")
    trellis.exit(old, RuntimeError("disk full"))
    await wait_restarted(env.sup, "web", old)
    web = (await tree(env))["shop/web"]
    assert web["restarts"] == 1
    assert web["last_exit"] == "RuntimeError: disk full"
    assert web["last_class"] == "crash"
    assert web["state"] == "running"


async def test_dynamic_children_are_listed_by_spec_id(env: Env) -> None:
    """Children of a dynamic supervisor get their spec id as path segment (with the pid
    number when ids repeat), and can be stopped by that path."""
    dyn = await env.child("dyn")
    p1 = await dyn.start_child(trellis.worker("job", _idle_forever))
    p2 = await dyn.start_child(trellis.worker("job", _idle_forever))
    p3 = await dyn.start_child(trellis.worker("solo", _idle_forever))
    nodes = await tree(env)
    assert f"shop/dyn/job@{p1.id}" in nodes
    assert f"shop/dyn/job@{p2.id}" in nodes
    assert nodes["shop/dyn/solo"]["pid"] == f"<Pid {p3.id}>"
    r = await env.unix().post("/v1/children/shop/dyn/solo/stop")
    assert r.status_code == 200, r.text
    assert not p3.alive
    r = await env.unix().post(f"/v1/children/shop/dyn/job@{p1.id}/restart")
    assert r.status_code == 409
    assert "dynamic supervisor" in r.json()["error"]
    assert p1.alive


async def _idle_forever() -> None:
    while True:
        await trellis.receive()


# ---------------------------------------------------------------------------
# Actions
# ---------------------------------------------------------------------------


async def test_restart_really_restarts_and_records_who(env: Env) -> None:
    """POST .../restart stops the child and starts it again (a new pid) and emits
    operator.action with the caller's uid and the socket as source."""
    old = await env.child("db")
    with capture_telemetry() as cap:
        r = await env.unix().post("/v1/children/shop/db/restart", json={"reason": "new config"})
    assert r.status_code == 200, r.text
    new = await env.child("db")
    assert new is not old
    assert new.alive
    assert not old.alive
    assert r.json() == {
        "action": "restart",
        "path": "shop/db",
        "result": "ok",
        "state": "running",
        "pid": f"<Pid {new.id}>",
        "os_pid": None,
    }
    names = [e["event"] for e in cap.events]
    assert names.index("child.terminated") < names.index("child.started")
    action = await cap.wait_for("operator.action")
    assert action["who"] == f"uid:{os.getuid()}"
    assert action["action"] == "restart"
    assert action["target"] == "shop/db"
    assert action["source"] == f"unix:{env.sock}"
    assert action["result"] == "ok"
    assert action["detail"] == "new config"


async def test_path_without_root_name_and_nested(env: Env) -> None:
    """A path may leave out the root's name; nested children are reached by their path."""
    old = await env.child("a", await env.child("jobs"))
    r = await env.unix().post("/v1/children/jobs/a/restart")
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "shop/jobs/a"
    assert not old.alive


async def test_stop_then_start(env: Env) -> None:
    """stop terminates the child (its spec stays); start runs it again."""
    c = env.unix()
    old = await env.child("web")
    r = await c.post("/v1/children/shop/web/stop")
    assert r.status_code == 200
    assert r.json()["state"] == "stopped"
    assert await env.child("web") is None
    assert not old.alive
    assert (await tree(env))["shop/web"]["state"] == "stopped"
    r = await c.post("/v1/children/shop/web/start")
    assert r.status_code == 200, r.text
    new = await env.child("web")
    assert isinstance(new, trellis.Pid)
    assert new.alive
    r = await c.post("/v1/children/shop/web/start")
    assert r.status_code == 409
    assert r.json() == {"error": "shop/web is already running", "path": "shop/web"}


async def test_actions_that_do_not_apply_answer_409_and_are_recorded(env: Env) -> None:
    """Restarting the root or a temporary child is refused with the reason; each refusal
    is an operator.action with that reason as result."""
    c = env.unix()
    with capture_telemetry(["operator.action"]) as cap:
        r = await c.post("/v1/children/shop/tmp/restart")
        assert r.status_code == 409
        assert "temporary" in r.json()["error"]
        r = await c.post("/v1/children/shop/restart")
        assert r.status_code == 409
        assert "root" in r.json()["error"]
    assert [e["result"] for e in cap.events] == [
        (await c.post("/v1/children/shop/tmp/restart")).json()["error"],
        (await c.post("/v1/children/shop/restart")).json()["error"],
    ]
    assert (await env.child("tmp")).alive


async def test_failed_start_answers_409_with_the_reason(env: Env) -> None:
    """A child whose start fails: start answers 409 with the start error."""
    c = env.unix()
    assert (await c.post("/v1/children/shop/flaky/stop")).status_code == 200
    env.flaky.broken = True
    r = await c.post("/v1/children/shop/flaky/start")
    assert r.status_code == 409
    assert "broken on purpose" in r.json()["error"]
    env.flaky.broken = False
    assert (await c.post("/v1/children/shop/flaky/start")).status_code == 200


async def test_unknown_path_is_404_with_the_path(env: Env) -> None:
    for action in ("restart", "stop", "start"):
        r = await env.unix().post(f"/v1/children/shop/nope/{action}")
        assert r.status_code == 404
        assert r.json() == {"error": "no child at 'shop/nope' in tree 'shop'", "path": "shop/nope"}


async def test_actions_before_the_tree_started_answer_503(short_dir: Any) -> None:
    """Before tree_started the server answers 503 for the tree and 200 for /healthz."""
    from trellis.control import ControlServer

    ctl = ControlServer(socket=short_dir / "c.sock")
    await ctl.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(short_dir / "c.sock")), base_url="http://t"
        ) as c:
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/v1/tree")).status_code == 503
            assert (await c.get("/readyz")).status_code == 503
            assert (await c.post("/v1/children/x/restart")).status_code == 503
            assert (await c.post("/v1/stop")).status_code == 503
    finally:
        await ctl.stop()


# ---------------------------------------------------------------------------
# /readyz, /healthz, /metrics, /openapi.json
# ---------------------------------------------------------------------------


async def test_readyz_is_503_while_a_permanent_child_is_down(env: Env, clock: Any) -> None:
    """readyz: 200 when all permanent children run; 503 naming the child while it waits
    in backoff and while its start keeps failing; 200 again once it runs."""
    c = env.unix()
    r = await c.get("/readyz")
    assert (r.status_code, r.json()) == (200, {"ready": True, "not_ready": []})
    env.flaky.broken = True
    with capture_telemetry() as cap:
        trellis.exit(await env.child("flaky"), RuntimeError("crash"))
        await cap.wait_for("child.backoff", child_id="flaky")
    r = await c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["not_ready"] == [
        {"path": "shop/flaky", "state": "restarting", "restart": "permanent"}
    ]
    assert "shop/flaky" in r.json()["reason"]
    with capture_telemetry() as cap:
        await clock.advance(1.0)  # the backoff is over: the start fails again
        await cap.wait_for("child.start_failed", child_id="flaky")
    assert (await c.get("/readyz")).status_code == 503
    env.flaky.broken = False
    with capture_telemetry() as cap:
        await clock.advance(1.0)
        await cap.wait_for("child.restarted", child_id="flaky")
    assert (await c.get("/readyz")).status_code == 200


async def test_readyz_ignores_stopped_temporary_children(env: Env) -> None:
    """A stopped temporary child (gone) or a stopped permanent one: only the latter
    makes the tree unready."""
    c = env.unix()
    assert (await c.post("/v1/children/shop/tmp/stop")).status_code == 200
    assert (await c.get("/readyz")).status_code == 200
    assert (await c.post("/v1/children/shop/web/stop")).status_code == 200
    r = await c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["not_ready"] == [
        {"path": "shop/web", "state": "stopped", "restart": "permanent"}
    ]


async def test_readyz_is_503_when_the_root_is_gone(env: Env) -> None:
    await env.sup.stop()
    r = await env.unix().get("/readyz")
    assert r.status_code == 503
    assert r.json()["reason"] == "the root supervisor is not running"
    assert (await env.unix().get("/healthz")).status_code == 200


async def test_healthz(env: Env) -> None:
    r = await env.unix().get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "node": "test-node", "os_pid": os.getpid()}


async def test_metrics_serves_what_render_returns(env: Env) -> None:
    from control._ctlenv import FakeMetrics

    r = await env.unix().get("/metrics")
    assert r.status_code == 200
    assert r.content == FakeMetrics.body
    assert r.headers["content-type"] == FakeMetrics.content_type


async def test_metrics_absent_is_404(short_dir: Any) -> None:
    from control._ctlenv import start_env, stop_env

    e = await start_env(short_dir)
    try:
        r = await e.unix().get("/metrics")
        assert r.status_code == 404
        assert r.json() == {"error": "metrics are not enabled on this tree"}
    finally:
        await stop_env(e)


async def test_openapi_lists_every_route(env: Env) -> None:
    """/openapi.json is OpenAPI 3.1 JSON whose paths and methods are exactly the app's
    routes, each operation with responses and an operationId."""
    r = await env.unix().get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.1")
    routes = {}
    for route in env.ctl.app.routes:
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # type: ignore[attr-defined]
        methods = {m.lower() for m in route.methods} - {"head"}  # type: ignore[attr-defined]
        routes.setdefault(path, set()).update(methods)
    assert {p: set(ops) for p, ops in spec["paths"].items()} == routes
    op_ids = []
    for ops in spec["paths"].values():
        for op in ops.values():
            assert op["responses"]
            op_ids.append(op["operationId"])
    assert len(op_ids) == len(set(op_ids))
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(spec)))
    assert refs <= set(spec["components"]["schemas"])
    assert openapi() == spec


# ---------------------------------------------------------------------------
# Bad requests never hurt the tree
# ---------------------------------------------------------------------------


async def test_bad_requests_get_4xx_and_the_tree_keeps_running(env: Env) -> None:
    """Malformed bodies, unknown routes, wrong methods and bad query parameters each get
    the right 4xx with a JSON message; afterwards every child has its old pid."""
    before = await snapshot(env)
    c = env.unix()
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", "/v1/children/shop/db/restart", {"content": b"{not json"}, 400, "not valid JSON"),
        ("POST", "/v1/children/shop/db/restart", {"content": b"[1, 2]"}, 422, "JSON object"),
        ("POST", "/v1/children/shop/db/stop", {"json": {"force": True}}, 422, "unknown field"),
        ("POST", "/v1/children/shop/db/stop", {"json": {"reason": 5}}, 422, "reason"),
        ("POST", "/v1/children/shop/db/stop", {"content": b"\xff\xfe"}, 400, "not valid JSON"),
        ("POST", "/v1/stop", {"content": b"nope"}, 400, "not valid JSON"),
        ("POST", "/v1/children/shop/db/explode", {}, 404, "no route"),
        ("GET", "/v1/nothing", {}, 404, "no route"),
        ("GET", "/v1/children/shop/db/restart", {}, 405, "not allowed"),
        ("DELETE", "/v1/tree", {}, 405, "not allowed"),
        ("POST", "/v1/tree", {}, 405, "not allowed"),
        ("GET", "/v1/events?history=-1", {}, 422, "history"),
        ("GET", "/v1/events?history=abc", {}, 422, "history"),
        ("GET", "/v1/events?follow=maybe", {}, 422, "follow"),
        ("GET", "/v1/events?filter=", {}, 422, "filter"),
        ("GET", "/v1/events?filter=,,", {}, 422, "filter"),
    ]
    for method, url, kwargs, status, words in cases:
        r = await c.request(method, url, **kwargs)
        assert r.status_code == status, (method, url, r.text)
        assert words in r.json()["error"], (method, url, r.text)
    r = await c.post("/v1/children/shop/db/restart", content=b"x" * (65 * 1024))
    assert r.status_code == 413
    assert await snapshot(env) == before
    assert env.sup.alive
    assert not env.stop_requested.is_set()


async def _raw(env: Env, data: bytes) -> bytes:
    """Send raw bytes over the Unix socket; the answer up to EOF (or 5 s)."""
    reader, writer = await asyncio.open_unix_connection(str(env.sock))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    ("data", "answers"),
    [
        (b"\x00\x01\x02garbage\r\n\r\n", (b"HTTP/1.1 400",)),
        # a header too big for h11's buffer is refused, unless it arrived whole in one read
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
            + b"a" * 200_000
            + b"\r\n\r\n",
            (b"HTTP/1.1 400", b"HTTP/1.1 200"),
        ),
        (b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", (b"HTTP/1.1 400",)),
        (
            b"POST /v1/stop HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            (b"HTTP/1.1 400",),
        ),
        (b"GET /v1/tree\r\n\r\n", (b"HTTP/1.1 400",)),
    ],
    ids=["binary", "huge-header", "non-ascii-target", "bad-length", "no-version"],
)
async def test_garbage_on_the_socket_gets_400(
    env: Env, data: bytes, answers: tuple[bytes, ...]
) -> None:
    """Bytes that are not HTTP get a 400, never a crash; the tree and the server keep
    running."""
    before = await snapshot(env)
    answer = await _raw(env, data)
    assert answer.startswith(answers), answer[:200]
    assert await snapshot(env) == before
    assert (await env.unix().get("/healthz")).status_code == 200


async def test_a_lying_content_length_does_not_stop_the_tree(env: Env) -> None:
    """A body declared bigger than the limit gets 413 before it is read."""
    answer = await _raw(
        env,
        b"POST /v1/children/shop/db/restart HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 999999999\r\nConnection: close\r\n\r\n{",
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert (await env.child("db")).alive


async def test_many_concurrent_requests(env: Env) -> None:
    """Fifty concurrent tree reads and readiness checks all answer 200."""
    c = env.unix()
    rs = await asyncio.gather(*[c.get("/v1/tree" if i % 2 else "/readyz") for i in range(50)])
    assert {r.status_code for r in rs} == {200}


async def test_an_exception_in_a_handler_is_a_500_and_nothing_stops(env: Env) -> None:
    """A metrics source that raises: /metrics answers 500 JSON, the server and tree go on."""

    class Broken:
        async def render(self) -> tuple[bytes, str]:
            raise ValueError("exporter broke")

    env.ctl.metrics = Broken()
    before = await snapshot(env)
    r = await env.unix().get("/metrics")
    assert r.status_code == 500
    assert r.json() == {"error": "internal error: ValueError: exporter broke"}
    assert await snapshot(env) == before
    assert (await env.unix().get("/v1/tree")).status_code == 200


async def test_random_requests_never_get_a_5xx_or_change_the_tree(env: Env) -> None:
    """300 seeded random requests (methods, paths, queries, bodies, headers) against a
    running tree: every answer is below 500 and no child was touched."""
    import random

    rng = random.Random(1234)
    words = [
        "v1",
        "children",
        "tree",
        "events",
        "restart",
        "start",
        "x",
        "..",
        "%2F",
        "é",
        "metrics",
        "readyz",
        "nope",
        "",
        "shop",
        "zz",
        "%00",
        "stop",
    ]
    bodies = [
        b"",
        b"{}",
        b"{",
        b"null",
        b'{"reason": 1}',
        b'{"reason": "r"}',
        b"\x00\xff",
        b"[" * 5000,
        b'{"a": ' * 100,
        b"x" * 70000,
    ]
    before = await snapshot(env)
    c = env.unix()
    for _ in range(300):
        segments = [rng.choice(words) for _ in range(rng.randint(0, 6))]
        path = "/" + "/".join(segments)
        if path.rstrip("/") in ("/v1/stop",) or "shop/" in path:
            continue  # real actions are tested elsewhere
        if rng.random() < 0.3:
            path += "?" + rng.choice(
                [
                    "history=5",
                    "history=x",
                    "filter=*",
                    "follow=0",
                    "a=b&&&",
                    "history=99999999999",
                    "follow=false",
                ]
            )
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
        headers = {"content-type": rng.choice(["application/json", "text/plain", "x/y"])}
        if "events" in path and "follow" not in path:
            path += ("&" if "?" in path else "?") + "follow=false"
        r = await c.request(method, path, content=rng.choice(bodies), headers=headers)
        assert r.status_code < 500, (method, path, r.status_code, r.text[:200])
    assert await snapshot(env) == before
    assert not env.stop_requested.is_set()

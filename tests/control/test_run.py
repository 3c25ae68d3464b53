"""The control server as an extension of trellis.run_async, and with OS-process children."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

import trellis
from control._ctlenv import idle
from trellis.control import ControlServer
from trellis.testing import capture_telemetry


class Started:
    """An extension that tells when the tree runs (after the control server's turn)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def start(self) -> None:
        pass

    async def tree_started(self, root: trellis.Pid, request_stop: Callable[[], None]) -> None:
        self.event.set()

    async def stop(self) -> None:
        pass


def client(sock: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(sock)), base_url="http://t", timeout=10
    )


async def test_post_stop_ends_the_tree(short_dir: Path) -> None:
    """POST /v1/stop answers 202, records the action, and run_async returns 0 with the
    tree stopped and the socket removed."""
    sock = short_dir / "c.sock"
    ctl = ControlServer(socket=sock)
    started = Started()
    root = trellis.Supervisor.child_spec([trellis.worker("w", idle)], id="app", name="app")
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with capture_telemetry() as cap:
        run = asyncio.ensure_future(trellis.run_async(root, extensions=[ctl, started]))
        await asyncio.wait_for(started.event.wait(), 10)
        async with client(sock) as c:
            assert (await c.get("/readyz")).status_code == 200
            r = await c.post("/v1/stop", json={"reason": "maintenance"})
            assert r.status_code == 202
            assert r.json() == {"action": "stop_tree", "result": "stopping"}
        assert await asyncio.wait_for(run, 10) == 0
    action = await cap.wait_for("operator.action")
    assert action["action"] == "stop_tree"
    assert action["target"] is None
    assert action["who"] == f"uid:{os.getuid()}"
    assert action["detail"] == "maintenance"
    await cap.wait_for("supervisor.stopped", supervisor="app")
    assert not sock.exists()
    assert {s: signal.getsignal(s) for s in previous} == previous


async def test_os_process_children_show_their_os_pid(short_dir: Path) -> None:
    """A Command child's node carries its OS pid; a restart through the API gives it a
    new OS process."""
    sock = short_dir / "c.sock"
    ctl = ControlServer(socket=sock)
    await ctl.start()
    sup: Any = None
    try:
        sup = await trellis.Supervisor.start_link(
            [trellis.Command(["sleep", "600"], id="sleeper", shutdown=2.0)], name="procs"
        )
        await ctl.tree_started(sup, lambda: None)
        [info] = await sup.which_children()
        async with client(sock) as c:
            node = (await c.get("/v1/tree")).json()["root"]["children"][0]
            assert node["path"] == "procs/sleeper"
            assert node["os_pid"] == info.pid.os_pid
            r = await c.post("/v1/children/procs/sleeper/restart")
            assert r.status_code == 200, r.text
            assert r.json()["os_pid"] not in (None, info.pid.os_pid)
            node = (await c.get("/v1/tree")).json()["root"]["children"][0]
            assert node["os_pid"] == r.json()["os_pid"]
    finally:
        if sup is not None and sup.alive:
            await sup.stop()
        await ctl.stop()


async def test_metrics_from_the_real_exporter(short_dir: Path) -> None:
    """With trellis.metrics.Metrics beside it, /metrics parses back with the Prometheus
    parser and agrees with the tree: the child is up, and a restart through the API is
    one more start; an OpenMetrics Accept header gets OpenMetrics."""
    from prometheus_client.parser import text_string_to_metric_families

    from trellis.metrics import Metrics

    sock = short_dir / "c.sock"
    metrics = Metrics(node="n1")
    ctl = ControlServer(socket=sock, metrics=metrics, node="n1")
    started = Started()
    root = trellis.Supervisor.child_spec([trellis.worker("w", idle)], id="m", name="m")

    def sample(text: str, name: str) -> float:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and s.labels.get("child") == "w":
                    return float(s.value)
        raise AssertionError(f"no {name} for child w")

    run = asyncio.ensure_future(trellis.run_async(root, extensions=[metrics, ctl, started]))
    try:
        await asyncio.wait_for(started.event.wait(), 10)
        async with client(sock) as c:
            r = await c.get("/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            assert sample(r.text, "trellis_child_up") == 1.0
            assert sample(r.text, "trellis_child_starts_total") == 1.0
            assert (await c.post("/v1/children/m/w/restart")).status_code == 200
            r = await c.get("/metrics")
            assert sample(r.text, "trellis_child_starts_total") == 2.0
            r = await c.get(
                "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
            )
            assert r.headers["content-type"].startswith("application/openmetrics-text")
            assert (await c.post("/v1/stop")).status_code == 202
        assert await asyncio.wait_for(run, 10) == 0
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)

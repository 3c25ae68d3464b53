"""Observers never wait on a busy supervisor: while supervisors wait for a restarting
child's readiness (a real OS child whose ``ready`` line does not come, a Server whose
``init`` blocks), ``/v1/tree``, ``trellis status``, ``/readyz`` and ``/metrics`` answer
at once and tell the truth, from the tracker (telemetry) alone."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import trellis
from control._ctlenv import idle
from metrics.conftest import Samples
from trellis._tree import Tracker
from trellis.control import ControlServer
from trellis.metrics import Metrics
from trellis.testing import capture_telemetry

#: Far above the 100 ms these answers take, far below the 5 s a walk of a busy
#: supervisor waited for before (and then answered with an empty tree).
PROMPT = 2.0

# Ready the first time; after a restart it prints to stderr and is ready only once
# the file ``go`` exists.
API = textwrap.dedent(
    """
    import os, sys, time
    here = sys.argv[1]
    marker = os.path.join(here, "started")
    if os.path.exists(marker):
        print("restarted, waiting for go", file=sys.stderr, flush=True)
        while not os.path.exists(os.path.join(here, "go")):
            time.sleep(0.02)
    open(marker, "w").close()
    print("ready", flush=True)
    time.sleep(1000)
    """
)


class Slow(trellis.Server):
    """Starts at once the first time; its restarts wait in ``init`` for ``gate``."""

    starts = 0

    async def init(self, gate: asyncio.Event) -> None:
        Slow.starts += 1
        if Slow.starts > 1:
            await gate.wait()

    async def handle_cast(self, msg: Any) -> Any:
        raise RuntimeError(f"crash on {msg!r}")


@dataclass
class Busy:
    ctl: ControlServer
    metrics: Metrics
    sup: Any
    sock: Path
    here: Path
    gate: asyncio.Event
    client: httpx.AsyncClient

    async def get(self, url: str) -> tuple[httpx.Response, float]:
        t0 = time.monotonic()
        r = await asyncio.wait_for(self.client.get(url), 30.0)
        return r, time.monotonic() - t0


@pytest.fixture
async def busy(short_dir: Path) -> AsyncIterator[Busy]:
    """Tree ``obs``: db (idle), api (an OS child with a log readiness line), jobs (a
    supervisor of slow and w); a control server and metrics sharing one tracker."""
    Slow.starts = 0
    here = short_dir / "api"
    here.mkdir()
    script = short_dir / "api.py"
    script.write_text(API)
    gate = asyncio.Event()
    tracker = Tracker().attach()
    metrics = Metrics(node="test-node", tracker=tracker).attach()
    sock = short_dir / "c.sock"
    ctl = ControlServer(socket=sock, tracker=tracker, metrics=metrics, node="test-node")
    await ctl.start()
    children = [
        trellis.worker("db", idle),
        trellis.Command(
            [sys.executable, str(script), str(here)],
            id="api",
            ready=trellis.Ready.log("^ready$", timeout=60),
            shutdown=1.0,
        ),
        trellis.Supervisor.child_spec(
            [Slow.child_spec(gate, id="slow"), trellis.worker("w", idle)], id="jobs"
        ),
    ]
    sup = await trellis.Supervisor.start_link(children, name="obs")
    await ctl.tree_started(sup, lambda: None)
    metrics.track(sup)
    client = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(sock)), base_url="http://t", timeout=20.0
    )
    env = Busy(ctl, metrics, sup, sock, here, gate, client)
    try:
        yield env
    finally:
        (here / "go").touch()
        gate.set()
        await client.aclose()
        if sup.alive:
            await sup.stop()
        await ctl.stop()
        metrics.detach()
        tracker.detach()


def flat(node: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {node["path"]: node}
    for c in node["children"]:
        out.update(flat(c))
    return out


async def test_tree_status_readyz_and_metrics_answer_while_supervisors_wait(
    busy: Busy,
) -> None:
    r, _ = await busy.get("/readyz")
    assert r.status_code == 200, r.text
    jobs_pid = (await busy.sup.which_child("jobs")).pid
    slow_pid = (await jobs_pid.which_child("slow")).pid
    with capture_telemetry() as cap:
        trellis.cast(slow_pid, "boom")
        await cap.wait_for("child.exited", child_id="slow", timeout=10)
        api_os_pid = (await busy.sup.which_child("api")).pid.os_pid
        os.kill(api_os_pid, signal.SIGKILL)
        spawned = await cap.wait_for("process.spawned", child_id="api", timeout=10)
        await cap.wait_for("process.output", child_id="api", stream="stderr", timeout=10)
    new_os_pid = spawned["os_pid"]
    assert new_os_pid != api_os_pid
    # both supervisors are now busy: a which_children call would not be answered
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(busy.sup.which_children(), 0.3)

    r, took = await busy.get("/v1/tree")
    assert r.status_code == 200, r.text
    assert took < PROMPT, f"/v1/tree took {took:.2f}s"
    nodes = flat(r.json()["root"])
    assert list(nodes) == ["obs", "obs/db", "obs/api", "obs/jobs", "obs/jobs/slow", "obs/jobs/w"]
    states = {p: n["state"] for p, n in nodes.items()}
    assert states == {
        "obs": "running",
        "obs/db": "running",
        "obs/api": "restarting",
        "obs/jobs": "running",
        "obs/jobs/slow": "restarting",
        "obs/jobs/w": "running",
    }
    api = nodes["obs/api"]
    assert api["os_pid"] == new_os_pid  # the process that is starting
    assert api["restart"] == "permanent"
    assert api["since"] is not None
    assert api["last_class"] == "killed"
    assert nodes["obs/jobs/slow"]["last_exit"] == "RuntimeError: crash on 'boom'"

    r, took = await busy.get("/readyz")
    assert took < PROMPT, f"/readyz took {took:.2f}s"
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["ready"] is False
    assert {n["path"] for n in body["not_ready"]} == {"obs/api", "obs/jobs/slow"}
    assert "obs/api" in body["reason"]
    assert "obs/jobs/slow" in body["reason"]

    r, took = await busy.get("/metrics")
    assert took < PROMPT, f"/metrics took {took:.2f}s"
    assert r.status_code == 200
    s = Samples(r.content)
    up = {
        (lb["supervisor"], lb["child"]): v
        for lb, v in s.select("trellis_child_up")
        if lb["supervisor"]
    }
    assert up == {
        ("obs", "db"): 1,
        ("obs", "api"): 0,
        ("obs", "jobs"): 1,
        ("obs/jobs", "slow"): 0,
        ("obs/jobs", "w"): 1,
    }
    assert s.value("trellis_child_state", supervisor="obs", child="api", state="restarting") == 1

    # trellis status, as an operator runs it (a separate process on the socket)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trellis",
        "status",
        "--socket",
        str(busy.sock),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30.0)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    api_line = next(line for line in text.splitlines() if "api" in line)
    assert "restarting since" in api_line, text
    assert f"os pid {new_os_pid}" in api_line, text
    assert "slow" in text
    assert "w  running" in text

    # released: both start, and the tree is ready again
    with capture_telemetry() as cap:
        (busy.here / "go").touch()
        busy.gate.set()
        await cap.wait_for("child.restarted", child_id="api", timeout=10)
        await cap.wait_for("child.restarted", child_id="slow", timeout=10)
    r, _ = await busy.get("/readyz")
    assert r.status_code == 200, r.text
    r, _ = await busy.get("/v1/tree")
    assert {n["state"] for n in flat(r.json()["root"]).values()} == {"running"}

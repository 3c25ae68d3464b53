"""The plugin host over the control API and `trellis plugin`: list (read role), load
with an upload (sha256 checked, allow-list honoured), call, release, unload (operator
role, journaled as operator actions)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

import trellis
from trellis.cli import cli
from trellis.control import ControlServer

Wat = Callable[[str], Path]
OPS, READER = "ops-token-0123456789abcdef", "read-token-0123456789abcdef"


@pytest.fixture
async def served(wat: Wat) -> AsyncIterator[dict[str, Any]]:
    d = Path(tempfile.mkdtemp(prefix="tp-", dir="/tmp"))
    sock = d / "control.sock"
    allowed = [hashlib.sha256(wat(n).read_bytes()).hexdigest() for n in ("misbehave", "plain")]
    host = trellis.PluginHost(
        name="plugins", intensity=1, allowed_sha256=allowed, defaults={"memory": "4MiB"}
    )
    ctl = ControlServer(
        socket=sock,
        tcp="127.0.0.1:0",
        tokens={"ops": OPS, "reader": READER},
        roles={"reader": "read"},
    )
    await ctl.start()
    calc = trellis.Plugin(wat("plain"), id="calc", memory="1MiB", timeout=1.0)
    sup = await trellis.Supervisor.start_link([host.child_spec(), calc], name="clinic")
    await ctl.tree_started(sup, lambda: None)
    seen: list[dict[str, Any]] = []
    hid = trellis.telemetry.attach(seen.append, ["operator.action"])
    assert ctl.tcp_address is not None
    base = f"http://{ctl.tcp_address[0]}:{ctl.tcp_address[1]}"
    clients = {
        "unix": httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(sock)), base_url="http://t", timeout=10
        ),
        "reader": httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {READER}"}, timeout=10
        ),
    }
    try:
        yield {"host": host, "sock": sock, "c": clients, "seen": seen}
    finally:
        trellis.telemetry.detach(hid)
        for c in clients.values():
            await c.aclose()
        await sup.stop()
        await ctl.stop()
        shutil.rmtree(d, ignore_errors=True)


def b64(p: Path) -> str:
    return base64.b64encode(p.read_bytes()).decode()


async def test_plugin_routes(served: dict[str, Any], wat: Wat, tmp_path: Path) -> None:
    c, reader = served["c"]["unix"], served["c"]["reader"]
    r = await c.post(
        "/v1/plugins/m/load", json={"module_b64": b64(wat("misbehave")), "version": "1.0"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["plugin"]["state"] == "running"
    # a wrong sha256 for the bytes, and a module off the allow-list
    r = await c.post("/v1/plugins/x/load", json={"module_b64": b64(wat("plain")), "sha256": "00"})
    assert r.status_code == 422
    other = tmp_path / "other.wat"
    other.write_text('(module (func (export "f")))')
    r = await c.post("/v1/plugins/x/load", json={"module_b64": b64(other)})
    assert r.status_code == 403
    assert "allow-list" in r.json()["error"]
    # calls: output, a plugin error, an unknown plugin
    r = await c.post("/v1/plugins/m/call", json={"function": "upper", "data": "abc"})
    assert r.json()["output"] == "ABC"
    r = await c.post("/v1/plugins/m/call", json={"function": "fail"})
    assert (r.status_code, r.json()["kind"]) == (422, "error")
    assert (await c.post("/v1/plugins/zz/call", json={"function": "f"})).status_code == 404
    # the read role lists but may not act
    listed = (await reader.get("/v1/plugins")).json()
    [row] = listed["hosts"]["clinic/plugins"]
    assert (row["id"], row["version"], row["calls"]) == ("m", "1.0", 2)
    assert [c["path"] for c in listed["children"]] == ["clinic/calc"]
    # a plugin child of the tree (no host) answers calls too, by id or path
    for name in ("calc", "clinic/calc"):
        r = await c.post(f"/v1/plugins/{name}/call", json={"function": "add", "data": "[2, 2]"})
        assert r.json()["output"] == "4", r.text
    r = await reader.post("/v1/plugins/m/unload")
    assert r.status_code == 403
    # crash it past its budget (intensity 1): quarantined, then released
    for _ in range(2):
        for _ in range(100):
            if served["host"].get("m")["state"] == "running":
                break
            await asyncio.sleep(0.01)
        r = await c.post("/v1/plugins/m/call", json={"function": "trap_on", "data": "boom"})
        assert r.json()["kind"] == "trap"
    for _ in range(100):
        if served["host"].get("m")["state"] == "quarantined":
            break
        await asyncio.sleep(0.01)
    r = await c.post("/v1/plugins/m/call", json={"function": "echo", "data": "x"})
    assert r.json()["kind"] == "unavailable"
    assert (await c.post("/v1/plugins/m/release")).status_code == 200
    r = await c.post("/v1/plugins/m/call", json={"function": "echo", "data": "x"})
    assert r.json()["output"] == "x"
    assert (await c.post("/v1/plugins/m/unload", json={"reason": "done"})).status_code == 200
    assert (await c.post("/v1/plugins/m/nope")).status_code == 404
    actions = [(e["action"], e["result"]) for e in served["seen"]]
    assert ("plugin.load", "ok") in actions
    assert ("plugin.unload", "ok") in actions
    assert any(a == "plugin.load" and "allow-list" in res for a, res in actions)


async def test_cli(served: dict[str, Any], wat: Wat) -> None:
    sock = str(served["sock"])

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, [*args, "--socket", sock], catch_exceptions=False)

    r = await asyncio.to_thread(run, "plugin", "load", "p", str(wat("plain")), "--version", "2")
    assert r.exit_code == 0, r.output
    assert "loaded p v2" in r.output
    r = await asyncio.to_thread(run, "plugin", "call", "p", "add", "--data", "[2, 3]")
    assert (r.exit_code, r.output) == (0, "5")
    # an upgrade whose check traps keeps v2; one whose check passes switches
    r = await asyncio.to_thread(
        run, "plugin", "upgrade", "p", str(wat("misbehave")), "--version", "3",
        "--check", "trap_on", "--check-data", "boom",
    )  # fmt: skip
    assert r.exit_code != 0
    assert "kept the old" in r.output
    r = await asyncio.to_thread(
        run, "plugin", "upgrade", "p", str(wat("misbehave")), "--version", "3",
        "--check", "echo", "--check-data", "hi",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "upgraded p to v3" in r.output
    assert served["host"].get("p")["version"] == "3"
    r = await asyncio.to_thread(run, "plugin", "call", "p", "upper", "--data", "abc")
    assert (r.exit_code, r.output) == (0, "ABC")
    r = await asyncio.to_thread(run, "plugin", "list")
    assert "p " in r.output
    assert "running" in r.output
    r = await asyncio.to_thread(run, "plugin", "unload", "p")
    assert r.exit_code == 0, r.output
    r = await asyncio.to_thread(run, "plugin", "unload", "p")
    assert r.exit_code != 0
    assert "no plugin 'p'" in r.output

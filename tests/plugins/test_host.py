"""``trellis.PluginHost``: load, call, unload, upgrade with rollback, and quarantine
after a plugin spends its crash budget while the host and its other plugins serve."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import trellis

Wat = Callable[[str], Path]


@asynccontextmanager
async def running(host: trellis.PluginHost) -> AsyncIterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    hid = trellis.telemetry.attach(seen.append)
    sup = await trellis.Supervisor.start_link([host.child_spec()])
    try:
        yield seen
    finally:
        await sup.stop()
        trellis.telemetry.detach(hid)


def plugin_events(seen: list[dict[str, Any]], name: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in seen
        if str(e["event"]).startswith("plugin.")
        and e["event"] not in ("plugin.stats", "plugin.started", "plugin.stopped")
        and (name is None or e["event"] == name)
    ]


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_load_call_list_unload(wat: Wat) -> None:
    host = trellis.PluginHost(name="plugins", defaults={"memory": "8MiB", "timeout": 1.0})
    async with running(host) as seen:
        row = await host.load("m", wat("misbehave"), version="1.0.0")
        assert (row["id"], row["version"], row["state"]) == ("m", "1.0.0", "running")
        assert await host.call("m", "upper", b"abc") == b"ABC"
        [listed] = host.list()
        assert listed["calls"] == 1
        assert listed["sha256"] == row["sha256"]
        with pytest.raises(ValueError, match="loaded already"):
            await host.load("m", wat("misbehave"))
        await host.unload("m")
        assert host.list() == []
        with pytest.raises(trellis.NotFound):
            await host.call("m", "echo", b"")
        names = [e["event"] for e in plugin_events(seen)]
        assert names == ["plugin.loaded", "plugin.unloaded"]
        assert all(e["sha256"] == row["sha256"] for e in plugin_events(seen))


async def test_quarantine_after_the_crash_budget(wat: Wat) -> None:
    host = trellis.PluginHost(intensity=2, period=60.0, defaults={"memory": "8MiB"})
    async with running(host) as seen:
        await host.load("bad", wat("misbehave"), version="0.1", timeout=1.0)
        await host.load("good", wat("plain"), version="2.0", timeout=1.0)
        for n in range(3):
            await until(lambda: host.get("bad")["state"] == "running")
            with pytest.raises(trellis.PluginError) as ei:
                await host.call("bad", "trap_on", b"boom")
            assert ei.value.kind == "trap"
            # the other plugin keeps serving throughout
            assert await host.call("good", "add", [n, 1]) == str(n + 1).encode()
        await until(lambda: host.get("bad")["state"] == "quarantined")
        with pytest.raises(trellis.PluginError) as ei:
            await host.call("bad", "echo", b"")
        assert ei.value.kind == "unavailable"
        assert host.get("bad")["restarts"] == 2
        [q] = plugin_events(seen, "plugin.quarantined")
        assert (q["plugin"], q["version"], q["crashes"]) == ("bad", "0.1", 3)
        assert len(plugin_events(seen, "plugin.crashed")) == 3
        assert host.get("good")["state"] == "running"
        assert await host.call("good", "add", [2, 2]) == b"4"
        # an operator lifts the quarantine
        await host.release("bad")
        assert await host.call("bad", "echo", b"back") == b"back"


async def test_upgrade_starts_the_new_version_before_stopping_the_old(wat: Wat) -> None:
    host = trellis.PluginHost(defaults={"memory": "8MiB", "timeout": 1.0})
    v2 = (
        '(module (import "extism:host/env" "output_set" (func $o (param i64 i64)))'
        ' (func (export "echo") (result i32) i32.const 0))'
    )
    async with running(host) as seen:
        old = await host.load("m", wat("misbehave"), version="1")
        # a module that cannot be read: nothing changes
        with pytest.raises(trellis.InvalidChildSpec):
            await host.upgrade("m", "(module (oops", version="2")
        # a module whose check call traps: rolled back, the old one keeps serving
        with pytest.raises(trellis.PluginError):
            await host.upgrade("m", wat("misbehave"), version="2", check=("trap_on", b"boom"))
        # a module that cannot start (an import it is not granted)
        with pytest.raises(trellis.StartError):
            await host.upgrade("m", wat("wasi_read"), version="2")
        assert host.get("m")["version"] == "1"
        assert await host.call("m", "echo", b"v1") == b"v1"
        failed = plugin_events(seen, "plugin.upgrade_failed")
        assert [e["to_version"] for e in failed] == ["2", "2", "2"]
        # a good upgrade
        row = await host.upgrade("m", v2, version="2", check=("echo", b"x"))
        assert row["version"] == "2"
        assert row["sha256"] != old["sha256"]
        assert await host.call("m", "echo", b"ignored") == b""
        [up] = plugin_events(seen, "plugin.upgraded")
        assert (up["from_version"], up["version"]) == ("1", "2")
        assert up["from_sha256"] == old["sha256"]


async def test_allow_list(wat: Wat) -> None:
    allowed = trellis.Plugin(wat("plain"), id="x", memory="1MiB", timeout=1).args[0].sha256
    host = trellis.PluginHost(allowed_sha256=[allowed], defaults={"memory": "1MiB"})
    async with running(host):
        await host.load("plain", wat("plain"))
        with pytest.raises(PermissionError, match="allow-list"):
            await host.load("other", wat("misbehave"))
        assert [r["id"] for r in host.list()] == ["plain"]

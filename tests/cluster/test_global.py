"""Global names and pubsub across nodes: an owner node in its own OS process
(_owner_node.py) and this test's event loop as a second node, on a throwaway NATS."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from _nats_nodes import NatsServer

import trellis
from trellis.cluster import Cluster, ClusterSettings, RemoteExit

OWNER = Path(__file__).with_name("_owner_node.py")


class _Node:
    def __init__(self, proc: subprocess.Popen[bytes], cluster: Cluster) -> None:
        self.proc = proc
        self.cluster = cluster


@pytest.fixture
async def two_nodes(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[_Node]:
    log = open(tmp_path / "owner.log", "wb")  # noqa: SIM115, ASYNC230 (closed below)
    proc = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, str(OWNER), nats_server.url, "owner", str(tmp_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    cluster = Cluster(ClusterSettings(nats_server.url, node="here", name="g", lease_ttl=1.0))
    await cluster.start()
    try:
        yield _Node(proc, cluster)
    finally:
        await cluster.stop()
        if proc.poll() is None:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 15)
        log.close()


async def _until(check: Any, timeout: float, what: str) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        try:
            value = await check()
        except (trellis.NoProc, trellis.Exited):
            value = None
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_global_call_and_cast_cross_nodes(two_nodes: _Node) -> None:
    g = trellis.Global("counter")

    async def where() -> Any:
        return await trellis.call(g, "node", timeout=2.0)

    assert await _until(where, 20.0, "the owner's counter to answer") == "owner"
    assert await trellis.call(g, ("add", 5), timeout=2.0) == 5
    trellis.cast(g, 3)

    async def eight() -> bool:
        return bool(await trellis.call(g, "get", timeout=2.0) == 8)

    await _until(eight, 5.0, "the cast to arrive")
    # tuples, dicts, bytes and None cross intact
    assert await trellis.call(g, {"k": (1, b"x", None)}, timeout=2.0) == (
        "echo",
        {"k": (1, b"x", None)},
    )
    # a name nobody holds: NoProc at once
    with pytest.raises(trellis.NoProc):
        await trellis.call(trellis.Global("nobody"), "get", timeout=2.0)
    # a global name is taken cluster-wide: starting it here too fails
    with pytest.raises(trellis.AlreadyStarted):
        await trellis.Server.start(name=g)


async def test_exited_when_the_remote_server_dies_mid_call_then_noproc(
    two_nodes: _Node,
) -> None:
    g = trellis.Global("counter")

    async def up() -> Any:
        return await trellis.call(g, "node", timeout=2.0)

    await _until(up, 20.0, "the counter")
    with pytest.raises(trellis.Exited) as info:
        await trellis.call(g, "die_mid_call", timeout=5.0)
    assert isinstance(info.value.reason, RemoteExit)
    assert "died mid-call" in info.value.reason.reason

    async def gone() -> bool:
        try:
            await trellis.call(g, "get", timeout=2.0)
        except trellis.NoProc:
            return True
        return False

    await _until(gone, 5.0, "NoProc once the name is gone")


async def test_a_monitor_on_a_global_name_gets_down_when_its_node_dies(
    two_nodes: _Node,
) -> None:
    g = trellis.Global("counter")

    async def up() -> Any:
        return await trellis.call(g, "node", timeout=2.0)

    await _until(up, 20.0, "the counter")
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def watcher() -> None:
        trellis.monitor(g)
        await got.put(await trellis.receive())

    trellis.spawn(watcher)
    await asyncio.sleep(0.1)
    two_nodes.proc.send_signal(signal.SIGKILL)
    down = await asyncio.wait_for(got.get(), 10.0)
    assert isinstance(down, trellis.Down)
    assert isinstance(down.reason, RemoteExit)
    assert "left" in down.reason.reason
    with pytest.raises(trellis.NoProc):
        await trellis.call(g, "get", timeout=2.0)


async def test_pubsub_crosses_nodes_both_ways(two_nodes: _Node, tmp_path: Path) -> None:
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def listener() -> None:
        trellis.pubsub.subscribe("ticks")
        while True:
            await got.put(await trellis.receive())

    pid = trellis.spawn(listener)
    try:
        tick = await asyncio.wait_for(got.get(), 20.0)
        assert tick[:2] == ("tick", "owner")
        news = tmp_path / "news.log"

        async def delivered() -> bool:
            trellis.pubsub.publish("news", ("hello", {"from": "here"}))
            return news.exists() and "('hello', {'from': 'here'})" in news.read_text()

        await _until(delivered, 10.0, "the owner's subscriber to get our news")
        # the local fast path: our own subscriber gets our publish as the very object
        mine = ["local"]
        trellis.pubsub.subscribe("mine", pid)
        assert trellis.pubsub.publish("mine", mine) == 1
        while await asyncio.wait_for(got.get(), 5.0) is not mine:
            pass
    finally:
        trellis.exit(pid, trellis.KILL)


class _Evil:
    def __reduce__(self) -> Any:
        return (os.system, (f"touch {_Evil.marker}",))

    marker = ""


async def test_a_crafted_pickle_on_every_subject_creates_nothing(
    two_nodes: _Node, tmp_path: Path
) -> None:
    g = trellis.Global("counter")

    async def up() -> Any:
        return await trellis.call(g, "node", timeout=2.0)

    await _until(up, 20.0, "the counter")
    _Evil.marker = str(tmp_path / "pwned")
    payload = pickle.dumps(_Evil())
    nc = two_nodes.cluster.nc
    subjects = [
        f"trellis.g.rpc.{b'owner'.hex()}",
        f"trellis.g.rpc.{b'here'.hex()}",
        f"trellis.g.pubsub.{b'news'.hex()}",
        f"trellis.g.pubsub.{b'ticks'.hex()}",
    ]
    for subject in subjects:
        await nc.publish(subject, payload)
        try:
            await nc.request(subject, payload, timeout=1.0)
        except Exception:
            pass
    # the KV buckets' subjects too (a value there is JSON text, never unpickled)
    for bucket in ("nodes", "leases", "names"):
        await nc.publish(f"$KV.trellis_g_{bucket}.evil", payload)
    await asyncio.sleep(1.0)
    assert not os.path.exists(_Evil.marker)  # noqa: ASYNC240
    assert await trellis.call(g, "node", timeout=2.0) == "owner", "the owner still serves"


async def test_every_nodes_events_can_be_replayed_from_a_time(
    two_nodes: _Node, nats_server: NatsServer
) -> None:
    import time

    from trellis.cluster import replay

    since = time.time() - 60
    g = trellis.Global("counter")

    async def up() -> Any:
        return await trellis.call(g, "node", timeout=2.0)

    await _until(up, 20.0, "the counter")
    with pytest.raises(trellis.Exited):
        await trellis.call(g, "die_mid_call", timeout=5.0)

    async def exited() -> list[dict[str, Any]]:
        seen = [e async for e in replay(since)]
        return [
            e
            for e in seen
            if e["node"] == "owner" and e["event"] == "child.exited" and "counter" in e["path"]
        ]

    [event] = await _until(exited, 10.0, "the owner's child.exited in the stream")
    assert "died mid-call" in event["reason"]
    assert event["wall"] >= since
    # and from the command line, by any machine that reaches NATS
    out = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trellis", "cluster", "events", "--url", nats_server.url,
        "--name", "g", "--since", "5m", "--json",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    text, _ = await asyncio.wait_for(out.communicate(), 30)
    assert out.returncode == 0
    assert '"child.exited"' in text.decode()
    out = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "trellis", "events", "--cluster", nats_server.url,
        "--cluster-name", "g", "--since", "5m",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    text, _ = await asyncio.wait_for(out.communicate(), 30)
    assert out.returncode == 0
    assert " owner child.exited " in text.decode()

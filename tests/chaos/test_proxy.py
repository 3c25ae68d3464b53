"""ChaosProxy against a real TCP echo server: forwarding, cut, restore, and an outage
fault run by the engine (with a health check measuring recovery)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from trellis import Supervisor
from trellis.chaos import Chaos, ChaosProxy, ChaosSpecError, Plan
from trellis.testing import capture_telemetry


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, int]]:
    """A TCP echo server on a free loopback port (echoes until EOF, then closes)."""
    writers: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            writers.discard(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[:2]
    server.close()
    for w in list(writers):
        w.close()
    await server.wait_closed()
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
async def proxy(echo_server: tuple[str, int]) -> AsyncIterator[ChaosProxy]:
    async with ChaosProxy(echo_server, name="echo") as p:
        yield p


async def roundtrip(port: int, payload: bytes = b"ping") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_forwards_both_ways(proxy: ChaosProxy) -> None:
    assert proxy.port != 0
    assert await roundtrip(proxy.port) == b"ping"
    big = bytes(range(256)) * 8192  # 2 MiB: flow control in both directions
    assert await roundtrip(proxy.port, big) == big
    stats = proxy.statistics()
    assert stats.connections == 2
    assert stats.bytes_up == stats.bytes_down == 4 + len(big)


async def test_cut_resets_open_connections_and_refuses_new_ones(proxy: ChaosProxy) -> None:
    reader, writer = await asyncio.open_connection(*proxy.address)
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
    await proxy.cut()
    assert proxy.is_cut
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await roundtrip(proxy.port)
    port = proxy.port
    await proxy.restore()
    assert not proxy.is_cut
    assert proxy.port == port
    assert await roundtrip(proxy.port) == b"ping"
    assert proxy.statistics().cuts == 1
    assert proxy.statistics().active == 0


async def test_unreachable_upstream_closes_the_client() -> None:
    async with ChaosProxy("127.0.0.1:1") as p:  # nothing listens on port 1
        reader, writer = await asyncio.open_connection(*p.address)
        with pytest.raises(ConnectionResetError):  # reset, as a dropped dependency does
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        assert p.statistics().upstream_failures == 1


def test_bad_upstream() -> None:
    with pytest.raises(ValueError, match="not HOST:PORT"):
        ChaosProxy("localhost")


async def test_outage_fault_cuts_and_restores_a_named_proxy(proxy: ChaosProxy) -> None:
    """An outage cuts the proxy for its duration; recovery is the health check passing
    again after the restore, and both actions are journaled as chaos operator actions."""

    async def healthy() -> bool:
        try:
            return await roundtrip(proxy.port) == b"ping"
        except OSError:
            return False

    sup = await Supervisor.start_link([], name="root")
    plan = Plan.from_spec(
        {"fault": "outage", "proxy": "echo", "at": 0.1, "duration": 0.3}, seed=1, duration=1
    )
    with capture_telemetry(["operator.action"]) as cap:
        async with Chaos(
            sup, plan, proxies={"echo": proxy}, healthy=healthy, health_interval=0.02, settle=2
        ) as engine:
            task = asyncio.ensure_future(engine.run())
            await asyncio.sleep(0.25)
            assert proxy.is_cut
            assert not await healthy()
            report = await task
    assert not proxy.is_cut
    assert await healthy()
    assert [(e["action"], e["target"], e["result"]) for e in cap.events] == [
        ("fault:outage", "proxy:echo", "ok"),
        ("heal:outage", "proxy:echo", "ok"),
    ]
    [f] = report.faults
    assert f.target == "proxy:echo"
    assert f.detect is None
    assert f.healed is not None
    assert f.recover is not None
    assert f.recover >= f.healed
    await sup.stop()


async def test_an_outage_needs_a_known_proxy(proxy: ChaosProxy) -> None:
    plan = Plan.from_spec(
        [
            {"fault": "kill", "target": "x", "at": 0},
            {"fault": "outage", "proxy": "db", "at": 0, "duration": 1},
        ],
        seed=1,
        duration=1,
    )
    with pytest.raises(
        ChaosSpecError, match=r"chaos\[1\].proxy: no proxy named 'db' \(have: echo\)"
    ):
        Chaos(None, plan, proxies={"echo": proxy})


async def test_overlapping_outages_of_one_proxy(proxy: ChaosProxy) -> None:
    sup = await Supervisor.start_link([], name="root")
    plan = Plan.from_spec(
        [
            {"fault": "outage", "proxy": "echo", "at": 0.05, "duration": 0.3},
            {"fault": "outage", "proxy": "echo", "at": 0.1, "duration": 0.1},
        ],
        seed=1,
        duration=0.5,
    )
    async with Chaos(sup, plan, proxies={"echo": proxy}, settle=0) as engine:
        report = await engine.run()
    assert [f.result for f in report.faults] == ["ok", "skipped: target already held by fault 1.1"]
    assert not proxy.is_cut
    await sup.stop()

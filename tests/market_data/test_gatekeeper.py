"""The gatekeeper: one token bucket (local or in Redis), a local fallback when Redis dies,
and the way back when it returns."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import prometheus_client
import pytest
from examples.market_data._common import GATEKEEPER, RECOVERY, STORE, wait_closers
from examples.market_data.gatekeeper import Gatekeeper, Grant, fallback_gauge
from examples.market_data.pipeline import Pipeline

import trellis
import trellis.testing

from .conftest import RedisServer


async def _flood(pids: list[trellis.Pid], seconds: float) -> tuple[int, float]:
    """Acquire from ``pids`` in turn for ``seconds``; (grants, elapsed)."""
    granted = 0
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        grant: Grant = await trellis.call(pids[i % len(pids)], ("acquire", 1))
        granted += grant.granted
        i += 1
    return granted, time.monotonic() - start


async def test_local_bucket_never_exceeds_its_limit() -> None:
    """Without Redis, grants over any span stay within burst + rate * span."""
    pid = await Gatekeeper.start(rate=20, burst=5)
    try:
        granted, elapsed = await _flood([pid], 0.5)
        stats = await trellis.call(pid, "stats")
    finally:
        await trellis.stop(pid)
    assert stats.mode == "local"
    assert stats.fallback == 0
    assert stats.denied > 0
    assert 5 <= granted <= 5 + 20 * elapsed + 1


async def test_redis_bucket_is_shared(redis_server: RedisServer) -> None:
    """Two gatekeepers on one Redis share one limit: together they stay within it."""
    a = await Gatekeeper.start(rate=20, burst=5, redis_url=redis_server.url, namespace="t1")
    b = await Gatekeeper.start(rate=20, burst=5, redis_url=redis_server.url, namespace="t1")
    try:
        granted, elapsed = await _flood([a, b], 0.5)
        modes = {(await trellis.call(p, "stats")).mode for p in (a, b)}
    finally:
        await trellis.stop(a)
        await trellis.stop(b)
        await wait_closers()
    assert modes == {"redis"}
    assert 5 <= granted <= 5 + 20 * elapsed + 1


async def test_falls_back_within_one_request_and_returns(redis_server: RedisServer) -> None:
    """Redis killed: the very next request is answered by the local fallback, which is
    exported (property, event, gauge); Redis back: a later request returns to it."""
    registry = prometheus_client.CollectorRegistry()
    _gauge, hid = fallback_gauge(registry)
    pid = await Gatekeeper.start(
        rate=10, burst=4, redis_url=redis_server.url, fallback_fraction=0.5, probe_interval=0.2
    )
    try:
        first: Grant = await trellis.call(pid, ("acquire", 1))
        assert first == Grant(True, 0.0, "redis")
        events = ["market_data.gatekeeper.fallback", "market_data.gatekeeper.restored"]
        with trellis.testing.capture_telemetry(events) as cap:
            redis_server.kill()
            grant: Grant = await trellis.call(pid, ("acquire", 1))
            assert grant.mode == "fallback"
            assert grant.granted
            fell = await cap.wait_for("market_data.gatekeeper.fallback", timeout=1)
            assert fell["fallback"] == 1
            assert registry.get_sample_value("market_data_gatekeeper_fallback") == 1
            stats = await trellis.call(pid, "stats")
            assert stats.fallback == 1
            assert stats.fallbacks == 1
            # the fallback share: burst 4 * 0.5 = 2 tokens, then refusals at 5/s
            grants = [await trellis.call(pid, ("acquire", 1)) for _ in range(3)]
            assert [g.mode for g in grants] == ["fallback"] * 3
            assert [g.granted for g in grants] == [True, False, False]
            redis_server.start()
            async with asyncio.timeout(10):
                while True:  # each request probes Redis once the probe interval has passed
                    if (await trellis.call(pid, ("acquire", 1))).mode == "redis":
                        break
                    await asyncio.sleep(0.05)
            back = await cap.wait_for("market_data.gatekeeper.restored", timeout=1)
            assert back["fallback"] == 0
            assert registry.get_sample_value("market_data_gatekeeper_fallback") == 0
        stats = await trellis.call(pid, "stats")
        assert stats.mode == "redis"
        assert stats.fallback == 0
        assert stats.restores == 1
    finally:
        trellis.telemetry.detach(hid)
        await trellis.stop(pid)
        await wait_closers()


async def test_returns_to_redis_without_a_request(redis_server: RedisServer) -> None:
    """In fallback, a gatekeeper nobody asks still finds Redis back (it PINGs every
    probe interval), so a fallback episode ends when Redis returns, not at the next
    request."""
    pid = await Gatekeeper.start(rate=10, burst=4, redis_url=redis_server.url, probe_interval=0.1)
    try:
        events = ["market_data.gatekeeper.fallback", "market_data.gatekeeper.restored"]
        with trellis.testing.capture_telemetry(events) as cap:
            redis_server.kill()
            assert (await trellis.call(pid, ("acquire", 1))).mode == "fallback"
            await asyncio.sleep(0.3)  # PINGs fail meanwhile: still in fallback
            assert (await trellis.call(pid, "stats")).mode == "fallback"
            redis_server.start()
            await cap.wait_for("market_data.gatekeeper.restored", timeout=5)
        stats = await trellis.call(pid, "stats")
    finally:
        await trellis.stop(pid)
        await wait_closers()
    assert (stats.mode, stats.fallbacks, stats.restores) == ("redis", 1, 1)
    assert stats.granted == 1  # no request was needed to return


@pytest.mark.parametrize("bad", [{"rate": 0, "burst": 5}, {"rate": 5, "burst": 0.5}])
async def test_bad_limits_fail_the_start(bad: dict[str, float]) -> None:
    """A limit that cannot work fails the start with a message naming it."""
    with pytest.raises(trellis.StartError, match=r"Gatekeeper: (rate|burst) must be"):
        await Gatekeeper.start(**bad)


async def test_pipeline_with_redis_outage_gets_no_429(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The Redis-backed pipeline loses Redis mid-run: collectors write to the store
    directly, backfills go through the local fallback, the exchange never answers 429,
    and once Redis is back the gatekeeper uses it again; nothing is missing."""
    async with Pipeline(
        symbols=6, seed=11, groups=2, rate=600, redis_url=redis_server.url, workdir=tmp_path
    ) as p:
        assert await p.settle(timeout=20)
        assert (await trellis.call(GATEKEEPER, "stats")).mode == "redis"
        assert (await trellis.call(STORE, "stats")).drained > 0  # ticks came through Redis
        redis_server.kill()
        pid = await p.pid(p.collector_paths[0])
        assert pid is not None
        trellis.exit(pid, trellis.KILL)
        await trellis.call(RECOVERY, ("backfill", "S00", 1, 50))
        assert await p.settle(timeout=20)
        assert (await trellis.call(GATEKEEPER, "stats")).mode == "fallback"
        redis_server.start()
        await asyncio.sleep(0.6)  # past the probe interval
        await trellis.call(RECOVERY, ("backfill", "S01", 1, 10))
        assert await p.settle(timeout=20)
        stats = await trellis.call(GATEKEEPER, "stats")
        report = await p.integrity()
    assert stats.mode == "redis"
    assert stats.fallbacks >= 1
    assert stats.restores >= 1
    assert report.missing == {}
    assert report.rejected_429 == 0

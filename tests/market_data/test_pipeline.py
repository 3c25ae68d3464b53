"""The market-data pipeline end to end: every tick stored, gaps backfilled, hangs caught."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from contextlib import closing
from pathlib import Path

import pytest
from examples.market_data._common import RECOVERY, SENTINEL, connect
from examples.market_data.pipeline import Pipeline, PipelineStartError

import trellis
import trellis.testing
from trellis._tree import classify


async def test_stores_every_tick(tmp_path: Path) -> None:
    """Running for a while, the store holds every tick the exchange generated, by seq."""
    async with Pipeline(symbols=6, seed=3, groups=2, rate=400, workdir=tmp_path) as p:
        await asyncio.sleep(2.0)
        assert await p.settle(timeout=20)
        report = await p.integrity()
        print(report.summary())
        print(await trellis.call(RECOVERY, "report"))
    assert report.expected_total > 0
    assert all(n > 0 for n in report.expected.values())
    assert report.missing == {}
    assert report.rejected_429 == 0


async def _outage_with_gaps(p: Pipeline, path: str) -> dict[str, object]:
    """Kill the collector at ``path`` until an outage leaves a gap; that outage's report."""
    for _attempt in range(10):
        pid = await p.pid(path)
        assert pid is not None
        before = len((await trellis.call(RECOVERY, "report"))["outages"])
        trellis.exit(pid, trellis.KILL)
        async with asyncio.timeout(10):
            while True:
                outages = (await trellis.call(RECOVERY, "report"))["outages"]
                if len(outages) > before and outages[-1]["resolved"]:
                    break
                await asyncio.sleep(0.02)
        outage = outages[-1]
        assert outage["reason"] == "killed"
        if outage["gaps"]:
            return outage
        await asyncio.sleep(0.3)
    raise AssertionError("ten kills and not one gap")


async def test_killed_collector_gap_is_backfilled(tmp_path: Path) -> None:
    """A collector killed with KILL leaves a gap; the recovery worker fetches exactly it,
    starting within a second of the collector's UP, and nothing is missing after."""
    async with Pipeline(symbols=6, seed=5, groups=2, rate=1000, workdir=tmp_path) as p:
        assert await p.settle(timeout=20)
        outage = await _outage_with_gaps(p, p.collector_paths[0])
        assert await p.settle(timeout=20)
        report = await p.integrity()
        done = (await trellis.call(RECOVERY, "report"))["outages"][-1]
        with closing(connect(p.db_path)) as conn:
            rows = conn.execute(
                "SELECT from_seq, to_seq, stored, done_at FROM backfills WHERE outage = ?",
                (outage["key"],),
            ).fetchall()
    assert done["gaps_closed"] == done["gaps"] == outage["gaps"] == len(rows)
    # exactly the gap: every tick fetched was missing, and each gap is closed
    assert all(stored == b - a + 1 and at is not None for a, b, stored, at in rows)
    assert done["start_delay"] is not None
    assert 0 <= done["start_delay"] < 1.0
    assert report.gaps_by_cause.get("outage", 0) >= 1
    assert report.missing == {}
    assert report.rejected_429 == 0


async def test_sentinel_kills_a_hung_collector(tmp_path: Path) -> None:
    """A collector that stops processing (alive, silent) is killed by the sentinel with
    reason Hung; it classifies as hung, restarts, and its gap is backfilled."""
    async with Pipeline(
        symbols=4, seed=7, groups=2, rate=300, silence=0.6, heartbeat=0.1, workdir=tmp_path
    ) as p:
        path = p.collector_paths[1]
        pid = await p.pid(path)
        assert pid is not None
        with trellis.testing.capture_telemetry(["child.exited"]) as cap:
            assert await trellis.call(pid, "hang") == "hanging"
            exited = await cap.wait_for("child.exited", timeout=10, child_id="collector-1")
        assert exited["supervisor"] == f"{p.paths['collectors']}"
        assert isinstance(exited["reason"], trellis.Hung)
        assert "no heartbeat for 0.6s" in str(exited["reason"])
        assert classify(exited["reason"]) == "hung"
        assert not pid.alive
        assert await p.settle(timeout=20)
        report = await p.integrity()
        kills = (await trellis.call(SENTINEL, "stats"))["kills"]
        new_pid = await p.pid(path)
    assert [k["child_id"] for k in kills] == ["collector-1"]
    assert new_pid is not None
    assert new_pid is not pid
    assert report.missing == {}


async def test_backfill_is_idempotent(tmp_path: Path) -> None:
    """Backfilling a range twice stores the missing ticks once and nothing the second time."""
    async with Pipeline(symbols=3, seed=9, groups=1, rate=200, workdir=tmp_path) as p:
        await asyncio.sleep(0.5)
        assert await p.settle(timeout=20)
        with closing(connect(p.db_path)) as conn:
            conn.execute("DELETE FROM ticks WHERE symbol = 'S00' AND seq BETWEEN 5 AND 15")
            first = await trellis.call(RECOVERY, ("backfill", "S00", 1, 20))
            second = await trellis.call(RECOVERY, ("backfill", "S00", 1, 20))
            assert await p.settle(timeout=20)
            rows = dict(
                conn.execute(
                    "SELECT id, stored FROM backfills WHERE id IN (?, ?)", (first, second)
                ).fetchall()
            )
            count, distinct = conn.execute(
                "SELECT COUNT(*), COUNT(DISTINCT seq) FROM ticks WHERE symbol = 'S00' AND seq <= 20"
            ).fetchone()
        report = await p.integrity()
    assert rows == {first: 11, second: 0}
    assert count == distinct == 20
    assert report.missing == {}


async def test_infra_and_recovery_faults_heal(tmp_path: Path) -> None:
    """The exchange SIGKILLed and SIGSTOPped (its watchdog calls it hung), the store,
    the gatekeeper and the recovery worker killed: after each the pipeline is healthy
    again, and in the end every tick is stored, every gap closed, and no 429 seen."""
    async with Pipeline(
        symbols=6, seed=13, groups=2, rate=500, exchange_watchdog=0.6, workdir=tmp_path
    ) as p:
        assert await p.healthy()
        exchange = await p.pid(p.paths["exchange"])
        assert isinstance(exchange, trellis.CommandPid)
        assert exchange.os_pid is not None
        with trellis.testing.capture_telemetry(["child.exited"]) as cap:
            os.killpg(exchange.os_pid, signal.SIGKILL)
            await cap.wait_for("child.exited", timeout=10, child_id="exchange")
            await _until_healthy(p)
            exchange = await p.pid(p.paths["exchange"])
            assert isinstance(exchange, trellis.CommandPid)
            assert exchange.os_pid is not None
            os.killpg(exchange.os_pid, signal.SIGSTOP)
            hung = await cap.wait_for("child.exited", timeout=10, pid=exchange)
            assert classify(hung["reason"]) == "hung"
            await _until_healthy(p)
            for part in ("store", "gatekeeper", "recovery"):
                pid = await p.pid(p.paths[part])
                assert pid is not None
                trellis.exit(pid, trellis.KILL)
                await cap.wait_for("child.exited", timeout=10, child_id=part)
                await _until_healthy(p)
        assert await p.settle(timeout=30)
        report = await p.integrity()
    assert report.missing == {}
    assert report.gaps_opened == report.gaps_closed > 0
    assert report.rejected_429 == 0


async def _until_healthy(p: Pipeline) -> None:
    async with asyncio.timeout(15):
        while True:
            if await p.healthy():
                return
            await asyncio.sleep(0.05)


async def test_a_busy_port_fails_the_start_with_the_exchange_s_reason(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = Pipeline(symbols=3, groups=1, feed_port=port, workdir=tmp_path)
        with pytest.raises(PipelineStartError, match="address already in use"):
            await p.start()
    assert trellis.whereis("market_data") is None

"""The tick store: idempotent batched writes, one feed session per database, and the
Redis buffer drained into SQLite."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path

import redis.asyncio
from examples.market_data import exchange
from examples.market_data._common import wait_closers
from examples.market_data.pipeline import free_port
from examples.market_data.store import TickStore

import trellis

from .conftest import RedisServer

TICKS = [["S00", 1, 1.5, 10.25, 3], ["S00", 2, 1.7, 10.5, 1], ["S01", 1, 1.6, 99.0, 7]]


def _rows(db: Path) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT * FROM ticks ORDER BY symbol, seq").fetchall()


async def test_writing_twice_stores_once(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    pid = await TickStore.start(db=str(db))
    try:
        assert await trellis.call(pid, ("write", TICKS, True)) == 3
        assert await trellis.call(pid, ("write", TICKS, True)) == 0
        stats = await trellis.call(pid, "stats")
    finally:
        await trellis.stop(pid)
        await wait_closers()
    assert (stats.inserted, stats.ignored, stats.batches) == (3, 3, 2)
    assert _rows(db) == [tuple(t) for t in sorted(TICKS)]


async def test_buffered_ticks_are_committed_on_stop(tmp_path: Path) -> None:
    """Buffered writes wait for the flush interval, but an orderly stop commits them."""
    db = tmp_path / "t.db"
    pid = await TickStore.start(db=str(db), flush_interval=60.0)
    try:
        assert await trellis.call(pid, ("write", TICKS)) == 3
        assert _rows(db) == []
        assert (await trellis.call(pid, "stats")).buffered == 3
    finally:
        await trellis.stop(pid)
        await wait_closers()
    assert len(_rows(db)) == 3


async def _exchange(epoch: float) -> tuple[trellis.Pid, str]:
    http = free_port()
    argv = [sys.executable, str(Path(exchange.__file__)), "--port", str(free_port())]
    argv += ["--http-port", str(http), "--symbols", "2", "--epoch", repr(epoch)]
    sup = await trellis.Supervisor.start(
        [trellis.Command(argv, id="exchange", ready=trellis.Ready.notify(timeout=10))]
    )
    return sup, f"http://127.0.0.1:{http}"


async def test_a_new_feed_session_empties_the_store(tmp_path: Path) -> None:
    """The same exchange session keeps the rows across store restarts; another empties."""
    db = str(tmp_path / "t.db")
    epoch = time.time()
    for ep, kept in ((epoch, 3), (epoch, 3), (epoch + 1.0, 0)):
        sup, url = await _exchange(ep)
        try:
            pid = await TickStore.start(db=db, exchange=url)
            if ep == epoch and kept == 3 and not _rows(Path(db)):
                await trellis.call(pid, ("write", TICKS, True))
            await trellis.stop(pid)
            assert len(_rows(Path(db))) == kept
        finally:
            await sup.stop()
            await wait_closers()


async def test_redis_buffer_is_drained_into_sqlite(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Batches pushed to the Redis list end up in SQLite, and the list is trimmed."""
    db = tmp_path / "t.db"
    client = redis.asyncio.Redis.from_url(redis_server.url)
    pid = await TickStore.start(db=str(db), redis_url=redis_server.url, namespace="t")
    try:
        await client.rpush("t:ticks", json.dumps(TICKS[:2]), json.dumps(TICKS))
        async with asyncio.timeout(10):
            while True:
                if len(_rows(db)) == 3 and not await client.llen("t:ticks"):
                    break
                await asyncio.sleep(0.02)
        stats = await trellis.call(pid, "stats")
    finally:
        await trellis.stop(pid)
        await client.aclose()
        await wait_closers()
    assert stats.drained == 2
    assert stats.inserted == 3
    assert _rows(db) == [tuple(t) for t in sorted(TICKS)]

"""The sync guard: with the synchronous standby gone, commits would wait forever; the
guard lets the primary commit alone, and makes the standby synchronous again once it
streams. Real PostgreSQL primary + replica."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest


async def _show(dsn: str) -> str:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SHOW synchronous_standby_names")
        row = await cur.fetchone()
        return str(row[0]) if row else ""


async def _until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_writes_go_on_when_the_standby_dies_and_it_is_synchronous_again_after(
    new_pg_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from examples.notify.pgcluster import REPLICA_NAME
    from examples.notify.scheduler import sync_guard
    from examples.notify.store import Store

    pg = new_pg_cluster
    monkeypatch.setenv("NOTIFY_NATS", "nats://127.0.0.1:1")  # unused by the guard
    monkeypatch.setenv("NOTIFY_APNS", "http://127.0.0.1:1")
    monkeypatch.setenv("NOTIFY_PG", pg.write_dsn)
    monkeypatch.delenv("NOTIFY_PG_SYNC_STANDBY", raising=False)
    assert await _show(pg.primary_dsn) == REPLICA_NAME
    store = await Store.open(pg.write_dsn)
    await store.init_schema()
    guard = asyncio.create_task(sync_guard(interval=0.1, grace=0.5))
    try:
        await store.claim([("k0", "apns:t", "apns")], "o", 3.0)  # commits with the standby
        await asyncio.to_thread(pg.stop_replica)
        # this commit waits for a standby that is gone, until the guard lets it through
        got = await asyncio.wait_for(store.claim([("k1", "apns:t", "apns")], "o", 3.0), 60)
        assert got == {("k1", "apns:t"): "claimed"}
        assert await _show(pg.primary_dsn) == ""

        await asyncio.to_thread(pg.start_replica_again)

        async def synchronous_again() -> bool:
            return await _show(pg.primary_dsn) == REPLICA_NAME

        await _until(synchronous_again, "the standby to be synchronous again")
    finally:
        guard.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await guard
        await store.close()

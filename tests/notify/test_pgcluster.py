"""The throwaway PostgreSQL cluster: the replica is a synchronous standby, so stopping
the primary and promoting the replica loses no committed row, and a Store on the
multi-host write DSN reconnects to the promoted replica by itself."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from examples.notify.pgcluster import REPLICA_NAME, PgCluster, skip_reason
from examples.notify.store import Store, StoreUnavailable

ROOT = Path(__file__).resolve().parents[2]


def _one(dsn: str, query: str) -> object:
    with psycopg.connect(dsn, autocommit=True) as db:
        row = db.execute(query).fetchone()  # type: ignore[arg-type]
        assert row is not None
        return row[0]


def test_the_replica_is_a_synchronous_standby(pg_cluster: PgCluster) -> None:
    assert (
        _one(
            pg_cluster.primary_dsn,
            f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{REPLICA_NAME}'",
        )
        == "sync"
    )
    assert _one(pg_cluster.primary_dsn, "SHOW synchronous_commit") == "on"
    replica = pg_cluster.replica_dsn or ""
    assert _one(replica, "SELECT pg_is_in_recovery()") is True
    # once promoted it must not wait for a standby of its own
    assert _one(replica, "SHOW synchronous_standby_names") == ""
    assert _one(pg_cluster.write_dsn, "SELECT pg_is_in_recovery()") is False
    assert _one(pg_cluster.write_dsn, "SHOW port") == str(pg_cluster.primary_port)


async def test_promote_after_stopping_the_primary_loses_no_committed_row(
    new_pg_cluster: PgCluster,
) -> None:
    cluster = new_pg_cluster
    store = await Store.open(cluster.write_dsn, cluster.replica_dsn, retry_for=30)
    await store.init_schema()
    committed: list[tuple[str, str]] = []  # pairs whose claim() returned
    stop, reached = asyncio.Event(), asyncio.Event()
    target = 400

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            batch = [(f"w{n}-{i}", f"apns:t{i}", "apns") for i in range(20)]
            got = await store.claim(batch, "writer", stale_after=60)
            assert set(got.values()) == {"claimed"}
            committed.extend(got)
            n += 1
            if len(committed) >= target:
                reached.set()

    task = asyncio.create_task(writer())

    async def until_reached() -> None:  # or the writer's failure, whichever comes first
        waiter = asyncio.create_task(reached.wait())
        await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        if task.done():
            task.result()
        assert reached.is_set(), "the writer made no progress for 30 s"

    try:
        await until_reached()
        await asyncio.to_thread(cluster.stop_primary)  # the writer is mid-stream
        before = len(committed)  # every claim acknowledged before the stop returned
        await asyncio.sleep(0.2)
        assert not task.done()  # it is retrying, not failing
        await asyncio.to_thread(cluster.promote)
        target = before + 200  # writes flow again, on the new primary
        reached.clear()
        await until_reached()
        stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        stop.set()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await store.close()
    assert store.reconnects >= 1
    assert _one(cluster.write_dsn, "SHOW port") == str(cluster.replica_port)
    with psycopg.connect(cluster.write_dsn, autocommit=True) as db:
        rows = db.execute("SELECT key, token FROM deliveries WHERE state = 'claimed'").fetchall()
    missing = set(committed) - {(k, t) for k, t in rows}
    assert not missing, f"{len(missing)} committed claims lost in the failover"
    assert len(committed) >= before + 200


async def test_a_store_gives_up_with_a_clear_error_when_no_primary_comes_back(
    new_pg_cluster: PgCluster,
) -> None:
    store = await Store.open(new_pg_cluster.write_dsn, retry_for=1.0)
    try:
        await store.init_schema()
        new_pg_cluster.stop_primary()  # and nobody promotes the replica
        with pytest.raises(StoreUnavailable, match=r"no writable PostgreSQL for 1 s") as info:
            await store.beat()
        assert str(new_pg_cluster.primary_port) in str(info.value)
        assert isinstance(info.value, psycopg.OperationalError)
    finally:
        await store.close()


def test_the_command_line_starts_prints_the_dsns_and_stops_on_sigterm() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    base = f"/tmp/notify-pg-cli-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.notify.pgcluster", base],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert set(info) >= {"primary", "replica", "write", "startup_s"}
        assert _one(info["write"], "SELECT pg_is_in_recovery()") is False
        assert _one(info["replica"], "SELECT pg_is_in_recovery()") is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not os.path.exists(f"{base}/primary/postmaster.pid")
        assert not os.path.exists(f"{base}/replica/postmaster.pid")
        for port in (info["primary_port"], info["replica_port"]):
            with socket.socket() as s, pytest.raises(ConnectionRefusedError):
                s.connect(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
        shutil.rmtree(base, ignore_errors=True)

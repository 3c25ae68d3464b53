"""The notification store on a real PostgreSQL primary + synchronous replica: claims are
exclusive and idempotent under redelivery, only the claim holder records an outcome,
campaign progress is fenced, and status reads fall back to the primary when the replica
lags."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import psycopg
import pytest
from examples.notify.pgcluster import PgCluster
from examples.notify.store import Store


def _items(n: int, tag: str | None = None) -> list[tuple[str, str, str]]:
    tag = tag or uuid.uuid4().hex[:8]
    out = []
    for i in range(n):
        prov = "apns" if i % 2 else "fcm"
        out.append((f"{tag}-k{i // 2}", f"{prov}:tok{i}", prov))
    return out


def _row(dsn: str, key: str, token: str) -> tuple[Any, ...] | None:
    with psycopg.connect(dsn, autocommit=True) as db:
        return db.execute(
            "SELECT state, claim_owner, attempts FROM deliveries WHERE key = %s AND token = %s",
            (key, token),
        ).fetchone()


async def test_claim_twice_and_by_another_owner(pg_store: Store, pg_cluster: PgCluster) -> None:
    items = _items(200)
    pairs = [(k, t) for k, t, _ in items]
    first = await pg_store.claim(items, "a", stale_after=60)
    assert first == dict.fromkeys(pairs, "claimed")
    # the same owner again (a retried call, a redelivery to the same worker): still its own
    assert await pg_store.claim(items, "a", stale_after=60) == first
    # another owner while the claims are fresh: busy, nothing changes hands
    assert await pg_store.claim(items, "b", stale_after=60) == dict.fromkeys(pairs, "busy")
    assert _row(pg_cluster.primary_dsn, *pairs[0])[:2] == ("claimed", "a")  # type: ignore[index]
    # finished rows are done for everyone, the owner included
    states = ["sent", "invalid", "failed"]
    done = [(k, t, states[i % 3]) for i, (k, t) in enumerate(pairs[:150])]
    assert await pg_store.finish(done, "a") == 150
    for owner in ("a", "b"):
        got = await pg_store.claim(items, owner, stale_after=0.0)
        assert [got[p] for p in pairs[:150]] == ["done"] * 150
    # the rest were taken over by b just now (stale_after=0), so a sees them busy
    assert [got[p] for p in pairs[150:]] == ["claimed"] * 50
    got = await pg_store.claim(items[150:], "a", stale_after=60)
    assert set(got.values()) == {"busy"}
    assert _row(pg_cluster.primary_dsn, *pairs[0])[0] == "sent"  # type: ignore[index]


async def test_duplicate_items_in_one_batch_and_empty_batches(pg_store: Store) -> None:
    items = _items(4)
    got = await pg_store.claim(items + items[:2], "a", stale_after=60)
    assert got == {(k, t): "claimed" for k, t, _ in items}
    assert await pg_store.claim([], "a", stale_after=60) == {}
    assert await pg_store.finish([], "a") == 0
    with pytest.raises(ValueError, match="not one of"):
        await pg_store.finish([(items[0][0], items[0][1], "claimed")], "a")


async def test_concurrent_claims_from_two_owners_never_share_a_pair(
    pg_cluster: PgCluster,
) -> None:
    stores = [await Store.open(pg_cluster.write_dsn) for _ in range(3)]
    try:
        rng = random.Random(14)
        for _ in range(5):
            items = _items(300)
            batches = []
            for _s in stores:  # overlapping, shuffled batches: the redelivered message case
                batch = rng.sample(items, 200)
                batches.append(batch)
            results = await asyncio.gather(
                *(
                    s.claim(b, f"owner{i}", stale_after=60)
                    for i, (s, b) in enumerate(zip(stores, batches, strict=True))
                )
            )
            winners: dict[tuple[str, str], list[str]] = {}
            for i, res in enumerate(results):
                for pair, state in res.items():
                    assert state in ("claimed", "busy")
                    if state == "claimed":
                        winners.setdefault(pair, []).append(f"owner{i}")
            offered = {(k, t) for b in batches for k, t, _ in b}
            assert set(winners) == offered  # everything offered was claimed by someone...
            assert all(len(w) == 1 for w in winners.values())  # ...by exactly one owner
            with psycopg.connect(pg_cluster.primary_dsn, autocommit=True) as db:
                keys = sorted({k for k, _ in offered})
                rows = db.execute(
                    "SELECT key, token, claim_owner FROM deliveries WHERE key = ANY(%s)", (keys,)
                ).fetchall()
            assert {(k, t): [o] for k, t, o in rows} == winners
    finally:
        for s in stores:
            await s.close()


async def test_stale_claim_is_taken_over_and_the_old_owner_cannot_finish(
    pg_store: Store, pg_cluster: PgCluster
) -> None:
    items = _items(2)
    (k0, t0, _), (k1, t1, _) = items
    assert set((await pg_store.claim(items, "old", stale_after=60)).values()) == {"claimed"}
    assert await pg_store.claim(items, "new", stale_after=60) == {
        (k0, t0): "busy",
        (k1, t1): "busy",
    }
    await asyncio.sleep(0.05)
    # "new" judges claims older than 10 ms stale: it takes both over
    assert set((await pg_store.claim(items, "new", stale_after=0.01)).values()) == {"claimed"}
    assert _row(pg_cluster.primary_dsn, k0, t0) == ("claimed", "new", 2)
    # the old owner wakes up and records outcomes: not its claims any more, nothing changes
    assert await pg_store.finish([(k0, t0, "sent"), (k1, t1, "failed")], "old") == 0
    assert _row(pg_cluster.primary_dsn, k0, t0) == ("claimed", "new", 2)
    assert await pg_store.release([(k0, t0)], "old") == 0
    assert await pg_store.finish([(k0, t0, "sent")], "new") == 1
    assert _row(pg_cluster.primary_dsn, k0, t0) == ("sent", "new", 2)
    # a finished row is final: neither its owner nor anyone else rewrites it
    assert await pg_store.finish([(k0, t0, "failed")], "new") == 0
    assert await pg_store.claim(items[:1], "third", stale_after=0.0) == {(k0, t0): "done"}


async def test_finish_by_a_non_owner_changes_nothing(
    pg_store: Store, pg_cluster: PgCluster
) -> None:
    items = _items(10)
    await pg_store.claim(items, "owner", stale_after=60)
    assert await pg_store.finish([(k, t, "sent") for k, t, _ in items], "intruder") == 0
    for k, t, _ in items:
        assert _row(pg_cluster.primary_dsn, k, t) == ("claimed", "owner", 1)
    status = await pg_store.status(items[0][0])
    assert [d["state"] for d in status["deliveries"]] == ["claimed", "claimed"]


async def test_release_and_reap_make_claims_claimable_at_once(
    pg_store: Store, pg_cluster: PgCluster
) -> None:
    items = _items(4)
    pairs = [(k, t) for k, t, _ in items]
    await pg_store.claim(items, "a", stale_after=60)
    assert await pg_store.release(pairs[:2], "b") == 0  # not b's to release
    assert await pg_store.release(pairs[:2], "a") == 2
    got = await pg_store.claim(items, "b", stale_after=60)
    assert [got[p] for p in pairs] == ["claimed", "claimed", "busy", "busy"]
    await asyncio.sleep(0.05)
    assert await pg_store.reap(0.01) >= 2
    assert _row(pg_cluster.primary_dsn, *pairs[3])[:2] == ("pending", "a")  # type: ignore[index]
    # a reaped claim's old owner may still record its outcome while nobody took it over
    assert await pg_store.finish([(*pairs[3], "sent")], "a") == 1
    got = await pg_store.claim(items, "c", stale_after=60)
    assert [got[p] for p in pairs] == ["claimed", "claimed", "claimed", "done"]


async def test_campaign_progress_is_fenced(pg_store: Store) -> None:
    cid = f"camp-{uuid.uuid4().hex[:8]}"
    assert await pg_store.add_campaign(cid, 100, "bulk", {"title": "sale"}) is True
    assert await pg_store.add_campaign(cid, 5, "high", {}) is False  # exists: unchanged
    assert await pg_store.campaign_advance(cid, fence=7, next_index=10) is True
    # a stale owner (token 3) writes after the newer one: rejected, nothing written
    assert await pg_store.campaign_advance(cid, fence=3, next_index=50) is False
    (c,) = [c for c in await pg_store.campaigns_open() if c["id"] == cid]
    assert (c["next_index"], c["fence"], c["total"], c["priority"]) == (10, 7, 100, "bulk")
    assert c["payload"] == {"title": "sale"}
    # the same token again and a newer one are accepted
    assert await pg_store.campaign_advance(cid, fence=7, next_index=20) is True
    assert await pg_store.campaign_advance(cid, fence=9, next_index=100) is True
    assert await pg_store.campaign_advance(cid, fence=8, next_index=30) is False
    assert cid not in [c["id"] for c in await pg_store.campaigns_open()]  # done at total
    assert await pg_store.campaign_advance("no-such-campaign", 1, 1) is False


async def test_init_schema_is_idempotent_and_safe_concurrently(pg_cluster: PgCluster) -> None:
    stores = [await Store.open(pg_cluster.write_dsn) for _ in range(3)]
    try:
        await asyncio.gather(*(s.init_schema() for s in stores))
        await asyncio.gather(*(s.init_schema() for s in stores))
    finally:
        for s in stores:
            await s.close()


async def _until(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def test_status_falls_back_to_the_primary_while_the_replica_lags(
    pg_cluster: PgCluster,
) -> None:
    store = await Store.open(pg_cluster.write_dsn, pg_cluster.replica_dsn, max_replica_lag=0.5)
    try:
        await store.init_schema()
        items = _items(2)
        key = items[0][0]
        await store.claim(items, "a", stale_after=60)

        async def served_by(source: str) -> dict[str, Any] | None:
            await store.beat()
            st = await store.status(key)
            return st if st["source"] == source and len(st["deliveries"]) == 2 else None

        st = await _until(lambda: served_by("replica"), "status served by the replica")
        assert st["replica_lag"] <= 0.5
        assert [d["state"] for d in st["deliveries"]] == ["claimed", "claimed"]
        pg_cluster.pause_replay()
        try:
            # the primary keeps committing (the standby is synchronous on flush, not on
            # replay, so pausing replay does not block writes) and keeps beating
            await store.finish([(k, t, "sent") for k, t, _ in items], "a")
            st = await _until(lambda: served_by("primary"), "the fallback to the primary")
            assert st["replica_lag"] is not None
            assert st["replica_lag"] > 0.5
            assert [d["state"] for d in st["deliveries"]] == ["sent", "sent"]
            assert all(isinstance(d["sent_at"], float) for d in st["deliveries"])
            with psycopg.connect(pg_cluster.replica_dsn or "", autocommit=True) as db:
                stale = db.execute("SELECT state FROM deliveries WHERE key = %s", (key,))
                assert [r[0] for r in stale.fetchall()] == ["claimed", "claimed"]
        finally:
            pg_cluster.resume_replay()
        st = await _until(lambda: served_by("replica"), "the replica to catch up")
        assert [d["state"] for d in st["deliveries"]] == ["sent", "sent"]
    finally:
        await store.close()


async def test_without_a_replica_status_reads_the_primary(pg_cluster: PgCluster) -> None:
    store = await Store.open(pg_cluster.write_dsn)
    try:
        assert await store.replica_lag() is None
        st = await store.status(f"absent-{uuid.uuid4().hex}")
        assert st["source"] == "primary"
        assert st["deliveries"] == []
    finally:
        await store.close()

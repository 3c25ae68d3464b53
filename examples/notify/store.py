"""The notification service's PostgreSQL store: delivery claims, campaigns, heartbeat.

Tables (created by :meth:`Store.init_schema`, idempotently):

- ``deliveries(key, token, provider, state, claim_owner, claimed_at, finished_at,
  attempts)``, primary key ``(key, token)``. ``state`` is ``claimed`` (an owner is
  sending it), ``pending`` (released or reaped: anyone may claim it), or a final state
  ``sent`` / ``invalid`` / ``failed``.
- ``campaigns(id, total, priority, payload, next_index, fence, done)``: campaign progress,
  written only with a fencing token at least as new as the last one written.
- ``heartbeat(id = 1, ts)``: written on the primary by :meth:`Store.beat`; the read
  replica's lag is how old that row looks on the replica.

The idempotency rule: a ``(key, token)`` pair is claimed by exactly one owner at a time
(``INSERT ... ON CONFLICT DO NOTHING``), a finished pair is never claimed again, and only
the owner that still holds a claim can record its outcome. A claim older than
``stale_after`` (its owner presumably died) may be taken over by another owner.

Connections: one psycopg 3 ``AsyncConnection`` to the primary (autocommit off, one
transaction per call) and, with ``replica_dsn``, one to the read replica (autocommit,
used by :meth:`Store.status` and :meth:`Store.replica_lag`). When the primary
connection fails (``OperationalError``: a stopped server, a failover) a call reconnects
to ``write_dsn`` and runs again, with backoff, for up to ``retry_for`` seconds, then raises
:class:`StoreUnavailable`. Every call is safe to run again after a lost commit
acknowledgement (claiming pairs you already hold reports them ``claimed`` again), so the
retry cannot double a claim. Give ``write_dsn`` as a multi-host conninfo with
``target_session_attrs=read-write`` (see :mod:`examples.notify.pgcluster`) and the retry
finds a promoted replica.

A Store is meant for one asyncio task at a time; calls from several tasks are
serialized by an internal lock (correct, but no parallelism: open one Store per task
that needs its own throughput).

Example::

    store = await Store.open(cluster.write_dsn, cluster.replica_dsn, max_replica_lag=1.0)
    await store.init_schema()
    got = await store.claim([("k1", "apns:abc", "apns")], owner="a/high-0/7", stale_after=3.0)
    if got[("k1", "apns:abc")] == "claimed":
        ...  # send
        await store.finish([("k1", "apns:abc", "sent")], owner="a/high-0/7")
    print(await store.status("k1"))
    await store.close()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

T = TypeVar("T")

FINAL_STATES = frozenset({"sent", "invalid", "failed"})
LAG_CACHE_S = 0.25
"""How long a replica lag reading is reused by :meth:`Store.status`."""
_SCHEMA_LOCK = 0x6E6F7469  # advisory lock id: concurrent init_schema calls take turns

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    key         text NOT NULL,
    token       text NOT NULL,
    provider    text NOT NULL,
    state       text NOT NULL
                CHECK (state IN ('claimed', 'pending', 'sent', 'invalid', 'failed')),
    claim_owner text,
    claimed_at  timestamptz,
    finished_at timestamptz,
    attempts    integer NOT NULL DEFAULT 0,
    PRIMARY KEY (key, token)
);
CREATE INDEX IF NOT EXISTS deliveries_claimed_at ON deliveries (claimed_at)
    WHERE state = 'claimed';
CREATE TABLE IF NOT EXISTS campaigns (
    id         text PRIMARY KEY,
    total      integer NOT NULL,
    priority   text NOT NULL,
    payload    jsonb NOT NULL DEFAULT '{}',
    next_index integer NOT NULL DEFAULT 0,
    fence      bigint NOT NULL DEFAULT 0,
    done       boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS heartbeat (
    id integer PRIMARY KEY CHECK (id = 1),
    ts timestamptz NOT NULL
);
"""

_CLAIM = """
WITH input AS (
    SELECT * FROM unnest(%(k)s::text[], %(t)s::text[], %(p)s::text[]) AS i(key, token, provider)
), ins AS (
    INSERT INTO deliveries AS d (key, token, provider, state, claim_owner, claimed_at, attempts)
    SELECT key, token, provider, 'claimed', %(o)s, now(), 1 FROM input
    ON CONFLICT (key, token) DO NOTHING
    RETURNING d.key, d.token
), upd AS (
    UPDATE deliveries AS d
    SET state = 'claimed', claim_owner = %(o)s, claimed_at = now(), attempts = d.attempts + 1
    FROM input i
    WHERE d.key = i.key AND d.token = i.token
      AND (d.state = 'pending'
           OR (d.state = 'claimed'
               AND (d.claim_owner = %(o)s
                    OR d.claimed_at < now() - make_interval(secs => %(s)s))))
    RETURNING d.key, d.token
)
SELECT i.key, i.token,
       CASE WHEN ins.key IS NOT NULL OR upd.key IS NOT NULL THEN 'claimed'
            WHEN d.state IN ('sent', 'invalid', 'failed') THEN 'done'
            ELSE 'busy' END
FROM input i
LEFT JOIN ins ON ins.key = i.key AND ins.token = i.token
LEFT JOIN upd ON upd.key = i.key AND upd.token = i.token
LEFT JOIN deliveries d ON d.key = i.key AND d.token = i.token
"""
# One statement: its CTEs share one snapshot, so the UPDATE (take over stale claims, or
# re-claim my own after a retried call) never sees the rows the INSERT just added. A pair
# another transaction inserts concurrently is seen by neither and comes out "busy".

_FINISH = """
UPDATE deliveries AS d SET state = i.state, finished_at = now()
FROM unnest(%s::text[], %s::text[], %s::text[]) AS i(key, token, state)
WHERE d.key = i.key AND d.token = i.token
  AND d.claim_owner = %s AND d.state IN ('claimed', 'pending')
"""

_RELEASE = """
UPDATE deliveries AS d SET state = 'pending'
FROM unnest(%s::text[], %s::text[]) AS i(key, token)
WHERE d.key = i.key AND d.token = i.token AND d.claim_owner = %s AND d.state = 'claimed'
"""

_STATUS = """
SELECT token, provider, state, attempts, extract(epoch FROM finished_at)::float8
FROM deliveries WHERE key = %s ORDER BY token
"""


class StoreUnavailable(psycopg.OperationalError):
    """The primary stayed unreachable for ``retry_for`` seconds (the message says which
    hosts and the last error)."""


class Store:
    """Delivery claims, campaign progress and the heartbeat in PostgreSQL (see the module
    docstring). Open with :meth:`Store.open`; one asyncio task at a time."""

    def __init__(
        self,
        write_dsn: str,
        replica_dsn: str | None = None,
        max_replica_lag: float = 1.0,
        *,
        retry_for: float = 15.0,
    ) -> None:
        self.write_dsn = write_dsn
        self.replica_dsn = replica_dsn or None
        self.max_replica_lag = max_replica_lag
        self.retry_for = retry_for
        self.reconnects = 0
        """How many times the primary connection was re-established after a failure."""
        self._conn: AsyncConnection[Any] | None = None
        self._replica: AsyncConnection[Any] | None = None
        self._replica_retry_at = 0.0
        self._lag: tuple[float, float | None] | None = None  # (monotonic read time, lag)
        self._lock = asyncio.Lock()
        self._replica_lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        write_dsn: str,
        replica_dsn: str | None = None,
        max_replica_lag: float = 1.0,
        *,
        retry_for: float = 15.0,
    ) -> Store:
        """Connect to the primary (retrying for up to ``retry_for`` seconds)."""
        store = cls(write_dsn, replica_dsn, max_replica_lag, retry_for=retry_for)
        await store._tx(lambda conn: _noop(), "connect")
        return store

    async def close(self) -> None:
        for conn in (self._conn, self._replica):
            if conn is not None:
                try:
                    await conn.close()
                except Exception:
                    pass
        self._conn = self._replica = None

    # --- the primary connection ----------------------------------------------------

    async def _connect(self, dsn: str, autocommit: bool) -> AsyncConnection[Any]:
        extra: dict[str, Any] = {}
        if "connect_timeout" not in conninfo_to_dict(dsn):
            extra["connect_timeout"] = 3
        return await AsyncConnection.connect(dsn, autocommit=autocommit, **extra)

    async def _tx(self, fn: Callable[[AsyncConnection[Any]], Awaitable[T]], what: str) -> T:
        """Run ``fn`` in one transaction on the primary and commit; reconnect and run it
        again on connection failures, for up to ``retry_for`` seconds."""
        async with self._lock:
            deadline: float | None = None
            delay = 0.05
            conflicts = 0
            while True:
                conn = self._conn
                try:
                    if conn is None or conn.closed:
                        conn = self._conn = None
                        conn = self._conn = await self._connect(self.write_dsn, False)
                        if deadline is not None:
                            self.reconnects += 1
                    result = await fn(conn)
                    await conn.commit()
                    return result
                except psycopg.errors.TransactionRollback:
                    # deadlock or serialization failure: the server rolled back; run again
                    await self._rollback(conn)
                    conflicts += 1
                    if conflicts > 10:
                        raise
                    await asyncio.sleep(0.01 * conflicts)
                except psycopg.OperationalError as e:
                    await self._drop()
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + self.retry_for
                    if now >= deadline:
                        raise StoreUnavailable(
                            f"{what}: no writable PostgreSQL for {self.retry_for:g} s "
                            f"({_hosts(self.write_dsn)}): {e}"
                        ) from e
                    await asyncio.sleep(min(delay, max(0.0, deadline - now)))
                    delay = min(delay * 2, 1.0)
                except psycopg.Error:
                    await self._rollback(conn)
                    raise
                except BaseException:
                    # cancelled or a bug mid-transaction: the connection's state is unknown
                    await self._drop()
                    raise

    async def _rollback(self, conn: AsyncConnection[Any] | None) -> None:
        if conn is None:
            return
        try:
            await conn.rollback()
        except Exception:
            await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:
                pass

    # --- schema --------------------------------------------------------------------

    async def init_schema(self) -> None:
        """Create the tables if missing (safe to call from many nodes at once)."""

        async def run(conn: AsyncConnection[Any]) -> None:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            await conn.execute(SCHEMA)

        await self._tx(run, "init_schema")

    # --- deliveries ----------------------------------------------------------------

    async def claim(
        self, items: list[tuple[str, str, str]], owner: str, stale_after: float
    ) -> dict[tuple[str, str], str]:
        """Claim ``(key, token, provider)`` items for ``owner`` in one statement.

        Each ``(key, token)`` maps to ``"claimed"`` (yours now: send it; also when you
        already held it), ``"done"`` (finished as sent/invalid/failed: do not send) or
        ``"busy"`` (another owner claimed it less than ``stale_after`` seconds ago).
        A claim older than ``stale_after``, and a released or reaped one, is taken over.
        """
        uniq: dict[tuple[str, str], str] = {}
        for key, token, provider in items:
            uniq.setdefault((key, token), provider)
        if not uniq:
            return {}
        pairs = sorted(uniq)  # one lock order for every caller: no deadlocks between batches
        params = {
            "k": [k for k, _ in pairs],
            "t": [t for _, t in pairs],
            "p": [uniq[p] for p in pairs],
            "o": owner,
            "s": float(stale_after),
        }

        async def run(conn: AsyncConnection[Any]) -> dict[tuple[str, str], str]:
            cur = await conn.execute(_CLAIM, params)
            return {(k, t): r for k, t, r in await cur.fetchall()}

        return await self._tx(run, "claim")

    async def finish(self, rows: list[tuple[str, str, str]], owner: str) -> int:
        """Record final states ``(key, token, state)`` (state: sent/invalid/failed) for the
        pairs ``owner`` still holds; pairs taken over by another owner are left alone.
        Returns how many rows were recorded (a call retried after a lost commit counts 0)."""
        for _, _, state in rows:
            if state not in FINAL_STATES:
                raise ValueError(f"finish: state {state!r} is not one of {sorted(FINAL_STATES)}")
        if not rows:
            return 0
        cols = ([k for k, _, _ in rows], [t for _, t, _ in rows], [s for _, _, s in rows])

        async def run(conn: AsyncConnection[Any]) -> int:
            cur = await conn.execute(_FINISH, (*cols, owner))
            return cur.rowcount

        return await self._tx(run, "finish")

    async def release(self, pairs: Iterable[tuple[str, str]], owner: str) -> int:
        """Give back claims ``(key, token)`` that ``owner`` holds but did not finish, so the
        next claim takes them at once. Returns how many were released."""
        pairs = list(pairs)
        if not pairs:
            return 0

        async def run(conn: AsyncConnection[Any]) -> int:
            cur = await conn.execute(
                _RELEASE, ([k for k, _ in pairs], [t for _, t in pairs], owner)
            )
            return cur.rowcount

        return await self._tx(run, "release")

    async def reap(self, stale_after: float) -> int:
        """Mark claims older than ``stale_after`` seconds ``pending`` (claimable by anyone;
        their old owner may still record an outcome until someone takes them over).
        Returns how many."""

        async def run(conn: AsyncConnection[Any]) -> int:
            cur = await conn.execute(
                "UPDATE deliveries SET state = 'pending' WHERE state = 'claimed' "
                "AND claimed_at < now() - make_interval(secs => %s)",
                (float(stale_after),),
            )
            return cur.rowcount

        return await self._tx(run, "reap")

    async def status(self, key: str) -> dict[str, Any]:
        """``{"key", "deliveries": [{"token", "provider", "state", "attempts", "sent_at"}],
        "source": "replica"|"primary", "replica_lag": seconds|None}``: read from the
        replica when its lag is within ``max_replica_lag``, else from the primary."""
        lag = await self.replica_lag()
        rows: list[tuple[Any, ...]] | None = None
        source = "primary"
        if lag is not None and lag <= self.max_replica_lag:
            rows = await self._replica_query(_STATUS, (key,))
            if rows is not None:
                source = "replica"
        if rows is None:

            async def run(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
                cur = await conn.execute(_STATUS, (key,))
                return await cur.fetchall()

            rows = await self._tx(run, "status")
        return {
            "key": key,
            "deliveries": [
                {
                    "token": token,
                    "provider": provider,
                    "state": state,
                    "attempts": attempts,
                    "sent_at": finished if state == "sent" else None,
                }
                for token, provider, state, attempts, finished in rows
            ],
            "source": source,
            "replica_lag": lag,
        }

    # --- replica lag ---------------------------------------------------------------

    async def beat(self) -> None:
        """Write the heartbeat row on the primary (call it every fraction of
        ``max_replica_lag``; without beats the replica looks ever more behind)."""

        async def run(conn: AsyncConnection[Any]) -> None:
            await conn.execute(
                "INSERT INTO heartbeat (id, ts) VALUES (1, clock_timestamp()) "
                "ON CONFLICT (id) DO UPDATE SET ts = excluded.ts"
            )

        await self._tx(run, "beat")

    async def replica_lag(self) -> float | None:
        """Seconds since the last heartbeat the replica has applied (cached for
        ``LAG_CACHE_S``); None without a replica, when it is unreachable, or before the
        first beat."""
        if self.replica_dsn is None:
            return None
        now = time.monotonic()
        if self._lag is not None and now - self._lag[0] < LAG_CACHE_S:
            return self._lag[1]
        rows = await self._replica_query(
            "SELECT extract(epoch FROM clock_timestamp() - ts)::float8 FROM heartbeat WHERE id = 1",
            (),
        )
        lag = float(rows[0][0]) if rows else None
        self._lag = (time.monotonic(), lag)
        return lag

    async def _replica_query(self, query: str, params: tuple[Any, ...]) -> list[Any] | None:
        """Rows from the replica, or None when it cannot answer (then retried after 1 s)."""
        assert self.replica_dsn is not None
        async with self._replica_lock:
            if self._replica is None or self._replica.closed:
                if time.monotonic() < self._replica_retry_at:
                    return None
                try:
                    self._replica = await self._connect(self.replica_dsn, True)
                except psycopg.Error:
                    self._replica_retry_at = time.monotonic() + 1.0
                    return None
            try:
                cur = await self._replica.execute(query, params)
                return await cur.fetchall()
            except psycopg.Error:
                if self._replica.broken or self._replica.closed:
                    try:
                        await self._replica.close()
                    except Exception:
                        pass
                    self._replica = None
                    self._replica_retry_at = time.monotonic() + 1.0
                return None

    # --- campaigns -----------------------------------------------------------------

    async def add_campaign(
        self, id: str, total: int, priority: str, payload: dict[str, Any]
    ) -> bool:
        """Create campaign ``id`` (False when it exists already; it is left as it is)."""

        async def run(conn: AsyncConnection[Any]) -> bool:
            cur = await conn.execute(
                "INSERT INTO campaigns (id, total, priority, payload) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (id) DO NOTHING",
                (id, int(total), priority, Jsonb(payload)),
            )
            return cur.rowcount == 1

        return await self._tx(run, "add_campaign")

    async def campaigns_open(self) -> list[dict[str, Any]]:
        """Campaigns not done, oldest first: dicts with id, total, priority, payload,
        next_index, fence, done."""

        async def run(conn: AsyncConnection[Any]) -> list[dict[str, Any]]:
            cur = await conn.execute(
                "SELECT id, total, priority, payload, next_index, fence, done FROM campaigns "
                "WHERE NOT done ORDER BY created_at, id"
            )
            names = ("id", "total", "priority", "payload", "next_index", "fence", "done")
            return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]

        return await self._tx(run, "campaigns_open")

    async def campaign_advance(self, campaign: str, fence: int, next_index: int) -> bool:
        """Record ``next_index`` under fencing token ``fence``: written only when no newer
        token wrote first (``fence <= $fence``); ``done`` once next_index reaches total.
        False (nothing written) for a stale token or an unknown campaign."""

        async def run(conn: AsyncConnection[Any]) -> bool:
            cur = await conn.execute(
                "UPDATE campaigns SET next_index = %(n)s, fence = %(f)s, done = %(n)s >= total "
                "WHERE id = %(c)s AND fence <= %(f)s",
                {"n": int(next_index), "f": int(fence), "c": campaign},
            )
            return cur.rowcount == 1

        return await self._tx(run, "campaign_advance")


async def _noop() -> None:
    return None


def _hosts(dsn: str) -> str:
    try:
        d = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "?"
    hosts = str(d.get("host") or "").split(",")
    ports = str(d.get("port") or "").split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    return ",".join(f"{h}:{p}" for h, p in zip(hosts, ports, strict=False))

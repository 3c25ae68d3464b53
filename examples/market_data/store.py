"""The tick store: a Trellis server that writes ticks to SQLite in batches.

Rows are ``ticks(symbol, seq, ts, price, size)`` keyed by ``(symbol, seq)`` and
written with ``INSERT OR IGNORE``, so writing a tick twice (a redelivered Redis
batch, a backfill over ticks already stored) changes nothing.

With ``redis_url`` a Redis list (``<namespace>:ticks``) sits in front: collectors
push batches there, and a drainer linked to the store moves them into SQLite
(read, commit, then trim: a crash in between only redelivers). Direct writes
(``("write", ticks)``) keep working when Redis is down.

Example::

    pid = await TickStore.start_link(db="ticks.db", name="market_data.store")
    await trellis.call(pid, ("write", [("S00", 1, 1.0, 10.5, 3)], True))

Calls: ``("write", ticks)`` buffers them (committed within ``flush_interval``)
and returns how many it took; ``("write", ticks, True)`` commits them at once and
returns how many rows were new; ``"flush"`` commits the buffer; ``"stats"`` ->
:class:`StoreStats`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from examples.market_data._common import (
    close_on_exit,
    connect,
    http_json,
    redis_call,
    redis_client,
    redis_errors,
)

import trellis

__all__ = ["StoreStats", "TickStore"]

_log = logging.getLogger("market_data.store")
_FLUSH = "flush-timer"

Tick = tuple[str, int, float, float, int]


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What the store did: rows ``inserted``, rows ``ignored`` (already there),
    ``batches`` committed, ticks ``buffered`` now, batches ``drained`` from Redis."""

    inserted: int
    ignored: int
    batches: int
    buffered: int
    drained: int
    session: str | None


class TickStore(trellis.Server):
    """Batched, idempotent tick writes to SQLite (optionally drained from Redis)."""

    trap_exits = True  # a supervisor's shutdown runs terminate: the buffer is committed

    async def init(
        self,
        *,
        db: str,
        exchange: str | None = None,
        redis_url: str | None = None,
        namespace: str = "trellis:md",
        batch: int = 500,
        flush_interval: float = 0.05,
    ) -> None:
        if batch < 1:
            raise ValueError(f"TickStore: batch must be >= 1, got {batch}")
        if not flush_interval > 0:
            raise ValueError(f"TickStore: flush_interval must be > 0, got {flush_interval}")
        self.conn = connect(db)
        self.batch = batch
        self.flush_interval = flush_interval
        self.buffer: list[Tick] = []
        self.timer: asyncio.TimerHandle | None = None
        self.inserted = self.ignored = self.batches = self.drained = 0
        self.key = f"{namespace}:ticks"
        self.redis = redis_client(redis_url) if redis_url else None
        close_on_exit(self.pid, *self._closers())
        self.session = await self._check_session(exchange) if exchange else None
        self.drainer = (
            trellis.spawn(_drain, self.pid, self.redis, self.key, link=True) if self.redis else None
        )

    def _closers(self) -> list[Any]:
        out: list[Any] = [self.conn.close]
        if self.redis is not None:
            out.append(self.redis.aclose)
        return out

    async def _check_session(self, exchange: str) -> str:
        """A store holds one feed session: a different exchange session empties it."""
        stats = None
        for attempt in range(50):
            try:
                stats = await http_json(exchange, "/stats", timeout=2.0)
                break
            except (OSError, TimeoutError):
                await asyncio.sleep(min(0.5, 0.02 * 2**attempt))
        if stats is None:
            raise ConnectionError(f"TickStore: the exchange at {exchange} does not answer /stats")
        session = str(stats["session"])
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'session'").fetchone()
        if row is None or row[0] != session:
            with self.conn:
                self.conn.execute("BEGIN")
                self.conn.execute("DELETE FROM ticks")
                self.conn.execute("DELETE FROM backfills")
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('session', ?)", (session,)
                )
            if self.redis is not None:
                try:
                    await redis_call(self.redis.delete(self.key))
                except redis_errors():
                    pass
            if row is not None:
                _log.info("new exchange session %s: the store was emptied", session)
        return session

    # -- callbacks -------------------------------------------------------------------
    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "flush":
            return self._flush()
        if request == "stats":
            return StoreStats(
                self.inserted,
                self.ignored,
                self.batches,
                len(self.buffer),
                self.drained,
                self.session,
            )
        if isinstance(request, tuple) and request and request[0] == "write":
            ticks = request[1]
            if len(request) > 2 and request[2]:  # commit now; returns the rows it added
                self._flush()
                self.buffer = [tuple(t) for t in ticks]
                return self._flush()
            self.buffer.extend(tuple(t) for t in ticks)
            if len(self.buffer) >= self.batch:
                self._flush()
            elif self.timer is None:
                loop = asyncio.get_running_loop()
                self.timer = loop.call_later(self.flush_interval, self.pid.send, _FLUSH)
            return len(ticks)
        raise ValueError(f"TickStore: unknown call {request!r}")

    async def handle_info(self, msg: Any) -> Any:
        if msg == _FLUSH:
            self.timer = None
            self._flush()
        elif isinstance(msg, tuple) and msg and msg[0] == "drained":
            self.drained += msg[1]
        elif isinstance(msg, trellis.Exit) and msg.pid is self.drainer:
            return trellis.Stop(msg.reason)  # the drainer died: so do we (and restart)
        return None

    async def terminate(self, reason: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.drainer is not None:
            trellis.exit(self.drainer, trellis.SHUTDOWN)  # linked, but a NORMAL stop spares it
        self._flush()

    def _flush(self) -> int:
        buf = self.buffer
        if not buf:
            return 0
        self.buffer = []
        before = self.conn.total_changes
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "INSERT OR IGNORE INTO ticks(symbol, seq, ts, price, size) VALUES (?, ?, ?, ?, ?)",
                buf,
            )
        added = self.conn.total_changes - before
        self.inserted += added
        self.ignored += len(buf) - added
        self.batches += 1
        return added


async def _drain(store: trellis.Pid, client: Any, key: str, chunk: int = 64) -> None:
    """Move batches from the Redis list into the store: read, commit, then trim."""
    errors = redis_errors()
    delay = 0.05
    down = False
    while True:
        try:
            items = await redis_call(client.lrange(key, 0, chunk - 1))
        except errors as e:
            if not down:
                _log.warning("redis buffer unreachable (%s); retrying", e)
                down = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            continue
        down = False
        delay = 0.05
        if not items:
            await asyncio.sleep(0.02)
            continue
        ticks = [tuple(t) for item in items for t in json.loads(item)]
        await trellis.call(store, ("write", ticks, True))
        store.send(("drained", len(items)))
        try:
            await redis_call(client.ltrim(key, len(items), -1))
        except errors:
            pass  # not trimmed: the batches come again, and are ignored

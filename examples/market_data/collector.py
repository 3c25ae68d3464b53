"""A collector: a Trellis server that streams one group of symbols into the tick store.

A reader process linked to the collector holds the feed connection: it
subscribes, forwards ticks in small batches to the collector, and reconnects
with backoff when the feed goes away. The collector writes each batch to the
store (or pushes it to the Redis buffer when one is configured, falling back to
the store while Redis is down), and heartbeats to the sentinel while batches
keep arriving (the feed sends a heartbeat line every 0.25 s, so quiet symbols
still count).

On every (re)subscription the feed names the first seq each symbol will carry;
the collector passes that on to the recovery worker as ``("resumed", id,
{symbol: seq}, time)``. A collector never backfills: it resumes from the live
stream, and the recovery worker fills the gap.

Example::

    pid = await Collector.start_link(group=0, groups=4, symbols=50, feed="127.0.0.1:7461")

Calls: ``"stats"`` -> dict; ``"hang"`` (a test hook) makes the collector stop
processing anything, as a deadlocked one would.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from examples.market_data._common import (
    RECOVERY,
    SENTINEL,
    STORE,
    close_on_exit,
    group_symbols,
    parse_addr,
    redis_call,
    redis_client,
    redis_errors,
)

import trellis

__all__ = ["Collector"]

_log = logging.getLogger("market_data.collector")


class Collector(trellis.Server):
    """Collects ``group_symbols(symbols, groups, group)`` from the feed at ``feed``."""

    async def init(
        self,
        *,
        group: int,
        groups: int,
        symbols: int,
        feed: str,
        redis_url: str | None = None,
        namespace: str = "trellis:md",
        heartbeat: float = 0.2,
        stall: float = 2.0,
        max_pending: int = 200_000,
    ) -> None:
        self.cid = f"collector-{group}"
        self.symbols = group_symbols(symbols, groups, group)
        host, port = parse_addr(feed, "Collector: feed")
        if not heartbeat > 0 or not stall > 0:
            raise ValueError(
                f"Collector: heartbeat and stall must be > 0, got {heartbeat}, {stall}"
            )
        self.heartbeat = heartbeat
        self.max_pending = max_pending
        self.key = f"{namespace}:ticks"
        self.redis = redis_client(redis_url) if redis_url else None
        self.redis_retry_at = 0.0
        self.pending: list[list[Any]] = []
        self.last_beat = 0.0
        self.connected = False
        self.counts = {
            "received": 0,
            "stored": 0,
            "pushed": 0,
            "dropped": 0,
            "resumes": 0,
            "disconnects": 0,
            "redis_failures": 0,
        }
        self.loop = asyncio.get_running_loop()
        self.reader = trellis.spawn(
            _read_feed, self.pid, host, port, self.symbols, stall, link=True
        )
        if self.redis is not None:
            close_on_exit(self.pid, self.redis.aclose)

    # -- callbacks -------------------------------------------------------------------
    async def handle_info(self, msg: Any) -> Any:
        kind = msg[0] if isinstance(msg, tuple) and msg else None
        if kind == "ticks":
            self.counts["received"] += len(msg[1])
            self.pending.extend(msg[1])
            await self._deliver()
        elif kind == "resumed":
            self.connected = True
            self.counts["resumes"] += 1
            trellis.cast(RECOVERY, ("resumed", self.cid, msg[1], msg[2], msg[3]))
        elif kind == "disconnected":
            self.connected = False
            self.counts["disconnects"] += 1
        self._beat()
        return None

    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "stats":
            return {
                "id": self.cid,
                "symbols": list(self.symbols),
                "connected": self.connected,
                "pending": len(self.pending),
                **self.counts,
            }
        if request == "hang":
            return trellis.Continue("hang", reply="hanging")
        raise ValueError(f"Collector: unknown call {request!r}")

    async def handle_continue(self, arg: Any) -> Any:
        if arg == "hang":
            await asyncio.Event().wait()  # stuck until killed
        return None

    async def terminate(self, reason: Any) -> None:
        trellis.exit(self.reader, trellis.SHUTDOWN)

    # -- internals -------------------------------------------------------------------
    def _beat(self) -> None:
        now = self.loop.time()
        if now - self.last_beat >= self.heartbeat:
            self.last_beat = now
            trellis.cast(SENTINEL, ("heartbeat", self.pid, self.cid, self.counts["received"]))

    async def _deliver(self) -> None:
        if not self.pending:
            return
        if self.redis is not None and self.loop.time() >= self.redis_retry_at:
            try:
                await redis_call(
                    self.redis.rpush(self.key, json.dumps(self.pending, separators=(",", ":")))
                )
            except redis_errors() as e:
                self.counts["redis_failures"] += 1
                self.redis_retry_at = self.loop.time() + 0.5
                _log.warning("%s: redis buffer unreachable (%s); writing to the store", self.cid, e)
            else:
                self.counts["pushed"] += len(self.pending)
                self.pending = []
                return
        try:
            await trellis.call(STORE, ("write", self.pending), timeout=1.0)
        except (trellis.NoProc, trellis.Exited, trellis.CallTimeout):
            over = len(self.pending) - self.max_pending
            if over > 0:  # the store is away for long: drop the oldest (the recovery refills)
                del self.pending[:over]
                self.counts["dropped"] += over
            return
        self.counts["stored"] += len(self.pending)
        self.pending = []


async def _read_feed(
    owner: trellis.Pid, host: str, port: int, symbols: list[str], stall: float
) -> None:
    """Hold the feed connection for ``owner``: subscribe, forward batches, reconnect."""
    loop = asyncio.get_running_loop()
    delay = 0.05
    subscribe = json.dumps({"op": "subscribe", "symbols": symbols}).encode() + b"\n"
    while True:
        writer = None
        batch: list[list[Any]] = []
        try:
            async with asyncio.timeout(stall):
                reader, writer = await asyncio.open_connection(host, port, limit=2**22)
                writer.write(subscribe)
                ack = json.loads(await reader.readline())
            if not isinstance(ack, dict) or ack.get("type") != "subscribed":
                raise ValueError(f"the feed refused the subscription: {ack!r}")
            owner.send(("resumed", ack["next"], ack.get("session"), loop.time()))
            delay = 0.05
            sent = loop.time()
            while True:
                async with asyncio.timeout(stall):
                    line = await reader.readline()
                if not line:
                    raise ConnectionError("the feed closed the connection")
                m = json.loads(line)
                hb = m.get("type") == "hb"
                if not hb:
                    batch.append([m["symbol"], m["seq"], m["ts"], m["price"], m["size"]])
                now = loop.time()
                if hb or len(batch) >= 500 or now - sent >= 0.02:
                    owner.send(("ticks", batch))
                    batch = []
                    sent = now
        except (OSError, TimeoutError, ValueError, KeyError) as e:
            if batch:
                owner.send(("ticks", batch))
            owner.send(("disconnected", repr(e)))
        finally:
            if writer is not None:
                writer.close()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)

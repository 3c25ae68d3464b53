"""Dispatcher workers: pull notifications from JetStream, send them once, then ack.

One worker per (priority, partition), id ``"<priority>-<n>"``, placed on one live node
by the ``DistributedSupervisor`` ``dispatchers`` and fenced like any cluster singleton.
Each pulls batches from the durable consumer ``d_<priority>_<n>`` (explicit acks) and,
for each batch:

1. claims every (notification, device token) in PostgreSQL
   (``INSERT ... ON CONFLICT DO NOTHING``): a pair already finished is skipped, a pair
   another live owner holds is left to it, a stale claim (its owner died) is taken over;
2. sends the claimed pairs in batches per provider, through that provider's rate limiter
   (high priority first) and circuit breaker, with the provider id ``"<key>:<token>"``;
3. records each outcome (sent / invalid_token) under the owner's claim, and only then
4. acks the messages whose pairs are all final. The rest are nak'd with a delay: a
   provider that is down, rate-limiting or behind an open breaker costs time, never a
   notification.

A crash anywhere before 4 means JetStream redelivers (``ACK_WAIT``); the pairs sent but
not yet recorded are sent again under the same provider id, which the provider answers
``duplicate`` and the device shows once. Nothing accepted is dropped: a message leaves
the stream only when acked, and it is acked only after its outcome is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import defaultdict
from typing import Any

from examples.notify import common
from examples.notify.metrics import ATTEMPTS, DELIVERIES, TIME_TO_SEND

__all__ = ["dispatch", "provider_clients"]

_log = logging.getLogger("notify.dispatcher")
#: messages per fetch; high priority takes small batches (latency), bulk large ones
BATCH = {"high": 64, "normal": 128, "bulk": 256}
SEND_CHUNK = 100

_clients: dict[str, Any] = {}


def provider_clients(settings: common.Settings) -> dict[str, Any]:
    """This node's client per provider, shared by its dispatchers: one breaker and one
    rate limiter per provider and node, so high priority is served first across them."""
    from examples.notify.breaker import CircuitBreaker, ProviderClient, RateLimiter

    rate = float(os.environ.get("NOTIFY_PROVIDER_RATE", "20000"))
    for kind, url in settings.providers.items():
        if kind not in _clients:
            _clients[kind] = ProviderClient(
                kind,
                url,
                breaker=CircuitBreaker(failure_threshold=5, open_for=1.0),
                limiter=RateLimiter(rate, burst=max(float(SEND_CHUNK), rate / 10)),
                cost="message",  # NOTIFY_PROVIDER_RATE is in messages/s
            )
    return _clients


async def dispatch(child_id: str) -> None:
    """The worker ``child_id`` (``"high-0"``...): runs until cancelled."""
    import nats
    import nats.errors
    import nats.js.api as api
    from examples.notify.store import Store

    from trellis.cluster import fencing_token

    priority, part = child_id.rsplit("-", 1)
    if priority not in common.PRIORITIES or not part.isdigit():
        raise ValueError(f"dispatcher id {child_id!r}: expected '<priority>-<n>'")
    settings = common.Settings.from_env()
    owner = f"{settings.node}/{child_id}/{fencing_token() or 0}"
    nc = await nats.connect(
        settings.nats,
        name=f"notify-{owner}",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=2,
    )
    store = None
    try:
        js = nc.jetstream(timeout=5.0)
        await common.ensure_stream(js, settings.partitions)
        sub = await js.pull_subscribe(
            common.subject(priority, int(part)),
            durable=f"d_{priority}_{part}",
            stream=common.STREAM,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=common.ACK_WAIT,
                max_deliver=-1,
                max_ack_pending=BATCH[priority] * 4,
            ),
        )
        store = await Store.open(settings.pg)
        worker = _Batch(store, provider_clients(settings), owner, priority)
        _log.info("dispatcher %s started as %s", child_id, owner)
        while True:
            try:
                msgs = await sub.fetch(BATCH[priority], timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            await worker.run(msgs)
    finally:
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()
        with contextlib.suppress(Exception):
            await nc.close()


def _db_errors() -> tuple[type[BaseException], ...]:
    import psycopg

    return (psycopg.Error, OSError)


class _Batch:
    def __init__(self, store: Any, clients: dict[str, Any], owner: str, priority: str) -> None:
        self.store = store
        self.clients = clients
        self.owner = owner
        self.priority = priority

    async def run(self, msgs: list[Any]) -> None:
        docs: list[tuple[Any, dict[str, Any]]] = []
        for m in msgs:
            try:
                docs.append((m, common.decode(m.data)))
            except (ValueError, TypeError) as e:  # cannot ever be sent: keep it out of the loop
                _log.error("dropping an undecodable message (seq %s): %s", _seq(m), e)
                await m.term()
        if not docs:
            return
        answered: set[int] = set()  # messages acked or nak'd
        try:
            await self._run(docs, answered)
        except BaseException:  # cancelled (a drain) or failed: hand the rest back now
            rest = [(m, d) for m, d in docs if id(m) not in answered]
            await asyncio.shield(self._nak_all(rest, 0.0))
            raise

    async def _run(self, docs: list[tuple[Any, dict[str, Any]]], answered: set[int]) -> None:
        items = [
            (doc["key"], tok, common.provider_of(tok)) for _, doc in docs for tok in doc["tokens"]
        ]
        try:
            claims = await self.store.claim(items, self.owner, common.STALE_AFTER)
        except _db_errors() as e:
            _log.warning("database unavailable, batch of %d put back: %s", len(docs), e)
            await self._nak_all(docs, 1.0, answered)
            await asyncio.sleep(0.5)
            return
        claimed = [it for it in items if claims.get((it[0], it[1])) == "claimed"]
        outcome: dict[tuple[str, str], str] = {}
        retry_after = 0.0
        all_recorded = True
        try:
            outcome, retry_after = await self._send(claimed, {d["key"]: d for _, d in docs})
            if outcome:
                rows = [(k, t, s) for (k, t), s in outcome.items()]
                # fewer rows than sent: a pair was taken over (this owner was too slow);
                # its message is nak'd, not acked, so it stays in the stream until the
                # owner that holds the pair now has recorded it
                all_recorded = await self.store.finish(rows, self.owner) == len(rows)
        except _db_errors() as e:
            _log.warning("database unavailable, batch of %d put back: %s", len(docs), e)
            await self._nak_all(docs, 1.0, answered)
            return
        finally:  # pairs claimed but not finished go back (also when cancelled mid-batch)
            unsent = [(k, t) for k, t, _ in claimed if (k, t) not in outcome]
            if unsent:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.release(unsent, self.owner))
        now = time.time()
        for m, doc in docs:
            mine = [outcome.get((doc["key"], t)) for t in doc["tokens"]]
            states = [
                "done" if claims.get((doc["key"], t)) == "done" else s
                for t, s in zip(doc["tokens"], mine, strict=True)
            ]
            answered.add(id(m))
            if all(s is not None for s in states) and (
                all_recorded or not any(s is not None for s in mine)
            ):
                for s in states:
                    if s in ("sent", "invalid"):
                        DELIVERIES.labels(
                            self.priority, "sent" if s == "sent" else "invalid_token"
                        ).inc()
                if "sent" in states:
                    TIME_TO_SEND.labels(self.priority).observe(max(0.0, now - doc["accepted_at"]))
                await m.ack()
            elif all(s is not None for s in states):  # sent, but not all recorded by me
                await m.nak(delay=0.5)
            elif any(claims.get((doc["key"], t)) == "busy" for t in doc["tokens"]):
                await m.nak(delay=common.STALE_AFTER / 2)
            else:
                await m.nak(delay=_backoff(m, retry_after))

    async def _send(
        self, claimed: list[tuple[str, str, str]], docs: dict[str, dict[str, Any]]
    ) -> tuple[dict[tuple[str, str], str], float]:
        from examples.notify.breaker import ProviderUnavailable

        by_provider: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for key, tok, prov in claimed:
            by_provider[prov].append((key, tok))
        outcome: dict[tuple[str, str], str] = {}
        retry_after = 0.0

        async def one(prov: str, pairs: list[tuple[str, str]]) -> None:
            nonlocal retry_after
            client = self.clients.get(prov)
            if client is None:
                _log.error("no provider %r configured; its deliveries wait", prov)
                retry_after = max(retry_after, 5.0)
                return
            for i in range(0, len(pairs), SEND_CHUNK):
                chunk = pairs[i : i + SEND_CHUNK]
                messages = [
                    {"id": f"{k}:{t}", "token": t, "payload": docs[k]["payload"]} for k, t in chunk
                ]
                try:
                    results = await client.send(messages, self.priority)
                except ProviderUnavailable as e:
                    ATTEMPTS.labels(self.priority, "unavailable").inc(len(pairs) - i)
                    retry_after = max(retry_after, e.retry_after)
                    return  # the rest of this provider's pairs wait for the redelivery
                ATTEMPTS.labels(self.priority, "ok").inc(len(chunk))
                by_id = {r["id"]: r["status"] for r in results}
                for k, t in chunk:
                    status = by_id.get(f"{k}:{t}")
                    if status in ("ok", "duplicate"):
                        outcome[(k, t)] = "sent"
                    elif status == "invalid_token":
                        outcome[(k, t)] = "invalid"

        await asyncio.gather(*(one(p, pairs) for p, pairs in by_provider.items()))
        return outcome, retry_after

    async def _nak_all(
        self,
        docs: list[tuple[Any, dict[str, Any]]],
        delay: float,
        answered: set[int] | None = None,
    ) -> None:
        for m, _ in docs:
            if answered is not None:
                answered.add(id(m))
            with contextlib.suppress(Exception):
                await m.nak(delay=delay or None)


def _seq(m: Any) -> Any:
    try:
        return m.metadata.sequence.stream
    except Exception:
        return "?"


def _backoff(m: Any, retry_after: float) -> float:
    try:
        n = int(m.metadata.num_delivered)
    except Exception:
        n = 1
    return max(retry_after, min(10.0, 0.2 * 2 ** min(n - 1, 6)))

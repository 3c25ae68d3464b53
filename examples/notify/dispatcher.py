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
from examples.notify.metrics import ATTEMPTS, DEAD_LETTERS, DELIVERIES, TIME_TO_SEND

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
        await _check_consumer(js, f"d_{priority}_{part}", BATCH[priority] * 4)
        store = await Store.open(settings.pg)
        worker = _Batch(store, provider_clients(settings), owner, priority, js)
        _log.info("dispatcher %s started as %s", child_id, owner)
        while True:
            fetch = asyncio.ensure_future(sub.fetch(BATCH[priority], timeout=1.0))
            try:
                msgs = await asyncio.shield(fetch)
            except TimeoutError:  # nats' own TimeoutError, and the built-in one it also raises
                continue
            except asyncio.CancelledError:
                # stopping while a pull is open: the server may be delivering to it; take
                # what comes and hand it straight back, or it waits out the ack wait
                with contextlib.suppress(Exception):
                    for m in await fetch:
                        await m.nak()
                raise
            batch = asyncio.ensure_future(worker.run(msgs))
            try:
                await asyncio.shield(batch)
            except asyncio.CancelledError:
                # a drain (or a lease handover): the batch in flight finishes (sent,
                # recorded, acked) before this dispatcher stops, so nothing is sent twice
                if not batch.done():
                    _log.info("dispatcher %s stopping: finishing its batch in flight", child_id)
                    with contextlib.suppress(Exception):
                        await batch
                raise
    finally:
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()
        with contextlib.suppress(Exception):
            await nc.close()


async def _check_consumer(js: Any, durable: str, max_ack_pending: int) -> None:
    """An existing durable consumer keeps the settings it was created with: say so when
    they differ from this code's (``nats consumer edit``, or delete it while idle)."""
    try:
        info = await js.consumer_info(common.STREAM, durable)
    except Exception:
        return
    have = {"ack_wait": info.config.ack_wait, "max_ack_pending": info.config.max_ack_pending}
    want = {"ack_wait": common.ACK_WAIT, "max_ack_pending": max_ack_pending}
    diff = {k: (have[k], v) for k, v in want.items() if have[k] is not None and have[k] != v}
    if diff:
        _log.warning(
            "consumer %s keeps its old settings %s (this code wants %s); edit or recreate it",
            durable,
            {k: a for k, (a, _) in diff.items()},
            {k: b for k, (_, b) in diff.items()},
        )


def _db_errors() -> tuple[type[BaseException], ...]:
    import psycopg

    return (psycopg.Error, OSError)


class _Batch:
    """One fetched batch at a time: claim, send and record per chunk, then ack or nak."""

    def __init__(
        self, store: Any, clients: dict[str, Any], owner: str, priority: str, js: Any = None
    ) -> None:
        self.store = store
        self.clients = clients
        self.owner = owner
        self.priority = priority
        self.js = js

    async def run(self, msgs: list[Any]) -> None:
        docs: list[tuple[Any, dict[str, Any]]] = []
        for m in msgs:
            try:
                docs.append((m, common.decode(m.data)))
            except (ValueError, TypeError) as e:  # cannot ever be sent: set it aside, kept
                await self._dead_letter(m, str(e))
        if not docs:
            return
        answered: set[int] = set()  # messages acked or nak'd
        try:
            await self._run(docs, answered)
        except BaseException:  # cancelled or failed: hand the rest back now
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
        send = _Send(self, {d["key"]: d for _, d in docs})
        try:
            await send.run(claimed)
        finally:  # claimed pairs no provider took go back (also when cancelled mid-batch)
            unsent = [(k, t) for k, t, _ in claimed if (k, t) not in send.taken]
            if unsent:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.release(unsent, self.owner))
        if send.db_error is not None:
            _log.warning("database unavailable, batch of %d put back: %s", len(docs), send.db_error)
            await self._nak_all(docs, 1.0, answered)
            return
        now = time.time()
        for m, doc in docs:
            pairs = [(doc["key"], t) for t in doc["tokens"]]
            states = ["done" if claims.get(p) == "done" else send.recorded.get(p) for p in pairs]
            answered.add(id(m))
            if all(s is not None for s in states):
                for s in states:
                    if s != "done":
                        DELIVERIES.labels(
                            self.priority, "sent" if s == "sent" else "invalid_token"
                        ).inc()
                if "sent" in states:
                    TIME_TO_SEND.labels(self.priority).observe(max(0.0, now - doc["accepted_at"]))
                await m.ack()
            elif any(p in send.unrecorded for p in pairs):
                # sent, but another owner holds the pair now (this one was too slow): the
                # message stays in the stream until that owner has recorded it
                await m.nak(delay=0.5)
            elif any(claims.get(p) == "busy" for p in pairs):
                await m.nak(delay=common.STALE_AFTER / 2)
            else:
                await m.nak(delay=_backoff(m, send.retry_after))

    async def _dead_letter(self, m: Any, reason: str) -> None:
        """An accepted message that can never be sent goes to the stream NOTIFY_DEAD (kept,
        counted, logged), never silently away; if that fails, it stays where it is."""
        _log.error("undecodable message (seq %s) set aside in %s: %s", _seq(m), common.DEAD, reason)
        try:
            await self.js.publish(
                f"{common.DEAD_SUBJECT}.{self.priority}",
                m.data,
                stream=common.DEAD,
                headers={"Notify-Error": reason[:500], "Notify-Seq": str(_seq(m))},
            )
        except Exception as e:
            _log.error("could not set message %s aside (%s); it is kept in the queue", _seq(m), e)
            with contextlib.suppress(Exception):
                await m.nak(delay=10.0)
            return
        DEAD_LETTERS.labels(self.priority).inc()
        await m.term()

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


class _Send:
    """Send claimed pairs per provider, in chunks; each chunk's outcome is committed as
    soon as its provider answered, so a crash re-sends at most the chunk in flight."""

    def __init__(self, batch: _Batch, docs: dict[str, dict[str, Any]]) -> None:
        self.batch = batch
        self.docs = docs
        self.taken: set[tuple[str, str]] = set()  # a provider answered for these
        self.recorded: dict[tuple[str, str], str] = {}  # committed by this owner
        self.unrecorded: set[tuple[str, str]] = set()  # sent, but the claim was taken over
        self.retry_after = 0.0
        self.db_error: BaseException | None = None

    async def run(self, claimed: list[tuple[str, str, str]]) -> None:
        by_provider: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for key, tok, prov in claimed:
            by_provider[prov].append((key, tok))
        async with asyncio.TaskGroup() as tg:
            for prov, pairs in by_provider.items():
                tg.create_task(self._provider(prov, pairs))

    async def _provider(self, prov: str, pairs: list[tuple[str, str]]) -> None:
        from examples.notify.breaker import ProviderError, ProviderUnavailable

        b = self.batch
        client = b.clients.get(prov)
        if client is None:  # Settings refuses this at start; a token of a new kind waits
            _log.error("no provider %r configured; its deliveries wait", prov)
            self.retry_after = max(self.retry_after, 10.0)
            return
        for i in range(0, len(pairs), SEND_CHUNK):
            if self.db_error is not None:
                return
            chunk = pairs[i : i + SEND_CHUNK]
            messages = [
                {"id": f"{k}:{t}", "token": t, "payload": self.docs[k]["payload"]} for k, t in chunk
            ]
            try:
                results = await client.send(messages, b.priority)
            except ProviderUnavailable as e:
                ATTEMPTS.labels(b.priority, "unavailable").inc(len(pairs) - i)
                self.retry_after = max(self.retry_after, e.retry_after)
                return  # the rest of this provider's pairs wait for the redelivery
            except ProviderError as e:  # an answer we do not understand: retried, with backoff
                _log.error("provider %s refused a batch: %s", prov, e)
                ATTEMPTS.labels(b.priority, "error").inc(len(pairs) - i)
                self.retry_after = max(self.retry_after, 5.0)
                return
            ATTEMPTS.labels(b.priority, "ok").inc(len(chunk))
            by_id = {r.get("id"): r.get("status") for r in results}
            rows = []
            for k, t in chunk:
                status = by_id.get(f"{k}:{t}")
                if status in ("ok", "duplicate", "invalid_token"):
                    self.taken.add((k, t))
                    rows.append((k, t, "invalid" if status == "invalid_token" else "sent"))
            if not rows:
                continue
            try:
                n = await b.store.finish(rows, b.owner)
            except _db_errors() as e:
                self.db_error = e
                return
            if n == len(rows):
                self.recorded.update(((k, t), st) for k, t, st in rows)
            else:  # which of them was taken over is unknown: the redelivery will tell
                self.unrecorded.update((k, t) for k, t, _ in rows)


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

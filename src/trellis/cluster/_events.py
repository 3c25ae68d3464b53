"""Every node's supervision events on one JetStream stream, ``trellis_<cluster>_events``
(subjects ``trellis.<cluster>.events.<node in hex>``), bounded by age and size, and
:func:`replay` from a time (the market-data gap backfill after a node was lost).

The telemetry handler only appends to a bounded buffer (an observer never waits on
I/O); a task publishes the buffer with core NATS publishes, which JetStream stores
without a round trip per event. When NATS is unreachable the buffer keeps the newest
``max_buffer`` events and counts what it dropped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from .._core import _telemetry

__all__ = ["EventShipper", "replay"]

_log = logging.getLogger("trellis.cluster")
#: events not shipped (one line per child's output would flood the stream)
SKIP = frozenset({"process.output"})
MAX_AGE = 7 * 86400.0
MAX_BYTES = 256 * 1024 * 1024


def stream_name(cluster: str) -> str:
    return f"trellis_{cluster}_events"


def subject(cluster: str, node: str | None = None) -> str:
    tail = node.encode().hex() if node is not None else "*"
    return f"trellis.{cluster}.events.{tail}"


class EventShipper:
    """Ships this node's telemetry events to the cluster's event stream."""

    def __init__(self, cluster: Any, max_buffer: int = 10_000) -> None:
        self.cluster = cluster
        self.buffer: deque[dict[str, Any]] = deque(maxlen=max_buffer)
        self.dropped = 0
        self.hid: object | None = None
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def attach(self) -> None:
        self.hid = _telemetry.attach(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") in SKIP:
            return
        if len(self.buffer) == self.buffer.maxlen:
            self.dropped += 1
        self.buffer.append({**event, "wall": time.time()})
        self.wake.set()

    async def ensure_stream(self, js: Any) -> None:
        from nats.js.api import StreamConfig

        s = self.cluster.settings
        config = StreamConfig(
            name=stream_name(s.name),
            subjects=[subject(s.name)],
            max_age=MAX_AGE,
            max_bytes=MAX_BYTES,
            num_replicas=s.replicas,
        )
        try:
            await js.stream_info(config.name)
        except Exception:
            with contextlib.suppress(Exception):
                await js.add_stream(config)
        self.task = asyncio.ensure_future(self._ship())

    async def _ship(self) -> None:
        from .._tree import jsonable

        s = self.cluster.settings
        subj = subject(s.name, s.node)
        while True:
            await self.wake.wait()
            self.wake.clear()
            nc = self.cluster.nc
            while self.buffer and nc is not None and self.cluster.connected:
                event = self.buffer.popleft()
                record = jsonable(event)
                record["node"] = s.node
                record["wall"] = event["wall"]
                try:
                    await nc.publish(subj, json.dumps(record, default=repr).encode())
                except Exception as e:
                    self.buffer.appendleft(event)
                    _log.debug("cluster events: publish failed: %r", e)
                    break
            if self.buffer:  # not connected: try again shortly
                await asyncio.sleep(0.5)
                self.wake.set()

    async def stop(self) -> None:
        if self.hid is not None:
            _telemetry.detach(self.hid)
            self.hid = None
        if self.task is not None:
            nc = self.cluster.nc
            if self.buffer and nc is not None and self.cluster.connected:
                self.wake.set()
                for _ in range(50):  # flush what is buffered (at most 0.5 s)
                    if not self.buffer:
                        break
                    await asyncio.sleep(0.01)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.flush(), 1.0)
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


async def replay(
    from_time: float | datetime,
    *,
    follow: bool = False,
    js: Any = None,
    cluster: str | None = None,
    idle: float = 2.0,
) -> AsyncIterator[dict[str, Any]]:
    """Every node's events from ``from_time`` (a unix time or an aware datetime) on,
    oldest first, as dicts (``event``, ``path``, ``node``, ``wall``, ...). Without
    ``follow`` it ends once it has caught up; with it, it keeps yielding new events.
    Uses the joined cluster's connection unless ``js`` and ``cluster`` are given.

    Example::

        async for e in trellis.cluster.replay(time.time() - 600):
            if e["event"] == "child.exited" and e["path"].startswith("md/collectors/"):
                ...
    """
    from nats.js.api import ConsumerConfig, DeliverPolicy

    if js is None or cluster is None:
        from ._node import current

        joined = current()
        if joined is None or joined.js is None:
            raise RuntimeError("replay needs a cluster connection (or js= and cluster=)")
        js, cluster = joined.js, joined.settings.name
    when = from_time if isinstance(from_time, datetime) else datetime.fromtimestamp(from_time, UTC)
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=when.astimezone(UTC)
    )
    sub = await js.subscribe(subject(cluster), ordered_consumer=True, config=config)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle)
            except Exception:  # nothing within `idle`: caught up (or no events at all)
                if follow:
                    continue
                return
            try:
                yield json.loads(msg.data)
            except ValueError:
                continue
            if not follow and msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

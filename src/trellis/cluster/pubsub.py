"""Cluster-wide publish/subscribe (Phoenix.PubSub's shape): ``subscribe(topic)`` from a
process, ``publish(topic, msg)`` from anywhere; every subscriber on every node gets
``msg`` in its mailbox (``handle_info`` for a server).

Local subscribers get the very object published (no copy, no NATS on the way); other
nodes get it over NATS (subject ``trellis.<cluster>.pubsub.<topic in hex>``), encoded as
msgpack with registered message types (``trellis.message_type``), never pickle. Outside
a cluster it is a node-local pubsub. Delivery across nodes is at most once (NATS core
publish): a node that is cut off misses what was published meanwhile.

Example::

    trellis.pubsub.subscribe("quotes:BTC")        # in a process
    trellis.pubsub.publish("quotes:BTC", ("tick", 42_000.5))
"""

from __future__ import annotations

import logging
from typing import Any

from .._core._process import Pid
from .._core._process import self as current_pid

__all__ = ["publish", "subscribe", "subscribers", "unsubscribe"]

_log = logging.getLogger("trellis.cluster")
_topics: dict[str, set[Pid]] = {}


def subscribe(topic: str, pid: Pid | None = None) -> None:
    """Deliver every message published on ``topic`` to the calling process (or ``pid``)
    until it ends or unsubscribes."""
    if not isinstance(topic, str) or not topic:
        raise TypeError(f"a topic is a non-empty str, got {topic!r}")
    who = pid if pid is not None else current_pid()
    _topics.setdefault(topic, set()).add(who)


def unsubscribe(topic: str, pid: Pid | None = None) -> None:
    """Stop delivering ``topic`` to the calling process (or ``pid``)."""
    who = pid if pid is not None else current_pid()
    subs = _topics.get(topic)
    if subs is not None:
        subs.discard(who)
        if not subs:
            del _topics[topic]


def subscribers(topic: str) -> list[Pid]:
    """The live local subscribers of ``topic``."""
    return [p for p in _topics.get(topic, ()) if not p._dead]


def publish(topic: str, msg: Any) -> int:
    """Send ``msg`` to every subscriber of ``topic`` on every node; returns how many
    local subscribers got it. Raises ``UnsupportedMessage`` if ``msg`` cannot cross to
    other nodes (checked only in a cluster)."""
    n = deliver_local(topic, msg)
    from ._node import current

    cluster = current()
    if cluster is not None and cluster.nc is not None:
        from ._wire import encode

        data = encode((cluster.settings.node, msg))
        subject = f"trellis.{cluster.settings.name}.pubsub.{topic.encode().hex()}"
        cluster._publish_soon(subject, data)
    return n


def deliver_local(topic: str, msg: Any) -> int:
    subs = _topics.get(topic)
    if not subs:
        return 0
    n = 0
    for pid in list(subs):
        if pid._dead:
            subs.discard(pid)
            continue
        pid.send(msg)
        n += 1
    if not subs:
        _topics.pop(topic, None)
    return n


async def on_message(cluster: Any, msg: Any) -> None:
    """A message from NATS: deliver it here unless this node published it."""
    from ._wire import decode

    prefix = f"trellis.{cluster.settings.name}.pubsub."
    try:
        topic = bytes.fromhex(msg.subject[len(prefix) :]).decode()
        origin, value = decode(msg.data)
    except Exception as e:
        _log.warning("refused a malformed pubsub message on %s: %s", msg.subject, e)
        return
    if origin != cluster.settings.node:
        deliver_local(topic, value)

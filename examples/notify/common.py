"""Settings, names and the message format shared by intake, dispatchers and scheduler.

A node reads its settings from the environment (the demo sets them; so can a systemd
unit): ``NOTIFY_NATS`` (JetStream URL), ``NOTIFY_PG`` (the write DSN; a multi-host one
finds the promoted primary after a failover), ``NOTIFY_PG_REPLICA`` (read replica,
optional), ``NOTIFY_APNS`` / ``NOTIFY_FCM`` (provider base URLs), ``NOTIFY_HTTP_PORT``
(intake; 0 picks a free port and writes it to ``NOTIFY_PORT_FILE`` when set),
``NOTIFY_PARTITIONS`` (dispatchers per priority, default 2) and ``NOTIFY_NODE``.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACK_WAIT",
    "PRIORITIES",
    "STALE_AFTER",
    "STREAM",
    "BadNotification",
    "Settings",
    "decode",
    "dispatcher_ids",
    "encode",
    "ensure_stream",
    "partition_of",
    "provider_of",
    "subject",
    "validate",
]

STREAM = "NOTIFY"
#: accepted messages that can never be sent (undecodable) are kept here, not dropped
DEAD = "NOTIFY_DEAD"
DEAD_SUBJECT = "notify_dead"
PRIORITIES = ("high", "normal", "bulk")
#: JetStream redelivers an unacknowledged message after this long (a dead dispatcher's
#: batch comes back this soon)
ACK_WAIT = 3.0
#: a claim older than this, by an owner that did not finish it, may be taken over
STALE_AFTER = 3.0
#: JetStream drops a second publish with the same Nats-Msg-Id within this window
DUPLICATE_WINDOW = 600.0
PROVIDERS = ("apns", "fcm")
MAX_TOKENS = 1000
MAX_PAYLOAD = 4096


class BadNotification(ValueError):
    """A notification that cannot be accepted; ``field`` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Settings:
    node: str
    nats: str
    pg: str
    pg_replica: str | None
    providers: dict[str, str]
    http_host: str
    http_port: int
    partitions: int
    port_file: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        missing = [k for k in ("NOTIFY_NATS", "NOTIFY_PG") if not e.get(k)]
        if missing:
            raise RuntimeError(
                f"notify: set {' and '.join(missing)} (see examples/notify/README.md)"
            )
        providers = {p: e[f"NOTIFY_{p.upper()}"] for p in PROVIDERS if e.get(f"NOTIFY_{p.upper()}")}
        if not providers:  # accepting notifications nothing can deliver helps no one
            raise RuntimeError("notify: set NOTIFY_APNS and/or NOTIFY_FCM (provider base URLs)")

        def number(name: str, default: str) -> int:
            raw = e.get(name, default)
            try:
                return int(raw)
            except ValueError:
                raise RuntimeError(f"notify: {name}={raw!r} is not a whole number") from None

        return cls(
            node=e.get("NOTIFY_NODE") or e.get("TRELLIS_NODE") or os.uname().nodename,
            nats=e["NOTIFY_NATS"],
            pg=e["NOTIFY_PG"],
            pg_replica=e.get("NOTIFY_PG_REPLICA") or None,
            providers=providers,
            http_host=e.get("NOTIFY_HTTP_HOST", "127.0.0.1"),
            http_port=number("NOTIFY_HTTP_PORT", "0"),
            partitions=max(1, number("NOTIFY_PARTITIONS", "2")),
            port_file=e.get("NOTIFY_PORT_FILE") or None,
        )


def partition_of(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode()) % partitions


def subject(priority: str, partition: int) -> str:
    return f"notify.{priority}.{partition}"


def dispatcher_ids(partitions: int) -> list[str]:
    return [f"{p}-{n}" for p in PRIORITIES for n in range(partitions)]


def provider_of(token: str) -> str:
    return token.split(":", 1)[0]


def validate(doc: Any) -> dict[str, Any]:
    """The notification ``doc`` checked and normalised, or :class:`BadNotification`."""
    if not isinstance(doc, dict):
        raise BadNotification("body", "a notification is a JSON object")
    unknown = sorted(set(doc) - {"key", "priority", "tokens", "campaign", "payload"})
    if unknown:
        raise BadNotification(unknown[0], "unknown key")
    key = doc.get("key")
    if not isinstance(key, str) or not 0 < len(key) <= 200 or not key.isprintable():
        raise BadNotification("key", "an idempotency key is a printable string of 1-200 chars")
    priority = doc.get("priority", "normal")
    if priority not in PRIORITIES:
        raise BadNotification("priority", f"one of {', '.join(PRIORITIES)}, not {priority!r}")
    tokens = doc.get("tokens")
    if not isinstance(tokens, list) or not 0 < len(tokens) <= MAX_TOKENS:
        raise BadNotification("tokens", f"a list of 1-{MAX_TOKENS} device tokens")
    for i, t in enumerate(tokens):
        if not isinstance(t, str) or provider_of(t) not in PROVIDERS or len(t) > 300:
            raise BadNotification(f"tokens[{i}]", "a token is 'apns:<id>' or 'fcm:<id>'")
    if len(set(tokens)) != len(tokens):
        raise BadNotification("tokens", "a token appears twice")
    campaign = doc.get("campaign")
    if campaign is not None and not isinstance(campaign, str):
        raise BadNotification("campaign", "a campaign id is a string")
    payload = doc.get("payload", {})
    if not isinstance(payload, dict) or len(json.dumps(payload)) > MAX_PAYLOAD:
        raise BadNotification("payload", f"a JSON object of at most {MAX_PAYLOAD} bytes")
    return {
        "key": key,
        "priority": priority,
        "tokens": tokens,
        "campaign": campaign,
        "payload": payload,
    }


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps({**doc, "accepted_at": doc.get("accepted_at", time.time())}).encode()


def decode(data: bytes) -> dict[str, Any]:
    doc = json.loads(data)
    accepted_at = doc.pop("accepted_at", None)
    out = validate(doc)
    out["accepted_at"] = float(accepted_at) if isinstance(accepted_at, int | float) else time.time()
    return out


async def ensure_stream(js: Any, partitions: int) -> None:
    """The work-queue stream ``NOTIFY`` (file storage), created or left as it is."""
    import nats.js.api as api
    import nats.js.errors as jse

    # full: new publishes are refused (the intake answers 503), never old messages dropped
    max_bytes = int(os.environ.get("NOTIFY_STREAM_MAX_BYTES", str(1 << 30)))
    configs = [
        api.StreamConfig(
            name=STREAM,
            subjects=["notify.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW,
            max_bytes=max_bytes,
            discard=api.DiscardPolicy.NEW,
        ),
        api.StreamConfig(
            name=DEAD,
            subjects=[f"{DEAD_SUBJECT}.>"],
            storage=api.StorageType.FILE,
            max_age=14 * 86400.0,
            discard=api.DiscardPolicy.NEW,
        ),
    ]
    for config in configs:
        try:
            await js.stream_info(config.name)
        except jse.NotFoundError:
            try:
                await js.add_stream(config)
            except jse.BadRequestError:  # another node created it first
                await js.stream_info(config.name)

"""Cluster singletons of the notification service: the campaign scheduler and the reaper.

The scheduler (``scope = "cluster"``) expands each open campaign into notifications, a
chunk at a time: it publishes the chunk (keys ``"<campaign>:<index>"``, so a chunk
published twice, by a stale owner or after a failover, is stored once by JetStream's
duplicate window) and then records its progress with its fencing token. PostgreSQL
refuses progress from a token older than the last one written: a scheduler that lost its
lease (paused, partitioned) cannot move a campaign once a newer owner has written, and
stops. (The owner of the newest token may move progress back, say from a stale read;
that re-publishes notifications JetStream or the delivery claims already hold.)

The reaper (``scope = "cluster"``) clears claims whose owner died mid-batch, so their
pairs can be claimed at once when JetStream redelivers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from typing import Any

from examples.notify import common

__all__ = ["CHUNK", "StaleFence", "campaign_tokens", "reaper", "scheduler", "sync_guard"]

_log = logging.getLogger("notify.scheduler")
CHUNK = 200


class StaleFence(RuntimeError):
    """A newer scheduler wrote progress: this one's lease is gone; it stops."""


def campaign_tokens(campaign: str, index: int) -> list[str]:
    """The device tokens of a campaign's ``index``-th notification (deterministic)."""
    tokens = [f"apns:{campaign}-{index}"]
    if index % 3 == 0:
        tokens.append(f"fcm:{campaign}-{index}")
    return tokens


async def scheduler(interval: float = 0.2) -> None:
    import nats
    from examples.notify.store import Store

    from trellis.cluster import fencing_token

    settings = common.Settings.from_env()
    nc = await nats.connect(
        settings.nats,
        name=f"notify-scheduler-{settings.node}",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
    )
    store = await Store.open(settings.pg)
    try:
        js = nc.jetstream(timeout=5.0)
        await common.ensure_stream(js, settings.partitions)
        while True:
            fence = fencing_token()  # raises LeaseLost once this node's lease lapsed
            if fence is None:
                raise RuntimeError("the scheduler must run with scope = 'cluster'")
            for c in await store.campaigns_open():
                await expand_chunk(js, store, c, fence, settings.partitions)
            await asyncio.sleep(interval)
    finally:
        with contextlib.suppress(Exception):
            await store.close()
        with contextlib.suppress(Exception):
            await nc.close()


async def expand_chunk(js: Any, store: Any, c: dict[str, Any], fence: int, partitions: int) -> int:
    """Publish the next chunk of campaign ``c`` and record it under ``fence``; the new
    next index. Raises :class:`StaleFence` if a newer owner wrote first."""
    start, total = int(c["next_index"]), int(c["total"])
    end = min(start + CHUNK, total)
    docs = [
        {
            "key": f"{c['id']}:{i}",
            "priority": c["priority"],
            "tokens": campaign_tokens(c["id"], i),
            "campaign": c["id"],
            "payload": c.get("payload") or {},
        }
        for i in range(start, end)
    ]
    await asyncio.gather(
        *(
            js.publish(
                common.subject(d["priority"], common.partition_of(d["key"], partitions)),
                common.encode(d),
                stream=common.STREAM,
                headers={"Nats-Msg-Id": d["key"]},
            )
            for d in docs
        )
    )
    if not await store.campaign_advance(c["id"], fence, end):
        raise StaleFence(f"campaign {c['id']}: a newer scheduler owns it (my token {fence})")
    return end


async def reaper(interval: float = 1.0, beat: float = 0.25) -> None:
    """Clear stale claims every ``interval``; write the primary's heartbeat (which the
    read replica's lag is measured on) every ``beat`` seconds."""
    from examples.notify.store import Store

    settings = common.Settings.from_env()
    store = await Store.open(settings.pg)
    loop = asyncio.get_running_loop()
    next_reap = loop.time()
    try:
        while True:
            if loop.time() >= next_reap:
                n = await store.reap(common.STALE_AFTER * 2)
                if n:
                    _log.info("reaper: cleared %d stale claims", n)
                next_reap = loop.time() + interval
            await store.beat()
            await asyncio.sleep(beat)
    finally:
        with contextlib.suppress(Exception):
            await store.close()


async def sync_guard(interval: float = 0.5, grace: float = 2.0) -> None:
    """Keep writes flowing when the synchronous standby is gone (``scope = "cluster"``).

    With ``synchronous_standby_names`` set, every commit on the primary waits for the
    standby; if the standby dies, every commit waits forever and delivery stops. When no
    standby it names has streamed for ``grace`` seconds, this clears the setting (the
    primary then commits alone, so losing the primary now may lose commits: the log says
    so); once that standby streams again, it sets it back. The names come from
    ``$NOTIFY_PG_SYNC_STANDBY``, else from the setting as first seen (kept in the table
    ``sync_guard``, so a guard that moved to another node can restore it). Its session
    commits locally (``synchronous_commit = local``) and changes the setting with ALTER
    SYSTEM, so it works while every other writer waits.
    """
    import psycopg

    settings = common.Settings.from_env()
    loop = asyncio.get_running_loop()
    missing_since: float | None = None
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(
                settings.pg, autocommit=True, connect_timeout=3
            ) as conn:
                await conn.execute("SET synchronous_commit = local")
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS sync_guard "
                    "(id int PRIMARY KEY CHECK (id = 1), names text NOT NULL)"
                )
                want = await _wanted(conn)
                while True:
                    configured, streaming = await _sync_state(conn, want)
                    if configured and not want:
                        want = configured
                        await conn.execute(
                            "INSERT INTO sync_guard VALUES (1, %s) "
                            "ON CONFLICT (id) DO UPDATE SET names = excluded.names",
                            (want,),
                        )
                    now = loop.time()
                    if configured and not streaming:
                        missing_since = now if missing_since is None else missing_since
                        if now - missing_since >= grace:
                            _log.error(
                                "sync guard: no synchronous standby (%s) for %.1f s: the "
                                "primary now commits alone (losing it now may lose commits)",
                                want,
                                now - missing_since,
                            )
                            await _set_sync(conn, "")
                            missing_since = None
                    elif not configured and want and streaming:
                        _log.warning("sync guard: standby %s streams again: synchronous", want)
                        await _set_sync(conn, want)
                    else:
                        missing_since = None
                    await asyncio.sleep(interval)
        except psycopg.OperationalError as e:  # the primary is away (failover): retry
            _log.warning("sync guard: %s", e)
            await asyncio.sleep(interval)


async def _wanted(conn: Any) -> str:
    if os.environ.get("NOTIFY_PG_SYNC_STANDBY"):
        return os.environ["NOTIFY_PG_SYNC_STANDBY"]
    cur = await conn.execute("SELECT names FROM sync_guard WHERE id = 1")
    row = await cur.fetchone()
    return str(row[0]) if row else ""


async def _sync_state(conn: Any, want: str) -> tuple[str, bool]:
    cur = await conn.execute("SHOW synchronous_standby_names")
    row = await cur.fetchone()
    configured = str(row[0]) if row else ""
    cur = await conn.execute(
        "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
    )
    names = {str(r[0]) for r in await cur.fetchall()}
    wanted = set(re.findall(r"[A-Za-z0-9_]+", want or configured)) - {"ANY", "FIRST"}
    return configured, bool(names & wanted)


async def _set_sync(conn: Any, names: str) -> None:
    from psycopg import sql

    await conn.execute(
        sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(names))
    )
    await conn.execute("SELECT pg_reload_conf()")

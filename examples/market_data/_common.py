"""What the pipeline's parts share: registered names, the SQLite schema, a tiny HTTP
client, Redis clients, and cleanup of resources held by a process that may be killed."""

from __future__ import annotations

import asyncio
import inspect
import json
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from examples.market_data.exchange import symbol_names

import trellis

T = TypeVar("T")

__all__ = [
    "COLLECTORS",
    "GATEKEEPER",
    "RECOVERY",
    "ROOT",
    "SENTINEL",
    "STORE",
    "HttpError",
    "close_on_exit",
    "connect",
    "group_symbols",
    "http_get",
    "http_json",
    "parse_addr",
    "redis_call",
    "redis_client",
    "redis_errors",
    "wait_closers",
]

#: Registered names of the pipeline's parts (one pipeline per Python process).
ROOT = "market_data"
STORE = "market_data.store"
GATEKEEPER = "market_data.gatekeeper"
COLLECTORS = "market_data.collectors"
RECOVERY = "market_data.recovery"
SENTINEL = "market_data.sentinel"

SCHEMA = """
CREATE TABLE IF NOT EXISTS ticks (
    symbol TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    price REAL NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (symbol, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS backfills (
    id INTEGER PRIMARY KEY,
    symbol TEXT NOT NULL,
    from_seq INTEGER NOT NULL,
    to_seq INTEGER NOT NULL,
    cause TEXT NOT NULL,          -- outage | reconnect | start | hole | manual
    collector TEXT,
    outage TEXT,                  -- which outage (collector@down time) it closes, if any
    opened_at REAL NOT NULL,      -- wall clock: the gap was found
    requested_at REAL,            -- wall clock: first history request sent
    done_at REAL,                 -- wall clock: ticks committed
    start_delay REAL,             -- seconds from the collector's UP to requested_at
    stored INTEGER,               -- rows the backfill added (0 when all were there)
    requests INTEGER NOT NULL DEFAULT 0,  -- history requests sent for it
    rejected INTEGER NOT NULL DEFAULT 0   -- of those, answered 429 (must stay 0)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def connect(path: str) -> sqlite3.Connection:
    """A connection to the tick database at ``path`` (WAL; tables created if missing).

    Example::

        conn = connect("market_data.db")
        print(conn.execute("SELECT COUNT(*) FROM ticks").fetchone())
    """
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    have = {row[1] for row in conn.execute("PRAGMA table_info(backfills)")}
    for column in ("requests", "rejected"):  # databases from before these columns
        if column not in have:
            conn.execute(f"ALTER TABLE backfills ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    return conn


def group_symbols(symbols: int, groups: int, group: int) -> list[str]:
    """The symbols collector ``group`` of ``groups`` owns: every ``groups``-th by volume
    rank, so each group gets busy and quiet symbols.

    Example::

        assert group_symbols(5, 2, 1) == ["S01", "S03"]
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if not 0 <= group < groups:
        raise ValueError(f"group must be in 0..{groups - 1}, got {group}")
    if groups > symbols:
        raise ValueError(f"groups ({groups}) must not exceed symbols ({symbols})")
    return symbol_names(symbols)[group::groups]


def parse_addr(addr: str, what: str = "address") -> tuple[str, int]:
    """``"127.0.0.1:7461"`` -> ``("127.0.0.1", 7461)``; a clear ValueError otherwise."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be 'host:port', got {addr!r}")
    return host, int(port)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


class HttpError(Exception):
    """A history API answer that is not 200 (``status``, ``body``, ``retry_after``)."""

    def __init__(self, status: int, body: bytes, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
        self.status = status
        self.body = body
        self.retry_after = retry_after


async def http_get(
    base: str, target: str, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """``GET base+target`` over one HTTP/1.1 connection: ``(status, headers, body)``.

    Raises ``OSError`` (or ``TimeoutError``) when the server cannot be reached.

    Example::

        status, headers, body = await http_get("http://127.0.0.1:7462", "/stats")
    """
    url = urlsplit(base)
    if url.scheme != "http" or url.hostname is None or url.port is None:
        raise ValueError(f"expected http://host:port, got {base!r}")
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: {url.netloc}\r\nConnection: close\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                k, sep, v = line.partition(":")
                if sep:
                    headers[k.strip().lower()] = v.strip()
            length = headers.get("content-length")
            body = await (reader.readexactly(int(length)) if length else reader.read())
            return status, headers, body
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
        raise OSError(f"bad HTTP answer from {base}{target}: {e}") from e
    finally:
        if writer is not None:
            writer.close()


async def http_json(base: str, target: str, timeout: float = 5.0) -> Any:
    """``GET`` and decode JSON; raises :class:`HttpError` for any status but 200."""
    status, headers, body = await http_get(base, target, timeout)
    if status != 200:
        retry = headers.get("retry-after")
        raise HttpError(status, body, float(retry) if retry else None)
    return json.loads(body)


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------


def redis_client(url: str, timeout: float = 0.25) -> Any:
    """An asyncio Redis client that fails fast (short timeouts, no retries), so a dead
    Redis is noticed within one request."""
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return redis.asyncio.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


async def redis_call(aw: Awaitable[T]) -> T:
    """``await aw`` (a redis-py call), then honour a cancellation it swallowed.

    redis-py's asyncio client can return normally from a command although the
    task was cancelled meanwhile; a killed Trellis process would then live on.
    """
    try:
        result = await aw
    except BaseException:
        _cancelled_check()
        raise
    _cancelled_check()
    return result


def _cancelled_check() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def redis_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "Redis is not answering"."""
    import redis.exceptions

    return (redis.exceptions.RedisError, OSError, TimeoutError)


# ---------------------------------------------------------------------------
# Cleanup of a killed process's resources
# ---------------------------------------------------------------------------

_closers: set[trellis.Pid] = set()


def close_on_exit(owner: trellis.Pid, *closers: Callable[[], object]) -> trellis.Pid:
    """Run ``closers`` (sync or async) once ``owner`` has ended, however it ended.

    A ``KILL`` skips ``terminate``; sockets and connections a killed server held
    would otherwise stay open until the garbage collector finds them.

    Example::

        close_on_exit(self.pid, self.conn.close)
    """

    async def watch() -> None:
        try:
            await owner.join()
        finally:
            for close in closers:
                try:
                    result = close()
                    if inspect.isawaitable(result):
                        await result
                except Exception:  # a half-broken resource: closing it is best effort
                    pass

    pid = trellis.spawn(watch)
    _closers.add(pid)
    return pid


async def wait_closers(timeout: float = 5.0) -> None:
    """Wait until every :func:`close_on_exit` watcher whose owner died has finished."""
    for pid in list(_closers):
        try:
            await pid.join(timeout)
        except TimeoutError:
            trellis.exit(pid, trellis.KILL)
        _closers.discard(pid)

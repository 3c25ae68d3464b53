"""``ChaosProxy``: a loopback TCP proxy in front of a dependency, which chaos can cut."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["ChaosProxy", "ProxyStatistics"]


@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    """Counters of a :class:`ChaosProxy`."""

    connections: int  # accepted since it started
    active: int  # open now
    cuts: int  # how many times cut() ran
    bytes_up: int  # client -> upstream
    bytes_down: int  # upstream -> client
    upstream_failures: int  # connections closed because the upstream could not be reached


class ChaosProxy:
    """Forwards TCP connections from a loopback port to ``upstream`` until cut.

    Point a dependency's client at the proxy instead of the dependency itself; an
    ``outage`` fault then calls :meth:`cut` (every open connection is reset and the
    port refuses new ones, as if the dependency were down) and :meth:`restore` when it
    is healed (the same port accepts again).

    Example::

        async with ChaosProxy(("127.0.0.1", 6379), port=16379) as proxy:
            client = redis.asyncio.Redis(port=proxy.port)
            await proxy.cut()        # client gets connection errors
            await proxy.restore()    # and reconnects
    """

    def __init__(
        self,
        upstream: tuple[str, int] | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str | None = None,
    ) -> None:
        if isinstance(upstream, str):
            h, sep, p = upstream.rpartition(":")
            if not sep or not p.isdigit():
                raise ValueError(f"upstream {upstream!r} is not HOST:PORT")
            upstream = (h.strip("[]") or "127.0.0.1", int(p))
        self.upstream = upstream
        self.host = host
        self.port = port
        self.name = name
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cut = False
        self._closed = False
        self._connections = 0
        self._cuts = 0
        self._failures = 0
        self.bytes_up = 0
        self.bytes_down = 0

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> ChaosProxy:
        """Start listening (on ``port``; 0 picks a free one, then ``port`` tells which)."""
        if self._server is None and not self._cut:
            await self._listen()
        return self

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Client(self), self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and close every connection."""
        self._closed = True
        await self._shut()

    async def __aenter__(self) -> ChaosProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` clients should connect to."""
        return (self.host, self.port)

    @property
    def is_cut(self) -> bool:
        """Whether the proxy is cut (refusing connections)."""
        return self._cut

    def statistics(self) -> ProxyStatistics:
        """Connection and byte counters."""
        return ProxyStatistics(
            self._connections,
            len(self._conns),
            self._cuts,
            self.bytes_up,
            self.bytes_down,
            self._failures,
        )

    # -- faults -------------------------------------------------------------------
    async def cut(self) -> None:
        """Reset every open connection and refuse new ones until :meth:`restore`."""
        self._cut = True
        self._cuts += 1
        await self._shut()

    async def restore(self) -> None:
        """Accept connections again, on the same port."""
        if not self._cut:
            return
        self._cut = False
        if not self._closed and self._server is None:
            await self._listen()

    async def _shut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._conns):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    def __repr__(self) -> str:
        state = "cut" if self._cut else "open"
        name = f" {self.name}" if self.name else ""
        up = f"{self.upstream[0]}:{self.upstream[1]}"
        return f"<ChaosProxy{name} {self.host}:{self.port} -> {up} {state}>"

    # -- connections --------------------------------------------------------------
    def _accepted(self, client: _Client) -> None:
        if self._cut or self._closed:
            client.abort()
            return
        self._connections += 1
        conn = _Conn(self, client)
        self._conns.add(conn)
        task = asyncio.get_running_loop().create_task(conn.connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Conn:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: ChaosProxy, client: _Client) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: _Upstream | None = None
        client.conn = self

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.proxy.upstream
        try:
            _t, up = await loop.create_connection(lambda: _Upstream(self), host, port)
        except OSError:
            self.proxy._failures += 1
            self.abort()
            return
        self.upstream = up
        if self.client.transport is None or self.client.transport.is_closing():
            up.abort()
            return
        self.client.peer = up
        up.peer = self.client
        self.client.flush_pending()
        if self.client.eof and not self.client.forward_eof():
            self.client.transport.close()
            return
        self.client.transport.resume_reading()

    def abort(self) -> None:
        self.client.abort()
        if self.upstream is not None:
            self.upstream.abort()
        self.proxy._conns.discard(self)


class _Side(asyncio.Protocol):
    """One end of a proxied connection: what it reads is written to its peer."""

    up = False

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.conn: _Conn | None = None
        self.eof = False
        self.pending: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if self.conn is not None:
            if self.up:
                self.conn.proxy.bytes_down += len(data)
            else:
                self.conn.proxy.bytes_up += len(data)
        if peer is None or peer.transport is None:
            self.pending.append(data)
            return
        peer.transport.write(data)

    def flush_pending(self) -> None:
        if self.pending and self.peer is not None and self.peer.transport is not None:
            for chunk in self.pending:
                self.peer.transport.write(chunk)
            self.pending = []

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is None and self.conn is not None and self.conn.upstream is None:
            # not connected upstream yet (uvloop reads before a pause in connection_made
            # takes effect): keep the connection; the EOF is passed on once it is
            return True
        return self.forward_eof()

    def forward_eof(self) -> bool:
        """Pass our EOF on to the peer; whether our own transport stays open."""
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return False
        if peer.eof:
            peer.transport.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True  # keep our writing half open for the peer's answer
        peer.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.close()
        if self.conn is not None:
            self.conn.proxy._conns.discard(self.conn)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.peer.transport.resume_reading()

    def abort(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            sock = t.get_extra_info("socket")
            if sock is not None:  # close with a reset, as a dropped dependency does
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            t.abort()


class _Client(_Side):
    def __init__(self, proxy: ChaosProxy) -> None:
        super().__init__()
        self.proxy = proxy

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # until the upstream is connected
        self.proxy._accepted(self)


class _Upstream(_Side):
    up = True

    def __init__(self, conn: _Conn) -> None:
        super().__init__()
        self.conn = conn

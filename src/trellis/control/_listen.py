"""The control API's listeners: a Unix socket whose callers are known by their peer
credentials, and a TCP port. HTTP is uvicorn's h11 protocol, served from asyncio
servers on sockets bound here, in the tree's own event loop.

Why not ``uvicorn.Server.serve()``: it installs SIGINT/SIGTERM handlers (Trellis owns
signals), polls every 0.1 s, and cannot tell the application who is on the other end
of a Unix socket. Here each connection's protocol reads ``SO_PEERCRED`` once when the
connection is made and hands the application a :class:`Peer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from ._errors import ControlError
from ._paths import MAX_SOCKET_PATH, make_socket_dir, socket_dir

__all__ = [
    "CONNECTION",
    "ControlError",
    "HttpServer",
    "Peer",
    "bind_tcp",
    "bind_unix",
    "parse_tcp",
    "stream_limits",
]

_log = logging.getLogger("trellis.control")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of one connection.

    ``kind`` is ``"unix"`` or ``"tcp"``; ``uid``/``pid`` come from ``SO_PEERCRED`` on a
    Unix socket (None when the OS does not tell); ``source`` is ``unix:<socket path>`` or
    ``tcp:<ip>:<port>``.
    """

    kind: str
    source: str
    uid: int | None = None
    pid: int | None = None


# ---------------------------------------------------------------------------
# Binding
# ---------------------------------------------------------------------------


def parse_tcp(value: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:8080"`` for IPv6) as ``(host, port)``.

    Example::

        assert parse_tcp("127.0.0.1:8470") == ("127.0.0.1", 8470)
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ControlError(f"tcp: expected HOST:PORT, not {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ControlError(f"tcp: the port in {value!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ControlError(f"tcp: port {port} in {value!r} is out of range (0-65535)")
    return host, port


def _is_live(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # cannot tell (e.g. permission denied): treat as someone else's
    finally:
        probe.close()
    return True


def bind_unix(
    path: Path, backlog: int = 128, *, mode: int = 0o600
) -> tuple[socket.socket, os.stat_result]:
    """A listening Unix socket at ``path`` with ``mode`` (0600: only our uid and root can
    connect); returns it and its file's stat (to remove only our own file later).

    The parent directory is created with mode 0700 if missing, and must be safe (see
    :func:`check_socket_dir`: the default directory ours and 0700, another one ours or
    root's and not open to writing by others). A stale socket file (nobody listening)
    is replaced; a live one, or a file that is not a socket, is an error.
    """
    raw = os.fsencode(path)
    if len(raw) > MAX_SOCKET_PATH:
        raise ControlError(
            f"socket: {path} is {len(raw)} bytes long; Unix socket paths are limited to "
            f"{MAX_SOCKET_PATH} bytes (choose a shorter path)"
        )
    make_socket_dir(path.parent, private=path.parent == socket_dir())
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(
                f"socket: {path} exists and is not a socket; remove it or pick another path"
            )
        if st.st_uid != os.getuid():
            raise ControlError(
                f"socket: {path} is owned by uid {st.st_uid}, not by uid {os.getuid()} who "
                "runs this tree: another user made it (anyone can, in a shared directory "
                f"such as /tmp); remove it (as uid {st.st_uid} or root) or pick another path"
            )
        if _is_live(path):
            raise ControlError(
                f"socket: another process is already listening on {path} "
                "(is the tree already running?)"
            )
        _log.info("removing stale control socket %s", path)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ControlError(
                f"socket: cannot remove the stale socket {path}: {e.strerror or e}"
            ) from e
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Nobody can connect before listen(): tighten the mode in between.
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
        return sock, path.lstat()
    except OSError as e:
        sock.close()
        raise ControlError(f"socket: cannot listen on {path}: {e.strerror or e}") from e


def bind_tcp(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on the first address ``host`` resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ControlError(f"tcp: cannot resolve {host!r}: {e}") from e
    family, kind, proto, _name, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ControlError(f"tcp: cannot listen on {host}:{port}: {e.strerror or e}") from e
    if not ipaddress.ip_address(str(addr[0]).split("%")[0]).is_loopback:
        _log.warning(
            "control API listening on non-loopback %s:%s: bearer tokens cross the network "
            "in clear text unless a TLS proxy sits in front",
            addr[0],
            sock.getsockname()[1],
        )
    return sock


def _unix_peer(transport: asyncio.BaseTransport, source: str) -> Peer:
    sock = transport.get_extra_info("socket")
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if sock is None or so_peercred is None:
        return Peer("unix", source)
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
    except OSError:
        return Peer("unix", source)
    pid, uid, _gid = struct.unpack("3i", raw)
    return Peer("unix", source, uid=uid, pid=pid)


def _tcp_peer(transport: asyncio.BaseTransport) -> Peer:
    addr = transport.get_extra_info("peername")
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        shown = f"[{host}]" if ":" in host else host
        return Peer("tcp", f"tcp:{shown}:{addr[1]}")
    return Peer("tcp", "tcp:unknown")


# ---------------------------------------------------------------------------
# Connection budget
# ---------------------------------------------------------------------------

#: Scope key the application sets once a request is authorised (to the caller's role);
#: a connection whose last request carried it is "authenticated" (evicted last).
AUTHENTICATED = "trellis.role"

#: Scope key holding the connection (for :meth:`_Protocol.claim_stream`).
CONNECTION = "trellis.connection"


def default_max_connections() -> int:
    """Connections each listener (the Unix socket, TCP) keeps open at most, from the
    process's descriptor limit: an eighth of ``RLIMIT_NOFILE``'s soft limit, between 8
    and 512. Both listeners together use at most a quarter of the descriptors; the rest
    stays for children's pipes, log files and the journal.

    Example::

        # ulimit -n 1024  ->  128 on the socket + 128 on TCP, 768 left for the tree
        assert 8 <= default_max_connections() <= 512
    """
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 16
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(8, min(512, soft // 8))


def stream_limits(max_connections: int) -> tuple[int, int]:
    """How many streams (``/v1/events``, ``/v1/logs?follow=true``) one listener with a
    budget of ``max_connections`` keeps open at most: ``(in all, per client)``.

    In all: the budget less a quarter (at least one connection) kept for requests, so
    streams never fill the listener. Per client (a token, or a uid on the Unix socket)
    without the operator role: a quarter of the budget (at least 2). Operators are not
    held to the per-client limit, and an operator's stream past the overall limit
    closes the oldest stream of a client without the operator role.

    Example::

        assert stream_limits(128) == (96, 32)
        assert stream_limits(16) == (12, 4)
    """
    reserve = max(1, max_connections // 4)
    total = max(1, max_connections - reserve)
    return total, min(total, max(2, max_connections // 4))


class _Listener:
    """The open connections of one listening socket, oldest first, and its budget."""

    def __init__(self, kind: str, source: str, cap: int) -> None:
        self.kind = kind
        self.source = source
        self.cap = cap
        self.conns: dict[_Protocol, None] = {}  # insertion order = connection order
        self.streams: dict[_Protocol, None] = {}  # connections holding a stream, oldest first
        self.max_streams, self.max_streams_per_client = stream_limits(cap)
        self.closed = False  # the server is closing: connections still arriving are dropped
        self._warned = 0.0

    def admit(self, new: _Protocol, operator: bool) -> bool:
        """Make room for ``new``: when the budget is spent, close the idle connection
        that has waited longest, preferring one that never made an authorised request;
        if none is idle and ``new`` may be an operator's (a Unix-socket peer with the
        operator role, or any TCP connection: its token is not known yet), close the
        oldest stream held by a client without the operator role. False (``new`` is
        closed) when every connection is busy with a request."""
        if len(self.conns) >= self.cap:
            victim = self._victim()
            if victim is not None:
                self._warn(f"{self.cap} connections open (the limit): closed the longest idle one")
            elif operator:
                victim = self._stream_victim()
                if victim is not None:
                    self._warn(
                        f"{self.cap} connections open (the limit): closed the oldest stream of "
                        f"{victim.stream_client} to let a new connection in"
                    )
            if victim is None:
                self._warn(f"all {self.cap} connections are busy: refused a new one")
                return False
            victim.evict()
        self.conns[new] = None
        return True

    def claim_stream(self, conn: _Protocol, client: str, operator: bool) -> tuple[int, str] | None:
        """Let ``conn`` hold a stream for ``client``: None, or ``(status, message)`` to
        refuse it (429: the client holds its limit; 503: the listener holds its limit)."""
        if conn in self.streams:
            return None
        if not operator:
            held = sum(1 for c in self.streams if c.stream_client == client)
            if held >= self.max_streams_per_client:
                self._warn(f"{client} holds {held} streams (the limit per client): refused one")
                return 429, (
                    f"{client} already holds {held} streams on this listener, the limit per "
                    "client without the operator role: close one first"
                )
        if len(self.streams) >= self.max_streams:
            victim = self._stream_victim() if operator else None
            if victim is None:
                self._warn(f"{len(self.streams)} streams open (the limit): refused one")
                return 503, (
                    f"{len(self.streams)} streams are open on this listener (the limit): "
                    "try again later"
                )
            self._warn(
                f"{len(self.streams)} streams open (the limit): closed the oldest stream of "
                f"{victim.stream_client} for an operator's"
            )
            victim.evict()
        conn.stream_client = client
        conn.stream_operator = operator
        self.streams[conn] = None
        return None

    def _stream_victim(self) -> _Protocol | None:
        for conn in self.streams:  # oldest first
            if not conn.stream_operator:
                return conn
        return None

    def _victim(self) -> _Protocol | None:
        best: _Protocol | None = None
        best_key: tuple[bool, float] | None = None
        for conn in self.conns:
            if conn.idle_since is None:
                continue
            key = (conn.authenticated, conn.idle_since)
            if best_key is None or key < best_key:
                best, best_key = conn, key
        return best

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned >= 10.0:  # a flood must not flood the log too
            self._warned = now
            _log.warning("control API on %s: %s", self.source, message)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


async def _never_called(scope: Scope, receive: Receive, send: Send) -> None:
    """uvicorn's Config wants an app; every connection gets its own (see _Protocol)."""
    raise RuntimeError("the control API's placeholder app was called")


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol, with the application chosen per connection from its peer,
    a place in its listener's budget, and an idle timeout: a connection must complete a
    request's headers within ``idle_timeout`` of connecting or of its last response
    (data trickling in does not reset the clock), else it is closed."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_for: Callable[[Peer], ASGIApp],
        listener: _Listener,
        idle_timeout: float,
        loop: asyncio.AbstractEventLoop,
        operator: Callable[[Peer], bool],
    ) -> None:
        super().__init__(config, server_state, {}, loop)
        self.access_log = False  # operator actions are journaled; requests are not logged
        self._app_for = app_for
        self._listener = listener
        self._idle_timeout = idle_timeout
        self._operator = operator
        self._idle_timer: asyncio.TimerHandle | None = None
        self.idle_since: float | None = None  # monotonic; None while a request runs
        self.stream_client: str | None = None  # who holds the stream on this connection
        self.stream_operator = False

    @property
    def authenticated(self) -> bool:
        """Whether this connection's last request was authorised."""
        scope = self.scope
        return scope is not None and AUTHENTICATED in scope

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        listener = self._listener
        unix = listener.kind == "unix"
        peer = _unix_peer(transport, listener.source) if unix else _tcp_peer(transport)
        # A TCP caller's token comes with its request: any new connection may be an
        # operator's. On the Unix socket the peer's uid tells now.
        operator = not unix or self._operator(peer)
        if listener.closed or not listener.admit(self, operator):
            transport.abort()
            return
        inner = self._app_for(peer)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            scope[CONNECTION] = self
            await inner(scope, receive, send)

        self.app = app
        self._sync()

    def claim_stream(self, client: str, operator: bool) -> tuple[int, str] | None:
        """Mark this connection's request as a stream held by ``client`` (a token's or
        a uid's name; ``operator``: whether it has the operator role) until its response
        completes: None, or ``(status, message)`` when the stream limits refuse it (see
        :func:`stream_limits`)."""
        return self._listener.claim_stream(self, client, operator)

    def _release_stream(self) -> None:
        if self.stream_client is not None:
            self._listener.streams.pop(self, None)
            self.stream_client = None
            self.stream_operator = False

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.conns.pop(self, None)
        self._release_stream()
        self._disarm()
        self.idle_since = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._sync()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync()

    def evict(self) -> None:
        """Close this connection (idle, or holding a stream) to make room for a new one."""
        self._listener.conns.pop(self, None)
        self._release_stream()
        self._disarm()
        self.idle_since = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    # -- idle timeout ---------------------------------------------------------------
    def _sync(self) -> None:
        """Busy while a request runs (its headers complete, its response not); idle
        otherwise, with the timer armed from the moment it became idle."""
        if self.transport is None or self.transport.is_closing():
            self._disarm()
            return
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy:
            self._disarm()
            self.idle_since = None
            return
        self._release_stream()  # the stream's response is complete
        if self.idle_since is None:
            self.idle_since = time.monotonic()
            self._idle_timer = self.loop.call_later(self._idle_timeout, self._on_idle)

    def _disarm(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _on_idle(self) -> None:
        self._idle_timer = None
        if self.idle_since is None:
            return
        self._listener.conns.pop(self, None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class HttpServer:
    """Serves ``app_for(peer)`` over HTTP/1.1 on listening sockets in the running loop.

    Args:
        max_connections: connections each listener keeps open at most (default
            :func:`default_max_connections`, from ``RLIMIT_NOFILE``); when full, a new
            connection evicts the longest idle one, so an operator is never locked out
            by idle connections.
        idle_timeout: seconds a connection may take to send a request's headers, after
            connecting or after its last response; then it is closed.
        operator: whether a Unix-socket peer has the operator role (it may then close
            a stream of a client without it when the listener is full).
    """

    def __init__(
        self,
        app_for: Callable[[Peer], ASGIApp],
        *,
        max_connections: int | None = None,
        idle_timeout: float = 10.0,
        operator: Callable[[Peer], bool] | None = None,
    ) -> None:
        if max_connections is not None and max_connections < 1:
            raise ControlError(f"max_connections must be at least 1, not {max_connections}")
        if not idle_timeout > 0:
            raise ControlError(f"idle_timeout must be more than 0 seconds, not {idle_timeout}")
        self._app_for = app_for
        self._operator: Callable[[Peer], bool] = operator or (lambda peer: False)
        self.max_connections = (
            max_connections if max_connections is not None else default_max_connections()
        )
        self.idle_timeout = idle_timeout
        self.config = uvicorn.Config(
            _never_called,
            interface="asgi3",
            lifespan="off",
            log_config=None,  # never reconfigure the process's logging
            ws="none",
            proxy_headers=False,  # the peer address is the socket's, never a header's
            server_header=False,
            date_header=False,
            limit_concurrency=None,  # each listener has its own budget (see _Listener)
            timeout_keep_alive=max(1, int(idle_timeout)),
        )
        self.config.load()
        self.state = ServerState()
        self._servers: list[asyncio.Server] = []
        self._socks: list[socket.socket] = []
        self.listeners: list[_Listener] = []

    async def serve(self, sock: socket.socket, kind: str, source: str) -> None:
        """Start accepting connections on ``sock`` (``kind``: ``"unix"`` or ``"tcp"``),
        with its own budget of ``max_connections``."""
        loop = asyncio.get_running_loop()
        listener = _Listener(kind, source, self.max_connections)
        self.listeners.append(listener)

        def factory() -> asyncio.Protocol:
            return _Protocol(
                self.config,
                self.state,
                self._app_for,
                listener,
                self.idle_timeout,
                loop,
                self._operator,
            )

        # asyncio accepts up to `backlog` connections per wake-up before any of them is
        # admitted (or evicted): keep that burst small, so a flood never holds more than
        # about 1.5 budgets of descriptors on this listener.
        backlog = max(8, min(128, self.max_connections // 2))
        server = await loop.create_server(factory, sock=sock, backlog=backlog)
        self._servers.append(server)
        self._socks.append(sock)

    async def close(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish for up to ``grace`` seconds, then
        cancel what remains and close every connection."""
        # Stop accepting first, and let connections accepted just before arrive (a few
        # loop turns: asyncio's accept task, then the transport's connection_made) and
        # be dropped while their server is still open: on Python 3.11 a transport made
        # for a closed server is left half-built and never closed.
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            listener.closed = True
        for sock in self._socks:
            with contextlib.suppress(Exception):
                loop.remove_reader(sock.fileno())
        for _ in range(4):
            await asyncio.sleep(0)
        for server in self._servers:
            server.close()
        for conn in list(self.state.connections):
            try:
                conn.shutdown()
            except Exception:  # a connection in an error state: close it below
                pass
        tasks = set(self.state.tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for conn in list(self.state.connections):
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                transport.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._socks.clear()
        await asyncio.sleep(0)  # let the transports' close callbacks run

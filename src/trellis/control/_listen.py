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
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from ._errors import ControlError
from ._paths import MAX_SOCKET_PATH, socket_dir

__all__ = ["ControlError", "HttpServer", "Peer", "bind_tcp", "bind_unix", "parse_tcp"]

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


def _check_private_dir(directory: Path) -> None:
    """Refuse the default socket directory (``/tmp/trellis-<uid>`` is guessable: anyone
    could have made it first) unless it is ours and closed to others."""
    st = directory.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ControlError(
            f"socket: {directory} must be owned by uid {os.getuid()} with mode 0700 "
            f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); fix or remove it"
        )


def bind_unix(path: Path, backlog: int = 128) -> tuple[socket.socket, os.stat_result]:
    """A listening Unix socket at ``path`` with mode 0600; returns it and its file's stat
    (to remove only our own file later).

    The parent directory is created with mode 0700 if missing. A stale socket file
    (nobody listening) is replaced; a live one, or a file that is not a socket, is an
    error.
    """
    raw = os.fsencode(path)
    if len(raw) > MAX_SOCKET_PATH:
        raise ControlError(
            f"socket: {path} is {len(raw)} bytes long; Unix socket paths are limited to "
            f"{MAX_SOCKET_PATH} bytes (choose a shorter path)"
        )
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(parent, 0o700)
    elif parent == socket_dir():
        _check_private_dir(parent)
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(
                f"socket: {path} exists and is not a socket; remove it or pick another path"
            )
        if _is_live(path):
            raise ControlError(
                f"socket: another process is already listening on {path} "
                "(is the tree already running?)"
            )
        _log.info("removing stale control socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Nobody can connect before listen(): tighten the mode in between.
        os.chmod(path, 0o600)
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
# HTTP
# ---------------------------------------------------------------------------


async def _never_called(scope: Scope, receive: Receive, send: Send) -> None:
    """uvicorn's Config wants an app; every connection gets its own (see _Protocol)."""
    raise RuntimeError("the control API's placeholder app was called")


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol, with the application chosen per connection from its peer."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_for: Callable[[Peer], ASGIApp],
        kind: str,
        source: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(config, server_state, {}, loop)
        self.access_log = False  # operator actions are journaled; requests are not logged
        self._app_for = app_for
        self._kind = kind
        self._source = source

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        unix = self._kind == "unix"
        peer = _unix_peer(transport, self._source) if unix else _tcp_peer(transport)
        self.app = self._app_for(peer)


class HttpServer:
    """Serves ``app_for(peer)`` over HTTP/1.1 on listening sockets in the running loop."""

    def __init__(self, app_for: Callable[[Peer], ASGIApp], *, max_connections: int = 256) -> None:
        self._app_for = app_for
        self.config = uvicorn.Config(
            _never_called,
            interface="asgi3",
            lifespan="off",
            log_config=None,  # never reconfigure the process's logging
            ws="none",
            proxy_headers=False,  # the peer address is the socket's, never a header's
            server_header=False,
            date_header=False,
            limit_concurrency=max_connections,
            timeout_keep_alive=5,
        )
        self.config.load()
        self.state = ServerState()
        self._servers: list[asyncio.Server] = []

    async def serve(self, sock: socket.socket, kind: str, source: str) -> None:
        """Start accepting connections on ``sock`` (``kind``: ``"unix"`` or ``"tcp"``)."""
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:
            return _Protocol(self.config, self.state, self._app_for, kind, source, loop)

        server = await loop.create_server(factory, sock=sock, backlog=128)
        self._servers.append(server)

    async def close(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish for up to ``grace`` seconds, then
        cancel what remains and close every connection."""
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
        await asyncio.sleep(0)  # let the transports' close callbacks run

"""The control API server: an :class:`~trellis._run.Extension` that serves the running
tree over HTTP (Unix socket by default, TCP with a bearer token) in the tree's loop.

Adding a route: who may call it is decided in one place, :data:`READ_ROUTES`. A route
whose path template is listed there may be used by every authorised caller, including a
token with the ``read`` role; every other route needs the ``operator`` role (Unix-socket
peers allowed in, and tokens without a role or with ``:operator``). So a new read-only
endpoint (``GET /v1/logs/...``) is added to READ_ROUTES; an action (``POST .../signal``,
``POST /v1/reload``) is not, and read tokens get 403 naming their role. Refusals (401,
403) are logged and emitted as ``operator.denied`` events (rate-limited).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import heapq
import hmac
import inspect
import itertools
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route

from .. import telemetry
from .._core._exceptions import NotFound, TrellisError
from .._core._process import Pid
from .._supervisor import DynamicSupervisorPid, _AdminPid
from .._tree import Node, Tracker, jsonable, reason_text, walk
from ._body import error as _error
from ._body import read_json_object
from ._dashboard import PUBLIC_PATHS, dashboard_routes
from ._listen import (
    CONNECTION,
    ASGIApp,
    ControlError,
    HttpServer,
    Peer,
    Receive,
    Scope,
    Send,
    bind_tcp,
    bind_unix,
    parse_tcp,
)
from ._openapi import openapi
from ._paths import default_socket_path, socket_dir

__all__ = ["ControlServer", "MetricsSource"]

_log = logging.getLogger("trellis.control")

API_VERSION = "1"
#: The roles a caller can have: ``read`` (look) and ``operator`` (look and act).
ROLES = ("read", "operator")
#: The routes (path templates) a ``read`` caller may use; every other route needs the
#: ``operator`` role. See the note at the top of this module.
READ_ROUTES = frozenset(
    {
        "/v1/tree",
        "/v1/events",
        "/v1/logs/{path:path}",
        "/v1/slo",
        "/v1/plugins",
        "/v1/cluster",
        "/metrics",
        "/v1/stats",
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/",
    }
)
#: At most this many ``operator.denied`` events (and log lines) per minute: a flood of
#: bad requests cannot fill the journal; the next one carries ``suppressed=N``.
DENIED_PER_MINUTE = 10
_BODY_FIELDS = frozenset({"reason"})
_CALL_TIMEOUT = 5.0  # for reading the tree (not for actions, which may take a shutdown)


class MetricsSource(Protocol):
    """What ``/metrics`` needs: ``await render() -> (body, content_type)``. A ``render``
    that takes an ``accept`` argument (like :class:`trellis.metrics.Metrics`) gets the
    scraper's ``Accept`` header, to choose between Prometheus text and OpenMetrics."""

    async def render(self) -> tuple[bytes, str]: ...


class _Refused(Exception):
    """An action the tree cannot do (answered 409, or ``status``)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Entry:
    """One node of a tree snapshot, with what the actions need to reach it."""

    path: str
    node: Node
    parent: _AdminPid | None
    dynamic: bool  # the parent is a dynamic (or simple_one_for_one) supervisor
    restart: str | None
    stats_key: str
    children: list[_Entry] = field(default_factory=list)

    def flat(self) -> list[_Entry]:
        out = [self]
        for c in self.children:
            out.extend(c.flat())
        return out


def _json_id(x: Any) -> Any:
    return x if x is None or isinstance(x, str | int | float | bool) else repr(x)


def _utc(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")


def _root_name(root: Pid) -> str:
    return str(root.name) if root.name is not None else "root"


def _view_json(n: dict[str, Any], root_since: float | None) -> dict[str, Any]:
    """A tracker snapshot node as ``/v1/tree`` shows it."""
    state = n["state"]
    root = n["supervisor"] is None
    since = root_since if root and root_since is not None else n["since"]
    pid = n["pid"]
    crashed = n["last_class"] not in (None, "normal", "shutdown")
    out = {
        "path": n["path"],
        "id": _json_id(n["id"]),
        "type": n["type"],
        "state": state,
        "since": _utc(since) if since is not None else None,
        "restart": n["restart"],
        "pid": _pid_text(pid) if pid is not None else None,
        "os_pid": n["os_pid"],
        "uptime_s": round(max(0.0, time.time() - since), 3)
        if state == "running" and since is not None
        else None,
        "retry_in_s": round(n["retry_in"], 3) if n["retry_in"] is not None else None,
        "restarts": n["restarts"],
        "last_exit": n["last_exit"],
        "last_class": n["last_class"],
        # the last lines of a child that exited abnormally (why it crashed)
        "last_output": [{"stream": st, "line": line} for st, line in n["output"]]
        if crashed
        else [],
        "last_stderr": n["stderr"] if crashed else [],
        "children": [_view_json(c, None) for c in n["children"]],
    }
    return out


def _sse(name: str, data: Mapping[str, Any], id: int | None = None) -> bytes:
    name = name.replace("\r", " ").replace("\n", " ")
    payload = json.dumps(data, separators=(",", ":"), default=repr)
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {name}\ndata: {payload}\n\n".encode()


def _takes_accept(fn: Callable[..., Any]) -> bool:
    try:
        return "accept" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _dynamic(pid: Pid | None) -> bool:
    if isinstance(pid, DynamicSupervisorPid):
        return True
    server = getattr(pid, "_server", None)
    return getattr(server, "mode", "static") != "static"


def _event_prefix(pid: Pid | None, fallback: str) -> str:
    """The path a supervisor stamps on its events (differs from the tree path for a
    supervisor started under a dynamic one)."""
    p = getattr(getattr(pid, "_server", None), "path", None)
    return p if isinstance(p, str) else fallback


class ControlServer:
    """The control API as an extension of :func:`trellis.run`: the tree, its events,
    restart/stop/start of a child by path, Prometheus metrics, health and readiness.

    Args:
        socket: the Unix socket path; ``True`` for :func:`default_socket_path`; ``False``
            for none; ``None`` (default) means the default path unless ``tcp`` is given.
            The socket gets mode 0600, and only the tree's own uid and root may use it
            (checked per connection with ``SO_PEERCRED``).
        tcp: ``"host:port"`` to also listen on TCP (port 0 picks a free one). TCP always
            requires a bearer token: without ``tokens`` the server refuses to start.
        tokens: bearer tokens by name (``{"default": "..."}``); the name is recorded as
            ``who`` (``token:<name>``) in ``operator.action`` events.
        roles: each token's role by name, ``"read"`` or ``"operator"`` (the default for
            a token not named here). A ``read`` token may use the routes in
            :data:`READ_ROUTES` (tree, events, logs, metrics, health); an action
            answers 403 naming its role. Unix-socket peers (our uid, root) are operators.
        metrics: an object with ``async render() -> (bytes, content_type)`` for
            ``/metrics``; without one, ``/metrics`` answers 404.
        tracker: a :class:`trellis._tree.Tracker` already attached for the tree's life
            (restarts, uptime, last exit); one is attached here if not given.
        node: the node name shown by ``/healthz`` and ``/v1/tree``.
        history: how many recent events ``/v1/events?history=N`` can replay (child
            output not counted: see ``output_history``).
        output_history: how many recent ``process.output`` events (child output lines)
            are kept for replay, apart from the others: chatty children cannot push
            supervision events out of the history.
        sse_buffer: how far a live client may fall behind; one further behind loses
            the oldest events (counted and reported to it), never slowing the tree.
        max_connections: connections the Unix socket and TCP each keep open at most
            (separate budgets); default an eighth of ``RLIMIT_NOFILE`` (8..512), so a
            flood of connections cannot take the descriptors children need. When full,
            a new connection closes the longest idle one (one that never made an
            authorised request first): an operator always gets in.
        idle_timeout: seconds a connection may take to send a request's headers, after
            connecting or after its last response, before it is closed.
        read_uids: uids that may use the Unix socket with the ``read`` role (look, not
            act). The socket then gets mode 0666 (the peer check keeps everyone else
            out: 403), so it must be in a directory those users can reach: not the
            private default one (refused).

    Example::

        ctl = ControlServer(socket="/run/shop/control.sock")
        sys.exit(trellis.run(tree.child_spec(), extensions=[ctl]))
    """

    def __init__(
        self,
        *,
        socket: str | os.PathLike[str] | bool | None = None,
        tcp: str | None = None,
        tokens: Mapping[str, str] | None = None,
        roles: Mapping[str, str] | None = None,
        metrics: MetricsSource | None = None,
        tracker: Tracker | None = None,
        node: str | None = None,
        history: int = 1000,
        sse_buffer: int = 1000,
        output_history: int = 1000,
        keepalive: float = 15.0,
        max_body: int = 64 * 1024,
        grace: float = 5.0,
        max_connections: int | None = None,
        idle_timeout: float = 10.0,
        read_uids: Iterable[int] = (),
    ) -> None:
        if socket is None:
            socket = tcp is None
        self.socket_path: Path | None = (
            default_socket_path() if socket is True else None if socket is False else Path(socket)
        )
        self._tcp = parse_tcp(tcp) if tcp is not None else None
        self._tokens: list[tuple[str, bytes]] = []
        for name, token in (tokens or {}).items():
            if not isinstance(token, str) or not token:
                raise ControlError(f"tokens: the token named {name!r} is empty")
            self._tokens.append((str(name), token.encode()))
        self._roles: dict[str, str] = {}
        for name, role in (roles or {}).items():
            if role not in ROLES:
                raise ControlError(
                    f"roles: the token named {name!r} has role {role!r}; "
                    f"roles are {' and '.join(ROLES)}"
                )
            if name not in (tokens or {}):
                raise ControlError(f"roles: no token is named {name!r}")
            self._roles[str(name)] = role
        self._denied_window = (0.0, 0, 0)  # (window start, shown in it, suppressed)
        if self._tcp is not None and not self._tokens:
            raise ControlError(
                f"tcp: the control API listens on TCP ({tcp}) only with a bearer token; "
                "give tokens={'name': 'token'} (e.g. from $TRELLIS_CONTROL_TOKEN)"
            )
        for key, value in (
            ("history", history),
            ("sse_buffer", sse_buffer),
            ("output_history", output_history),
        ):
            if value < 1:
                raise ControlError(f"{key} must be at least 1, not {value}")
        self.metrics = metrics
        self.node = node
        self.tracker = tracker
        self._own_tracker = tracker is None
        # recent events for replay (child output apart), and for live streams
        self._seq = 0
        self._history: deque[_Rec] = deque(maxlen=history)
        self._output: deque[_Rec] = deque(maxlen=output_history)
        self._live: deque[_Rec] = deque(maxlen=sse_buffer)
        self._merged: tuple[int, list[_Rec]] = (0, [])
        self._encoded: list[_Rec] | None = None  # a merged list known to be all encoded
        self._wake: asyncio.Future[None] | None = None
        self._encoding: asyncio.Lock | None = None
        self._streams = 0  # open event streams
        self._sse_buffer = sse_buffer
        self._keepalive = keepalive
        self._max_body = max_body
        self._grace = grace
        if max_connections is not None and max_connections < 1:
            raise ControlError(f"max_connections must be at least 1, not {max_connections}")
        if not idle_timeout > 0:
            raise ControlError(f"idle_timeout must be more than 0 seconds, not {idle_timeout}")
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._allowed_uids = frozenset({os.getuid(), 0})
        self._read_uids = frozenset(int(u) for u in read_uids) - self._allowed_uids
        private = self.socket_path is not None and self.socket_path.parent == socket_dir()
        if self._read_uids and private:
            raise ControlError(
                f"read_uids: other users cannot reach {self.socket_path} (the private "
                "default socket directory); give a socket path in a directory they can "
                "traverse"
            )
        self.root: Pid | None = None
        # ``trellis run`` sets this to its tree file's reloader (POST /v1/reload)
        self.reloader: Any = None
        # ``trellis run`` sets this to (journal url, tree name, slo settings): GET /v1/slo
        self.slo_source: Any = None
        self._request_stop: Callable[[], None] | None = None
        self._root_since: float | None = None
        self._http: HttpServer | None = None
        self._socket_stat: os.stat_result | None = None
        self._hid: object | None = None
        self._closing: asyncio.Event | None = None
        self.tcp_address: tuple[str, int] | None = None
        self.app = self._build_app()

    # -- Extension ------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the sockets and start serving (before the tree starts)."""
        self._closing = asyncio.Event()
        self._hid = telemetry.attach(self._remember)
        if self.tracker is None:
            self.tracker = Tracker()
        if self._own_tracker:
            self.tracker.attach()
        http = HttpServer(
            self._gate,
            max_connections=self._max_connections,
            idle_timeout=self._idle_timeout,
            operator=lambda peer: peer.uid in self._allowed_uids,
        )
        try:
            if self.socket_path is not None:
                sock, self._socket_stat = bind_unix(
                    self.socket_path, mode=0o666 if self._read_uids else 0o600
                )
                await http.serve(sock, "unix", f"unix:{self.socket_path}")
                _log.info("control API listening on unix:%s", self.socket_path)
            if self._tcp is not None:
                tsock = bind_tcp(*self._tcp)
                name = tsock.getsockname()
                self.tcp_address = (str(name[0]), int(name[1]))
                await http.serve(tsock, "tcp", "tcp")
                _log.info("control API listening on tcp:%s:%s", *self.tcp_address)
        except BaseException:
            self._http = http
            await self.stop()
            raise
        self._http = http

    async def tree_started(self, root: Pid, request_stop: Callable[[], None]) -> None:
        """Remember the running root and how to stop the tree."""
        self.root = root
        self._request_stop = request_stop
        self._root_since = time.time()

    async def stop(self) -> None:
        """End event streams, finish requests in flight, close the sockets and remove
        the socket file."""
        if self._closing is not None:
            self._closing.set()
        http, self._http = self._http, None
        if http is not None:
            await http.close(self._grace)
        if self.socket_path is not None and self._socket_stat is not None:
            with contextlib.suppress(OSError):
                st = self.socket_path.lstat()
                if (st.st_dev, st.st_ino) == (self._socket_stat.st_dev, self._socket_stat.st_ino):
                    self.socket_path.unlink()
            self._socket_stat = None
        if self._hid is not None:
            telemetry.detach(self._hid)
            self._hid = None
        if self._own_tracker and self.tracker is not None:
            self.tracker.detach()

    def _remember(self, event: dict[str, Any], wall: float | None = None) -> None:
        """Telemetry handler: keep recent events (converted lazily, once for every
        client) for history replay and live streams, and wake the streams. ``wall``:
        when an event handed over later (one of the tree's start) happened."""
        self._seq += 1
        rec = _Rec(self._seq, time.time() if wall is None else wall, event)
        (self._output if rec.name == "process.output" else self._history).append(rec)
        self._live.append(rec)
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)

    def _waiter(self) -> asyncio.Future[None]:
        """A future resolved by the next event (shared by every waiting stream)."""
        w = self._wake
        if w is None or w.done():
            w = self._wake = asyncio.get_running_loop().create_future()
        return w

    def _retained(self) -> list[_Rec]:
        """Every event kept for replay, oldest first (history and output merged)."""
        seq, merged = self._merged
        if seq != self._seq or not merged:
            if self._output:
                merged = list(heapq.merge(self._history, self._output, key=_seq_of))
            else:
                merged = list(self._history)
            self._merged = (self._seq, merged)
        return merged

    async def _encode(self, recs: list[_Rec]) -> None:
        """Encode the events of ``recs`` not encoded yet, a slice per loop turn, one
        stream at a time (the others then find them done)."""
        if recs is self._encoded:  # 250 clients replaying need not check 1000 events each
            return
        if all(r.sse is not None for r in recs):
            return
        if self._encoding is None:
            self._encoding = asyncio.Lock()
        async with self._encoding:
            if recs is self._encoded:  # done by the stream that held the lock before
                return
            n = 0
            for r in recs:
                if r.sse is None:
                    r.encode()
                    n += 1
                    if n % _ENCODE_CHUNK == 0:
                        await asyncio.sleep(0)
        if recs is self._merged[1]:
            self._encoded = recs

    # -- Authorisation ----------------------------------------------------------------
    def _gate(self, peer: Peer) -> ASGIApp:
        """The application for one connection: authorise each request, then route it;
        whatever goes wrong inside answers an error and never escapes."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return
            started = False

            async def tracked_send(message: Any) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                await send(message)

            try:
                denied = self._authorise(peer, scope)
                if denied is not None:
                    await denied(scope, receive, tracked_send)
                    return
                await self.app(scope, receive, tracked_send)
            except ClientDisconnect:
                return
            except Exception as e:
                _log.exception("control API: %s %s failed", scope.get("method"), scope.get("path"))
                if not started:
                    with contextlib.suppress(Exception):
                        resp = _error(500, f"internal error: {reason_text(e)}")
                        await resp(scope, receive, send)

        return app

    def _authorise(self, peer: Peer, scope: Scope) -> Response | None:
        """None if allowed (and ``trellis.who``, ``trellis.source`` and ``trellis.role``
        set in ``scope``), else the 401/403 response (logged and emitted as
        ``operator.denied``, rate-limited)."""
        if peer.kind == "unix":
            if peer.uid is None or peer.uid not in self._allowed_uids | self._read_uids:
                shown = "unknown" if peer.uid is None else str(peer.uid)
                readers = "".join(f", uid {u} (read)" for u in sorted(self._read_uids))
                return self._deny(
                    peer,
                    scope,
                    403,
                    f"uid {shown} may not use this control socket (allowed: uid {os.getuid()} "
                    f"and root{readers})",
                    who=f"uid:{shown}",
                )
            role = "read" if peer.uid in self._read_uids else "operator"
            who = f"uid:{peer.uid}"
        else:
            if scope.get("path") in PUBLIC_PATHS and scope.get("method") in ("GET", "HEAD"):
                scope["trellis.who"] = "anonymous"  # the dashboard page: it holds no data
                scope["trellis.source"] = peer.source
                return None
            header = b""
            for key, value in scope.get("headers", ()):
                if key == b"authorization":
                    header = value
                    break
            scheme, _, token = header.strip().partition(b" ")
            token = token.strip()
            if scheme.lower() != b"bearer" or not token:
                why = "missing" if not header else "malformed (expected 'Bearer <token>')"
                return self._deny(
                    peer,
                    scope,
                    401,
                    f"authorization {why}: this API needs a bearer token",
                    who=None,
                    headers={"WWW-Authenticate": 'Bearer realm="trellis"'},
                )
            found: str | None = None
            for name, known in self._tokens:  # compare with every token: no early exit
                if hmac.compare_digest(known, token):
                    found = name
            if found is None:
                return self._deny(peer, scope, 403, "this bearer token is not valid here", who=None)
            who, role = f"token:{found}", self._roles.get(found, "operator")
        if role != "operator" and self._needs_operator(scope):
            return self._deny(
                peer,
                scope,
                403,
                f"{who} has the {role} role: {scope.get('method')} {scope.get('path')} "
                "needs the operator role",
                who=who,
            )
        scope["trellis.who"] = who
        scope["trellis.source"] = peer.source
        scope["trellis.role"] = role
        return None

    def _claim_stream(self, scope: Scope) -> Response | None:
        """None if the request in ``scope`` may hold a stream open (counted against its
        listener's stream limits until it ends), else the 429/503 answer: a client
        without the operator role cannot hold the listener's connections."""
        conn = scope.get(CONNECTION)
        if conn is None:  # served without HttpServer (tests calling the app directly)
            return None
        who = str(scope.get("trellis.who", "anonymous"))
        refused = conn.claim_stream(who, scope.get("trellis.role") == "operator")
        if refused is None:
            return None
        status, message = refused
        return JSONResponse({"error": message}, status_code=status, headers={"Retry-After": "5"})

    def _needs_operator(self, scope: Scope) -> bool:
        """Whether the route ``scope`` asks for is missing from :data:`READ_ROUTES`
        (no route at all: False, the application answers 404 or 405)."""
        for route in self.app.routes:
            match, _child = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "path", None) not in READ_ROUTES
        return False

    def _deny(
        self,
        peer: Peer,
        scope: Scope,
        status: int,
        message: str,
        *,
        who: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> JSONResponse:
        """The 401/403 answer; logged and emitted as ``operator.denied`` (so journaled),
        at most :data:`DENIED_PER_MINUTE` times a minute: the next one after a quiet
        spell carries ``suppressed``, the count left out."""
        now = time.monotonic()
        start, shown, suppressed = self._denied_window
        if now - start >= 60.0:
            start, shown = now, 0
        if shown < DENIED_PER_MINUTE:
            shown += 1
            fields: dict[str, Any] = {
                "who": who,
                "source": peer.source,
                "method": scope.get("method"),
                "target": scope.get("path"),
                "status": status,
                "error": message,
            }
            if suppressed:
                fields["suppressed"] = suppressed
                suppressed = 0
            if self.node is not None:
                fields["node"] = self.node
            telemetry.emit("operator.denied", **fields)
            more = fields.get("suppressed")
            _log.warning(
                "control API: refused %s %s from %s (%s): %s%s",
                fields["method"],
                fields["target"],
                peer.source,
                status,
                message,
                f" ({more} more refusals not logged)" if more else "",
            )
        else:
            suppressed += 1
        self._denied_window = (start, shown, suppressed)
        return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))

    # -- Application ------------------------------------------------------------------
    def _build_app(self) -> Starlette:
        routes = [
            Route("/v1/tree", self._tree, methods=["GET"]),
            Route("/v1/events", self._events, methods=["GET"]),
            Route("/v1/children/{path:path}/restart", self._restart, methods=["POST"]),
            Route("/v1/children/{path:path}/stop", self._stop_child, methods=["POST"]),
            Route("/v1/children/{path:path}/start", self._start_child, methods=["POST"]),
            # operator action (journaled like restart): signal an OS-process child
            Route("/v1/children/{path:path}/signal", self._signal_child, methods=["POST"]),
            # read-only: a child's recent output (the ring), ?follow=true streams it
            Route("/v1/logs/{path:path}", self._logs, methods=["GET"]),
            Route("/v1/plugins", self._plugins, methods=["GET"]),
            Route("/v1/plugins/{id:path}/{action}", self._plugin_action, methods=["POST"]),
            Route("/v1/stop", self._stop_tree, methods=["POST"]),
            Route("/v1/reload", self._reload, methods=["POST"]),  # operator action
            Route("/v1/cluster", self._cluster, methods=["GET"]),  # read role
            Route("/metrics", self._metrics, methods=["GET"]),
            Route("/v1/stats", self._stats, methods=["GET"]),  # read role: RED/USE/lag
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/readyz", self._readyz, methods=["GET"]),
            Route("/openapi.json", self._openapi, methods=["GET"]),
            *dashboard_routes(self),  # GET /: the dashboard page (no data; see _dashboard)
        ]
        return Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_error, Exception: self._crash},
        )

    async def _crash(self, request: Request, exc: Exception) -> Response:
        """A handler failed: answer 500 with the error (the gate logs it)."""
        return _error(500, f"internal error: {reason_text(exc)}")

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
        else:
            message = str(exc.detail)
        return JSONResponse(
            {"error": message, "path": request.url.path},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    # -- Reading the tree ---------------------------------------------------------------
    async def _snapshot(self) -> _Entry | None:
        root = self.root
        if root is None:
            return None
        tree = await walk(root, timeout=_CALL_TIMEOUT)
        entry = _Entry(tree.path, tree, None, False, None, tree.path)
        await self._fill(entry, _event_prefix(root, tree.path))
        return entry

    async def _fill(self, entry: _Entry, prefix: str) -> None:
        sup = entry.node.pid
        if not isinstance(sup, _AdminPid) or not entry.node.children:
            return
        dynamic = _dynamic(sup)
        specs: list[Any] = []
        for child in entry.node.children:
            key = child.pid if dynamic else child.id
            spec = None
            if key is not None:
                try:
                    spec = await asyncio.wait_for(sup._admin("get_childspec", key), _CALL_TIMEOUT)
                except Exception:  # gone meanwhile, or the supervisor is busy
                    spec = None
            specs.append(spec)
        ids = [getattr(s, "id", c.id) for s, c in zip(specs, entry.node.children, strict=True)]
        for child, spec, cid in zip(entry.node.children, specs, ids, strict=True):
            if dynamic:
                seg = str(cid) if ids.count(cid) == 1 else f"{cid}@{getattr(child.pid, 'id', '?')}"
            else:
                seg = str(child.id)
            restart = str(spec.restart) if spec is not None else None
            sub = _Entry(f"{entry.path}/{seg}", child, sup, dynamic, restart, f"{prefix}/{cid}")
            entry.children.append(sub)
            if child.type == "supervisor":
                await self._fill(sub, _event_prefix(child.pid, sub.path))

    def _root_key(self) -> str | None:
        """The root supervisor's event path (what the tracker knows it by)."""
        return None if self.root is None else _event_prefix(self.root, _root_name(self.root))

    def _view(self) -> dict[str, Any] | None:
        """The tree as the tracker knows it (no supervisor is asked anything): cheap
        enough for the loop in small trees, and safe to call from a thread."""
        tracker, key = self.tracker, self._root_key()
        if tracker is None or key is None:
            return None
        return tracker.snapshot(key)

    def _tree_body(self) -> bytes | None:
        """The ``/v1/tree`` answer, built off the loop (large trees take milliseconds)."""
        view = self._view()
        if view is None:
            return None
        root = _view_json(view, self._root_since)
        body = {"node": self.node, "time": _utc(time.time()), "root": root}
        return json.dumps(body, default=repr).encode()

    @staticmethod
    def _find(tree: _Entry, path: str) -> _Entry | None:
        path = path.strip("/")
        if not path:
            return None
        for e in tree.flat():
            if e.path == path or e.path == f"{tree.path}/{path}":
                return e
        return None

    def _not_started(self) -> JSONResponse:
        return _error(503, "the tree has not started yet")

    # -- Endpoints ------------------------------------------------------------------------
    async def _tree(self, request: Request) -> Response:
        if self.root is None:
            return self._not_started()
        body = await asyncio.to_thread(self._tree_body)
        if body is None:
            return _error(503, "the tree tracker has not seen the root supervisor start")
        return Response(body, media_type="application/json")

    async def _cluster(self, request: Request) -> Response:
        """This node's view of its cluster (trellis.cluster); 404 outside a cluster."""
        from ..cluster._node import current

        cluster = current()
        if cluster is None:
            return _error(404, "this node is in no cluster (trellis run --cluster URL)")
        return JSONResponse(cluster.status())

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "node": self.node, "os_pid": os.getpid()})

    async def _readyz(self, request: Request) -> Response:
        """Ready when the root runs and every child that should run runs, as telemetry
        showed it (never asking a supervisor, which may be busy): fails closed when the
        tracker is unsure or a child is starting, restarting or down."""
        root = self.root
        if root is None:
            return JSONResponse(
                {"ready": False, "reason": "the tree has not started yet", "not_ready": []},
                status_code=503,
            )
        if not root.alive:
            return JSONResponse(
                {"ready": False, "reason": "the root supervisor is not running", "not_ready": []},
                status_code=503,
            )
        from .._children import guardian_status

        guard = guardian_status()
        if not guard["ok"]:  # a kill -9 of Trellis would orphan the OS-process children
            return JSONResponse(
                {
                    "ready": False,
                    "reason": f"degraded: {guard['detail']}",
                    "guardian": guard,
                    "not_ready": [],
                },
                status_code=503,
            )
        if self.tracker is None:
            reason: str | None = "no tree tracker"
            bad: list[dict[str, Any]] = []
        else:
            reason, bad = await asyncio.to_thread(self.tracker.not_ready, self._root_key())
        if reason is not None:
            down = [{"path": n["path"], "state": n["state"], "restart": n["restart"]} for n in bad]
            return JSONResponse(
                {"ready": False, "reason": reason, "not_ready": down}, status_code=503
            )
        return JSONResponse({"ready": True, "not_ready": []})

    async def _metrics(self, request: Request) -> Response:
        if self.metrics is None:
            return _error(404, "metrics are not enabled on this tree")
        render: Any = self.metrics.render
        if _takes_accept(render):
            body, content_type = await render(accept=request.headers.get("accept"))
        else:
            body, content_type = await render()
        if len(body) <= _BODY_PIECE:
            return Response(body, headers={"content-type": content_type})
        return StreamingResponse(  # a large tree's scrape: a piece per loop turn
            _pieces(body),
            headers={"content-type": content_type, "content-length": str(len(body))},
        )

    async def _stats(self, request: Request) -> Response:
        """RED per server, USE per OS child and loop lag as JSON (the dashboard's
        sparklines); built off the loop by the metrics extension."""
        stats: Any = getattr(self.metrics, "stats", None)
        if stats is None:
            return _error(404, "metrics are not enabled on this tree")
        return JSONResponse(await stats())

    async def _openapi(self, request: Request) -> Response:
        return JSONResponse(openapi())

    async def _stop_tree(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        if self._request_stop is None:
            return self._not_started()
        self._operator(request, "stop_tree", None, "ok", body.get("reason"))
        self._request_stop()
        return JSONResponse({"action": "stop_tree", "result": "stopping"}, status_code=202)

    async def _reload(self, request: Request) -> Response:
        """Re-read the tree file and apply the difference (the reloader journals it)."""
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        if self.reloader is None:
            return _error(404, "this tree was not started from a tree file: nothing to reload")
        result = await self.reloader.reload(
            who=request.scope.get("trellis.who", "unknown"),
            source=request.scope.get("trellis.source", "unknown"),
            reason=body.get("reason"),
        )
        data = result.as_dict()
        if result.ok:
            return JSONResponse(data)
        status = 422 if result.bad_input else 409
        head = "nothing changed" if result.result in ("invalid", "refused") else "reload failed"
        error = f"{result.file}: {head}:\n" + "\n".join(result.errors)
        return JSONResponse({"error": error, **data}, status_code=status)

    async def _restart(self, request: Request) -> Response:
        return await self._act(request, "restart")

    async def _stop_child(self, request: Request) -> Response:
        return await self._act(request, "stop")

    async def _start_child(self, request: Request) -> Response:
        return await self._act(request, "start")

    async def _signal_child(self, request: Request) -> Response:
        from ._childio import send_signal

        return await send_signal(self, request)

    async def _logs(self, request: Request) -> Response:
        from ._childio import logs

        return await logs(self, request)

    async def _plugins(self, request: Request) -> Response:
        from ._plugins import list_plugins

        return await list_plugins(self, request)

    async def _plugin_action(self, request: Request) -> Response:
        # load / unload / release / call: operator actions (not in READ_ROUTES)
        from . import _plugins

        handler = getattr(_plugins, request.path_params["action"], None)
        if request.path_params["action"] not in _plugins.ACTIONS or handler is None:
            return _error(404, f"no plugin action {request.path_params['action']!r}")
        response: Response = await handler(self, request)
        return response

    # -- Actions ----------------------------------------------------------------------------
    async def _body(self, request: Request) -> dict[str, Any] | Response:
        """The optional JSON object body of an action, or the 4xx answer for a bad one."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            return _error(413, f"the body is {length} bytes; the limit is {self._max_body}")
        return await read_json_object(request, _BODY_FIELDS, self._max_body)

    def _operator(
        self, request: Request, action: str, target: str | None, result: str, detail: Any = None
    ) -> None:
        fields: dict[str, Any] = {
            "who": request.scope.get("trellis.who", "unknown"),
            "action": action,
            "target": target,
            "source": request.scope.get("trellis.source", "unknown"),
            "result": result,
        }
        if detail is not None:
            fields["detail"] = detail
        if self.node is not None:
            fields["node"] = self.node
        telemetry.emit("operator.action", **fields)
        _log.info("operator action: %s", fields)

    async def _act(self, request: Request, action: str) -> Response:
        raw_path = request.path_params["path"]
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        detail = body.get("reason")
        snap = await self._snapshot()
        if snap is None:
            return self._not_started()
        entry = self._find(snap, raw_path)
        if entry is None:
            message = f"no child at {raw_path!r} in tree {snap.path!r}"
            self._operator(request, action, raw_path, message, detail)
            return _error(404, message, path=raw_path)
        try:
            if action == "restart":
                result = await self._do_restart(entry)
            elif action == "stop":
                result = await self._do_stop(entry)
            else:
                result = await self._do_start(entry)
        except _Refused as r:
            self._operator(request, action, entry.path, str(r), detail)
            return _error(r.status, str(r), path=entry.path)
        except NotFound as e:
            message = f"{entry.path} is gone: {reason_text(e)}"
            self._operator(request, action, entry.path, message, detail)
            return _error(404, message, path=entry.path)
        except TrellisError as e:
            message = f"{action} {entry.path} failed: {reason_text(e)}"
            self._operator(request, action, entry.path, message, detail)
            return _error(409, message, path=entry.path)
        except Exception as e:
            message = f"{action} {entry.path} failed: {reason_text(e)}"
            self._operator(request, action, entry.path, message, detail)
            _log.exception("control API: %s", message)
            return _error(500, message, path=entry.path)
        self._operator(request, action, entry.path, "ok", detail)
        return JSONResponse({"action": action, "path": entry.path, "result": "ok", **result})

    @staticmethod
    def _parent(e: _Entry) -> _AdminPid:
        if e.parent is None:
            raise _Refused(
                f"{e.path} is the root: it has no supervisor to act on it "
                "(`trellis stop`, or POST /v1/stop, stops the whole tree)"
            )
        return e.parent

    @staticmethod
    def _pid_result(r: Any) -> dict[str, Any]:
        pid = r[0] if isinstance(r, tuple) else r
        if not isinstance(pid, Pid):
            return {"state": "ignored", "pid": None, "os_pid": None}
        return {"state": "running", "pid": _pid_text(pid), "os_pid": getattr(pid, "os_pid", None)}

    async def _do_restart(self, e: _Entry) -> dict[str, Any]:
        parent = self._parent(e)
        if e.dynamic:
            raise _Refused(
                f"{e.path} belongs to a dynamic supervisor, which forgets a child it stops: "
                "restart is not available there (stop it, or let it crash to be restarted)"
            )
        if e.restart == "temporary":
            raise _Refused(
                f"{e.path} is temporary: stopping it deletes its spec, so it could not be "
                "started again (stop it instead)"
            )
        await parent._admin("terminate_child", e.node.id)
        try:
            r = await parent._admin("restart_child", e.node.id)
        except TrellisError as err:
            raise _Refused(
                f"{e.path} was stopped but failed to start again: {reason_text(err)}"
            ) from err
        return self._pid_result(r)

    async def _do_stop(self, e: _Entry) -> dict[str, Any]:
        parent = self._parent(e)
        if e.dynamic:
            if e.node.pid is None:
                raise _Refused(f"{e.path} is between restarts; try again")
            await parent._admin("terminate_child", e.node.pid)
        else:
            await parent._admin("terminate_child", e.node.id)
        return {"state": "stopped"}

    async def _do_start(self, e: _Entry) -> dict[str, Any]:
        parent = self._parent(e)
        if e.dynamic:
            raise _Refused(
                f"{e.path} belongs to a dynamic supervisor: start is not available there "
                "(it forgets stopped children)"
            )
        if e.node.state == "running":
            raise _Refused(f"{e.path} is already running")
        return self._pid_result(await parent._admin("restart_child", e.node.id))

    # -- Events -------------------------------------------------------------------------------
    async def _events(self, request: Request) -> Response:
        q = request.query_params
        history = 0
        if "history" in q:
            text = q["history"]
            if not text.isdigit() or len(text) > 9:
                return _error(422, f"history must be a whole number >= 0, not {text!r}")
            history = int(text)
        follow = True
        if "follow" in q:
            value = q["follow"].lower()
            if value not in ("true", "false", "1", "0", "yes", "no"):
                return _error(422, f"follow must be true or false, not {q['follow']!r}")
            follow = value in ("true", "1", "yes")
        names = _patterns(q.get("filter"))
        paths = _patterns(q.get("path"))
        for key, pats in (("filter", names), ("path", paths)):
            if pats is not None and (not pats or any(len(p) > 200 for p in pats)):
                return _error(422, f"{key} must be one or more comma-separated globs")
        last_id: int | None = None
        given = (request.headers.get("last-event-id") or q.get("last_event_id") or "").strip()
        if given:
            if not given.isdigit() or len(given) > 18:
                return _error(422, f"Last-Event-ID must be an event id (a number), not {given!r}")
            last_id = int(given)
        if request.method == "HEAD":  # headers only: never hold the connection open
            return Response(headers={"content-type": "text/event-stream; charset=utf-8"})
        return _EventStream(self, history, names, paths, follow, last_id)


async def _pieces(body: bytes) -> AsyncIterator[bytes]:
    view = memoryview(body)
    for i in range(0, len(body), _BODY_PIECE):
        yield bytes(view[i : i + _BODY_PIECE])
        await asyncio.sleep(0)


def _seq_of(rec: _Rec) -> int:
    return rec.seq


def _patterns(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [p.strip() for p in value.split(",") if p.strip()]


class _Rec:
    """One remembered event: its sequence number (the SSE ``id``), arrival time, and
    its SSE bytes, encoded once (lazily) and shared by every client."""

    __slots__ = ("event", "name", "path", "seq", "sse", "wall")

    def __init__(self, seq: int, wall: float, event: dict[str, Any]) -> None:
        self.seq = seq
        self.wall = wall
        self.event = event
        self.name = str(event.get("event"))
        self.path: str | None = None
        self.sse: bytes | None = None

    def encode(self) -> None:
        try:
            data = jsonable(_stable_pids(self.event))
        except Exception as e:  # an odd field must not end the stream
            data = {"event": self.name, "error": f"cannot show this event: {reason_text(e)}"}
        p = data.get("path")
        self.path = p if isinstance(p, str) else None
        data["utc"] = _utc(self.wall)
        self.sse = _sse(self.name, data, self.seq)


#: Events encoded per loop turn (about 20 µs each), and events filtered and joined per
#: loop turn by one stream: bounded work per turn, whatever the history and clients.
_ENCODE_CHUNK = 64
_SEND_CHUNK = 64
#: A large response body (a 10,000-child tree's metrics) is sent in pieces this size.
_BODY_PIECE = 256 * 1024


def _glob_re(pats: list[str] | None) -> re.Pattern[str] | None:
    if pats is None:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats))


class _EventStream(Response):
    """Server-Sent Events: replay of the last ``history`` matching events (or, with
    ``Last-Event-ID``, of every retained event after that id), then (if ``follow``) live
    events until the client leaves or the server stops. Events are encoded once and
    shared by every client; each client reads the server's buffer of recent events at
    its own pace, and when it falls further behind than that buffer the oldest events
    are lost and the client is told how many with a ``control.dropped`` event."""

    media_type = "text/event-stream"

    def __init__(
        self,
        ctl: ControlServer,
        history: int,
        names: list[str] | None,
        paths: list[str] | None,
        follow: bool,
        last_id: int | None = None,
    ) -> None:
        # Not Response.__init__: it would declare a content-length for an empty body.
        self.status_code = 200
        self.background = None
        self.body = b""
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.ctl = ctl
        self.history = history
        self.names = _glob_re(names)
        root = ctl.root and _event_prefix(ctl.root, "")
        if paths is not None and root:
            paths = [*paths, *(f"{root}/{p}" for p in paths)]  # the root may be left out
        self.paths = _glob_re(paths)
        self.follow = follow
        self.last_id = last_id

    def _match(self, rec: _Rec) -> bool:
        if self.names is not None and not self.names.fullmatch(rec.name):
            return False
        if self.paths is not None:
            return rec.path is not None and self.paths.fullmatch(rec.path) is not None
        return True

    async def _pick(self, recs: list[_Rec], limit: int | None) -> list[_Rec]:
        """The matching ``recs`` (the last ``limit`` of them), a slice per loop turn."""
        await self.ctl._encode(recs)
        if self.names is None and self.paths is None:  # no filter: no scan
            return recs[-limit:] if limit is not None else list(recs)
        out: list[_Rec] = []
        for n, rec in enumerate(reversed(recs), 1):
            if self._match(rec):
                out.append(rec)
                if limit is not None and len(out) >= limit:
                    break
            if n % _SEND_CHUNK == 0:
                await asyncio.sleep(0)
        out.reverse()
        return out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctl = self.ctl
        refused = ctl._claim_stream(scope) if self.follow else None
        if refused is not None:
            await refused(scope, receive, send)
            return
        # The backlog and the live cursor are taken in one loop turn: no gap, no duplicate.
        cursor = ctl._seq
        if self.last_id is not None and self.last_id <= cursor:
            backlog = [r for r in ctl._retained() if r.seq > self.last_id]
            lost = max(0, cursor - self.last_id - len(backlog))
            limit = None
        else:  # no id, or one from before this server started (ids start at 1 again)
            backlog = ctl._retained() if self.history else []
            lost, limit = 0, self.history
        closing = ctl._closing
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(_disconnected(receive))]
        if closing is not None:
            waiters.append(asyncio.ensure_future(closing.wait()))
        ctl._streams += 1
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            picked = await self._pick(backlog, limit) if backlog else []
            head = _sse("control.dropped", {"dropped": lost, "total": lost}) if lost else b""
            for i in range(0, max(1, len(picked)), _SEND_CHUNK):
                chunk = b"".join([r.sse for r in picked[i : i + _SEND_CHUNK]])  # type: ignore[misc]
                if i == 0:
                    chunk = head + chunk
                await send(
                    {"type": "http.response.body", "body": chunk or b": ok\n\n", "more_body": True}
                )
                if waiters[0].done():
                    return  # the client left
            if self.follow:
                await self._live(cursor, waiters, send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            ctl._streams -= 1
            for f in waiters:
                f.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _live(self, cursor: int, waiters: list[asyncio.Future[Any]], send: Send) -> None:
        ctl = self.ctl
        dropped = 0
        while True:
            live = ctl._live
            if live and live[-1].seq > cursor:
                first = live[0].seq
                lost = 0
                if cursor + 1 < first:  # evicted before this client read them
                    lost = first - cursor - 1
                    cursor = first - 1
                recs = list(itertools.islice(live, cursor + 1 - first, None))
                cursor = recs[-1].seq
                out = b"".join([r.sse for r in await self._pick(recs, None)])  # type: ignore[misc]
                if lost:
                    dropped += lost
                    out += _sse("control.dropped", {"dropped": lost, "total": dropped})
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if waiters[0].done():
                    return
                continue
            wake = ctl._waiter()
            done, _ = await asyncio.wait(
                [wake, *waiters], timeout=ctl._keepalive, return_when=asyncio.FIRST_COMPLETED
            )
            if waiters[0] in done:
                return  # the client left
            if len(waiters) > 1 and waiters[1] in done:
                return  # the server is stopping
            if not done:
                await send(
                    {"type": "http.response.body", "body": b": keepalive\n\n", "more_body": True}
                )


def _stable_pids(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with pids as ``<Pid n>`` text: their repr gains " dead" once they end,
    which would make a replayed ``child.started`` look wrong."""
    out: dict[str, Any] = {}
    for k, v in event.items():
        if isinstance(v, Pid):
            out[k] = _pid_text(v)
            os_pid = getattr(v, "os_pid", None)
            if os_pid is not None and "os_pid" not in event:
                out["os_pid"] = os_pid
        else:
            out[k] = v
    return out


def _pid_text(pid: Pid) -> str:
    return f"<Pid {pid.id}{f' {pid.name!r}' if pid.name is not None else ''}>"


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return

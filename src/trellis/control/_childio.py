"""Control API routes for an OS-process child's output and signals.

``GET /v1/logs/{path}?n=100&since=UNIX&stream=stdout|stderr&follow=true`` (read-only):
the child's recent output lines from its in-memory ring (kept after it exits, across
restarts), as ``{"path", "lines": [{"time", "utc", "stream", "os_pid", "line"}]}``; with
``follow`` an NDJSON stream (``application/x-ndjson``): one line object per line, the
backlog first, then new lines until the client leaves or the tree stops (blank lines
are keepalives).

``POST /v1/children/{path}/signal`` with ``{"signal": "HUP", "group": false,
"reason": "..."}`` (an operator action, journaled as ``operator.action`` like restart):
sends the signal to the child's OS process (with ``group``: its whole process group).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .._children import CommandPid
from .._children._output import OutputRing, entry_dict, find_ring, recent_output
from .._children._types import signal_number
from .._core._exceptions import InvalidChildSpec
from ._body import error as _error
from ._body import read_json_object

if TYPE_CHECKING:
    from ._server import ControlServer

__all__ = ["logs", "send_signal"]

MAX_FOLLOW_BUFFER = 10_000  # lines queued per follower before the oldest are dropped


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _line(e: dict[str, Any]) -> dict[str, Any]:
    return {**e, "utc": _utc(e["time"])}


def _resolve(ctl: ControlServer, raw: str) -> str | None:
    """The ring's path for ``raw`` (a full path, or one relative to the root)."""
    raw = raw.strip("/")
    if find_ring(raw) is not None:
        return raw
    root = ctl.root
    name = getattr(getattr(root, "_server", None), "path", None) if root is not None else None
    if name and find_ring(f"{name}/{raw}") is not None:
        return f"{name}/{raw}"
    return None


async def logs(ctl: ControlServer, request: Request) -> Response:
    raw = request.path_params["path"]
    q = request.query_params
    n: int | None = 100
    if "n" in q:
        text = q["n"]
        if text == "all":
            n = None
        elif not text.isdigit() or len(text) > 9:
            return _error(422, f"n must be a whole number >= 0 or 'all', not {text!r}")
        else:
            n = int(text)
    since: float | None = None
    if "since" in q:
        try:
            since = float(q["since"])
        except ValueError:
            try:
                since = datetime.fromisoformat(q["since"]).timestamp()
            except ValueError:
                return _error(422, f"since must be a unix time or ISO 8601, not {q['since']!r}")
    stream = q.get("stream")
    if stream not in (None, "stdout", "stderr"):
        return _error(422, f"stream must be stdout or stderr, not {stream!r}")
    follow = q.get("follow", "false").lower() in ("true", "1", "yes")
    path = _resolve(ctl, raw)
    if path is None:
        snap = await ctl._snapshot()
        entry = ctl._find(snap, raw) if snap is not None else None
        if entry is None:
            return _error(404, f"no such child: {raw!r} (see `trellis status`)", path=raw)
        path = entry.path
        if not follow:
            return JSONResponse({"path": path, "lines": []})
    lines = [_line(e) for e in recent_output(path, n, since, stream)]
    if not follow:
        return JSONResponse({"path": path, "lines": lines})
    from .._children._output import ring_for

    return _Follow(ctl, ring_for(path), lines, stream)


class _Follow(Response):
    media_type = "application/x-ndjson"

    def __init__(
        self,
        ctl: ControlServer,
        ring: OutputRing,
        backlog: list[dict[str, Any]],
        stream: str | None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.body = b""
        self.raw_headers = [
            (b"content-type", b"application/x-ndjson"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.ctl = ctl
        self.ring = ring
        self.backlog = backlog
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self.ctl._claim_stream(scope)
        if refused is not None:
            await refused(scope, receive, send)
            return
        queue: asyncio.Queue[tuple[float, str, int | None, bytes]] = asyncio.Queue(
            MAX_FOLLOW_BUFFER
        )

        def on_line(entry: tuple[float, str, int | None, bytes]) -> None:
            if self.stream is not None and entry[1] != self.stream:
                return
            if queue.full():
                queue.get_nowait()  # drop the oldest: a slow reader never holds the tree
            queue.put_nowait(entry)

        self.ring.listeners.add(on_line)  # same loop turn as the backlog: no gap
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(_disconnected(receive))]
        closing = self.ctl._closing
        if closing is not None:
            waiters.append(asyncio.ensure_future(closing.wait()))
        nxt: asyncio.Future[Any] | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            body = b"".join(_ndjson(e) for e in self.backlog) or b"\n"
            await send({"type": "http.response.body", "body": body, "more_body": True})
            while True:
                if nxt is None:
                    nxt = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    [nxt, *waiters], timeout=15.0, return_when=asyncio.FIRST_COMPLETED
                )
                if waiters[0] in done:
                    return
                if nxt in done:
                    entries = [nxt.result()]
                    nxt = None
                    while not queue.empty():
                        entries.append(queue.get_nowait())
                    out = b"".join(_ndjson(_line(entry_dict(e))) for e in entries)
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                elif not done:
                    await send({"type": "http.response.body", "body": b"\n", "more_body": True})
                if len(waiters) > 1 and waiters[1] in done:
                    break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.ring.listeners.discard(on_line)
            pending = [f for f in (nxt, *waiters) if f is not None]
            for f in pending:
                f.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def _ndjson(e: dict[str, Any]) -> bytes:
    return json.dumps(e, separators=(",", ":")).encode() + b"\n"


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


_SIGNAL_FIELDS = frozenset({"signal", "group", "reason"})


async def _signal_body(ctl: ControlServer, request: Request) -> dict[str, Any] | Response:
    limit = int(getattr(ctl, "_max_body", 64 * 1024))
    return await read_json_object(request, _SIGNAL_FIELDS, limit)


async def send_signal(ctl: ControlServer, request: Request) -> Response:
    raw = request.path_params["path"]
    body = await _signal_body(ctl, request)
    if isinstance(body, Response):
        return body
    reason = body.get("reason")
    sig = body.get("signal")
    group = body.get("group", False)
    if not isinstance(sig, str | int) or isinstance(sig, bool) or not isinstance(group, bool):
        return _error(422, 'give {"signal": "HUP" (a name or number), "group": false}')
    try:
        num = signal_number(sig)
    except (InvalidChildSpec, ValueError):
        return _error(422, f"not a signal name or number: {sig!r}")
    import signal as _signal

    name = _signal.Signals(num).name
    detail: dict[str, Any] = {"signal": name, "group": group}
    if reason is not None:
        detail["reason"] = reason
    snap = await ctl._snapshot()
    if snap is None:
        return ctl._not_started()
    entry = ctl._find(snap, raw)
    if entry is None:
        message = f"no child at {raw!r} in tree {snap.path!r}"
        ctl._operator(request, "signal", raw, message, detail)
        return _error(404, message, path=raw)
    pid = entry.node.pid
    if not isinstance(pid, CommandPid):
        message = f"{entry.path} is not an OS-process child: there is no process to signal"
        ctl._operator(request, "signal", entry.path, message, detail)
        return _error(409, message, path=entry.path)
    try:
        os_pid = pid.send_signal(num, group=group)
    except ProcessLookupError:
        message = f"{entry.path} is not running: nothing to signal"
        ctl._operator(request, "signal", entry.path, message, detail)
        return _error(409, message, path=entry.path)
    except PermissionError as e:
        message = f"signal {name} to {entry.path} refused: {e}"
        ctl._operator(request, "signal", entry.path, message, detail)
        return _error(409, message, path=entry.path)
    ctl._operator(request, "signal", entry.path, "ok", detail)
    return JSONResponse(
        {
            "action": "signal",
            "signal": name,
            "group": group,
            "path": entry.path,
            "os_pid": os_pid,
            "result": "ok",
            "time": time.time(),
        }
    )

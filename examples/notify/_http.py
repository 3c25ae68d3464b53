"""A small HTTP/1.1 server on asyncio streams for the notification service's APIs.

Keep-alive, ``Content-Length`` bodies only (no chunked requests), JSON in and out,
bounded headers and bodies, a short wait for a new connection's first request, an idle
timeout, and a connection cap at which the longest-idle connection is closed to make
room, so a flood of idle connections cannot lock clients out. Handlers are
``async (Request) -> Response``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HttpServer", "Request", "Response", "json_response"]

_log = logging.getLogger("notify.http")
_REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, value: Any, **headers: str) -> Response:
    return Response(
        status, json.dumps(value).encode(), {"content-type": "application/json", **headers}
    )


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """``await HttpServer(handler).start(host, port)``; ``.port``; ``await .close()``."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body: int = 1 << 20,
        max_header: int = 16 << 10,
        idle_timeout: float = 30.0,
        first_timeout: float = 5.0,
        max_connections: int = 512,
    ) -> None:
        self.handler = handler
        self.max_body = max_body
        self.max_header = max_header
        self.idle_timeout = idle_timeout
        self.first_timeout = first_timeout
        self.max_connections = max_connections
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._idle: dict[asyncio.Task[None], float] = {}  # waiting for a request, since

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=self.max_header, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, then end every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(BaseException):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= self.max_connections and not self._evict_idle():
            writer.close()  # every connection is busy with a request: refuse the newcomer
            return
        self._conns.add(task)
        first = True
        try:
            while True:
                self._idle[task] = time.monotonic()
                request = await self._read(reader, writer, first)
                self._idle.pop(task, None)
                if request is None:
                    return
                first = False
                try:
                    response = await self.handler(request)
                except Exception as e:  # a handler bug answers 500 and keeps serving
                    _log.exception("handler failed on %s %s", request.method, request.path)
                    response = json_response(500, {"error": f"internal error: {type(e).__name__}"})
                await self._write(writer, response)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:  # evicted, or the server is closing
            pass
        finally:
            self._idle.pop(task, None)
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    def _evict_idle(self) -> bool:
        """At the cap, make room by closing the connection idle the longest (one waiting
        for a request): a flood of idle connections cannot lock clients out."""
        if not self._idle:
            return False
        oldest = min(self._idle, key=self._idle.__getitem__)
        del self._idle[oldest]
        oldest.cancel()
        self._conns.discard(oldest)
        return True

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bool
    ) -> Request | None:
        try:
            # a new connection gets a short time to send its first request
            async with asyncio.timeout(self.first_timeout if first else self.idle_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._write(writer, json_response(431, {"error": "request headers too large"}))
            return None
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            await self._write(writer, json_response(400, {"error": "malformed request line"}))
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding"):
            await self._write(
                writer, json_response(400, {"error": "chunked bodies are not accepted"})
            )
            return None
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            await self._write(writer, json_response(400, {"error": "bad Content-Length"}))
            return None
        if length > self.max_body:
            await self._write(
                writer, json_response(413, {"error": f"body over {self.max_body} bytes"})
            )
            return None
        async with asyncio.timeout(self.idle_timeout):
            body = await reader.readexactly(length) if length else b""
        return Request(method.upper(), target.split("?", 1)[0], headers, body)

    async def _write(self, writer: asyncio.StreamWriter, response: Response) -> None:
        head = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}"]
        headers = {"content-length": str(len(response.body)), **response.headers}
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
        await writer.drain()

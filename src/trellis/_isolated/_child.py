"""The isolated server's own interpreter: ``python -m trellis._isolated._child``.

Started by Trellis (see :func:`trellis.Isolated`) with the socket to talk over in
``TRELLIS_ISOLATED_SOCKET`` and the serializer in ``TRELLIS_ISOLATED_SERIALIZER``. It
imports what every isolated server needs, connects and says HELLO, then waits for GO,
which names the server and its arguments: so an interpreter can be started ahead of
time (a standby) and run ``init`` only when it is adopted. After GO it starts the server
in a Trellis kernel of its own, says READY, then carries calls, casts and messages in and
replies, telemetry and the server's exit out. While it runs (waiting included) it sends
``WATCHDOG=1`` from its event loop (sd_notify), so a blocked interpreter is detected as
hung by its owner. Exit code: 0 when the server ended cleanly (or was never started),
1 when it crashed, 3 when it could not start.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import socket
import sys
import traceback
from typing import Any

from .._core import _telemetry
from .._core._reasons import NORMAL, SHUTDOWN, Shutdown, is_clean
from .._server import Caller, Server, cast
from .._server import stop as stop_server
from ._wire import (
    CALL,
    CAST,
    EXIT,
    FAIL,
    GO,
    HELLO,
    INFO,
    READY,
    REPLY,
    REPLY_ERROR,
    STOP,
    TELEMETRY,
    Codec,
    FrameReader,
    UnsupportedMessage,
    cast_transport,
)

SERIALIZER_ENV = "TRELLIS_ISOLATED_SERIALIZER"
SOCKET_ENV = "TRELLIS_ISOLATED_SOCKET"
PATH_ENV = "TRELLIS_ISOLATED_PATH"
EXIT_CRASHED = 1
EXIT_START_FAILED = 3

#: Telemetry the parent sees from here (the server's own exit travels as EXIT).
_FORWARDED = ("mailbox.overflow", "process.unkillable", "telemetry.handler_failed")


def decode_reason(value: Any) -> Any:
    """A stop reason as sent by the parent (``normal``, ``shutdown`` or a text)."""
    if value == "normal":
        return NORMAL
    if value == "shutdown":
        return SHUTDOWN
    return Shutdown(value)


class _Link(asyncio.Protocol):
    """The socket to the parent: frames in, frames out."""

    def __init__(self, codec: Codec, done: asyncio.Future[None]) -> None:
        self.codec = codec
        #: ``(target, args, kwargs)`` once GO arrived; None if stopped before it
        self.go: asyncio.Future[Any] = done.get_loop().create_future()
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.server: Any = None
        self.done = done
        self.stopping = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast_transport(transport)  # uvloop's transports are not subclasses
        self.transport = transport

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.request_stop(SHUTDOWN)  # the parent is gone: nobody to serve

    def send(self, frame: Any) -> None:
        t = self.transport
        if t is not None:
            t.write(self.codec.encode(frame))

    def data_received(self, data: bytes) -> None:
        try:
            bodies = self.reader.feed(data)
        except ValueError:
            self.request_stop(SHUTDOWN)
            return
        for body in bodies:
            try:
                frame = self.codec.decode(body)
            except UnsupportedMessage as e:
                self._undecodable(body, str(e))
                continue
            kind = frame[0]
            server = self.server
            if kind == CALL:
                reply_to: Any = _ReplyTo(self, frame[1])  # duck-types the future
                server._deliver(Caller(frame[2], reply_to, None))
            elif kind == CAST:
                cast(server, frame[1])
            elif kind == INFO:
                server.send(frame[1])
            elif kind == STOP:
                self.request_stop(decode_reason(frame[1]))
            elif kind == GO and not self.go.done():
                self.go.set_result(frame[1:])

    def _undecodable(self, body: bytes, why: str) -> None:
        """A frame whose payload this side cannot rebuild: a call gets the error back."""
        try:
            import msgspec

            head = msgspec.msgpack.decode(body, ext_hook=lambda _c, _d: None)
        except Exception:
            return
        if head and head[0] == CALL:
            self.send([REPLY_ERROR, head[1], why])

    def reply(self, ref: int, value: Any) -> None:
        try:
            self.send([REPLY, ref, value])
        except UnsupportedMessage as e:
            self.send([REPLY_ERROR, ref, f"the reply cannot be sent back: {e}"])

    def request_stop(self, reason: Any) -> None:
        server = self.server
        if self.stopping:
            return
        self.stopping = True
        if not self.go.done():
            self.go.set_result(None)  # stopped (or the parent went) before GO
        if server is None or server._dead:
            if not self.done.done():
                self.done.set_result(None)
            return
        asyncio.get_running_loop().create_task(_stop(server, reason))


class _ReplyTo:
    """Stands where a call's future would: the server's reply is written to the parent in
    the same step (no done-callback hop through the event loop). A failure (the server
    died mid-call) is not sent: the server's exit reaches the parent as EXIT."""

    __slots__ = ("link", "ref", "sent")

    def __init__(self, link: _Link, ref: int) -> None:
        self.link = link
        self.ref = ref
        self.sent = False

    def done(self) -> bool:
        return self.sent

    def cancelled(self) -> bool:
        return False

    def set_result(self, value: Any) -> None:
        if not self.sent:
            self.sent = True
            self.link.reply(self.ref, value)

    def set_exception(self, exc: BaseException) -> None:
        self.sent = True


async def _stop(server: Any, reason: Any) -> None:
    try:
        await stop_server(server, reason)
    except Exception:
        pass  # its exit reason is reported by the join in _serve


def _heartbeat(loop: asyncio.AbstractEventLoop) -> None:
    """WATCHDOG=1 at half the owner's watchdog interval, sent from this event loop."""
    where = os.environ.get("NOTIFY_SOCKET")
    usec = os.environ.get("WATCHDOG_USEC")
    if not where or not usec:
        return
    address = "\0" + where[1:] if where.startswith("@") else where
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    interval = max(int(usec) / 2e6, 0.001)

    def beat() -> None:
        try:
            sock.sendto(b"WATCHDOG=1", address)
        except OSError:
            pass
        loop.call_later(interval, beat)

    beat()


def _load(target: str) -> type[Server]:
    module, _, name = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Server)):
        raise TypeError(f"{target} is not a trellis.Server subclass")
    return obj


async def _serve(codec: Codec, path: str) -> int:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    link = _Link(codec, done)
    await loop.create_unix_connection(lambda: link, path)
    _heartbeat(loop)
    link.send([HELLO])
    go = await link.go
    if go is None:
        return 0  # a standby that was never used
    target, args, kwargs = go
    try:
        cls = _load(target)
        server = await cls.start(*args, **kwargs)
    except BaseException as e:
        text = _reason_text(getattr(e, "reason", None) or e)
        print(f"isolated server {target} could not start: {text}", file=sys.stderr)
        traceback.print_exc()
        link.send([FAIL, text])
        await _drain(link)
        return EXIT_START_FAILED
    link.server = server

    def forward(event: dict[str, Any]) -> None:
        from .._tree import jsonable

        try:
            link.send([TELEMETRY, jsonable(event)])
        except UnsupportedMessage:
            pass

    hid = _telemetry.attach(forward, _FORWARDED)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, link.request_stop, SHUTDOWN)
    link.send([READY])
    reason = await server.join()
    _telemetry.detach(hid)
    clean = is_clean(reason)
    text = _reason_text(reason)
    if not clean:
        print(f"isolated server {target} exited: {text}", file=sys.stderr)
        if isinstance(reason, BaseException):
            traceback.print_exception(reason, file=sys.stderr)
    link.send([EXIT, clean, text])
    await _drain(link)
    return 0 if clean else EXIT_CRASHED


async def _drain(link: _Link) -> None:
    t = link.transport
    if t is None:
        return
    t.close()  # flushes what is buffered first
    for _ in range(200):
        if link.transport is None:
            return
        await asyncio.sleep(0.005)


def _reason_text(reason: Any) -> str:
    if reason is NORMAL:
        return "normal"
    if reason is SHUTDOWN:
        return "shutdown"
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return str(reason)


def main() -> int:
    """Entry point of the isolated interpreter."""
    path = os.environ.pop(SOCKET_ENV, None)
    serializer = os.environ.pop(SERIALIZER_ENV, "msgpack")
    if path is None:
        print("trellis._isolated._child is started by trellis.Isolated", file=sys.stderr)
        return 2
    for entry in os.environ.pop(PATH_ENV, "").split(os.pathsep):
        if entry and entry not in sys.path:
            sys.path.append(entry)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return asyncio.run(_serve(Codec(serializer), path))


if __name__ == "__main__":
    sys.exit(main())

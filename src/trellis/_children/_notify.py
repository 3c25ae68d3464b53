"""The sd_notify socket a child talks to (``NOTIFY_SOCKET``), as systemd provides it."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable

__all__ = ["NotifySocket"]

_log = logging.getLogger("trellis")
_BIND_TRIES = 16
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_CMSG_SPACE = socket.CMSG_SPACE(_UCRED.size)


class NotifySocket:
    """An abstract-namespace unix datagram socket; each datagram's ``KEY=VALUE`` lines
    are passed to ``on_message`` as a dict, if ``allowed(sender_pid)`` says the sender
    may speak for the child.

    The abstract namespace has no permissions, so any local process can send to it.
    The kernel attaches each sender's credentials (``SO_PASSCRED``; a process cannot
    forge them without CAP_SYS_ADMIN), and datagrams from processes that are not the
    child's own are dropped, as systemd's ``NotifyAccess=`` does."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[dict[str, str]], None],
        allowed: Callable[[int], bool] | None = None,
    ) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.name = self._bind()
        except BaseException:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self._loop = loop
        self._on_message = on_message
        self._allowed = allowed
        self._refused_logged = 0.0
        self.refused = 0
        loop.add_reader(self._sock.fileno(), self._read)

    def _bind(self) -> str:
        """Bind a random abstract name (128 bits: nobody can guess the next one and hold
        it to make our children's starts fail); a name taken anyway is replaced by a
        fresh one."""
        for _ in range(_BIND_TRIES):
            name = f"trellis-notify-{os.urandom(16).hex()}"
            try:
                self._sock.bind("\0" + name)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            return name
        raise OSError(errno.EADDRINUSE, f"no free notify socket name in {_BIND_TRIES} tries")

    @property
    def address(self) -> str:
        """The value for ``NOTIFY_SOCKET`` (``@`` marks the abstract namespace)."""
        return "@" + self.name

    def drain(self) -> None:
        """Read every datagram waiting now (before a deadline is judged)."""
        if self._sock.fileno() >= 0:
            self._read()

    def _read(self) -> None:
        while True:
            try:
                data, anc, _flags, _addr = self._sock.recvmsg(4096, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sender = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = _UCRED.unpack(payload[: _UCRED.size])[0]
            if self._allowed is not None and (sender is None or not self._allowed(sender)):
                self.refused += 1
                now = time.monotonic()
                if now - self._refused_logged > 10.0:
                    self._refused_logged = now
                    _log.warning(
                        "notify socket %s: ignored a message from pid %s, which is not "
                        "one of the child's processes (%d so far)",
                        self.address,
                        sender,
                        self.refused,
                    )
                continue
            fields: dict[str, str] = {}
            for line in data.decode("utf-8", "replace").splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    fields[key.strip()] = value
            if fields:
                self._on_message(fields)

    def close(self) -> None:
        try:
            self._loop.remove_reader(self._sock.fileno())
        except (ValueError, RuntimeError):
            pass
        self._sock.close()

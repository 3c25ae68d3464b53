"""The sd_notify socket a child talks to (``NOTIFY_SOCKET``), as systemd provides it."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import Callable

__all__ = ["NotifySocket"]

_ids = itertools.count(1)


class NotifySocket:
    """An abstract-namespace unix datagram socket; each datagram's ``KEY=VALUE`` lines
    are passed to ``on_message`` as a dict."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_message: Callable[[dict[str, str]], None]
    ) -> None:
        self.name = f"trellis-notify-{os.getpid()}-{next(_ids)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind("\0" + self.name)
        self._sock.setblocking(False)
        self._loop = loop
        self._on_message = on_message
        loop.add_reader(self._sock.fileno(), self._read)

    @property
    def address(self) -> str:
        """The value for ``NOTIFY_SOCKET`` (``@`` marks the abstract namespace)."""
        return "@" + self.name

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
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

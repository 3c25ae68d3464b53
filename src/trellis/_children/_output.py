"""Reading a child's output line by line, and rotating log files."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable
from typing import IO

__all__ = ["LineProtocol", "RotatingFile"]

MAX_LINE = 64 * 1024  # longer lines are split


class RotatingFile:
    """Append-only file rotated at ``max_bytes`` into ``name.1`` ... ``name.<backups>``."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._f: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed by close()
        self._size = self._f.tell()

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self.max_bytes and self._size > 0:
            self._rotate()
        self._f.write(data)
        self._size += len(data)

    def _rotate(self) -> None:
        self._f.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.truncate(self.path, 0)
        self._f = open(self.path, "ab")  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        self._f.close()


class LineProtocol(asyncio.Protocol):
    """Splits a pipe's bytes into lines and hands each to ``on_line``; keeps the last
    few lines for exit diagnostics."""

    def __init__(
        self,
        stream: str,
        on_line: Callable[[str, bytes], None],
        log: RotatingFile | None,
        closed: asyncio.Future[None],
    ) -> None:
        self.stream = stream
        self.on_line = on_line
        self.log = log
        self.closed = closed
        self.tail: deque[bytes] = deque(maxlen=20)
        self._buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        if len(self._buf) > MAX_LINE:
            lines.append(self._buf)
            self._buf = b""
        log = self.log
        for line in lines:
            if log is not None:
                log.write(line + b"\n")  # line by line, so rotation never splits a line
            self.tail.append(line)
            self.on_line(self.stream, line)

    def eof_received(self) -> bool:
        if self._buf:
            if self.log is not None:
                self.log.write(self._buf)
            self.tail.append(self._buf)
            self.on_line(self.stream, self._buf)
            self._buf = b""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.log is not None:
            self.log.close()  # the protocol owns its log file
        if not self.closed.done():
            self.closed.set_result(None)

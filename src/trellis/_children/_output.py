"""Reading a child's output line by line: an in-memory ring per child, and rotating
log files with a timestamp per line."""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

__all__ = ["LineProtocol", "OutputRing", "RotatingFile", "recent_output", "ring_for"]

MAX_LINE = 64 * 1024  # longer lines are split
RING_LINES = 1000  # recent output lines kept per child path (after it exits, too)
RING_BYTES = 256 * 1024  # ... and at most this many bytes of them (long lines)
MAX_RINGS = 10_000


class OutputRing:
    """The last ``RING_LINES`` output lines (at most ``RING_BYTES``) of one child path,
    across its restarts: ``(unix time, stream, os pid, line bytes)``. Listeners
    (``trellis logs -f``) get each new entry."""

    __slots__ = ("lines", "listeners", "size")

    def __init__(self) -> None:
        self.lines: deque[tuple[float, str, int | None, bytes]] = deque()
        self.listeners: set[Callable[[tuple[float, str, int | None, bytes]], None]] = set()
        self.size = 0

    def append(self, stream: str, os_pid: int | None, line: bytes) -> None:
        entry = (time.time(), stream, os_pid, line)
        lines = self.lines
        lines.append(entry)
        self.size += len(line)
        while len(lines) > RING_LINES or (self.size > RING_BYTES and len(lines) > 1):
            self.size -= len(lines.popleft()[3])
        for cb in tuple(self.listeners):
            cb(entry)


_rings: OrderedDict[str, OutputRing] = OrderedDict()


def ring_for(path: str) -> OutputRing:
    """The ring of child ``path`` (created on first use; the least recently started of
    over ``MAX_RINGS`` paths are dropped)."""
    ring = _rings.get(path)
    if ring is None:
        ring = _rings[path] = OutputRing()
        if len(_rings) > MAX_RINGS:
            _rings.popitem(last=False)
    else:
        _rings.move_to_end(path)
    return ring


def find_ring(path: str) -> OutputRing | None:
    return _rings.get(path)


def recent_output(
    path: str, n: int | None = None, since: float | None = None, stream: str | None = None
) -> list[dict[str, Any]]:
    """The last ``n`` lines (all kept with ``None``) of child ``path``'s output, newer than
    ``since`` (unix time), as ``{"time", "stream", "os_pid", "line"}`` dicts, oldest first.

    Example::

        for e in recent_output("root/web", n=20):
            print(e["stream"], e["line"])
    """
    ring = _rings.get(path)
    if ring is None:
        return []
    out = [
        entry_dict(e)
        for e in ring.lines
        if (since is None or e[0] >= since) and (stream is None or e[1] == stream)
    ]
    return out if n is None else out[-n:] if n > 0 else []


def entry_dict(e: tuple[float, str, int | None, bytes]) -> dict[str, Any]:
    return {"time": e[0], "stream": e[1], "os_pid": e[2], "line": e[3].decode("utf-8", "replace")}


_stamp_second = -1
_stamp_prefix = b""


def _stamp() -> bytes:
    """``2026-12-07T18:55:01.123Z `` (UTC), the per-line prefix of log files."""
    global _stamp_second, _stamp_prefix
    now = time.time()
    sec = int(now)
    if sec != _stamp_second:
        _stamp_second = sec
        _stamp_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode()
    return b"%s.%03dZ " % (_stamp_prefix, int((now - sec) * 1000))


def open_log(path: str) -> int:
    """Open a log file for appending, mode 0640 (the umask may narrow it further)."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


class RotatingFile:
    """Append-only file rotated at ``max_bytes`` into ``name.1`` ... ``name.<backups>``.
    Each line is written with a UTC timestamp prefix in one ``write`` (no buffering: a
    line is on disk, or in the page cache, as soon as it is read, even if Trellis is
    then killed)."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd = open_log(path)
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        data = _stamp() + data
        if self._size + len(data) > self.max_bytes and self._size > 0:
            self._rotate()
        os.write(self._fd, data)
        self._size += len(data)

    def _rotate(self) -> None:
        os.close(self._fd)
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.truncate(self.path, 0)
        self._fd = open_log(self.path)
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
                self.log.write(self._buf + b"\n")
            self.tail.append(self._buf)
            self.on_line(self.stream, self._buf)
            self._buf = b""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.log is not None:
            self.log.close()  # the protocol owns its log file
        if not self.closed.done():
            self.closed.set_result(None)

"""Reading a child's output line by line: an in-memory ring per child, and rotating
log files with a timestamp per line."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

__all__ = [
    "LineProtocol",
    "OutputRing",
    "RotatingFile",
    "UnsafeLogsDir",
    "log_name",
    "open_logs_dir",
    "recent_output",
    "ring_for",
]

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


def log_name(path: str) -> str:
    """The log files' base name of the child at tree ``path``: the path with ``/``
    replaced by ``.`` (``shop/payments/web`` -> ``shop.payments.web``, so its files are
    ``shop.payments.web.out.log`` / ``.err.log``), leaving out the ``<n>`` segments of
    supervisors without a name (they change from run to run). A name too long for a
    file becomes ``<16 hex digits of its sha256>.<child id>``."""
    segments = [s for s in path.strip("/").split("/") if not _unnamed(s)]
    name = ".".join(segments) or path.strip("/").rsplit("/", 1)[-1]
    if len(name.encode("utf-8", "surrogatepass")) > _MAX_LOG_NAME:
        import hashlib

        digest = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        name = f"{digest}.{segments[-1] if segments else name[-_MAX_LOG_NAME // 2 :]}"
    return name


_MAX_LOG_NAME = 230  # + ".err.log.NN" stays within a file name's 255 bytes


def _unnamed(segment: str) -> bool:
    return segment[:1] == "<" and segment[-1:] == ">" and segment[1:-1].isdigit()


class UnsafeLogsDir(PermissionError):
    """A logs directory that another user could write to: Trellis refuses it, since a
    symlink or file planted there would turn its writes against other files."""


def unsafe_dir_reason(st: os.stat_result, path: str) -> str | None:
    """Why the directory ``st`` (at ``path``) is not safe for log files, or ``None``:
    it must belong to our effective uid and be writable by nobody else (no group or
    other write bit)."""
    me = os.geteuid()
    if st.st_uid != me:
        return (
            f"logs dir {path!r} belongs to uid {st.st_uid}, not to uid {me} that runs "
            f"Trellis: that user could plant a symlink there and have Trellis write through "
            f"it (chown it to uid {me}, chmod go-w, or use a dir of its own)"
        )
    if st.st_mode & 0o022:
        return (
            f"logs dir {path!r} is writable by its group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): they could plant a symlink there and have "
            f"Trellis write through it (chmod go-w {path})"
        )
    return None


def open_logs_dir(path: str) -> int:
    """Create ``path`` (0700) if missing, open it, and check it is safe for log files
    (see :func:`unsafe_dir_reason`); returns a directory fd (close-on-exec). The log
    files are then opened relative to that fd, so a later rename of the directory
    changes nothing."""
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)  # the logs are ours only
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        why = unsafe_dir_reason(os.fstat(fd), path)
    except OSError:
        os.close(fd)
        raise
    if why is not None:
        os.close(fd)
        raise UnsafeLogsDir(why)
    return fd


_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def open_log(name: str, dir_fd: int | None = None) -> int:
    """Open a log file for appending, mode 0640 when created (the umask may narrow it).
    Never through a symlink (``O_NOFOLLOW``), and only a regular file (a FIFO or device
    planted under its name is refused, not blocked on)."""
    try:
        fd = os.open(name, _OPEN_FLAGS, 0o640, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeLogsDir(f"log file {name!r} is a symlink: refused") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeLogsDir(f"log file {name!r} is not a regular file: refused")
    return fd


class RotatingFile:
    """Append-only file rotated at ``max_bytes`` into ``name.1`` ... ``name.<backups>``.
    Each line is written with a UTC timestamp prefix in one ``write`` (no buffering: a
    line is on disk, or in the page cache, as soon as it is read, even if Trellis is
    then killed).

    The file is named ``name`` inside the directory ``dir_fd`` (the file takes its own
    duplicate of the fd). Rotation renames entries of that directory (``rename`` never
    follows a symlink) and truncates only through our own descriptor."""

    def __init__(self, dir_fd: int, name: str, max_bytes: int, backups: int) -> None:
        self.name = name
        self.max_bytes = max_bytes
        self.backups = backups
        self._dir = os.dup(dir_fd)  # non-inheritable, like every fd Python creates
        try:
            self._fd = open_log(name, self._dir)
        except BaseException:
            os.close(self._dir)
            raise
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        data = _stamp() + data
        if self._size + len(data) > self.max_bytes and self._size > 0:
            self._rotate()
        os.write(self._fd, data)
        self._size += len(data)

    def _rotate(self) -> None:
        d = self._dir
        if self.backups == 0:
            os.ftruncate(self._fd, 0)  # our own descriptor: no path is followed
            self._size = 0
            return
        for i in range(self.backups - 1, 0, -1):
            try:
                os.rename(f"{self.name}.{i}", f"{self.name}.{i + 1}", src_dir_fd=d, dst_dir_fd=d)
            except FileNotFoundError:
                pass
        os.rename(self.name, f"{self.name}.1", src_dir_fd=d, dst_dir_fd=d)
        os.close(self._fd)
        self._fd = -1
        self._fd = open_log(self.name, d)
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir >= 0:
            os.close(self._dir)
            self._dir = -1


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

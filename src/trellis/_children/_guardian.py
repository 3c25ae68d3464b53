"""The guardian: kills every child process group if the Trellis process dies.

A small helper process reads ``+pgid`` / ``-pgid`` lines on its stdin. When the
pipe closes (Trellis exited, however it died, even by SIGKILL), it sends SIGKILL
to every group still registered, then exits. It is started once, on the first
OS-process child, so the spawn path itself stays free of ``preexec_fn``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading

__all__ = ["register", "unregister"]

_CODE = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
groups = set()
for line in sys.stdin.buffer:
    line = line.strip()
    if line[:1] == b"+":
        groups.add(int(line[1:]))
    elif line[:1] == b"-":
        groups.discard(int(line[1:]))
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""

_lock = threading.Lock()
_pid: int | None = None  # the guardian's pid
_pipe: int | None = None  # the write end of its stdin


def _alive() -> bool:
    if _pid is None:
        return False
    try:
        got, _ = os.waitpid(_pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return got == 0


def _start() -> None:
    """Start the guardian with posix_spawn (no fork) in its own session, so a Ctrl-C to
    our terminal does not reach it."""
    global _pid, _pipe
    read_end, write_end = os.pipe()
    try:
        _pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-I", "-S", "-c", _CODE],
            {},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read_end, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
            setsid=True,
        )
    except OSError:
        os.close(write_end)
        _pid = None
        return
    finally:
        os.close(read_end)
    _pipe = write_end


def _write(data: bytes) -> None:
    global _pipe
    with _lock:
        if _pipe is None or not _alive():
            if _pipe is not None:
                os.close(_pipe)
                _pipe = None
            _start()
        if _pipe is None:
            return
        try:
            os.write(_pipe, data)
        except OSError:
            os.close(_pipe)
            _pipe = None


# Each write wakes the guardian (tens of microseconds), so the lines of one loop turn go
# out together: a tree of 50 children registers with one write, not 50.
_pending: list[str] = []


def _flush() -> None:
    if _pending:
        data = "".join(_pending).encode()
        _pending.clear()
        _write(data)


def _send(line: str) -> None:
    _pending.append(line)
    if len(_pending) > 1:
        return  # a flush is already scheduled
    try:
        asyncio.get_running_loop().call_soon(_flush)
    except RuntimeError:  # no running loop: write now
        _flush()


def register(pgid: int) -> None:
    """Have the guardian kill group ``pgid`` if Trellis dies."""
    _send(f"+{pgid}\n")


def unregister(pgid: int) -> None:
    """The group is gone (reaped): forget it."""
    if _pipe is not None or _pending:
        _send(f"-{pgid}\n")


def _forget_after_fork() -> None:
    global _pid, _pipe
    _pid = None
    _pipe = None
    _pending.clear()  # the fd is inherited by a forked child but is not its guardian


os.register_at_fork(after_in_child=_forget_after_fork)

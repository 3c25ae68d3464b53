"""The guardian: kills every child process group if the Trellis process dies.

A small helper process reads ``+pgid`` / ``-pgid`` lines on its stdin. When the
pipe closes (Trellis exited, however it died, even by SIGKILL), it sends SIGKILL
to every group still registered, then exits. It is started once, on the first
OS-process child, so the spawn path itself stays free of ``preexec_fn``.
"""

from __future__ import annotations

import os
import subprocess
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
_proc: subprocess.Popen[bytes] | None = None


def _guardian() -> subprocess.Popen[bytes] | None:
    global _proc
    if _proc is not None and _proc.poll() is None and _proc.stdin is not None:
        return _proc
    try:
        _proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to our terminal must not reach it
            close_fds=True,
        )
    except OSError:
        _proc = None
    return _proc


def _send(line: str) -> None:
    with _lock:
        proc = _guardian()
        if proc is None or proc.stdin is None:
            return
        try:
            proc.stdin.write(line.encode())
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass


def register(pgid: int) -> None:
    """Have the guardian kill group ``pgid`` if Trellis dies."""
    _send(f"+{pgid}\n")


def unregister(pgid: int) -> None:
    """The group is gone (reaped): forget it."""
    if _proc is not None:
        _send(f"-{pgid}\n")


def _pid() -> int | None:
    return _proc.pid if _proc is not None else None


os.register_at_fork(after_in_child=lambda: globals().__setitem__("_proc", None))

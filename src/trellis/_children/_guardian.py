"""The guardian: kills every OS-process child if the Trellis process dies.

A small helper process (its own session) reads ``+pgid`` / ``-pgid`` lines on its stdin.
When the pipe closes (Trellis exited, however it died, even by SIGKILL), it SIGKILLs every
group still registered with every descendant of their members (found by parent links, and
stopped first so that none forks out of the walk), then every process whose environment
carries this Trellis process's tag (``TRELLIS_TAG=<token>.<n>``, set on every OS child
by ``Command``), again and again until a scan finds none. The tag closes the two gaps a
list of groups leaves: a child spawned but not yet registered when Trellis died, and
descendants that left their group (``setsid``, daemons).

Registration is synchronous: ``register`` writes to the pipe before it returns, so a
group is known to the guardian before ``spawn`` returns. The guardian is watched: if it
dies it is restarted at once with the full set of groups, and the death is logged,
emitted as ``guardian.down`` / ``guardian.restarted`` telemetry, and visible to
``guardian_status()`` (the control API's ``/readyz`` reads it) until it is back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import threading
from typing import Any

from .._core import _telemetry

__all__ = [
    "TAG_VAR",
    "ensure_started",
    "guardian_status",
    "new_tag",
    "register",
    "token",
    "unregister",
]

_log = logging.getLogger("trellis")

TAG_VAR = "TRELLIS_TAG"

_CODE = r"""
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(s, signal.SIG_IGN)
mark = b"\0" + ("TRELLIS_TAG=" + sys.argv[1] + ".").encode()
me = os.getpid()
groups = set()
for line in sys.stdin.buffer:
    line = line.strip()
    if line[:1] == b"+":
        groups.add(int(line[1:]))
    elif line[:1] == b"-":
        groups.discard(int(line[1:]))
def table():
    parent, group = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/" + name + "/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        pid = int(name)
        parent[pid] = int(fields[1])
        group[pid] = int(fields[2])
    return parent, group
# Every descendant of a registered group's members, even one that left the group with
# no tag (env -i, a process title): stopped first (no fork escapes the walk), then
# killed, before the groups go and their orphans are re-parented out of reach.
frozen = set()
if groups:
    for _ in range(50):
        parent, group = table()
        kids = {}
        for pid, ppid in parent.items():
            kids.setdefault(ppid, []).append(pid)
        todo = [p for p, g in group.items() if g in groups]
        found = set(todo)
        while todo:
            for c in kids.get(todo.pop(), ()):
                if c not in found and c != me:
                    found.add(c)
                    todo.append(c)
        new = found - frozen
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:
                pass
        frozen |= new
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
for pid in frozen:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
killed = set()
def scan():
    new = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me or pid in killed:
            continue
        try:
            with open("/proc/" + name + "/environ", "rb") as f:
                env = b"\0" + f.read()
        except OSError:
            continue
        if mark in env:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
            killed.add(pid)
            new += 1
    return new
quiet = 0
for _ in range(500):
    quiet = 0 if scan() else quiet + 1
    if quiet >= 3:
        break
    time.sleep(0.01)
"""

_lock = threading.RLock()
_token = os.urandom(8).hex()
_seq = itertools.count(1)
_pid: int | None = None  # the guardian's pid
_pipe: int | None = None  # the write end of its stdin
_pidfd: int | None = None
_watch_loop: asyncio.AbstractEventLoop | None = None
_groups: set[int] = set()
_executable = sys.executable
_IDLE = "not started (no OS-process child yet)"
_state: dict[str, Any] = {"ok": True, "detail": _IDLE, "restarts": 0}


def token() -> str:
    """This Trellis process's tag prefix (its OS children carry ``TRELLIS_TAG=<token>.<n>``)."""
    return _token


def new_tag() -> str:
    """A fresh tag for one spawned OS process (its descendants inherit it)."""
    return f"{_token}.{next(_seq)}"


def guardian_status() -> dict[str, Any]:
    """Whether the OS-process children are protected against Trellis dying.

    ``{"ok": bool, "pid": int | None, "groups": int, "restarts": int, "detail": str}``.
    ``ok`` is false while the guardian is down or cannot be started: a kill -9 of
    Trellis would then leave its children running. ``/readyz`` reports it as degraded.
    """
    with _lock:
        if _pid is not None and not _alive():
            _died("found dead")
            _start()
        elif _pid is None and _groups:
            _start()  # retry an unstartable guardian
        return {
            "ok": bool(_state["ok"]),
            "pid": _pid,
            "groups": len(_groups),
            "restarts": int(_state["restarts"]),
            "detail": str(_state["detail"]),
        }


def _alive() -> bool:
    if _pid is None:
        return False
    try:
        got, _ = os.waitpid(_pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return got == 0


def _start() -> bool:
    """Start the guardian with posix_spawn (no fork) in its own session, so a Ctrl-C to
    our terminal does not reach it, and register every known group with it."""
    global _pid, _pipe, _pidfd
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, False)
    try:
        _pid = os.posix_spawn(
            _executable,
            [_executable, "-I", "-S", "-c", _CODE, _token],
            {},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read_end, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
            setsid=True,
        )
    except OSError as e:
        os.close(write_end)
        _pid = None
        _set_down(f"cannot start the guardian ({_executable}): {e}")
        return False
    finally:
        os.close(read_end)
    _pipe = write_end
    if _groups:
        os.write(_pipe, "".join(f"+{g}\n" for g in _groups).encode())
    _watch()
    was_down = not _state["ok"]
    if _state.get("started"):
        _state["restarts"] += 1
    _state.update(ok=True, detail="running", started=True)
    if was_down:
        _log.warning(
            "the guardian was restarted (pid %d) with %d process groups", _pid, len(_groups)
        )
        _telemetry.emit("guardian.restarted", os_pid=_pid, groups=len(_groups))
    return True


def _watch() -> None:
    """Watch the guardian through a pidfd on the running loop, if any."""
    global _pidfd, _watch_loop
    _unwatch()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    if _pid is None:
        return
    try:
        _pidfd = os.pidfd_open(_pid)
        loop.add_reader(_pidfd, _on_guardian_exit)
    except (OSError, NotImplementedError, RuntimeError):
        if _pidfd is not None:
            os.close(_pidfd)
            _pidfd = None
        return
    _watch_loop = loop


def _unwatch() -> None:
    global _pidfd, _watch_loop
    if _pidfd is not None:
        if _watch_loop is not None and not _watch_loop.is_closed():
            try:
                _watch_loop.remove_reader(_pidfd)
            except (ValueError, RuntimeError):
                pass
        os.close(_pidfd)
        _pidfd = None
    _watch_loop = None


def _on_guardian_exit() -> None:
    with _lock:
        if _pid is not None and not _alive():
            _died("exited")
            _start()


def _set_down(detail: str) -> None:
    first = _state["ok"] or _state["detail"] != detail
    _state.update(ok=False, detail=detail)
    if first:
        _log.error(
            "%s: OS-process children are NOT protected if Trellis dies (%d groups)",
            detail,
            len(_groups),
        )
        _telemetry.emit("guardian.down", detail=detail, groups=len(_groups))


def _died(how: str) -> None:
    global _pid, _pipe
    dead = _pid
    _pid = None
    _unwatch()
    if _pipe is not None:
        os.close(_pipe)
        _pipe = None
    _set_down(f"the guardian process {dead} {how}")


def _write(data: bytes) -> None:
    global _pipe
    with _lock:
        if _pid is not None and not _alive():
            _died("died")
        if _pipe is None:
            if not _start():
                return
        elif _watch_loop is None or _watch_loop.is_closed():
            _watch()  # a new loop (tests, or a second trellis.run): watch from it
        assert _pipe is not None
        try:
            os.write(_pipe, data)
        except OSError:
            _died("closed its pipe")
            _start()  # _start registers every group, this one included


def ensure_started() -> None:
    """Start the guardian now if it is not running, before anything is spawned: a
    kill -9 of Trellis between a child's spawn and a lazy start would leave that child
    unguarded. One check of a variable once it runs."""
    if _pipe is None:
        with _lock:
            if _pipe is None:
                _start()


def register(pgid: int) -> None:
    """Have the guardian kill group ``pgid`` if Trellis dies; written before returning."""
    with _lock:
        _groups.add(pgid)
        _write(f"+{pgid}\n".encode())


def unregister(pgid: int) -> None:
    """The group is gone (its leader was reaped): forget it."""
    with _lock:
        if pgid not in _groups:
            return
        _groups.discard(pgid)
        if _pipe is not None:
            _write(f"-{pgid}\n".encode())


def guardian_pid() -> int | None:
    return _pid


def _forget_after_fork() -> None:
    global _pid, _pipe, _pidfd, _watch_loop, _token, _seq, _lock
    _lock = threading.RLock()
    _pid = None
    _pipe = None  # the fd is inherited by a forked child but is not its guardian
    _pidfd = None
    _watch_loop = None
    _groups.clear()
    _token = os.urandom(8).hex()
    _seq = itertools.count(1)
    _state.update(ok=True, detail=_IDLE, restarts=0)
    _state.pop("started", None)


os.register_at_fork(after_in_child=_forget_after_fork)

"""Descendants that leave their child's process group: adopted, followed or killed.

``trellis.run`` (and so ``trellis run``) makes its process a *child subreaper*
(``PR_SET_CHILD_SUBREAPER``): an OS process whose parent dies is re-parented to Trellis
instead of to init. So a grandchild that called ``setsid``, or the daemon a program
leaves behind when it daemonizes, becomes a direct child of Trellis. Every OS child
carries ``TRELLIS_TAG=<token>.<n>`` in its environment, which its descendants inherit;
``sweep()`` looks at Trellis's direct children it did not spawn, and SIGKILLs (with their
group) those whose tag belongs to a child that is no longer running, then reaps them.
``left_behind(tag)`` tells a ``Command`` what its exited main process left running (a
daemonizer; with ``pidfile`` it follows the daemon instead).

As PID 1 (a container's init) Trellis also reaps every other zombie re-parented to it,
as tini does, after a grace period that leaves in-process ``subprocess`` users their
own children's exit statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

from . import _guardian

__all__ = ["claim", "disable", "enable", "is_active", "left_behind", "release", "sweep"]

_log = logging.getLogger("trellis")

PR_SET_CHILD_SUBREAPER = 36

_active = False
_pid1 = False
_spawned: set[int] = set()  # OS pids we spawned ourselves (their owner reaps them)
_live_tags: set[str] = set()  # tags of running children: their escapees are theirs
_adopted: dict[int, tuple[int, asyncio.AbstractEventLoop]] = {}  # pid -> (pidfd, loop)
_strays: dict[int, float] = {}  # PID 1: unknown zombie -> first seen
_stray_timer: asyncio.TimerHandle | None = None
_sigchld_loop: asyncio.AbstractEventLoop | None = None
_on_reaped: list[Callable[[int, int], None]] = []
_following = 0  # pidfile children waiting for their daemon
_enabled_at = 0  # when we became a subreaper (clock ticks since boot)
_preexisting: dict[int, int] = {}  # our direct children then: pid -> start ticks
PARENT_VAR = "TRELLIS_PARENT"  # in our environment while adopting: what we start has it


def _prctl_subreaper(on: bool) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return False


def _children_supported() -> bool:
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def enable(loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Make this process a child subreaper (and, as PID 1 or with ``loop`` given from the
    main thread, reap strays on SIGCHLD). Returns whether adoption is active."""
    global _active, _pid1, _sigchld_loop, _polling, _enabled_at
    if not _active:
        if not _children_supported() or not _prctl_subreaper(True):
            _log.warning(
                "cannot become a child subreaper: descendants that leave their child's "
                "group (setsid, daemons) are caught only when Trellis exits"
            )
            return False
        _active = True
        _enabled_at = _now_ticks()
        # our own children from before: never re-parented orphans (pid -> start ticks)
        _preexisting.clear()
        for pid in direct_children():
            started = start_ticks(pid)
            if started is not None:
                _preexisting[pid] = started
        os.environ[PARENT_VAR] = _guardian.token()
    _pid1 = os.getpid() == 1
    if loop is not None and _sigchld_loop is None:
        try:
            loop.add_signal_handler(signal.SIGCHLD, _on_sigchld)
        except (ValueError, RuntimeError, NotImplementedError):
            # uvloop keeps SIGCHLD for libuv: as PID 1, look for strays on a timer instead
            if _pid1:
                _sigchld_loop = loop
                _polling = True
                loop.call_later(_POLL, _poll_strays)
        else:
            _sigchld_loop = loop
    return True


_POLL = 0.5  # seconds between looks for strays when SIGCHLD cannot be had (uvloop)
_polling = False


def _poll_strays() -> None:
    loop = _sigchld_loop
    if not _polling or loop is None or loop.is_closed():
        return
    _on_sigchld()
    loop.call_later(_POLL, _poll_strays)


def disable() -> None:
    """Stop adopting (at the end of ``trellis.run``); kills what was adopted."""
    global _active, _sigchld_loop, _stray_timer, _polling
    if _sigchld_loop is not None:
        if not _polling:
            with contextlib.suppress(ValueError, RuntimeError):
                if not _sigchld_loop.is_closed():
                    _sigchld_loop.remove_signal_handler(signal.SIGCHLD)
        _polling = False
        _sigchld_loop = None
    if _stray_timer is not None:
        _stray_timer.cancel()
        _stray_timer = None
    if _active:
        sweep(everything=True)
        for pid in list(_adopted):
            _reap_adopted(pid, block=True)
        _prctl_subreaper(False)
        _active = False
        os.environ.pop(PARENT_VAR, None)


def is_active() -> bool:
    return _active


def claim(os_pid: int, tag: str | None) -> None:
    """``os_pid`` was spawned by a ``Command`` (tagged ``tag``): its owner reaps it."""
    _spawned.add(os_pid)
    if tag is not None:
        _live_tags.add(tag)


def release(os_pid: int, tag: str | None) -> None:
    """``os_pid`` was reaped; ``tag``'s child is no longer running."""
    _spawned.discard(os_pid)
    if tag is not None:
        _live_tags.discard(tag)


def direct_children() -> list[int]:
    """Our direct children parented by the main thread: every adopted process (the
    kernel re-parents orphans to the subreaper's first live thread, its main thread)
    and everything the loop spawned. One small file read."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children", "rb") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def environ(pid: int) -> bytes | None:
    """``pid``'s environment block (``KEY=VALUE\\0...``), or None if unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return None


def tag_of(pid: int) -> str | None:
    """The ``TRELLIS_TAG`` in ``pid``'s environment, if it is one of ours."""
    env = environ(pid)
    return _tag_in(env) if env is not None else None


def _tag_in(env: bytes) -> str | None:
    key = f"{_guardian.TAG_VAR}={_guardian.token()}.".encode()
    start = env.find(key)
    if start < 0 or (start > 0 and env[start - 1] != 0):
        return None
    end = env.find(b"\0", start)
    return env[start + len(_guardian.TAG_VAR) + 1 : end if end >= 0 else None].decode()


def stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgid, session) of ``pid``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[2]), int(fields[3])


def _now_ticks() -> int:
    """Now, in the clock ticks since boot of ``/proc/PID/stat``'s start times."""
    try:
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return int(uptime * os.sysconf("SC_CLK_TCK"))


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, ``/proc/PID/stat`` field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_spawned(pid: int) -> bool:
    """Whether ``pid`` is a process a ``Command`` spawned or follows (some child's own)."""
    return pid in _spawned or pid in _adopted


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "?"


def _candidates() -> list[int]:
    guardian = _guardian.guardian_pid()
    return [
        p for p in direct_children() if p not in _spawned and p not in _adopted and p != guardian
    ]


def _untagged_escapee(pid: int, pgid: int, env: bytes | None) -> bool:
    """An untagged process re-parented to us that left our process group: a child's
    descendant that cleared or overwrote its environment (``env -i``, ``sudo``,
    ``su -``, a process title set in place), unless a pidfile child is still waiting
    for its daemon (which may be it). Processes our own code started in-process carry
    ``TRELLIS_PARENT`` (from our environment) or stay in our group: never these."""
    if env is None or _following or pgid == os.getpgrp():
        return False
    if pid == _guardian.guardian_pid():
        return False
    if f"\0{PARENT_VAR}=".encode() in b"\0" + env:
        return False
    # before we adopted, no orphan could be re-parented to us; one started in the same
    # clock tick (10 ms) is told apart by whether it was already our child then
    started = start_ticks(pid)
    if started is None or started < _enabled_at:
        return False
    return _preexisting.get(pid) != started


def left_behind(tag: str) -> list[int]:
    """Adopted processes (still running) that carry ``tag``, or no tag at all (see
    :func:`_untagged_escapee`): what a child left behind."""
    if not _active:
        return []
    out = []
    for pid in _candidates():
        st = stat(pid)
        if st is None or st[0] == "Z":
            continue
        env = environ(pid)
        got = _tag_in(env) if env is not None else None
        if got == tag or (got is None and _untagged_escapee(pid, st[1], env)):
            out.append(pid)
    return out


def begin_following() -> None:
    """A pidfile child waits for its daemon: untagged escapees are left alone meanwhile
    (the daemon may have overwritten its environment)."""
    global _following
    _following += 1


def end_following() -> None:
    global _following
    _following -= 1


def kill_tagged(tag: str, rounds: int = 20) -> int:
    """SIGKILL every process whose environment carries exactly ``TRELLIS_TAG=<tag>``
    (with its group when it leads one), scanning ``/proc`` again until a scan finds no
    new one; returns how many. Those that are our direct children are reaped. A whole
    ``/proc`` scan: for rare events (a timed-out health check), not for restarts."""
    mark = f"\0{_guardian.TAG_VAR}={tag}\0".encode()
    me = os.getpid()
    killed: set[int] = set()
    for _ in range(rounds):
        new = 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid == me or pid in killed:
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    env = b"\0" + f.read() + b"\0"
            except OSError:
                continue
            if mark not in env:
                continue
            st = stat(pid)
            if st is not None and st[1] == pid:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
            new += 1
        if not new:
            break
    if killed:
        ours = set(direct_children())
        for pid in killed & ours:
            if pid not in _spawned and pid not in _adopted:
                _track(pid)
    return len(killed)


def adopt(pid: int) -> None:
    """``pid`` (an adopted process) is followed by a ``Command`` now: leave it alone."""
    _spawned.add(pid)


def sweep(everything: bool = False) -> int:
    """SIGKILL adopted processes whose child is gone (all of ours with ``everything``);
    returns how many."""
    if not _active:
        return 0
    n = 0
    for pid in _candidates():
        st = stat(pid)
        if st is None:
            continue
        state, pgid, _sid = st
        if state == "Z":
            continue  # unknown now: a stray (reaped after a grace period, see below)
        env = environ(pid)
        tag = _tag_in(env) if env is not None else None
        if tag is None:
            if not _untagged_escapee(pid, pgid, env):
                continue  # ours (in-process), or maybe a pidfile child's daemon
        elif tag in _live_tags and not everything:
            continue  # it belongs to a child that is still running
        if pgid == pid:  # it leads a group: its group goes with it
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        n += 1
        _track(pid)
    return n


def _track(pid: int) -> None:
    """Reap adopted ``pid`` when it dies (a pidfd on the running loop), then sweep again:
    its own children have just been re-parented to us."""
    try:
        loop = asyncio.get_running_loop()
        fd = os.pidfd_open(pid)
    except (RuntimeError, OSError):
        _reap_adopted(pid, block=True, tracked=False)
        return
    _adopted[pid] = (fd, loop)
    loop.add_reader(fd, _reap_adopted, pid)


def _reap_adopted(pid: int, block: bool = False, tracked: bool = True) -> None:
    entry = _adopted.pop(pid, None)
    if entry is not None:
        fd, loop = entry
        with contextlib.suppress(ValueError, RuntimeError):
            if not loop.is_closed():
                loop.remove_reader(fd)
        os.close(fd)
    deadline = time.monotonic() + (2.0 if block else 0.0)
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if got:
            for cb in _on_reaped:
                cb(pid, status)
            break
        if time.monotonic() >= deadline:
            if not block and tracked:
                _track(pid)  # not dead yet after all
            return
        time.sleep(0.002)
    if tracked:
        sweep()


# -- PID 1: reap everything else --------------------------------------------------


def _on_sigchld() -> None:
    sweep()
    if _pid1:
        # Only as PID 1: elsewhere an unknown zombie may be an in-process child
        # (multiprocessing) whose owner has not polled it yet; its status is not ours.
        _reap_strays()


def _reap_strays() -> None:
    """As PID 1, reap unknown zombies that nobody else reaped within 0.5 s: orphans
    re-parented to us (tini's duty). In-process ``subprocess`` users reap their own at
    once."""
    global _stray_timer
    now = time.monotonic()
    guardian = _guardian.guardian_pid()
    seen = set()
    for pid in direct_children():
        if pid in _spawned or pid in _adopted or pid == guardian:
            continue
        st = stat(pid)
        if st is None or st[0] != "Z":
            continue
        seen.add(pid)
        first = _strays.setdefault(pid, now)
        if now - first >= 0.5:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            _strays.pop(pid, None)
    for pid in list(_strays):
        if pid not in seen:
            del _strays[pid]
    if _strays and _stray_timer is None and _sigchld_loop is not None:
        _stray_timer = _sigchld_loop.call_later(0.6, _stray_tick)


def _stray_tick() -> None:
    global _stray_timer
    _stray_timer = None
    _reap_strays()

"""Processes: asyncio tasks with a FIFO mailbox, links, monitors and exit signals.

Example::

    async def echo():
        while True:
            msg = await trellis.receive()
            msg["reply_to"].send(msg["text"])

    pid = trellis.spawn(echo)
    pid.send({"reply_to": trellis.self(), "text": "hi"})
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import traceback
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Final

from . import _telemetry
from ._clock import current_clock
from ._exceptions import (
    AlreadyRegistered,
    Exited,
    MailboxFull,
    NoProc,
    NotAProcess,
    ReceiveTimeout,
)
from ._reasons import KILL, KILLED, NOPROC, NORMAL, Down, Exit, coerce_reason

__all__ = [
    "Pid",
    "ProcessExit",
    "Ref",
    "Via",
    "current",
    "demonitor",
    "exit",
    "link",
    "live_processes",
    "monitor",
    "receive",
    "register",
    "resolve",
    "self",
    "spawn",
    "unlink",
    "unregister",
    "whereis",
]

_log = logging.getLogger("trellis")

# How long a kill may take before the task is declared unkillable (seconds, on the clock).
KILL_GRACE: float = 1.0

_current: contextvars.ContextVar[Pid | None] = contextvars.ContextVar(
    "trellis_process", default=None
)
_ids = itertools.count(1)
_live: dict[int, Pid] = {}
_names: dict[str, Pid] = {}

# Builds Exit/Down messages without the NamedTuple's Python-level __new__ (hot path).
_new_tuple: Final = tuple.__new__


class ProcessExit(BaseException):
    """Raised inside a process to end it with ``reason`` (``exit(self(), reason)``)."""

    def __init__(self, reason: object) -> None:
        super().__init__(reason)
        self.reason = reason


class ExitWith:
    """Returned by a behaviour's process body to end the process with ``reason``
    (cheaper than raising ``ProcessExit`` on the hot path)."""

    __slots__ = ("reason",)

    def __init__(self, reason: object) -> None:
        self.reason = reason


class Ref:
    """A unique reference, as returned by :func:`monitor`."""

    __slots__ = ("id",)

    def __init__(self) -> None:
        self.id = next(_ids)

    def __repr__(self) -> str:
        return f"#Ref<{self.id}>"


class Via:
    """A name resolved through a registry: ``Via(registry, key)``.

    ``registry`` is a registry (or partition supervisor) pid or registered name.
    """

    __slots__ = ("key", "registry")

    def __init__(self, registry: object, key: object) -> None:
        self.registry = registry
        self.key = key

    def __repr__(self) -> str:
        return f"Via({self.registry!r}, {self.key!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Via) and other.registry == self.registry and other.key == self.key

    def __hash__(self) -> int:
        return hash((Via, repr(self.registry), repr(self.key)))


class Pid:
    """A process: its identity, mailbox, links and monitors.

    ``pid.send(msg)`` puts a message in its mailbox, ``pid.alive`` tells whether
    it runs, ``await pid.join()`` waits for its exit reason.
    """

    __slots__ = (
        "__weakref__",
        "_ack",
        "_bound",
        "_calls",
        "_dead",
        "_deferred",
        "_joiners",
        "_links",
        "_loop",
        "_mbox",
        "_monitoring",
        "_monitors",
        "_parent",
        "_pending_kill",
        "_policy",
        "_running",
        "_server",
        "_space",
        "_task",
        "_waiter",
        "id",
        "name",
        "reason",
        "trap_exits",
    )

    def __init__(self) -> None:
        self.id = next(_ids)
        self.name: object = None
        self.reason: Any = None
        self.trap_exits = False
        self._mbox: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._links: set[Pid] | None = None
        self._monitors: dict[Ref, Pid] | None = None
        self._monitoring: dict[Ref, Pid] | None = None
        self._joiners: list[asyncio.Future[Any]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead = False
        self._running = False
        self._pending_kill: object = None
        self._parent: Pid | None = None
        self._ack: asyncio.Future[Any] | None = None
        self._calls: Any = None
        self._deferred: set[Any] | None = None
        self._server: Any = None
        self._bound: int | None = None
        self._policy = "reject"
        self._space: deque[asyncio.Future[None]] | None = None

    def __repr__(self) -> str:
        name = f" {self.name!r}" if self.name is not None else ""
        return f"<Pid {self.id}{name}{'' if not self._dead else ' dead'}>"

    # -- public ---------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether the process is running."""
        return not self._dead

    def send(self, msg: object) -> None:
        """Put ``msg`` at the end of the mailbox; dropped silently if the process is dead.

        Raises ``MailboxFull`` when the mailbox is bounded, full, and its policy is ``reject``.
        """
        if self._dead:
            return
        if self._bound is not None and len(self._mbox) >= self._bound and not self._overflow():
            return
        self._mbox.append(msg)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def join(self, timeout: float | None = None) -> Any:
        """Wait until the process ends and return its exit reason.

        Raises ``TimeoutError`` if ``timeout`` seconds (on the Trellis clock) pass first.
        """
        if self._dead:
            return self.reason
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self._joiners is None:
            self._joiners = []
        self._joiners.append(fut)
        handle = None
        if timeout is not None:
            handle = current_clock().call_later(timeout, _join_timeout, fut)
        try:
            return await fut
        finally:
            if handle is not None:
                handle.cancel()
            js = self._joiners
            if js is not None and fut in js:
                js.remove(fut)

    @property
    def message_queue_len(self) -> int:
        """How many messages wait in the mailbox."""
        return len(self._mbox)

    # -- internal ---------------------------------------------------------------
    def _deliver(self, msg: object) -> None:
        """Deliver a system message: never refused by a mailbox bound."""
        if self._dead:
            return
        self._mbox.append(msg)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _overflow(self) -> bool:
        """Apply the bound's policy; True if the new message should still be appended."""
        policy = self._policy
        _telemetry.emit("mailbox.overflow", pid=self, policy=policy, size=len(self._mbox))
        if policy == "reject":
            raise MailboxFull(self)
        if policy == "drop_oldest":
            mb = self._mbox
            for i, queued in enumerate(mb):
                if not _protected(queued):
                    del mb[i]
                    return True
        return False  # drop_newest, or nothing droppable: the new message is dropped

    async def _next(self) -> Any:
        """Take the next message, waiting for one."""
        mb = self._mbox
        while not mb:
            w = self._waiter = self._loop.create_future()  # type: ignore[union-attr]
            await w
        msg = mb.popleft()
        if self._space:
            _wake_space(self)
        return msg


def _protected(msg: object) -> bool:
    """Calls, exit signals, monitors and internal system messages are never dropped."""
    return (
        hasattr(msg, "_fut")
        or type(msg) is Exit
        or type(msg) is Down
        or getattr(type(msg), "_trellis_system", False)
    )


def _wake_space(pid: Pid) -> None:
    space = pid._space
    while space:
        f = space.popleft()
        if not f.done():
            f.set_result(None)
            return


def _join_timeout(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("join timed out"))


def _fail_call(msg: object, exc: BaseException) -> None:
    fut = getattr(msg, "_fut", None)
    if isinstance(fut, asyncio.Future) and not fut.done():
        fut.set_exception(exc)


# ---------------------------------------------------------------------------
# spawn, the process runner and process death
# ---------------------------------------------------------------------------


def spawn(
    fn: Callable[..., Coroutine[Any, Any, object]],
    *args: Any,
    link: bool = False,
    trap_exits: bool = False,
    name: str | None = None,
) -> Pid:
    """Start ``fn(*args)`` as a new process and return its pid.

    Example::

        async def worker(n):
            ...
        pid = trellis.spawn(worker, 3, link=True)
    """
    parent = _current.get()
    if link and parent is None:
        raise NotAProcess("spawn(link=True) must be called from a Trellis process")
    pid = _new_pid(trap_exits, Pid, parent if link else None)
    try:
        if name is not None:
            register(name, pid)
        coro = fn(*args)
    except BaseException:
        _live.pop(pid.id, None)  # it never ran: nothing to notify
        raise
    if link:
        _link_pair(parent, pid)  # type: ignore[arg-type]
    _start_task(pid, coro)
    return pid


def _new_pid(trap_exits: bool = False, cls: type[Pid] = Pid, parent: Pid | None = None) -> Pid:
    """A new process record; ``parent`` is the linked starter (None when unlinked)."""
    pid = cls()
    pid.trap_exits = trap_exits
    pid._loop = asyncio.get_running_loop()
    pid._parent = parent
    _live[pid.id] = pid
    return pid


def _start_task(pid: Pid, coro: Coroutine[Any, Any, object]) -> None:
    loop = pid._loop
    assert loop is not None
    if loop.get_task_factory() is None:  # skip create_task's checks on the hot path
        pid._task = asyncio.Task(_run(pid, coro), loop=loop)
    else:
        pid._task = loop.create_task(_run(pid, coro))


async def _run(pid: Pid, coro: Coroutine[Any, Any, object]) -> None:
    pid._running = True
    _current.set(pid)
    if pid._pending_kill is not None:  # killed before it ran a single step
        coro.close()
        _finish(pid, pid._pending_kill)
        return
    external_cancel = False
    try:
        result = await coro
        # behaviours end their process with a reason by returning an ExitWith
        reason: object = result.reason if type(result) is ExitWith else NORMAL
    except asyncio.CancelledError:
        if pid._pending_kill is None:
            external_cancel = True  # e.g. asyncio.run() cancelling leftovers
            reason = KILLED
        else:
            reason = pid._pending_kill
    except ProcessExit as e:
        reason = e.reason
    except (KeyboardInterrupt, SystemExit) as e:
        _finish(pid, e)
        raise
    except BaseException as e:
        reason = e
    if pid._pending_kill is not None:
        reason = pid._pending_kill
    _finish(pid, reason)
    if external_cancel:
        raise asyncio.CancelledError


def _finish(pid: Pid, reason: object) -> None:
    """Mark ``pid`` dead and send its exit to links, monitors, callers and joiners."""
    if pid._dead:
        return
    pid._dead = True
    pid.reason = reason
    if isinstance(reason, BaseException) and reason.__traceback__ is not None:
        # keep the traceback for reports but drop frame locals: a crashed process's
        # frames would otherwise keep it (and everything it held) alive until the GC runs
        traceback.clear_frames(reason.__traceback__)
    _live.pop(pid.id, None)
    name = pid.name
    if type(name) is str and _names.get(name) is pid:
        del _names[name]
    links = pid._links
    if links:
        pid._links = None
        for other in links:
            if other._links is not None:
                other._links.discard(pid)
            _signal(other, pid, reason, True)
    mons = pid._monitors
    if mons:
        pid._monitors = None
        for ref, watcher in mons.items():
            if watcher._monitoring is not None:
                watcher._monitoring.pop(ref, None)
            watcher._deliver(_new_tuple(Down, (ref, pid, reason)))
    watching = pid._monitoring
    if watching:
        pid._monitoring = None
        for ref, target in watching.items():
            if target._monitors is not None:
                target._monitors.pop(ref, None)
    ack = pid._ack
    if ack is not None and not ack.done():
        ack.set_result(("exit", reason))
    if pid._calls is not None or pid._deferred or pid._mbox:
        _fail_pending_calls(pid, reason)
    js = pid._joiners
    if js:
        pid._joiners = None
        for f in js:
            if not f.done():
                f.set_result(reason)
    space = pid._space
    if space:
        for f in space:
            if not f.done():
                f.set_result(None)
    # a dead pid is still referenced (last_pid, messages, events): let go of its state
    pid._server = None
    pid._parent = None
    pid._space = None


def _fail_pending_calls(pid: Pid, reason: object) -> None:
    c = pid._calls
    if c is not None:
        pid._calls = None
        _fail_call(c, Exited(reason, pid))
    deferred = pid._deferred
    if deferred:
        pid._deferred = None
        for c in deferred:
            _fail_call(c, Exited(reason, pid))
    mb = pid._mbox
    if mb:
        for msg in mb:
            if hasattr(msg, "_fut"):
                _fail_call(msg, Exited(reason, pid))
        mb.clear()


def _signal(target: Pid, sender: Pid | None, reason: object, from_link: bool) -> None:
    """Deliver an exit signal per OTP rules."""
    if target._dead:
        return
    if reason is KILL and not from_link:
        _kill(target, KILLED)
        return
    if target.trap_exits:
        target._deliver(_new_tuple(Exit, (sender, reason)))
        return
    if reason is NORMAL:
        if sender is target and not from_link:
            _kill(target, NORMAL)
        return
    _kill(target, reason)


def _kill(target: Pid, reason: object) -> None:
    """End ``target`` with ``reason`` by cancelling its task (a later KILLED overrides)."""
    if target._dead:
        return
    if target._pending_kill is not None and reason is not KILLED:
        return
    target._pending_kill = reason
    if target._running and target._task is not None:
        target._task.cancel()


def force_dead(pid: Pid, reason: object = KILLED) -> None:
    """Declare a process that ignores cancellation dead (its task lives on as a zombie)."""
    if pid._dead:
        return
    _log.error("unkillable process %r did not end when killed; counted as %r", pid, reason)
    _telemetry.emit("process.unkillable", pid=pid, reason=reason)
    _finish(pid, reason)
    if pid._task is not None:
        pid._task.cancel()


async def kill_and_wait(pid: Pid, grace: float | None = None) -> object:
    """Kill ``pid`` (untrappable) and wait for it; an unkillable task is reported and
    counted as killed after ``grace`` seconds instead of hanging the caller."""
    _signal(pid, None, KILL, False)
    try:
        return await pid.join(KILL_GRACE if grace is None else grace)
    except TimeoutError:
        force_dead(pid)
        return pid.reason


# ---------------------------------------------------------------------------
# the public process API
# ---------------------------------------------------------------------------


def current() -> Pid | None:
    """The current process, or None outside one."""
    return _current.get()


def self() -> Pid:
    """The current process; raises ``NotAProcess`` outside one."""
    pid = _current.get()
    if pid is None:
        raise NotAProcess("not inside a Trellis process")
    return pid


def exit(pid: object, reason: object) -> None:
    """Send an exit signal with ``reason`` to ``pid`` (``KILL`` cannot be trapped).

    Inside a process, ``exit(self(), reason)`` ends the caller at once.
    """
    target = resolve(pid)
    reason = coerce_reason(reason)
    me = _current.get()
    if target is None:
        return
    if target is me and (not me.trap_exits or reason is KILL):
        if reason is KILL:
            reason = KILLED
        me._pending_kill = reason
        raise ProcessExit(reason)
    _signal(target, me, reason, False)


def _link_pair(a: Pid, b: Pid) -> None:
    if a._links is None:
        a._links = set()
    if b._links is None:
        b._links = set()
    a._links.add(b)
    b._links.add(a)


def link(pid: object) -> None:
    """Link the current process to ``pid``; a dead ``pid`` sends a ``NOPROC`` exit signal."""
    me = self()
    target = resolve(pid)
    if target is None:
        raise NoProc(pid)
    if target is me:
        return
    if target._dead:
        _signal(me, target, NOPROC, True)
        return
    _link_pair(me, target)


def unlink(pid: object) -> None:
    """Remove the link between the current process and ``pid`` (no-op if none)."""
    me = self()
    target = resolve(pid)
    if target is None:
        return
    if me._links is not None:
        me._links.discard(target)
    if target._links is not None:
        target._links.discard(me)


def monitor(pid: object) -> Ref:
    """Monitor ``pid``: a ``Down(ref, pid, reason)`` message arrives exactly once when it ends."""
    me = self()
    ref = Ref()
    target = resolve(pid)
    if target is None or target._dead:
        me._deliver(Down(ref, target if target is not None else pid, NOPROC))  # type: ignore[arg-type]
        return ref
    if target._monitors is None:
        target._monitors = {}
    target._monitors[ref] = me
    if me._monitoring is None:
        me._monitoring = {}
    me._monitoring[ref] = target
    return ref


def demonitor(ref: Ref) -> bool:
    """Stop a monitor and drop its ``Down`` if already delivered. Returns whether it was active."""
    me = self()
    active = False
    if me._monitoring is not None:
        target = me._monitoring.pop(ref, None)
        if target is not None:
            active = True
            if target._monitors is not None:
                target._monitors.pop(ref, None)
    mb = me._mbox
    for msg in list(mb):
        if type(msg) is Down and msg.ref is ref:
            mb.remove(msg)
    return active


async def receive(timeout: float | None = None, match: Callable[[Any], bool] | None = None) -> Any:
    """Take the next message from the current process's mailbox.

    With ``match``, take the first message for which ``match(msg)`` is true, leaving
    the others in order (a selective receive). Raises ``ReceiveTimeout`` after
    ``timeout`` seconds on the Trellis clock.
    """
    me = self()
    mb = me._mbox
    if match is None and mb:
        return await _take_now(me)
    handle = None
    timed_out = [False]
    if timeout is not None:

        def _expire() -> None:
            timed_out[0] = True
            w = me._waiter
            if w is not None and not w.done():
                w.set_result(None)

        handle = current_clock().call_later(timeout, _expire)
    scanned = 0
    try:
        while True:
            if match is None:
                if mb:
                    return await _take_now(me)
            else:
                while scanned < len(mb):
                    msg = mb[scanned]
                    if match(msg):
                        del mb[scanned]
                        if me._space:
                            _wake_space(me)
                        return msg
                    scanned += 1
            if timed_out[0]:
                raise ReceiveTimeout(f"no message within {timeout}s")
            w = me._waiter = me._loop.create_future()  # type: ignore[union-attr]
            await w
    finally:
        if handle is not None:
            handle.cancel()


async def _take_now(me: Pid) -> Any:
    msg = me._mbox.popleft()
    if me._space:
        _wake_space(me)
    return msg


# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------


def register(name: str, pid: Pid) -> None:
    """Register ``name`` for ``pid`` in the local name table."""
    if not isinstance(name, str):
        raise TypeError(f"a registered name must be a str, not {type(name).__name__}")
    held = _names.get(name)
    if held is not None and not held._dead:
        raise AlreadyRegistered(held, name)
    if pid._dead:
        raise NoProc(pid)
    if pid.name is not None and pid.name != name:
        raise AlreadyRegistered(pid, pid.name)  # one name per process, as in OTP
    _names[name] = pid
    pid.name = name


def unregister(name: str) -> None:
    """Remove ``name`` from the local name table."""
    pid = _names.pop(name, None)
    if pid is not None and pid.name == name:
        pid.name = None


def whereis(name: object) -> Pid | None:
    """The live process registered as ``name`` (a str or a ``Via``), or None."""
    pid = resolve(name)
    return pid if pid is not None and not pid._dead else None


def resolve(target: object) -> Pid | None:
    """Turn a pid, a registered name or a ``Via`` into a pid (None if unknown)."""
    if isinstance(target, Pid):
        return target
    if type(target) is str:
        pid = _names.get(target)
        if pid is not None and pid._dead:
            return None
        return pid
    if type(target) is Via:
        reg = resolve(target.registry)
        if reg is None or reg._dead:
            return None
        lookup = getattr(reg, "_via_whereis", None)
        if lookup is None:
            raise TypeError(f"{target.registry!r} is not a registry")
        result: Pid | None = lookup(target.key)
        return result
    if hasattr(target, "pid") and isinstance(target.pid, Pid):  # handles (e.g. TaskHandle)
        return target.pid
    return None


def live_processes() -> list[Pid]:
    """Every process that has not ended (for leak checks)."""
    return [p for p in _live.values() if not p._dead]

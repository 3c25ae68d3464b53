"""How each fault is done to one running child, and how it is undone.

In-process children get kernel operations: a ``KILL`` exit signal; for a server or
supervisor, the stop request of ``trellis.stop`` carrying the crash reason (it runs
``terminate`` and ends with that reason, exactly as an exception raised in a callback
does) or ``NORMAL``; for a coroutine worker, its task is cancelled with the reason
recorded. ``hang`` and ``slow`` swap the server's mailbox for a :class:`_Valve` that
holds messages back (no hook in the server loop: nothing costs anything when chaos is
off). OS-process children get signals: SIGKILL, SIGABRT, SIGTERM, SIGSTOP/SIGCONT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, SupportsIndex

from .._children import CommandPid
from .._core._clock import Clock, TimerHandle, sleep_on
from .._core._process import Pid, _kill, exit
from .._core._reasons import KILL, NORMAL
from .._server import _StopRequest

__all__ = ["ChaosError", "Target", "Unsupported", "inject"]


class ChaosError(Exception):
    """The exception a ``raise`` fault crashes an in-process child with.

    Example::

        reason = (await cap.wait_for("child.exited"))["reason"]
        assert isinstance(reason, ChaosError)
    """

    def __init__(self, message: str = "injected by chaos", fault: str | None = None) -> None:
        super().__init__(message)
        self.fault = fault


class Unsupported(Exception):
    """This fault cannot be done to this kind of child (the fault is skipped)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A running child picked for a fault."""

    path: str
    pid: Pid
    kind: str  # worker | supervisor | command | server
    os_pid: int | None = None


#: Undoes a fault (awaitable: it may have to wait, e.g. for a duty-cycle task).
Healer = Callable[[], Awaitable[None]]


def kind_of(pid: Pid, child_type: str) -> str:
    """The kind of a running child: supervisor, command, server or worker."""
    if child_type == "supervisor":
        return "supervisor"
    if isinstance(pid, CommandPid):
        return "command"
    if pid._server is not None:
        return "server"
    return "worker"


async def inject(
    fault: str, t: Target, *, clock: Clock, fault_id: str, delay: float | None = None
) -> Healer | None:
    """Do ``fault`` to ``t``; returns how to heal it (None for instant faults).

    Raises ``Unsupported`` or ``ProcessLookupError`` (the OS process is gone).
    """
    if t.kind == "command":
        return _os_fault(fault, t, clock, delay)
    pid = t.pid
    if not pid.alive:
        raise ProcessLookupError(f"{t.path} is not running")
    is_server = pid._server is not None
    if fault == "kill":
        exit(pid, KILL)
        return None
    if fault in ("raise", "exit"):
        reason: object = ChaosError(fault=fault_id) if fault == "raise" else NORMAL
        if is_server:
            # what trellis.stop sends: terminate(reason) runs, then the server ends with
            # `reason`, as after an exception in a callback (or a clean Stop)
            pid._deliver(_StopRequest(reason))
        else:
            _kill(pid, reason)  # the coroutine is cancelled; the process ends with `reason`
        return None
    if fault in ("hang", "slow"):
        if not is_server:
            raise Unsupported(
                f"{fault} needs a server or supervisor (a mailbox loop to hold back); "
                f"{t.path} is a {t.kind}"
            )
        if isinstance(pid._mbox, _Valve):
            raise Unsupported(f"{t.path} is already hung or slowed")
        valve = _Valve.install(pid, delay if fault == "slow" else None, clock)

        async def heal() -> None:
            valve.release()

        return heal
    raise Unsupported(f"{fault} is not a fault against a child")


# ---------------------------------------------------------------------------
# OS processes: signals
# ---------------------------------------------------------------------------


def _signal_group(os_pid: int, sig: int) -> None:
    os.killpg(os_pid, sig)  # a Command child leads its own process group


def _os_fault(fault: str, t: Target, clock: Clock, delay: float | None) -> Healer | None:
    os_pid = t.os_pid
    if os_pid is None or not t.pid.alive:
        raise ProcessLookupError(f"{t.path} has no running OS process")
    if fault == "kill":
        _signal_group(os_pid, signal.SIGKILL)
        return None
    if fault == "raise":
        os.kill(os_pid, signal.SIGABRT)  # an abnormal end of the process itself
        return None
    if fault == "exit":
        # a request to exit, as a supervisor's stop makes it: a program that exits 0 on
        # SIGTERM ends NORMAL, one that dies of it ends Signaled (the report tells which)
        _signal_group(os_pid, signal.SIGTERM)
        return None
    if fault == "hang":
        _signal_group(os_pid, signal.SIGSTOP)

        async def resume() -> None:
            with contextlib.suppress(ProcessLookupError):
                _signal_group(os_pid, signal.SIGCONT)

        return resume
    if fault == "slow":
        assert delay is not None
        task = asyncio.get_running_loop().create_task(_duty_cycle(os_pid, delay, clock))

        async def stop_cycle() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(ProcessLookupError):
                _signal_group(os_pid, signal.SIGCONT)

        return stop_cycle
    raise Unsupported(f"{fault} is not a fault against a child")


async def _duty_cycle(os_pid: int, delay: float, clock: Clock) -> None:
    """Stopped ``delay`` s, running ``delay`` s, until cancelled (then left running)."""
    try:
        while True:
            _signal_group(os_pid, signal.SIGSTOP)
            await sleep_on(clock, delay)
            _signal_group(os_pid, signal.SIGCONT)
            await sleep_on(clock, delay)
    except ProcessLookupError:
        return


# ---------------------------------------------------------------------------
# The valve: a stand-in mailbox for a hung or slowed server
# ---------------------------------------------------------------------------


def _wake(pid: Pid) -> None:
    w = pid._waiter
    if w is not None:
        pid._waiter = None
        if not w.done():
            w.set_result(None)


class _Valve(deque[Any]):
    """Stands in for a server's mailbox while it is hung or slowed.

    Senders append here (the valve is ``pid._mbox``); the server reads only from its
    original deque, which the valve feeds: never (hang), or one message ``delay``
    seconds after each reaches the head (slow). The server loop keeps a reference to
    the original deque, and its wait for a message re-checks whichever deque it holds,
    so reads go to the original either way (``__bool__`` and ``popleft`` forward).
    ``len`` counts both, so mailbox bounds and metrics see every waiting message. When
    the server dies meanwhile, the truth value and iteration cover the held messages,
    so their callers get ``Exited`` at once. :meth:`release` puts everything back.
    """

    def __init__(self, pid: Pid, original: deque[Any], delay: float | None, clock: Clock):
        super().__init__()
        self.pid = pid
        self.original = original
        self.delay = delay
        self.clock = clock
        self.timer: TimerHandle | None = None
        self.released = False

    @classmethod
    def install(cls, pid: Pid, delay: float | None, clock: Clock) -> _Valve:
        original = pid._mbox
        valve = cls(pid, original, delay, clock)
        deque.extend(valve, original)  # what is queued now waits too
        original.clear()
        pid._mbox = valve
        valve._arm()
        return valve

    # -- what senders use -----------------------------------------------------------
    def append(self, msg: Any) -> None:
        if self.released:
            self.original.append(msg)
            return
        deque.append(self, msg)
        self._arm()

    # -- what the server (and process death) reads ------------------------------------
    def __bool__(self) -> bool:
        if self.pid._dead:
            return bool(self.original) or deque.__len__(self) > 0
        return bool(self.original)

    def __len__(self) -> int:
        return len(self.original) + deque.__len__(self)

    def popleft(self) -> Any:
        return self.original.popleft()

    def __iter__(self) -> Iterator[Any]:
        return chain(iter(self.original), deque.__iter__(self))

    def __getitem__(self, i: SupportsIndex) -> Any:  # type: ignore[override]
        i = i.__index__()
        n = len(self.original)
        return self.original[i] if i < n else deque.__getitem__(self, i - n)

    def __delitem__(self, i: SupportsIndex) -> None:  # type: ignore[override]
        i = i.__index__()
        n = len(self.original)
        if i < n:
            del self.original[i]
        else:
            deque.__delitem__(self, i - n)

    def remove(self, msg: Any) -> None:
        try:
            self.original.remove(msg)
        except ValueError:
            deque.remove(self, msg)

    def clear(self) -> None:
        self.original.clear()
        deque.clear(self)

    # -- feeding ------------------------------------------------------------------
    def _arm(self) -> None:
        if self.delay is None or self.timer is not None or not deque.__len__(self):
            return
        self.timer = self.clock.call_later(self.delay, self._feed)

    def _feed(self) -> None:
        self.timer = None
        if self.released or self.pid._dead or not deque.__len__(self):
            return
        self.original.append(deque.popleft(self))
        _wake(self.pid)
        self._arm()

    def release(self) -> None:
        """Give the server back its mailbox, held messages first in line (in order)."""
        if self.released:
            return
        self.released = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.original.extend(deque.__iter__(self))
        deque.clear(self)
        pid = self.pid
        if pid._mbox is self:
            pid._mbox = self.original
        if not pid._dead:
            _wake(pid)

    def __repr__(self) -> str:
        mode = "released" if self.released else "hang" if self.delay is None else "slow"
        return f"<chaos valve {mode} held={deque.__len__(self)} queued={len(self.original)}>"

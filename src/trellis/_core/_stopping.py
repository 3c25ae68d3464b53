"""Whether the tree running in an event loop is stopping.

``trellis.run`` arms a :class:`TreeStop` for its loop and sets it the moment a stop is
requested (a signal, or the control API's stop). Supervisors consult it: once it is
set, a child that exits is recorded and not restarted (a cgroup-wide SIGTERM reaches
every child at once; restarting them would fight the shutdown), and a supervisor still
starting its children cancels the start in progress and starts no more. A loop that no
``trellis.run`` armed never stops this way (plain ``Supervisor.start_link`` keeps OTP's
behaviour).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

__all__ = ["TreeStop", "arm", "disarm", "get"]

# Module flags the restart path reads before anything else (a global and an attribute,
# no call), so that a process with no tree stopping pays nothing for the check:
armed = False
"""Whether :func:`arm` was called (some loop may have a stop flag)."""
requested = False
"""Whether some armed tree is stopping (recomputed by :func:`disarm`)."""


class TreeStop:
    """The stop flag of one loop's tree.

    ``requested`` may be set from a signal handler (it is a plain attribute);
    :meth:`request` also cancels the starts in progress (call it on the loop's
    thread)."""

    __slots__ = ("__weakref__", "_cancelled", "_requested", "loop", "starting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._requested = False
        self.starting: set[asyncio.Task[Any]] = set()
        """Supervisor tasks awaiting a worker's start (a request cancels them)."""
        self._cancelled: set[asyncio.Task[Any]] = set()

    @property
    def requested(self) -> bool:
        """Whether a stop was requested (settable from a signal handler)."""
        return self._requested

    @requested.setter
    def requested(self, value: bool) -> None:
        global requested
        self._requested = value
        if value:
            requested = True

    def request(self) -> None:
        """Mark the tree as stopping and cancel every start in :attr:`starting` (each
        supervisor takes its cancellation back with :meth:`claim`).

        A start that has just finished (its supervisor is about to resume with the new
        pid) is not cancelled: the child is started and is stopped in order, with its
        shutdown, like the others. Only a supervisor still waiting for a start after
        it has run is cancelled."""
        self.requested = True
        for task in list(self.starting):
            if _about_to_run(task):
                self.loop.call_soon(self._cancel_if_starting, task, 3)
            else:
                self._cancel(task)

    def _cancel(self, task: asyncio.Task[Any]) -> None:
        self.starting.discard(task)
        self._cancelled.add(task)
        task.cancel()

    def _cancel_if_starting(self, task: asyncio.Task[Any], tries: int) -> None:
        """Run after ``task``'s pending step: cancel it if it still waits for a start."""
        if task not in self.starting:
            return  # its start finished
        if tries > 0 and _about_to_run(task):
            self.loop.call_soon(self._cancel_if_starting, task, tries - 1)
        else:
            self._cancel(task)

    def claim(self, task: asyncio.Task[Any]) -> bool:
        """Whether :meth:`request` cancelled ``task`` (once: the claim is consumed)."""
        if task in self._cancelled:
            self._cancelled.discard(task)
            return True
        return False


def _about_to_run(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` is scheduled to resume (what it awaited is done)."""
    waiter = getattr(task, "_fut_waiter", None)
    return waiter is None or waiter.done()


_armed: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TreeStop] = weakref.WeakKeyDictionary()


def arm(loop: asyncio.AbstractEventLoop) -> TreeStop:
    """Give ``loop`` a fresh stop flag (``trellis.run`` does this for its tree)."""
    global armed
    stop = _armed[loop] = TreeStop(loop)
    armed = True
    return stop


def disarm(loop: asyncio.AbstractEventLoop, stop: TreeStop) -> None:
    """Forget ``loop``'s stop flag, if it is still ``stop``."""
    global armed, requested
    if _armed.get(loop) is stop:
        del _armed[loop]
    stops = list(_armed.values())
    armed = bool(stops)
    requested = any(s._requested for s in stops)


def get(loop: asyncio.AbstractEventLoop | None) -> TreeStop | None:
    """The stop flag armed for ``loop``, or None."""
    if loop is None or not armed:
        return None
    return _armed.get(loop)

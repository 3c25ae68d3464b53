"""TaskSupervisor: run-to-completion tasks under supervision.

Example::

    tsup = await trellis.TaskSupervisor.start_link(name="tasks")
    handle = await tsup.async_task(fetch, url)
    body = await handle.wait(timeout=10.0)
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from ._childspec import ChildSpec
from ._core._exceptions import CallTimeout, Exited
from ._core._process import (
    Pid,
    Ref,
    _current,
    _link_pair,
    _new_pid,
    _start_task,
    demonitor,
    monitor,
)
from ._core._reasons import NORMAL
from ._server import _start
from ._supervisor import DynamicSupervisor, DynamicSupervisorPid, _DynamicProc

__all__ = ["TaskHandle", "TaskSupervisor", "TaskSupervisorPid"]


class TaskHandle:
    """A task started with ``async_task``/``async_nolink``: ``await handle.wait()``."""

    __slots__ = ("_ref", "_result", "pid")

    def __init__(self, pid: Pid, ref: Ref | None) -> None:
        self.pid = pid
        self._ref = ref
        self._result: list[Any] = []

    async def wait(self, timeout: float | None = 5.0) -> Any:
        """The task's return value. Raises ``Exited(reason)`` if it failed and
        ``CallTimeout`` after ``timeout`` (the task keeps running; nothing is delivered late)."""
        try:
            reason = await self.pid.join(timeout)
        except TimeoutError:
            self._forget()
            raise CallTimeout(self.pid, "task", timeout) from None
        self._forget()
        if reason is NORMAL and self._result:
            return self._result[0]
        raise Exited(reason, self.pid)

    def _forget(self) -> None:
        ref = self._ref
        if ref is not None and _current.get() is not None:
            self._ref = None
            demonitor(ref)

    async def shutdown(self) -> Any:
        """Kill the task and forget it; returns its exit reason."""
        from ._core._process import kill_and_wait

        self._forget()
        return await kill_and_wait(self.pid)


def _start_task_child(
    fn: Callable[..., Coroutine[Any, Any, Any]],
    args: tuple[Any, ...],
    box: list[Any] | None,
    link_to: Pid | None,
) -> Pid:
    parent = _current.get()
    pid = _new_pid(False, Pid, parent)
    if parent is not None:
        _link_pair(parent, pid)
    if link_to is not None and not link_to._dead:
        _link_pair(link_to, pid)
    _start_task(pid, _run_task(fn, args, box))
    return pid


async def _run_task(
    fn: Callable[..., Coroutine[Any, Any, Any]], args: tuple[Any, ...], box: list[Any] | None
) -> None:
    result = await fn(*args)
    if box is not None:
        box.append(result)


class TaskSupervisorPid(DynamicSupervisorPid):
    """The pid of a task supervisor."""

    __slots__ = ()

    async def start_child(
        self,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        *args: Any,
        restart: str = "temporary",
        shutdown: Any = 5.0,
    ) -> Pid:
        """Run ``fn(*args)`` as a child (temporary unless ``restart`` says otherwise)."""
        spec = ChildSpec(
            id="task",
            start=_start_task_child,
            args=(fn, args, None, None),
            restart=restart,
            shutdown=shutdown,
            modules=(getattr(fn, "__module__", "") or "__main__",),
        )
        return await super().start_child(spec)  # type: ignore[no-any-return]

    async def _async(self, fn: Any, args: tuple[Any, ...], link: bool) -> TaskHandle:
        me = _current.get()
        box: list[Any] = []
        spec = ChildSpec(
            id="task",
            start=_start_task_child,
            args=(fn, args, box, me if link else None),
            restart="temporary",
            shutdown=5.0,
            modules=(getattr(fn, "__module__", "") or "__main__",),
        )
        pid = await super().start_child(spec)
        ref = monitor(pid) if me is not None else None
        handle = TaskHandle(pid, ref)
        handle._result = box
        return handle

    async def async_task(
        self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any
    ) -> TaskHandle:
        """Run ``fn(*args)`` linked to and monitored by the caller; ``await handle.wait()``."""
        return await self._async(fn, args, True)

    async def async_nolink(
        self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any
    ) -> TaskHandle:
        """Like :meth:`async_task` but only monitored: a crash does not take the caller down."""
        return await self._async(fn, args, False)

    async def children(self) -> list[Pid]:
        """The pids of the running tasks."""
        return [c.pid for c in await self.which_children() if isinstance(c.pid, Pid)]


class _TaskProc(_DynamicProc):
    _pid_class = TaskSupervisorPid


class TaskSupervisor(DynamicSupervisor):
    """Supervises tasks; ``max_children`` makes further starts raise ``MaxChildren``."""

    @classmethod
    async def start_link(cls, *args: Any, name: object = None, **kwargs: Any) -> Any:
        return await _start(_TaskProc, (cls(), args, kwargs), {}, name, link=True)

    @classmethod
    async def start(cls, *args: Any, name: object = None, **kwargs: Any) -> Any:
        return await _start(_TaskProc, (cls(), args, kwargs), {}, name, link=False)

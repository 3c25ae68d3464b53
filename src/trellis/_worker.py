"""``worker``: a child that is a plain coroutine ("keep this loop running")."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from ._childspec import Backoff, ChildSpec
from ._core._process import Pid, _current, _link_pair, _live, _new_pid, _start_task, register

__all__ = ["worker"]


def worker(
    id: Any,
    coro_fn: Callable[..., Coroutine[Any, Any, object]],
    *args: Any,
    restart: str = "permanent",
    shutdown: Any = 5.0,
    significant: bool = False,
    backoff: Backoff | None = None,
    name: str | None = None,
    trap_exits: bool = False,
    **kwargs: Any,
) -> ChildSpec:
    """A child spec that runs ``coro_fn(*args, **kwargs)`` as a supervised process.

    Returning ends it with ``NORMAL``; raising crashes it (reason: the exception).

    Example::

        async def poll(url):
            while True:
                await fetch(url)
                await asyncio.sleep(1)

        sup = await trellis.Supervisor.start_link([trellis.worker("poller", poll, URL)])
    """
    return ChildSpec(
        id=id,
        start=_start_worker,
        args=(coro_fn, args, kwargs, name, trap_exits),
        restart=restart,
        shutdown=shutdown,
        significant=significant,
        modules=(getattr(coro_fn, "__module__", None) or "__main__",),
        backoff=backoff,
    )


def _start_worker(
    coro_fn: Callable[..., Coroutine[Any, Any, object]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    name: str | None,
    trap_exits: bool,
) -> Pid:
    parent = _current.get()
    pid = _new_pid(trap_exits, Pid, parent)
    try:
        if name is not None:
            register(name, pid)
        coro = coro_fn(*args, **kwargs)
    except BaseException:
        _live.pop(pid.id, None)  # it never ran: nothing to notify
        raise
    if parent is not None:
        _link_pair(parent, pid)
    _start_task(pid, coro)
    return pid

"""``trellis.run``: run a supervision tree as a program."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from ._childspec import ChildSpec
from ._core._process import Pid, kill_and_wait, live_processes
from ._core._reasons import SHUTDOWN, is_clean
from ._server import stop

__all__ = ["run", "run_async"]

_log = logging.getLogger("trellis")


def run(root: Any, *, shutdown_timeout: float | None = None) -> int:
    """Run ``root`` until it ends or SIGTERM/SIGINT arrives; returns the exit code.

    ``root`` is a ``ChildSpec``, a ``Supervisor`` subclass, or a zero-argument
    async callable returning a pid. A signal stops the tree in reverse start
    order and gives 0; a root that gave up (or crashed) gives 1.

    Example::

        import sys, trellis
        sys.exit(trellis.run(lambda: trellis.Supervisor.start_link(children)))
    """
    return asyncio.run(run_async(root, shutdown_timeout=shutdown_timeout))


async def _start_root(root: Any) -> Pid:
    if isinstance(root, ChildSpec):
        r = root.start(*root.args, **root.kwargs)
    elif inspect.isclass(root) and hasattr(root, "start"):
        r = root.start()
    elif callable(root):
        r = root()
    else:
        raise TypeError(f"cannot run {root!r}: give a ChildSpec, a Supervisor class or a callable")
    if inspect.isawaitable(r):
        r = await r
    if isinstance(r, tuple):
        r = r[0]
    if not isinstance(r, Pid):
        raise TypeError(f"the root start returned {r!r}, not a pid")
    return r


async def run_async(root: Any, *, shutdown_timeout: float | None = None) -> int:
    """The coroutine behind :func:`run`, for programs that own their event loop."""
    loop = asyncio.get_running_loop()
    stop_requested: asyncio.Future[int] = loop.create_future()

    def _on_signal(signum: int) -> None:
        _log.info("received %s: shutting down", signal.Signals(signum).name)
        if not stop_requested.done():
            stop_requested.set_result(signum)

    installed: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, _on_signal, int(sig))
            installed.append(int(sig))
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    try:
        pid = await _start_root(root)
        ended = asyncio.ensure_future(pid.join())
        await asyncio.wait([ended, stop_requested], return_when=asyncio.FIRST_COMPLETED)
        if not ended.done():
            try:
                await stop(pid, SHUTDOWN, timeout=shutdown_timeout)
            except TimeoutError:
                _log.error("root %r did not stop within %ss; killing it", pid, shutdown_timeout)
                await kill_and_wait(pid)
            except Exception as e:  # the root ended differently while stopping
                _log.error("root %r stopped with %r", pid, e)
            await ended
            code = 0
        else:
            reason = ended.result()
            gave_up = bool(getattr(pid, "gave_up", False))
            code = 0 if is_clean(reason) and not gave_up else 1
            if code:
                _log.error("root %r ended with %r (gave_up=%s)", pid, reason, gave_up)
        return code
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        for leftover in live_processes():
            await kill_and_wait(leftover)


RootFactory = Callable[[], Awaitable[Pid]]

"""``trellis.run``: run a supervision tree as a program."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ._children import _orphans
from ._childspec import ChildSpec
from ._core import _stopping, _telemetry
from ._core._process import Pid, kill_and_wait, live_processes
from ._core._reasons import SHUTDOWN, is_clean
from ._server import stop

__all__ = ["LOOPS", "Extension", "loop_factory", "run", "run_async"]

_log = logging.getLogger("trellis")


class Extension(Protocol):
    """Something that runs beside a tree in the same event loop (journal, metrics,
    control API): ``start`` before the root starts, ``tree_started`` once it runs
    (``request_stop()`` then shuts the tree down as SIGTERM would), ``stop`` after the
    tree has stopped (flush here). Extensions start in order and stop in reverse. An
    extension may also define ``async tree_stopping()``, awaited (in reverse order)
    just before a signal or ``request_stop()`` stops a running tree, and ``async
    sighup()``, called on SIGHUP (without one, SIGHUP is logged and ignored)."""

    async def start(self) -> None: ...

    async def tree_started(self, root: Pid, request_stop: Callable[[], None]) -> None: ...

    async def stop(self) -> None: ...


def run(
    root: Any,
    *,
    shutdown_timeout: float | None = None,
    hard_exit_after: float = 30.0,
    blocked_warning: float = 5.0,
    extensions: Sequence[Extension] = (),
    loop: str = "asyncio",
) -> int:
    """Run ``root`` until it ends or SIGTERM/SIGINT arrives; returns the exit code.

    ``root`` is a ``ChildSpec``, a ``Supervisor`` subclass, or a zero-argument
    async callable returning a pid. A signal stops the tree in reverse start
    order and gives 0; a root that gave up (or crashed) gives 1.

    A watchdog thread guards what asyncio cannot: it logs the stack of any task
    that blocks the event loop for ``blocked_warning`` seconds, and if a
    shutdown has not finished ``hard_exit_after`` seconds after the signal (or a
    second signal arrives) it exits the process with code 1 instead of hanging.

    ``extensions`` (see :class:`Extension`) run beside the tree in its event loop.

    ``loop`` is ``"asyncio"`` (the standard library's) or ``"uvloop"`` (the optional
    ``uvloop`` package: ``pip install 'trellis-otp[uvloop]'``); :func:`loop_factory`
    raises ``ValueError`` for another name or a missing package.

    Example::

        import sys, trellis
        sys.exit(trellis.run(lambda: trellis.Supervisor.start_link(children)))
    """
    factory = loop_factory(loop)
    watchdog = _Watchdog(hard_exit_after, blocked_warning)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(
                run_async(
                    root,
                    shutdown_timeout=shutdown_timeout,
                    extensions=extensions,
                    _watchdog=watchdog,
                )
            )
    finally:
        watchdog.close()


#: The event loops ``trellis run --loop`` and ``trellis.run(loop=...)`` know.
LOOPS = ("asyncio", "uvloop")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event-loop factory for ``name`` (None: the standard library's default).

    Example::

        with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner: ...
    """
    if name == "asyncio":
        return None
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ValueError(
                "loop 'uvloop' needs the uvloop package: pip install 'trellis-otp[uvloop]'"
            ) from None
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    raise ValueError(f"unknown event loop {name!r}: use one of {', '.join(LOOPS)}")


class _Watchdog:
    """A thread that notices a blocked event loop and a shutdown that cannot finish."""

    def __init__(self, hard_exit_after: float, blocked_warning: float) -> None:
        self.hard_exit_after = hard_exit_after
        self.blocked_warning = blocked_warning
        self.stop_requested = threading.Event()
        self.closed = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.main_ident = threading.get_ident()
        self.signals = 0
        self.thread = threading.Thread(target=self._watch, name="trellis-watchdog", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread.start()

    def close(self) -> None:
        self.closed.set()

    def on_signal(self) -> None:
        """Called from the signal handler in the main thread."""
        self.signals += 1
        if self.signals > 1:
            self._hard_exit("a second signal arrived during shutdown")
        self.stop_requested.set()

    def _stack(self) -> str:
        frame = sys._current_frames().get(self.main_ident)
        return "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)"

    def _ping(self, timeout: float) -> bool:
        """Whether the loop runs a callback within ``timeout`` seconds."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return True
        done = threading.Event()
        try:
            loop.call_soon_threadsafe(done.set)
        except RuntimeError:  # loop closed meanwhile
            return True
        return done.wait(timeout)

    def _watch(self) -> None:
        deadline: float | None = None
        clock = __import__("time").monotonic
        while not self.closed.is_set():
            if self.stop_requested.is_set() and deadline is None:
                deadline = clock() + self.hard_exit_after
            wait = self.blocked_warning
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - clock()))
            # idle: one ping per `blocked_warning` (a few wakeups a minute, no busy timer)
            if self.closed.wait(wait if deadline is None else min(1.0, wait)):
                return
            if not self._ping(self.blocked_warning) and not self.closed.is_set():
                _log.error(
                    "event loop blocked for over %ss by:\n%s", self.blocked_warning, self._stack()
                )
            if deadline is not None and clock() >= deadline and not self.closed.is_set():
                self._hard_exit(f"shutdown did not finish within {self.hard_exit_after}s")

    def _hard_exit(self, why: str) -> None:
        _log.critical("%s; exiting now. Main thread stack:\n%s", why, self._stack())
        logging.shutdown()
        os._exit(1)


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


async def _start_unless_stopped(root: Any, stop_requested: asyncio.Future[int]) -> Pid | None:
    """Start the root; None if a stop request ended the start first. Supervisors see the
    tree stopping: they cancel the start in progress, start no more children and stop
    those started, in reverse order. Any other root's start is cancelled."""
    start = asyncio.ensure_future(_start_root(root))
    try:
        await asyncio.wait((start, stop_requested), return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            if not _cancels_own_start(root):
                start.cancel()
            await asyncio.wait((start,))
    except BaseException:
        start.cancel()
        raise
    if stop_requested.done() and (start.cancelled() or start.exception() is not None):
        _log.info("stopped while starting: children not yet started were never started")
        return None
    return start.result()


def _cancels_own_start(root: Any) -> bool:
    """Whether ``root`` (maybe) starts supervisors, which cancel their own starts in
    order; cancelling them from outside would kill their children abruptly."""
    from ._childspec import ChildType
    from ._supervisor import DynamicSupervisor, Supervisor

    if isinstance(root, ChildSpec):
        return ChildType(root.type) is ChildType.SUPERVISOR
    if inspect.isclass(root):
        return issubclass(root, Supervisor | DynamicSupervisor)
    return True  # a callable: whatever it starts, supervisors inside cancel their starts


async def run_async(
    root: Any,
    *,
    shutdown_timeout: float | None = None,
    extensions: Sequence[Extension] = (),
    _watchdog: _Watchdog | None = None,
) -> int:
    """The coroutine behind :func:`run`, for programs that own their event loop
    (signal handling, no watchdog thread)."""
    loop = asyncio.get_running_loop()
    stop_requested: asyncio.Future[int] = loop.create_future()
    # run() owns the process: adopt escaped descendants (setsid, daemons) and reap
    # orphans, as PID 1 too (see _children/_orphans.py)
    adopting = _watchdog is not None and _orphans.enable(loop)
    # Supervisors consult it: once a stop is requested nothing restarts, and pending
    # starts are cancelled (see _core/_stopping.py).
    tree_stop = _stopping.arm(loop)

    def _on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        _log.info("received %s: shutting down", name)
        tree_stop.request()
        if not stop_requested.done():
            _telemetry.emit(
                "operator.action",
                who=f"signal:{name}",
                action="stop_tree",
                target=None,
                source="signal",
                result="ok",
            )
            stop_requested.set_result(signum)

    def _raw_handler(signum: int, _frame: object) -> None:
        # A plain handler runs between bytecodes even while a task blocks the loop.
        tree_stop.requested = True  # before any child exit this signal causes is handled
        if _watchdog is not None:
            _watchdog.on_signal()
        loop.call_soon_threadsafe(_on_signal, signum)

    started: list[Extension] = []
    hup_tasks: set[asyncio.Future[Any]] = set()

    def _on_hup() -> None:
        # SIGHUP reloads (an extension with ``async sighup()``, as trellis run's
        # reloader); it never stops the tree.
        handlers = [h for h in (getattr(e, "sighup", None) for e in started) if h is not None]
        if not handlers:
            _log.warning("received SIGHUP: nothing to reload here; ignored")
            _telemetry.emit(
                "operator.action",
                who="signal:SIGHUP",
                action="reload",
                target=None,
                source="signal",
                result="ignored: no tree file to reload",
            )
            return
        _log.info("received SIGHUP: reloading")
        for handler in handlers:
            task = asyncio.ensure_future(handler())
            hup_tasks.add(task)
            task.add_done_callback(hup_tasks.discard)

    def _raw_hup(signum: int, _frame: object) -> None:
        loop.call_soon_threadsafe(_on_hup)

    installed: list[tuple[int, Any]] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            installed.append((sig, signal.signal(sig, _raw_handler)))
        installed.append((signal.SIGHUP, signal.signal(signal.SIGHUP, _raw_hup)))
    if _watchdog is not None:
        _watchdog.start(loop)

    def _request_stop() -> None:
        tree_stop.request()
        if not stop_requested.done():
            stop_requested.set_result(0)

    try:
        for ext in extensions:
            await ext.start()
            started.append(ext)
        pid = await _start_unless_stopped(root, stop_requested)
        if pid is None:
            return 0  # stopped during the start: what had started is stopped
        for ext in extensions:
            await ext.tree_started(pid, _request_stop)
        ended = asyncio.ensure_future(pid.join())
        await asyncio.wait([ended, stop_requested], return_when=asyncio.FIRST_COMPLETED)
        if not ended.done():
            for ext in reversed(started):
                stopping = getattr(ext, "tree_stopping", None)
                if stopping is not None:
                    try:
                        await stopping()
                    except Exception:
                        _log.exception("extension %r failed before the tree stopped", ext)
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
        _stopping.disarm(loop, tree_stop)
        for signum, previous in installed:
            signal.signal(signum, previous)
        for leftover in live_processes():
            await kill_and_wait(leftover)
        if adopting:
            _orphans.disable()
        for ext in reversed(started):
            try:
                await ext.stop()
            except Exception:
                _log.exception("extension %r failed to stop", ext)

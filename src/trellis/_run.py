"""``trellis.run``: run a supervision tree as a program."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from bisect import bisect_left
from collections import deque
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
    lag_threshold: float | None = 0.1,
) -> int:
    """Run ``root`` until it ends or SIGTERM/SIGINT arrives; returns the exit code.

    ``root`` is a ``ChildSpec``, a ``Supervisor`` subclass, or a zero-argument
    async callable returning a pid. A signal stops the tree in reverse start
    order and gives 0; a root that gave up (or crashed) gives 1.

    A watchdog guards what asyncio cannot: it measures the event loop's lag
    continuously (how late a timer every ``min(0.1, lag_threshold)`` seconds runs;
    ``trellis.metrics`` exports it as ``trellis_event_loop_lag_seconds``), emits
    ``loop.blocked`` (duration, task, stack of what blocked it, taken by a thread while
    the loop is stuck; at most 10 a minute) when that timer runs ``lag_threshold``
    seconds late (``None``: no lag monitor), logs the stack of any task that blocks
    the event loop for ``blocked_warning`` seconds, and if a
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
    if lag_threshold is not None:
        if isinstance(lag_threshold, bool) or not isinstance(lag_threshold, int | float):
            raise TypeError(f"run(lag_threshold=...) must be seconds, not {lag_threshold!r}")
        if not lag_threshold > 0:
            raise ValueError(f"run(lag_threshold=...) must be > 0 seconds, not {lag_threshold!r}")
        lag_threshold = float(lag_threshold)
    watchdog = _Watchdog(hard_exit_after, blocked_warning, lag_threshold)
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


class LoopLag:
    """How late one event loop runs callbacks, as the watchdog of :func:`run` measures it
    (plain numbers; observers such as ``trellis.metrics`` read them at scrape time).

    ``counts``/``sum``: a histogram of every lag sample (bucket bounds
    :data:`LAG_BUCKETS`, then +Inf; not cumulative); ``last``: the last sample;
    ``blocked``: how many times the loop was blocked past the threshold (reported or
    rate-limited).
    """

    __slots__ = ("blocked", "counts", "last", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(_LAG_BOUNDS)
        self.sum = 0.0
        self.last = 0.0
        self.blocked = 0

    def observe(self, lag: float) -> None:
        self.counts[bisect_left(_LAG_BOUNDS, lag)] += 1
        self.sum += lag
        self.last = lag


#: Upper bounds (seconds) of the loop-lag histogram buckets (then +Inf).
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LAG_BOUNDS = (*LAG_BUCKETS, math.inf)
_loop_lags: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLag] = (
    weakref.WeakKeyDictionary()
)


def loop_lag(loop: asyncio.AbstractEventLoop) -> LoopLag | None:
    """The :class:`LoopLag` of a loop run by :func:`run` (None: no watchdog measures it)."""
    return _loop_lags.get(loop)


#: At most this many ``loop.blocked`` events a minute; the next one says how many
#: were left out (``suppressed``).
BLOCKED_PER_MINUTE = 10
_STACK_FRAMES = 25  # the innermost frames kept in a loop.blocked stack


class _Watchdog:
    """A thread that measures the event loop's lag, reports what blocks it, and notices
    a shutdown that cannot finish.

    The loop measures its own lag: a timer every ``lag_interval`` seconds notes how late
    it ran (:class:`LoopLag`) and when (the heartbeat). The thread looks at the
    heartbeat every ``lag_interval / 2`` seconds: when it is ``lag_threshold`` seconds
    overdue, the loop is blocked right now, and the thread takes the stack of the
    loop's thread and the running task (the culprit is running then). When the loop
    comes back, its timer emits ``loop.blocked`` with the duration (how late the timer
    ran), the threshold, the task and that stack (at most :data:`BLOCKED_PER_MINUTE` a
    minute). Past ``blocked_warning`` seconds the thread also logs the full stack as an
    error. Nothing crosses threads while the loop is healthy: no wake-ups of the loop
    from the thread, no locks.
    """

    def __init__(
        self, hard_exit_after: float, blocked_warning: float, lag_threshold: float | None = 0.1
    ) -> None:
        self.hard_exit_after = hard_exit_after
        self.blocked_warning = blocked_warning
        if lag_threshold is None:  # no lag monitor: only the blocked_warning check
            self.lag_threshold = math.inf
            self.lag_interval = max(0.05, blocked_warning / 2)
        else:
            self.lag_threshold = lag_threshold
            self.lag_interval = min(0.1, lag_threshold)
        self.lag = LoopLag()
        self.stop_requested = threading.Event()
        self.closed = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.main_ident = threading.get_ident()
        self.signals = 0
        self.beat = 0.0  # when the loop's timer last ran (monotonic)
        self.due = 0.0  # when it is due next
        # what the thread caught during a block: (the heartbeat then, task, stack)
        self.caught: tuple[float, str | None, str] | None = None
        self.reported: deque[float] = deque()  # when the last loop.blocked were emitted
        self.suppressed = 0
        self.thread = threading.Thread(target=self._watch, name="trellis-watchdog", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the loop's thread."""
        self.loop = loop
        self.main_ident = threading.get_ident()  # the loop's thread
        _loop_lags[loop] = self.lag
        self.beat = time.monotonic()
        self.due = self.beat + self.lag_interval
        loop.call_later(self.lag_interval, self._tick)
        self.thread.start()

    def close(self) -> None:
        self.closed.set()

    def on_signal(self) -> None:
        """Called from the signal handler in the main thread."""
        self.signals += 1
        if self.signals > 1:
            self._hard_exit("a second signal arrived during shutdown")
        self.stop_requested.set()

    # -- on the loop ------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        lag = max(0.0, now - self.due)
        before = self.beat
        self.beat = now
        self.due = now + self.lag_interval
        loop = self.loop
        if loop is not None and not self.closed.is_set():
            loop.call_later(self.lag_interval, self._tick)
        self.lag.observe(lag)
        if lag >= self.lag_threshold:
            caught, self.caught = self.caught, None
            if caught is not None and caught[0] == before:
                self._blocked(lag, caught[1], caught[2])
            else:
                self._blocked(lag, None, None)

    def _blocked(self, lag: float, task: str | None, stack: str | None) -> None:
        """Report a block: a ``loop.blocked`` event, rate-limited."""
        self.lag.blocked += 1
        now = time.monotonic()
        reported = self.reported
        while reported and reported[0] <= now - 60.0:
            reported.popleft()
        if len(reported) >= BLOCKED_PER_MINUTE:
            self.suppressed += 1
            return
        reported.append(now)
        suppressed, self.suppressed = self.suppressed, 0
        if stack is None:
            stack = "(not caught: the loop came back before the watchdog looked)"
        _log.warning(
            "event loop blocked for %.3fs (threshold %ss) by %s:\n%s",
            lag,
            self.lag_threshold,
            task or "a callback",
            stack,
        )
        _telemetry.emit(
            "loop.blocked",
            duration=round(lag, 6),
            threshold=self.lag_threshold,
            task=task,
            stack=stack,
            suppressed=suppressed,
        )

    # -- on the watchdog's thread -------------------------------------------------------
    def _stack(self, limit: int | None = None) -> str:
        frame = sys._current_frames().get(self.main_ident)
        if frame is None:
            return "(no stack)"
        frames = list(traceback.extract_stack(frame))
        if limit is not None:
            frames = frames[-limit:]
        return "".join(traceback.format_list(frames))

    def _task(self) -> str | None:
        """The task the loop runs now (None: a plain callback, or nothing)."""
        loop = self.loop
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None:
            return None
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", None) or repr(coro)
        try:  # the Trellis process the task runs, if any (read while the loop is stuck)
            pid = next((p for p in live_processes() if p._task is task), None)
        except RuntimeError:  # the table changed meanwhile
            pid = None
        return f"{task.get_name()} ({name}){'' if pid is None else f' of {pid!r}'}"

    def _watch(self) -> None:
        deadline: float | None = None
        clock = time.monotonic
        warned_at = 0.0  # the heartbeat of the block already logged as an error
        look = self.lag_interval / 2
        while not self.closed.is_set():
            if self.stop_requested.is_set() and deadline is None:
                deadline = clock() + self.hard_exit_after
            wait = look if deadline is None else max(0.0, min(look, deadline - clock()))
            if self.closed.wait(wait):
                return
            loop = self.loop
            if loop is not None and loop.is_running():
                beat, due = self.beat, self.due
                late = clock() - due
                if late >= self.lag_threshold:  # blocked right now
                    caught = self.caught
                    if caught is None or caught[0] != beat:
                        self.caught = (beat, self._task(), self._stack(_STACK_FRAMES))
                if late >= self.blocked_warning and warned_at != beat:
                    warned_at = beat
                    _log.error(
                        "event loop blocked for over %ss by:\n%s",
                        self.blocked_warning,
                        self._stack(),
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

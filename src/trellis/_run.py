"""``trellis.run``: run a supervision tree as a program."""

from __future__ import annotations

import asyncio
import contextlib
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
from types import FrameType
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

    A watchdog thread guards what asyncio cannot: it measures the event loop's lag
    (while the loop is busy, how late a callback it sends every
    ``min(0.1, lag_threshold)`` seconds runs; while the loop waits for I/O or a timer
    the lag is 0 and the thread sleeps with it, so an idle tree costs nothing;
    ``trellis.metrics`` exports it as ``trellis_event_loop_lag_seconds``), emits
    ``loop.blocked`` (duration, task, stack of what blocked it, taken by the thread
    while the loop is stuck; at most 10 a minute) when that callback runs
    ``lag_threshold`` seconds late (``None``: no lag monitor), logs the stack of any
    task that blocks the event loop for ``blocked_warning`` seconds, and if a
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

    ``counts``/``sum``: a histogram of lag samples, one per ``interval`` seconds (bucket
    bounds :data:`LAG_BUCKETS`, then +Inf; not cumulative): while the loop waits for I/O
    or a timer a sample is 0 (a callback would run at once), while it is busy it is how
    late a callback the watchdog sent it ran; ``last``: the last timed sample;
    ``blocked``: how many times the loop was blocked past the threshold (reported or
    rate-limited).
    """

    __slots__ = ("_counts", "_idle", "_idle_since", "blocked", "interval", "last", "sum")

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._counts = [0] * len(_LAG_BOUNDS)  # written on the loop's thread only
        self._idle = 0.0  # idle samples (0 s) so far, written by the watchdog's thread only
        self._idle_since: float | None = None  # the loop has waited since then (monotonic)
        self.sum = 0.0
        self.last = 0.0
        self.blocked = 0

    @property
    def counts(self) -> list[int]:
        counts = list(self._counts)
        idle, since = self._idle, self._idle_since
        if since is not None:
            idle += (time.monotonic() - since) / self.interval
        counts[0] += int(idle)
        return counts

    def observe(self, lag: float) -> None:
        self._counts[bisect_left(_LAG_BOUNDS, lag)] += 1
        self.sum += lag
        self.last = lag

    def _waiting(self, since: float | None, now: float) -> None:
        """The watchdog's thread: the loop waits since ``since`` (None: it stopped at ``now``)."""
        before = self._idle_since
        if before is not None:
            self._idle += (now - before) / self.interval
        self._idle_since = since


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
#: The longest the watchdog sleeps while an asyncio loop waits (the loop wakes it);
#: then it looks whether the loop still waits.
_PARK_MAX = 5.0
#: epoll_wait, epoll_pwait and epoll_pwait2 (Linux), by machine: uvloop waits in one
_EPOLL_WAITS = {"x86_64": (232, 281, 441), "aarch64": (22, 441)}.get(os.uname().machine, ())
_ASYNC_CODE = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _driver_frame(frame: FrameType | None) -> FrameType | None:
    """The frame that runs the event loop, seen from a coroutine running in it: the first
    frame outside coroutines (with uvloop, whose loop is C, the caller of
    ``run_until_complete``)."""
    while frame is not None and not frame.f_code.co_flags & _ASYNC_CODE:
        frame = frame.f_back
    while frame is not None and frame.f_code.co_flags & _ASYNC_CODE:
        frame = frame.f_back
    return frame


class _Watchdog:
    """A thread that measures the event loop's lag, reports what blocks it, and notices
    a shutdown that cannot finish; it costs an idle loop nothing.

    While the loop is busy, the thread looks every ``lag_interval`` seconds and times a
    callback it sends the loop (``call_soon_threadsafe``): when that callback is
    ``lag_threshold`` seconds late, the loop is blocked right now, and the thread takes
    the stack of the loop's thread and the running task (the culprit is running then).
    When the loop comes back, the callback emits ``loop.blocked`` with the duration (how
    late it ran), the threshold, the task and that stack (at most
    :data:`BLOCKED_PER_MINUTE` a minute). Past ``blocked_warning`` seconds the thread
    also logs the full stack as an error.

    When it sees the loop wait (the loop thread's Python stack shows nothing but the
    loop's own wait for I/O or a timer), the thread sleeps too, and wakes with the loop,
    which it then times at once; the time waited counts in :class:`LoopLag` as
    zero-lag samples. With asyncio the loop wakes it: the loop's ``_process_events``,
    the first thing it does after its wait, is swapped for :meth:`_hook` while the
    thread sleeps. uvloop waits in C and has no such step: there the thread looks
    every interval, without waking the loop while it waits (a wake-up it could miss
    would delay the report of a block, and the report is the point).
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
        self.lag = LoopLag(self.lag_interval)
        self.stop_requested = threading.Event()
        self.closed = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.main_ident = threading.get_ident()
        self.signals = 0
        self.sent = 0  # the last callback the thread sent the loop (a count)
        self.sent_at = 0.0  # when (monotonic)
        self.answered = 0  # the last one the loop ran
        self.answered_at = 0.0  # when
        # what the thread caught during a block: (the callback then, task, stack)
        self.caught: tuple[int, str | None, str] | None = None
        self.reported: deque[float] = deque()  # when the last loop.blocked were emitted
        self.suppressed = 0
        self.driver: FrameType | None = None  # uvloop: the frame on top while it waits
        self.wake_fds: tuple[int, int] | None = None  # a pipe that wakes the thread
        self.can_park = False  # True: the loop wakes the thread (asyncio, see _hook)
        self.hookable = False  # asyncio: the loop wakes the thread (see _hook)
        self.hooked = False  # the hook is in place
        self.woke = False  # the hook ran
        self.prev_events: Callable[[Any], Any] | None = None  # a wrapper the hook keeps
        self.main_tid = 0  # the loop thread's kernel id (uvloop: /proc tells its wait)
        self.thread = threading.Thread(target=self._watch, name="trellis-watchdog", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the loop's thread, from a coroutine the loop runs."""
        self.loop = loop
        self.main_ident = threading.get_ident()  # the loop's thread
        self.main_tid = threading.get_native_id()
        _loop_lags[loop] = self.lag
        if isinstance(loop, asyncio.BaseEventLoop):
            # asyncio's selector loop says itself when it wakes (see _hook). (Never
            # touch the loop's __dict__ here: a materialized instance dict slows every
            # attribute access of the loop by about a tenth.)
            self.hookable = hasattr(type(loop), "_process_events")
            self.can_park = self.hookable
        else:  # uvloop: waits in C
            self.driver = _driver_frame(sys._getframe(1))
        self.wake_fds = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread.start()

    def close(self) -> None:
        self.closed.set()
        self._wake()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(5.0)
        fds, self.wake_fds = self.wake_fds, None
        if fds is not None and not self.thread.is_alive():
            for fd in fds:
                os.close(fd)

    def on_signal(self) -> None:
        """Called from the signal handler in the main thread."""
        self.signals += 1
        if self.signals > 1:
            self._hard_exit("a second signal arrived during shutdown")
        self.stop_requested.set()
        self._wake()

    def _wake(self) -> None:
        fds = self.wake_fds
        if fds is not None:
            with contextlib.suppress(OSError):
                os.write(fds[1], b"x")

    # -- on the loop ------------------------------------------------------------------
    def _answer(self, n: int, sent_at: float) -> None:
        """The callback the thread sent: how late it ran is a lag sample."""
        now = time.monotonic()
        lag = now - sent_at
        self.answered_at = now
        self.answered = n
        self.lag.observe(lag)
        if lag >= self.lag_threshold:
            caught, self.caught = self.caught, None
            if caught is not None and caught[0] == n:
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

    def _hook(self, event_list: Any) -> Any:
        """asyncio: in place of the loop's ``_process_events`` while the thread sleeps,
        so the loop's first step after its wait (I/O or a timer) wakes the thread."""
        loop = self.loop
        prev = self.prev_events
        if self.hooked:
            self.hooked = False
            self.woke = True
            self._restore()
            self._wake()
        if prev is not None:  # someone else's wrapper was there: it still runs
            return prev(event_list)
        process: Callable[[Any, Any], Any] = type(loop)._process_events  # type: ignore[union-attr]
        return process(loop, event_list)

    def _install_hook(self) -> bool:
        """Put :meth:`_hook` in place of the loop's ``_process_events``, keeping a wrapper
        another library set on the loop (called by the hook, put back after it)."""
        loop = self.loop
        current = getattr(loop, "_process_events", None)
        own = getattr(current, "__func__", None) is type(loop)._process_events  # type: ignore[union-attr]
        self.prev_events = None if own or current is None or current == self._hook else current
        self.woke = False
        self.hooked = True
        try:
            loop._process_events = self._hook  # type: ignore[union-attr]
        except AttributeError:  # a loop with __slots__: the thread looks every interval
            self.hooked = False
            return False
        return True

    def _restore(self) -> None:
        loop = self.loop
        prev, self.prev_events = self.prev_events, None
        with contextlib.suppress(AttributeError):
            if prev is not None:
                loop._process_events = prev  # type: ignore[union-attr]
            else:
                del loop._process_events  # type: ignore[union-attr]

    def _unhook(self) -> None:
        if self.hooked:
            self.hooked = False
            self._restore()

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

    def _looks_idle(self) -> bool:
        """Whether no Python code runs on the loop's thread but the loop's own wait."""
        top = sys._current_frames().get(self.main_ident)
        if top is None:
            return False
        if self.driver is not None:  # uvloop: nothing above the caller of the loop, and
            # the thread in epoll_wait (a C callback that blocks has no frame of its own)
            return top is self.driver and self._in_epoll_wait()
        back = top.f_back  # asyncio: selectors' select(), called by _run_once()
        return back is not None and back.f_code is _RUN_ONCE and top.f_code.co_name == "select"

    def _in_epoll_wait(self) -> bool:
        """Whether the loop's thread waits in epoll (``/proc/self/task/TID/syscall``);
        False when it cannot be told, so the loop is then timed as if busy."""
        if not _EPOLL_WAITS:
            return False
        try:
            fd = os.open(f"/proc/self/task/{self.main_tid}/syscall", os.O_RDONLY)
            try:
                first = os.read(fd, 64).split(b" ", 1)[0]
            finally:
                os.close(fd)
            return int(first) in _EPOLL_WAITS
        except (OSError, ValueError):  # no /proc, or "running"
            return False

    def _ping(self, now: float) -> None:
        loop = self.loop
        if loop is None:
            return
        self.sent += 1
        self.sent_at = now
        try:
            loop.call_soon_threadsafe(self._answer, self.sent, now)
        except RuntimeError:  # the loop closed meanwhile
            self.answered = self.sent

    def _watch(self) -> None:
        import select

        fds = self.wake_fds
        assert fds is not None
        wake_r = fds[0]
        awake = select.poll()  # the thread looks every interval, or sleeps until woken
        awake.register(wake_r, select.POLLIN)
        self._loop_watch(awake, wake_r)

    def _loop_watch(self, awake: Any, wake_r: int) -> None:
        clock = time.monotonic
        interval = self.lag_interval
        park_max = _PARK_MAX
        deadline: float | None = None
        warned = 0  # the callback whose block was logged as an error
        park_until: float | None = None  # parked: until then at most (inf: no timer)
        lag = self.lag
        while not self.closed.is_set():
            if self.stop_requested.is_set() and deadline is None:
                deadline = clock() + self.hard_exit_after
            now = clock()
            wait = interval if park_until is None else min(park_until - now, park_max)
            if deadline is not None:
                wait = min(wait, deadline - now)
            events = awake.poll(max(0, math.ceil(wait * 1000)))
            if any(fd == wake_r for fd, _ in events):
                with contextlib.suppress(OSError):
                    os.read(wake_r, 512)
            if self.closed.is_set():
                self._unhook()
                return
            now = clock()
            if deadline is not None and now >= deadline:
                self._hard_exit(f"shutdown did not finish within {self.hard_exit_after}s")
            loop = self.loop
            if loop is None or not loop.is_running():
                if park_until is not None:
                    park_until = None
                    self._unhook()
                    lag._waiting(None, now)
                continue
            if park_until is not None:
                woke = self.woke or any(fd != wake_r for fd, _ in events) or now >= park_until
                if not woke and not self.stop_requested.is_set() and self._looks_idle():
                    continue  # the longest sleep, or a spurious wake: still waiting
                park_until = None  # the loop has woken (or may have): time it
                self._unhook()
                lag._waiting(None, now)
                self._ping(now)
                continue
            if self.answered != self.sent:  # the loop has not run the last callback yet
                late = now - self.sent_at
                if late >= self.lag_threshold:  # blocked right now
                    caught = self.caught
                    if caught is None or caught[0] != self.sent:
                        self.caught = (self.sent, self._task(), self._stack(_STACK_FRAMES))
                if late >= self.blocked_warning and warned != self.sent:
                    warned = self.sent
                    _log.error(
                        "event loop blocked for over %ss by:\n%s",
                        self.blocked_warning,
                        self._stack(),
                    )
                continue
            if not self._looks_idle():
                self._ping(now)  # busy: time a callback
                continue
            if not self.can_park:  # the loop waits (a zero-lag sample); look again later
                lag._idle += 1
                continue
            if self.hookable:  # asyncio: the loop will wake the thread
                if not self._install_hook():
                    self.hookable = self.can_park = False
                    continue
                if not self._looks_idle():  # it moved on meanwhile
                    self._unhook()
                    self._ping(now)
                    continue
                park_until = math.inf
                lag._waiting(now, now)
                continue

    def _hard_exit(self, why: str) -> None:
        _log.critical("%s; exiting now. Main thread stack:\n%s", why, self._stack())
        logging.shutdown()
        os._exit(1)


_RUN_ONCE = asyncio.BaseEventLoop._run_once.__code__  # type: ignore[attr-defined]


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

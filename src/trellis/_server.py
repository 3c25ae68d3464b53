"""Server: OTP's gen_server on a Trellis process.

Example::

    class Counter(trellis.Server):
        async def init(self, start=0):
            self.n = start

        async def handle_call(self, request, caller):
            if request == "get":
                return self.n

        async def handle_cast(self, msg):
            self.n += msg

    pid = await Counter.start_link(5, name="counter")
    trellis.cast("counter", 1)
    assert await trellis.call("counter", "get") == 6
    await trellis.stop(pid)

Callback contract (every callback is ``async``):

==================  ==============================================================
``init(*args)``     ``None`` (started), ``Continue(x)``, ``IGNORE`` or ``Stop(reason)``
``handle_call``     the reply value, ``Reply(v)``, ``NoReply()`` (reply later with
                    ``caller.reply(v)``), ``Continue(x, reply=v)``, ``Stop(reason, reply=v)``
``handle_cast``     ``None``, ``Continue(x)`` or ``Stop(reason)``
``handle_info``     same as ``handle_cast``; gets plain messages, ``Down`` and ``Exit``
``handle_continue`` same as ``handle_cast``; runs before any queued message
``terminate``       cleanup; runs on ``Stop``, a callback exception, ``stop()``, and an
                    exit signal from the parent only when ``trap_exits`` is set
==================  ==============================================================
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Coroutine
from typing import Any, ClassVar

from ._core import _clock
from ._core._exceptions import (
    AlreadyRegistered,
    AlreadyStarted,
    BadReturnValue,
    CallingSelf,
    CallTimeout,
    ChildSpecError,
    Exited,
    NoProc,
    StartError,
    SupervisorFlagsError,
)
from ._core._process import (
    ExitWith,
    Pid,
    ProcessExit,
    Via,
    _current,
    _kill,
    _link_pair,
    _live,
    _run,
    _wake_space,
    register,
    resolve,
)
from ._core._reasons import IGNORE, KILLED, NORMAL, Exit, coerce_reason, is_clean

__all__ = [
    "Caller",
    "Continue",
    "NoReply",
    "Reply",
    "Server",
    "Stop",
    "call",
    "cast",
    "send",
    "stop",
]

_log = logging.getLogger("trellis")


# ---------------------------------------------------------------------------
# Callback return values
# ---------------------------------------------------------------------------


class _Directive:
    __slots__ = ()


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


class NoReply(_Directive):
    """From ``handle_call``: no reply now; the server replies later with ``caller.reply(v)``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NoReply()"


class Reply(_Directive):
    """From ``handle_call``: reply ``value`` (needed only when the value is itself a directive)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Reply({self.value!r})"


class Continue(_Directive):
    """Run ``handle_continue(arg)`` before any other message (after replying ``reply``)."""

    __slots__ = ("arg", "reply")

    def __init__(self, arg: Any = None, *, reply: Any = _UNSET) -> None:
        self.arg = arg
        self.reply = reply

    def __repr__(self) -> str:
        return f"Continue({self.arg!r})"


class Stop(_Directive):
    """Stop the server with ``reason`` (after ``terminate``); from ``handle_call`` also reply."""

    __slots__ = ("reason", "reply")

    def __init__(self, reason: Any = NORMAL, reply: Any = _UNSET) -> None:
        self.reason = coerce_reason(reason)
        self.reply = reply

    def __repr__(self) -> str:
        return f"Stop({self.reason!r})"


# ---------------------------------------------------------------------------
# Mailbox envelopes
# ---------------------------------------------------------------------------


class Caller:
    """The caller of a ``handle_call``: ``caller.reply(value)`` answers it (once)."""

    __slots__ = ("_fut", "_owner", "_st", "pid", "request", "t0")

    _owner: Pid | None
    _st: CallStats | None
    t0: float

    def __init__(self, request: Any, fut: asyncio.Future[Any], pid: Pid | None) -> None:
        self.request = request
        self._fut = fut
        self.pid = pid

    def reply(self, value: Any) -> None:
        """Send the reply; a reply to a caller that timed out is dropped."""
        f = self._fut
        ok = not f.done()
        if ok:
            f.set_result(value)
        owner: Pid | None = getattr(self, "_owner", None)
        if owner is not None:
            self._owner = None
            if owner._deferred is not None:
                owner._deferred.discard(self)
            st = getattr(self, "_st", None)
            if st is not None:  # a deferred call of a server that counts its calls
                self._st = None
                st._record(self, ok)

    def __repr__(self) -> str:
        return f"<Caller {self.pid!r}>"


class _CastTag:
    """Casts travel as ``(_CAST, msg)``: a tuple is the cheapest envelope."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<cast>"


_CAST = _CastTag()


class _StopRequest:
    __slots__ = ("reason",)
    _trellis_system = True

    def __init__(self, reason: Any) -> None:
        self.reason = reason


class _Stopping(Exception):
    """Internal: unwinds the server loop into the terminate path."""

    def __init__(self, reason: Any) -> None:
        self.reason = reason


_OK = object()


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------


class Server:
    """Base class of a gen_server. Subclass it and override the callbacks you need.

    Class attributes: ``trap_exits`` (bool), ``mailbox_size`` (int bound or None)
    and ``mailbox_policy`` (``"reject"``, ``"drop_oldest"`` or ``"drop_newest"``).
    Inside callbacks, ``self.pid`` is the server's own pid.
    """

    trap_exits: ClassVar[bool] = False
    mailbox_size: ClassVar[int | None] = None
    mailbox_policy: ClassVar[str] = "reject"
    _pid_class: ClassVar[type[Pid]] = Pid
    _raise_stop_reason: ClassVar[bool] = False

    pid: Pid

    # -- callbacks ----------------------------------------------------------------
    async def init(self, *args: Any, **kwargs: Any) -> Any:
        """Set up state. Return None, ``Continue(x)``, ``IGNORE`` or ``Stop(reason)``."""
        if args or kwargs:
            raise TypeError(f"{type(self).__name__}.init takes no arguments; override init")
        return None

    async def handle_call(self, request: Any, caller: Caller) -> Any:
        """Answer a ``call``: return the reply (see the module docs for other returns)."""
        raise NotImplementedError(f"{type(self).__name__} got an unexpected call: {request!r}")

    async def handle_cast(self, msg: Any) -> Any:
        """Handle a ``cast``."""
        raise NotImplementedError(f"{type(self).__name__} got an unexpected cast: {msg!r}")

    async def handle_info(self, msg: Any) -> Any:
        """Handle any other message (``Down``, ``Exit``, plain ``send``)."""
        _log.warning("%s %r received an unexpected message: %r", type(self).__name__, self.pid, msg)
        return None

    async def handle_continue(self, arg: Any) -> Any:
        """Run after a callback returned ``Continue(arg)``, before any queued message."""
        raise NotImplementedError(
            f"{type(self).__name__} returned Continue without handle_continue"
        )

    async def terminate(self, reason: Any) -> None:
        """Clean up before the server ends with ``reason``."""
        return None

    # -- starting -------------------------------------------------------------------
    @classmethod
    def start_link(cls, *args: Any, name: object = None, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """Start the server linked to the calling process; returns its pid after ``init``.

        Returns ``IGNORE`` if ``init`` returned it. Raises ``StartError`` (``.reason``),
        ``AlreadyStarted`` (name taken) or ``BadReturnValue``.
        """
        return _start(cls, args, kwargs, name, link=True)

    @classmethod
    def start(cls, *args: Any, name: object = None, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """Like :meth:`start_link` without the link."""
        return _start(cls, args, kwargs, name, link=False)

    @classmethod
    def child_spec(
        cls,
        *args: Any,
        id: Any = None,
        restart: str = "permanent",
        shutdown: Any = None,
        significant: bool = False,
        backoff: Any = None,
        name: object = None,
        **kwargs: Any,
    ) -> Any:
        """A ``ChildSpec`` that starts this server with ``start_link(*args, **kwargs)``.

        Example::

            spec = Counter.child_spec(0, id="counter", restart="transient", shutdown=10.0)
        """
        from ._childspec import ChildSpec

        if name is not None:
            kwargs = {**kwargs, "name": name}
        return ChildSpec(
            id=cls.__name__ if id is None else id,
            start=cls.start_link,
            args=args,
            kwargs=kwargs,
            restart=restart,
            shutdown=shutdown,
            type=cls._child_type(),
            significant=significant,
            modules=(cls.__module__,),
            backoff=backoff,
        )

    @classmethod
    def _child_type(cls) -> str:
        return "worker"


async def _start(
    cls: type[Server], args: tuple[Any, ...], kwargs: dict[str, Any], name: object, link: bool
) -> Any:
    parent = _current.get()
    if parent is None:
        link = False
    if name is not None:
        held = resolve(name)
        if held is not None and not held._dead:
            raise AlreadyStarted(held)
    if cls.mailbox_size is not None and cls.mailbox_policy not in (
        "reject",
        "drop_oldest",
        "drop_newest",
    ):
        raise ValueError(f"invalid mailbox_policy: {cls.mailbox_policy!r}")
    # _new_pid and _start_task, inlined (this runs on every spawn and restart)
    loop = asyncio.get_running_loop()
    pid = cls._pid_class()
    pid.trap_exits = cls.trap_exits
    pid._loop = loop
    if link:
        pid._parent = parent
    _live[pid.id] = pid
    if cls.mailbox_size is not None:
        pid._bound = cls.mailbox_size
        pid._policy = cls.mailbox_policy
    ack: asyncio.Future[Any] = loop.create_future()
    pid._ack = ack
    if link:
        _link_pair(parent, pid)  # type: ignore[arg-type]
    run = _run(pid, _serve(pid, cls, args, kwargs, name))
    if loop.get_task_factory() is None:  # skip create_task's checks
        pid._task = asyncio.Task(run, loop=loop)
    else:
        pid._task = loop.create_task(run)
    try:
        res = await ack
    except asyncio.CancelledError:
        # the starter gave up (e.g. wait_for): the half-started server must not live on
        _unlink_parent(pid)
        _kill(pid, KILLED)
        raise
    if res is _OK:
        return pid
    kind, val = res
    if kind == "ignore":
        return IGNORE
    if kind == "already":
        raise AlreadyStarted(val)
    if isinstance(val, StartError):
        raise val
    if cls._raise_stop_reason and isinstance(val, ChildSpecError | SupervisorFlagsError):
        raise val
    if isinstance(val, BaseException):
        raise StartError(val) from val
    raise StartError(val)


def _register_name(name: object, pid: Pid) -> None:
    if type(name) is str:
        register(name, pid)
    elif type(name) is Via:
        reg = resolve(name.registry)
        if reg is None:
            raise NoProc(name.registry)
        reg._via_register(name.key, pid)  # type: ignore[attr-defined]
        pid.name = name
    else:
        raise TypeError(f"a server name must be a str or Via, not {name!r}")


def _unlink_parent(pid: Pid) -> None:
    parent = pid._parent
    if parent is not None and pid._links is not None and parent in pid._links:
        pid._links.discard(parent)
        if parent._links is not None:
            parent._links.discard(pid)


def _fail_start(pid: Pid, kind: str, val: Any) -> None:
    _unlink_parent(pid)
    ack = pid._ack
    pid._ack = None
    if ack is not None and not ack.done():
        ack.set_result((kind, val))


async def _serve(
    pid: Pid, cls: type[Server], args: tuple[Any, ...], kwargs: dict[str, Any], name: object
) -> ExitWith | None:
    server = cls()
    server.pid = pid
    pid._server = server
    if name is not None:
        try:
            _register_name(name, pid)
        except AlreadyRegistered as e:
            _fail_start(pid, "already", e.pid)
            return None
        except Exception as e:  # a bad name or registry: a failed start, not a crash
            _fail_start(pid, "error", e)
            return ExitWith(e)
    try:
        if cls.init is Server.init and not args and not kwargs:
            r = None  # nothing to initialise: skip a coroutine on every (re)start
        else:
            r = await server.init(*args, **kwargs)
    except Exception as e:
        _fail_start(pid, "error", e)
        return ExitWith(e)
    if r is None or type(r) is Continue:
        pass
    elif r is IGNORE:
        _fail_start(pid, "ignore", None)
        return ExitWith(NORMAL)
    elif type(r) is Stop:
        _fail_start(pid, "stop", r.reason)
        return ExitWith(r.reason)
    else:
        err = BadReturnValue(r, " from init")
        _fail_start(pid, "error", err)
        return ExitWith(err)
    ack = pid._ack
    pid._ack = None
    if ack is not None and not ack.done():
        ack.set_result(_OK)
    # RED counts: only while an observer asked for them (see enable_call_stats)
    st = _new_call_stats(pid) if _call_stats_users else None
    try:
        if type(r) is Continue:
            await _continue_loop(server, r.arg)
        # The message loop is inlined here: one coroutine frame less on every message.
        mb = pid._mbox
        loop: asyncio.AbstractEventLoop = pid._loop  # type: ignore[assignment]
        parent = pid._parent
        handle_call = server.handle_call
        handle_cast = server.handle_cast
        handle_info = server.handle_info
        burst = 0
        while True:
            if mb and not pid._space:
                burst += 1
                if burst > _FAIR_BURST:  # a busy mailbox still lets other tasks run
                    burst = 0
                    await asyncio.sleep(0)
                    continue
                msg = mb.popleft()
            else:
                burst = 0
                # Pid._next inlined: no coroutine per wait (an idle server's stack is
                # one frame shorter, and every message to an idle server saves one)
                while not mb:
                    w = pid._waiter = loop.create_future()
                    await w
                msg = mb.popleft()
                if pid._space:
                    _wake_space(pid)
            t = type(msg)
            if t is Caller:
                pid._calls = msg
                r = await handle_call(msg.request, msg)
                if isinstance(r, _Directive):
                    await _call_directive(pid, server, msg, r)
                    if st is not None:
                        _directive_done(pid, st, msg)
                else:
                    f = msg._fut
                    if not f.done():
                        f.set_result(r)
                        if st is not None:  # inlined: the counted call path
                            try:
                                d = _perf() - msg.t0
                            except AttributeError:  # made before counting began
                                st.untimed += 1
                            else:
                                st.counts[
                                    0 if d < _CALL_FIRST else bisect_left(_CALL_BOUNDS, d)
                                ] += 1
                                st.sum += d
                    elif st is not None:  # replied already, or the caller gave up
                        st._record(msg, not f.cancelled() and f.exception() is None)
                pid._calls = None
            elif t is tuple and len(msg) == 2 and msg[0] is _CAST:
                r = await handle_cast(msg[1])
                if r is not None:
                    await _after(server, r, "handle_cast")
            elif t is _StopRequest or (
                t is Exit and msg.pid is parent and parent is not None and pid.trap_exits
            ):
                raise _Stopping(msg.reason)
            else:
                r = await handle_info(msg)
                if r is not None:
                    await _after(server, r, "handle_info")
    except _Stopping as s:
        reason = s.reason
        stopping: _Stopping | None = s
    except (asyncio.CancelledError, ProcessExit):
        if st is not None:
            _calls_ended(pid, st)
        raise
    except Exception as e:
        reason = e
        stopping = None
    if cls.terminate is not Server.terminate:
        try:
            await server.terminate(reason)
        except Exception as e:
            reason = e
    if isinstance(stopping, _StoppingWithReply):
        stopping.caller.reply(stopping.reply)
    if st is not None:
        _calls_ended(pid, st)
    if not is_clean(reason) and _log.isEnabledFor(logging.ERROR):
        _crash_report(pid, cls, reason)
    return ExitWith(reason)


# ---------------------------------------------------------------------------
# RED: per-server call counts, kept only while an observer asks for them
# ---------------------------------------------------------------------------

#: Upper bounds (seconds) of the call-duration histogram buckets (then +Inf).
CALL_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_CALL_BOUNDS = (*CALL_BUCKETS, math.inf)
_CALL_FIRST = CALL_BUCKETS[0]  # most calls: no bisection
_perf = time.perf_counter


class CallStats:
    """What one server process did with its calls: plain numbers the server loop bumps
    (no locks, no labels, no telemetry) and an observer (``trellis.metrics``) reads
    and sums per child at scrape time.

    :attr:`calls`: calls the server took from its mailbox, plus calls still in its
    mailbox when it ended. ``errors``: those of them that got no reply from the server:
    the handler raised (the server crashed), the server ended before replying (killed,
    stopped, a deferred caller left unanswered, a call still queued), or the reply came
    after the caller had given up (``CallTimeout``, cancelled). ``counts`` and ``sum``:
    a histogram (bucket bounds :data:`CALL_BUCKETS`, then +Inf; not cumulative) of the
    time from ``call()`` to the reply or failure, the wait in the mailbox included;
    ``untimed``: calls made before counting began (counted, not timed). ``ended``: the
    server has ended and these numbers are final.
    """

    __slots__ = ("counts", "ended", "errors", "sum", "untimed")

    def __init__(self) -> None:
        self.errors = 0
        self.untimed = 0
        self.counts = [0] * len(_CALL_BOUNDS)
        self.sum = 0.0
        self.ended = False

    @property
    def calls(self) -> int:
        """Calls counted (timed or not)."""
        return sum(self.counts) + self.untimed

    def _record(self, caller: Caller, ok: bool) -> None:
        if not ok:
            self.errors += 1
        try:
            d = _perf() - caller.t0
        except AttributeError:  # made before counting began
            self.untimed += 1
            return
        self.counts[bisect_left(_CALL_BOUNDS, d)] += 1
        self.sum += d


_call_stats_users = 0
_call_stats: weakref.WeakKeyDictionary[Pid, CallStats] = weakref.WeakKeyDictionary()


def enable_call_stats() -> None:
    """Count calls (RED) in servers started from now on, until as many
    :func:`disable_call_stats` (observers call these; the metrics layer does)."""
    global _call_stats_users
    _call_stats_users += 1


def disable_call_stats() -> None:
    """Undo one :func:`enable_call_stats` (servers already counting go on counting)."""
    global _call_stats_users
    _call_stats_users = max(0, _call_stats_users - 1)


def call_stats(pid: Pid) -> CallStats | None:
    """The :class:`CallStats` of a server process, or None if it does not count calls."""
    return _call_stats.get(pid)


def _new_call_stats(pid: Pid) -> CallStats:
    st = _call_stats[pid] = CallStats()
    return st


def _directive_done(pid: Pid, st: CallStats, msg: Caller) -> None:
    f = msg._fut
    if f.done():
        st._record(msg, not f.cancelled() and f.exception() is None)
    elif pid._deferred is not None and msg in pid._deferred:
        msg._st = st  # counted when it is answered (Caller.reply) or the server ends


def _calls_ended(pid: Pid, st: CallStats) -> None:
    """Count the calls the ending server leaves without a reply (they fail with
    ``Exited``); a ``Stop(reason, reply=v)`` caller was answered: a success."""
    c = pid._calls
    if c is not None:
        f = c._fut
        c._st = None
        st._record(c, f.done() and not f.cancelled() and f.exception() is None)
    if pid._deferred:
        for d in list(pid._deferred):
            if d is not c:
                d._st = None
                st._record(d, False)
    for m in pid._mbox:
        if type(m) is Caller:
            st._record(m, False)
    st.ended = True


def _crash_report(pid: Pid, cls: type[Server], reason: Any) -> None:
    exc = reason if isinstance(reason, BaseException) else None
    _log.error("crash_report: %s %r exited with reason %r", cls.__name__, pid, reason, exc_info=exc)


async def _continue_loop(server: Server, arg: Any) -> None:
    while True:
        r = await server.handle_continue(arg)
        if r is None:
            return
        t = type(r)
        if t is Continue:
            arg = r.arg
        elif t is Stop:
            raise _Stopping(r.reason)
        else:
            raise BadReturnValue(r, " from handle_continue")


async def _after(server: Server, r: Any, where: str) -> None:
    t = type(r)
    if t is Continue:
        await _continue_loop(server, r.arg)
    elif t is Stop:
        raise _Stopping(r.reason)
    else:
        raise BadReturnValue(r, f" from {where}")


# Messages a server may take in a row without giving other tasks a turn.
_FAIR_BURST = 64


async def _call_directive(pid: Pid, server: Server, caller: Caller, r: _Directive) -> None:
    t = type(r)
    if t is Reply:
        caller.reply(r.value)  # type: ignore[attr-defined]
    elif t is NoReply:
        _defer(pid, caller)
    elif t is Continue:
        assert isinstance(r, Continue)
        if r.reply is not _UNSET:
            caller.reply(r.reply)
        else:
            _defer(pid, caller)
        await _continue_loop(server, r.arg)
    elif t is Stop:
        assert isinstance(r, Stop)
        if r.reply is not _UNSET:
            # OTP runs terminate before replying; the reply is sent once terminate returns.
            raise _StoppingWithReply(r.reason, caller, r.reply)
        raise _Stopping(r.reason)


def _defer(pid: Pid, caller: Caller) -> None:
    """Remember a caller the server will answer later, so its death fails the call."""
    if not caller._fut.done():
        caller._owner = pid
        if pid._deferred is None:
            pid._deferred = set()
        pid._deferred.add(caller)


class _StoppingWithReply(_Stopping):
    def __init__(self, reason: Any, caller: Caller, reply: Any) -> None:
        super().__init__(reason)
        self.caller = caller
        self.reply = reply


# ---------------------------------------------------------------------------
# call / cast / stop / send
# ---------------------------------------------------------------------------


class _Deadlines:
    """Call timeouts without a timer per call.

    Calls with the same timeout expire in the order they were made, so each
    distinct timeout keeps a FIFO of ``(deadline, reply future)`` and one timer
    armed for the oldest entry. Finished calls are dropped from the head as new
    ones arrive, so the queue holds roughly the calls still in flight.
    """

    __slots__ = ("armed", "call_later", "entries", "now", "owner", "timeout")

    def __init__(self, owner: Any, clock: Any, timeout: float) -> None:
        self.owner = owner
        self.timeout = timeout
        src = clock if clock is not None else owner  # a Clock, or the event loop itself
        self.now = src.now if clock is not None else src.time
        self.call_later = src.call_later
        self.entries: deque[tuple[float, asyncio.Future[Any], Any, Any]] = deque()
        self.armed = False

    def add(self, fut: asyncio.Future[Any], target: Any, request: Any) -> None:
        entries = self.entries
        while entries and entries[0][1].done():
            entries.popleft()
        entries.append((self.now() + self.timeout, fut, target, request))
        if not self.armed:
            self.armed = True
            self.call_later(self.timeout, self._fire)

    def _fire(self) -> None:
        entries = self.entries
        now = self.now()
        while entries:
            deadline, fut, target, request = entries[0]
            if fut.done():
                entries.popleft()
            elif deadline <= now:
                entries.popleft()
                fut.set_exception(CallTimeout(target, request, self.timeout))
            else:
                self.call_later(deadline - now, self._fire)
                return
        self.armed = False


_deadlines: dict[tuple[int, float], _Deadlines] = {}
_last_deadlines: list[_Deadlines | None] = [None]
_MAX_TIMEOUT_CLASSES = 256


def _deadlines_for(owner: Any, clock: Any, timeout: float) -> _Deadlines | None:
    key = (id(owner), timeout)
    dl = _deadlines.get(key)
    if dl is None or dl.owner is not owner:
        if len(_deadlines) >= _MAX_TIMEOUT_CLASSES:
            _deadlines.clear()  # owners (loops, clocks) come and go in tests; start afresh
        dl = _deadlines[key] = _Deadlines(owner, clock, timeout)
    _last_deadlines[0] = dl
    return dl


async def call(target: object, request: Any, timeout: float | None = 5.0) -> Any:
    """Send ``request`` to a server and wait for its reply.

    ``target`` is a pid, a registered name or a ``Via``. Raises ``CallTimeout``
    (the server keeps running; a late reply is dropped), ``NoProc``,
    ``CallingSelf`` or ``Exited`` (the server died before replying).

    Example::

        n = await trellis.call("counter", "get", timeout=1.0)
    """
    pid = target if type(target) is Pid else resolve(target)
    if pid is None or pid._dead:
        raise NoProc(target)
    me = _current.get()
    if pid is me:
        raise CallingSelf(f"{target!r} called itself")
    fut: asyncio.Future[Any] = pid._loop.create_future()  # type: ignore[union-attr]
    msg = Caller(request, fut, me)
    if _call_stats_users:
        msg.t0 = _perf()
    if timeout is not None:
        clock = _clock._override
        owner = clock if clock is not None else pid._loop
        dl = _last_deadlines[0]
        if dl is None or dl.owner is not owner or dl.timeout != timeout:
            dl = _deadlines_for(owner, clock, timeout)
        dl.add(fut, target, request)  # type: ignore[union-attr]
    if pid._bound is not None:
        try:
            await _put_with_backpressure(pid, msg, fut)
        except BaseException:
            fut.cancel()  # nobody will await it: no late CallTimeout on it
            raise
    else:
        pid._mbox.append(msg)
        w = pid._waiter
        if w is not None:
            pid._waiter = None
            if not w.done():
                w.set_result(None)
    return await fut


async def _put_with_backpressure(pid: Pid, msg: Caller, reply: asyncio.Future[Any]) -> None:
    """Wait until the bounded mailbox has room (or the call timed out), then enqueue."""
    bound = pid._bound
    assert bound is not None
    while len(pid._mbox) >= bound and not pid._dead and not reply.done():
        space: asyncio.Future[None] = pid._loop.create_future()  # type: ignore[union-attr]
        if pid._space is None:
            pid._space = deque()
        pid._space.append(space)

        def _wake(_: object, space: asyncio.Future[None] = space) -> None:
            if not space.done():
                space.set_result(None)

        reply.add_done_callback(_wake)
        try:
            await space
        except BaseException:
            if space.done() and not space.cancelled():
                _wake_space(pid)  # we were handed the free slot: pass it on
            space.cancel()
            raise
        finally:
            reply.remove_done_callback(_wake)
    if reply.done():
        return
    if pid._dead:
        raise Exited(pid.reason, pid)  # it died while we waited for room
    pid._deliver(msg)


def cast(target: object, msg: Any) -> None:
    """Send ``msg`` to a server's ``handle_cast`` without waiting (silent if it is gone)."""
    pid = target if type(target) is Pid else resolve(target)
    if pid is None or pid._dead:
        return
    if pid._bound is not None:
        pid.send((_CAST, msg))
        return
    pid._mbox.append((_CAST, msg))
    w = pid._waiter
    if w is not None:
        pid._waiter = None
        if not w.done():
            w.set_result(None)


def send(target: object, msg: Any) -> None:
    """Send a plain message (to ``handle_info``); raises ``NoProc`` for an unknown name."""
    pid = target if type(target) is Pid else resolve(target)
    if pid is None:
        raise NoProc(target)
    pid.send(msg)


async def stop(target: object, reason: Any = NORMAL, timeout: float | None = None) -> None:
    """Stop a server: it runs ``terminate(reason)`` and exits; returns when it is gone.

    Raises ``NoProc`` for a dead server, ``CallingSelf`` for the caller itself,
    ``Exited`` if it ended with a different reason (e.g. ``terminate`` raised),
    and ``TimeoutError`` after ``timeout``.
    """
    pid = resolve(target)
    if pid is None or pid._dead:
        raise NoProc(target)
    if pid is _current.get():
        raise CallingSelf(f"{target!r} tried to stop itself")
    reason = coerce_reason(reason)
    if pid._server is not None:
        pid._deliver(_StopRequest(reason))
    else:
        _kill(pid, reason)
    got = await pid.join(timeout)
    if got is not reason and got != reason:
        raise Exited(got, target)

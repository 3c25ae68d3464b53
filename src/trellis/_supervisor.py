"""Supervisor and DynamicSupervisor: OTP's supervisor on a Trellis server.

Example::

    sup = await trellis.Supervisor.start_link(
        [Counter.child_spec(0, id="counter")], strategy="one_for_one", intensity=3, period=5.0
    )
    pid = (await sup.which_children())[0].pid
    trellis.exit(pid, "boom")                 # crash it...
    ...                                       # ...and the supervisor starts a new one
    await sup.stop()

Strategies: ``one_for_one`` restarts the failed child; ``one_for_all`` stops the
others (reverse start order) and starts all again; ``rest_for_one`` does that for
the children started after the failed one; ``simple_one_for_one`` supervises
dynamic children made from one template spec. More than ``intensity`` restarts
within ``period`` seconds make the supervisor give up: it stops its children
and exits with ``SHUTDOWN``, so its own supervisor sees it fail.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import CoroutineType
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import random

from ._childspec import (
    AutoShutdown,
    Backoff,
    ChildSpec,
    ChildType,
    RestartType,
    ShutdownMode,
    Strategy,
    SupervisorSpec,
    check_intensity,
    check_period,
)
from ._core import _stopping, _telemetry
from ._core._clock import LoopClock, TimerHandle, current_clock
from ._core._exceptions import (
    AlreadyPresent,
    AlreadyStarted,
    BadCombination,
    BadFlagCombination,
    ChildSpecError,
    DuplicateChildName,
    FailedToStartChild,
    InvalidAutoShutdown,
    InvalidExtraArguments,
    InvalidMaxChildren,
    InvalidSignificant,
    InvalidStrategy,
    MaxChildren,
    NotFound,
    Restarting,
    Running,
    SimpleOneForOne,
    StartError,
    SupervisorFlagsError,
)
from ._core._process import KILL_GRACE, Pid, _link_pair, _signal, force_dead, kill_and_wait
from ._core._reasons import (
    IGNORE,
    KILL,
    KILLED,
    NORMAL,
    RESTARTING,
    SHUTDOWN,
    Exit,
    is_clean,
)
from ._server import Server, _start, call, stop

__all__ = [
    "ChildInfo",
    "Counts",
    "DynamicSupervisor",
    "DynamicSupervisorPid",
    "Supervisor",
    "SupervisorPid",
]

_log = logging.getLogger("trellis")
_child_path: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "trellis_child_path", default=None
)
_keys = itertools.count(1)


class _ChildInfoFields(NamedTuple):
    id: Any
    pid: Any
    type: ChildType


class ChildInfo(_ChildInfoFields):
    """One row of ``which_children``: ``(id, pid, type)`` where ``pid`` is a ``Pid``,
    ``None`` or ``RESTARTING``; ``.modules`` carries OTP's fourth field.

    Example::

        for id, pid, type in await sup.which_children():
            ...
    """

    modules: Any

    def __new__(cls, id: Any, pid: Any, type: ChildType, modules: Any = ()) -> ChildInfo:
        self = super().__new__(cls, id, pid, type)
        self.modules = modules
        return self


class Counts(NamedTuple):
    """``count_children``: specs, children with a live pid, and specs by type."""

    specs: int
    active: int
    supervisors: int
    workers: int


class _Err:
    """A supervisor reply that the caller re-raises."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _TryAgain:
    __slots__ = ("child",)
    _trellis_system = True

    def __init__(self, child: _Child) -> None:
        self.child = child


class _DelayedStart:
    __slots__ = ("child",)
    _trellis_system = True

    def __init__(self, child: _Child) -> None:
        self.child = child


class _Child:
    __slots__ = (
        "args",
        "bo_n",
        "bo_rng",
        "delayed",
        "key",
        "last_pid",
        "pid",
        "spec",
        "started_at",
        "timer",
        "uptime",
    )

    def __init__(self, spec: ChildSpec, args: tuple[Any, ...] | None = None) -> None:
        self.spec = spec
        self.args = spec.args if args is None else args
        self.pid: Any = None
        self.last_pid: Pid | None = None
        self.key = next(_keys)
        self.bo_n = 0
        self.bo_rng: random.Random | None = None
        self.started_at: float | None = None
        self.uptime = 0.0  # how long it ran before its last exit (for Backoff.reset_after)
        self.timer: TimerHandle | None = None
        self.delayed: _DelayedStart | None = None  # the pending delayed restart, if any

    @property
    def id(self) -> Any:
        return self.spec.id

    def running(self) -> bool:
        p = self.pid
        return isinstance(p, Pid) and not p._dead

    def cancel_timer(self) -> None:
        """Forget a pending delayed restart (a queued one is ignored by its token)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.delayed = None


_NOINFO = object()
_RESTART = object()
_STATIC, _SIMPLE, _DYNAMIC = "static", "simple", "dynamic"


# ---------------------------------------------------------------------------
# The supervisor process
# ---------------------------------------------------------------------------


class _SupervisorServer(Server):
    trap_exits = True
    _raise_stop_reason = True

    async def init(self, user: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        spec = await user.init(*args, **kwargs)
        if spec is IGNORE:
            return IGNORE
        self.clock = current_clock()
        # the supervisor's loop is fixed for its life: read its time without lookups
        self.now = self.clock.now if not isinstance(self.clock, LoopClock) else self.pid._loop.time  # type: ignore[union-attr]
        self.restarts: deque[float] = deque()
        self.children: list[_Child] = []
        self.dyn: dict[int, _Child] = {}
        self.by_pid: dict[Pid, _Child] = {}
        self.partitions: int | None = getattr(user, "_partitions", None)
        path = _child_path.get()
        self.path = path if path is not None else _default_path(self.pid)
        _child_path.set(None)
        if isinstance(spec, _DynamicFlags):
            self.mode = _DYNAMIC
            self.strategy = Strategy.ONE_FOR_ONE
            self.intensity, self.period = spec.intensity, spec.period
            self.auto_shutdown = AutoShutdown.NEVER
            self.max_children, self.extra_args = spec.max_children, spec.extra_args
            self.one_by_one = True
            self._started()
            return None
        spec = SupervisorSpec.coerce(spec)
        self.strategy = Strategy(spec.strategy)
        self.intensity, self.period = spec.intensity, spec.period
        self.auto_shutdown = AutoShutdown(spec.auto_shutdown)
        self.max_children, self.extra_args = None, ()
        # a child's exit restarts only that child (no group to stop and start)
        self.one_by_one = self.strategy in (Strategy.ONE_FOR_ONE, Strategy.SIMPLE_ONE_FOR_ONE)
        if self.strategy is Strategy.SIMPLE_ONE_FOR_ONE:
            self.mode = _SIMPLE
            self.template = ChildSpec.coerce(spec.children[0])
            self._started()
            return None
        self.mode = _STATIC
        specs = check_childspecs(spec.children)
        for s in specs:
            self._check_significant(s)
        tree_stop = _stopping.get(self.pid._loop)
        for s in specs:
            if tree_stop is not None and tree_stop.requested:
                return await self._cancel_start(s.id)
            child = _Child(s)
            kind, val, _info = await self._invoke(child, tree_stop=tree_stop)
            if kind == "ok":
                self.children.append(child)
            elif kind == "ignore":
                if s.restart is not RestartType.TEMPORARY:
                    self.children.append(child)
            elif tree_stop is not None and tree_stop.requested:
                return await self._cancel_start(s.id)  # cancelled (or failed) as the tree stops
            else:
                _log.error("start_error: supervisor=%s child=%r reason=%r", self.path, s.id, val)
                self._event("child.start_failed", child_id=s.id, reason=val)
                await self._terminate_all()
                err = FailedToStartChild(s.id, val)
                if isinstance(val, BaseException):
                    err.__cause__ = val
                raise err
        self._started()
        return None

    async def _cancel_start(self, child_id: Any) -> Any:
        """The tree is stopping while this supervisor starts its children: start no more,
        stop those started (reverse order) and end the start with ``SHUTDOWN``."""
        _log.info(
            "start_cancelled: supervisor=%s child=%r (the tree is stopping)", self.path, child_id
        )
        self._event("supervisor.start_cancelled", child_id=child_id)
        await self._terminate_all()
        return _stop_shutdown()

    def _tree_stopping(self) -> bool:
        """Whether the tree this supervisor belongs to is stopping (nothing restarts)."""
        tree_stop = _stopping.get(self.pid._loop)
        return tree_stop is not None and tree_stop.requested

    def _event(self, name: str, **fields: Any) -> None:
        """Emit a telemetry event stamped with this supervisor's path and pid."""
        _telemetry.emit(name, supervisor=self.path, sup_pid=self.pid, **fields)

    def _started(self) -> None:
        self._event("supervisor.started", strategy=self.strategy)

    def _check_significant(self, spec: ChildSpec) -> None:
        if spec.significant and self.auto_shutdown is AutoShutdown.NEVER:
            raise BadCombination(
                {"auto_shutdown": "never", "significant": True},
                f"child {spec.id!r} is significant but auto_shutdown is 'never'",
            )

    # -- starting one child ------------------------------------------------------
    async def _invoke(
        self,
        child: _Child,
        event: str = "child.started",
        tree_stop: _stopping.TreeStop | None = None,
    ) -> tuple[str, Any, Any]:
        """Start one child. With ``tree_stop``, a worker's start is cancelled as soon as
        the tree is asked to stop (a child supervisor cancels its own starts instead)."""
        spec = child.spec
        # a child supervisor learns its tree path from this context variable
        token = (
            _child_path.set(f"{self.path}/{child.id}" if self.mode == _STATIC else None)
            if spec.type is ChildType.SUPERVISOR
            else None
        )
        try:
            r = spec.start(*child.args, **spec.kwargs)
            if type(r) is CoroutineType or inspect.isawaitable(r):
                if tree_stop is None or spec.type is not ChildType.WORKER:
                    r = await r
                elif tree_stop._requested or (task := asyncio.current_task()) is None:
                    r = await _unless_stopped(r, tree_stop)
                else:
                    # _unless_stopped's common case, inlined (no coroutine frame on
                    # every restart under trellis run): a stop request cancels this task
                    # while it awaits the start; it takes the cancellation back.
                    starting = tree_stop.starting
                    starting.add(task)
                    try:
                        r = await r
                    except asyncio.CancelledError:
                        if tree_stop.claim(task):
                            task.uncancel()
                            raise StartError(SHUTDOWN, _START_CANCELLED) from None
                        raise
                    finally:
                        starting.discard(task)
                        if tree_stop._cancelled and tree_stop.claim(task):
                            task.uncancel()  # cancelled by the stop, but the start swallowed it
        except AlreadyStarted as e:
            return "error", e, None
        except StartError as e:
            return "error", e.reason, None
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being killed, not the start function failing
            return "error", e, None
        except Exception as e:
            return "error", e, None
        finally:
            if token is not None:
                _child_path.reset(token)
        info = _NOINFO
        if type(r) is tuple and len(r) == 2 and isinstance(r[0], Pid):
            r, info = r
        if isinstance(r, Pid):
            me = self.pid
            if me._links is None or r not in me._links:
                if r._dead:
                    me._deliver(Exit(r, r.reason))
                else:
                    _link_pair(me, r)
                    if r._parent is None:
                        r._parent = me  # we supervise it now: our exit signals stop it
            child.pid = r
            child.last_pid = r
            child.started_at = self.now()
            self.by_pid[r] = child
            _telemetry.emit(  # direct (not _event): this is on every restart
                event,
                supervisor=self.path,
                sup_pid=self.pid,
                time=child.started_at,
                child_id=spec.id,
                pid=r,
            )
            return "ok", r, info
        if r is IGNORE:
            child.pid = None
            return "ignore", None, None
        return "error", r, None

    # -- exits ---------------------------------------------------------------------
    async def handle_info(self, msg: Any) -> Any:
        t = type(msg)
        if t is Exit:
            child = self.by_pid.pop(msg.pid, None)
            if child is None or child.pid is not msg.pid:
                return None  # a stale or unknown pid (SPEC 30)
            now = self.now()
            r = self._child_exited(child, msg.reason, now)
            if r is not _RESTART:
                return r
            if self.one_by_one and child.spec.backoff is None and not _stopping.requested:
                # The common restart, inlined (no _restart/_start_one frames): count it,
                # start the child again; a failed start is handled as _start_one does.
                if not self._add_restart(now):
                    return self._give_up(child)
                kind, val, _info = await self._invoke(
                    child,
                    "child.restarted",
                    _stopping.get(self.pid._loop) if _stopping.armed else None,
                )
                if kind != "ok":
                    self._start_failed(child, kind, val)
                return None
            return await self._restart(child)
        if t is _TryAgain:
            child = msg.child
            if child.pid is RESTARTING and self._has(child):
                return await self._restart(child)
            return None
        if t is _DelayedStart:
            child = msg.child
            if msg is not child.delayed:
                return None  # a stale timer: the child was stopped or restarted since
            child.timer = None
            child.delayed = None
            if child.pid is RESTARTING and self._has(child):
                if self._tree_stopping():
                    child.pid = None
                    return None
                return await self._start_group(child)
            return None
        _log.warning("supervisor %s got an unexpected message: %r", self.path, msg)
        return None

    def _has(self, child: _Child) -> bool:
        if self.mode == _STATIC:
            return any(c is child for c in self.children)
        return self.dyn.get(child.key) is child

    def _remove(self, child: _Child) -> None:
        child.cancel_timer()
        if self.mode == _STATIC:
            self.children = [c for c in self.children if c is not child]
        else:
            self.dyn.pop(child.key, None)
        if isinstance(child.pid, Pid):
            self.by_pid.pop(child.pid, None)

    def _child_exited(self, child: _Child, reason: Any, now: float) -> Any:
        """Record a child's exit at ``now``; returns ``_RESTART``, or what ``handle_info``
        returns."""
        restart_type = child.spec.restart
        restart = restart_type is RestartType.PERMANENT or (
            restart_type is RestartType.TRANSIENT and not is_clean(reason)
        )
        if restart and _stopping.requested and self._tree_stopping():
            restart = False  # the tree is stopping: recorded, never restarted
        child.pid = None
        if child.started_at is not None:
            child.uptime = now - child.started_at
        _telemetry.emit(  # direct (not _event): this is on every restart
            "child.exited",
            supervisor=self.path,
            sup_pid=self.pid,
            time=now,
            child_id=child.spec.id,
            pid=child.last_pid,
            reason=reason,
            restart=restart,
        )
        if (restart or not is_clean(reason)) and _log.isEnabledFor(logging.ERROR):
            _log.error(
                "child_terminated: supervisor=%s child=%r pid=%r reason=%r restart=%s",
                self.path,
                child.id,
                child.last_pid,
                reason,
                str(restart_type),
            )
        if not restart:
            if restart_type is RestartType.TEMPORARY or self.mode != _STATIC:
                self._remove(child)
            if child.spec.significant:
                return self._auto_shutdown(child)
            return None
        return _RESTART

    def _auto_shutdown(self, child: _Child) -> Any:
        if self.auto_shutdown is AutoShutdown.NEVER:
            return None
        if self.auto_shutdown is AutoShutdown.ALL_SIGNIFICANT and any(
            c.spec.significant and c is not child and (c.running() or c.pid is RESTARTING)
            for c in self.children
        ):
            return None
        self._event("supervisor.auto_shutdown", child_id=child.id)
        return _stop_shutdown()

    def _add_restart(self, now: float | None = None) -> bool:
        if now is None:
            now = self.now()
        rs = self.restarts
        rs.append(now)
        floor = now - self.period
        while rs and rs[0] < floor:
            rs.popleft()
        return len(rs) <= self.intensity

    async def _restart(self, child: _Child) -> Any:
        if _stopping.requested and self._tree_stopping():  # a retry or delayed restart due
            # after the stop request
            if child.pid is RESTARTING:
                child.pid = None
            child.cancel_timer()
            return None
        if not self._add_restart():
            return self._give_up(child)
        if child.spec.backoff is None and self.one_by_one:
            await self._start_one(child)  # without group handling
            return None
        if self.mode == _STATIC and self.strategy is not Strategy.ONE_FOR_ONE:
            await self._terminate_bystanders(self._group(child), child)
        delay = self._backoff_delay(child) if child.spec.backoff is not None else 0.0
        if delay > 0:
            child.pid = RESTARTING
            child.delayed = _DelayedStart(child)
            child.timer = self.clock.call_later(delay, self.pid._deliver, child.delayed)
            self._event(
                "child.backoff",
                child_id=child.id,
                delay=delay,
                attempt=child.bo_n,
            )
            return None
        return await self._start_group(child)

    def _give_up(self, child: _Child) -> Any:
        """Too many restarts: report it and end the supervisor with ``SHUTDOWN``."""
        _log.error(
            "reached_max_restart_intensity: supervisor=%s intensity=%d period=%s child=%r",
            self.path,
            self.intensity,
            self.period,
            child.id,
        )
        self.pid.gave_up = True  # type: ignore[attr-defined]
        self._event(
            "supervisor.gave_up",
            child_id=child.id,
            intensity=self.intensity,
            period=self.period,
        )
        if isinstance(child.pid, Pid) or child.pid is RESTARTING:
            child.pid = None
        return _stop_shutdown()

    def _group(self, child: _Child) -> list[_Child]:
        if self.mode != _STATIC or self.strategy is Strategy.ONE_FOR_ONE:
            return [child]
        if self.strategy is Strategy.ONE_FOR_ALL:
            return list(self.children)
        for i, c in enumerate(self.children):
            if c is child:
                return self.children[i:]
        return [child]

    async def _terminate_bystanders(self, group: list[_Child], failed: _Child) -> None:
        for c in reversed(group):
            if c is failed:
                continue
            if c.running():
                await self._shutdown(c)
            else:
                c.pid = None
                c.cancel_timer()
            if c.spec.restart is RestartType.TEMPORARY:
                self._remove(c)

    def _backoff_delay(self, child: _Child) -> float:
        bo: Backoff | None = child.spec.backoff
        if bo is None:
            return 0.0
        reset = bo.reset_after
        if reset is not None and child.uptime >= reset:
            child.bo_n = 0
        child.bo_n += 1
        if child.bo_rng is None:
            import random  # only for backoff (not at import time: faster cold start)

            child.bo_rng = random.Random(bo.seed)
        return bo.delay(child.bo_n, child.bo_rng)

    async def _start_group(self, child: _Child) -> Any:
        for c in self._group(child):
            if c.running() or (c.spec.restart is RestartType.TEMPORARY and c is not child):
                continue
            if not await self._start_one(c):
                return None
        return None

    async def _start_one(self, c: _Child) -> bool:
        """Restart one child; on failure mark it RESTARTING, queue a retry, return False."""
        kind, val, _info = await self._invoke(
            c, "child.restarted", _stopping.get(self.pid._loop) if _stopping.armed else None
        )
        return kind == "ok" or self._start_failed(c, kind, val)

    def _start_failed(self, c: _Child, kind: str, val: Any) -> bool:
        """After a restart that did not return a pid: an ignored child is dropped as its
        type says (True); a failed one is marked RESTARTING and retried on the next loop
        turn, unless the tree is stopping (False)."""
        if kind == "ignore":
            if self.mode != _STATIC or c.spec.restart is RestartType.TEMPORARY:
                self._remove(c)
        elif kind == "error" and self._tree_stopping():
            c.pid = None  # cancelled (or failed) as the tree stops: no retry
            self._event("supervisor.start_cancelled", child_id=c.id)
            return False
        elif kind == "error":
            _log.error(
                "start_error: supervisor=%s child=%r reason=%r (retrying)", self.path, c.id, val
            )
            self._event(
                "child.start_failed",
                child_id=c.id,
                reason=val,
            )
            c.pid = RESTARTING
            c.uptime = 0.0  # a failed start ran for no time
            # Retried by a message to self, queued on the next loop turn so that
            # calls and shutdown interleave with a start that keeps failing.
            self.pid._loop.call_soon(self.pid._deliver, _TryAgain(c))  # type: ignore[union-attr]
            return False
        return True

    # -- stopping children ------------------------------------------------------------
    async def _shutdown(self, child: _Child) -> None:
        pid = child.pid
        child.pid = None
        child.cancel_timer()
        if not isinstance(pid, Pid):
            if pid is RESTARTING:  # stopped between restarts: observers see it stop
                self._event(
                    "child.terminated", child_id=child.id, pid=child.last_pid, reason=SHUTDOWN
                )
            return
        self.by_pid.pop(pid, None)
        mode = child.spec.shutdown
        killed = False
        if pid._dead:
            reason = pid.reason
        elif mode is ShutdownMode.BRUTAL_KILL:
            reason = await kill_and_wait(pid)
            killed = True
        else:
            _signal(pid, self.pid, SHUTDOWN, False)
            if mode is ShutdownMode.INFINITY:
                reason = await pid.join()
            else:
                try:
                    reason = await pid.join(mode)
                except TimeoutError:
                    reason = await kill_and_wait(pid)
                    killed = True
        self._after_shutdown(child, pid, reason, killed)

    def _after_shutdown(self, child: _Child, pid: Pid, reason: Any, killed: bool) -> None:
        expected = (
            reason is SHUTDOWN
            or (killed and reason is KILLED)
            or (child.spec.restart is not RestartType.PERMANENT and is_clean(reason))
        )
        if not expected:
            _log.error(
                "shutdown_error: supervisor=%s child=%r pid=%r reason=%r",
                self.path,
                child.id,
                pid,
                reason,
            )
        self._event(
            "child.terminated",
            child_id=child.id,
            pid=pid,
            reason=reason,
        )

    async def _shutdown_parallel(self, children: list[_Child]) -> None:
        """Signal every child first, then wait for each within its own budget."""
        t0 = self.clock.now()
        waiting: list[tuple[_Child, Pid]] = []
        for c in children:
            pid = c.pid
            c.pid = None
            c.cancel_timer()
            if not isinstance(pid, Pid):
                continue
            self.by_pid.pop(pid, None)
            if not pid._dead:
                if c.spec.shutdown is ShutdownMode.BRUTAL_KILL:
                    _signal(pid, None, KILL, False)
                else:
                    _signal(pid, self.pid, SHUTDOWN, False)
            waiting.append((c, pid))
        for c, pid in waiting:
            mode = c.spec.shutdown
            killed = mode is ShutdownMode.BRUTAL_KILL
            if pid._dead:
                reason = pid.reason
            elif mode is ShutdownMode.INFINITY:
                reason = await pid.join()
            else:
                budget = KILL_GRACE if killed else float(mode)
                try:
                    reason = await pid.join(max(0.0, budget - (self.clock.now() - t0)))
                except TimeoutError:
                    if killed:  # brutal_kill already sent and its grace is over
                        force_dead(pid)
                        reason = pid.reason
                    else:
                        reason = await kill_and_wait(pid)
                        killed = True
            self._after_shutdown(c, pid, reason, killed)

    async def _terminate_all(self) -> None:
        if self.mode == _STATIC:
            for c in reversed(list(self.children)):
                await self._shutdown(c)
                if c.spec.restart is RestartType.TEMPORARY:
                    self._remove(c)
        else:
            kids = list(self.dyn.values())
            self.dyn.clear()
            await self._shutdown_parallel(kids)

    async def terminate(self, reason: Any) -> None:
        await self._terminate_all()
        self._event("supervisor.stopped", reason=reason)

    # -- administration -----------------------------------------------------------
    async def handle_call(self, request: Any, caller: Any) -> Any:
        op, arg = request
        try:
            return await getattr(self, "_op_" + op)(arg)
        except (ChildSpecError, SupervisorFlagsError, StartError) as e:
            return _Err(e)
        except (NotFound, Running, Restarting, AlreadyPresent, SimpleOneForOne, MaxChildren) as e:
            return _Err(e)

    async def _op_start_child(self, arg: Any) -> Any:
        if self.mode == _SIMPLE:
            extra = tuple(arg) if isinstance(arg, list | tuple) else (arg,)
            child = _Child(self.template, self.template.args + extra)
        else:
            spec = ChildSpec.coerce(arg)
            if self.mode == _DYNAMIC:
                if spec.significant:
                    raise InvalidSignificant(
                        True, "DynamicSupervisor children cannot be significant"
                    )
                if self.max_children is not None and len(self.dyn) >= self.max_children:
                    raise MaxChildren(f"already {self.max_children} children")
                child = _Child(spec, tuple(self.extra_args) + spec.args)
            else:
                self._check_significant(spec)
                existing = self._find(spec.id)
                if existing is not None:
                    if existing.running():
                        raise AlreadyStarted(existing.pid)
                    raise AlreadyPresent(f"child {spec.id!r} exists but is not running")
                child = _Child(spec)
        # an admin start (trellis reload, start) gives way to a stop as init's starts do
        kind, val, info = await self._invoke(child, tree_stop=_stopping.get(self.pid._loop))
        if kind == "error":
            if isinstance(val, AlreadyStarted):
                raise val
            if self.mode == _STATIC:  # observers saw it spawn: it failed, and is not kept
                self._event("child.start_failed", child_id=child.id, reason=val)
                self._event("child.deleted", child_id=child.id)
            err = StartError(val, f"failed to start child {child.id!r}: {val!r}")
            if isinstance(val, BaseException):
                err.__cause__ = val
            raise err
        if self.mode == _STATIC:
            if kind == "ok" or child.spec.restart is not RestartType.TEMPORARY:
                self.children.append(child)
        elif kind == "ok":
            self.dyn[child.key] = child
        if kind == "ignore":
            return IGNORE
        return val if info is _NOINFO else (val, info)

    def _find(self, id: Any) -> _Child | None:
        for c in self.children:
            if c.spec.id == id:
                return c
        return None

    def _find_static(self, id: Any) -> _Child:
        if self.mode != _STATIC:
            raise SimpleOneForOne("not available on a dynamic supervisor")
        child = self._find(id) if not isinstance(id, Pid) else None
        if child is None:
            raise NotFound(f"no child {id!r}")
        return child

    async def _op_terminate_child(self, arg: Any) -> None:
        if self.mode == _STATIC:
            child = self._find_static(arg)
            await self._shutdown(child)
            if child.spec.restart is RestartType.TEMPORARY:
                self._remove(child)
            return None
        if not isinstance(arg, Pid):
            if self.mode == _SIMPLE:
                raise SimpleOneForOne(f"terminate_child takes a pid here, not {arg!r}")
            raise NotFound(f"no child {arg!r}")
        found = self.by_pid.get(arg)
        if found is None:
            found = next(
                (c for c in self.dyn.values() if c.pid is RESTARTING and c.last_pid is arg), None
            )
        if found is None:
            if self.mode == _SIMPLE and arg._dead:
                return None
            raise NotFound(f"{arg!r} is not a child")
        self.dyn.pop(found.key, None)
        await self._shutdown(found)
        return None

    async def _op_restart_child(self, id: Any) -> Any:
        child = self._find_static(id)
        if child.pid is RESTARTING:
            raise Restarting(f"child {id!r} is restarting")
        if child.running():
            raise Running(f"child {id!r} is running")
        # an admin start (trellis reload, start) gives way to a stop as init's starts do
        kind, val, info = await self._invoke(child, tree_stop=_stopping.get(self.pid._loop))
        if kind == "error":
            err = StartError(val, f"failed to restart child {id!r}: {val!r}")
            if isinstance(val, BaseException):
                err.__cause__ = val
            raise err
        if kind == "ignore":
            return IGNORE
        return val if info is _NOINFO else (val, info)

    async def _op_delete_child(self, id: Any) -> None:
        child = self._find_static(id)
        if child.pid is RESTARTING:
            raise Restarting(f"child {id!r} is restarting")
        if child.running():
            raise Running(f"child {id!r} is running")
        self._remove(child)
        self._event("child.deleted", child_id=child.id)  # observers forget it

    async def _op_which_children(self, _: Any) -> list[ChildInfo]:
        if self.mode == _STATIC:
            return [_info(c, c.spec.id) for c in reversed(self.children)]
        return [_info(c, None) for c in self.dyn.values()]

    async def _op_which_child(self, id: Any) -> ChildInfo:
        if self.mode != _STATIC:
            if not isinstance(id, Pid):
                raise SimpleOneForOne("which_child takes a pid here")
            child = self.by_pid.get(id)
            if child is None:
                raise NotFound(f"{id!r} is not a child")
            return _info(child, None)
        return _info(self._find_static(id), id)

    async def _op_count_children(self, _: Any) -> Counts:
        if self.mode == _STATIC:
            kids: Sequence[_Child] = self.children
            specs = len(kids)
        else:
            kids = list(self.dyn.values())
            specs = 1 if self.mode == _SIMPLE else len(kids)
        active = sum(1 for c in kids if c.running())
        sups = sum(1 for c in kids if c.spec.type is ChildType.SUPERVISOR)
        return Counts(specs, active, sups, len(kids) - sups)

    async def _op_get_childspec(self, id: Any) -> ChildSpec:
        if self.mode == _SIMPLE:
            return self.template
        if self.mode == _DYNAMIC:
            child = self.by_pid.get(id) if isinstance(id, Pid) else None
            if child is None:
                raise NotFound(f"{id!r} is not a child")
            return child.spec
        return self._find_static(id).spec

    # -- reload (trellis reload): change a running static supervisor in place ----------
    async def _op_replace_childspec(self, arg: Any) -> None:
        """A new spec for the static child of the same id, which keeps running: its
        next (re)start uses the new spec."""
        spec = ChildSpec.coerce(arg)
        child = self._find_static(spec.id)
        self._check_significant(spec)
        child.spec, child.args = spec, spec.args

    async def _op_set_flags(self, arg: Any) -> None:
        """New ``(intensity, period)``; the restarts already counted still count."""
        intensity, period = arg
        self.intensity, self.period = check_intensity(intensity), check_period(period)

    async def _op_reorder(self, ids: Any) -> None:
        """Put the static children in the order of ``ids`` (start order: rest_for_one
        groups and shutdown order follow it); children not named keep their order after."""
        if self.mode != _STATIC:
            raise SimpleOneForOne("not available on a dynamic supervisor")
        rank = {_hashable(i): n for n, i in enumerate(ids)}
        self.children.sort(key=lambda c: rank.get(_hashable(c.spec.id), len(rank)))
        self._event("supervisor.reordered", children=[c.spec.id for c in self.children])


_START_CANCELLED = "start cancelled: the tree is stopping"


async def _unless_stopped(start: Any, tree_stop: _stopping.TreeStop) -> Any:
    """Await a worker's start; a stop request cancels it at once (the start's own
    cancellation handling kills a half-started child) and it ends with ``SHUTDOWN``.

    The supervisor's own task is what gets cancelled (no task per start): it is listed
    in ``tree_stop.starting`` only while it awaits here, and takes the cancellation
    back (``uncancel``) so that it goes on to stop its children in order."""
    task = asyncio.current_task()
    if tree_stop.requested or task is None:
        if tree_stop.requested:
            if inspect.iscoroutine(start):
                start.close()
            raise StartError(SHUTDOWN, _START_CANCELLED)
        return await start
    starting = tree_stop.starting
    starting.add(task)
    try:
        return await start
    except asyncio.CancelledError:
        if tree_stop.claim(task):
            task.uncancel()
            raise StartError(SHUTDOWN, _START_CANCELLED) from None
        raise
    finally:
        starting.discard(task)
        if tree_stop.claim(task):  # cancelled by the stop, but the start swallowed it
            task.uncancel()


def _info(c: _Child, id: Any) -> ChildInfo:
    return ChildInfo(id, c.pid, ChildType(c.spec.type), c.spec.modules)


def _stop_shutdown() -> Any:
    from ._server import Stop

    return Stop(SHUTDOWN)


def _default_path(pid: Pid) -> str:
    return str(pid.name) if pid.name is not None else f"<{pid.id}>"


def check_childspecs(specs: object) -> list[ChildSpec]:
    """Validate a list of child specs: the first error is raised, then duplicate ids."""
    if isinstance(specs, str | bytes) or not isinstance(specs, Sequence):
        from ._core._exceptions import BadStartSpec

        raise BadStartSpec(specs, "children must be a list")
    out = [ChildSpec.coerce(s) for s in specs]
    seen: set[Any] = set()
    for s in out:
        key = _hashable(s.id)
        if key in seen:
            raise DuplicateChildName(s.id)
        seen.add(key)
    return out


def _hashable(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)


# ---------------------------------------------------------------------------
# Handles (what start_link returns)
# ---------------------------------------------------------------------------


class _AdminPid(Pid):
    __slots__ = ("gave_up",)

    def __init__(self) -> None:
        super().__init__()
        self.gave_up = False

    async def _admin(self, op: str, arg: Any = None) -> Any:
        r = await call(self, (op, arg), timeout=None)
        if type(r) is _Err:
            raise r.exc
        return r

    async def which_children(self) -> list[ChildInfo]:
        """``[ChildInfo(id, pid, type, modules)]``, newest-started first."""
        return await self._admin("which_children")  # type: ignore[no-any-return]

    async def count_children(self) -> Counts:
        """``Counts(specs, active, supervisors, workers)``."""
        return await self._admin("count_children")  # type: ignore[no-any-return]

    async def stop(self, reason: Any = NORMAL, timeout: float | None = None) -> None:
        """Stop the supervisor: its children are stopped first (reverse start order)."""
        await stop(self, reason, timeout)

    def _via_whereis(self, key: Any) -> Pid | None:
        server = self._server
        n = getattr(server, "partitions", None)
        if n is None:
            raise TypeError(f"{self!r} is not a registry or partition supervisor")
        index = partition_index(key, n)
        for c in server.children:
            if c.spec.id == index and c.running():
                return c.pid  # type: ignore[no-any-return]
        return None


class SupervisorPid(_AdminPid):
    """The pid of a supervisor, with its administration API."""

    __slots__ = ()

    async def start_child(self, spec: Any) -> Any:
        """Add and start a child (``simple_one_for_one``: the extra args list).

        Returns the pid, ``(pid, info)``, or ``IGNORE``. Raises ``AlreadyStarted``,
        ``AlreadyPresent``, ``StartError`` or a ``ChildSpecError``.
        """
        return await self._admin("start_child", spec)

    async def terminate_child(self, id: Any) -> None:
        """Stop a child by its shutdown spec, keeping its spec (``NotFound`` if unknown)."""
        await self._admin("terminate_child", id)

    async def restart_child(self, id: Any) -> Any:
        """Start a stopped child again.

        Raises ``Running``, ``Restarting``, ``NotFound`` or ``StartError``.
        """
        return await self._admin("restart_child", id)

    async def delete_child(self, id: Any) -> None:
        """Forget a stopped child's spec (``Running``, ``Restarting``, ``NotFound``)."""
        await self._admin("delete_child", id)

    async def which_child(self, id: Any) -> ChildInfo:
        """One child's ``ChildInfo`` (``NotFound`` if unknown)."""
        return await self._admin("which_child", id)  # type: ignore[no-any-return]

    async def get_childspec(self, id: Any) -> ChildSpec:
        """The child's fully defaulted spec (``NotFound`` if unknown)."""
        return await self._admin("get_childspec", id)  # type: ignore[no-any-return]


class DynamicSupervisorPid(_AdminPid):
    """The pid of a dynamic supervisor, with its administration API."""

    __slots__ = ()

    async def start_child(self, spec: Any) -> Any:
        """Start a child from ``spec``; ``IGNORE`` stores nothing.

        Raises ``MaxChildren``, ``StartError`` or a ``ChildSpecError``.
        """
        return await self._admin("start_child", spec)

    async def terminate_child(self, pid: Pid) -> None:
        """Stop and forget the child ``pid`` (``NotFound`` if it is not a child)."""
        await self._admin("terminate_child", pid)


class _SupervisorProc(_SupervisorServer):
    _pid_class = SupervisorPid


class _DynamicProc(_SupervisorServer):
    _pid_class = DynamicSupervisorPid


def partition_index(key: Any, n: int) -> int:
    """The partition for ``key``: ``abs(key) % n`` for an int, a stable hash otherwise."""
    if isinstance(key, int) and not isinstance(key, bool):
        return abs(key) % n
    import zlib

    return zlib.crc32(repr(key).encode()) % n


# ---------------------------------------------------------------------------
# The user-facing classes
# ---------------------------------------------------------------------------


def _spec_from_args(
    children: Sequence[Any] = (),
    *,
    strategy: Any = Strategy.ONE_FOR_ONE,
    intensity: int = 3,
    period: float = 5.0,
    auto_shutdown: Any = AutoShutdown.NEVER,
) -> SupervisorSpec:
    return SupervisorSpec(
        children, strategy=strategy, intensity=intensity, period=period, auto_shutdown=auto_shutdown
    )


class Supervisor:
    """A static supervisor. Start one directly, or subclass it and override ``init``.

    Example (subclass form)::

        class Infra(trellis.Supervisor):
            async def init(self, url):
                return trellis.SupervisorSpec(
                    [Exchange.child_spec(url), Store.child_spec()], strategy="rest_for_one"
                )

        sup = await Infra.start_link("tcp://127.0.0.1:9000", name="infra")
    """

    async def init(self, *args: Any, **kwargs: Any) -> Any:
        """Return a ``SupervisorSpec`` (or ``IGNORE``). Override it in a subclass.

        The default takes ``(children, *, strategy="one_for_one", intensity=3,
        period=5.0, auto_shutdown="never")``, as ``Supervisor.start_link`` does.
        """
        return _spec_from_args(*args, **kwargs)

    @classmethod
    async def start_link(cls, *args: Any, name: object = None, **kwargs: Any) -> Any:
        """Start the supervisor linked to the caller; returns a ``SupervisorPid`` once every
        child has started (or ``IGNORE``). Raises ``FailedToStartChild`` or a spec/flag error."""
        return await _start(_SupervisorProc, (cls(), args, kwargs), {}, name, link=True)

    @classmethod
    async def start(cls, *args: Any, name: object = None, **kwargs: Any) -> Any:
        """Like :meth:`start_link` without the link."""
        return await _start(_SupervisorProc, (cls(), args, kwargs), {}, name, link=False)

    @classmethod
    def child_spec(
        cls,
        *args: Any,
        id: Any = None,
        restart: Any = "permanent",
        shutdown: Any = "infinity",
        significant: bool = False,
        name: object = None,
        **kwargs: Any,
    ) -> ChildSpec:
        """A ``ChildSpec`` (type ``supervisor``) that starts this supervisor."""
        if name is not None:
            kwargs = {**kwargs, "name": name}
        return ChildSpec(
            id=cls.__name__ if id is None else id,
            start=cls.start_link,
            args=args,
            kwargs=kwargs,
            restart=restart,
            shutdown=shutdown,
            type=ChildType.SUPERVISOR,
            significant=significant,
            modules=(cls.__module__,),
        )

    check_childspecs = staticmethod(check_childspecs)


@dataclass(frozen=True, slots=True)
class _DynamicFlags:
    intensity: int
    period: float
    max_children: int | None
    extra_args: tuple[Any, ...]


def _dynamic_flags(
    *,
    strategy: Any = "one_for_one",
    intensity: int = 3,
    period: float = 5.0,
    max_children: int | None = None,
    extra_args: Sequence[Any] = (),
    auto_shutdown: Any = "never",
) -> Any:
    """Validate DynamicSupervisor flags."""
    if strategy not in (Strategy.ONE_FOR_ONE, "one_for_one"):
        raise InvalidStrategy(strategy, "DynamicSupervisor only supports one_for_one")
    check_intensity(intensity)
    period = check_period(period)
    if max_children is not None and (
        not isinstance(max_children, int) or isinstance(max_children, bool) or max_children < 0
    ):
        raise InvalidMaxChildren(max_children, "must be an int >= 0 or None")
    if isinstance(extra_args, str | bytes) or not isinstance(extra_args, Sequence):
        raise InvalidExtraArguments(extra_args, "must be a list or tuple")
    if auto_shutdown not in (AutoShutdown.NEVER, "never"):
        if auto_shutdown in {a.value for a in AutoShutdown} or isinstance(
            auto_shutdown, AutoShutdown
        ):
            raise BadFlagCombination(
                auto_shutdown, "DynamicSupervisor requires auto_shutdown='never'"
            )
        raise InvalidAutoShutdown(auto_shutdown)
    return _DynamicFlags(intensity, period, max_children, tuple(extra_args))


class DynamicSupervisor:
    """A supervisor of children started on demand (Elixir's DynamicSupervisor).

    Example::

        dsup = await trellis.DynamicSupervisor.start_link(max_children=100, name="jobs")
        pid = await dsup.start_child(Job.child_spec(42, restart="transient"))
        await dsup.terminate_child(pid)
    """

    async def init(self, *args: Any, **kwargs: Any) -> Any:
        """Return the flags (the default validates ``start_link``'s keyword arguments:
        ``intensity``, ``period``, ``max_children``, ``extra_args``). Override to compute them."""
        return _dynamic_flags(*args, **kwargs)

    @classmethod
    async def start_link(cls, *args: Any, name: object = None, **kwargs: Any) -> Any:
        """Start linked to the caller; returns a ``DynamicSupervisorPid``."""
        return await _start(_DynamicProc, (cls(), args, kwargs), {}, name, link=True)

    @classmethod
    async def start(cls, *args: Any, name: object = None, **kwargs: Any) -> Any:
        """Like :meth:`start_link` without the link."""
        return await _start(_DynamicProc, (cls(), args, kwargs), {}, name, link=False)

    @classmethod
    def child_spec(
        cls, *, id: Any = None, restart: Any = "permanent", name: object = None, **kwargs: Any
    ) -> ChildSpec:
        """A ``ChildSpec`` (type ``supervisor``) that starts this dynamic supervisor."""
        if name is not None:
            kwargs = {**kwargs, "name": name}
        return ChildSpec(
            id=cls.__name__ if id is None else id,
            start=cls.start_link,
            kwargs=kwargs,
            restart=restart,
            shutdown="infinity",
            type=ChildType.SUPERVISOR,
        )

"""The chaos engine: runs a :class:`Plan` against a running tree and watches how it heals."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._core import _telemetry
from .._core._clock import Clock, TimerHandle, current_clock, sleep_on
from .._core._process import Pid
from .._tree import Node, classify, event_path, reason_text, walk
from ._inject import Healer, Target, Unsupported, inject, kind_of
from ._plan import ChaosSpecError, Plan, Step
from ._proxy import ChaosProxy
from ._report import FaultResult, Report

__all__ = ["Chaos", "start"]

_log = logging.getLogger("trellis.chaos")

_TIMED = frozenset({"hang", "slow", "outage"})
_WATCHED = ("child.exited", "child.started", "child.restarted", "supervisor.gave_up")


@dataclass(slots=True, eq=False)
class _Fault:
    """A fault while the run goes on (times on the engine's clock)."""

    id: str
    step: Step
    target: str
    planned_at: float
    injected_at: float | None = None
    result: str = "ok"
    os_pid: int | None = None
    healer: Healer | None = None
    heal_timer: TimerHandle | None = None
    healed_at: float | None = None
    detected_at: float | None = None
    exit_reason: str | None = None
    exit_class: str | None = None
    restarted_at: float | None = None
    health_from: float | None = None  # waiting for the health check since then
    recovered_at: float | None = None
    settled_at: float | None = None
    deadline: TimerHandle | None = None
    restarts: int = 0
    escalations: int = 0
    group: bool = False  # its supervisor restarts siblings with it (rest/one_for_all)
    gave_up: set[str] = field(default_factory=set)  # supervisors that escalated

    @property
    def open(self) -> bool:
        return self.result == "ok" and self.settled_at is None


class Chaos:
    """Injects the faults of ``plan`` into the tree under ``root`` and measures recovery.

    Use it as an async context manager and ``await engine.run()`` (returns the
    :class:`Report` once the plan's duration has passed, every fault is healed and the
    tree had ``settle`` seconds to recover); or start it in the background with
    :func:`start`; or pass it to ``trellis.run(..., extensions=[engine])``, where it
    starts once the tree runs and asks the tree to stop when the run is over.

    ``proxies`` maps names to :class:`ChaosProxy` objects for ``outage`` faults.
    ``max_concurrent`` caps the faults open at once (a fault is open from its injection
    until it settles: the target recovered, or it was healed without bringing the target
    down, or ``recover_timeout`` passed); a step over the cap is skipped and reported.
    ``healthy`` is an async ``() -> bool`` check of the whole service: recovery then
    also waits for it. ``integrity`` (sync or async, returning a dict) fills the
    report's integrity slot at the end. Time comes from the Trellis clock
    (``trellis.testing.use_clock`` drives it in tests).

    Example::

        plan = Plan.from_spec({"fault": "kill", "target": "root/workers/*", "every": 5},
                              seed=7, duration=60)
        async with Chaos(root_pid, plan, max_concurrent=2) as engine:
            report = await engine.run()
        report.render()
    """

    def __init__(
        self,
        root: Pid | None,
        plan: Plan,
        *,
        proxies: Mapping[str, ChaosProxy] | None = None,
        max_concurrent: int | None = None,
        healthy: Callable[[], Awaitable[bool]] | None = None,
        integrity: Callable[[], Any] | None = None,
        recover_timeout: float = 30.0,
        settle: float = 10.0,
        health_interval: float = 0.1,
        clock: Clock | None = None,
        stop_tree: bool = True,
        walk_timeout: float = 2.0,
    ) -> None:
        self.root = root
        self.plan = plan
        self.proxies = dict(proxies or {})
        errors = []
        for step in plan.steps:
            if step.proxy is not None and step.proxy not in self.proxies:
                have = ", ".join(sorted(self.proxies)) or "none"
                errors.append(
                    (
                        f"{plan.where}[{step.spec}].proxy",
                        f"no proxy named {step.proxy!r} (have: {have})",
                    )
                )
        if max_concurrent is not None and (
            isinstance(max_concurrent, bool)
            or not isinstance(max_concurrent, int)
            or max_concurrent < 1
        ):
            errors.append(("max_concurrent", f"must be an int >= 1, got {max_concurrent!r}"))
        for name, value in (
            ("recover_timeout", recover_timeout),
            ("settle", settle),
            ("health_interval", health_interval),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                errors.append((name, f"must be seconds >= 0, got {value!r}"))
        if errors:
            raise ChaosSpecError(list(dict.fromkeys(errors)))
        self.max_concurrent = max_concurrent
        self.healthy = healthy
        self.integrity = integrity
        self.recover_timeout = float(recover_timeout)
        self.settle = float(settle)
        self.health_interval = float(health_interval)
        self.clock = clock
        self.stop_tree = stop_tree
        self.walk_timeout = walk_timeout
        self.faults: list[_Fault] = []
        self._open: dict[str, _Fault] = {}  # injected and not settled, by id
        self._hid: object | None = None
        self._t0: float | None = None
        self._t_end: float | None = None
        self._task: asyncio.Task[Report] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None
        self._request_stop: Callable[[], None] | None = None
        self._kinds: dict[str, str] = {}
        self._holding: dict[str, _Fault] = {}  # path or proxy -> its hang/slow/outage fault
        self._integrity: Mapping[str, Any] | None = None
        self._notes: list[str] = []
        self._report: Report | None = None
        self._stopped = False

    # -- lifecycle (also the trellis.run Extension protocol) ---------------------------
    async def start(self) -> None:
        """Attach to telemetry (idempotent); the run itself starts with :meth:`run`."""
        if self.clock is None:
            self.clock = current_clock()
        if self._changed is None:
            self._changed = asyncio.Event()
        if self._hid is None:
            self._hid = _telemetry.attach(self._on_event, _WATCHED)

    async def tree_started(self, root: Pid, request_stop: Callable[[], None]) -> None:
        """Extension hook: start the run against ``root``; when it is over, the tree is
        asked to stop (unless ``stop_tree=False``)."""
        self.root = root
        self._request_stop = request_stop
        self._task = asyncio.get_running_loop().create_task(self.run())
        self._task.add_done_callback(self._run_ended)

    def _run_ended(self, task: asyncio.Task[Report]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # a failed run must not leave the tree running forever
        _log.error("chaos run failed", exc_info=task.exception())
        if self._request_stop is not None and self.stop_tree:
            self._request_stop()

    async def tree_stopping(self) -> None:
        """Extension hook: the tree is about to stop (a signal, or the end of the run):
        end the run first, so no child is still stopped or held while it shuts down."""
        await self.stop()

    async def stop(self) -> None:
        """End the run now: heal every fault, settle the rest, detach from telemetry."""
        task = self._task
        if task is not None and not task.done():
            if self._t0 is not None:
                at = self._clock().now() - self._t0
                self._notes.append(f"stopped early, {at:.3f}s into the run")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()

    async def __aenter__(self) -> Chaos:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait(self) -> Report:
        """Wait for a run started by :func:`start` (or as an extension); its report (also
        after :meth:`stop` ended it early)."""
        task = self._task
        if task is None:
            raise RuntimeError("no chaos run in the background: use start() or run()")
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # we were cancelled, not the run
            return self.report()

    def report(self) -> Report:
        """The report: final once the run is over, so far while it goes on."""
        if self._report is not None:
            return self._report
        return self._build()

    # -- the run -------------------------------------------------------------------
    async def run(self) -> Report:
        """Run the whole plan: inject each step at its time, heal timed faults, heal
        everything at the end, let the tree settle, and return the report."""
        await self.start()
        if self.root is None:
            raise RuntimeError("Chaos has no root: give the root pid, or run it as an extension")
        clock = self._clock()
        self._t0 = clock.now()
        _log.info("chaos run: seed %s, %d steps", self.plan.seed, len(self.plan.steps))
        try:
            self._kinds_from(await self._walk())
            for step in self.plan.steps:
                await self._sleep_until(self._t0 + step.offset)
                await self._do_step(step)
            await self._sleep_until(self._t0 + self.plan.duration)
            await self._heal_all()
            await self._wait_settled(self.settle)
            self._settle_rest("did not settle before the run ended")
            self._t_end = clock.now()
            await self._fill_integrity()
            self._report = self._build()
        finally:
            await self._close()
        if self._request_stop is not None and self.stop_tree:
            self._request_stop()
        return self._report

    def _clock(self) -> Clock:
        if self.clock is None:
            self.clock = current_clock()
        return self.clock

    async def _sleep_until(self, t: float) -> None:
        clock = self._clock()
        delay = t - clock.now()
        if delay <= 0:
            await asyncio.sleep(0)
            return
        await sleep_on(clock, delay)

    async def _walk(self) -> Node | None:
        root = self.root
        if root is None or not root.alive:
            return None
        return await walk(root, timeout=self.walk_timeout)

    def _kinds_from(self, tree: Node | None) -> None:
        if tree is None:
            return
        for n in tree.flat()[1:]:
            if n.pid is not None and n.pid.alive:
                self._kinds[n.path] = kind_of(n.pid, n.type)

    async def _kind(self, node: Node) -> str:
        """A node's kind: from its pid when it runs, else as last seen, else its spec."""
        if node.pid is not None and node.pid.alive:
            kind = self._kinds[node.path] = kind_of(node.pid, node.type)
            return kind
        if node.path in self._kinds:
            return self._kinds[node.path]
        if node.type == "supervisor":
            return "supervisor"
        kind = "worker"
        parent = node.parent
        getter = getattr(parent, "get_childspec", None)
        if getter is not None:
            try:
                spec = await asyncio.wait_for(getter(node.id), self.walk_timeout)
                kind = _spec_kind(spec)
            except Exception:  # gone or busy: keep the default
                pass
        self._kinds[node.path] = kind
        return kind

    async def _do_step(self, step: Step) -> None:
        clock = self._clock()
        if step.fault == "outage":
            assert step.proxy is not None
            await self._do_outage(step, clock)
            return
        tree = await self._walk()
        if tree is None:
            self._skip(step, f"{step.n}.1", step.target or "*", "the tree is not running")
            return
        self._kinds_from(tree)
        nodes = tree.flat()[1:]
        pairs = [(n.path, await self._kind(n)) for n in nodes]
        chosen = step.choose(pairs, root=tree.path)
        if not chosen:
            self._skip(step, f"{step.n}.1", step.target or "*", "no target matched")
            return
        by_path = {n.path: n for n in nodes}
        kinds = dict(pairs)
        for k, path in enumerate(chosen, 1):
            fid = f"{step.n}.{k}"
            node = by_path[path]
            pid = node.pid
            if pid is None or not pid.alive:
                self._skip(step, fid, path, "target not running")
                continue
            why = self._blocked(path, step.fault)
            if why is not None:
                self._skip(step, fid, path, why)
                continue
            target = Target(path, pid, kinds[path], getattr(pid, "os_pid", None))
            strategy = getattr(getattr(node.parent, "_server", None), "strategy", None)
            group = str(strategy) in ("rest_for_one", "one_for_all")
            await self._inject(step, fid, target, clock, group)

    def _blocked(self, key: str, fault: str) -> str | None:
        """Why a new fault may not start now: the cap, or (for a hang, slow or outage)
        the target is already held by one (a kill of a hung child goes ahead)."""
        holder = self._holding.get(key)
        if fault in _TIMED and holder is not None and holder.healed_at is None:
            return f"target already held by fault {holder.id}"
        if self.max_concurrent is not None:
            n = len(self._open)
            if n >= self.max_concurrent:
                return f"cap: {n} faults open (max_concurrent={self.max_concurrent})"
        return None

    def _new(self, step: Step, fid: str, target: str) -> _Fault:
        assert self._t0 is not None
        f = _Fault(fid, step, target, self._t0 + step.offset)
        self.faults.append(f)
        return f

    def _skip(self, step: Step, fid: str, target: str, why: str) -> None:
        f = self._new(step, fid, target)
        f.result = f"skipped: {why}"
        _log.info("chaos %s %s %s skipped: %s", fid, step.fault, target, why)

    async def _inject(self, step: Step, fid: str, t: Target, clock: Clock, group: bool) -> None:
        f = self._new(step, fid, t.path)
        f.os_pid = t.os_pid
        f.group = group
        f.injected_at = clock.now()
        self._open[f.id] = f  # watched from now on
        try:
            f.healer = await inject(step.fault, t, clock=clock, fault_id=fid, delay=step.delay)
        except Unsupported as e:
            del self._open[f.id]
            f.result = f"skipped: {e}"
            f.injected_at = None
            _log.info("chaos %s %s %s skipped: %s", fid, step.fault, t.path, e)
            return
        except Exception as e:  # the target went away meanwhile, a signal failed
            del self._open[f.id]
            f.result = f"error: {reason_text(e)}"
            self._action(f, "fault", f.result)
            return
        self._action(f, "fault", "ok")
        self._after_inject(f, clock)

    async def _do_outage(self, step: Step, clock: Clock) -> None:
        name = step.proxy
        assert name is not None
        fid = f"{step.n}.1"
        key = f"proxy:{name}"
        why = self._blocked(key, step.fault)
        if why is not None:
            self._skip(step, fid, key, why)
            return
        proxy = self.proxies[name]
        f = self._new(step, fid, key)
        f.injected_at = clock.now()
        self._open[f.id] = f
        try:
            await proxy.cut()
        except Exception as e:
            del self._open[f.id]
            f.result = f"error: {reason_text(e)}"
            self._action(f, "fault", f.result)
            return
        f.healer = proxy.restore
        self._action(f, "fault", "ok")
        self._after_inject(f, clock)

    def _after_inject(self, f: _Fault, clock: Clock) -> None:
        _log.info("chaos %s %s %s injected", f.id, f.step.fault, f.target)
        if f.healer is not None:
            self._holding[f.target] = f
            assert f.step.duration is not None
            assert self._t0 is not None
            # healed after `duration`, or by the final heal at the end of the run
            end = self._t0 + self.plan.duration
            if f.injected_at is not None and f.injected_at + f.step.duration < end:
                f.heal_timer = clock.call_later(f.step.duration, self._heal_soon, f)
        else:
            self._arm_deadline(f, self.recover_timeout)

    def _arm_deadline(self, f: _Fault, seconds: float) -> None:
        if f.deadline is not None:
            f.deadline.cancel()
        f.deadline = self._clock().call_later(seconds, self._expire, f)

    def _expire(self, f: _Fault) -> None:
        f.deadline = None
        if f.open and (f.healer is None or f.healed_at is not None):
            self._settle(f)

    # -- healing -------------------------------------------------------------------
    def _heal_soon(self, f: _Fault) -> None:
        f.heal_timer = None
        task = asyncio.get_running_loop().create_task(self._heal(f), context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heal(self, f: _Fault) -> None:
        healer = f.healer
        if healer is None or f.healed_at is not None:
            return
        if f.heal_timer is not None:
            f.heal_timer.cancel()
            f.heal_timer = None
        clock = self._clock()
        f.healed_at = clock.now()
        try:
            await healer()
            result = "ok"
        except Exception as e:
            result = f"error: {reason_text(e)}"
        self._action(f, "heal", result)
        if self._holding.get(f.target) is f:
            del self._holding[f.target]
        if not f.open:
            return
        if f.detected_at is None:  # it brought nothing down: recovered when healthy
            if self.healthy is None:
                self._settle(f)
                return
            self._await_health(f, f.healed_at)
        self._arm_deadline(f, self.recover_timeout)

    async def _heal_all(self) -> None:
        for f in list(self.faults):
            if f.healer is not None and f.healed_at is None:
                await self._heal(f)

    async def _close(self) -> None:
        """Heal what is still held, stop background work, detach from telemetry."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            await self._heal_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        ht = self._health_task
        if ht is not None and not ht.done():
            ht.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ht
        self._settle_rest("the run was stopped")
        for f in self.faults:
            for timer in (f.deadline, f.heal_timer):
                if timer is not None:
                    timer.cancel()
            f.deadline = f.heal_timer = None
        if self._hid is not None:
            _telemetry.detach(self._hid)
            self._hid = None

    # -- watching ------------------------------------------------------------------
    def _on_event(self, event: dict[str, Any]) -> None:
        """Telemetry handler (sync, no I/O): match events to open faults."""
        name = event["event"]
        t = event.get("time")
        if not isinstance(t, int | float):
            return
        if name == "supervisor.gave_up":
            sup = str(event.get("supervisor"))
            for f in self._open.values():
                if (
                    f.open
                    and f.injected_at is not None
                    and t >= f.injected_at
                    and (f.target == sup or f.target.startswith(sup + "/"))
                ):
                    f.escalations += 1
                    f.gave_up.add(sup)  # recovered only once it runs again
            return
        path = event_path(event)
        if path is None:
            return
        for f in list(self._open.values()):
            if not f.open or f.injected_at is None or t < f.injected_at:
                continue
            if name == "child.exited":
                if path == f.target and f.detected_at is None:
                    f.detected_at = t
                    reason = event.get("reason")
                    f.exit_reason = reason_text(reason)
                    f.exit_class = classify(reason)
                continue
            if name == "child.restarted" and _near(path, f.target, f.group):
                f.restarts += 1
            if f.detected_at is None:
                continue
            if path == f.target and f.restarted_at is None:
                f.restarted_at = t
            elif path in f.gave_up:
                f.gave_up.discard(path)
            else:
                continue
            if f.restarted_at is not None and not f.gave_up:  # up again, escalations too
                if self.healthy is None:
                    f.recovered_at = t
                    self._settle(f)
                else:
                    self._await_health(f, t)

    def _await_health(self, f: _Fault, since: float) -> None:
        f.health_from = since
        task = self._health_task
        if (task is None or task.done()) and not self._stopped:
            self._health_task = asyncio.get_running_loop().create_task(
                self._health_loop(), context=contextvars.Context()
            )

    async def _health_loop(self) -> None:
        clock = self._clock()
        check = self.healthy
        assert check is not None
        while any(f.health_from is not None for f in self._open.values()):
            started = clock.now()
            try:
                ok = bool(await check())
            except Exception as e:
                _log.warning("chaos health check failed: %s", reason_text(e))
                ok = False
            if ok:
                now = clock.now()
                for f in list(self._open.values()):
                    if f.health_from is not None and f.health_from <= started:
                        f.recovered_at = now
                        self._settle(f)
            await self._sleep_until(clock.now() + self.health_interval)

    def _settle(self, f: _Fault) -> None:
        if f.settled_at is not None:
            return
        f.settled_at = self._clock().now()
        f.health_from = None
        self._open.pop(f.id, None)
        if f.deadline is not None:
            f.deadline.cancel()
            f.deadline = None
        if f.recovered_at is not None:
            _log.info("chaos %s recovered", f.id)
        if self._changed is not None:
            self._changed.set()

    def _settle_rest(self, why: str) -> None:
        n = 0
        for f in list(self._open.values()):
            if f.open:
                self._settle(f)
                n += 1
        if n:
            self._notes.append(f"{n} fault{'s' if n != 1 else ''} {why}")

    async def _wait_settled(self, seconds: float) -> None:
        assert self._changed is not None
        clock = self._clock()
        deadline = clock.now() + seconds
        while self._open:
            left = deadline - clock.now()
            if left <= 0:
                return
            self._changed.clear()
            wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            timer = clock.call_later(left, _resolve, wake)
            waiter: asyncio.Future[Any] = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait([wake, waiter], return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
                if not wake.done():
                    wake.cancel()

    # -- telemetry and the report ----------------------------------------------------
    def _action(self, f: _Fault, what: str, result: str) -> None:
        detail: dict[str, Any] = {"seed": self.plan.seed, "fault": f.id, "step": f.step.n}
        if f.os_pid is not None:
            detail["os_pid"] = f.os_pid
        if what == "fault":
            if f.step.duration is not None:
                detail["duration"] = f.step.duration
            if f.step.delay is not None:
                detail["delay"] = f.step.delay
        _telemetry.emit(
            "operator.action",
            time=f.injected_at if what == "fault" else f.healed_at,
            who="chaos",
            action=f"{what}:{f.step.fault}",
            target=f.target,
            source="chaos",
            result=result,
            detail=detail,
        )

    async def _fill_integrity(self) -> None:
        if self.integrity is None:
            return
        try:
            r = self.integrity()
            if inspect.isawaitable(r):
                r = await r
            self._integrity = dict(r)
        except Exception as e:
            self._integrity = {"error": reason_text(e)}

    def _build(self) -> Report:
        t0 = self._t0
        end = self._t_end
        if end is None:
            end = self._clock().now() if t0 is not None else 0.0
        rows = []
        for f in self.faults:
            at = f.injected_at
            rows.append(
                FaultResult(
                    id=f.id,
                    step=f.step.n,
                    fault=f.step.fault,
                    target=f.target,
                    planned=f.step.offset,
                    at=at - t0 if at is not None and t0 is not None else None,
                    result=f.result,
                    detect=_since(f.detected_at, at),
                    recover=_since(f.recovered_at, at),
                    healed=_since(f.healed_at, at),
                    restarts=f.restarts,
                    escalations=f.escalations,
                    exit_reason=f.exit_reason,
                    exit_class=f.exit_class,
                    os_pid=f.os_pid,
                )
            )
        return Report(
            seed=self.plan.seed,
            duration=self.plan.duration,
            elapsed=end - t0 if t0 is not None else 0.0,
            faults=tuple(rows),
            plan=self.plan,
            max_concurrent=self.max_concurrent,
            integrity=self._integrity,
            notes=tuple(self._notes),
        )


async def start(
    root: Pid,
    plan: Plan,
    **options: Any,
) -> Chaos:
    """Start a chaos run in the background; ``await engine.wait()`` for its report
    (``await engine.stop()`` ends it early, healing every fault). ``options`` are those
    of :class:`Chaos`.

    Example::

        engine = await chaos.start(sup, plan, max_concurrent=1)
        report = await engine.wait()
    """
    engine = Chaos(root, plan, **options)
    await engine.start()
    engine._task = asyncio.get_running_loop().create_task(engine.run())
    return engine


def _since(t: float | None, t0: float | None) -> float | None:
    return t - t0 if t is not None and t0 is not None else None


def _near(path: str, target: str, group: bool) -> bool:
    """Whether a restart of ``path`` is counted for a fault on ``target``: the target, its
    subtree, its ancestors, and its siblings when their supervisor restarts them as a
    group; for an outage (``proxy:NAME``), any restart while it lasts."""
    if target.startswith("proxy:"):
        return True
    if path == target or path.startswith(target + "/") or target.startswith(path + "/"):
        return True
    return group and path.rpartition("/")[0] == target.rpartition("/")[0]


def _spec_kind(spec: Any) -> str:
    from .._children._command import _start_command
    from .._server import Server
    from .._worker import _start_worker

    if str(getattr(spec, "type", "")) == "supervisor":
        return "supervisor"
    start = getattr(spec, "start", None)
    if start is _start_command:
        return "command"
    if start is _start_worker:
        return "worker"
    owner = getattr(start, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, Server):
        return "server"
    return "worker"


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

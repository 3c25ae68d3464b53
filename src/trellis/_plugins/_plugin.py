"""``Plugin``: a sandboxed WASM module as a child of a supervision tree, and
``plugin_call``.

Example::

    spec = trellis.Plugin("plugins/fhir_validator.wasm", id="fhir_validator",
                          name="fhir_validator", memory="50MiB", timeout=5.0)
    sup = await trellis.Supervisor.start_link([spec])
    out = await trellis.plugin_call("fhir_validator", "validate", record)

The child is a Trellis server that owns ``instances`` wasmtime instances of the
module, each in its own store (its memory cap) and driven by its own thread: a call
never runs on the event loop's thread, calls to one instance run one at a time, and a
call goes to the least busy instance. A fatal failure (oom, timeout, fuel, trap) is
answered to its caller as ``PluginError`` and ends the child with that reason, so its
supervisor restarts it from the cached compiled module; a plugin-reported error is
answered and the child stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._childspec import Backoff, ChildSpec
from .._core import _telemetry
from .._core._exceptions import CallTimeout, Exited, InvalidChildSpec, NoProc, StartError
from .._core._process import resolve
from .._server import Server, Stop, send
from . import _engine, _hosts
from ._errors import PluginError
from ._instance import Grants, Instance

__all__ = ["Plugin", "PluginConfig", "PluginServer", "parse_memory", "plugin_call"]

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
}  # fmt: skip


def parse_memory(value: Any, field: str = "memory") -> int:
    """``"50MiB"``, ``"64 MB"``, ``"1GiB"`` or an int of bytes -> bytes (at least 64 KiB)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise InvalidChildSpec(
                value, "a size like 50MiB, 64MB or a number of bytes", field=field
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise InvalidChildSpec(value, "a size like 50MiB or a number of bytes", field=field)
    if n < 65536:
        raise InvalidChildSpec(value, "must be at least 64KiB (one wasm page)", field=field)
    return n


@dataclass(frozen=True)
class PluginConfig:
    """A validated plugin spec (the module is read and checked when the spec is made)."""

    id: str
    wasm: bytes = field(repr=False)
    source: str
    sha256: str
    name: Any
    memory: int
    timeout: float
    fuel: int | None
    config: Mapping[str, str]
    instances: int
    grants: Grants
    version: str | None


def Plugin(
    source: Any,
    *,
    id: str,
    name: Any = None,
    memory: int | str,
    timeout: float,
    fuel: int | None = None,
    config: Mapping[str, str] | None = None,
    instances: int = 1,
    restart: str = "transient",
    shutdown: Any = 5.0,
    significant: bool = False,
    backoff: Backoff | None = None,
    wasi: bool = False,
    allowed_paths: Sequence[str] | Mapping[str, str] | None = None,
    allowed_hosts: Sequence[str] | None = None,
    version: str | None = None,
) -> ChildSpec:
    """A child spec that runs the WASM module ``source`` as a sandboxed plugin.

    ``source`` is a ``.wasm`` path, a ``.wat`` path, wasm bytes or WAT text; it is read
    and validated now (a missing or invalid module raises ``InvalidChildSpec``).
    ``memory`` caps every instance's linear memory (``"50MiB"`` or bytes), ``timeout``
    is the deadline of one call in seconds, ``fuel`` (optional) the instructions one
    call may run. ``config`` is what the Extism ``config_get`` import reads.

    Nothing of the host is reachable unless granted: ``wasi=True`` links WASI (clock,
    random; no environment, arguments or stdio), ``allowed_paths`` preopens
    directories read-only (a list, or ``{host_dir: guest_dir}``, implies ``wasi``),
    ``allowed_hosts`` lets Extism ``http_request`` reach those host names.

    Example::

        spec = trellis.Plugin("plugins/redactor.wasm", id="redactor", name="redactor",
                              memory="32MiB", timeout=2.0, instances=4)
    """
    if not isinstance(id, str) or not id:
        raise InvalidChildSpec(id, "a plugin id is a non-empty str", field="id")
    try:
        wasm, label = _engine.to_wasm(source)
    except ValueError as e:
        raise InvalidChildSpec(source, str(e), field="plugin") from None
    mem = parse_memory(memory)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0:
        raise InvalidChildSpec(timeout, "must be seconds > 0", field="timeout")
    if fuel is not None and (not isinstance(fuel, int) or isinstance(fuel, bool) or fuel <= 0):
        raise InvalidChildSpec(fuel, "must be an int > 0 (or None)", field="fuel")
    cfg_map = dict(config or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in cfg_map.items()):
        raise InvalidChildSpec(config, "config maps str to str", field="config")
    if not isinstance(instances, int) or isinstance(instances, bool) or not 1 <= instances <= 256:
        raise InvalidChildSpec(instances, "must be an int in 1..256", field="instances")
    paths: dict[str, str] = {}
    if allowed_paths:
        items = (
            allowed_paths.items()
            if isinstance(allowed_paths, Mapping)
            else ((p, p) for p in allowed_paths)
        )
        for host_dir, guest_dir in items:
            if not isinstance(host_dir, str) or not os.path.isdir(host_dir):
                raise InvalidChildSpec(host_dir, "not a directory", field="allowed_paths")
            paths[os.path.abspath(host_dir)] = str(guest_dir)
        wasi = True
    hosts = tuple(allowed_hosts or ())
    if not all(isinstance(h, str) and h for h in hosts):
        raise InvalidChildSpec(allowed_hosts, "a list of host names", field="allowed_hosts")
    import hashlib

    cfg = PluginConfig(
        id=id,
        wasm=wasm,
        source=label,
        sha256=hashlib.sha256(wasm).hexdigest(),
        name=name,
        memory=mem,
        timeout=float(timeout),
        fuel=fuel,
        config=cfg_map,
        instances=instances,
        grants=Grants(wasi=bool(wasi), allowed_paths=paths, allowed_hosts=hosts),
        version=version,
    )
    return ChildSpec(
        id=id,
        start=_start_plugin,
        args=(cfg,),
        restart=restart,
        shutdown=shutdown,
        significant=significant,
        modules=(label,),
        backoff=backoff,
    )


async def _start_plugin(cfg: PluginConfig) -> Any:
    return await PluginServer.start_link(cfg, name=cfg.name)


# ---------------------------------------------------------------------------
# Workers: one thread per instance
# ---------------------------------------------------------------------------


class _Job:
    __slots__ = ("data", "function", "fut", "t0")

    def __init__(self, function: str, data: Any, fut: asyncio.Future[bytes]) -> None:
        self.function = function
        self.data = data
        self.fut = fut
        self.t0 = time.perf_counter()


class _Worker:
    """A thread that owns one instance and runs its calls in order."""

    def __init__(self, pool: _Pool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.q: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.pending = 0
        self.memory_high = 0
        self.instance: Instance | None = None
        self.ready: asyncio.Future[None] = pool.loop.create_future()
        self.thread = threading.Thread(
            target=self._run, name=f"trellis-plugin-{pool.cfg.id}-{index}", daemon=True
        )

    def _run(self) -> None:
        cfg = self.pool.cfg
        post = self.pool.loop.call_soon_threadsafe
        try:
            compiled, _ = _engine.serialized(cfg.wasm, cfg.fuel is not None)
            inst = Instance(
                compiled,
                plugin=cfg.id,
                memory=cfg.memory,
                timeout=cfg.timeout,
                fuel=cfg.fuel,
                config=cfg.config,
                grants=cfg.grants,
            )
        except BaseException as e:
            with contextlib.suppress(RuntimeError):
                post(_settle_ready, self.ready, e)
            return
        self.instance = inst
        try:
            post(_settle_ready, self.ready, None)
        except RuntimeError:  # the loop is gone
            return
        settle = self.pool.settle
        get = self.q.get
        while True:
            job = get()
            if job is None or self.pool.closed is not None:
                break  # stopped: what is still queued was answered Exited by close()
            err: PluginError | None = None
            out = b""
            try:
                out = inst.call(job.function, job.data)
            except PluginError as e:
                err = e.with_traceback(None)  # its frames would keep the store alive
            except Exception as e:  # a bug in the glue: report it as a trap
                err = PluginError("trap", f"{type(e).__name__}: {e}", plugin=cfg.id)
            took = time.perf_counter() - job.t0
            try:
                post(settle, self, job, out, err, took, inst.memory_high, inst.fuel_used)
            except RuntimeError:
                break
            if err is not None and err.fatal:
                break
        self.instance = None  # the store goes with this thread


def _settle_ready(fut: asyncio.Future[None], err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


#: Call latency buckets (seconds) of ``plugin.stats`` (the last count is above them all).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0)
#: ``plugin.stats`` is emitted at most this often per plugin while calls succeed (and at
#: once for a failed call, and when the plugin stops): journal-friendly, metric-ready.
STATS_INTERVAL = 1.0


class _Window:
    __slots__ = ("buckets", "calls", "errors", "fuel", "seconds", "start")

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.calls = 0
        self.seconds = 0.0
        self.fuel = 0
        self.errors: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)


class _Pool:
    def __init__(self, cfg: PluginConfig, server: PluginServer) -> None:
        self.cfg = cfg
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.workers = [_Worker(self, i) for i in range(cfg.instances)]
        self.outstanding: set[asyncio.Future[bytes]] = set()
        self.closed: Any = None  # the exit reason once closed
        self.path = cfg.id
        self.calls = 0
        self.errors: dict[str, int] = {}
        self.memory_high = 0
        self.fuel_used = 0
        self.busy_seconds = 0.0
        self.window = _Window()

    async def start(self) -> None:
        for w in self.workers:
            w.thread.start()
        results = await asyncio.gather(*(w.ready for w in self.workers), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                self.close(r)
                raise r

    def submit(self, function: str, data: Any) -> asyncio.Future[bytes]:
        if self.closed is not None:
            raise Exited(self.closed, self.cfg.name or self.cfg.id)
        if not isinstance(function, str):
            raise TypeError(f"a plugin function name is a str, not {function!r}")
        w = min(self.workers, key=_pending) if len(self.workers) > 1 else self.workers[0]
        fut: asyncio.Future[bytes] = self.loop.create_future()
        w.pending += 1
        self.outstanding.add(fut)
        w.q.put(_Job(function, data, fut))
        return fut

    def settle(
        self,
        w: _Worker,
        job: _Job,
        out: bytes,
        err: PluginError | None,
        took: float,
        memory_high: int,
        fuel_used: int,
    ) -> None:
        w.pending -= 1
        fut = job.fut
        self.outstanding.discard(fut)
        self.calls += 1
        self.busy_seconds += took
        if memory_high > self.memory_high:
            self.memory_high = memory_high
        w.memory_high = memory_high
        self.fuel_used += fuel_used
        kind = "ok" if err is None else err.kind
        if err is not None:
            self.errors[kind] = self.errors.get(kind, 0) + 1
        win = self.window
        win.calls += 1
        win.seconds += took
        win.fuel += fuel_used
        if err is not None:
            win.errors[kind] = win.errors.get(kind, 0) + 1
        i = 0
        for bound in LATENCY_BUCKETS:  # few buckets: a scan beats bisect's call
            if took <= bound:
                break
            i += 1
        win.buckets[i] += 1
        if kind != "ok" or time.monotonic() - win.start >= STATS_INTERVAL:
            self.flush()
        if not fut.done():
            if err is None:
                fut.set_result(out)
            else:
                fut.set_exception(err)
        if err is not None and err.fatal and self.closed is None:
            # the exit reason is a copy: the caller's exception gets the caller's frames
            reason = PluginError(err.kind, err.message, plugin=err.plugin, function=err.function)
            self.closed = reason
            self.server.fatal(reason)

    def flush(self) -> None:
        """Emit ``plugin.stats`` for the calls since the last one (if any)."""
        win = self.window
        self.window = _Window()
        if win.calls == 0:
            return
        _telemetry.emit(
            "plugin.stats",
            path=self.path,
            plugin=self.cfg.id,
            version=self.cfg.version,
            calls=win.calls,
            errors=win.errors,
            seconds=win.seconds,
            buckets=[*zip(LATENCY_BUCKETS, win.buckets, strict=False), (None, win.buckets[-1])],
            memory_high=self.memory_high,
            fuel=win.fuel if self.cfg.fuel is not None else None,
            interval=time.monotonic() - win.start,
        )

    def close(self, reason: Any) -> None:
        self.flush()
        if self.closed is None:
            self.closed = reason
        for w in self.workers:
            w.q.put(None)
            inst = w.instance
            if inst is not None and w.pending:
                inst.interrupt()  # a call in flight stops now, not at its deadline
        target = self.cfg.name or self.cfg.id
        for fut in list(self.outstanding):
            if not fut.done():
                fut.set_exception(Exited(reason, target))
        self.outstanding.clear()

    def info(self) -> dict[str, Any]:
        return {
            "id": self.cfg.id,
            "path": self.path,
            "source": self.cfg.source,
            "sha256": self.cfg.sha256,
            "version": self.cfg.version,
            "instances": len(self.workers),
            "memory_limit": self.cfg.memory,
            "timeout": self.cfg.timeout,
            "fuel": self.cfg.fuel,
            "calls": self.calls,
            "errors": dict(self.errors),
            "memory_high": self.memory_high,
            "fuel_used": self.fuel_used,
            "busy_seconds": self.busy_seconds,
            "pending": sum(w.pending for w in self.workers),
        }


def _pending(w: _Worker) -> int:
    return w.pending


class PluginServer(Server):
    """The Trellis process of a plugin child (see :func:`Plugin`)."""

    pool: _Pool | None = None

    cfg: PluginConfig

    async def init(self, cfg: PluginConfig) -> None:
        self.cfg = cfg
        pool = _Pool(cfg, self)
        parent = self.pid._parent
        ppath = getattr(getattr(parent, "_server", None), "path", None) if parent else None
        pool.path = f"{ppath}/{cfg.id}" if ppath else cfg.id
        t0 = time.perf_counter()
        try:
            await pool.start()
        except PluginError as e:
            raise StartError(
                e, f"plugin {cfg.id!r} ({cfg.source}) cannot start: {e.message}"
            ) from None
        self.pool = pool
        _hosts.register_plugin(pool.path, self)
        asyncio.get_running_loop().create_task(self._reap(pool))
        _telemetry.emit(
            "plugin.started",
            path=pool.path,
            plugin=cfg.id,
            sha256=cfg.sha256,
            version=cfg.version,
            source=cfg.source,
            instances=cfg.instances,
            start_seconds=time.perf_counter() - t0,
        )

    async def _reap(self, pool: _Pool) -> None:
        reason = await self.pid.join()
        _hosts.unregister_plugin(pool.path, self)
        pool.close(reason)
        cfg = self.cfg
        _telemetry.emit(  # journaled: which module (sha256, version) ended, and why
            "plugin.stopped",
            path=pool.path,
            plugin=cfg.id,
            sha256=cfg.sha256,
            version=cfg.version,
            reason=reason,
            calls=pool.calls,
            errors=dict(pool.errors),
        )

    def fatal(self, err: PluginError) -> None:
        """An instance failed fatally: end this child with ``err`` as its reason."""
        send(self.pid, ("$plugin_fatal", err))

    async def handle_info(self, msg: Any) -> Any:
        if type(msg) is tuple and len(msg) == 2 and msg[0] == "$plugin_fatal":
            return Stop(msg[1])
        return await super().handle_info(msg)

    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "info" and self.pool is not None:
            return self.pool.info()
        raise NotImplementedError(f"plugin {self.cfg.id!r} got an unexpected call: {request!r}")


def _plugin_server(target: object) -> PluginServer:
    pid = resolve(target)
    if pid is None or pid._dead:
        raise NoProc(target)
    server = pid._server
    if not isinstance(server, PluginServer):
        raise TypeError(f"{target!r} is not a plugin")
    if server.pool is None:
        raise PluginError("unavailable", "still starting", plugin=server.cfg.id)
    return server


async def plugin_call(
    target: object, function: str, data: Any = b"", *, timeout: float | None = None
) -> bytes:
    """Call ``function`` of the plugin ``target`` (a name, a pid or a ``Via``) with
    ``data``; returns the bytes it output.

    The call runs on the plugin's own thread, never on the event loop's. ``data`` is
    bytes (or str) for an Extism-style export; for a plain numeric export it is a
    sequence of numbers (or a JSON array) and the result is JSON text.

    Raises ``PluginError`` (``.kind``: ``oom``, ``timeout``, ``fuel``, ``trap``,
    ``error``), ``NoProc`` when no such plugin runs, ``Exited`` when the plugin went
    down before answering, and ``CallTimeout`` when ``timeout`` (which may be shorter
    than the plugin's own deadline) passes first: the call still runs to its end or its
    deadline, and its answer is dropped.

    Example::

        out = await trellis.plugin_call("redactor", "redact", b'{"name": "Ann Lee"}')
    """
    pool = _plugin_server(target).pool
    assert pool is not None
    fut = pool.submit(function, data)
    if timeout is None:
        return await fut
    loop = pool.loop
    handle = loop.call_later(timeout, _expire, fut, target, function, timeout)
    try:
        return await fut
    finally:
        handle.cancel()


def _expire(fut: asyncio.Future[bytes], target: object, function: str, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(CallTimeout(target, function, timeout))


async def plugin_info(target: object) -> dict[str, Any]:
    """Counters of a running plugin: calls, errors by kind, memory high-water, fuel."""
    pool = _plugin_server(target).pool
    assert pool is not None
    return pool.info()

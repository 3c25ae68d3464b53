"""``PluginHost``: plugins loaded, upgraded and unloaded at run time, each with its own
crash budget, quarantined when it spends it.

Example::

    host = trellis.PluginHost(name="plugins", intensity=3, period=60.0)
    sup = await trellis.Supervisor.start_link([host.child_spec()])
    await host.load("validator", "plugins/fhir_validator.wasm", version="1.2.0",
                    memory="50MiB", timeout=5.0)
    out = await host.call("validator", "validate", record)
    await host.upgrade("validator", "plugins/fhir_validator-1.3.wasm", version="1.3.0",
                       check=("validate", sample))
    print(host.list())

Underneath is a ``DynamicSupervisor`` whose children are the plugins (restart
``temporary``): the host restarts a crashed plugin itself, so one plugin's crash loop
spends that plugin's budget (``intensity`` crashes within ``period`` seconds) and never
the supervisor's. A plugin past its budget is quarantined: not restarted, its calls
answered with ``PluginError(kind="unavailable")``, until ``release(id)``. Every load,
unload, upgrade, crash and quarantine is a telemetry event (journaled) carrying the
module's sha256 and version.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._childspec import ChildSpec, ChildType
from .._core import _telemetry
from .._core._clock import current_clock
from .._core._exceptions import NotFound, StartError
from .._core._process import Pid
from .._core._reasons import is_clean
from .._supervisor import DynamicSupervisor
from . import _hosts
from ._errors import PluginError, PluginRejected
from ._plugin import Plugin, PluginConfig, plugin_call

__all__ = ["PluginHost"]


@dataclass
class _Entry:
    id: str
    spec: ChildSpec
    cfg: PluginConfig
    pid: Pid | None = None
    state: str = "starting"  # running | restarting | quarantined | stopped
    crashes: deque[float] = field(default_factory=deque)
    restarts: int = 0
    last_reason: Any = None
    loaded_at: float = field(default_factory=time.time)
    watcher: asyncio.Task[None] | None = None


class PluginHost:
    """A supervisor of plugins loaded at run time (see the module docs).

    ``intensity`` / ``period``: each plugin's crash budget. ``allowed_sha256``: when
    given, only modules whose sha256 is in it may be loaded (``PluginRejected``).
    ``defaults``: ``Plugin`` keyword arguments applied to every load (``memory``,
    ``timeout``, ``fuel``, ``instances``, ...).
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        intensity: int = 3,
        period: float = 60.0,
        allowed_sha256: Iterable[str] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(intensity, int) or intensity < 0:
            raise ValueError(f"PluginHost intensity must be an int >= 0, not {intensity!r}")
        if not isinstance(period, int | float) or period <= 0:
            raise ValueError(f"PluginHost period must be seconds > 0, not {period!r}")
        self.name = name
        self.intensity = intensity
        self.period = float(period)
        self.allowed_sha256 = (
            None if allowed_sha256 is None else frozenset(s.lower() for s in allowed_sha256)
        )
        self.defaults: dict[str, Any] = {"memory": "50MiB", "timeout": 5.0, **(defaults or {})}
        self.path = name or "plugins"
        self.sup: Any = None
        self._entries: dict[str, _Entry] = {}

    # -- running ------------------------------------------------------------------
    def child_spec(self, id: str | None = None, restart: str = "permanent") -> ChildSpec:
        """A spec (type supervisor) that runs this host under a tree; when its parent
        restarts it, the plugins loaded before are loaded again (quarantine kept)."""
        return ChildSpec(
            id=id or self.path,
            start=self.start_link,
            restart=restart,
            shutdown="infinity",
            type=ChildType.SUPERVISOR,
        )

    async def start_link(self) -> Any:
        """Start the host's supervisor linked to the caller; returns its pid."""
        return await self._start(link=True)

    async def start(self) -> Any:
        """Like :meth:`start_link` without the link."""
        return await self._start(link=False)

    async def _start(self, link: bool) -> Any:
        starter = DynamicSupervisor.start_link if link else DynamicSupervisor.start
        # the host keeps each plugin's budget; the supervisor's own is never the limit
        sup = await starter(intensity=1_000_000, period=1.0, name=self.name)
        self.sup = sup
        path = getattr(getattr(sup, "_server", None), "path", None)
        if isinstance(path, str):
            self.path = path
        _hosts.register(self.path, self)
        for e in list(self._entries.values()):
            if e.state != "quarantined":
                await self._launch(e)
        return sup

    async def stop(self) -> None:
        """Stop every plugin and the host's supervisor."""
        sup, self.sup = self.sup, None
        _hosts.unregister(self.path, self)
        if sup is not None and sup.alive:
            await sup.stop()
        for e in self._entries.values():
            if e.watcher is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await e.watcher

    # -- loading ------------------------------------------------------------------
    def _spec(self, id: str, source: Any, version: str | None, kw: Mapping[str, Any]) -> ChildSpec:
        opts = {**self.defaults, **kw}
        opts.pop("restart", None)
        spec = Plugin(source, id=id, version=version, restart="temporary", **opts)
        cfg: PluginConfig = spec.args[0]
        if self.allowed_sha256 is not None and cfg.sha256 not in self.allowed_sha256:
            raise PluginRejected(cfg.sha256, cfg.source)
        return spec

    async def load(
        self, id: str, source: Any, *, version: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Load and start a plugin; ``kwargs`` are ``Plugin``'s (memory, timeout, ...).

        Raises ``ValueError`` when ``id`` is loaded already, ``InvalidChildSpec`` for a
        missing or invalid module, ``PluginRejected`` off the allow-list, ``StartError``
        when it cannot start."""
        self._need_running()
        if id in self._entries:
            raise ValueError(f"plugin {id!r} is loaded already (unload or upgrade it)")
        spec = self._spec(id, source, version, kwargs)
        entry = _Entry(id, spec, spec.args[0])
        await self._launch(entry)  # raises StartError: nothing recorded
        self._entries[id] = entry
        self._event("plugin.loaded", entry)
        return self._row(entry)

    async def unload(self, id: str) -> None:
        """Stop a plugin and forget it (``NotFound`` when it is not loaded)."""
        entry = self._entries.pop(id, None)
        if entry is None:
            raise NotFound(id)
        entry.state = "stopped"
        await self._halt(entry)
        self._event("plugin.unloaded", entry)

    async def upgrade(
        self,
        id: str,
        source: Any,
        *,
        version: str | None = None,
        check: tuple[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Replace a plugin's module: the new version is started (and, with ``check=(fn,
        data)``, called once) before the old one stops. If it cannot start or its check
        fails, the new one is stopped, the old keeps serving, and the error is raised.
        Settings not given are kept from the running version."""
        self._need_running()
        old = self._entries.get(id)
        if old is None:
            raise NotFound(id)
        kept = {
            "memory": old.cfg.memory,
            "timeout": old.cfg.timeout,
            "fuel": old.cfg.fuel,
            "config": dict(old.cfg.config),
            "instances": old.cfg.instances,
            "wasi": old.cfg.grants.wasi,
            "allowed_paths": dict(old.cfg.grants.allowed_paths) or None,
            "allowed_hosts": list(old.cfg.grants.allowed_hosts) or None,
        }
        try:
            spec = self._spec(id, source, version, {**kept, **kwargs})
        except Exception as e:
            self._event("plugin.upgrade_failed", old, reason=e, to_version=version)
            raise
        new = _Entry(id, spec, spec.args[0])
        try:
            await self._launch(new, watch=False)
            if check is not None:
                await plugin_call(new.pid, check[0], check[1], timeout=new.cfg.timeout + 1.0)
        except BaseException as e:
            new.state = "stopped"
            await self._halt(new)
            self._event(
                "plugin.upgrade_failed",
                old,
                reason=e,
                to_version=version,
                to_sha256=new.cfg.sha256,
            )
            raise
        self._watch(new)
        self._entries[id] = new
        old.state = "stopped"
        await self._halt(old)
        self._event(
            "plugin.upgraded",
            new,
            from_version=old.cfg.version,
            from_sha256=old.cfg.sha256,
        )
        return self._row(new)

    async def release(self, id: str) -> dict[str, Any]:
        """Lift a quarantine: forget the plugin's crashes and start it again."""
        self._need_running()
        entry = self._entries.get(id)
        if entry is None:
            raise NotFound(id)
        if entry.state == "quarantined":
            entry.crashes.clear()
            await self._launch(entry)
            self._event("plugin.released", entry)
        return self._row(entry)

    # -- calling and looking ---------------------------------------------------------
    async def call(
        self, id: str, function: str, data: Any = b"", *, timeout: float | None = None
    ) -> bytes:
        """``plugin_call`` on plugin ``id``; ``PluginError(kind="unavailable")`` while it
        is quarantined or restarting, ``NotFound`` when it is not loaded."""
        entry = self._entries.get(id)
        if entry is None:
            raise NotFound(id)
        pid = entry.pid
        if pid is None or entry.state != "running" or pid._dead:
            raise PluginError(
                "unavailable", f"plugin is {entry.state}", plugin=id, function=function
            )
        return await plugin_call(pid, function, data, timeout=timeout)

    def list(self) -> list[dict[str, Any]]:
        """One row per loaded plugin: id, version, sha256, state, restarts, crashes in the
        current window, calls, errors by kind, memory high-water mark, fuel used."""
        return [self._row(e) for e in self._entries.values()]

    def get(self, id: str) -> dict[str, Any]:
        entry = self._entries.get(id)
        if entry is None:
            raise NotFound(id)
        return self._row(entry)

    def _row(self, e: _Entry) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": e.id,
            "version": e.cfg.version,
            "sha256": e.cfg.sha256,
            "source": e.cfg.source,
            "state": e.state,
            "restarts": e.restarts,
            "crashes": len(e.crashes),
            "last_exit": None if e.last_reason is None else str(e.last_reason),
            "memory_limit": e.cfg.memory,
            "timeout": e.cfg.timeout,
            "instances": e.cfg.instances,
        }
        pid = e.pid
        if pid is not None and not pid._dead:
            with contextlib.suppress(Exception):
                info = _info_now(pid)
                for k in ("calls", "errors", "memory_high", "fuel_used", "busy_seconds"):
                    row[k] = info[k]
        return row

    # -- internals ------------------------------------------------------------------
    def _need_running(self) -> None:
        if self.sup is None or not self.sup.alive:
            raise RuntimeError("the plugin host is not running (start it first)")

    async def _launch(self, entry: _Entry, watch: bool = True) -> None:
        entry.state = "starting"
        try:
            pid = await self.sup.start_child(entry.spec)
        except StartError:
            entry.state = "stopped"
            raise
        entry.pid = pid
        entry.state = "running"
        if watch:
            self._watch(entry)

    def _watch(self, entry: _Entry) -> None:
        pid = entry.pid
        assert pid is not None
        entry.watcher = asyncio.get_running_loop().create_task(self._watcher(entry, pid))

    async def _watcher(self, entry: _Entry, pid: Pid) -> None:
        reason = await pid.join()
        if self._entries.get(entry.id) is not entry or entry.pid is not pid:
            return  # unloaded or replaced meanwhile
        if entry.state == "stopped" or self.sup is None or not self.sup.alive:
            return
        entry.last_reason = reason
        if is_clean(reason):
            entry.state = "stopped"
            return
        now = current_clock().now()
        entry.crashes.append(now)
        while entry.crashes and entry.crashes[0] <= now - self.period:
            entry.crashes.popleft()
        self._event("plugin.crashed", entry, reason=reason)
        if len(entry.crashes) > self.intensity:
            entry.state = "quarantined"
            entry.pid = None
            self._event(
                "plugin.quarantined",
                entry,
                reason=reason,
                crashes=len(entry.crashes),
                period=self.period,
            )
            return
        entry.state = "restarting"
        try:
            await self._launch(entry)
        except Exception as e:
            entry.state = "quarantined"
            entry.pid = None
            self._event("plugin.quarantined", entry, reason=e, crashes=len(entry.crashes))
            return
        entry.restarts += 1
        self._event("plugin.restarted", entry)

    async def _halt(self, entry: _Entry) -> None:
        pid = entry.pid
        entry.pid = None
        if pid is not None and not pid._dead and self.sup is not None and self.sup.alive:
            with contextlib.suppress(Exception):
                await self.sup.terminate_child(pid)
        if entry.watcher is not None and entry.watcher is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await entry.watcher

    def _event(self, name: str, entry: _Entry, **fields: Any) -> None:
        _telemetry.emit(
            name,
            path=f"{self.path}/{entry.id}",
            plugin=entry.id,
            version=entry.cfg.version,
            sha256=entry.cfg.sha256,
            source=entry.cfg.source,
            state=entry.state,
            **fields,
        )


def _info_now(pid: Pid) -> dict[str, Any]:
    server = pid._server
    pool = getattr(server, "pool", None)
    if pool is None:
        raise LookupError(pid)
    info: dict[str, Any] = pool.info()
    return info

"""The running ``PluginHost`` objects, by tree path, for the control API and CLI (no
wasmtime import: the control server reads this without loading the runtime)."""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["find", "register", "running"]

_hosts: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def register(path: str, host: Any) -> None:
    _hosts[path] = host


def unregister(path: str, host: Any) -> None:
    if _hosts.get(path) is host:
        del _hosts[path]


def running() -> dict[str, Any]:
    """Every host whose supervisor is alive, by path."""
    out = {}
    for path, host in list(_hosts.items()):
        sup = getattr(host, "sup", None)
        if sup is not None and sup.alive:
            out[path] = host
    return out


def find(name: str | None) -> Any:
    """The host at ``name`` (its path, or its last part), or the only one running.
    Raises ``LookupError`` with a message for the caller."""
    hosts = running()
    if name:
        name = name.strip("/")
        for path, host in hosts.items():
            if path == name or path.rsplit("/", 1)[-1] == name:
                return host
        raise LookupError(f"no plugin host {name!r} (running: {', '.join(hosts) or 'none'})")
    if len(hosts) == 1:
        return next(iter(hosts.values()))
    if not hosts:
        raise LookupError("no plugin host is running in this tree")
    raise LookupError(f"several plugin hosts run ({', '.join(hosts)}): name one with host")


# Plugin children (trellis.Plugin under any supervisor, hosted or not), by tree path.
_plugins: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def register_plugin(path: str, server: Any) -> None:
    _plugins[path] = server


def unregister_plugin(path: str, server: Any) -> None:
    if _plugins.get(path) is server:
        del _plugins[path]


def plugins() -> dict[str, Any]:
    """Every running plugin child's server, by tree path."""
    return {p: s for p, s in list(_plugins.items()) if s.pid.alive and s.pool is not None}


def find_plugin(name: str) -> Any:
    """The running plugin child at ``name`` (its path, the path without the root's
    name, its registered name or its id when only one has it); ``LookupError``."""
    name = name.strip("/")
    running = plugins()
    if name in running:
        return running[name]
    hits = [
        s
        for p, s in running.items()
        if p.split("/", 1)[-1] == name or s.cfg.name == name or s.cfg.id == name
    ]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise LookupError(f"no plugin {name!r} runs in this tree")
    raise LookupError(f"several plugins match {name!r}: give its tree path")

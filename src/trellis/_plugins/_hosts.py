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

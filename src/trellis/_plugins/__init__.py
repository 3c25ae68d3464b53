"""WASM plugins as children of a supervision tree (``Plugin``, ``plugin_call``,
``PluginHost``), on wasmtime, speaking the Extism plugin ABI.

Only ``PluginError`` is imported eagerly: wasmtime takes tens of milliseconds to load,
so the rest is imported when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import PluginError

if TYPE_CHECKING:
    from ._host import PluginHost
    from ._plugin import Plugin, PluginServer, parse_memory, plugin_call, plugin_info

__all__ = [
    "Plugin",
    "PluginError",
    "PluginHost",
    "PluginServer",
    "parse_memory",
    "plugin_call",
    "plugin_info",
]

_LAZY = {
    "Plugin": "_plugin",
    "PluginServer": "_plugin",
    "parse_memory": "_plugin",
    "plugin_call": "_plugin",
    "plugin_info": "_plugin",
    "PluginHost": "_host",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value

"""Isolated Python servers: a ``trellis.Server`` in an interpreter of its own.

The names are imported on first use, so the isolated interpreter itself
(``python -m trellis._isolated._child``) does not import the parent's side."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Isolated", "IsolatedExit", "UnsupportedMessage", "message_type"]

_WHERE = {
    "Isolated": "._proxy",
    "IsolatedExit": "._proxy",
    "UnsupportedMessage": "._wire",
    "message_type": "._wire",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'trellis._isolated' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)

"""The server bench_isolated.py runs in an interpreter of its own (importable by name)."""

from __future__ import annotations

import ctypes
from typing import Any

import trellis


class Echo(trellis.Server):
    async def handle_call(self, request: Any, caller: trellis.Caller) -> Any:
        if request == "segfault":
            ctypes.string_at(0)
        return request

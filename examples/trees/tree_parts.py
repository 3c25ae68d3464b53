"""Servers and workers that the example trees run: each prints when it starts and stops."""

from __future__ import annotations

import asyncio
from typing import Any

import trellis


class Part(trellis.Server):
    """A server that prints ``start <label>`` and ``stop <label>``; ``crash=True`` crashes it
    right after it starts."""

    trap_exits = True

    async def init(self, label: str, crash: bool = False) -> None:
        self.label = label
        print("start", label, flush=True)
        if crash:
            trellis.cast(self.pid, "crash")

    async def handle_call(self, request: Any, caller: Any) -> Any:
        return self.label

    async def handle_cast(self, msg: Any) -> None:
        raise RuntimeError(f"{self.label} crashed")

    async def terminate(self, reason: Any) -> None:
        print("stop", self.label, flush=True)


async def ticker(label: str, interval: float = 1.0) -> None:
    """A worker loop that prints ``start <label>`` and ``stop <label>``."""
    print("start", label, flush=True)
    ticks = 0
    try:
        while True:
            await asyncio.sleep(interval)
            ticks += 1
    finally:
        print("stop", label, flush=True)

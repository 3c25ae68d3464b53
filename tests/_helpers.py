"""Small process bodies and loop helpers shared by the tests."""

from __future__ import annotations

import asyncio
from typing import Any

import trellis


async def settle(n: int = 30) -> None:
    """Let the event loop run pending callbacks (no real sleeping)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def idle() -> None:
    """A process that waits forever, discarding any message."""
    while True:
        await trellis.receive()


async def collector(out: list[Any]) -> None:
    """A process that appends every message it receives to ``out``."""
    while True:
        out.append(await trellis.receive())

"""Test helpers: a virtual clock, telemetry capture and waiting for restarts.

Example::

    from trellis.testing import VirtualClock, use_clock, capture_telemetry

    async def test_gives_up():
        clock = VirtualClock()
        with use_clock(clock), capture_telemetry() as cap:
            sup = await trellis.Supervisor.start_link([spec], intensity=1, period=5.0)
            ...
            await cap.wait_for("supervisor.gave_up")
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ._core import _telemetry
from ._core._clock import VirtualClock, use_clock
from ._core._process import Pid, live_processes

__all__ = [
    "Capture",
    "VirtualClock",
    "capture_telemetry",
    "live_processes",
    "use_clock",
    "wait_restarted",
]


class Capture:
    """Events seen while a :func:`capture_telemetry` block runs."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed: asyncio.Event | None = None

    def _push(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if self._changed is not None:
            self._changed.set()

    def named(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        """The captured events called ``name`` whose fields equal ``fields``."""
        return [e for e in self.events if e["event"] == name and _matches(e, fields)]

    async def wait_for(
        self, name: str, timeout: float = 5.0, *, after: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """The first event (from index ``after``) called ``name`` matching ``fields``;
        waits up to ``timeout`` real seconds, then raises ``TimeoutError``."""
        if self._changed is None:
            self._changed = asyncio.Event()
        async with asyncio.timeout(timeout):
            while True:
                for e in self.events[after:]:
                    if e["event"] == name and _matches(e, fields):
                        return e
                self._changed.clear()
                await self._changed.wait()


def _matches(event: dict[str, Any], fields: dict[str, Any]) -> bool:
    return all(k in event and (event[k] is v or event[k] == v) for k, v in fields.items())


@contextmanager
def capture_telemetry(events: Iterable[str] | None = None) -> Iterator[Capture]:
    """Record telemetry events (optionally only those named) while the block runs."""
    cap = Capture()
    hid = _telemetry.attach(cap._push, events)
    try:
        yield cap
    finally:
        _telemetry.detach(hid)


async def wait_restarted(sup: Pid, child_id: Any, old_pid: Any, timeout: float = 5.0) -> Pid:
    """Wait until ``sup``'s child ``child_id`` runs with a pid other than ``old_pid``."""
    async with asyncio.timeout(timeout):
        while True:
            for info in await sup.which_children():  # type: ignore[attr-defined]
                pid = info.pid
                if (
                    info.id == child_id
                    and isinstance(pid, Pid)
                    and pid is not old_pid
                    and pid.alive
                ):
                    return pid
            await asyncio.sleep(0)

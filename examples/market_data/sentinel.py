"""The sentinel: kills a collector that is alive but silent, so its supervisor restarts it.

Collectors heartbeat (``("heartbeat", pid, id, received)`` casts) while they
process the feed. Every ``interval`` the sentinel lists the collectors'
supervisor's children; one whose last heartbeat (or, if it never sent one, its
first sighting) is older than ``silence`` seconds gets the exit signal
``trellis.Hung("no heartbeat for <silence>s")``: it dies with that reason, the
supervisor restarts it, and the exit classifies as ``hung``. Each kill is
emitted as telemetry ``market_data.sentinel.hung`` (``child_id``, ``silent_for``).

Example::

    pid = await Sentinel.start_link(silence=2.0, name="market_data.sentinel")

Calls: ``"stats"`` -> ``{"kills": [...], "watched": n}``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from examples.market_data._common import COLLECTORS

import trellis

__all__ = ["Sentinel"]

_log = logging.getLogger("market_data.sentinel")
_CHECK = "check"


class Sentinel(trellis.Server):
    """Hang detection for collectors; see the module docstring."""

    async def init(
        self, *, silence: float = 2.0, interval: float = 0.25, collectors: str = COLLECTORS
    ) -> None:
        if not silence > 0 or not interval > 0:
            raise ValueError(
                f"Sentinel: silence and interval must be > 0, got {silence}, {interval}"
            )
        self.silence = float(silence)
        self.interval = float(interval)
        self.collectors = collectors
        self.loop = asyncio.get_running_loop()
        self.last: dict[trellis.Pid, float] = {}
        self.kills: list[dict[str, Any]] = []
        self.loop.call_later(self.interval, self.pid.send, _CHECK)

    async def handle_cast(self, msg: Any) -> Any:
        if isinstance(msg, tuple) and len(msg) == 4 and msg[0] == "heartbeat":
            pid = msg[1]
            if isinstance(pid, trellis.Pid) and pid.alive:
                self.last[pid] = self.loop.time()
        return None

    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "stats":
            return {"kills": list(self.kills), "watched": len(self.last)}
        raise ValueError(f"Sentinel: unknown call {request!r}")

    async def handle_info(self, msg: Any) -> Any:
        if msg == _CHECK:
            await self._check()
            self.loop.call_later(self.interval, self.pid.send, _CHECK)
        return None

    async def _check(self) -> None:
        sup = trellis.whereis(self.collectors)
        if sup is None:
            return
        try:
            children = await sup.which_children()  # type: ignore[attr-defined]
        except trellis.TrellisError:
            return  # the supervisor is going away: nothing to watch now
        now = self.loop.time()
        live = {}
        for info in children:
            if isinstance(info.pid, trellis.Pid) and info.pid.alive:
                live[info.pid] = info.id
        self.last = {p: t for p, t in self.last.items() if p in live}
        for pid, cid in live.items():
            last = self.last.setdefault(pid, now)
            silent = now - last
            if silent > self.silence:
                reason = trellis.Hung(f"no heartbeat for {self.silence:g}s")
                _log.warning("%s silent for %.2fs: killing it (hung)", cid, silent)
                self.kills.append({"child_id": cid, "silent_for": silent, "at": now})
                del self.last[pid]
                trellis.telemetry.emit(
                    "market_data.sentinel.hung", child_id=cid, pid=pid, silent_for=silent
                )
                trellis.exit(pid, reason)

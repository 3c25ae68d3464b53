"""One node of the notification service: what ``node.toml`` names.

``Dispatchers`` is this node's part of the distributed supervisor ``dispatchers`` (one
dispatcher per priority and partition, spread over the live nodes); ``seed`` registers
those dispatchers in the cluster once (a second node's seed finds them present).
"""

from __future__ import annotations

import logging
from typing import Any

from examples.notify import common
from examples.notify.dispatcher import dispatch

import trellis
import trellis.cluster as tc

__all__ = ["KINDS", "Dispatchers", "seed"]

_log = logging.getLogger("notify.node")


def _dispatcher(child_id: str) -> trellis.ChildSpec:
    # shutdown: a dispatcher stopped by a drain finishes nothing new, puts its unsent
    # claims back and exits; 10 s covers a batch in flight to a slow provider
    return trellis.worker(child_id, dispatch, child_id, shutdown=10.0)


KINDS = {"dispatch": _dispatcher}


class Dispatchers(tc.DistributedSupervisor):
    """``server = "examples.notify.node:Dispatchers"`` in a tree file."""

    @classmethod
    def child_spec(cls, *, id: Any = None, restart: str = "permanent", **_: Any) -> Any:  # type: ignore[override]
        spec = super().child_spec("dispatchers", KINDS, id=id, restart=restart)
        return spec

    async def init(self, name: str = "dispatchers", kinds: Any = None) -> None:
        await super().init(name, kinds if kinds is not None else KINDS)


async def seed() -> None:
    """Register every dispatcher of the cluster (idempotent)."""
    settings = common.Settings.from_env()
    for child_id in common.dispatcher_ids(settings.partitions):
        try:
            await tc.start_child("dispatchers", "dispatch", child_id)
        except trellis.AlreadyPresent:
            pass
    _log.info("dispatchers registered: %s", ", ".join(common.dispatcher_ids(settings.partitions)))

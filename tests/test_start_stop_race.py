"""A stop request that lands after a child's init returned but before its supervisor
resumed: the child is started, so it is stopped in order (its terminate runs), not killed
as a half-started one."""

from __future__ import annotations

import asyncio
from typing import Any

import trellis
from trellis._core import _stopping

events: list[str] = []


class Part(trellis.Server):
    trap_exits = True

    async def init(self, name: str, stop_after_init: bool = False) -> None:
        self.name = name
        events.append(f"start {name}")
        if stop_after_init:
            # runs before the supervisor's wakeup on this init's ack: the stop lands in
            # the window between "init returned" and "the supervisor resumed"
            loop = asyncio.get_running_loop()
            tree_stop = _stopping.get(loop)
            assert tree_stop is not None
            loop.call_soon(tree_stop.request)

    async def terminate(self, reason: Any) -> None:
        events.append(f"stop {self.name} {reason}")


async def test_a_child_whose_init_returned_is_stopped_in_order_not_killed() -> None:
    events.clear()
    loop = asyncio.get_running_loop()
    tree_stop = _stopping.arm(loop)
    try:
        specs = [
            Part.child_spec("a", id="a"),
            Part.child_spec("b", True, id="b"),
            Part.child_spec("c", id="c"),
        ]
        try:
            sup = await trellis.Supervisor.start_link(specs)
        except trellis.StartError:
            sup = None
        assert sup is None or not sup.alive
        assert events == ["start a", "start b", "stop b SHUTDOWN", "stop a SHUTDOWN"], events
    finally:
        _stopping.disarm(loop, tree_stop)

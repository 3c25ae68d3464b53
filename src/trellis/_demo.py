"""The bundled demo: a small tree that crashes, restarts and escalates, narrated live."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import telemetry
from ._core._process import Pid, exit
from ._core._reasons import is_clean
from ._server import Server, call, cast
from ._supervisor import Supervisor, SupervisorPid
from ._worker import worker

__all__ = ["demo"]


class Sink(Server):
    """Collects numbers from the source; crashes on request."""

    async def init(self) -> None:
        self.total = 0

    async def handle_call(self, request: Any, caller: Any) -> Any:
        return self.total

    async def handle_cast(self, msg: Any) -> None:
        if msg == "poison":
            raise RuntimeError("sink swallowed poison")
        self.total += msg


async def source() -> None:
    """Feeds the sink forever."""
    n = 0
    while True:
        n += 1
        cast("sink", n)
        await asyncio.sleep(0.05)


class Pipeline(Supervisor):
    async def init(self) -> Any:
        from ._childspec import SupervisorSpec

        return SupervisorSpec(
            [Sink.child_spec(id="sink", name="sink"), worker("source", source)],
            strategy="rest_for_one",
            intensity=2,
            period=5.0,
        )


def _narrate(event: dict[str, Any]) -> None:
    name = event["event"]
    where = f"{event.get('supervisor', '')}/{event.get('child_id', '')}".strip("/")
    if name == "child.exited":
        reason = event["reason"]
        verdict = "restarting" if event["restart"] else "not restarted"
        kind = "clean exit" if is_clean(reason) else "CRASH"
        print(f"  ! {where}: {kind} ({reason!r}) -> {verdict}")
    elif name == "child.restarted":
        print(f"  + {where}: restarted as {event['pid']!r}")
    elif name == "supervisor.gave_up":
        print(
            f"  !! {event['supervisor']}: more than {event['intensity']} restarts in "
            f"{event['period']}s -> gives up and escalates"
        )
    elif name == "child.terminated":
        print(f"  - {where}: stopped ({event['reason']!r})")


async def _child(sup: SupervisorPid, cid: str) -> Pid:
    for info in await sup.which_children():
        if info.id == cid and isinstance(info.pid, Pid):
            return info.pid
    raise LookupError(cid)


async def _tree(sup: SupervisorPid, indent: str = "  ") -> None:
    for info in reversed(await sup.which_children()):
        print(f"{indent}{info.id:<10} {info.type:<10} {info.pid!r}")
        if info.type == "supervisor" and isinstance(info.pid, SupervisorPid):
            await _tree(info.pid, indent + "    ")


async def demo() -> int:
    logging.getLogger("trellis").setLevel(logging.CRITICAL)  # the narration says it all
    hid = telemetry.attach(_narrate)
    try:
        root = await Supervisor.start_link(
            [Pipeline.child_spec(id="pipeline")], intensity=3, period=10.0, name="root"
        )
        print("Started the tree (root: one_for_one; pipeline: rest_for_one, intensity 2 per 5 s):")
        await _tree(root)
        await asyncio.sleep(0.3)
        pipeline = await _child(root, "pipeline")
        assert isinstance(pipeline, SupervisorPid)
        print(f"\nThe sink has summed {await call('sink', 'total')} so far.")

        print("\n1. Poison the sink: it crashes; rest_for_one restarts it and the source after it.")
        cast("sink", "poison")
        await asyncio.sleep(0.2)
        await _tree(root)

        print("\n2. Kill the source: only the source restarts (nothing started after it).")
        exit(await _child(pipeline, "source"), RuntimeError("source lost its connection"))
        await asyncio.sleep(0.2)

        print("\n3. A third failure within 5 s: the pipeline gives up; the root restarts it.")
        cast("sink", "poison")
        await asyncio.sleep(0.3)
        print("\nThe tree after the escalation (a fresh pipeline):")
        await _tree(root)
        print(f"The new sink started again from zero: {await call('sink', 'total')} so far.")

        print("\n4. Orderly shutdown, in reverse start order:")
        await root.stop()
        print("\nDone: a group restart, a single restart, and an escalation to the root.")
        return 0
    finally:
        telemetry.detach(hid)

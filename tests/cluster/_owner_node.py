"""A node for the global-name and pubsub tests: ``python _owner_node.py URL NODE DIR``.

It registers ``Counter`` as ``trellis.Global("counter")``, subscribes a worker to the
topic ``news`` (each message is appended to DIR/news.log), and publishes ``("tick",
n)`` on ``ticks`` every 0.1 s."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import trellis
import trellis.cluster as tc

url, node, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])


class Counter(trellis.Server):
    async def init(self) -> None:
        self.n = 0

    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "get":
            return self.n
        if request == "node":
            return node
        if request == "die_mid_call":
            await asyncio.sleep(0.3)
            raise RuntimeError("died mid-call")
        if isinstance(request, tuple) and request[0] == "add":
            self.n += request[1]
            return self.n
        return ("echo", request)

    async def handle_cast(self, msg: Any) -> None:
        self.n += msg


async def listener() -> None:
    trellis.pubsub.subscribe("news")
    while True:
        msg = await trellis.receive()
        with open(out / "news.log", "a") as f:  # noqa: ASYNC230
            f.write(repr(msg) + "\n")


async def ticker() -> None:
    n = 0
    while True:
        n += 1
        trellis.pubsub.publish("ticks", ("tick", node, n))
        await asyncio.sleep(0.1)


children = [
    Counter.child_spec(id="counter", name=trellis.Global("counter"), restart="temporary"),
    trellis.worker("listener", listener),
    trellis.worker("ticker", ticker),
]
cluster = tc.Cluster(tc.ClusterSettings(url, node=node, name="g", lease_ttl=1.0))
sys.exit(trellis.run(lambda: trellis.Supervisor.start_link(children), extensions=[cluster]))

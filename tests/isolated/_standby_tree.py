"""Run by test_standby.py as a Trellis process of its own: a tree with one isolated
server. Prints "up" once the server and its standby run, then waits to be killed."""

from __future__ import annotations

import asyncio

import trellis
from _isolated_servers import Counter


async def main() -> None:
    await trellis.Supervisor.start_link([trellis.Isolated(Counter, id="c", name="iso")])
    # a call answered after the start: the standby's interpreter has been spawned
    await trellis.call("iso", "get")
    print("up", flush=True)
    await asyncio.sleep(600)


if __name__ == "__main__":
    asyncio.run(main())

"""Instructions per spawn of an idle server (deterministic, for A/B work on the spawn path).

Usage, under valgrind (counts instructions, so the machine's noise does not matter):

    ir() { PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
             .venv/bin/python bench/instructions_spawn.py "$1" "$2" 2>&1 \
           | grep -oP "Collected : \\K[0-9]+"; }
    echo "trellis: $(( ($(ir t 5200) - $(ir t 200)) / 5000 )) per spawn"
    echo "floor:   $(( ($(ir f 5200) - $(ir f 200)) / 5000 )) per spawn"

Mode ``t``: ``await BenchServer.start()`` (``init`` overridden, as in ``bench_core.py``), every
server kept alive. Mode ``f``: the plain-asyncio floor (an ``asyncio.Queue`` actor whose task
acknowledges its start). 200 are spawned first as a warm-up, then ``gc.collect()``. An optional
third argument ``uvloop`` runs both on uvloop. The garbage collector stays on: what the kept
servers cost it is part of the figure, as in ``bench_core.py``.
"""

import asyncio
import gc
import os
import sys

import trellis

mode, N = sys.argv[1], int(sys.argv[2])


class BenchServer(trellis.Server):
    async def init(self) -> None:
        self.count = 0

    async def handle_call(self, request, caller):
        return request


async def floor_actor(q, ready):
    ready.set_result(None)
    while True:
        _kind, payload, fut = await q.get()
        fut.set_result(payload)


async def floor_start():
    loop = asyncio.get_running_loop()
    q = asyncio.Queue()
    ready = loop.create_future()
    task = loop.create_task(floor_actor(q, ready))
    await ready
    return q, task


async def main():
    start = BenchServer.start if mode == "t" else floor_start
    keep = [await start() for _ in range(200)]
    gc.collect()
    for _ in range(N):
        keep.append(await start())
    for _ in range(3):
        await asyncio.sleep(0)
    os._exit(0)  # skip tearing down N tasks


if sys.argv[3:] == ["uvloop"]:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
else:
    asyncio.run(main())

"""Instructions per restart (deterministic, for A/B work on the restart path).

Usage, under valgrind (counts instructions, so the machine's noise does not matter):

    ir() { valgrind --tool=callgrind --callgrind-out-file=/dev/null \
             .venv/bin/python bench/instructions_restart.py "$1" "$2" 2>&1 \
           | grep -oP "Collected : \\K[0-9]+"; }
    echo "trellis: $(( ($(ir t 1100) - $(ir t 100)) / 1000 )) per restart"
    echo "floor:   $(( ($(ir f 1100) - $(ir f 100)) / 1000 )) per restart"

Mode ``t``: a one_for_one Supervisor with a telemetry handler; each restart is a crash
cast, the handler's ``child.restarted`` event, then a call to the new child. Mode ``a``:
the same with the loop's tree-stop flag armed, as under ``trellis run`` (each restart's
start can then be cancelled by a stop request). Mode ``f``: the plain-asyncio floor (a
Queue actor under a hand-rolled restart loop). An optional third argument ``uvloop``
runs both on uvloop instead of asyncio's default loop.

Set ``PYTHONHASHSEED=0`` for repeatable counts (otherwise runs differ by ~2k per restart).
"""

import asyncio
import logging
import sys

import trellis
from trellis._core import _stopping

logging.getLogger("trellis").setLevel(logging.CRITICAL)
logging.getLogger("floor").setLevel(logging.CRITICAL)
N = int(sys.argv[2])
mode = sys.argv[1]


class W(trellis.Server):
    async def handle_call(self, r, c):
        return r

    async def handle_cast(self, m):
        raise RuntimeError("crash")


async def tr():
    loop = asyncio.get_running_loop()
    box = {"w": None}

    def on(ev):
        if ev["event"] == "child.restarted":
            w = box["w"]
            if w and not w.done():
                w.set_result(ev["pid"])

    if mode == "a":
        _stopping.arm(loop)
    trellis.telemetry.attach(on)
    sup = await trellis.Supervisor.start_link([W.child_spec(id="w")], intensity=10**9, period=1.0)
    (info,) = await sup.which_children()
    pid = info.pid
    for _ in range(N):
        w = box["w"] = loop.create_future()
        trellis.cast(pid, "x")
        pid = await w
        await trellis.call(pid, "p")
    await sup.stop()


async def actor(q, ready):
    ready.set_result(None)
    while True:
        m = await q.get()
        if m[0] == "crash":
            raise RuntimeError("x")
        m[2].set_result(m[1])


async def fl():
    loop = asyncio.get_running_loop()
    box = {"w": loop.create_future()}

    async def sup_loop():
        while True:
            q = asyncio.Queue()
            ready = loop.create_future()
            t = loop.create_task(actor(q, ready))
            await ready
            w = box["w"]
            if w and not w.done():
                w.set_result(q)
            try:
                await t
            except Exception as e:
                logging.getLogger("floor").error("crashed", exc_info=e)

    s = loop.create_task(sup_loop())
    q = await box["w"]
    for _ in range(N):
        w = box["w"] = loop.create_future()
        q.put_nowait(("crash", 0, None))
        q = await w
        f = loop.create_future()
        q.put_nowait(("p", 1, f))
        await f
    s.cancel()


main = tr() if mode in ("t", "a") else fl()
if sys.argv[3:] == ["uvloop"]:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
else:
    asyncio.run(main)

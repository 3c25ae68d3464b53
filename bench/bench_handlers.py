"""What each telemetry subscriber adds to one restart: the two events of a restart
(``child.exited`` + ``child.restarted``) emitted in a loop, with a no-op handler, then
with the tracker, metrics and journal attached one at a time.

    python bench/bench_handlers.py
"""

import asyncio
import tempfile
import time

from trellis._core import _telemetry
from trellis._core._process import Pid
from trellis._tree import Tracker
from trellis.journal import Journal
from trellis.metrics import Metrics


async def main():
    pid = Pid()
    err = RuntimeError("crash")

    def bench(label, n=50000):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            _telemetry.emit(
                "child.exited",
                supervisor="root",
                sup_pid=pid,
                time=1.0,
                child_id="w",
                pid=pid,
                reason=err,
                restart=True,
            )
            _telemetry.emit(
                "child.restarted", supervisor="root", sup_pid=pid, time=1.0, child_id="w", pid=pid
            )
        dt = (time.perf_counter_ns() - t0) / n / 1000
        print(f"{label:30s} {dt:.2f} us per restart (2 events)")

    hid = _telemetry.attach(lambda e: None)
    bench("noop handler")
    t = Tracker().attach()
    bench("+tracker")
    t.detach()
    m = Metrics()
    m.attach()
    bench("+metrics")
    m.detach()
    d = tempfile.mkdtemp()
    j = Journal(f"sqlite:///{d}/j.db", max_buffer=10**7)
    await j.start()
    bench("+journal", 20000)
    await j.stop()
    _telemetry.detach(hid)


asyncio.run(main())

"""Restart latency with the journal and metrics attached vs detached, in one run.

The same restart loop as ``bench_core.py --only restart`` (a one_for_one child crashed by
a cast; timed until the new child answers a call), run in alternating rounds:

- detached: only the bench's own telemetry handler (which learns the new pid);
- attached: the same, plus what ``trellis run`` attaches: the per-child tracker,
  :class:`trellis.metrics.Metrics` and a :class:`trellis.journal.Journal` writing to a
  SQLite file (WAL, synchronous=FULL, group commit) on the same disk.

Target: attached / detached <= 1.2 (median of the per-round medians). The machine is
shared and noisy, so only the ratio of figures measured side by side is meaningful.

    python bench/bench_observed.py            # 7 rounds of 2000 restarts each
    python bench/bench_observed.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trellis
from trellis._tree import Tracker
from trellis.journal import Journal
from trellis.metrics import Metrics

WARM = 200


class Crashy(trellis.Server):
    async def init(self) -> None:
        pass

    async def handle_call(self, request: Any, caller: Any) -> Any:
        return "pong"

    async def handle_cast(self, msg: Any) -> None:
        raise RuntimeError("crash on purpose")


async def restarts(k: int, attach: bool, db: Path) -> tuple[float, dict[str, Any]]:
    """Median microseconds per restart over ``k`` restarts; and the journal's counters."""
    loop = asyncio.get_running_loop()
    box: dict[str, Any] = {"waiter": None}

    def on_event(ev: dict[str, Any]) -> None:
        if ev["event"] == "child.restarted":
            w = box["waiter"]
            if w is not None and not w.done():
                w.set_result(ev["pid"])

    hid = trellis.telemetry.attach(on_event)
    tracker = metrics = journal = None
    if attach:
        tracker = Tracker().attach()
        metrics = Metrics(node="bench")
        await metrics.start()
        journal = Journal(f"sqlite:///{db}", node="bench")
        await journal.start()
    sup = await trellis.Supervisor.start_link(
        [Crashy.child_spec(id="w")], strategy="one_for_one", intensity=10**9, period=1.0
    )
    (info,) = await sup.which_children()
    pid = info.pid
    await trellis.call(pid, "ping")
    samples: list[float] = []
    gc.collect()
    for i in range(WARM + k):
        w = box["waiter"] = loop.create_future()
        t0 = time.perf_counter_ns()
        trellis.cast(pid, "crash")
        pid = await w
        await trellis.call(pid, "ping")
        if i >= WARM:
            samples.append((time.perf_counter_ns() - t0) / 1e3)
    await sup.stop()
    trellis.telemetry.detach(hid)
    stats: dict[str, Any] = {}
    if journal is not None and metrics is not None and tracker is not None:
        await journal.stop()
        stats = {"written": journal.written, "dropped": journal.dropped}
        await metrics.stop()
        tracker.detach()
    return statistics.median(samples), stats


async def main(rounds: int, k: int) -> int:
    logging.getLogger("trellis").setLevel(logging.CRITICAL)  # as bench_core's "off" mode
    detached: list[float] = []
    attached: list[float] = []
    written = dropped = 0
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        for r in range(rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for attach in order:
                med, stats = await restarts(k, attach, Path(tmp) / f"j{r}.db")
                (attached if attach else detached).append(med)
                written += stats.get("written", 0)
                dropped += stats.get("dropped", 0)
            print(
                f"round {r + 1}/{rounds}: detached {detached[-1]:.1f} us, "
                f"attached {attached[-1]:.1f} us",
                flush=True,
            )
    d, a = statistics.median(detached), statistics.median(attached)
    ratio = a / d
    print()
    print(
        f"restart latency, median of {rounds} rounds x {k} restarts (python {sys.version.split()[0]})"
    )
    print(f"  detached          {d:8.1f} us")
    print(
        f"  journal+metrics   {a:8.1f} us   ratio {ratio:.2f}x   target <= 1.20x   "
        f"{'PASS' if ratio <= 1.2 else 'MISSED'}"
    )
    print(f"  journal records written {written}, dropped {dropped}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--restarts", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 500 restarts")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.restarts = 3, 500
    sys.exit(asyncio.run(main(args.rounds, args.restarts)))

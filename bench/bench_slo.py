"""How long `trellis slo report` takes on a large journal: the computation alone (records
already in memory) and reading + computing from a SQLite journal written through the real
writer.

    .venv/bin/python bench/bench_slo.py               # 200 children, 100,000 records
    .venv/bin/python bench/bench_slo.py --records 20000 --no-sqlite

Prints wall and CPU seconds (on a shared machine trust the CPU figure). Measured on the
2-core development VM, 100,000 records / 200 children: compute 0.93 s CPU (~107,000
records per CPU second); reading them from SQLite ~3.4 s wall. The report reads the whole journal each time (it has no
index by time), so its cost grows with the journal: this is the figure to watch.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trellis.sre import read_records, report

T0 = 1_800_000_000.0


def events(n_records: int, children: int, seed: int = 1) -> list[tuple[float, str, dict[str, Any]]]:
    """A flapping tree: each child crashes now and then and is restarted a bit later."""
    rng = random.Random(seed)
    out: list[tuple[float, str, dict[str, Any]]] = []
    pid = 1
    t = 0.0
    for c in range(children):
        pid += 1
        out.append(
            (t, "child.started", {"supervisor": "big", "child_id": f"c{c}", "pid": f"<Pid {pid}>"})
        )
    running = {c: pid - children + 1 + c for c in range(children)}
    while len(out) < n_records:
        t += rng.expovariate(10.0)
        c = rng.randrange(children)
        old = running[c]
        out.append(
            (
                t,
                "child.exited",
                {
                    "supervisor": "big",
                    "child_id": f"c{c}",
                    "pid": f"<Pid {old}>",
                    "reason": "RuntimeError: boom",
                    "restart": True,
                },
            )
        )
        pid += 1
        running[c] = pid
        out.append(
            (
                t + rng.uniform(0.001, 0.5),
                "child.restarted",
                {"supervisor": "big", "child_id": f"c{c}", "pid": f"<Pid {pid}>"},
            )
        )
    out.sort(key=lambda e: e[0])
    return out


def as_records(evs: list[tuple[float, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    from trellis.sre._report import iso

    return [
        {"seq": i + 1, "utc": iso(T0 + t), "node": "n", "kind": k,
         "path": f"{d['supervisor']}/{d['child_id']}", "data": {**d, "reason_class": "crash"}}
        for i, (t, k, d) in enumerate(evs)
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--children", type=int, default=200)
    ap.add_argument("--no-sqlite", action="store_true", help="skip the SQLite phase")
    args = ap.parse_args(argv)
    evs = events(args.records, args.children)
    recs = as_records(evs)
    t, c = time.perf_counter(), time.process_time()
    doc = report(recs)
    compute, cpu = time.perf_counter() - t, time.process_time() - c
    print(f"python {sys.version.split()[0]}; {len(recs)} records, {args.children} children, "
          f"{len(doc['entities'])} entities")  # fmt: skip
    print(
        f"compute only:     {compute:.2f} s wall, {cpu:.2f} s CPU "
        f"({len(recs) / cpu:,.0f} records per CPU second)"
    )
    if not args.no_sqlite:
        from trellis.journal import Journal

        with tempfile.TemporaryDirectory() as d:
            url = f"sqlite:///{Path(d) / 'j.db'}"
            with Journal(url, node="n", batch_size=1000) as j:
                for tt, name, fields in evs:
                    j._on_event({**fields, "event": name, "time": tt}, lambda tt=tt: T0 + tt)
            t = time.perf_counter()
            rows = read_records(url)
            read = time.perf_counter() - t
            t = time.perf_counter()
            report(rows)
            both = time.perf_counter() - t
            print(f"read (SQLite):    {read:.2f} s ({len(rows) / read:,.0f} records/s)")
            print(f"compute (SQLite): {both:.2f} s; read + compute {read + both:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Journal benchmark: sustained durable throughput of trellis.journal on SQLite.

Run from the repository root:

    .venv/bin/python bench/bench_journal.py            # full run (~1 min)
    .venv/bin/python bench/bench_journal.py --quick    # smoke run (~15 s)
    .venv/bin/python bench/bench_journal.py --signed   # with a key, anchor and run id

Each repeat emits N synthetic supervision events (child.exited with an exception
reason, child.restarted, child.started, each with real pids) at full speed through
``trellis.telemetry.emit`` into a real ``Journal`` (handler -> buffer -> pickled
batches -> pipe -> writer process -> canonical JSON, SHA-256 chain -> SQLite WAL,
``synchronous=FULL``, group commit), and measures events committed per second from the first emit until
``wait_flushed()`` returns (everything durable). The buffer is sized to hold N so
nothing is dropped: this measures the writer, not the drop policy.

The baseline, measured in the same run, is the fsync-bound floor: plain
``sqlite3.executemany`` of the very same rows (already serialised and hashed) into
a fresh database with the same schema and PRAGMAs, in the same number of
transactions as the journal used. The ratio says what the journal adds on top.
Medians of the repeats (journal and baseline interleaved). Target: >= 40,000
events/s for the journal.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trellis
from trellis.journal import Journal, verify

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
TARGET = 40_000.0

SCHEMA = """
CREATE TABLE journal (
    seq INTEGER PRIMARY KEY, utc TEXT NOT NULL, mono REAL NOT NULL, node TEXT NOT NULL,
    path TEXT, kind TEXT NOT NULL, data TEXT NOT NULL, prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
)
"""


async def _idle() -> None:
    while True:
        await trellis.receive()


KEY = "0123456789abcdef0123456789abcdef"


def make_journal(path: Path, n: int, signed: bool) -> Journal:
    """The journal under test; ``signed``: as `trellis run` makes it with a key (signed
    checkpoints, the anchor file, a run id in every record)."""
    if not signed:
        return Journal(f"sqlite:///{path}", max_buffer=n + 1)
    try:
        return Journal(f"sqlite:///{path}", max_buffer=n + 1, key=KEY, run_id="bench-run")
    except TypeError:  # a journal without runs: signed checkpoints only
        return Journal(f"sqlite:///{path}", max_buffer=n + 1, key=KEY)


async def journal_run(path: Path, n: int, chunk: int, signed: bool = False) -> dict[str, Any]:
    """Emit ``n`` events through a real Journal; the end-to-end committed rate."""
    journal = make_journal(path, n, signed)
    latencies: list[float] = []
    hid = trellis.telemetry.attach(lambda e: latencies.append(e["seconds"]), ["journal.batch"])
    await journal.start()
    sup = trellis.spawn(_idle, name="bench-sup")
    pids = [trellis.spawn(_idle) for _ in range(8)]
    emit = trellis.telemetry.emit
    reason = RuntimeError("connection reset by peer")
    gc.collect()
    writer = journal.writer_pid
    t0 = time.perf_counter()
    c0 = time.process_time()
    w0 = _proc_cpu(writer)
    i = 0
    while i < n:
        for _ in range(min(chunk, n - i) // 3):
            pid = pids[i % 8]
            emit("child.exited", supervisor="root/feeds", sup_pid=sup, child_id="btc",
                 pid=pid, reason=reason, restart=True)  # fmt: skip
            emit("child.restarted", supervisor="root/feeds", sup_pid=sup, child_id="btc", pid=pid)
            emit("child.started", supervisor="root/feeds", sup_pid=sup, child_id="eth", pid=pid)
            i += 3
        if min(chunk, n - i) < 3 and i < n:
            emit("child.started", supervisor="root/feeds", sup_pid=sup, child_id="eth", pid=sup)
            i += 1
        await asyncio.sleep(0)  # let the loop run (the writer's telemetry callbacks)
    emitted = time.perf_counter() - t0
    await journal.wait_flushed()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    writer_cpu = _proc_cpu(writer) - w0
    await journal.stop()
    trellis.telemetry.detach(hid)
    for p in [sup, *pids]:
        trellis.exit(p, trellis.KILL)
    await asyncio.sleep(0)
    stats = journal.statistics()
    if stats.dropped or stats.written != n:
        raise SystemExit(f"journal run lost events: {stats}")
    return {
        "rate": n / elapsed,
        "cpu_rate": n / (cpu + writer_cpu),
        "elapsed_s": elapsed,
        "emit_rate": n / emitted,
        "cpu_s": cpu,
        "writer_cpu_s": writer_cpu,
        "batches": stats.batches,
        "mean_batch": n / stats.batches,
        "commit_p50_ms": statistics.median(latencies) * 1e3,
        "commit_max_ms": max(latencies) * 1e3,
    }


def _proc_cpu(pid: int | None) -> float:
    """CPU seconds used so far by process ``pid`` (Linux /proc; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def baseline_run(src: Path, dst: Path, batches: int) -> dict[str, Any]:
    """executemany the rows of ``src`` into a fresh ``dst``, in ``batches`` transactions."""
    with sqlite3.connect(src) as conn:
        rows = conn.execute("SELECT * FROM journal ORDER BY seq").fetchall()
    conn = sqlite3.connect(dst, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(SCHEMA)
    size = max(1, -(-len(rows) // batches))
    gc.collect()
    t0 = time.perf_counter()
    for k in range(0, len(rows), size):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO journal VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows[k : k + size]
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return {"rate": len(rows) / elapsed, "elapsed_s": elapsed, "batch": size}


def fsync_probe(directory: Path, n: int = 200) -> float:
    """Median seconds of one small write + fsync in ``directory`` (the disk's floor)."""
    path = directory / "fsync.probe"
    samples = []
    with open(path, "wb") as f:
        for _ in range(n):
            t0 = time.perf_counter()
            f.write(b"x" * 512)
            f.flush()
            os.fsync(f.fileno())
            samples.append(time.perf_counter() - t0)
    path.unlink()
    return statistics.median(samples)


def environment(argv: list[str]) -> dict[str, Any]:
    """bench_core's record of the machine, plus the SQLite version."""
    return {**bench_core.environment(argv), "sqlite": sqlite3.sqlite_version}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (~15 s), fewer events")
    p.add_argument("--events", type=int, help="events per repeat (full 200,000; quick 60,000)")
    p.add_argument("--repeats", type=int, help="repeats (full 5; quick 3)")
    p.add_argument("--chunk", type=int, default=3000, help="events emitted per loop turn")
    p.add_argument(
        "--dir", type=Path, help="where the databases go (default: a temp dir in bench/results/)"
    )
    p.add_argument("--json", type=Path, help="where to write the JSON (default bench/results/)")
    p.add_argument(
        "--signed",
        action="store_true",
        help="with a key and a run id, as `trellis run` with key_env: signed checkpoints "
        "every 1,000 records, the anchor file, run_id in every record",
    )
    cfg = p.parse_args(argv)
    if cfg.events is None:
        cfg.events = 60_000 if cfg.quick else 200_000
    if cfg.repeats is None:
        cfg.repeats = 3 if cfg.quick else 5
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse(sys.argv[1:] if argv is None else argv)
    env = environment(getattr(sys, "orig_argv", sys.argv))
    print(f"command: {env['command']}")
    print(f"date: {env['date']}; Python {env['python']}; SQLite {env['sqlite']}; "
          f"{env['cpus']} CPUs: {env['cpu']}; {env['platform']}")  # fmt: skip
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    base = cfg.dir if cfg.dir is not None else RESULTS_DIR
    work = Path(tempfile.mkdtemp(prefix="journal-bench-", dir=base))
    print(f"config: events={cfg.events:,} repeats={cfg.repeats} chunk={cfg.chunk} dir={work}")
    journal_runs: list[dict[str, Any]] = []
    baseline_runs: list[dict[str, Any]] = []
    try:
        fsync_s = fsync_probe(work)
        print(f"disk: one 512-byte write + fsync takes {fsync_s * 1e3:.2f} ms (median)")
        for r in range(cfg.repeats):
            jpath, bpath = work / f"journal-{r}.db", work / f"baseline-{r}.db"
            j = asyncio.run(journal_run(jpath, cfg.events, cfg.chunk, cfg.signed))
            v = verify(f"sqlite:///{jpath}", key=KEY if cfg.signed else None)
            extra = v.records - cfg.events  # run.started and run.stopped when signed
            if not v.ok or extra not in ((0, 2) if cfg.signed else (0,)):
                raise SystemExit(f"the benchmark journal does not verify: {v}")
            b = baseline_run(jpath, bpath, j["batches"])
            journal_runs.append(j)
            baseline_runs.append(b)
            print(
                f"  repeat {r + 1}: journal {j['rate']:,.0f}/s ({j['batches']} commits, "
                f"mean {j['mean_batch']:.0f} events, p50 commit {j['commit_p50_ms']:.2f} ms); "
                f"baseline {b['rate']:,.0f}/s"
            )
            for p in (jpath, bpath):
                for suffix in ("", "-wal", "-shm", ".anchor"):
                    Path(f"{p}{suffix}").unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(x[key] for x in runs)

    jr, br = med(journal_runs, "rate"), med(baseline_runs, "rate")
    result = "PASS" if jr >= TARGET else "FAIL"
    print()
    print("| figure | median | min..max |")
    print("|---|---:|---:|")
    jrates = [x["rate"] for x in journal_runs]
    brates = [x["rate"] for x in baseline_runs]
    print(f"| journal, durable events/s (emit -> committed) | **{jr:,.0f}** | "
          f"{min(jrates):,.0f}..{max(jrates):,.0f} |")  # fmt: skip
    print(f"| baseline: executemany of the same rows, same commits | {br:,.0f} | "
          f"{min(brates):,.0f}..{max(brates):,.0f} |")  # fmt: skip
    print(f"| journal / baseline | {jr / br:.2f} | |")
    crates = [x["cpu_rate"] for x in journal_runs]
    print(f"| journal, events per CPU-second (process + writer) | {med(journal_runs, 'cpu_rate'):,.0f} | "
          f"{min(crates):,.0f}..{max(crates):,.0f} |")  # fmt: skip
    print(f"| emit rate (handler only, loop thread) | {med(journal_runs, 'emit_rate'):,.0f}/s | |")
    print(f"| commits per run; mean events per commit | {med(journal_runs, 'batches'):.0f}; "
          f"{med(journal_runs, 'mean_batch'):.0f} | |")  # fmt: skip
    print(f"| commit latency p50 / max | {med(journal_runs, 'commit_p50_ms'):.2f} ms / "
          f"{med(journal_runs, 'commit_max_ms'):.1f} ms | |")  # fmt: skip
    elapsed = sum(x["elapsed_s"] for x in journal_runs)
    share = sum(x["cpu_s"] for x in journal_runs) / elapsed
    wshare = sum(x["writer_cpu_s"] for x in journal_runs) / elapsed
    print()
    print(f"Target >= {TARGET:,.0f} durable events/s: {result} ({jr:,.0f}/s). The journal runs "
          f"used {share:.0%} of a CPU in the emitting process and {wshare:.0%} in the "
          "writer process.")  # fmt: skip
    doc = {
        "environment": env,
        "config": {k: str(v) for k, v in vars(cfg).items()},
        "fsync_s": fsync_s,
        "journal": journal_runs,
        "baseline": baseline_runs,
        "journal_rate": jr,
        "baseline_rate": br,
        "ratio": jr / br,
        "cpu_share": share,
        "writer_cpu_share": wshare,
        "result": result,
    }
    path = cfg.json
    if path is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        path = RESULTS_DIR / f"journal-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"JSON: {path}")
    return 0 if result == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

"""The supervisor never waits on the journal: a stuck writer makes the journal drop
(and count, and journal) events, not the supervisor slow down; a kill -9 leaves a
valid chain holding everything that was committed."""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import trellis
from trellis.journal import Journal, verify
from trellis.testing import capture_telemetry

ROOT = Path(__file__).resolve().parents[2]


def rows(path: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT * FROM journal ORDER BY seq").fetchall()


async def test_stuck_writer_drops_and_counts_but_never_delays_the_supervisor(
    storm: Any, tmp_path: Path
) -> None:
    """Another connection holds the SQLite write lock for the whole storm, so the writer
    cannot commit anything. The storm still completes all its restarts before the lock
    is released; the events beyond the tiny buffer are dropped, counted, reported as
    journal.dropped telemetry and journaled as journal.dropped records in their place;
    once the lock is gone, everything kept is committed and the chain verifies."""
    path = tmp_path / "j.db"
    url = f"sqlite:///{path}"
    journal = Journal(url, max_buffer=10, batch_size=1, flush_interval=0.0)
    await journal.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the disk is "stuck" from here on
    try:
        with capture_telemetry(["journal.dropped"]) as dropped_events:
            result = await storm(200)
            # the storm is over and its 200 restarts happened while nothing could commit
            assert journal.written == 0
            assert journal.dropped > 0
            assert journal.uncommitted > 0
            blocker.execute("COMMIT")
            await journal.stop()
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()

    emitted = [e for e in result.events if not e["event"].startswith("journal.")]
    all_rows = rows(path)
    drop_records = [json.loads(r[6]) for r in all_rows if r[5] == "journal.dropped"]
    kept = [r for r in all_rows if r[5] != "journal.dropped"]
    assert drop_records, "the drops are in the chain"
    assert sum(d["count"] for d in drop_records) == journal.dropped
    assert sum(e["count"] for e in dropped_events.events) == journal.dropped
    assert len(kept) + journal.dropped == len(emitted)
    # kept and dropped together are exactly what was emitted, kind by kind
    dropped_kinds: Counter[str] = Counter()
    for d in drop_records:
        dropped_kinds.update(d["kinds"])
    assert Counter(r[5] for r in kept) + dropped_kinds == Counter(e["event"] for e in emitted)
    # what was kept is in emission order: a subsequence of the emitted events
    it = iter((e["event"], e["time"]) for e in emitted)
    assert all(any(x == (r[5], r[2]) for x in it) for r in kept)
    assert journal.written == len(all_rows)
    v = verify(url)
    assert v.ok, v.problem


async def test_restarts_are_the_same_with_a_stuck_journal_as_without(
    storm: Any, tmp_path: Path
) -> None:
    """The same storm with no journal and with a stuck one: the same restarts, exits and
    give-up, in the same order."""
    plain = await storm(100, name="plain")
    journal = Journal(f"sqlite:///{tmp_path / 'j.db'}", max_buffer=5)
    await journal.start()
    blocker = sqlite3.connect(tmp_path / "j.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        stuck = await storm(100, name="stuck")
        assert journal.written == 0
    finally:
        blocker.execute("COMMIT")
        blocker.close()
        await journal.stop()

    def shape(s: Any) -> list[str]:
        return [e["event"] for e in s.events if not e["event"].startswith("journal.")]

    assert shape(plain) == shape(stuck)
    assert journal.dropped > 0


KILL_SCRIPT = textwrap.dedent(
    """\
    import logging, sys
    import trellis
    from trellis.journal import Journal

    logging.disable(logging.CRITICAL)

    async def crash():
        raise RuntimeError("boom")

    def committed(event):
        print("committed", event["seq"], flush=True)

    trellis.telemetry.attach(committed, ["journal.batch"])
    root = lambda: trellis.Supervisor.start_link(
        [trellis.worker("crasher", crash)], intensity=10**9, period=1.0, name="storm")
    sys.exit(trellis.run(root, extensions=[Journal(sys.argv[1])]))
    """
)


def test_kill_9_mid_storm_leaves_a_valid_chain_with_everything_committed(tmp_path: Path) -> None:
    """A `trellis.run` program in an endless restart storm is SIGKILLed while it writes;
    the journal verifies, and holds at least every record it had reported committed."""
    path = tmp_path / "j.db"
    script = tmp_path / "storm.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, str(script), f"sqlite:///{path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    last = 0
    try:
        while last < 3000:
            line = lines.get(timeout=60)
            last = int(line.split()[1])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        reader.join(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    while not lines.empty():
        last = max(last, int(lines.get().split()[1]))
    assert proc.returncode == -signal.SIGKILL
    v = verify(f"sqlite:///{path}")
    assert v.ok, v.problem
    assert v.records >= last


async def test_a_failing_commit_is_retried_without_loss_or_duplicates(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """While another connection holds the write lock past the busy timeout, commits
    fail: journal.error is emitted and the batch is retried with backoff; once the lock
    is gone every event is journaled exactly once."""
    monkeypatch.setattr("trellis.journal._store.SQLITE_BUSY_TIMEOUT", 0.02)
    path = tmp_path / "j.db"
    url = f"sqlite:///{path}"
    journal = Journal(url)
    await journal.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with capture_telemetry(["journal.error"]) as errors:
            for i in range(50):
                trellis.telemetry.emit("work.item", i=i)
            await errors.wait_for("journal.error", timeout=30)
            await errors.wait_for("journal.error", timeout=30, after=1)  # retried
        assert "database is locked" in errors.events[0]["error"]
        assert journal.written == 0
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    await journal.wait_flushed()
    assert journal.written == 50
    await journal.stop()
    assert [json.loads(r[6])["i"] for r in rows(path)] == list(range(50))
    assert verify(url).ok


async def test_stop_gives_up_on_a_store_that_never_recovers(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """stop() does not hang on a journal that cannot commit, even while a batch is being
    retried: after a few attempts the pending events are counted as dropped and the
    writer ends."""
    monkeypatch.setattr("trellis.journal._store.SQLITE_BUSY_TIMEOUT", 0.01)
    path = tmp_path / "j.db"
    journal = Journal(f"sqlite:///{path}")
    await journal.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with capture_telemetry(["journal.error"]) as errors:
            for i in range(10):
                trellis.telemetry.emit("work.item", i=i)
            await errors.wait_for("journal.error", timeout=30)  # the batch is being retried
            for i in range(10, 15):
                trellis.telemetry.emit("work.item", i=i)
            await journal.stop()
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert not journal.running
    assert (journal.written, journal.dropped) == (0, 15)
    assert rows(path) == []

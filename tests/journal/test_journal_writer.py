"""The writer process: a dead writer is replaced and its batch resent, exactly once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import trellis
from trellis.journal import Journal, verify
from trellis.journal._format import dump_wire
from trellis.journal._proc import Reader, send
from trellis.testing import capture_telemetry

PROC = Path(trellis.journal.__file__).parent / "_proc.py"


def rows(path: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT * FROM journal ORDER BY seq").fetchall()


async def test_a_killed_writer_is_replaced_and_its_batch_journaled_once(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The writer process is SIGKILLed while it holds a batch it cannot commit (another
    connection holds the write lock): a new writer is started, given the batch again,
    and once the lock is gone every event is journaled exactly once, in order."""
    monkeypatch.setattr("trellis.journal._store.SQLITE_BUSY_TIMEOUT", 0.02)
    path = tmp_path / "j.db"
    url = f"sqlite:///{path}"
    journal = Journal(url)
    await journal.start()
    first = journal.writer_pid
    assert first is not None
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with capture_telemetry(["journal.error"]) as errors:
            for i in range(50):
                trellis.telemetry.emit("work.item", i=i)
            await errors.wait_for("journal.error", timeout=30)  # the batch is in hand
            os.kill(first, signal.SIGKILL)
            await errors.wait_for(  # the pump noticed
                "journal.error", timeout=30, error="the writer process exited (code -9)"
            )
            for i in range(50, 60):
                trellis.telemetry.emit("work.item", i=i)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    await journal.wait_flushed()
    assert journal.writer_pid not in (None, first)
    await journal.stop()
    assert [json.loads(r[6])["i"] for r in rows(path)] == list(range(60))
    assert (journal.written, journal.dropped) == (60, 0)
    assert verify(url).ok


def _writer(url: str) -> tuple[subprocess.Popen[bytes], Reader]:
    proc = subprocess.Popen(
        [sys.executable, str(PROC)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    send(proc.stdin.fileno(), ("config", url, "n1", None, 1000, 5.0))
    return proc, Reader(proc.stdout.fileno())


def _next(reader: Reader) -> Any:
    msgs: list[Any] = []
    while not msgs:
        msgs = reader.read()
        assert not reader.eof, "the writer process ended"
    return msgs[0]


def _end(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.close()
    code = proc.wait(timeout=30)
    proc.stdout.close()
    return code


def test_a_resent_batch_that_had_committed_is_not_written_twice(tmp_path: Path) -> None:
    """The protocol, process to process: a writer commits a batch; a second writer is
    given the same batch as a resend after the head the first one started from (its
    acknowledgement was lost, as when the first dies just after committing): it writes
    nothing, acknowledges the batch, and the next batch continues the chain."""
    path = tmp_path / "j.db"
    url = f"sqlite:///{path}"
    batch = [(1000.0 + i, {"event": "work.item", "time": float(i), "i": i}) for i in range(5)]
    wire = [dump_wire(batch)]
    proc, reader = _writer(url)
    assert _next(reader) == ("ready", 0, None, [])
    assert proc.stdin is not None
    send(proc.stdin.fileno(), ("batch", wire, False, None))
    assert _next(reader)[:2] == ("ack", 5)
    assert _end(proc) == 0

    proc, reader = _writer(url)
    assert _next(reader) == ("ready", 5, None, [])
    assert proc.stdin is not None
    send(proc.stdin.fileno(), ("batch", wire, False, 0))  # resend after seq 0
    ack = _next(reader)
    assert (ack[0], ack[1], ack[3]) == ("ack", 5, 5)
    more = [(2000.0, {"event": "work.item", "time": 9.0, "i": 5})]
    send(proc.stdin.fileno(), ("batch", [dump_wire(more)], True, None))
    ack = _next(reader)
    assert (ack[0], ack[1], ack[3]) == ("ack", 1, 6)
    assert _end(proc) == 0
    assert [json.loads(r[6])["i"] for r in rows(path)] == [0, 1, 2, 3, 4, 5]
    assert verify(url).ok


def test_the_writer_commits_what_it_holds_when_its_parent_vanishes(tmp_path: Path) -> None:
    """End of input without a close (the parent was killed): the writer commits the
    batch it was given, then exits 0."""
    path = tmp_path / "j.db"
    url = f"sqlite:///{path}"
    proc, reader = _writer(url)
    assert _next(reader)[0] == "ready"
    assert proc.stdin is not None
    batch = [(1000.0 + i, {"event": "work.item", "time": float(i), "i": i}) for i in range(3)]
    send(proc.stdin.fileno(), ("batch", [dump_wire(batch)], False, None))
    assert _end(proc) == 0  # closes its input at once: no time to acknowledge first
    assert [json.loads(r[6])["i"] for r in rows(path)] == [0, 1, 2]
    assert verify(url).ok

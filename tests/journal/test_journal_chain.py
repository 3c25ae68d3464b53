"""The journal on SQLite: every event recorded once, hash-chained and append-only; any
edited, deleted or reordered record found at its seq; signed checkpoints catch a
recomputed chain; a reopened journal continues its chain."""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
import sqlite3
from collections import Counter
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import trellis
from trellis.journal import (
    GENESIS,
    Journal,
    JournalError,
    JournalNotFound,
    JournalURLError,
    NotAJournal,
    tail,
    verify,
)

KEY = "0123456789abcdef0123456789abcdef"


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"  # an absolute path: sqlite:////tmp/...


def rows(path: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT * FROM journal ORDER BY seq").fetchall()


def kinds(path: Path) -> Counter[str]:
    return Counter(r[5] for r in rows(path) if not r[5].startswith("journal."))


def attacker(path: Path) -> sqlite3.Connection:
    """A connection that has dropped the append-only triggers, as an attacker would."""
    conn = sqlite3.connect(path, isolation_level=None)
    for t in ("journal", "journal_checkpoints"):
        for op in ("update", "delete"):
            conn.execute(f"DROP TRIGGER {t}_no_{op}")
    return conn


def canonical_hash(prev: str, row: tuple[Any, ...]) -> str:
    """The documented hash, computed independently of the implementation."""
    seq, utc, mono, node, path, kind, data = row[:7]
    text = prev + json.dumps(
        [seq, utc, mono, node, path, kind, data], separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def rehash_from(conn: sqlite3.Connection, start: int) -> None:
    """Recompute every hash from ``start`` on, so the chain is consistent again."""
    all_rows = conn.execute("SELECT * FROM journal ORDER BY seq").fetchall()
    prev = all_rows[start - 2][8] if start > 1 else GENESIS
    for r in all_rows[start - 1 :]:
        h = canonical_hash(prev, r)
        conn.execute("UPDATE journal SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, h, r[0]))
        prev = h


async def journaled_storm(storm: Any, path: Path, restarts: int = 30, **kw: Any) -> Any:
    journal = Journal(url_of(path), **kw)
    await journal.start()
    try:
        result = await storm(restarts)
    finally:
        await journal.stop()
    return result, journal


# ---------------------------------------------------------------------------
# What is recorded
# ---------------------------------------------------------------------------


async def test_restart_storm_chain_verifies_and_counts_match_telemetry(
    storm: Any, tmp_path: Path
) -> None:
    """After 300 restarts every event is in the journal exactly once, seqs run 1..N
    without a gap, and verify finds the chain intact."""
    path = tmp_path / "j.db"
    result, journal = await journaled_storm(storm, path, restarts=300)
    assert kinds(path) == result.kinds
    assert result.kinds["child.restarted"] == 300
    assert result.kinds["child.exited"] == 301
    all_rows = rows(path)
    assert [r[0] for r in all_rows] == list(range(1, len(all_rows) + 1))
    assert journal.written == len(all_rows) == journal.seq
    assert journal.dropped == 0
    v = verify(url_of(path))
    assert v.ok, v.problem
    assert (v.records, v.first_bad_seq, v.problem) == (len(all_rows), None, "")


async def test_records_follow_the_documented_format(storm: Any, tmp_path: Path) -> None:
    """seq/utc/mono/node/path/kind/data columns, data as sorted compact JSON without the
    column keys, exit reasons with their class, and the documented SHA-256 chain."""
    path = tmp_path / "j.db"
    result, _ = await journaled_storm(storm, path, restarts=3)
    all_rows = rows(path)
    prev = GENESIS
    for r in all_rows:
        assert r[7] == prev
        assert r[8] == canonical_hash(prev, r)
        prev = r[8]
        data = json.loads(r[6])
        assert r[6] == json.dumps(data, sort_keys=True, separators=(",", ":"))
        assert not {"event", "time", "path"} & data.keys()
        assert r[3] == socket.gethostname()
        assert datetime.fromisoformat(r[1]).utcoffset() is not None  # ...Z: UTC
    # the records follow the telemetry one to one, in order
    emitted = [e for e in result.events if not e["event"].startswith("journal.")]
    assert [(r[5], r[2]) for r in all_rows] == [(e["event"], e["time"]) for e in emitted]
    exits = [json.loads(r[6]) | {"path": r[4]} for r in all_rows if r[5] == "child.exited"]
    assert exits[0]["reason"] == "RuntimeError: boom"
    assert exits[0]["reason_class"] == "crash"
    assert exits[0]["path"] == "storm/crasher"
    assert exits[0]["child_id"] == "crasher"
    started = [json.loads(r[6]) for r in all_rows if r[5] == "child.started"]
    pid = result.named("child.started")[0]["pid"]
    assert started[0]["pid"] == f"<Pid {pid.id}>"  # no "dead": recorded as handed over
    gave_up = [r for r in all_rows if r[5] == "supervisor.gave_up"]
    assert gave_up[0][4] == "storm"


async def test_os_process_children_carry_os_pid_and_output_is_excluded(
    storm: Any, tmp_path: Path
) -> None:
    """A crashing OS-process child: its starts carry pid and os_pid, its exits the exit
    code and class; per-line output is not journaled unless asked for."""
    path = tmp_path / "j.db"
    cmd = trellis.Command(
        ["sh", "-c", "echo hello; exit 3"], id="sh", ready=trellis.Ready.log("hello")
    )
    journal = Journal(url_of(path))
    await journal.start()
    try:
        result = await storm(2, child=cmd)
    finally:
        await journal.stop()
    assert result.named("process.output"), "the child printed, so output was emitted"
    assert kinds(path) == result.kinds
    assert "process.output" not in kinds(path)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in rows(path):
        by_kind.setdefault(r[5], []).append(json.loads(r[6]))
    os_pids = [e["os_pid"] for e in result.named("process.spawned")]
    assert [d["os_pid"] for d in by_kind["child.started"] + by_kind["child.restarted"]] == os_pids
    assert all(isinstance(d["pid"], str) for d in by_kind["child.started"])
    assert [d["reason_class"] for d in by_kind["child.exited"]] == ["crash"] * 3
    assert "3" in by_kind["child.exited"][0]["reason"]

    path2 = tmp_path / "all.db"
    journal = Journal(url_of(path2), exclude=())
    await journal.start()
    try:
        result = await storm(0, child=cmd, name="storm2")
    finally:
        await journal.stop()
    assert kinds(path2)["process.output"] == len(result.named("process.output")) >= 1


def test_sync_open_flush_close_without_a_loop(tmp_path: Path) -> None:
    """Without an event loop: open(), events by telemetry.emit, flush() commits them,
    close() ends the writer; custom events are journaled with all their fields."""
    path = tmp_path / "j.db"
    with Journal(url_of(path), node="n1") as journal:
        for i in range(250):
            trellis.telemetry.emit("deploy.step", time=float(i), step=i, note="ü")
        journal.flush()
        assert journal.written == 250
        assert journal.uncommitted == 0
    assert not journal.running
    r = rows(path)
    assert [x[0] for x in r] == list(range(1, 251))
    assert r[7][2:7] == (7.0, "n1", None, "deploy.step", '{"note":"\\u00fc","step":7}')
    assert verify(url_of(path)).ok


def test_group_commit_needs_no_flush(tmp_path: Path) -> None:
    """A lone event is committed once flush_interval has passed; a full batch_size at
    once, even with a flush_interval of an hour."""
    path = tmp_path / "j.db"
    with Journal(url_of(path)) as journal:
        trellis.telemetry.emit("lone.event", time=1.0)
        _wait(lambda: journal.written == 1)
    with Journal(url_of(path), flush_interval=3600.0, batch_size=5) as journal:
        for i in range(5):
            trellis.telemetry.emit("batch.event", time=float(i))
        _wait(lambda: journal.written == 5)
        assert journal.batches == 1
    assert [r[5] for r in rows(path)] == ["lone.event"] + ["batch.event"] * 5


def _wait(cond: Any, timeout: float = 10.0) -> None:
    """Poll ``cond`` (a bound so a broken writer fails the test instead of hanging it)."""
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


async def test_journal_telemetry_is_emitted_on_the_loop_and_not_journaled(
    storm: Any, tmp_path: Path
) -> None:
    """journal.batch events arrive on the event loop, count every committed record, and
    are not journaled themselves."""
    path = tmp_path / "j.db"
    with trellis.testing.capture_telemetry(["journal.batch"]) as cap:
        _, journal = await journaled_storm(storm, path, restarts=20)
    assert sum(e["events"] for e in cap.events) == journal.written == len(rows(path))
    assert cap.events[-1]["seq"] == journal.seq
    assert all(e["seconds"] >= 0 for e in cap.events)
    assert journal.batches == len(cap.events)
    assert not any(r[5].startswith("journal.") for r in rows(path))


# ---------------------------------------------------------------------------
# Append-only and tamper evidence
# ---------------------------------------------------------------------------


async def test_triggers_refuse_update_and_delete(storm: Any, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    await journaled_storm(storm, path, restarts=2, key=KEY)
    conn = sqlite3.connect(path, isolation_level=None)
    for sql in (
        "UPDATE journal SET data = '{}' WHERE seq = 1",
        "DELETE FROM journal WHERE seq = 1",
        "DELETE FROM journal",
        "UPDATE journal_checkpoints SET hash = 'x'",
        "DELETE FROM journal_checkpoints",
    ):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(sql)
    conn.close()
    assert verify(url_of(path), key=KEY).ok


def _edit(conn: sqlite3.Connection) -> None:
    conn.execute("""UPDATE journal SET data = replace(data, 'crash', 'normal') WHERE seq = 17""")


def _delete(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM journal WHERE seq = 17")


def _reorder(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE journal SET seq = -17 WHERE seq = 17")
    conn.execute("UPDATE journal SET seq = 17 WHERE seq = 18")
    conn.execute("UPDATE journal SET seq = 18 WHERE seq = -17")


def _rewrite(conn: sqlite3.Connection) -> None:
    _edit(conn)
    row = conn.execute("SELECT * FROM journal WHERE seq = 17").fetchone()
    conn.execute("UPDATE journal SET hash = ? WHERE seq = 17", (canonical_hash(row[7], row),))


def _edit_link(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE journal SET prev_hash = ? WHERE seq = 17", ("f" * 64,))


def _delete_first(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM journal WHERE seq = 1")


@pytest.mark.parametrize(
    ("attack", "bad_seq", "problem"),
    [
        (_edit, 17, "hash mismatch at seq 17 (record edited)"),
        (_delete, 17, "seq 17 missing (expected 17, found 18)"),
        (_reorder, 17, "record out of order at seq 17: it follows seq 18, not 16"),
        (_rewrite, 17, "seq 17 rewritten: its hash was recomputed but seq 18 still links"),
        (_edit_link, 17, "hash mismatch at seq 17 (record edited)"),
        (_delete_first, 1, "seq 1 missing (expected 1, found 2)"),
    ],
)
async def test_tampering_is_found_at_the_right_seq(
    storm: Any, tmp_path: Path, attack: Any, bad_seq: int, problem: str
) -> None:
    """An attacker drops the triggers and edits, deletes or reorders records with
    sqlite3: verify reports the first bad seq and what happened there."""
    path = tmp_path / "j.db"
    await journaled_storm(storm, path, restarts=20)
    assert verify(url_of(path)).ok
    conn = attacker(path)
    attack(conn)
    conn.close()
    v = verify(url_of(path))
    assert not v.ok
    assert v.first_bad_seq == bad_seq
    assert v.problem.startswith(problem), v.problem
    assert v.records == bad_seq - 1


# ---------------------------------------------------------------------------
# Signed checkpoints
# ---------------------------------------------------------------------------


async def signed_journal(storm: Any, path: Path) -> list[tuple[Any, ...]]:
    """A journal with several checkpoints (small batches, one every 20 records)."""
    await journaled_storm(
        storm, path, restarts=40, key=KEY, batch_size=10, max_batch=10, checkpoint_every=20
    )
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT * FROM journal_checkpoints ORDER BY seq").fetchall()


async def test_checkpoints_are_signed_and_verified(storm: Any, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    cps = await signed_journal(storm, path)
    last_seq = len(rows(path))
    assert len(cps) >= 4
    assert cps[-1][0] == last_seq  # the closing checkpoint covers everything
    assert all(b[0] - a[0] >= 20 for a, b in itertools.pairwise(cps[:-1]))
    v = verify(url_of(path), key=KEY)
    assert v.ok
    assert v.signed
    assert (v.checkpoints, v.last_checkpoint_seq) == (len(cps), last_seq)
    wrong = verify(url_of(path), key="another key")
    assert not wrong.ok
    assert (wrong.first_bad_seq, wrong.problem) == (
        1,
        f"checkpoint at seq {cps[0][0]} has a bad HMAC (forged or edited, an earlier "
        "checkpoint removed, or the wrong key)",
    )


async def test_recomputed_chain_is_caught_by_the_checkpoints(storm: Any, tmp_path: Path) -> None:
    """Editing a record and recomputing every later hash makes the chain consistent
    again; the first checkpoint after the edit no longer matches it. Forging that
    checkpoint's hash too is caught by its HMAC when the key is at hand."""
    path = tmp_path / "j.db"
    cps = await signed_journal(storm, path)
    edited = cps[1][0] + 3  # a record between the second and third checkpoint
    conn = attacker(path)
    conn.execute(f"UPDATE journal SET data = replace(data, 'crash', 'normal') WHERE seq = {edited}")
    rehash_from(conn, edited)
    v = verify(url_of(path), key=KEY)
    assert not v.ok
    assert v.first_bad_seq == cps[1][0] + 1 <= edited
    assert v.problem == (
        f"checkpoint at seq {cps[2][0]} does not match the chain: a record in seq "
        f"{cps[1][0] + 1}..{cps[2][0]} was rewritten and the chain recomputed"
    )
    assert v.last_checkpoint_seq == cps[1][0]
    # without the key the hashes of the checkpoints are still compared
    assert verify(url_of(path)).first_bad_seq == cps[1][0] + 1

    # the attacker also rewrites the later checkpoints' hashes (but cannot sign them)
    head = dict(conn.execute("SELECT seq, hash FROM journal").fetchall())
    for seq, *_ in cps[2:]:
        conn.execute("UPDATE journal_checkpoints SET hash = ? WHERE seq = ?", (head[seq], seq))
    conn.close()
    v = verify(url_of(path), key=KEY)
    assert not v.ok
    assert v.first_bad_seq == cps[1][0] + 1
    assert v.problem.startswith(f"checkpoint at seq {cps[2][0]} has a bad HMAC")
    assert verify(url_of(path)).ok  # which is why the key matters


async def test_truncation_is_caught_by_the_closing_checkpoint(storm: Any, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    await signed_journal(storm, path)
    last = len(rows(path))
    conn = attacker(path)
    conn.execute(f"DELETE FROM journal WHERE seq > {last - 5}")
    conn.close()
    v = verify(url_of(path), key=KEY)
    assert not v.ok
    assert v.first_bad_seq == last - 4
    assert v.problem == (
        f"the journal ends at seq {last - 5} but a checkpoint covers seq {last}: "
        f"seq {last - 4}..{last} deleted"
    )


async def test_removing_a_checkpoint_breaks_the_next_hmac(storm: Any, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    cps = await signed_journal(storm, path)
    conn = attacker(path)
    conn.execute("DELETE FROM journal_checkpoints WHERE seq = ?", (cps[1][0],))
    conn.close()
    v = verify(url_of(path), key=KEY)
    assert not v.ok
    assert v.first_bad_seq == cps[0][0] + 1
    assert v.problem.startswith(f"checkpoint at seq {cps[2][0]} has a bad HMAC")


async def test_key_from_the_environment(
    storm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRELLIS_JOURNAL_KEY", KEY)
    path = tmp_path / "j.db"
    await journaled_storm(storm, path, restarts=5)
    v = verify(url_of(path))
    assert v.ok
    assert v.signed
    assert v.checkpoints == 1
    monkeypatch.setenv("TRELLIS_JOURNAL_KEY", "not the key")
    assert not verify(url_of(path)).ok


# ---------------------------------------------------------------------------
# Resuming, URLs, reading
# ---------------------------------------------------------------------------


async def test_reopening_continues_the_chain(storm: Any, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    first, _j1 = await journaled_storm(storm, path, restarts=10, key=KEY)
    n1 = len(rows(path))
    second, j2 = await journaled_storm(storm, path, restarts=10, key=KEY)
    all_rows = rows(path)
    assert [r[0] for r in all_rows] == list(range(1, len(all_rows) + 1))
    assert all_rows[n1][7] == all_rows[n1 - 1][8]  # the new session links to the old head
    assert j2.seq == len(all_rows) == n1 + j2.written
    assert kinds(path) == first.kinds + second.kinds
    v = verify(url_of(path), key=KEY)
    assert v.ok
    assert v.checkpoints == 2


def test_relative_sqlite_urls_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with Journal("sqlite:///sub/rel.db") as journal:
        trellis.telemetry.emit("x", time=0.0)
        journal.flush()
    assert (tmp_path / "sub" / "rel.db").exists()
    assert verify("sqlite:///sub/rel.db").records == 1
    assert verify(f"sqlite:///{tmp_path}/sub/rel.db").records == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "bad journal URL '': empty"),
        ("journal.db", "bad journal URL 'journal.db': no scheme"),
        ("mysql://h/db", "bad journal URL 'mysql://h/db': unknown scheme 'mysql'"),
        ("sqlite://journal.db", "bad journal URL 'sqlite://journal.db': a sqlite URL has three"),
        ("sqlite:///", "bad journal URL 'sqlite:///': no database file path"),
        ("sqlite:///:memory:", "bad journal URL 'sqlite:///:memory:': give a plain file path"),
        ("postgresql:db", "bad journal URL 'postgresql:db': expected postgresql://"),
        (
            "postgresql://u:secret@h:notaport/db",
            "bad journal URL 'postgresql://u:***@h:notaport/db'",
        ),
    ],
)
def test_bad_urls_are_refused_with_the_url_and_the_reason(url: str, message: str) -> None:
    with pytest.raises(JournalURLError) as info:
        Journal(url)
    assert str(info.value).startswith(message), str(info.value)
    assert "secret" not in str(info.value)
    with pytest.raises(JournalURLError):
        verify(url)


def test_readers_never_create_a_journal(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(JournalNotFound, match=r"missing\.db"):
        verify(url_of(missing))
    with pytest.raises(JournalNotFound):
        tail(url_of(missing))
    assert not missing.exists()
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as conn, conn:
        conn.execute("CREATE TABLE journal (x)")
    with pytest.raises(NotAJournal, match="not a Trellis journal"):
        verify(url_of(other))
    with pytest.raises(NotAJournal, match="not a Trellis journal"):
        Journal(url_of(other)).open()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(NotAJournal):
        verify(url_of(garbage))


def test_writer_errors_name_the_url(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match=r"directory .* does not exist"):
        Journal(url_of(tmp_path / "no" / "such" / "dir.db")).open()
    with pytest.raises(ValueError, match="max_buffer"):
        Journal(url_of(tmp_path / "j.db"), max_buffer=0)
    with pytest.raises(ValueError, match="flush_interval"):
        Journal(url_of(tmp_path / "j.db"), flush_interval=-1)


def test_tail_last_since_and_follow(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    url = url_of(path)
    with Journal(url) as journal:
        for i in range(30):
            trellis.telemetry.emit("t.ev", time=float(i), i=i)
        journal.flush()
        assert [r["seq"] for r in tail(url, n=5)] == [26, 27, 28, 29, 30]
        assert [r["data"]["i"] for r in tail(url, since_seq=29)] == [28, 29]
        assert list(tail(url, n=0)) == []
        follow = tail(url, n=1, follow=True, poll=0.01)
        assert next(follow)["seq"] == 30
        trellis.telemetry.emit("t.ev", time=99.0, i=99)
        journal.flush()
        rec = next(follow)
        assert (rec["seq"], rec["kind"], rec["data"]) == (31, "t.ev", {"i": 99})
        follow.close()


async def test_data_is_jsonable_of_the_event_minus_the_columns() -> None:
    """The writer's serialisation gives what trellis._tree.jsonable gives (for live
    pids), field type by field type."""
    from trellis._tree import jsonable
    from trellis.journal._format import content_of

    async def idle() -> None:
        while True:
            await trellis.receive()

    a, b = trellis.spawn(idle), trellis.spawn(idle)
    try:
        events: list[dict[str, Any]] = [
            {"event": "child.exited", "time": 1.0, "supervisor": "s", "child_id": "c", "pid": a,
             "reason": ValueError("x"), "restart": True},
            {"event": "child.exited", "time": 2, "supervisor": "s", "child_id": 3, "pid": b,
             "reason": trellis.SHUTDOWN, "restart": False},
            {"event": "child.exited", "time": 2.5, "supervisor": "s", "child_id": "c",
             "reason": trellis.Hung("no heartbeat"), "os_pid": 12},
            {"event": "supervisor.started", "time": 3.0, "supervisor": "s", "sup_pid": a,
             "strategy": trellis.Strategy.ONE_FOR_ONE},
            {"event": "process.spawned", "time": 4.0, "path": "s/c", "os_pid": 77,
             "argv": ["a", ("b", 1)], "env": {"K": [1.5, None]}, "error": OSError(2, "no")},
            {"event": "operator.action", "time": 5.0, "who": "uid:0", "action": "restart",
             "target": "s/c", "source": "unix-socket", "result": "ok", "detail": None},
            {"event": "custom", "time": 6.0, "reason": "normal", "blob": b"\x00", "n": 2**70},
        ]  # fmt: skip
        for ev in events:
            utc, mono, node, path, kind, data = content_of(0.0, ev, "n")
            expected = jsonable(ev)
            assert path == expected.pop("path")
            assert kind == expected.pop("event") == ev["event"]
            expected.pop("time")
            assert json.loads(data) == json.loads(json.dumps(expected)), ev
            assert mono == float(ev["time"])
            assert (utc, node) == ("1970-01-01T00:00:00.000000Z", "n")
    finally:
        trellis.exit(a, trellis.KILL)
        trellis.exit(b, trellis.KILL)
        await a.join()
        await b.join()

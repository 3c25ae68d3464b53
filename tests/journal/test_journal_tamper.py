"""What an attacker with write access to the journal's database, but not the key, can
and cannot do unseen: one test per row of the table in docs/design.md ("What the
journal's signatures prove"), on SQLite and, for the rows that need the key,
PostgreSQL too."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import trellis
from trellis.journal import GENESIS, Journal, JournalError, tail, verify

KEY = "0123456789abcdef0123456789abcdef"
EVERY, MAX_BATCH = 20, 10  # the writers here: a checkpoint every 20 records
BOUND = EVERY + MAX_BATCH  # the most records a writer leaves after its last checkpoint


@dataclass
class Db:
    """One journal under attack: its URL, its anchor file, and SQL run as an attacker
    who has dropped the append-only triggers."""

    url: str
    anchor: str
    ph: str  # the driver's placeholder
    conn: Any = None
    backend: str = "sqlite"

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        query = query.replace("?", self.ph)
        cur = self.conn.execute(query, params)
        return cur.fetchall() if cur.description else []

    def rows(self) -> list[tuple[Any, ...]]:
        return self.sql("SELECT * FROM journal ORDER BY seq")

    def checkpoints(self) -> list[tuple[Any, ...]]:
        return self.sql("SELECT * FROM journal_checkpoints ORDER BY seq")

    def rehash_from(self, start: int) -> None:
        """Recompute every hash from ``start`` on: the chain is consistent again."""
        all_rows = self.rows()
        prev = all_rows[start - 2][8] if start > 1 else GENESIS
        for r in all_rows[start - 1 :]:
            h = canonical_hash(prev, r)
            self.sql("UPDATE journal SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, h, r[0]))
            prev = h

    def append(self, n: int, node: str = "intruder") -> int:
        """Append ``n`` correctly chained records at the head; the first new seq."""
        head = self.sql("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1")
        seq, prev = head[0] if head else (0, GENESIS)
        first = seq + 1
        for _ in range(n):
            seq += 1
            row = (seq, "2030-01-01T00:00:00.000000Z", 0.0, node, None, "child.started", "{}")
            h = canonical_hash(prev, row)
            self.sql("INSERT INTO journal VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (*row, prev, h))
            prev = h
        return first


def canonical_hash(prev: str, row: tuple[Any, ...]) -> str:
    seq, utc, mono, node, path, kind, data = row[:7]
    text = prev + json.dumps(
        [seq, utc, mono, node, path, kind, data], separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def write(db: Db, n: int, start: int = 0, anchor: Any = None) -> Journal:
    """A writer's session: ``n`` events, then a clean close."""
    with Journal(
        db.url,
        node="n1",
        key=KEY,
        checkpoint_every=EVERY,
        batch_size=MAX_BATCH,
        max_batch=MAX_BATCH,
        anchor=db.anchor if anchor is None else anchor,
    ) as journal:
        for i in range(start, start + n):
            trellis.telemetry.emit("work.item", time=float(i), i=i)
            if i % MAX_BATCH == MAX_BATCH - 1:
                journal.flush()  # small batches: checkpoints land every ~20 records
    return journal


def check(db: Db, anchor: bool = True, **kw: Any) -> Any:
    return verify(db.url, key=KEY, anchor=db.anchor if anchor else False, **kw)


def _attack_sqlite(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    for t in ("journal", "journal_checkpoints"):
        for op in ("update", "delete"):
            conn.execute(f"DROP TRIGGER IF EXISTS {t}_no_{op}")
    return conn


def _attack_pg(pg_server: Any, db: str) -> Any:
    conn = pg_server.admin(db)
    for t in ("journal", "journal_checkpoints"):
        conn.execute(f"DROP TRIGGER IF EXISTS {t}_no_change ON {t}")
        conn.execute(f"DROP TRIGGER IF EXISTS {t}_no_truncate ON {t}")
    return conn


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Db]:
    path = tmp_path / "j.db"
    db = Db(f"sqlite:///{path}", f"{path}.anchor", "?")
    yield db
    if db.conn is not None:
        db.conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    """The same journal on SQLite and on a throwaway PostgreSQL server."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_db")
        return
    pytest.importorskip("psycopg", reason="psycopg 3 is needed: pip install 'psycopg[binary]'")
    pg_server = request.getfixturevalue("pg_server")
    name = request.getfixturevalue("pg_db")
    db = Db(pg_server.url(name), str(tmp_path / "pg.anchor"), "%s", backend="postgresql")
    db.pg = (pg_server, name)  # type: ignore[attr-defined]
    yield db
    if db.conn is not None:
        db.conn.close()


def attack(db: Db) -> Db:
    """Become the attacker: a connection with the append-only triggers dropped."""
    if db.conn is None:
        if db.backend == "sqlite":
            db.conn = _attack_sqlite(Path(db.url[len("sqlite:///") :]))
        else:
            db.conn = _attack_pg(*db.pg)  # type: ignore[attr-defined]
    return db


# ---------------------------------------------------------------------------
# A clean journal verifies, with its anchor, after a clean close and after kill -9
# ---------------------------------------------------------------------------


def test_a_clean_journal_verifies_with_key_and_anchor(any_db: Db) -> None:
    write(any_db, 95)
    v = check(any_db)
    assert v.ok, v.problem
    assert (v.signed, v.last_checkpoint_seq, v.last_seq, v.anchor_seq) == (True, 95, 95, 95)
    assert json.loads(Path(any_db.anchor).read_text())["closed"] is True
    write(any_db, 30, start=95)  # a second session continues the signed chain
    v = check(any_db)
    assert (v.ok, v.last_seq, v.anchor_seq) == (True, 125, 125), v.problem


def test_a_live_journal_verifies_from_its_first_commit(any_db: Db) -> None:
    """verify with the key while a writer runs: a fresh journal is signed from its first
    commit (no false "no signed checkpoint"), and a new session after a clean close is
    not taken for rows added after the close."""
    for start in (0, 5):
        journal = Journal(any_db.url, key=KEY, anchor=any_db.anchor).open()
        try:
            for i in range(start, start + 5):
                trellis.telemetry.emit("work.item", time=float(i), i=i)
            journal.flush()
            v = check(any_db)
            assert v.ok, v.problem
            assert v.last_seq == start + 5
        finally:
            journal.close()
    assert check(any_db).ok


_KILLED_WRITER = """
import os, sys, trellis
from trellis.journal import Journal
j = Journal(sys.argv[1], node="n1", key=sys.argv[2], checkpoint_every=20, batch_size=10,
            max_batch=10).open()
for i in range(int(sys.argv[3])):
    trellis.telemetry.emit("work.item", time=float(i), i=i)
    if i % 10 == 9:
        j.flush()
j.flush()
os.kill(os.getpid(), 9)
"""


def killed_writer(db: Db, n: int) -> None:
    """A process that journals ``n`` events and is killed with -9 (no closing checkpoint)."""
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, db.url, KEY, str(n)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr.decode()


def test_row_unsigned_tail_after_kill_9_verifies_and_can_be_rewritten_unseen(
    sqlite_db: Db,
) -> None:
    """Row: rewrite the records a writer killed with -9 left after its last checkpoint
    (at most checkpoint_every + max_batch): NOT detected -- nothing has signed them."""
    killed_writer(sqlite_db, 55)  # checkpoints at its first commit (10), 30 and 50
    v = check(sqlite_db)
    assert v.ok, v.problem  # a crash is not tampering
    assert (v.last_checkpoint_seq, v.last_seq) == (50, 55)
    assert json.loads(Path(sqlite_db.anchor).read_text())["closed"] is False
    db = attack(sqlite_db)
    db.sql("UPDATE journal SET data = '{\"i\":5300}' WHERE seq = 53")
    db.rehash_from(53)
    assert check(db).ok  # the limit: the unsigned tail rests on the hash chain alone
    # the next writer signs on top of it: it cannot tell a crash's tail from a forged one
    write(db, 5, start=55)
    assert check(db).ok


# ---------------------------------------------------------------------------
# Rows of the table: what is detected, and by what
# ---------------------------------------------------------------------------


def test_row_truncate_back_to_an_earlier_checkpoint(any_db: Db) -> None:
    """Row: delete the last records and the checkpoints after them, so the journal ends
    exactly at an earlier checkpoint: detected only with the anchor."""
    write(any_db, 100)
    db = attack(any_db)
    cps = db.checkpoints()
    keep = cps[-3][0]
    db.sql("DELETE FROM journal WHERE seq > ?", (keep,))
    db.sql("DELETE FROM journal_checkpoints WHERE seq > ?", (keep,))
    assert check(db, anchor=False).ok  # the limit without an anchor
    v = check(db)
    assert not v.ok
    assert v.first_bad_seq == keep + 1
    assert v.problem == (
        f"the journal ends at seq {keep} but the anchor covers seq 100: truncated "
        f"(seq {keep + 1}..100 deleted)"
    )
    # a writer opened on it now refuses to sign over the truncation, and says so
    journal = write(db, 5, start=100)
    assert journal.foreign_head is not None
    assert "truncated" in journal.foreign_head
    assert db.checkpoints()[-1][0] == keep
    assert not check(db, anchor=False).ok


def test_row_delete_everything(any_db: Db) -> None:
    """Row: delete every record and checkpoint: detected with the key (an empty journal
    is an error when a key is given) and with the anchor."""
    write(any_db, 50)
    db = attack(any_db)
    db.sql("DELETE FROM journal")
    db.sql("DELETE FROM journal_checkpoints")
    v = check(db, anchor=False)
    assert (v.ok, v.first_bad_seq) == (False, 1)
    assert v.problem.startswith("the journal is empty, but a key was given")
    v = check(db)
    assert (v.ok, v.first_bad_seq) == (False, 1)
    assert v.problem == (
        "the journal ends at seq 0 but the anchor covers seq 50: truncated (every record deleted)"
    )
    assert verify(db.url, anchor=False).ok  # without the key an empty journal is just empty


def test_row_delete_every_checkpoint(any_db: Db) -> None:
    """Row: delete every checkpoint (records untouched): detected with the key."""
    write(any_db, 50)
    db = attack(any_db)
    db.sql("DELETE FROM journal_checkpoints")
    v = check(db, anchor=False)
    assert (v.ok, v.first_bad_seq) == (False, 1)
    assert v.problem.startswith("no signed checkpoint covers seq 1..50")


def test_row_truncate_leaving_a_long_unsigned_tail(sqlite_db: Db) -> None:
    """Row: delete the last checkpoints but keep more records after the last remaining
    one than a writer ever leaves unsigned: detected with the key (the bound comes from
    the anchor, or --max-unsigned)."""
    write(sqlite_db, 100)
    db = attack(sqlite_db)
    cps = db.checkpoints()
    db.sql("DELETE FROM journal_checkpoints WHERE seq > ?", (cps[1][0],))
    db.sql("DELETE FROM journal WHERE seq > 95")
    unsigned = 95 - cps[1][0]
    assert unsigned > BOUND
    v = check(db, anchor=False, max_unsigned=BOUND)
    assert (v.ok, v.first_bad_seq) == (False, cps[1][0] + 1)
    assert v.problem.startswith(
        f"{unsigned} records after the last checkpoint (seq {cps[1][0]}); a writer leaves "
        f"at most {BOUND} unsigned"
    )
    assert check(db, anchor=False).ok  # the default bound (11,000) is far larger...
    v = check(db)  # ...the anchor holds the writer's own, and its checkpoint
    assert not v.ok
    assert v.problem.startswith("the journal ends at seq 95 but the anchor covers seq 100")


def test_row_edit_recompute_the_chain_delete_the_checkpoints_after(any_db: Db) -> None:
    """Row: edit a record, recompute every later hash and delete the checkpoints after
    the edit. Near the head (within the unsigned bound): detected only with the anchor.
    Further back: detected with the key alone (too many unsigned records)."""
    write(any_db, 100)
    db = attack(any_db)
    cps = [c[0] for c in db.checkpoints()]
    edited = 95
    before = max(s for s in cps if s < edited)
    db.sql("UPDATE journal SET data = '{\"i\":-1}' WHERE seq = ?", (edited,))
    db.rehash_from(edited)
    db.sql("DELETE FROM journal_checkpoints WHERE seq >= ?", (edited,))
    assert check(db, anchor=False, max_unsigned=BOUND).ok  # the limit without an anchor
    v = check(db)
    assert not v.ok
    assert v.problem == (
        "the anchor's checkpoint at seq 100 is not in the journal (its records rewritten "
        "and the checkpoints after the edit deleted?)"
    )
    assert v.first_bad_seq == before + 1 <= edited

    edited = 10  # far back: the rest of the journal is then unsigned
    db.sql("UPDATE journal SET data = '{\"i\":-1}' WHERE seq = ?", (edited,))
    db.rehash_from(edited)
    db.sql("DELETE FROM journal_checkpoints WHERE seq >= ?", (edited,))
    v = check(db, anchor=False, max_unsigned=BOUND)
    assert (v.ok, v.first_bad_seq) == (False, 1)
    assert v.problem.startswith("no signed checkpoint covers seq 1..100")


def test_row_rows_inserted_at_the_head_while_the_writer_runs(any_db: Db) -> None:
    """Row: insert correctly chained rows at the head while a writer runs: the writer
    notices at its next commit, records journal.foreign_head, signs nothing more, and
    verify fails, naming the first foreign row."""
    journal = Journal(
        any_db.url,
        node="n1",
        key=KEY,
        checkpoint_every=EVERY,
        batch_size=MAX_BATCH,
        max_batch=MAX_BATCH,
        anchor=any_db.anchor,
    ).open()
    try:
        for i in range(25):
            trellis.telemetry.emit("work.item", time=float(i), i=i)
        journal.flush()
        assert journal.foreign_head is None
        db = attack(any_db)
        first = db.append(2)
        for i in range(25, 60):
            trellis.telemetry.emit("work.item", time=float(i), i=i)
        journal.flush()
    finally:
        journal.close()
    assert journal.foreign_head is not None
    assert journal.foreign_head.startswith(f"the head is seq {first + 1}, not seq {first - 1}")
    rows = db.rows()
    flagged = [r for r in rows if r[5] == "journal.foreign_head"]
    assert len(flagged) == 1
    assert flagged[0][0] == first + 2
    data = json.loads(flagged[0][6])
    assert (data["expected_seq"], data["found_seq"]) == (first - 1, first + 1)
    assert all(c[0] < first for c in db.checkpoints())  # the foreign rows are never signed
    assert json.loads(Path(any_db.anchor).read_text())["seq"] < first
    for key in (KEY, None):
        v = verify(any_db.url, key=key, anchor=False)
        assert (v.ok, v.first_bad_seq) == (False, first), v.problem
        assert v.problem.startswith(
            "a writer found rows at the head it had not written and stopped signing "
            f"(journal.foreign_head at seq {first + 2}"
        )


def test_row_rows_appended_after_the_writer_closed(any_db: Db) -> None:
    """Row: append chained rows after the writer closed: detected with the anchor (the
    writer closed at its last checkpoint); the next writer refuses to sign over them.
    Without an anchor: not detected, and the next writer signs over them."""
    write(any_db, 40)
    db = attack(any_db)
    first = db.append(3)
    assert check(db, anchor=False).ok  # the limit without an anchor
    v = check(db)
    assert (v.ok, v.first_bad_seq) == (False, first)
    assert v.problem == (
        f"seq {first}..{first + 2} follow the checkpoint the writer closed with (seq 40) "
        "and no writer signed them: added by someone else"
    )
    journal = write(db, 5, start=40)
    assert journal.foreign_head == (
        f"seq {first}..{first + 2} were added after the writer closed at seq 40 "
        "(rows it did not write)"
    )
    assert db.checkpoints()[-1][0] == 40
    assert not check(db, anchor=False).ok


def test_row_without_the_anchor_the_next_writer_signs_over_appended_rows(
    sqlite_db: Db,
) -> None:
    """Row (the limit): with no anchor at all, rows appended while no writer runs are
    signed by the next writer and verify passes."""
    write(sqlite_db, 40, anchor=False)
    db = attack(sqlite_db)
    db.append(3)
    write(db, 5, start=40, anchor=False)
    assert verify(db.url, key=KEY, anchor=False).ok


def test_row_forged_checkpoint_is_refused_by_the_next_writer(any_db: Db) -> None:
    """Row: edit a checkpoint's HMAC (or hash): verify fails, and the next writer does
    not sign on top of a checkpoint chain that does not verify."""
    write(any_db, 60)
    db = attack(any_db)
    cps = db.checkpoints()
    db.sql("UPDATE journal_checkpoints SET hmac = ? WHERE seq = ?", ("0" * 64, cps[1][0]))
    assert not check(db, anchor=False).ok
    journal = write(db, 5, start=60)
    assert journal.foreign_head == (
        f"the checkpoint at seq {cps[1][0]} has a bad HMAC (forged or edited, one before "
        "it removed, or another key)"
    )
    assert len(db.checkpoints()) == len(cps)


def test_row_the_anchor_file_edited_deleted_or_replayed(sqlite_db: Db, tmp_path: Path) -> None:
    """Rows about the anchor file itself: edited -> detected (its MAC); deleted -> an
    explicit anchor is an error, the default one is just not used; an older anchor put
    back after truncating to its checkpoint -> NOT detected (keep the anchor where the
    database's attacker cannot write)."""
    write(sqlite_db, 40)
    old = tmp_path / "old.anchor"
    shutil.copy(sqlite_db.anchor, old)
    write(sqlite_db, 40, start=40)
    anchor = json.loads(Path(sqlite_db.anchor).read_text())
    edited = dict(anchor, seq=20)
    Path(sqlite_db.anchor).write_text(json.dumps(edited))
    v = check(sqlite_db)
    assert (v.ok, v.problem) == (
        False,
        f"anchor {sqlite_db.anchor}: the anchor's signature does not verify (the file was edited)",
    )
    os.unlink(sqlite_db.anchor)
    with pytest.raises(JournalError, match="does not exist"):
        check(sqlite_db)
    assert verify(sqlite_db.url, key=KEY).ok  # the default anchor, when missing, is skipped
    db = attack(sqlite_db)
    db.sql("DELETE FROM journal WHERE seq > 40")
    db.sql("DELETE FROM journal_checkpoints WHERE seq > 40")
    shutil.copy(old, sqlite_db.anchor)
    assert check(db).ok  # the replay limit


def test_row_dropping_the_tables_or_the_file(sqlite_db: Db) -> None:
    """Row: drop the tables or remove the file: verify cannot read a journal (an error,
    exit 2 from the CLI), never a pass."""
    from trellis.journal import JournalNotFound, NotAJournal

    write(sqlite_db, 10)
    db = attack(sqlite_db)
    db.sql("DROP TABLE journal")
    db.sql("DROP TABLE journal_checkpoints")
    with pytest.raises(NotAJournal):
        check(db, anchor=False)
    db.conn.close()
    db.conn = None
    os.unlink(db.url[len("sqlite:///") :])
    with pytest.raises(JournalNotFound):
        check(db, anchor=False)


def test_a_signing_writer_waits_for_the_one_before_it(any_db: Db) -> None:
    """One signing writer at a time: a second writer (say, of a run started again right
    after a kill -9, while the old writer still commits its last batch) waits until the
    first has let go, so the first's last rows are not foreign at its head."""
    import threading

    def journal() -> Journal:
        return Journal(any_db.url, node="n1", key=KEY, checkpoint_every=EVERY, anchor=any_db.anchor)

    first = journal().open()
    for i in range(5):
        trellis.telemetry.emit("work.item", time=float(i), i=i)
    first.flush()
    second = journal()
    opened = threading.Event()
    t = threading.Thread(target=lambda: (second.open(), opened.set()))
    t.start()
    assert not opened.wait(1.0)  # waits for the first writer
    for i in range(5, 10):
        trellis.telemetry.emit("work.item", time=float(i), i=i)
    first.close()
    assert opened.wait(30)
    t.join()
    trellis.telemetry.emit("work.item", time=10.0, i=10)
    second.close()
    assert first.foreign_head is None
    assert second.foreign_head is None
    v = check(any_db)
    assert v.ok, v.problem


def test_a_postgresql_journal_has_a_default_anchor_in_the_state_dir(
    pg_server: Any, pg_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without anchor=, a signed PostgreSQL journal mirrors its checkpoint to the state
    directory, and verify with the key finds it there: truncation is caught."""
    state = tmp_path / "state"
    monkeypatch.setenv("TRELLIS_STATE_DIR", str(state))
    url = pg_server.url(pg_db)
    db = Db(url, "", "%s", backend="postgresql")
    db.pg = (pg_server, pg_db)  # type: ignore[attr-defined]
    journal = Journal(url, key=KEY, checkpoint_every=EVERY, batch_size=MAX_BATCH)
    expected = state / f"pg-127.0.0.1-{pg_server.port}-{pg_db}.anchor"
    assert journal.anchor_path == str(expected)
    with journal:
        for i in range(60):
            trellis.telemetry.emit("work.item", time=float(i), i=i)
            if i % MAX_BATCH == MAX_BATCH - 1:
                journal.flush()
    assert stat.S_IMODE(expected.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    v = verify(url, key=KEY)
    assert (v.ok, v.anchor, v.anchor_seq) == (True, str(expected), 60), v.problem
    attack(db)
    keep = db.checkpoints()[0][0]
    db.sql("DELETE FROM journal WHERE seq > %s", (keep,))
    db.sql("DELETE FROM journal_checkpoints WHERE seq > %s", (keep,))
    db.conn.close()
    db.conn = None
    v = verify(url, key=KEY)
    assert not v.ok
    assert v.problem.startswith(f"the journal ends at seq {keep} but the anchor covers seq 60")


_SINK = """
import os, sys
line = sys.stdin.read()
with open(sys.argv[1], "a") as f:
    f.write("host trellis-anchor: " + line)  # a log prefix, as syslog would add
    f.flush()
with open(sys.argv[1] + ".env", "a") as f:
    f.write(str("TRELLIS_JOURNAL_KEY" in os.environ) + "\\n")
"""


def test_row_an_older_anchor_put_back_is_caught_by_the_anchors_sent_off_the_host(
    sqlite_db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row: with anchor_command, every anchor also goes to a sink the database's
    attacker cannot rewrite; truncating the journal and putting an older anchor file
    back beside it is then caught by verify --anchor SINK. The command never sees the
    key."""
    monkeypatch.setenv("TRELLIS_JOURNAL_KEY", KEY)  # the writer's environment has it
    sink = tmp_path / "anchors.log"
    command = [sys.executable, "-c", _SINK, str(sink)]
    old = tmp_path / "old.anchor"

    def session(start: int) -> None:
        with Journal(
            sqlite_db.url,
            key=KEY,
            checkpoint_every=EVERY,
            batch_size=MAX_BATCH,
            max_batch=MAX_BATCH,
            anchor=sqlite_db.anchor,
            anchor_command=command,
        ) as journal:
            for i in range(start, start + 40):
                trellis.telemetry.emit("work.item", time=float(i), i=i)
                if i % MAX_BATCH == MAX_BATCH - 1:
                    journal.flush()

    session(0)
    shutil.copy(sqlite_db.anchor, old)
    session(40)
    lines = sink.read_text().splitlines()
    assert len(lines) >= 4
    assert all(line.startswith("host trellis-anchor: {") for line in lines)
    assert json.loads(lines[-1].split(": ", 1)[1])["seq"] == 80
    assert set(Path(f"{sink}.env").read_text().split()) == {"False"}
    assert check(sqlite_db, anchor=True).ok
    v = verify(sqlite_db.url, key=KEY, anchor=str(sink))
    assert (v.ok, v.anchor_seq) == (True, 80), v.problem

    db = attack(sqlite_db)  # truncate to the first session's end, put its anchor back
    db.sql("DELETE FROM journal WHERE seq > 40")
    db.sql("DELETE FROM journal_checkpoints WHERE seq > 40")
    shutil.copy(old, sqlite_db.anchor)
    assert check(db).ok  # the replay fools the anchor beside the database...
    v = verify(db.url, key=KEY, anchor=str(sink))  # ...not the one sent away
    assert not v.ok
    assert v.problem.startswith("the journal ends at seq 40 but the anchor covers seq 80")


@pytest.mark.parametrize("seq", [0, -7])
def test_row_numbered_outside_the_chain_is_caught_and_never_shown(any_db: Db, seq: int) -> None:
    """A row inserted with a seq below 1 (where the chain never reaches) was skipped by
    verify, with key and anchor, while `tail` showed it as a record: a forged operator
    action. verify fails on it, and tail does not show it."""
    write(any_db, 40)
    db = attack(any_db)
    row = (seq, "2026-12-07T19:18:37.000000Z", 1.0, "n1", "x/a", "operator.action")
    forged = '{"action":"stop_tree","who":"uid:1000","result":"ok"}'
    db.sql("INSERT INTO journal VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (*row, forged, "x", "y"))
    v = check(any_db)
    assert not v.ok
    assert v.first_bad_seq == 1
    assert "outside the chain" in (v.problem or "")
    assert all(r["seq"] >= 1 for r in tail(any_db.url, n=1000))

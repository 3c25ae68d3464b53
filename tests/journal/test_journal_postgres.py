"""The journal on PostgreSQL (a throwaway server started by the tests): the same chain,
the same append-only triggers, the same tamper evidence as on SQLite, and a writer
that needs nothing but INSERT and SELECT."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import pytest

from trellis.journal import Journal, JournalError, JournalNotFound, export, tail, verify

psycopg = pytest.importorskip("psycopg")

KEY = "0123456789abcdef0123456789abcdef"


def canonical_hash(prev: str, row: tuple[Any, ...]) -> str:
    seq, utc, mono, node, path, kind, data = row[:7]
    text = prev + json.dumps(
        [seq, utc, mono, node, path, kind, data], separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def rows(pg_server: Any, db: str) -> list[tuple[Any, ...]]:
    with pg_server.admin(db) as conn:
        return conn.execute("SELECT * FROM journal ORDER BY seq").fetchall()


def attacker(pg_server: Any, db: str) -> Any:
    """A superuser connection with the append-only triggers dropped."""
    conn = pg_server.admin(db)
    for t in ("journal", "journal_checkpoints"):
        conn.execute(f"DROP TRIGGER {t}_no_change ON {t}")
        conn.execute(f"DROP TRIGGER {t}_no_truncate ON {t}")
    return conn


async def journaled_storm(storm: Any, url: str, restarts: int = 20, **kw: Any) -> Any:
    journal = Journal(url, **kw)
    await journal.start()
    try:
        result = await storm(restarts)
    finally:
        await journal.stop()
    return result, journal


async def test_storm_verifies_and_counts_match(storm: Any, pg_server: Any, pg_db: str) -> None:
    url = pg_server.url(pg_db)
    result, journal = await journaled_storm(storm, url, restarts=200)
    all_rows = rows(pg_server, pg_db)
    assert Counter(r[5] for r in all_rows) == result.kinds
    assert [r[0] for r in all_rows] == list(range(1, len(all_rows) + 1))
    assert journal.written == len(all_rows)
    prev = "0" * 64
    for r in all_rows:  # the documented hash, over what PostgreSQL gives back
        assert (r[7], r[8]) == (prev, canonical_hash(prev, r))
        prev = r[8]
    v = verify(url)
    assert v.ok
    assert v.records == len(all_rows)
    recs = list(tail(url, n=3))
    assert [r["seq"] for r in recs] == [len(all_rows) - 2, len(all_rows) - 1, len(all_rows)]
    assert recs[-1]["kind"] == "supervisor.stopped"
    since = list(tail(url, since_seq=len(all_rows) - 1))
    assert [r["seq"] for r in since] == [len(all_rows) - 1, len(all_rows)]


async def test_triggers_refuse_update_delete_and_truncate(
    storm: Any, pg_server: Any, pg_db: str
) -> None:
    url = pg_server.url(pg_db)
    await journaled_storm(storm, url, restarts=2, key=KEY)
    with pg_server.admin(pg_db) as conn:
        for sql in (
            "UPDATE journal SET data = '{}' WHERE seq = 1",
            "DELETE FROM journal WHERE seq = 1",
            "TRUNCATE journal",
            "UPDATE journal_checkpoints SET hash = 'x'",
            "DELETE FROM journal_checkpoints",
            "TRUNCATE journal_checkpoints",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(sql)
    assert verify(url, key=KEY).ok


def _edit(conn: Any) -> None:
    conn.execute("UPDATE journal SET data = replace(data, 'crash', 'normal') WHERE seq = 17")


def _delete(conn: Any) -> None:
    conn.execute("DELETE FROM journal WHERE seq = 17")


def _reorder(conn: Any) -> None:
    conn.execute("UPDATE journal SET seq = -17 WHERE seq = 17")
    conn.execute("UPDATE journal SET seq = 17 WHERE seq = 18")
    conn.execute("UPDATE journal SET seq = 18 WHERE seq = -17")


@pytest.mark.parametrize(
    ("attack", "problem"),
    [
        (_edit, "hash mismatch at seq 17 (record edited)"),
        (_delete, "seq 17 missing (expected 17, found 18)"),
        (_reorder, "record out of order at seq 17: it follows seq 18, not 16"),
    ],
)
async def test_tampering_is_found_at_the_right_seq(
    storm: Any, pg_server: Any, pg_db: str, attack: Any, problem: str
) -> None:
    url = pg_server.url(pg_db)
    await journaled_storm(storm, url)
    with attacker(pg_server, pg_db) as conn:
        attack(conn)
    v = verify(url)
    assert (v.ok, v.first_bad_seq, v.problem) == (False, 17, problem)


async def test_recomputed_chain_is_caught_by_the_signed_checkpoints(
    storm: Any, pg_server: Any, pg_db: str
) -> None:
    url = pg_server.url(pg_db)
    await journaled_storm(
        storm, url, restarts=40, key=KEY, batch_size=10, max_batch=10, checkpoint_every=20
    )
    with attacker(pg_server, pg_db) as conn:
        cps = conn.execute("SELECT seq FROM journal_checkpoints ORDER BY seq").fetchall()
        assert len(cps) >= 3
        edited = cps[0][0] + 2
        conn.execute(f"UPDATE journal SET data = replace(data, 'crash', 'x') WHERE seq = {edited}")
        all_rows = conn.execute("SELECT * FROM journal ORDER BY seq").fetchall()
        prev = all_rows[edited - 2][8]
        for r in all_rows[edited - 1 :]:
            h = canonical_hash(prev, r)
            conn.execute(
                "UPDATE journal SET prev_hash = %s, hash = %s WHERE seq = %s", (prev, h, r[0])
            )
            prev = h
        heads = dict(conn.execute("SELECT seq, hash FROM journal").fetchall())
        for (seq,) in cps[1:]:
            conn.execute(
                "UPDATE journal_checkpoints SET hash = %s WHERE seq = %s", (heads[seq], seq)
            )
    assert verify(url).ok  # consistent without the key...
    v = verify(url, key=KEY)  # ...but the forged checkpoints carry no valid HMAC
    assert not v.ok
    assert v.first_bad_seq == cps[0][0] + 1 <= edited
    assert v.problem.startswith(f"checkpoint at seq {cps[1][0]} has a bad HMAC")


async def test_reopening_continues_the_chain(storm: Any, pg_server: Any, pg_db: str) -> None:
    url = pg_server.url(pg_db)
    first, _ = await journaled_storm(storm, url, restarts=5, key=KEY)
    second, _ = await journaled_storm(storm, url, restarts=5, key=KEY)
    all_rows = rows(pg_server, pg_db)
    assert Counter(r[5] for r in all_rows) == first.kinds + second.kinds
    v = verify(url, key=KEY)
    assert v.ok
    assert v.checkpoints == 2
    assert v.records == len(all_rows)


async def test_an_insert_only_role_can_write_but_not_change(
    storm: Any, pg_server: Any, pg_db: str, tmp_path: Any
) -> None:
    """The documented role (INSERT and SELECT only) journals a storm into a schema its
    owner created; it can neither update nor delete, even with the triggers gone."""
    owner_url = pg_server.url(pg_db)
    with Journal(owner_url):  # the owner creates the schema
        pass
    with pg_server.admin(pg_db) as conn:
        conn.execute("DROP ROLE IF EXISTS trellis_writer")
        conn.execute("CREATE ROLE trellis_writer LOGIN")
        conn.execute(f"GRANT CONNECT ON DATABASE {pg_db} TO trellis_writer")
        conn.execute("GRANT USAGE ON SCHEMA public TO trellis_writer")
        conn.execute("GRANT SELECT, INSERT ON journal, journal_checkpoints TO trellis_writer")
    writer_url = pg_server.url(pg_db, user="trellis_writer")
    try:
        result, _ = await journaled_storm(storm, writer_url, restarts=10, key=KEY)
        assert Counter(r[5] for r in rows(pg_server, pg_db)) == result.kinds
        assert verify(writer_url, key=KEY).ok
        with attacker(pg_server, pg_db):
            pass  # triggers gone: only the privileges stand in the way now
        with psycopg.connect(writer_url, autocommit=True) as conn:
            for sql in (
                "UPDATE journal SET data = '{}'",
                "DELETE FROM journal",
                "TRUNCATE journal",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql)
        out = tmp_path / "export.jsonl"
        n = export(writer_url, out)
        assert n == len(out.read_text().splitlines()) == len(rows(pg_server, pg_db))
    finally:
        with pg_server.admin(pg_db) as conn:
            conn.execute("DROP OWNED BY trellis_writer")
            conn.execute("DROP ROLE trellis_writer")


def test_unreachable_or_empty_databases_are_clear_errors(pg_server: Any, pg_db: str) -> None:
    with pytest.raises(JournalNotFound, match="no journal at postgresql://postgres@"):
        verify(pg_server.url(pg_db))
    with pytest.raises(JournalError, match="cannot connect to journal postgresql://x:\\*\\*\\*@"):
        verify(f"postgresql://x:secret@127.0.0.1:{pg_server.port}/no_such_db")

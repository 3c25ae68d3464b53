"""Journal storage backends, chosen by URL: SQLite (``sqlite:///path``) and PostgreSQL
(``postgresql://...``, psycopg 3). Same schema, same guarantees:

- table ``journal(seq, utc, mono, node, path, kind, data, prev_hash, hash)``, ``seq``
  the primary key; table ``journal_checkpoints(seq, hash, hmac, utc)``;
- triggers refuse every UPDATE and DELETE (and TRUNCATE on PostgreSQL) on both tables;
- a writer appends one batch per transaction while holding the store's write lock
  (SQLite ``BEGIN IMMEDIATE``; PostgreSQL an advisory transaction lock) and re-reads the
  head inside it, so several writers can share one journal and still form one chain.

SQLite runs in WAL mode with ``synchronous=FULL``: a committed batch survives a crash
or power loss. On PostgreSQL, durability is the server's (``synchronous_commit``).

PostgreSQL insert-only role (the schema is created by its owner on the first write;
afterwards the writer needs nothing but INSERT and SELECT)::

    CREATE ROLE trellis_journal LOGIN PASSWORD '...';
    GRANT CONNECT ON DATABASE mydb TO trellis_journal;
    GRANT USAGE ON SCHEMA public TO trellis_journal;
    GRANT SELECT, INSERT ON journal, journal_checkpoints TO trellis_journal;
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlsplit

from ._chain import GENESIS, Row
from ._errors import JournalError, JournalNotFound, JournalURLError, NotAJournal

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "COLUMNS",
    "Checkpoint",
    "ReadStore",
    "Target",
    "WriteStore",
    "open_reader",
    "open_writer",
    "parse_url",
    "private_files",
]

COLUMNS = ("seq", "utc", "mono", "node", "path", "kind", "data", "prev_hash", "hash")
_CHECKPOINT_COLUMNS = ("seq", "hash", "hmac", "utc")
#: Seconds a SQLite writer waits for another connection's write lock before the
#: attempt fails (and is retried with backoff).
SQLITE_BUSY_TIMEOUT = 5.0
_PG_LOCK = 0x7472656C6C6973  # "trellis": the advisory lock every writer takes per batch
_PG_WRITER_LOCK = _PG_LOCK + 1  # held for its life by the one writer that signs

Checkpoint = tuple[int, str, str, str]  # (seq, hash, hmac, utc)


# ---------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A parsed journal URL: ``backend`` is ``"sqlite"`` (with ``path``) or
    ``"postgresql"`` (with ``conninfo``)."""

    url: str
    backend: str
    path: str = ""
    conninfo: str = ""

    @property
    def shown(self) -> str:
        """The URL with any password hidden."""
        return _hide_password(self.url)


def _hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def parse_url(url: str) -> Target:
    """Parse a journal URL; raises :class:`JournalURLError` naming the URL and the problem.

    ``sqlite:///relative/path.db`` (relative to the working directory),
    ``sqlite:////absolute/path.db``, ``postgresql://user@host:port/db`` (or ``postgres://``).

    Example::

        parse_url("sqlite:///var/trellis.db").path == "var/trellis.db"
    """
    if not isinstance(url, str) or not url.strip():
        raise JournalURLError(
            f"bad journal URL {url!r}: empty (expected sqlite:///PATH or postgresql://...)"
        )
    shown = _hide_password(url)
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise JournalURLError(
            f"bad journal URL {shown!r}: no scheme (expected sqlite:///PATH or postgresql://...)"
        )
    if scheme == "sqlite":
        if not rest.startswith("///"):
            raise JournalURLError(
                f"bad journal URL {shown!r}: a sqlite URL has three slashes before a relative "
                "path (sqlite:///journal.db) and four before an absolute one "
                "(sqlite:////var/lib/journal.db)"
            )
        path = rest[3:]
        if not path:
            raise JournalURLError(f"bad journal URL {shown!r}: no database file path")
        if path == ":memory:" or path.startswith("file:") or "?" in path:
            raise JournalURLError(
                f"bad journal URL {shown!r}: give a plain file path (in-memory databases and "
                "query parameters are not supported)"
            )
        return Target(url, "sqlite", path=path)
    if scheme in ("postgresql", "postgres"):
        if not rest.startswith("//"):
            raise JournalURLError(
                f"bad journal URL {shown!r}: expected postgresql://[user[:password]@]host[:port]/db"
            )
        parts = urlsplit(url)
        if "," not in parts.netloc:  # one host: check the port (libpq checks only on connect)
            try:
                parts.port  # noqa: B018
            except ValueError as e:
                raise JournalURLError(f"bad journal URL {shown!r}: {e}") from None
        pg = _psycopg(shown)
        try:
            pg.conninfo.conninfo_to_dict(url)
        except pg.ProgrammingError as e:
            raise JournalURLError(f"bad journal URL {shown!r}: {e}") from None
        return Target(url, "postgresql", conninfo=url)
    raise JournalURLError(
        f"bad journal URL {shown!r}: unknown scheme {scheme!r} "
        "(expected sqlite:///PATH or postgresql://...)"
    )


def _psycopg(shown: str) -> Any:
    try:
        import psycopg
    except ImportError:
        raise JournalURLError(
            f"journal URL {shown!r} needs psycopg 3: pip install 'trellis[postgres]'"
        ) from None
    return psycopg


# ---------------------------------------------------------------------------
# Interfaces
# ---------------------------------------------------------------------------


class WriteStore(Protocol):
    """One writer's connection. A batch: ``begin()`` (takes the write lock, returns the
    head ``(seq, hash)``), ``insert(rows)``, optional checkpoint, ``commit()``."""

    def begin(self) -> tuple[int, str]: ...

    def insert(self, rows: Sequence[Row]) -> None: ...

    def last_checkpoint(self) -> tuple[int, str]: ...

    def insert_checkpoint(self, cp: Checkpoint) -> None: ...

    def keys_after(self, seq: int, node: str) -> set[tuple[str, float, str]]:
        """``(utc, mono, kind)`` of the records after ``seq`` written for ``node``."""
        ...

    def checkpoints(self) -> list[Checkpoint]: ...

    def rows_from(self, seq: int) -> list[Row]: ...

    def last_rows(self, n: int) -> list[Row]: ...

    def last_run(self) -> tuple[int, str, str] | None: ...

    def lock_writer(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds to be the only signing writer of this journal
        (held until :meth:`close` or the process ends); whether it was obtained."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def reconnect(self) -> None: ...

    def close(self) -> None: ...


class ReadStore(Protocol):
    """A reader's connection. ``snapshot()`` starts one consistent read."""

    def snapshot(self) -> None: ...

    def end(self) -> None: ...

    def rows(self, since_seq: int = 1) -> Iterator[Row]: ...

    def last_rows(self, n: int) -> list[Row]: ...

    def seq_of_hash(self, hash: str) -> int | None: ...

    def checkpoints(self) -> list[Checkpoint]: ...

    def close(self) -> None: ...


def open_writer(target: Target) -> WriteStore:
    """Open (creating when missing) the journal at ``target`` for appending."""
    if target.backend == "sqlite":
        return _SQLiteWriter(target)
    return _PostgresWriter(target)


def open_reader(target: Target) -> ReadStore:
    """Open the existing journal at ``target`` read-only; never creates anything."""
    if target.backend == "sqlite":
        return _SQLiteReader(target)
    return _PostgresReader(target)


def _row(r: Sequence[Any]) -> Row:
    return (int(r[0]), r[1], float(r[2]), r[3], r[4], r[5], r[6], r[7], r[8])


# ---------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------

_SQLITE_SCHEMA = (
    """CREATE TABLE journal (
        seq INTEGER PRIMARY KEY,
        utc TEXT NOT NULL,
        mono REAL NOT NULL,
        node TEXT NOT NULL,
        path TEXT,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )""",
    """CREATE TABLE journal_checkpoints (
        seq INTEGER PRIMARY KEY,
        hash TEXT NOT NULL,
        hmac TEXT NOT NULL,
        utc TEXT NOT NULL
    )""",
    *(
        f"""CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table}
        BEGIN SELECT RAISE(ABORT, 'trellis journal is append-only: {op} on {table} refused'); END"""
        for table in ("journal", "journal_checkpoints")
        for op in ("UPDATE", "DELETE")
    ),
)

_SQLITE_INSERT = "INSERT INTO journal VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_HEAD = "SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1"
_LAST_CP = "SELECT seq, hmac FROM journal_checkpoints ORDER BY seq DESC LIMIT 1"
_KEYS_AFTER = "SELECT utc, mono, kind FROM journal WHERE seq > %s AND node = %s"


#: The files of a SQLite journal: the database, its write-ahead log and shared memory.
SQLITE_SUFFIXES = ("", "-wal", "-shm")


def private_files(path: str) -> list[str]:
    """Create the database file at ``path`` with mode 0600 if it is missing (SQLite
    gives its ``-wal`` and ``-shm`` files the database file's mode), and take group and
    other access away from the existing ones we own; the files it had to tighten.
    A file owned by someone else is left alone (SQLite reports what it cannot open)."""
    tightened: list[str] = []
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    except OSError:
        return tightened  # a missing directory, say: sqlite3.connect names it
    else:
        os.close(fd)
        return tightened
    for suffix in SQLITE_SUFFIXES:
        name = path + suffix
        try:
            st = os.stat(name)
        except OSError:
            continue
        if st.st_uid == os.getuid() and st.st_mode & 0o077 and stat.S_ISREG(st.st_mode):
            try:
                os.chmod(name, 0o600)
            except OSError:
                continue
            tightened.append(name)
    return tightened


def _sqlite_schema(conn: sqlite3.Connection, target: Target) -> bool:
    """Whether the journal tables exist with the expected columns (False: neither
    exists); raises NotAJournal for anything else."""
    return _schema_state(
        target,
        {
            table: tuple(r[1] for r in conn.execute(f"PRAGMA table_info({table})"))
            for table in ("journal", "journal_checkpoints")
        },
    )


def _schema_state(target: Target, found: dict[str, tuple[str, ...]]) -> bool:
    expected = {"journal": COLUMNS, "journal_checkpoints": _CHECKPOINT_COLUMNS}
    if not any(found.values()):
        return False
    for table, cols in expected.items():
        got = found[table]
        if got != cols:
            what = (
                f"no table {table!r}"
                if not got
                else (
                    f"table {table!r} has columns ({', '.join(got)}), expected ({', '.join(cols)})"
                )
            )
            where = target.path if target.backend == "sqlite" else "the database"
            raise NotAJournal(f"{where!r} (from {target.shown}) is not a Trellis journal: {what}")
    return True


class _Queries:
    """The read queries both backends share; ``P`` is the driver's placeholder."""

    P = "?"
    conn: Any

    def last_rows(self, n: int) -> list[Row]:
        cur = self.conn.execute(
            f"SELECT * FROM journal WHERE seq >= 1 ORDER BY seq DESC LIMIT {self.P}", (n,)
        )
        return [_row(r) for r in reversed(cur.fetchall())]

    def seq_of_hash(self, hash: str) -> int | None:
        q = f"SELECT seq FROM journal WHERE hash = {self.P} LIMIT 1"
        r = self.conn.execute(q, (hash,)).fetchone()
        return None if r is None else int(r[0])

    def rows_from(self, seq: int) -> list[Row]:
        """Every record from ``seq`` on, oldest first."""
        q = f"SELECT * FROM journal WHERE seq >= {self.P} ORDER BY seq"
        return [_row(r) for r in self.conn.execute(q, (seq,)).fetchall()]

    def last_run(self) -> tuple[int, str, str] | None:
        """``(seq, kind, data)`` of the last ``run.started`` or ``run.stopped`` record
        (read backwards from the head: the cost is the length of the last run)."""
        q = (
            "SELECT seq, kind, data FROM journal WHERE kind IN ('run.started', "
            "'run.stopped') ORDER BY seq DESC LIMIT 1"
        )
        r = self.conn.execute(q).fetchone()
        return None if r is None else (int(r[0]), str(r[1]), str(r[2]))

    def checkpoints(self) -> list[Checkpoint]:
        cur = self.conn.execute("SELECT seq, hash, hmac, utc FROM journal_checkpoints ORDER BY seq")
        return [(int(r[0]), r[1], r[2], r[3]) for r in cur.fetchall()]


class _SQLiteWriter(_Queries):
    def __init__(self, target: Target) -> None:
        self.target = target
        self.busy_timeout = SQLITE_BUSY_TIMEOUT
        self.tightened: list[str] = []
        self.lock_fd = -1
        self.conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        t = self.target
        parent = os.path.dirname(os.path.abspath(t.path))
        if not os.path.isdir(parent):
            raise JournalError(
                f"cannot open journal {t.shown}: directory {parent!r} does not exist"
            )
        self.tightened = private_files(t.path)
        try:
            conn = sqlite3.connect(t.path, timeout=self.busy_timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise JournalError(f"cannot open journal {t.shown}: {e}") from e
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"cannot open journal {t.shown}: WAL mode refused ({mode})")
            conn.execute("PRAGMA synchronous=FULL")
            if not _sqlite_schema(conn, t):  # created under the write lock, checked again
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if not _sqlite_schema(conn, t):
                        for statement in _SQLITE_SCHEMA:
                            conn.execute(statement)
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
        except sqlite3.DatabaseError as e:
            conn.close()
            raise NotAJournal(f"cannot open journal {t.shown}: {e}") from e
        except BaseException:
            conn.close()
            raise
        return conn

    def lock_writer(self, timeout: float) -> bool:
        """An exclusive ``flock`` on ``<db>.writer-lock`` (mode 0600), released when
        this process ends, even by kill -9."""
        import fcntl
        import time

        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.target.path + ".writer-lock", flags, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.02)
                continue
            self.lock_fd = fd
            return True

    def begin(self) -> tuple[int, str]:
        self.conn.execute("BEGIN IMMEDIATE")
        head = self.conn.execute(_HEAD).fetchone()
        return (0, GENESIS) if head is None else (int(head[0]), str(head[1]))

    def insert(self, rows: Sequence[Row]) -> None:
        self.conn.executemany(_SQLITE_INSERT, rows)

    def last_checkpoint(self) -> tuple[int, str]:
        cp = self.conn.execute(_LAST_CP).fetchone()
        return (0, "") if cp is None else (int(cp[0]), str(cp[1]))

    def insert_checkpoint(self, cp: Checkpoint) -> None:
        self.conn.execute("INSERT INTO journal_checkpoints VALUES (?, ?, ?, ?)", cp)

    def keys_after(self, seq: int, node: str) -> set[tuple[str, float, str]]:
        cur = self.conn.execute(_KEYS_AFTER.replace("%s", "?"), (seq, node))
        return {(r[0], float(r[1]), r[2]) for r in cur}

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def reconnect(self) -> None:
        """Nothing to do: a SQLite connection does not break (errors are busy or disk
        errors, retried on the same connection)."""

    def close(self) -> None:
        self.conn.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


class _SQLiteReader(_Queries):
    def __init__(self, target: Target) -> None:
        self.target = target
        if not os.path.exists(target.path):
            raise JournalNotFound(f"no journal at {target.shown}: {target.path!r} does not exist")
        if not os.path.isfile(target.path):
            raise NotAJournal(f"{target.path!r} (from {target.shown}) is not a file")
        uri = "file:" + _uri_path(os.path.abspath(target.path)) + "?mode=ro"
        try:
            self.conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        except sqlite3.DatabaseError as e:
            raise NotAJournal(f"cannot read journal {target.shown}: {e}") from e
        try:
            if not _sqlite_schema(self.conn, target):
                raise NotAJournal(
                    f"{target.path!r} (from {target.shown}) is not a Trellis journal: "
                    "no table 'journal'"
                )
        except sqlite3.DatabaseError as e:
            self.conn.close()  # (Python 3.13 warns about a connection left to the GC)
            raise NotAJournal(f"cannot read journal {target.shown}: {e}") from e
        except BaseException:
            self.conn.close()
            raise

    def snapshot(self) -> None:
        self.conn.execute("BEGIN")

    def end(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")

    def rows(self, since_seq: int = 1) -> Iterator[Row]:
        cur = self.conn.execute("SELECT * FROM journal WHERE seq >= ? ORDER BY seq", (since_seq,))
        for r in cur:
            yield _row(r)

    def close(self) -> None:
        self.conn.close()


def _uri_path(path: str) -> str:
    return quote(path)


# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------

_PG_SCHEMA = """
CREATE TABLE journal (
    seq BIGINT PRIMARY KEY,
    utc TEXT NOT NULL,
    mono DOUBLE PRECISION NOT NULL,
    node TEXT NOT NULL,
    path TEXT,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE journal_checkpoints (
    seq BIGINT PRIMARY KEY,
    hash TEXT NOT NULL,
    hmac TEXT NOT NULL,
    utc TEXT NOT NULL
);
CREATE OR REPLACE FUNCTION journal_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'trellis journal is append-only: % on % refused', TG_OP, TG_TABLE_NAME;
END $$;
CREATE TRIGGER journal_no_change BEFORE UPDATE OR DELETE ON journal
    FOR EACH ROW EXECUTE FUNCTION journal_refuse_change();
CREATE TRIGGER journal_no_truncate BEFORE TRUNCATE ON journal
    FOR EACH STATEMENT EXECUTE FUNCTION journal_refuse_change();
CREATE TRIGGER journal_checkpoints_no_change BEFORE UPDATE OR DELETE ON journal_checkpoints
    FOR EACH ROW EXECUTE FUNCTION journal_refuse_change();
CREATE TRIGGER journal_checkpoints_no_truncate BEFORE TRUNCATE ON journal_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION journal_refuse_change();
"""


def _pg_connect(target: Target, *, autocommit: bool) -> psycopg.Connection[Any]:
    pg = _psycopg(target.shown)
    try:
        conn: psycopg.Connection[Any] = pg.connect(
            target.conninfo, autocommit=autocommit, connect_timeout=10
        )
    except pg.Error as e:
        raise JournalError(f"cannot connect to journal {target.shown}: {e}") from e
    return conn


def _pg_schema_ok(conn: psycopg.Connection[Any], target: Target) -> bool:
    """Whether the journal tables exist with the expected columns (False: neither
    exists); raises NotAJournal for anything else."""
    found: dict[str, tuple[str, ...]] = {}
    for table in ("journal", "journal_checkpoints"):
        found[table] = tuple(
            r[0]
            for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (table,),
            )
        )
    return _schema_state(target, found)


class _PostgresWriter(_Queries):
    P = "%s"

    def __init__(self, target: Target) -> None:
        self.target = target
        self.conn = self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        t = self.target
        pg = _psycopg(t.shown)
        conn = _pg_connect(t, autocommit=False)
        try:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
            if not _pg_schema_ok(conn, t):
                conn.execute(_PG_SCHEMA)
            conn.commit()
        except pg.Error as e:
            conn.close()
            raise JournalError(f"cannot open journal {t.shown}: {e}") from e
        except BaseException:
            conn.close()
            raise
        return conn

    def lock_writer(self, timeout: float) -> bool:
        """A session advisory lock (held while this connection lives, dropped by the
        server when the process dies)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            got = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (_PG_WRITER_LOCK,))
            ok = bool(got.fetchone()[0])
            self.conn.commit()
            if ok or time.monotonic() >= deadline:
                return ok
            time.sleep(0.05)

    def begin(self) -> tuple[int, str]:
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
        head = self.conn.execute(_HEAD).fetchone()
        return (0, GENESIS) if head is None else (int(head[0]), str(head[1]))

    def insert(self, rows: Sequence[Row]) -> None:
        with (
            self.conn.cursor() as cur,
            cur.copy(
                "COPY journal (seq, utc, mono, node, path, kind, data, prev_hash, hash) FROM STDIN"
            ) as copy,
        ):
            for r in rows:
                copy.write_row(r)

    def last_checkpoint(self) -> tuple[int, str]:
        cp = self.conn.execute(_LAST_CP).fetchone()
        return (0, "") if cp is None else (int(cp[0]), str(cp[1]))

    def insert_checkpoint(self, cp: Checkpoint) -> None:
        self.conn.execute("INSERT INTO journal_checkpoints VALUES (%s, %s, %s, %s)", cp)

    def keys_after(self, seq: int, node: str) -> set[tuple[str, float, str]]:
        cur = self.conn.execute(_KEYS_AFTER, (seq, node))
        return {(r[0], float(r[1]), r[2]) for r in cur.fetchall()}

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()

    def reconnect(self) -> None:
        """Open a new connection if the old one is broken (server restart, network)."""
        if not (self.conn.closed or self.conn.broken):
            return
        try:
            self.conn.close()
        except Exception:
            pass
        self.conn = self._connect()

    def close(self) -> None:
        self.conn.close()


class _PostgresReader(_Queries):
    P = "%s"

    def __init__(self, target: Target) -> None:
        self.target = target
        self.conn = _pg_connect(target, autocommit=True)
        try:
            if not _pg_schema_ok(self.conn, target):
                raise JournalNotFound(f"no journal at {target.shown}: no table 'journal'")
        except BaseException:
            self.conn.close()
            raise
        self._in_snapshot = False

    def snapshot(self) -> None:
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self._in_snapshot = True

    def end(self) -> None:
        if self._in_snapshot:
            self.conn.execute("COMMIT")
            self._in_snapshot = False

    def rows(self, since_seq: int = 1) -> Iterator[Row]:
        if self._in_snapshot:
            yield from self._stream(since_seq)
            return
        with self.conn.transaction():  # a server-side cursor lives in a transaction
            yield from self._stream(since_seq)

    def _stream(self, since_seq: int) -> Iterator[Row]:
        with self.conn.cursor(name="trellis_journal_rows") as cur:
            cur.itersize = 5000
            cur.execute("SELECT * FROM journal WHERE seq >= %s ORDER BY seq", (since_seq,))
            for r in cur:
                yield _row(r)

    def close(self) -> None:
        self.conn.close()

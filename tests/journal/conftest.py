"""Fixtures for the journal tests: a restart storm, and a throwaway PostgreSQL server."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import trellis
from trellis.testing import capture_telemetry

PG_BIN = Path("/usr/lib/postgresql/15/bin")
NOT_JOURNALED = ("process.output", "journal.batch", "journal.dropped", "journal.error")


async def crash() -> None:
    raise RuntimeError("boom")


@dataclass
class Storm:
    """What a storm emitted: the telemetry events and their names, in order."""

    events: list[dict[str, Any]]
    reason: Any

    @property
    def kinds(self) -> Counter[str]:
        """How many of each journaled event name was emitted."""
        return Counter(e["event"] for e in self.events if e["event"] not in NOT_JOURNALED)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


StormFn = Callable[..., Awaitable[Storm]]


@pytest.fixture(autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state directory of the test's own: default anchors of PostgreSQL journals go
    there, never into the user's ~/.local/state."""
    monkeypatch.setenv("TRELLIS_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def storm() -> StormFn:
    """``await storm(restarts)``: a supervisor named ``storm`` whose one child crashes at
    once, every time, until the supervisor gives up after exactly ``restarts`` restarts."""

    async def run(restarts: int, *, name: str = "storm", child: Any = None) -> Storm:
        spec = child if child is not None else trellis.worker("crasher", crash)
        with capture_telemetry() as cap:
            sup = await trellis.Supervisor.start_link(
                [spec], intensity=restarts, period=3600.0, name=name
            )
            reason = await sup.join(timeout=60)
        storm = Storm(list(cap.events), reason)
        assert len(storm.named("child.restarted")) == restarts
        assert len(storm.named("supervisor.gave_up")) == 1
        return storm

    return run


# ---------------------------------------------------------------------------
# A throwaway PostgreSQL server
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    port: int
    base: str

    def url(self, db: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{db}"

    def admin(self, db: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(self.url(db), autocommit=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL 15 server of our own (initdb in a temp dir, trust auth, loopback
    only, a free port), run as the postgres user; stopped and removed afterwards."""
    pg_ctl, initdb = PG_BIN / "pg_ctl", PG_BIN / "initdb"
    if not (pg_ctl.exists() and initdb.exists()):
        pytest.skip(
            f"PostgreSQL server binaries not found in {PG_BIN} (apt-get install postgresql-15)"
        )
    pytest.importorskip("psycopg", reason="psycopg 3 is needed: pip install 'psycopg[binary]'")
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no 'postgres' user to run the server as (initdb refuses root)")
    if shutil.which("runuser") is None:
        pytest.skip("runuser not found (util-linux): needed to run the server as postgres")
    base = tempfile.mkdtemp(prefix="trellis-journal-pg-")
    os.chown(base, pw.pw_uid, pw.pw_gid)
    data = os.path.join(base, "data")
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *as_pg,
            str(initdb),
            "-D",
            data,
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    port = _free_port()
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    log = os.path.join(base, "server.log")
    started = False
    try:
        subprocess.run(
            [*as_pg, str(pg_ctl), "-D", data, "-l", log, "-o", opts, "-w", "-t", "60", "start"],
            check=True,
            capture_output=True,
            timeout=90,
        )
        started = True
        yield PgServer(port, base)
    finally:
        if started:
            subprocess.run(
                [*as_pg, str(pg_ctl), "-D", data, "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


_db_counter = iter(range(1, 1_000_000))


@pytest.fixture
def pg_db(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database on the throwaway server; its name."""
    name = f"journal_{os.getpid()}_{next(_db_counter)}"
    with pg_server.admin() as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield name
    with contextlib.suppress(Exception), pg_server.admin() as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")

"""A throwaway PostgreSQL primary and synchronous streaming replica on loopback.

The notification service's database for tests and the demo: ``initdb`` a primary, clone
it with ``pg_basebackup -R`` (a physical replication slot) into a hot standby, and make
that standby *synchronous* (``synchronous_standby_names`` on the primary names the
replica's ``application_name``, ``synchronous_commit = on``). A commit the primary has
acknowledged is therefore already in the replica's WAL, so :meth:`PgCluster.promote`
after :meth:`PgCluster.stop_primary` loses no committed row (RPO 0). The replica itself
runs with ``synchronous_standby_names = ''`` so once promoted it does not wait for a
standby it does not have. The price of the synchronous standby: while the replica is down
and the primary is up, commits on the primary wait.

Clients write through :attr:`PgCluster.write_dsn`, a multi-host conninfo with
``target_session_attrs=read-write``: after a promotion a reconnecting client lands on the
new primary. ``fsync`` is off: this is for throwaway data only.

As root the servers run as the ``postgres`` user (``runuser -u postgres --``); the base
directory is chowned to it, so its parent directories must be searchable by that user
(``/tmp/...`` is; pytest's ``tmp_path`` is not).

Example::

    cluster = PgCluster("/tmp/notify-pg")
    cluster.start()              # primary + synchronous replica, about 2-3 s
    print(cluster.write_dsn, cluster.replica_dsn)
    cluster.stop_primary()       # pg_ctl stop -m immediate
    cluster.promote()            # the replica becomes the primary
    cluster.stop()

Command line (the demo uses it)::

    python -m examples.notify.pgcluster DIR [--no-replica]

starts the cluster in DIR, prints one JSON line ``{"primary": dsn, "replica": dsn|null,
"write": dsn, "primary_port": n, "replica_port": n|null, "startup_s": s}`` and stops
everything on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPLICA_NAME = "notify_replica"
"""The replica's ``application_name`` and replication slot name."""

_BINARIES = ("initdb", "pg_ctl", "postgres", "pg_basebackup")


def _pg_bin_dir() -> Path | None:
    """The directory holding all of initdb, pg_ctl, postgres and pg_basebackup (one version)."""
    candidates: list[Path] = []
    if os.environ.get("PG_BIN"):
        candidates.append(Path(os.environ["PG_BIN"]))
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted(
            (p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        candidates += [p / "bin" for p in reversed(versions)]
    candidates += [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    for d in candidates:
        if all((d / b).exists() for b in _BINARIES):
            return d
    return None


def skip_reason() -> str | None:
    """Why a PgCluster cannot run here (for ``pytest.skip``), or None when it can."""
    if _pg_bin_dir() is None:
        return (
            "PostgreSQL server binaries (initdb, pg_ctl, postgres, pg_basebackup in one "
            "directory) not found: apt-get install postgresql-15, or set PG_BIN"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg 3 is needed: pip install 'psycopg[binary]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "no 'postgres' user to run the server as (initdb refuses root)"
        if shutil.which("runuser") is None:
            return "runuser not found (util-linux): needed to run the server as postgres"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dsn(port: int) -> str:
    return f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=3"


class PgClusterError(RuntimeError):
    """A PostgreSQL command failed; the message carries its output."""


class PgCluster:
    """A primary and (optionally) one synchronous streaming replica under ``base_dir``.

    Layout: ``base_dir/primary`` and ``base_dir/replica`` (data directories) and their
    ``.log`` files beside them. Methods are synchronous (they run ``pg_ctl``); from
    asyncio code call them with ``asyncio.to_thread``.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        listen: tuple[str, ...] = (),
        allow: tuple[str, ...] = (),
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        #: addresses to listen on besides 127.0.0.1, networks (CIDR) trusted besides it
        self.listen = tuple(listen)
        self.allow = tuple(allow)
        bindir = _pg_bin_dir()
        if bindir is None:
            raise PgClusterError(skip_reason() or "PostgreSQL binaries not found")
        self.bin = bindir
        self.primary_port: int | None = None
        self.replica_port: int | None = None
        self.primary_running = False
        self.replica_running = False
        self.promoted = False
        self.startup_s: float | None = None

    # --- addresses -----------------------------------------------------------------

    @property
    def primary_dsn(self) -> str:
        """The original primary (single host)."""
        if self.primary_port is None:
            raise PgClusterError("not started")
        return _dsn(self.primary_port)

    @property
    def replica_dsn(self) -> str | None:
        """The replica (single host; read-only until promoted), None without a replica."""
        return None if self.replica_port is None else _dsn(self.replica_port)

    @property
    def write_dsn(self) -> str:
        """Both servers, ``target_session_attrs=read-write``: connects to whichever is primary."""
        if self.primary_port is None:
            raise PgClusterError("not started")
        if self.replica_port is None:
            return self.primary_dsn
        return (
            f"host=127.0.0.1,127.0.0.1 port={self.primary_port},{self.replica_port} "
            "user=postgres dbname=postgres connect_timeout=3 target_session_attrs=read-write"
        )

    @property
    def primary_dir(self) -> Path:
        return self.base_dir / "primary"

    @property
    def replica_dir(self) -> Path:
        return self.base_dir / "replica"

    # --- lifecycle -----------------------------------------------------------------

    def start(self, replica: bool = True) -> None:
        """initdb and start the primary; with ``replica``, clone and start a synchronous replica.

        Returns once the replica streams as the primary's synchronous standby, so every
        commit from then on is on both servers before it is acknowledged.
        """
        t0 = time.monotonic()
        self._prepare_base_dir()
        if self.primary_dir.exists():
            raise PgClusterError(f"{self.primary_dir} exists: PgCluster wants a fresh base_dir")
        try:
            self._run_pg(
                "initdb",
                "-D", str(self.primary_dir), "-A", "trust", "-U", "postgres",
                "--no-sync", "--no-instructions", "-E", "UTF8", "--locale=C",
            )  # fmt: skip
            self.primary_port = free_port()
            self._append_conf(
                self.primary_dir / "postgresql.conf",
                {
                    "listen_addresses": ",".join(["127.0.0.1", *self.listen]),
                    "port": self.primary_port,
                    "unix_socket_directories": "",
                    "fsync": "off",
                    "full_page_writes": "off",
                    "synchronous_commit": "on",
                    "synchronous_standby_names": "",
                    "max_connections": 300,
                    "max_wal_senders": 5,
                    "max_replication_slots": 5,
                    "wal_level": "replica",
                    "hot_standby": "on",
                    "hot_standby_feedback": "on",
                    "wal_receiver_status_interval": "1s",
                    "checkpoint_timeout": "30min",
                    "log_min_messages": "warning",
                },
            )
            if self.allow:
                with open(self.primary_dir / "pg_hba.conf", "a") as f:
                    for net in self.allow:
                        f.write(f"host all all {net} trust\nhost replication all {net} trust\n")
            self._pg_ctl_start(self.primary_dir)
            self.primary_running = True
            if replica:
                self._start_replica()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0

    def _start_replica(self) -> None:
        assert self.primary_port is not None
        self._run_pg(
            "pg_basebackup",
            "-D", str(self.replica_dir), "-h", "127.0.0.1", "-p", str(self.primary_port),
            "-U", "postgres", "-R", "-X", "stream", "-C", "-S", REPLICA_NAME,
            "-c", "fast", "--no-sync",
        )  # fmt: skip
        self.replica_port = free_port()
        while self.replica_port == self.primary_port:
            self.replica_port = free_port()
        self._append_conf(
            self.replica_dir / "postgresql.conf",
            {"port": self.replica_port, "synchronous_standby_names": ""},
        )
        # postgresql.auto.conf is read last, and its last setting wins: name the replica.
        self._append_conf(
            self.replica_dir / "postgresql.auto.conf",
            {
                "primary_conninfo": f"host=127.0.0.1 port={self.primary_port} user=postgres "
                f"application_name={REPLICA_NAME}",
                "primary_slot_name": REPLICA_NAME,
            },
        )
        self._pg_ctl_start(self.replica_dir)
        self.replica_running = True
        self._wait_sql(
            self.primary_dsn,
            "SELECT 1 FROM pg_stat_replication WHERE application_name = %s AND state = 'streaming'",
            (REPLICA_NAME,),
            "the replica to stream from the primary",
        )
        self._sql(
            self.primary_dsn, f"ALTER SYSTEM SET synchronous_standby_names = '{REPLICA_NAME}'"
        )
        self._sql(self.primary_dsn, "SELECT pg_reload_conf()")
        self._wait_sql(
            self.primary_dsn,
            "SELECT 1 FROM pg_stat_replication WHERE application_name = %s AND sync_state = 'sync'",
            (REPLICA_NAME,),
            "the replica to become the synchronous standby",
        )

    def stop_primary(self) -> None:
        """Stop the primary at once (``pg_ctl stop -m immediate``: no shutdown checkpoint)."""
        if self.primary_running:
            self._run_pg("pg_ctl", "-D", str(self.primary_dir), "-m", "immediate", "-w", "stop")
            self.primary_running = False

    def promote(self) -> None:
        """Promote the replica to primary (``pg_ctl promote -w``); returns once it accepts writes.

        Replay is resumed first if it was paused, so everything the replica received is
        applied. Call :meth:`stop_primary` first: two primaries would split the brain.
        """
        if not self.replica_running:
            raise PgClusterError("no running replica to promote")
        assert self.replica_dsn is not None
        try:
            self._sql(
                self.replica_dsn,
                "SELECT pg_wal_replay_resume() WHERE pg_is_in_recovery() "
                "AND pg_get_wal_replay_pause_state() <> 'not paused'",
            )
        except Exception:
            pass
        self._run_pg("pg_ctl", "-D", str(self.replica_dir), "-w", "-t", "60", "promote")
        self._wait_sql(
            self.replica_dsn,
            "SELECT 1 WHERE NOT pg_is_in_recovery()",
            (),
            "the promoted replica to accept writes",
        )
        self.promoted = True

    def stop_replica(self) -> None:
        """Stop the replica at once (``pg_ctl stop -m immediate``)."""
        if self.replica_running:
            self._run_pg("pg_ctl", "-D", str(self.replica_dir), "-m", "immediate", "-w", "stop")
            self.replica_running = False

    def start_replica_again(self) -> None:
        """Start a replica stopped by :meth:`stop_replica`; it reconnects to the primary."""
        if not self.replica_running:
            self._pg_ctl_start(self.replica_dir)
            self.replica_running = True

    def pause_replay(self) -> None:
        """Pause WAL replay on the replica: it keeps receiving but its data stops moving."""
        assert self.replica_dsn is not None, "no replica"
        self._sql(self.replica_dsn, "SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        """Resume WAL replay on the replica."""
        assert self.replica_dsn is not None, "no replica"
        self._sql(self.replica_dsn, "SELECT pg_wal_replay_resume()")

    def stop(self) -> None:
        """Stop whatever runs (immediate mode, both at once). Leaves the files in base_dir."""
        procs = []
        for running, data in (
            (self.replica_running, self.replica_dir),
            (self.primary_running, self.primary_dir),
        ):
            if running:
                cmd = [*self._as_pg(), str(self.bin / "pg_ctl"), "-D", str(data)]
                cmd += ["-m", "immediate", "-w", "stop"]
                procs.append(
                    subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.primary_running = self.replica_running = False

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- helpers -------------------------------------------------------------------

    def _as_pg(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _prepare_base_dir(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return
        pw = pwd.getpwnam("postgres")
        os.chown(self.base_dir, pw.pw_uid, pw.pw_gid)
        check = subprocess.run(
            [*self._as_pg(), "test", "-w", str(self.base_dir)], capture_output=True
        )
        if check.returncode != 0:
            raise PgClusterError(
                f"the postgres user cannot write {self.base_dir}: its parent directories "
                "must be searchable by that user (use a directory under /tmp)"
            )

    def _run_pg(self, binary: str, *args: str) -> None:
        cmd = [*self._as_pg(), str(self.bin / binary), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise PgClusterError(
                f"{binary} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}"
            )

    def _pg_ctl_start(self, data: Path) -> None:
        log = data.with_suffix(".log")
        try:
            self._run_pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "start")
        except PgClusterError as e:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PgClusterError(f"{e}\n--- {log} ---\n{tail}") from None

    @staticmethod
    def _append_conf(path: Path, settings: dict[str, Any]) -> None:
        lines = ["", "# added by examples.notify.pgcluster"]
        for k, v in settings.items():
            value = str(v).replace("'", "''")
            lines.append(f"{k} = '{value}'")
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")

    @staticmethod
    def _sql(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def _wait_sql(
        self, dsn: str, query: str, params: tuple[Any, ...], what: str, timeout: float = 60.0
    ) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                if self._sql(dsn, query, params):
                    return
            except psycopg.Error as e:
                last = e
            time.sleep(0.02)
        raise PgClusterError(f"timed out after {timeout:.0f} s waiting for {what} ({last})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.notify.pgcluster",
        description="Start a throwaway PostgreSQL primary + synchronous replica; print the "
        "DSNs as one JSON line; stop on SIGTERM/SIGINT.",
    )
    parser.add_argument("dir", help="base directory (created; must be new or empty)")
    parser.add_argument("--no-replica", action="store_true", help="start the primary only")
    args = parser.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"pgcluster: {reason}", file=sys.stderr)
        return 2
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = PgCluster(args.dir)
    try:
        cluster.start(replica=not args.no_replica)
        info = {
            "primary": cluster.primary_dsn,
            "replica": cluster.replica_dsn,
            "write": cluster.write_dsn,
            "primary_port": cluster.primary_port,
            "replica_port": cluster.replica_port,
            "primary_dir": str(cluster.primary_dir),
            "replica_dir": None if args.no_replica else str(cluster.replica_dir),
            "startup_s": round(cluster.startup_s or 0.0, 3),
        }
        print(json.dumps(info), flush=True)
        while not stop:
            time.sleep(0.1)
    except PgClusterError as e:
        print(f"pgcluster: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`trellis run` with its journal, metrics and control API, end to end in subprocesses:
the CLI against a live tree, and a kill -9 in the middle of a restart storm."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

PARTS = textwrap.dedent(
    """
    import os, trellis

    class Steady(trellis.Server):
        async def init(self):
            pass

        async def handle_call(self, request, caller):
            return "pong"

    class Storm(trellis.Server):
        '''Appends a line to a file each time it starts, then crashes at once.'''

        async def init(self, log):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, b"started\\n")
            os.close(fd)
            return trellis.Continue("crash")

        async def handle_continue(self, what):
            raise RuntimeError("storm")
    """
)


def _tree(tmp: Path, body: str) -> Path:
    (tmp / "parts.py").write_text(PARTS)
    path = tmp / "tree.toml"
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def _trellis(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trellis", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def _start(tree: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", str(tree), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=tree.parent,
    )


def _wait_for(
    predicate: object, what: str, proc: subprocess.Popen[str], timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"trellis run ended ({proc.returncode}) before {what}:\n{err}")
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"timed out waiting for {what}:\n{err}")


@pytest.fixture
def short_dir() -> object:
    """A short directory for Unix sockets (sun_path is limited to 107 bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="trl-", dir="/tmp") as d:
        yield Path(d)


def _rows(db: Path, kind: str | None = None) -> list[sqlite3.Row]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        if kind is None:
            return con.execute("SELECT * FROM journal ORDER BY seq").fetchall()
        return con.execute("SELECT * FROM journal WHERE kind = ? ORDER BY seq", (kind,)).fetchall()
    finally:
        con.close()


def _cli(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _trellis(*args, "--socket", str(sock))


def test_cli_drives_a_running_tree_and_the_journal_records_it(
    tmp_path: Path, short_dir: Path
) -> None:
    """status, restart, events and stop against `trellis run`; every action is journaled
    with who did it, and the journal verifies afterwards."""
    tree = _tree(
        tmp_path,
        """
        [supervisor]
        name = "shop"
        [[supervisor.children]]
        id = "db"
        server = "parts:Steady"
        [[supervisor.children]]
        id = "sleeper"
        command = ["sleep", "600"]
        """,
    )
    sock = short_dir / "shop.sock"
    db = tmp_path / "journal.db"
    proc = _start(tree, "--socket", str(sock), "--journal", f"sqlite:///{db}")
    try:
        _wait_for(lambda: sock.exists(), "the control socket", proc)
        assert sock.stat().st_mode & 0o777 == 0o600

        status = _cli(sock, "status", "--json")
        assert status.returncode == 0, status.stderr
        tree_json = json.loads(status.stdout)
        nodes = {n["path"]: n for n in _flat(tree_json["root"])}
        assert nodes["shop/db"]["state"] == "running"
        old_os_pid = nodes["shop/sleeper"]["os_pid"]
        assert isinstance(old_os_pid, int)

        restarted = _cli(sock, "restart", "shop/sleeper")
        assert restarted.returncode == 0, restarted.stderr
        status = json.loads(_cli(sock, "status", "--json").stdout)
        now = {n["path"]: n for n in _flat(status["root"])}["shop/sleeper"]
        assert now["state"] == "running"
        assert now["os_pid"] not in (None, old_os_pid)

        missing = _cli(sock, "restart", "shop/nope")
        assert missing.returncode == 1
        assert "shop/nope" in missing.stderr

        events = _cli(sock, "events", "--history", "100", "--json")
        assert events.returncode == 0, events.stderr
        kinds = [json.loads(line)["event"] for line in events.stdout.splitlines() if line]
        assert "operator.action" in kinds

        stopped = _cli(sock, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

    assert not sock.exists()
    gone = _cli(sock, "status")
    assert gone.returncode == 3
    assert "no Trellis tree" in gone.stderr

    verify = _trellis("journal", "verify", f"sqlite:///{db}")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    actions = [json.loads(r["data"]) | {"path": r["path"]} for r in _rows(db, "operator.action")]
    who = f"uid:{os.getuid()}"
    assert [(a["action"], a["path"], a["result"], a["who"]) for a in actions] == [
        ("restart", "shop/sleeper", "ok", who),
        ("restart", "shop/nope", actions[1]["result"], who),
        ("stop_tree", None, "ok", who),
    ]
    assert actions[1]["result"] != "ok"
    assert all(a["source"] == f"unix:{sock}" for a in actions)
    kinds = [r["kind"] for r in _rows(db)]
    assert (kinds[0], kinds[-1]) == ("run.started", "run.stopped")  # the run's boundaries
    kinds = kinds[1:-1]
    assert kinds[0] in ("child.started", "supervisor.started")
    assert kinds[-1] == "supervisor.stopped"
    sleeper = [
        (r["kind"], json.loads(r["data"]).get("os_pid"))
        for r in _rows(db)
        if r["path"] == "shop/sleeper" and r["kind"].startswith("child.")
    ]
    assert [k for k, _ in sleeper] == [
        "child.started",
        "child.terminated",
        "child.started",
        "child.terminated",
    ]
    assert sleeper[0][1] == old_os_pid


def _flat(node: dict[str, object]) -> list[dict[str, object]]:
    out = [node]
    for child in node.get("children", []):  # type: ignore[union-attr]
        out.extend(_flat(child))
    return out


MAX_BUFFER = 2000
MAX_BATCH = 500


def _journal_writers(parent: int) -> list[int]:
    """The journal writer processes started by ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("PPid:"))
        if ppid == parent and b"journal/_proc.py" in cmdline:
            found.append(int(entry.name))
    return found


def test_kill_9_mid_storm_loses_at_most_the_documented_bound(tmp_path: Path) -> None:
    """A restart storm under `trellis run`, SIGKILLed: the journal verifies, and the
    starts it lost (counted by the child itself in a file) are within the bound the
    Journal documents for a kill of the tree's process alone: the events not yet
    handed to the writer process (never more than max_buffer)."""
    starts = tmp_path / "starts.log"
    tree = _tree(
        tmp_path,
        f"""
        [journal]
        max_buffer = {MAX_BUFFER}
        max_batch = {MAX_BATCH}
        [supervisor]
        name = "storm"
        intensity = 1000000000
        period = 1.0
        [[supervisor.children]]
        id = "s"
        server = "parts:Storm"
        args = ["{starts}"]
        """,
    )
    db = tmp_path / "journal.db"
    proc = _start(tree, "--no-control", "--journal", f"sqlite:///{db}", "--log-level", "critical")

    def lines() -> int:
        try:
            return starts.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    _wait_for(lambda: lines() >= 3000 and db.exists(), "3000 restarts", proc, timeout=60)
    writers = _journal_writers(proc.pid)
    assert len(writers) == 1
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # the writer process commits what it was handed, sees the end of its input and exits
    deadline = time.monotonic() + 30
    while Path(f"/proc/{writers[0]}").exists():
        assert time.monotonic() < deadline, "the journal writer did not exit"
        time.sleep(0.02)

    verify = _trellis("journal", "verify", f"sqlite:///{db}")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    started = lines()
    rows = _rows(db)
    journaled = sum(
        1
        for r in rows
        if r["kind"] in ("child.started", "child.restarted") and r["path"] == "storm/s"
    )
    dropped = sum(
        json.loads(r["data"])["kinds"].get(k, 0)
        for r in rows
        if r["kind"] == "journal.dropped"
        for k in ("child.started", "child.restarted")
    )
    assert journaled > 0
    lost = started - journaled - dropped
    # +1: the child may have written its line and been killed before the event was emitted
    assert -1 <= lost <= MAX_BUFFER + 1, (started, journaled, dropped)


def test_a_journal_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    """The journal opens while the tree starts; if it cannot, the tree is stopped and
    `trellis run` says why and exits 2 (no traceback)."""
    tree = _tree(
        tmp_path,
        """
        [supervisor]
        name = "shop"
        [[supervisor.children]]
        id = "db"
        server = "parts:Steady"
        """,
    )
    (tmp_path / "a-directory.db").mkdir()
    url = f"sqlite:///{tmp_path / 'a-directory.db'}"
    proc = _start(tree, "--no-control", "--journal", url)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"cannot open journal {url}" in err
    assert "Traceback" not in err

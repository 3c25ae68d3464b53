"""`trellis run` under signals, end to end with real processes: SIGTERM in the middle of
a slow start, a cgroup-wide SIGTERM (every process at once, as systemd's default
KillMode=control-group sends it), and a second `trellis run` of a running tree."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path is limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="trl-", dir="/tmp") as d:
        yield Path(d)


def _write_tree(tmp: Path, body: str) -> Path:
    path = tmp / "tree.toml"
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def _start(tree: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", str(tree), "--log-level", "warning", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=tree.parent,
    )


def _trellis(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trellis", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        check=False,
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
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"timed out waiting for {what}:\n{err}")


def _rows(db: Path) -> list[dict[str, object]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        rows = con.execute("SELECT * FROM journal ORDER BY seq").fetchall()
    finally:
        con.close()
    return [{"kind": r["kind"], "path": r["path"], **json.loads(r["data"] or "{}")} for r in rows]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_dead(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    """The exit code and stderr; kills the run (and fails) if it does not end in time."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"trellis run did not exit within {timeout}s:\n{err}") from None
    return proc.returncode, err


# ---------------------------------------------------------------------------
# SIGTERM during a slow start
# ---------------------------------------------------------------------------


def _slow_start_tree(tmp: Path, slow: int) -> Path:
    """Two children up at once, then ``slow`` children that each need 30 s to be ready;
    every child writes its pid to started.ID when its process starts."""
    body = """
        [supervisor]
        name = "slowstart"
    """
    for cid in ("a", "b"):
        body += f"""
        [[supervisor.children]]
        id = "{cid}"
        command = ["sh", "-c", "echo $$ > started.{cid}; exec sleep 600"]
        shutdown = 5.0
        """
    for i in range(slow):
        body += f"""
        [[supervisor.children]]
        id = "s{i}"
        command = ["sh", "-c", "echo $$ > started.s{i}; sleep 30; echo up; exec sleep 600"]
        ready = {{ log = "^up$", timeout = 60 }}
        """
    return _write_tree(tmp, body)


@pytest.mark.parametrize("slow", [4, 12])
def test_sigterm_during_a_slow_start_cancels_the_pending_starts(
    tmp_path: Path, short_dir: Path, slow: int
) -> None:
    """SIGTERM while the first slow child is starting: that start is cancelled at once,
    no later child is ever started, the started ones stop in reverse order, the run
    exits 0 (a signal stops the tree) promptly, and the journal holds the stop."""
    tree = _slow_start_tree(tmp_path, slow)
    db = tmp_path / "journal.db"
    proc = _start(tree, "--socket", str(short_dir / "t.sock"), "--journal", f"sqlite:///{db}")
    first_slow = tmp_path / "started.s0"
    _wait_for(lambda: first_slow.exists() and first_slow.read_text().strip(), "s0's start", proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # before: every remaining start was awaited (30 s each) until a hard exit at 30 s
    code, err = _finish(proc, timeout=20)
    took = time.monotonic() - t0
    assert code == 0, err
    assert took < 15, f"the stop took {took:.1f}s"
    assert "Traceback" not in err, err

    started = sorted(p.name for p in tmp_path.glob("started.*"))
    assert started == ["started.a", "started.b", "started.s0"]
    pids = [int((tmp_path / name).read_text()) for name in started]
    assert _wait_dead(pids) == [], "a child of the stopped tree is still running"

    rows = _rows(db)
    kinds = [r["kind"] for r in rows]
    stop_at = next(
        i
        for i, r in enumerate(rows)
        if r["kind"] == "operator.action" and r["action"] == "stop_tree"
    )
    assert rows[stop_at]["who"] == "signal:SIGTERM"
    after = rows[stop_at + 1 :]
    assert not [r for r in after if r["kind"] in ("child.started", "child.restarted")]
    assert "supervisor.start_cancelled" in kinds
    terminated = [r["path"] for r in rows if r["kind"] == "child.terminated"]
    assert terminated == ["slowstart/b", "slowstart/a"]  # reverse start order
    slow_started = [r for r in rows if r["kind"] == "child.started" and "/s" in str(r["path"])]
    assert slow_started == []
    verify = _trellis("journal", "verify", f"sqlite:///{db}")
    assert verify.returncode == 0, verify.stdout + verify.stderr


# ---------------------------------------------------------------------------
# A cgroup-wide SIGTERM
# ---------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_cgroup_wide_sigterm_restarts_nothing_and_does_not_give_up(
    tmp_path: Path, short_dir: Path
) -> None:
    """systemd's KillMode=control-group sends SIGTERM to every process of the service at
    once: the children die by the signal while the tree is stopping. Those exits are
    recorded, nothing restarts, no supervisor gives up (4 simultaneous exits exceed the
    default intensity of 3 in 5 s), and the run exits 0."""
    body = """
        [supervisor]
        name = "cgroup"
    """
    for i in range(4):
        body += f"""
        [[supervisor.children]]
        id = "c{i}"
        command = ["sh", "-c", "echo $$ > started.c{i}.$$; exec sleep 600"]
        """
    body += """
        [[supervisor.children]]
        id = "inner"
        strategy = "one_for_all"
        [[supervisor.children.children]]
        id = "d0"
        command = ["sh", "-c", "echo $$ > started.d0.$$; exec sleep 600"]
        [[supervisor.children.children]]
        id = "d1"
        command = ["sh", "-c", "echo $$ > started.d1.$$; exec sleep 600"]
        """
    tree = _write_tree(tmp_path, body)
    db = tmp_path / "journal.db"
    sock = short_dir / "c.sock"
    proc = _start(tree, "--socket", str(sock), "--journal", f"sqlite:///{db}")
    _wait_for(
        lambda: len(list(tmp_path.glob("started.*"))) == 6 and sock.exists(), "6 children", proc
    )
    time.sleep(0.3)  # the journal writer and the guardian are up too
    everyone = [proc.pid, *_descendants(proc.pid)]
    assert len(everyone) >= 7
    for pid in everyone:  # trellis first (the lowest pid), then every other process
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    code, err = _finish(proc, timeout=20)
    assert code == 0, err
    assert len(list(tmp_path.glob("started.*"))) == 6, "a child was restarted"
    rows = _rows(db)
    kinds = [r["kind"] for r in rows]
    assert "supervisor.gave_up" not in kinds
    stop_at = next(
        i
        for i, r in enumerate(rows)
        if r["kind"] == "operator.action" and r["action"] == "stop_tree"
    )
    after = rows[stop_at + 1 :]
    assert [
        r for r in after if r["kind"] in ("child.restarted", "child.started", "child.backoff")
    ] == []
    for r in after:
        if r["kind"] == "child.exited":
            assert r["restart"] is False, r
    assert kinds[-1] == "run.stopped"  # a clean end of the run
    assert kinds[-2] == "supervisor.stopped"
    verify = _trellis("journal", "verify", f"sqlite:///{db}")
    assert verify.returncode == 0, verify.stdout + verify.stderr


# ---------------------------------------------------------------------------
# A second `trellis run` of a running tree
# ---------------------------------------------------------------------------


def test_a_second_run_of_a_running_tree_fails_before_starting_anything(
    tmp_path: Path, short_dir: Path
) -> None:
    """A second `trellis run` with the same control socket or the same journal fails at
    once with exit 2 and a message naming the running tree and its pid: it starts no
    child and writes nothing to the live tree's journal, whose children are untouched."""
    tree = _write_tree(
        tmp_path,
        """
        [supervisor]
        name = "locked"
        [[supervisor.children]]
        id = "app"
        command = ["sh", "-c", "echo $$ >> starts; exec sleep 600"]
        """,
    )
    starts = tmp_path / "starts"
    db = tmp_path / "journal.db"
    sock = short_dir / "l.sock"
    first = _start(tree, "--socket", str(sock), "--journal", f"sqlite:///{db}")
    try:
        _wait_for(lambda: sock.exists() and starts.exists(), "the first tree", first)
        _wait_for(
            lambda: db.exists() and any(r["kind"] == "child.started" for r in _rows(db)),
            "the first tree's journal",
            first,
        )
        time.sleep(0.3)
        before = _rows(db)
        app_pid = int(starts.read_text().split()[0])

        other_db = tmp_path / "other.db"
        for args in (
            ("--socket", str(sock), "--journal", f"sqlite:///{db}"),  # the same tree
            ("--socket", str(short_dir / "x.sock"), "--journal", f"sqlite:///{db}"),
            ("--socket", str(sock), "--journal", f"sqlite:///{other_db}"),
        ):
            second = _start(tree, *args)
            code, err = _finish(second, timeout=30)
            assert code == 2, err
            assert "already running" in err
            assert "'locked'" in err
            assert f"pid {first.pid}" in err
            assert "Traceback" not in err

        time.sleep(0.3)
        assert starts.read_text().split() == [str(app_pid)], "the second run started a child"
        assert _alive(app_pid)
        assert _rows(db) == before, "the second run wrote to the live tree's journal"
        assert not other_db.exists() or _rows(other_db) == []
        status = _trellis("status", "--socket", str(sock))
        assert status.returncode == 0, status.stderr
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGTERM)
        code, err = _finish(first, timeout=30)
    assert code == 0, err
    verify = _trellis("journal", "verify", f"sqlite:///{db}")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_lock_of_a_killed_tree_is_free_at_once(tmp_path: Path, short_dir: Path) -> None:
    """The lock is an flock: when the running tree dies, even by SIGKILL, the kernel
    releases it, so the next run starts (its stale socket notwithstanding)."""
    tree = _write_tree(
        tmp_path,
        """
        [supervisor]
        name = "killed"
        [[supervisor.children]]
        id = "app"
        command = ["sh", "-c", "echo $$ >> starts; exec sleep 600"]
        """,
    )
    starts = tmp_path / "starts"
    sock = short_dir / "k.sock"
    args = ("--socket", str(sock), "--journal", f"sqlite:///{tmp_path / 'journal.db'}")
    first = _start(tree, *args)
    _wait_for(lambda: sock.exists() and starts.exists(), "the first tree", first)
    lock = Path(f"{sock}.lock")
    assert lock.read_text().split() == [str(first.pid), "killed"]
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    second = _start(tree, *args)
    try:
        _wait_for(lambda: len(starts.read_text().split()) == 2, "the second tree", second)
        status = _trellis("status", "--socket", str(sock))
        assert status.returncode == 0, status.stderr
        assert lock.read_text().split() == [str(second.pid), "killed"]
    finally:
        if second.poll() is None:
            second.send_signal(signal.SIGTERM)
        code, err = _finish(second, timeout=30)
    assert code == 0, err

"""Run boundaries, end to end with real `trellis run` processes: each run opens with
``run.started`` (its run id) and ends with ``run.stopped``; a run killed with -9 is
found at the next start and journaled as ``run.unclean_end``; every record carries its
run's id, so pids (which restart at 1 each run) are unique across runs as (run_id, pid);
the signed journal still verifies, anchor included; its files are private."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from trellis.journal import verify

ROOT = Path(__file__).resolve().parents[2]
KEY = "0123456789abcdef0123456789abcdef"


def _env(state: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "TRELLIS_STATE_DIR": str(state),
        "TRELLIS_JOURNAL_KEY": KEY,
    }


def _tree(tmp: Path) -> Path:
    path = tmp / "tree.toml"
    path.write_text(
        textwrap.dedent(
            """
            [supervisor]
            name = "runs"
            [[supervisor.children]]
            id = "sleeper"
            command = ["sleep", "600"]
            [journal]
            key_env = "TRELLIS_JOURNAL_KEY"
            """
        ).lstrip()
    )
    return path


def _records(db: Path) -> list[dict[str, Any]]:
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            q = "SELECT seq, kind, data, utc FROM journal ORDER BY seq"
            rows = con.execute(q).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []  # not created yet
    return [{"seq": s, "kind": k, "data": json.loads(d), "utc": u} for s, k, d, u in rows]


def _start(tree: Path, state: Path) -> subprocess.Popen[str]:
    log = open(tree.parent / "trellis.log", "a")  # noqa: SIM115 - closed by _err() / after
    argv = [sys.executable, "-m", "trellis", "run", str(tree), "--no-control"]
    proc = subprocess.Popen(
        [*argv, "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
        env=_env(state),
        cwd=tree.parent,
    )
    log.close()  # the child has its own copy
    return proc


def _err(tree: Path) -> str:
    return (tree.parent / "trellis.log").read_text()


def _wait_running(proc: subprocess.Popen[str], db: Path, starts: int) -> None:
    tree = db.parent.parent / "tree.toml"
    """Until the journal holds ``starts`` child.started records (this run's child is up)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trellis run ended ({proc.returncode}): {_err(tree)}")
        if sum(r["kind"] == "child.started" for r in _records(db)) >= starts:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the child to start")


def _wait_writer_done(db: Path) -> None:
    """After a kill -9 of trellis run, its journal writer process commits what it holds
    and exits: wait until nobody has the database open for writing."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        busy = (
            subprocess.run(["fuser", str(db)], capture_output=True, check=False).returncode == 0
            if _has_fuser()
            else False
        )
        if not busy:
            return
        time.sleep(0.05)


def _has_fuser() -> bool:
    return any(os.access(os.path.join(d, "fuser"), os.X_OK) for d in os.get_exec_path())


def test_runs_are_bounded_and_a_kill_9_is_journaled_at_the_next_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    tree = _tree(tmp_path)
    db = state / "runs.journal.db"

    killed = 2
    for run in range(1, killed + 1):
        proc = _start(tree, state)
        _wait_running(proc, db, starts=run)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        _wait_writer_done(db)
    logged = len(_err(tree))
    proc = _start(tree, state)
    _wait_running(proc, db, starts=killed + 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, _err(tree)

    # the last run says so in its log too (a run killed a moment after its start may
    # not have had the time to log it)
    assert "ended without recording its end" in _err(tree)[logged:]

    records = _records(db)
    boundaries = [r for r in records if r["kind"].startswith("run.")]
    runs = [r["data"]["run_id"] for r in boundaries if r["kind"] == "run.started"]
    assert len(runs) == len(set(runs)) == killed + 1
    expected: list[tuple[str, Any]] = [("run.started", runs[0])]
    for i in range(1, killed + 1):
        expected += [("run.unclean_end", runs[i - 1]), ("run.started", runs[i])]
    expected.append(("run.stopped", runs[-1]))
    assert [(r["kind"], r["data"]["run_id"]) for r in boundaries] == expected

    # each run.unclean_end names the previous run's last record, and who found it
    for r in boundaries:
        if r["kind"] == "run.unclean_end":
            before = [x for x in records if x["seq"] < r["seq"]]
            assert r["data"]["last_seq"] == before[-1]["seq"]
            assert before[-1]["data"]["run_id"] == r["data"]["run_id"]
            i = runs.index(r["data"]["run_id"])
            assert r["data"]["detected_by"] == runs[i + 1]
    starts = [r for r in boundaries if r["kind"] == "run.started"]
    assert [s["data"]["previous_run_id"] for s in starts] == [None, *runs[:-1]]

    # every record belongs to the run it was written in, and none is older than its
    # run.started (dated when the journal started, before the tree)
    current = None
    since = ""
    for r in records:
        if r["kind"] == "run.started":
            current = r["data"]["run_id"]
            since = r["utc"]
        assert r["utc"] >= since, (r, since)
        if r["kind"] == "run.unclean_end":
            continue  # about the previous run, written by the next
        if r["kind"].startswith("journal."):
            continue
        assert r["data"].get("run_id") == current, r

    # pids restart each run; with the run id they are unique
    started = [r["data"] for r in records if r["kind"] == "child.started"]
    assert len(started) == killed + 1
    assert len({(d["run_id"], d["pid"]) for d in started}) == killed + 1

    # the signed journal verifies after the kills, against its anchor too
    v = verify(f"sqlite:///{db}", key=KEY)
    assert v.ok, v.problem
    assert v.anchor == f"{db}.anchor"
    assert v.anchor_seq == v.last_seq == records[-1]["seq"]

    # and its files are private
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for suffix in ("", ".anchor"):
        assert stat.S_IMODE(Path(f"{db}{suffix}").stat().st_mode) == 0o600
    for suffix in ("-wal", "-shm"):  # present while open; kept or removed at close
        p = Path(f"{db}{suffix}")
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_a_clean_run_after_a_clean_run_has_no_unclean_end(tmp_path: Path) -> None:
    state = tmp_path / "state"
    tree = _tree(tmp_path)
    db = state / "runs.journal.db"
    for run in (1, 2):
        proc = _start(tree, state)
        _wait_running(proc, db, starts=run)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, _err(tree)
    kinds = [r["kind"] for r in _records(db) if r["kind"].startswith("run.")]
    assert kinds == ["run.started", "run.stopped", "run.started", "run.stopped"]


def test_run_ids_sort_by_start_time() -> None:
    from trellis._operate import new_run_id

    a = new_run_id()
    time.sleep(1.1)
    b = new_run_id()
    assert a < b
    assert a != new_run_id()
    assert len(a) == len("20261207T184512Z-3f2a9c01")

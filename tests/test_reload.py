"""Live reload (`trellis reload`, POST /v1/reload, SIGHUP) against a real `trellis run`:
only the difference is applied; untouched children keep their OS processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

BASE = """
[supervisor]
name = "rt"
intensity = 3

[[supervisor.children]]
id = "a"
command = ["sleep", "600"]

[[supervisor.children]]
id = "b"
command = ["sleep", "600"]

[[supervisor.children]]
id = "grp"
strategy = "one_for_one"

[[supervisor.children.children]]
id = "x"
command = ["sleep", "600"]

[[supervisor.children.children]]
id = "y"
command = ["sleep", "600"]

[[supervisor.children]]
id = "gone"
command = ["sleep", "600"]
"""

# a: only its shutdown changes (no restart); new: added between a and b; b: its command
# changes (restarted); grp: intensity changes (in place), z added, y untouched, x
# removed; gone: removed.
CHANGED = """
[supervisor]
name = "rt"
intensity = 4

[[supervisor.children]]
id = "a"
command = ["sleep", "600"]
shutdown = 3.0

[[supervisor.children]]
id = "new"
command = ["sleep", "700"]

[[supervisor.children]]
id = "b"
command = ["sleep", "601"]

[[supervisor.children]]
id = "grp"
strategy = "one_for_one"
intensity = 9

[[supervisor.children.children]]
id = "y"
command = ["sleep", "600"]

[[supervisor.children.children]]
id = "z"
command = ["sleep", "800"]
"""


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory (AF_UNIX paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="trl-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Tree:
    """A real `trellis run` of a tree file, with its control socket and journal."""

    def __init__(self, d: Path, text: str) -> None:
        self.dir = d
        self.file = d / "tree.toml"
        self.file.write_text(text)
        self.sock = d / "c.sock"
        self.db = d / "j.db"
        self.log = open(d / "run.log", "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trellis",
                "run",
                "tree.toml",
                "--socket",
                str(self.sock),
                "--journal",
                f"sqlite:///{self.db}",
                "--no-metrics",
            ],
            cwd=d,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.sock)), base_url="http://t", timeout=30
        )
        try:
            self.wait_until(lambda: self._ready(), "the tree to start")
        except BaseException:
            self.stop()  # never leave a tree (and its children) behind
            raise

    def _ready(self) -> bool:
        if not self.sock.exists():
            return False
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_until(self, cond: Any, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"trellis run ended ({self.proc.returncode}):\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        self.log.flush()
        return (self.dir / "run.log").read_text()

    def tree(self) -> dict[str, Any]:
        root: dict[str, Any] = self.http.get("/v1/tree").json()["root"]
        return root

    def os_pids(self) -> dict[str, int | None]:
        """path -> OS pid of every OS-process child."""
        out: dict[str, int | None] = {}

        def walk(node: dict[str, Any]) -> None:
            for c in node["children"]:
                if c["type"] == "supervisor":
                    walk(c)
                else:
                    out[c["path"]] = c["os_pid"]

        walk(self.tree())
        return out

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "trellis", *args, "--socket", str(self.sock)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.dir,
        )

    def journal(self, kind: str) -> list[dict[str, Any]]:
        with closing(sqlite3.connect(self.db)) as db:
            rows = db.execute("SELECT data FROM journal WHERE kind = ? ORDER BY seq", (kind,))
            return [json.loads(r[0]) for r in rows]

    def stop(self) -> int:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self.log.close()
        return code


@pytest.fixture
def tree(short_tmp: Path) -> Iterator[Tree]:
    t = Tree(short_tmp, BASE)
    try:
        yield t
    finally:
        t.stop()


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_reload_applies_only_the_difference(tree: Tree) -> None:
    """Added, removed and changed children are applied; untouched ones (and the one
    whose shutdown alone changed) keep their OS processes; the running start order
    follows the file; the reload is journaled with its diff."""
    before = tree.os_pids()
    assert set(before) == {"rt/a", "rt/b", "rt/grp/x", "rt/grp/y", "rt/gone"}
    tree.file.write_text(CHANGED)
    r = tree.cli("reload", "--reason", "new config")
    assert r.returncode == 0, r.stdout + r.stderr
    after = tree.os_pids()
    assert set(after) == {"rt/a", "rt/new", "rt/b", "rt/grp/y", "rt/grp/z"}
    assert after["rt/a"] == before["rt/a"]  # shutdown changed: spec replaced in place
    assert after["rt/grp/y"] == before["rt/grp/y"]  # untouched
    assert after["rt/b"] != before["rt/b"]
    assert _alive(after["rt/b"])
    assert _alive(after["rt/new"])
    assert _alive(after["rt/grp/z"])
    for gone in ("rt/gone", "rt/grp/x", "rt/b"):
        pid = before[gone]
        tree.wait_until(lambda pid=pid: not _alive(pid), f"{gone} to be stopped")
    assert _alive(before["rt/a"])
    assert _alive(before["rt/grp/y"])
    # the tree as observers show it (the tracker) follows the file's order too
    assert [c["id"] for c in tree.tree()["children"]] == ["a", "new", "b", "grp"]
    assert "added rt/new" in r.stdout
    assert "removed rt/gone" in r.stdout
    assert "restarted rt/b (command)" in r.stdout
    assert "updated rt/a (shutdown)" in r.stdout
    assert "updated rt/grp (intensity)" in r.stdout
    assert "updated rt" in r.stdout  # the root's intensity, in place

    # a second reload of the same file changes nothing
    r2 = tree.cli("reload", "--json")
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["changes"] == []
    assert tree.os_pids() == after

    assert tree.stop() == 0
    [first, second] = tree.journal("tree.reloaded")
    changes = {(c["change"], c["path"]) for c in first["changes"]}
    assert changes == {
        ("removed", "rt/gone"),
        ("removed", "rt/grp/x"),
        ("added", "rt/new"),
        ("added", "rt/grp/z"),
        ("restarted", "rt/b"),
        ("updated", "rt/a"),
        ("updated", "rt/grp"),
        ("updated", "rt"),
    }
    assert first["result"] == "ok"
    assert second["changes"] == []
    actions = [a for a in tree.journal("operator.action") if a["action"] == "reload"]
    assert actions[0]["detail"] == "new config"
    assert actions[0]["result"] == "ok"
    # the added child took its place in the file's order: the stop order shows it
    # (last in the file, first stopped)
    stopped = [
        e["child_id"]
        for e in tree.journal("child.terminated")
        if e.get("supervisor") == "rt" and e["child_id"] in ("a", "new", "b", "grp")
    ]
    assert stopped[-4:] == ["grp", "b", "new", "a"]


def test_bad_file_changes_nothing(tree: Tree) -> None:
    """An invalid file: exit 2, every error printed as FILE:LINE: KEY: MESSAGE, the tree
    untouched, and the failed reload journaled."""
    before = tree.os_pids()
    tree.file.write_text(
        BASE.replace('id = "gone"', 'id = "gone"\nrestart = "sometimes"').replace(
            'name = "rt"', 'name = "rt"\nintensty = 2'
        )
    )
    r = tree.cli("reload")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "nothing changed" in r.stderr
    assert "tree.toml:4: supervisor.intensty: unknown key 'intensty'" in r.stderr
    assert "tree.toml:29: supervisor.children[3].restart: invalid restart" in r.stderr
    assert tree.os_pids() == before
    # the root's strategy cannot change while it runs: refused as a whole
    tree.file.write_text(CHANGED.replace('name = "rt"', 'name = "rt"\nstrategy = "one_for_all"'))
    r = tree.cli("reload")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "tree.toml:4: supervisor.strategy: the root's strategy cannot change" in r.stderr
    assert tree.os_pids() == before
    assert tree.stop() == 0
    results = [e["result"] for e in tree.journal("tree.reloaded")]
    assert results == ["invalid", "refused"]


def test_sighup_reloads_and_never_kills(tree: Tree) -> None:
    """SIGHUP reloads the file (a removed child stops, an added one starts) and the
    process lives on; a SIGHUP with a bad file changes nothing; SIGTERM still exits 0."""
    before = tree.os_pids()
    tree.file.write_text(BASE.replace('id = "gone"', 'id = "renamed"'))
    tree.proc.send_signal(signal.SIGHUP)
    tree.wait_until(lambda: "rt/renamed" in tree.os_pids(), "the SIGHUP reload")
    pids = tree.os_pids()
    assert "rt/gone" not in pids
    assert {k: v for k, v in pids.items() if k != "rt/renamed"} == {
        k: v for k, v in before.items() if k != "rt/gone"
    }
    tree.file.write_text("[supervisor\n")
    tree.proc.send_signal(signal.SIGHUP)
    tree.wait_until(lambda: "invalid TOML" in tree.output(), "the bad reload to be logged")
    assert tree.proc.poll() is None
    assert tree.os_pids() == pids
    assert tree.stop() == 0
    reloads = tree.journal("tree.reloaded")
    assert [e["result"] for e in reloads] == ["ok", "invalid"]
    hups = [a for a in tree.journal("operator.action") if a["action"] == "reload"]
    assert [a["who"] for a in hups] == ["signal:SIGHUP", "signal:SIGHUP"]


def test_a_restarted_supervisor_keeps_what_the_reload_gave_it(tree: Tree) -> None:
    """After a reload changed grp's children, restarting grp starts the new set (its
    parent holds the new spec), not the file it was first started from."""
    tree.file.write_text(CHANGED)
    assert tree.cli("reload").returncode == 0
    r = tree.cli("restart", "rt/grp")
    assert r.returncode == 0, r.stderr
    pids = tree.os_pids()
    assert sorted(p for p in pids if p.startswith("rt/grp/")) == ["rt/grp/y", "rt/grp/z"]


def test_a_failed_change_is_reported_and_retried(tree: Tree) -> None:
    """An added child that cannot start: the reload applies the rest, exits 1 naming
    it, and the next reload (file fixed) adds it."""
    broken = BASE.replace('id = "gone"', 'id = "late"\nready = { log = "^never$", timeout = 0.5 }')
    tree.file.write_text(broken)
    r = tree.cli("reload")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "rt/late: cannot start" in r.stderr
    pids = tree.os_pids()
    assert "rt/gone" not in pids  # the removal was applied
    assert "rt/late" not in pids
    tree.file.write_text(BASE.replace('id = "gone"', 'id = "late"'))
    r = tree.cli("reload")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "added rt/late" in r.stdout
    assert "rt/late" in tree.os_pids()
    assert tree.stop() == 0
    assert [e["result"] for e in tree.journal("tree.reloaded")] == ["failed", "ok"]


def test_a_stop_during_a_reload_is_not_held_up(tree: Tree) -> None:
    """SIGTERM while a reload waits for an added child's readiness (60 s): the start
    is cancelled, the tree stops with exit 0 well before that, and the reload is
    journaled as cancelled."""
    tree.file.write_text(
        BASE.replace('id = "gone"', 'id = "slow"\nready = { log = "^never$", timeout = 60 }')
    )
    reload = subprocess.Popen(
        [sys.executable, "-m", "trellis", "reload", "--socket", str(tree.sock)],
        cwd=tree.dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        tree.wait_until(lambda: "rt/slow spawned" in tree.output(), "the slow child to spawn")
        started = time.monotonic()
        assert tree.stop() == 0
        assert time.monotonic() - started < 30  # the readiness wait is 60 s
    finally:
        reload.wait(30)
    [reloaded] = tree.journal("tree.reloaded")
    assert reloaded["result"] == "failed"
    assert any("cancelled" in e or "stopping" in e for e in reloaded["errors"]), reloaded


def test_reload_by_tree_name(short_tmp: Path) -> None:
    """`trellis reload --tree NAME` finds the tree by its name (the default socket)."""
    runtime = short_tmp / "rt"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    env.pop("TRELLIS_SOCKET", None)
    env.pop("TRELLIS_TREE", None)
    (short_tmp / "tree.toml").write_text(BASE)
    cmd = [sys.executable, "-m", "trellis"]
    proc = subprocess.Popen(
        [*cmd, "run", "tree.toml", "--no-journal", "--no-metrics"],
        cwd=short_tmp,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        sock = runtime / "trellis" / "rt.sock"
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.05)
        (short_tmp / "tree.toml").write_text(BASE.replace('id = "gone"', 'id = "other"'))
        r = subprocess.run(
            [*cmd, "reload", "--tree", "rt"],
            cwd=short_tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "removed rt/gone" in r.stdout
        assert "added rt/other" in r.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

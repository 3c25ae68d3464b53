"""A child's output with a real `trellis run`: `trellis logs` (ring, -n, --since, -f,
--dir), log files (a timestamp per line, written line by line so a kill -9 loses
nothing read, 0640 in a 0700 directory), and `trellis signal` (journaled)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")

WEB = "trap 'echo got USR1' USR1; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done"
# an OSC escape (set the terminal title) in its last words: shown escaped, never raw
CRASHER = "echo starting; echo 'last words \x1b]0;pwned\x07' >&2; sleep 0.3; exit 3"

TREE = """
[supervisor]
name = "shop"
intensity = 1000
period = 1.0

[[supervisor.children]]
id = "web"
command = {web}
logs = {{ dir = "{logs}" }}

[[supervisor.children]]
id = "crasher"
command = {crasher}
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="trl-", dir="/tmp") as d:
        yield Path(d)


def _trellis(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trellis", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path, short_dir: Path) -> Iterator[tuple[subprocess.Popen[str], Path, Path]]:
    logs = tmp_path / "logs"
    path = tmp_path / "tree.toml"
    web, crasher = (json.dumps(["sh", "-c", c]) for c in (WEB, CRASHER))
    path.write_text(textwrap.dedent(TREE).format(logs=logs, web=web, crasher=crasher))
    sock = short_dir / "t.sock"
    db = tmp_path / "j.db"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trellis",
            "run",
            str(path),
            "--log-level",
            "warning",
            "--socket",
            str(sock),
            "--journal",
            f"sqlite:///{db}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 30
        while not (sock.exists() and (logs / "shop.web.out.log").exists()):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the tree did not start"
            time.sleep(0.05)
        yield proc, sock, logs
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_logs_from_the_ring_n_since_and_a_crashed_childs_last_words(
    tree: tuple[subprocess.Popen[str], Path, Path],
) -> None:
    _proc, sock, _ = tree
    time.sleep(1.0)
    r = _trellis("logs", "shop/web", "-n", "5", "--socket", str(sock))
    assert r.returncode == 0, r.stderr
    got = r.stdout.splitlines()
    assert len(got) == 5, got
    assert all(re.match(STAMP.pattern + r"stdout\s*\| tick \d+$", ln) for ln in got), got
    # JSON, --since: lines of the last 0.3 s only
    r = _trellis("logs", "web", "--since", "0.3s", "--json", "-n", "1000", "--socket", str(sock))
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert lines
    assert all(e["time"] >= time.time() - 5 for e in lines)
    assert len(lines) < 20
    # the crasher's stderr is kept in the ring after it exited; escapes are escaped
    r = _trellis("logs", "shop/crasher", "--stream", "stderr", "--socket", str(sock))
    assert "last words" in r.stdout, r.stdout + r.stderr
    assert "\x1b" not in r.stdout
    assert "\\x1b]0;pwned" in r.stdout
    # an unknown child: exit 1 with a message
    r = _trellis("logs", "shop/nope", "--socket", str(sock))
    assert r.returncode == 1
    assert "nope" in r.stderr


def test_logs_follow_streams_new_lines(tree: tuple[subprocess.Popen[str], Path, Path]) -> None:
    _, sock, _ = tree
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trellis",
            "logs",
            "shop/web",
            "-f",
            "-n",
            "1",
            "--socket",
            str(sock),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert follower.stdout is not None
        seen: list[int] = []
        deadline = time.monotonic() + 20
        while len(seen) < 10 and time.monotonic() < deadline:
            ready, _, _ = select.select([follower.stdout], [], [], 1.0)
            if ready:
                line = follower.stdout.readline()
                m = re.search(r"tick (\d+)$", line)
                if m:
                    seen.append(int(m.group(1)))
        assert len(seen) >= 10, seen
        assert seen == sorted(seen)
        assert seen[-1] - seen[0] >= 9  # new lines arrived, not only the backlog
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            follower.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.communicate()


def test_log_files_are_stamped_private_and_complete_after_kill_9(
    tree: tuple[subprocess.Popen[str], Path, Path],
) -> None:
    proc, sock, logs = tree
    assert stat.S_IMODE(os.stat(logs).st_mode) == 0o700
    out = logs / "shop.web.out.log"
    assert stat.S_IMODE(os.stat(out).st_mode) & 0o037 == 0  # at most 0640
    time.sleep(0.8)
    # what the ring has seen is already in the file: nothing waits in a buffer
    r = _trellis("logs", "shop/web", "-n", "1", "--json", "--socket", str(sock))
    last = json.loads(r.stdout.splitlines()[-1])["line"]
    proc.kill()
    proc.wait(10)
    text = out.read_text()
    assert last in text
    lines = text.splitlines()
    assert all(STAMP.match(ln) for ln in lines), lines[:3]
    assert [ln[25:] for ln in lines[:3]] == ["tick 0", "tick 1", "tick 2"]
    # and `trellis logs --dir` reads them without a tree
    r = _trellis("logs", "shop/web", "--dir", str(logs), "-n", "3")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3
    assert "tick" in r.stdout


def test_logs_follow_from_the_files(tree: tuple[subprocess.Popen[str], Path, Path]) -> None:
    """``--dir DIR -f`` follows the log file without asking the tree."""
    _, _, logs = tree
    follower = subprocess.Popen(
        [sys.executable, "-m", "trellis", "logs", "shop/web", "--dir", str(logs), "-f", "-n", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert follower.stdout is not None
        seen: list[int] = []
        deadline = time.monotonic() + 20
        while len(seen) < 6 and time.monotonic() < deadline:
            ready, _, _ = select.select([follower.stdout], [], [], 1.0)
            if ready:
                m = re.search(r"stdout\s*\| tick (\d+)$", follower.stdout.readline())
                if m:
                    seen.append(int(m.group(1)))
        assert len(seen) >= 6, seen
        assert seen == sorted(seen)
        assert seen[-1] - seen[0] >= 5
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            follower.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.communicate()


def test_signal_reaches_the_child_and_is_journaled(
    tree: tuple[subprocess.Popen[str], Path, Path], tmp_path: Path
) -> None:
    proc, sock, _ = tree
    r = _trellis("signal", "shop/web", "USR1", "--reason", "rotate", "--socket", str(sock))
    assert r.returncode == 0, r.stderr
    assert "sent SIGUSR1 to shop/web" in r.stdout
    deadline = time.monotonic() + 10
    while True:
        r = _trellis("logs", "shop/web", "-n", "200", "--socket", str(sock))
        if "got USR1" in r.stdout:
            break
        assert time.monotonic() < deadline, r.stdout[-500:]
        time.sleep(0.2)
    bad = _trellis("signal", "shop/web", "NOPE", "--socket", str(sock))
    assert bad.returncode == 2  # bad input: a usage error
    assert "not a signal" in bad.stderr
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)
    con = sqlite3.connect(tmp_path / "j.db")
    try:
        rows = [
            json.loads(d)
            for (d,) in con.execute("SELECT data FROM journal WHERE kind = 'operator.action'")
        ]
    finally:
        con.close()
    signals = [r for r in rows if r.get("action") == "signal"]
    assert signals, rows
    assert signals[0]["result"] == "ok"
    assert signals[0]["detail"]["signal"] == "SIGUSR1"
    assert signals[0]["detail"]["reason"] == "rotate"


def test_the_ring_is_bounded_in_lines_and_bytes() -> None:
    """1,000 lines at most, and 256 KiB: a child printing huge lines cannot grow it."""
    from trellis._children._output import (
        RING_BYTES,
        RING_LINES,
        OutputRing,
        recent_output,
        ring_for,
    )

    ring = OutputRing()
    for i in range(3 * RING_LINES):
        ring.append("stdout", 1, b"line %d" % i)
    assert len(ring.lines) == RING_LINES
    assert ring.lines[-1][3] == b"line %d" % (3 * RING_LINES - 1)
    for _ in range(100):
        ring.append("stderr", 1, b"x" * 10_000)
    assert ring.size <= RING_BYTES
    assert sum(len(e[3]) for e in ring.lines) == ring.size
    shared = ring_for("test-ring/child")
    shared.append("stderr", 7, b"last words")
    assert recent_output("test-ring/child", n=1) == [
        {"time": shared.lines[-1][0], "stream": "stderr", "os_pid": 7, "line": "last words"}
    ]

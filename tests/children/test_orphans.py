"""No orphans, whatever happens to `trellis run`: kill -9 mid restart storm (children,
grandchildren that setsid, daemonizers), a dead guardian, daemonizers followed through a
pidfile. Real `trellis run` processes; leftovers are found by scanning /proc for a probe
variable every child (and so every descendant) carries."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGS = Path(__file__).resolve().parent / "progs"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="trl-", dir="/tmp") as d:
        yield Path(d)


def _probed(probe: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds ``ORPHAN_PROBE=<probe>``."""
    needle = f"ORPHAN_PROBE={probe}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if needle in env and stat[stat.rfind(b")") + 2 :][:1] != b"Z":
            found.append(int(entry))
    return found


def _wait_gone(probe: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = _probed(probe)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def _describe(pids: list[int]) -> str:
    out = []
    for p in pids:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "?"
        out.append(f"{p}: {cmd}")
    return "\n".join(out)


def _verified(url: str, timeout: float = 10.0) -> Any:
    """``verify(url)``, retried while the journal's writer (which outlives a kill -9 of
    `trellis run` to commit what it was handed) may not have created it (or its
    schema) yet."""
    from trellis.journal import JournalNotFound, NotAJournal, verify

    deadline = time.monotonic() + timeout
    while True:
        try:
            return verify(url)
        except (JournalNotFound, NotAJournal):  # not created, or its schema not yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _kill_probed(probe: str) -> None:
    for p in _probed(probe):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def _start(tree: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", str(tree), "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=tree.parent,
    )


STORM = """
[supervisor]
name = "storm"
strategy = "one_for_all"
intensity = 1000000
period = 1.0

[[supervisor.children]]
id = "s1"
command = ["sleep", "600"]
env = {{ ORPHAN_PROBE = "{probe}" }}

[[supervisor.children]]
id = "s2"
command = ["sleep", "600"]
env = {{ ORPHAN_PROBE = "{probe}" }}

[[supervisor.children]]
id = "escaper"
command = ["sh", "-c", "setsid sleep 600 & setsid sh -c 'sleep 600 & sleep 600' & sleep 600"]
env = {{ ORPHAN_PROBE = "{probe}" }}

[[supervisor.children]]
id = "daemon"
command = ["{python}", "{progs}/daemonize.py"]
env = {{ ORPHAN_PROBE = "{probe}" }}

[[supervisor.children]]
id = "s3"
command = ["sleep", "600"]
env = {{ ORPHAN_PROBE = "{probe}" }}

[[supervisor.children]]
id = "crasher"
command = ["sh", "-c", "sleep 0.01; exit 1"]
env = {{ ORPHAN_PROBE = "{probe}" }}
"""


def test_kill_9_mid_restart_storm_leaves_no_orphans(tmp_path: Path, short_dir: Path) -> None:
    """20 rounds: a one_for_all tree whose crasher restarts everything every few ms,
    with children that leave setsid'd grandchildren and a daemonizer; kill -9 of the
    `trellis run` pid at a random moment of the storm. Nothing carrying the probe may
    survive, and the journal verifies every time."""
    rng = random.Random(9)
    started = time.monotonic()
    for round_ in range(20):
        probe = uuid.uuid4().hex
        tree = tmp_path / f"storm{round_}.toml"
        tree.write_text(
            textwrap.dedent(STORM).format(probe=probe, python=sys.executable, progs=PROGS)
        )
        db = tmp_path / f"journal{round_}.db"
        proc = _start(
            tree, "--journal", f"sqlite:///{db}", "--socket", str(short_dir / f"{round_}.sock")
        )
        try:
            deadline = time.monotonic() + 30
            while not db.exists() or len(_probed(probe)) < 4:  # the storm is on
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the tree never started"
                time.sleep(0.03)
            time.sleep(rng.uniform(0.02, 0.3))
            assert proc.poll() is None, proc.communicate()[1]
            proc.kill()
            proc.wait(10)
            left = _wait_gone(probe, timeout=5.0)
            assert left == [], f"round {round_}: orphans after kill -9:\n{_describe(left)}"
            # the journal's writer commits what it had, then exits: until then the
            # journal may still grow, but never stops verifying
            result = _verified(f"sqlite:///{db}")
            assert result.ok, f"round {round_}: {result}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()
            _kill_probed(probe)
    took = time.monotonic() - started
    assert took < 60, f"20 rounds took {took:.0f}s"


DAEMON = """
[supervisor]
name = "daemons"
intensity = 1000
period = 1.0

[[supervisor.children]]
id = "redis-like"
command = ["{python}", "{progs}/daemonize.py"{args}]
env = {{ ORPHAN_PROBE = "{probe}" }}
{extra}
"""


def _daemon_tree(tmp: Path, probe: str, extra: str = "", args: str = "") -> Path:
    tree = tmp / "daemon.toml"
    text = textwrap.dedent(DAEMON).format(
        probe=probe, python=sys.executable, progs=PROGS, extra=extra, args=args
    )
    tree.write_text(text)
    return tree


def test_daemonizer_without_pidfile_is_detected_and_never_orphaned(
    tmp_path: Path, short_dir: Path
) -> None:
    """A program that daemonizes is restarted (its main process exits 0), but its daemon
    is killed each time, and the log says what happened and what to do."""
    probe = uuid.uuid4().hex
    tree = _daemon_tree(tmp_path, probe)
    proc = _start(tree, "--no-journal", "--socket", str(short_dir / "d.sock"))
    try:
        time.sleep(2.0)
        assert proc.poll() is None
        # at any moment at most one generation is alive (main, intermediate or daemon)
        assert len(_probed(probe)) <= 3
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    left = _wait_gone(probe, 5.0)
    _kill_probed(probe)
    assert left == [], _describe(left)
    assert "daemonized" in err, err
    assert "pidfile" in err, err
    assert "--daemonize no" in err, err


def test_daemonizer_followed_through_pidfile(tmp_path: Path, short_dir: Path) -> None:
    """With ``pidfile`` (systemd Type=forking) the daemon is followed: it is not
    restarted in a loop, its crash is seen (exit 3) and it is restarted, a stop stops it."""
    probe = uuid.uuid4().hex
    pidfile = tmp_path / "redis.pid"
    tree = _daemon_tree(
        tmp_path, probe, extra=f'pidfile = "{pidfile.name}"', args=f', "--pidfile", "{pidfile}"'
    )
    db = tmp_path / "j.db"
    proc = _start(tree, "--journal", f"sqlite:///{db}", "--socket", str(short_dir / "d.sock"))
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists():
            assert time.monotonic() < deadline
            assert proc.poll() is None
            time.sleep(0.02)
        time.sleep(1.0)
        daemon = int(pidfile.read_text())
        assert _probed(probe) == [daemon], _describe(_probed(probe))  # followed, not looping
        os.kill(daemon, signal.SIGKILL)  # it crashes: restarted, a new daemon
        deadline = time.monotonic() + 20
        while True:
            now = _probed(probe)
            if (
                len(now) == 1
                and now[0] != daemon
                and pidfile.exists()
                and pidfile.read_text().strip() == str(now[0])
            ):
                break
            assert time.monotonic() < deadline, _describe(now)
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    left = _wait_gone(probe, 5.0)
    _kill_probed(probe)
    assert left == [], _describe(left)
    assert code == 0, err
    assert "daemonized" not in err, err


def test_guardian_killed_is_loud_restarted_with_every_group(
    tmp_path: Path, short_dir: Path
) -> None:
    """kill -9 of the guardian: logged, restarted at once with the full set of groups, so
    a later kill -9 of `trellis run` still leaves nothing behind."""
    probe = uuid.uuid4().hex
    tree = tmp_path / "g.toml"
    tree.write_text(
        textwrap.dedent(
            f"""
            [supervisor]
            name = "guarded"

            [[supervisor.children]]
            id = "a"
            command = ["sleep", "600"]
            env = {{ ORPHAN_PROBE = "{probe}" }}

            [[supervisor.children]]
            id = "b"
            command = ["sh", "-c", "sleep 600 & sleep 600"]
            env = {{ ORPHAN_PROBE = "{probe}" }}
            """
        )
    )
    proc = _start(tree, "--no-journal", "--socket", str(short_dir / "g.sock"))
    try:
        deadline = time.monotonic() + 20
        while len(_probed(probe)) < 3:
            assert time.monotonic() < deadline
            assert proc.poll() is None
            time.sleep(0.02)

        def guardians() -> list[int]:
            out = []
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                state = stat.rsplit(")", 1)[1].split()[0]
                if ppid == proc.pid and b"TRELLIS_TAG" in cmd and state != "Z":
                    out.append(int(entry))
            return out

        [first] = guardians()
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            now = guardians()
            if now and now != [first]:
                break
            assert time.monotonic() < deadline, "the guardian was not restarted"
            time.sleep(0.02)
        time.sleep(0.2)
        proc.kill()
        proc.wait(10)
        err = proc.stderr.read() if proc.stderr else ""
        left = _wait_gone(probe, 5.0)
        assert left == [], _describe(left)
        assert "guardian" in err, err
        assert "NOT protected" in err, err
        assert "restarted" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        _kill_probed(probe)

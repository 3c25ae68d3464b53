"""Choosing a tree by name with real `trellis run` processes: `--tree NAME` /
`$TRELLIS_TREE`, `trellis ls`, stale sockets ignored, the "no tree" message naming the
directory looked in, and `trellis stop --wait` then a new `run` with no overlap."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from trellis.cli import cli

ROOT = Path(__file__).resolve().parents[2]

TREE = textwrap.dedent(
    """
    [supervisor]
    name = "{name}"
    [[supervisor.children]]
    id = "os"
    command = ["{python}", "-c", "{code}"]
    shutdown = {shutdown}
    [journal]
    enabled = false
    """
)
SLEEP = "import time; time.sleep(600)"
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


class Trees:
    """Trees run by `trellis run` with their own socket directory ($XDG_RUNTIME_DIR)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.xdg = base / "xdg"
        self.xdg.mkdir(mode=0o700)
        self.dir = self.xdg / "trellis"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")},
            "PYTHONPATH": str(ROOT / "src"),
            "XDG_RUNTIME_DIR": str(self.xdg),
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def run(self, name: str, code: str = SLEEP, shutdown: float = 5.0) -> subprocess.Popen[bytes]:
        tree = self.base / f"{name}.toml"
        tree.write_text(TREE.format(name=name, python=sys.executable, code=code, shutdown=shutdown))
        proc = subprocess.Popen(
            [sys.executable, "-m", "trellis", "run", str(tree)],
            env=self.env,
            cwd=self.base,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        self.wait_for(lambda: self.cli("status", "--tree", name).returncode == 0, f"{name} up")
        return proc

    def cli(self, *args: str, env: dict[str, str] | None = None) -> Outcome:
        """The `trellis` command line, in this process (CliRunner sets the environment
        for the call; a subprocess would spend seconds importing on a busy machine)."""
        unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TRELLIS_")}
        r = CliRunner().invoke(
            cli, list(args), env={**unset, "XDG_RUNTIME_DIR": str(self.xdg), **(env or {})}
        )
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        return Outcome(r.exit_code, r.stdout, r.stderr)

    @staticmethod
    def wait_for(pred: Callable[[], bool], what: str, bound: float = 60) -> None:
        t0 = time.monotonic()
        while not pred():
            assert time.monotonic() - t0 < bound, f"timed out waiting for {what}"
            time.sleep(0.05)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)
            if p.stderr is not None:
                p.stderr.close()


@pytest.fixture
def trees() -> Iterator[Trees]:
    with tempfile.TemporaryDirectory(prefix="ttr-", dir="/tmp") as d:
        t = Trees(Path(d))
        try:
            yield t
        finally:
            t.close()


def _os_pid(data: dict[str, object]) -> int:
    [child] = data["root"]["children"]  # type: ignore[index]
    return int(child["os_pid"])  # type: ignore[index]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True


def test_two_trees_chosen_by_name_and_listed(trees: Trees) -> None:
    alpha = trees.run("alpha")
    beta = trees.run("beta")
    # the directory is 0700 and each socket 0600
    assert stat.S_IMODE(os.lstat(trees.dir).st_mode) == 0o700
    for name in ("alpha", "beta"):
        assert stat.S_IMODE(os.lstat(trees.dir / f"{name}.sock").st_mode) == 0o600

    r = trees.cli("status", "--json", "--tree", "alpha")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["root"]["path"] == "alpha"
    r = trees.cli("status", "--json", env={"TRELLIS_TREE": "beta"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["root"]["path"] == "beta"
    r = trees.cli("restart", "os", "--tree", "beta")
    assert r.returncode == 0, r.stderr
    assert "restarted beta/os" in r.stdout

    # without a name: ambiguous, naming both and how to choose
    r = trees.cli("status")
    assert r.returncode == 2
    assert "alpha.sock" in r.stderr
    assert "beta.sock" in r.stderr
    assert "--tree NAME" in r.stderr
    # --tree with --socket on the command line: a usage error
    r = trees.cli("status", "--tree", "alpha", "--socket", str(trees.dir / "beta.sock"))
    assert r.returncode == 2
    assert "give --tree or --socket, not both" in r.stderr

    r = trees.cli("ls", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["name"], row["pid"], row["socket"]) for row in rows] == [
        ("alpha", alpha.pid, str(trees.dir / "alpha.sock")),
        ("beta", beta.pid, str(trees.dir / "beta.sock")),
    ]
    assert all(row["uptime_s"] is not None and row["uptime_s"] >= 0 for row in rows)
    r = trees.cli("ls")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PID", "UPTIME", "SOCKET"]
    assert lines[1].split()[:2] == ["alpha", str(alpha.pid)]
    assert lines[2].split()[:2] == ["beta", str(beta.pid)]


def test_a_stale_socket_is_ignored(trees: Trees) -> None:
    """A socket file nobody listens on (a tree killed with SIGKILL) is skipped: the one
    live tree is found without --tree, `ls` does not list it, and naming it says that
    nothing listens there."""
    trees.run("live")
    stale = trees.dir / "ghost.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    r = trees.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["root"]["path"] == "live"
    r = trees.cli("ls", "--json")
    assert [row["name"] for row in json.loads(r.stdout)] == ["live"]
    r = trees.cli("status", "--tree", "ghost")
    assert r.returncode == 3
    assert f"no Trellis tree named 'ghost' is listening on {stale}" in r.stderr


def test_no_tree_running_names_the_directory_looked_in(trees: Trees) -> None:
    r = trees.cli("status")
    assert r.returncode == 3
    assert r.stderr == (
        f"trellis: no Trellis tree is running: nothing listens on {trees.dir}/*.sock "
        "(start one with `trellis run TREE.toml`)\n"
    )
    r = trees.cli("ls")
    assert r.returncode == 0
    assert f"no trees running (nothing listens on {trees.dir}/*.sock)" in r.stderr


def test_stop_wait_then_run_again_without_overlap(trees: Trees) -> None:
    """`trellis stop --wait` returns once the tree's process has exited (its OS child
    with it); a new `trellis run` of the same tree then starts cleanly."""
    first = trees.run("shop")
    r = trees.cli("status", "--json", "--tree", "shop")
    old_child = _os_pid(json.loads(r.stdout))
    r = trees.cli("stop", "--wait", "--tree", "shop")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("stopped the tree on ")
    # returned only after the process ended: it is a zombie or reaped, not running
    assert _gone(first.pid)
    assert first.wait(5) == 0
    assert _gone(old_child)
    second = trees.run("shop")
    r = trees.cli("status", "--json", "--tree", "shop")
    assert r.returncode == 0, r.stderr
    assert _os_pid(json.loads(r.stdout)) != old_child
    assert second.poll() is None


def test_stop_wait_timeout_and_a_child(trees: Trees) -> None:
    """`stop PATH --wait` returns with the child stopped; `stop --wait --timeout S` on a
    tree slower to stop than S exits 1 saying so (the stop goes on)."""
    proc = trees.run("slow", code=STUBBORN, shutdown=3.0)
    r = trees.cli("stop", "os", "--wait", "--tree", "slow")
    assert r.returncode == 0, r.stderr
    r = trees.cli("status", "--json", "--tree", "slow")
    [child] = json.loads(r.stdout)["root"]["children"]
    assert child["state"] == "stopped"
    r = trees.cli("start", "os", "--tree", "slow")
    assert r.returncode == 0, r.stderr
    r = trees.cli("stop", "--wait", "--timeout", "0.2", "--tree", "slow")
    assert r.returncode == 1
    assert "did not stop within 0.2 s" in r.stderr
    assert proc.wait(30) == 0  # the stop went on: SIGKILL after the 3 s shutdown
    r = trees.cli("stop", "--timeout", "1", "--tree", "slow")
    assert r.returncode == 2
    assert "--timeout goes with --wait" in r.stderr

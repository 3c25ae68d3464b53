"""`trellis run` under a service manager: sd_notify datagrams to a real $NOTIFY_SOCKET,
and the example systemd unit checked by systemd-analyze."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trellis._sdnotify import SdNotify

ROOT = Path(__file__).resolve().parent.parent

TREE = """
[supervisor]
name = "svc"

[[supervisor.children]]
id = "env"
command = ["sh", "-c", "echo ${NOTIFY_SOCKET:-unset} ${WATCHDOG_USEC:-unset} >env.txt; sleep 60"]

[[supervisor.children]]
id = "blocker"
worker = "blocker:block"
"""

BLOCKER = '''
import asyncio, os, time

async def block():
    """Blocks the event loop for 2 s once the file 'block-now' appears."""
    while True:
        if os.path.exists("block-now"):
            os.unlink("block-now")
            time.sleep(2.0)
        await asyncio.sleep(0.02)
'''


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="trn-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Listener:
    """A datagram socket playing the service manager: every message with its time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []

    def read(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0) -> int:
        """Read until a message with ``key`` (= ``value``) arrives after those seen;
        returns its index."""
        start = len(self.messages)
        deadline = time.monotonic() + timeout
        while True:
            for i in range(start, len(self.messages)):
                got = self.messages[i][1].get(key)
                if got is not None and (value is None or got == value):
                    return i
            start = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} in {[m for _, m in self.messages]}")
            self.read(min(left, 1.0))

    def close(self) -> None:
        self.sock.close()


def test_trellis_run_speaks_sd_notify(short_tmp: Path) -> None:
    """READY=1 once the tree runs, WATCHDOG=1 at half of WATCHDOG_USEC from the event
    loop (a blocked loop stops them), RELOADING=1 + MONOTONIC_USEC then READY=1 around a
    SIGHUP reload, STOPPING=1 on SIGTERM; children do not inherit NOTIFY_SOCKET."""
    (short_tmp / "tree.toml").write_text(TREE)
    (short_tmp / "blocker.py").write_text(BLOCKER)
    listener = Listener(short_tmp / "notify.sock")
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(short_tmp / "notify.sock"),
        "WATCHDOG_USEC": "400000",  # heartbeats every 0.2 s
    }
    env.pop("WATCHDOG_PID", None)
    cmd = [sys.executable, "-m", "trellis", "run", "tree.toml", "--no-journal", "--no-control"]
    with open(short_tmp / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=short_tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        i = listener.wait_for("STATUS")
        assert listener.messages[i][1]["STATUS"] == "starting tree svc"
        ready = listener.wait_for("READY", "1")
        assert listener.messages[ready][1]["STATUS"] == "running tree svc"
        for _ in range(3):
            listener.wait_for("WATCHDOG", "1", timeout=10)
        deadline = time.monotonic() + 10
        while not (short_tmp / "env.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (short_tmp / "env.txt").read_text().split() == ["unset", "unset"]

        # a blocked loop sends no heartbeat: a gap of about the 2 s block
        (short_tmp / "block-now").write_text("")
        first = len(listener.messages)
        listener.wait_for("WATCHDOG", "1", timeout=10)
        listener.wait_for("WATCHDOG", "1", timeout=10)
        beats = [t for t, m in listener.messages[first - 1 :] if m.get("WATCHDOG") == "1"]
        gaps = [b - a for a, b in itertools.pairwise(beats)]
        assert max(gaps) >= 1.5, gaps

        # reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 with the result
        text = (short_tmp / "tree.toml").read_text()
        (short_tmp / "tree.toml").write_text(text.replace('id = "blocker"', 'id = "blocker2"'))
        proc.send_signal(signal.SIGHUP)
        r = listener.wait_for("RELOADING", "1")
        assert int(listener.messages[r][1]["MONOTONIC_USEC"]) > 0
        ready = listener.wait_for("READY", "1")
        assert "reloaded: 2 change(s)" in listener.messages[ready][1]["STATUS"]

        proc.send_signal(signal.SIGTERM)
        listener.wait_for("STOPPING", "1")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        listener.close()


def test_a_root_that_gives_up_says_so(short_tmp: Path) -> None:
    """READY=1, then STOPPING=1 with a STATUS naming the supervisor that gave up; exit 1."""
    (short_tmp / "tree.toml").write_text(
        '[supervisor]\nname = "gu"\nintensity = 1\nperiod = 60.0\n'
        '[[supervisor.children]]\nid = "bad"\ncommand = ["sh", "-c", "sleep 0.3; exit 3"]\n'
    )
    listener = Listener(short_tmp / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(short_tmp / "notify.sock")}
    cmd = [sys.executable, "-m", "trellis", "run", "tree.toml", "--no-journal", "--no-control"]
    proc = subprocess.Popen(cmd, cwd=short_tmp, env=env, stderr=subprocess.DEVNULL)
    try:
        listener.wait_for("READY", "1")
        i = listener.wait_for("STOPPING", "1")
        status = listener.messages[i][1]["STATUS"]
        assert status.startswith("tree gu ended: supervisor gu gave up (more than 1 restarts")
        assert "the last of bad" in status
        assert proc.wait(30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        listener.close()


def test_notify_socket_forms() -> None:
    """An @name is an abstract socket; WATCHDOG_PID naming another process turns the
    heartbeats off; the variables are removed from the environment."""
    env = {"NOTIFY_SOCKET": "@trellis-test", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    n = SdNotify.from_environment("t", env)
    assert n is not None
    assert n.address == "\0trellis-test"
    assert n.interval is None
    assert env == {}
    env = {"NOTIFY_SOCKET": "/run/x.sock", "WATCHDOG_USEC": "1000000"}
    n = SdNotify.from_environment("t", env)
    assert n is not None
    assert n.interval == 0.5
    assert SdNotify.from_environment("t", {}) is None
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        SdNotify.from_environment("t", {"NOTIFY_SOCKET": "relative.sock"})


def test_example_unit_file_verifies(short_tmp: Path) -> None:
    """examples/systemd/trellis@.service passes `systemd-analyze verify` (instantiated,
    with ExecStart pointing at an executable that exists)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (it comes with systemd)")
    text = (ROOT / "examples/systemd/trellis@.service").read_text()
    for key in ("Type=notify", "WatchdogSec=", "KillMode=mixed", "ExecReload="):
        assert key in text
    unit = short_tmp / "trellis@shop.service"
    unit.write_text(
        text.replace("/usr/local/bin/trellis", sys.executable.rsplit("/", 1)[0] + "/trellis")
    )
    r = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    out = r.stdout + r.stderr
    # verify exits 0 even for a key it cannot parse ("...: Failed to parse kill mode
    # specification, ignoring"): every line about our unit is a problem
    ours = [line for line in out.splitlines() if "trellis@" in line]
    assert r.returncode == 0, out
    assert not ours, out

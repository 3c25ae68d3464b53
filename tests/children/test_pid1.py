"""`trellis run` as PID 1 (a container's init, here a new PID namespace made with
``unshare --pid --fork``): it reaps the orphans re-parented to it (tini's duty), stops
the tree on SIGTERM (exit 0) and exits non-zero when the root gives up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

pytestmark = [
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a new PID namespace needs root"),
]


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[1] == pid:
                out.append((int(entry), st[0]))
    return out


def _kill_namespace(proc: subprocess.Popen[str], init: int) -> None:
    """SIGKILL of the namespace's PID 1 ends every process in it; then unshare ends."""
    if _stat(init) is not None and proc.poll() is None:
        os.kill(init, signal.SIGKILL)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def _start(tree: Path) -> tuple[subprocess.Popen[str], int]:
    """``unshare`` and the host pid of the PID-1 `trellis run` inside it."""
    proc = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            sys.executable,
            "-m",
            "trellis",
            "run",
            str(tree),
            "--no-journal",
            "--no-control",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.monotonic() + 20
    while True:
        kids = _children(proc.pid)
        if kids:
            return proc, kids[0][0]
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_pid1_reaps_orphans_and_stops_on_sigterm(tmp_path: Path) -> None:
    tree = tmp_path / "t.toml"
    # a burst of 10 orphans (each a subshell's background sleep), then quiet
    burst = (
        "for i in 1 2 3 4 5 6 7 8 9 10; do (sleep 0.05 &); done; echo burst > {m}; exec sleep 600"
    )
    tree.write_text(
        textwrap.dedent(
            f"""
            [supervisor]
            name = "init"

            [[supervisor.children]]
            id = "orphaner"
            command = ["sh", "-c", "{burst.format(m=tmp_path / "done")}"]
            """
        )
    )
    proc, init = _start(tree)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "done").exists():
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)  # the orphans have exited: zombies until someone reaps them
        deadline = time.monotonic() + 5
        while True:
            zombies = [p for p, state in _children(init) if state == "Z"]
            if not zombies:
                break
            assert time.monotonic() < deadline, f"zombies left unreaped: {zombies}"
            time.sleep(0.1)
        os.kill(init, signal.SIGTERM)
        code = proc.wait(20)
        err = proc.stderr.read() if proc.stderr else ""
        assert code == 0, err
    finally:
        _kill_namespace(proc, init)


def test_pid1_exits_non_zero_when_the_root_gives_up(tmp_path: Path) -> None:
    tree = tmp_path / "t.toml"
    tree.write_text(
        textwrap.dedent(
            """
            [supervisor]
            name = "init"
            intensity = 1
            period = 10.0

            [[supervisor.children]]
            id = "crasher"
            command = ["sh", "-c", "sleep 0.1; exit 3"]
            """
        )
    )
    proc, init = _start(tree)
    try:
        code = proc.wait(30)
        err = proc.stderr.read() if proc.stderr else ""
        assert code == 1, err
    finally:
        _kill_namespace(proc, init)

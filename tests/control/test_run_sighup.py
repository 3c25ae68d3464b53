"""A SIGHUP sent right after `trellis run` is launched does not kill it: the command
ignores SIGHUP from its first lines until the tree's reload handler takes over (it used
to die with exit 129 during its first ~0.8 s, nothing journaled). Other commands keep
the default, and the tree's children do not inherit the ignored signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRELLIS = Path(sys.executable).parent / "trellis"


def _sig_mask(pid: int, field: str) -> int:
    """``SigIgn``/``SigCgt`` of ``pid`` from /proc (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    return 0


HUP = 1 << (signal.SIGHUP - 1)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="thup-", dir="/tmp") as d:
        os.chmod(d, 0o700)
        yield Path(d)


def _env(run_dir: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TRELLIS_STATE_DIR": str(run_dir)}
    for key in ("TRELLIS_SOCKET", "TRELLIS_TREE", "NOTIFY_SOCKET"):
        env.pop(key, None)
    return env


@pytest.mark.skipif(not TRELLIS.exists(), reason="the trellis command is not installed")
@pytest.mark.parametrize("how", ["command", "module"])
def test_sighup_right_after_launch_does_not_kill_trellis_run(run_dir: Path, how: str) -> None:
    tree = run_dir / "t.toml"
    tree.write_text(
        '[supervisor]\nname = "hup"\n[journal]\nenabled = false\n'
        f'[control]\nsocket = "{run_dir}/hup.sock"\n'
        '[[supervisor.children]]\nid = "a"\ncommand = ["sleep", "60"]\n'
    )
    argv = [str(TRELLIS)] if how == "command" else [sys.executable, "-m", "trellis"]
    proc = subprocess.Popen(
        [*argv, "run", str(tree)],
        env=_env(run_dir),
        cwd=run_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The first moment SIGHUP is ignored or caught: it must be ignored (by the CLI)
        # before the tree's handler catches it.
        deadline = time.monotonic() + 30
        while True:
            ignored, caught = _sig_mask(proc.pid, "SigIgn"), _sig_mask(proc.pid, "SigCgt")
            if ignored & HUP or caught & HUP or proc.poll() is not None:
                break
            assert time.monotonic() < deadline, "trellis run never handled SIGHUP"
            time.sleep(0.0005)
        assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
        assert ignored & HUP, "SIGHUP was caught before it was ever ignored: the early window"
        assert not caught & HUP
        proc.send_signal(signal.SIGHUP)  # in the window the tree's handler is not yet in
        # the run goes on: its child starts, and it stops cleanly on SIGTERM
        deadline = time.monotonic() + 30
        child = None
        while child is None:
            assert proc.poll() is None, f"trellis run died: {proc.returncode}"
            assert time.monotonic() < deadline, "the child never started"
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            for k in kids:
                try:
                    if Path(f"/proc/{k}/cmdline").read_bytes().startswith(b"sleep\0"):
                        child = int(k)
                except FileNotFoundError:
                    pass
            time.sleep(0.02)
        assert not _sig_mask(child, "SigIgn") & HUP, "the child inherited an ignored SIGHUP"
        assert _sig_mask(proc.pid, "SigCgt") & HUP, "the tree's SIGHUP handler is not in"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


def test_other_commands_keep_the_default_sighup(run_dir: Path) -> None:
    """`trellis check` is not changed: a hangup ends it as before (checked in-process:
    importing the CLI and running another command ignores nothing)."""
    code = (
        "import signal, sys; sys.argv = ['trellis', 'check', 'x.toml']; "
        "before = signal.getsignal(signal.SIGHUP); "  # SIG_IGN under nohup
        "import trellis.cli; "
        "print(signal.getsignal(signal.SIGHUP) == before)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(run_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "True"

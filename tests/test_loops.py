"""The event loop a tree runs on: asyncio by default, uvloop when asked (``--loop``, the
tree file's ``[run] loop``, ``$TRELLIS_LOOP``, or ``trellis.run(loop=...)``)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import trellis
from trellis._run import loop_factory

ROOT = Path(__file__).resolve().parents[1]

uvloop = pytest.importorskip("uvloop", reason="pip install 'trellis-otp[uvloop]'")

WORKER = """\
import asyncio, os, sys

async def report(path):
    loop = asyncio.get_running_loop()
    with open(path, "w") as f:
        f.write(type(loop).__module__)
    await asyncio.sleep(3600)
"""


def _tree(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "loopworker.py").write_text(WORKER)
    tree = tmp_path / "tree.toml"
    tree.write_text(
        textwrap.dedent(
            f"""\
            {extra}
            [supervisor]
            name = "loops"

            [[supervisor.children]]
            id = "report"
            worker = "loopworker:report"
            args = ["{tmp_path / "loop.txt"}"]
            """
        )
    )
    return tree


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """``trellis run`` the tree until its worker wrote which loop it runs on; SIGTERM it."""
    out = tmp_path / "loop.txt"
    out.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", *args, "--no-journal", "--no-control"],
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (out.exists() and out.read_text()):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the worker never reported"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.communicate()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    return out.read_text()


def test_default_loop_is_asyncio(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    assert _run(tmp_path, str(tree), env={"TRELLIS_LOOP": ""}) == "asyncio.unix_events"


def test_loop_flag_runs_the_tree_on_uvloop(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    assert _run(tmp_path, str(tree), "--loop", "uvloop") == "uvloop"


def test_tree_file_run_loop_and_environment(tmp_path: Path) -> None:
    tree = _tree(tmp_path, '[run]\nloop = "uvloop"\n')
    assert _run(tmp_path, str(tree)) == "uvloop"
    tree = _tree(tmp_path)
    assert _run(tmp_path, str(tree), env={"TRELLIS_LOOP": "uvloop"}) == "uvloop"
    # the flag wins over the file
    tree = _tree(tmp_path, '[run]\nloop = "uvloop"\n')
    assert _run(tmp_path, str(tree), "--loop", "asyncio") == "asyncio.unix_events"


def test_bad_loop_names_are_clear_errors(tmp_path: Path) -> None:
    tree = _tree(tmp_path, '[run]\nloop = "tokio"\n')
    done = subprocess.run(
        [sys.executable, "-m", "trellis", "check", str(tree)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "run.loop" in done.stderr, done.stderr
    assert "uvloop" in done.stderr, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "trellis", "run", str(_tree(tmp_path)), "--loop", "tokio"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "tokio" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "trellis", "run", str(_tree(tmp_path)), "--no-journal"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TRELLIS_LOOP": "tokio"},
    )
    assert done.returncode == 2
    assert "unknown event loop 'tokio'" in done.stderr


def test_missing_uvloop_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"pip install 'trellis-otp\[uvloop\]'"):
        loop_factory("uvloop")


def test_trellis_run_in_code_on_uvloop() -> None:
    seen: list[str] = []

    async def body() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    async def root() -> trellis.Pid:
        # the only child is significant: the tree ends once it has run
        child = trellis.worker("w", body, restart="transient", significant=True)
        return await trellis.Supervisor.start_link([child], auto_shutdown="any_significant")

    assert trellis.run(root, loop="uvloop") == 0
    assert seen == ["uvloop"]
    with pytest.raises(ValueError, match="unknown event loop 'tokio'"):
        trellis.run(root, loop="tokio")

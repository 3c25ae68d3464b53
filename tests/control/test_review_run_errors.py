"""`trellis run` when the control API cannot start: a clear error and exit 2, no
traceback, and nothing left running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

TREE = textwrap.dedent(
    """
    [supervisor]
    name = "rv"
    [[supervisor.children]]
    id = "w"
    server = "parts:Idle"
    """
)
PARTS = textwrap.dedent(
    """
    import trellis

    class Idle(trellis.Server):
        async def init(self):
            pass
    """
)


@pytest.fixture
def tree() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="trv-", dir="/tmp") as d:
        (Path(d) / "parts.py").write_text(PARTS)
        (Path(d) / "tree.toml").write_text(TREE)
        yield Path(d) / "tree.toml"


def _run(
    tree: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trellis", "run", str(tree), *args],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        cwd=tree.parent,
        timeout=60,
        check=False,
    )


def test_socket_in_use_is_exit_2_without_a_traceback(tree: Path) -> None:
    sock_path = tree.parent / "c.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(sock_path))
        listener.listen()
        db = tree.parent / "j.db"
        r = _run(tree, "--socket", str(sock_path), "--journal", f"sqlite:///{db}")
    finally:
        listener.close()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "already listening" in r.stderr
    assert sock_path.exists()  # someone else's socket: left alone


def test_tcp_that_cannot_bind_is_exit_2_and_removes_the_socket(tree: Path) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sock_path = tree.parent / "c.sock"
        r = _run(
            tree,
            "--no-journal",
            "--socket",
            str(sock_path),
            "--tcp",
            f"127.0.0.1:{port}",
            env={"TRELLIS_CONTROL_TOKEN": "a-token-of-sixteen-chars"},
        )
    finally:
        busy.close()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert not sock_path.exists()

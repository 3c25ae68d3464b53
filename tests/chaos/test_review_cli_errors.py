"""``trellis chaos`` when the tree, the control API or a proxy cannot start: a clear
message and an exit code, never a traceback; ``--no-control`` means no control API."""

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
ENV = {k: v for k, v in os.environ.items() if k != "TRELLIS_CONTROL_TOKEN"}
ENV["PYTHONPATH"] = str(ROOT / "src")
CHAOS = (sys.executable, "-m", "trellis", "chaos")

PARTS = textwrap.dedent(
    """
    import trellis

    class Idle(trellis.Server):
        async def init(self):
            pass

    class Bad(trellis.Server):
        async def init(self):
            raise RuntimeError("cannot open the feed")
    """
)


def _tree(d: Path, server: str, extra: str = "") -> Path:
    (d / "rvchaos_parts.py").write_text(PARTS)
    path = d / "tree.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [supervisor]
            name = "rv"
            [[supervisor.children]]
            id = "w"
            server = "rvchaos_parts:{server}"
            """
        ).lstrip()
        + extra
    )
    return path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="trc-", dir="/tmp") as d:
        yield Path(d)


def _chaos(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *CHAOS,
            str(tree),
            "--fault",
            "kill:rv/w:at=0.2",
            "--duration",
            "0.5",
            "--settle",
            "1",
            *args,
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tree.parent,
        timeout=60,
        check=False,
    )


def test_a_tree_that_cannot_start_is_exit_1_without_a_traceback(short_dir: Path) -> None:
    tree = _tree(short_dir, "Bad")
    r = _chaos(tree, "--no-journal", "--no-control")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "cannot open the feed" in r.stderr


def test_socket_in_use_is_exit_2_without_a_traceback(short_dir: Path) -> None:
    tree = _tree(short_dir, "Idle", f'[control]\nsocket = "{short_dir / "c.sock"}"\n')
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(short_dir / "c.sock"))
        listener.listen()
        r = _chaos(tree, "--no-journal")
    finally:
        listener.close()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "already listening" in r.stderr


def test_proxy_port_in_use_is_exit_2_without_a_traceback(short_dir: Path) -> None:
    tree = _tree(short_dir, "Idle")
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _chaos(tree, "--no-journal", "--no-control", "--proxy", f"db={port}:127.0.0.1:9")
    finally:
        busy.close()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"proxy db: cannot listen on 127.0.0.1:{port}" in r.stderr


def test_no_control_does_not_serve_the_tree_files_tcp(short_dir: Path) -> None:
    """With a journal but --no-control, the file's [control] tcp is neither served nor
    asks for a token."""
    tree = _tree(short_dir, "Idle", '[control]\ntcp = "127.0.0.1:1"\n')
    db = short_dir / "j.db"
    r = _chaos(tree, "--no-control", "--journal", f"sqlite:///{db}")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr

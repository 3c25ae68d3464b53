"""`trellis run --no-control` against a tree file whose [control] table sets tcp."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from click.testing import CliRunner

from trellis.cli import cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "TRELLIS_CONTROL_TOKEN"}
ENV["PYTHONPATH"] = str(ROOT / "src")


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def _tree(tmp: Path, port: int) -> Path:
    (tmp / "rvparts.py").write_text(
        textwrap.dedent(
            """
            import os, trellis

            class Marker(trellis.Server):
                async def init(self, path):
                    open(path, "w").close()
            """
        )
    )
    path = tmp / "tree.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [supervisor]
            name = "rv"
            [[supervisor.children]]
            id = "m"
            server = "rvparts:Marker"
            args = ["{tmp / "up"}"]
            [control]
            tcp = "127.0.0.1:{port}"
            """
        ).lstrip()
    )
    return path


def test_no_control_does_not_serve_the_tree_files_tcp(tmp_path: Path) -> None:
    """--no-control means no control API at all: the file's tcp is not served and no
    token is asked for."""
    port = _free_port()
    tree = _tree(tmp_path, port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", str(tree), "--no-control", "--no-journal"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "up").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                _, err = proc.communicate()
                raise AssertionError(f"the tree did not start ({proc.returncode}):\n{err}")
            time.sleep(0.05)
        probe = socket.socket()
        try:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "the control API is on TCP"
        finally:
            probe.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_no_control_with_tcp_is_a_usage_error(tmp_path: Path) -> None:
    tree = _tree(tmp_path, _free_port())
    r = CliRunner().invoke(cli, ["run", str(tree), "--no-control", "--tcp", "127.0.0.1:1234"])
    assert r.exit_code == 2
    assert "--no-control" in r.output

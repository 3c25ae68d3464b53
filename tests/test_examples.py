"""The example trees check and run as the README says, from the repository root."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREES = sorted((ROOT / "examples" / "trees").glob("*.toml"))


@pytest.mark.parametrize("tree", TREES, ids=[p.name for p in TREES])
def test_every_example_tree_checks(tree: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trellis", "check", str(tree.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{tree.relative_to(ROOT)}: ok")


def test_readme_tree_is_the_example_file() -> None:
    """The README's "A tree in a file" block is examples/trees/pipeline.toml, and every
    examples/trees path its commands name exists."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A tree in a file", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert block == (ROOT / "examples/trees/pipeline.toml").read_text()
    for path in re.findall(r"examples/trees/[\w./]+", section):
        assert (ROOT / path.rstrip(".")).exists(), path


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_readme_run_command_runs() -> None:
    """`trellis run examples/trees/pipeline.toml` from the repository root: every
    child starts (the exchange answers HTTP), SIGTERM stops it with exit 0."""
    if not _port_free(8765):
        pytest.skip("port 8765 (the example's exchange) is in use on this machine")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trellis",
            "run",
            "examples/trees/pipeline.toml",
            "--no-journal",
            "--no-control",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while "start poller" not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line.strip())
        assert seen[:2] == ["start btc", "start poller"], seen
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0

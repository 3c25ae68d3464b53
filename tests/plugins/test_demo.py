"""The plugin host demo (examples/plugin_host), short: good plugins never fail while the
bad ones are contained, the host stays up, the journal verifies with its key."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("clang") is None or shutil.which("wasm-ld") is None,
    reason="the demo's C plugins need clang and lld (apt-get install clang lld)",
)


async def test_demo_short_run(tmp_path: Path) -> None:
    from examples.plugin_host.demo import render, run

    logging.getLogger("trellis").setLevel(logging.CRITICAL)
    try:
        report = await run(3.0, tmp_path, phase_seconds=0.75)
    finally:
        logging.getLogger("trellis").setLevel(logging.NOTSET)
    assert report["ok"], render(report)
    assert report["good_plugin_failures"] == {}
    assert report["statuses"] == {200: report["requests"]}
    assert report["requests"] > 50
    kinds = {k.split(":")[1] for k in report["bad_plugin_outcomes"]}
    assert kinds & {"timeout", "oom", "trap"}
    assert report["journal"]["verify_ok"]
    assert report["journal"]["verify_signed"]
    assert report["journal"]["host_availability"] == 1.0


def test_demo_removes_its_work_directory_and_helps_in_full(tmp_path: Path) -> None:
    """The demo's temporary work directory is gone after the run (--keep keeps it), and
    --help shows the whole description, not its first line."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {
        **{k: v for k, v in os.environ.items() if k != "TRELLIS_PLUGIN_CACHE"},
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}",
    }
    cmd = [sys.executable, "-m", "examples.plugin_host"]
    r = subprocess.run(
        [*cmd, "--seconds", "1"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "removed at exit" in r.stderr
    assert list(tmp_path.iterdir()) == []
    r = subprocess.run([*cmd, "--help"], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Exit 0 only if the good" in r.stdout  # the description's last sentence
    assert "--keep" in r.stdout

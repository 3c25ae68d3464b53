"""One rule for relative paths in a tree file: `command` (a path with a slash), `cwd`
and `logs.dir` are taken from the tree file's directory, wherever `trellis` runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trellis.config import load

TREE = """
[supervisor]
name = "paths"

[[supervisor.children]]
id = "svc"
command = ["./bin/svc.sh", "hello"]
cwd = "work"
logs = { dir = "logs" }
"""

SCRIPT = '#!/bin/sh\necho "$1 from $(pwd)" > out.txt\necho started\nexec sleep 60\n'


def _project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    (proj / "bin").mkdir(parents=True)
    (proj / "work").mkdir()
    script = proj / "bin" / "svc.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    (proj / "tree.toml").write_text(TREE)
    return proj


def test_relative_paths_are_from_the_tree_files_directory(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    old = os.getcwd()
    os.chdir(elsewhere)  # neither the tree file's dir nor the child's cwd
    try:
        tree = load("../proj/tree.toml")
    finally:
        os.chdir(old)
    [spec] = tree.children
    cfg = spec.args[0] if spec.args else None
    text = repr(spec) + repr(cfg)
    assert str(proj / "bin" / "svc.sh") in text
    assert str(proj / "work") in text
    assert str(proj / "logs") in text


def test_check_and_run_from_another_directory(tmp_path: Path) -> None:
    """`trellis check` and `trellis run` from elsewhere: the script is found next to the
    tree file (not in the child's cwd, not in the caller's), runs in work/, and its
    output goes to logs/ beside the tree file."""
    proj = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tree = str(proj / "tree.toml")
    rel = os.path.relpath(tree, elsewhere)
    done = subprocess.run(
        [sys.executable, "-m", "trellis", "check", rel],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", rel, "--no-journal", "--no-control"],
        cwd=elsewhere,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = proj / "work" / "out.txt"
        deadline = time.monotonic() + 60  # fail instead of hang, on a busy machine too
        while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, f"trellis run ended with {proc.returncode}"
            time.sleep(0.05)
        assert out.read_text().strip() == f"hello from {proj / 'work'}"
        logs = list((proj / "logs").iterdir())
        assert logs, "no log file beside the tree file"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not (elsewhere / "logs").exists()

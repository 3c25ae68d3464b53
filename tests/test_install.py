"""Installing Trellis as a user would: from a clean copy of the project into a fresh venv
outside the repository, then running the command it installs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import trellis

ROOT = Path(__file__).resolve().parents[1]


def test_distribution_name_is_not_the_taken_one() -> None:
    """`trellis` on PyPI is an unrelated project: the distribution has its own name while
    the import and the command stay `trellis`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "trellis-otp"
    assert project["scripts"] == {"trellis": "trellis.cli:main"}


def test_python_dash_m_trellis_is_the_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "trellis", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == f"trellis {trellis.__version__}"


def test_pip_install_into_a_fresh_venv_outside_the_repo(tmp_path: Path) -> None:
    # A copy of the tracked sources only, as a fresh clone has them (no .venv, no caches).
    src = tmp_path / "clone"
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        rel = Path(name.decode())
        if not (ROOT / rel).is_file():
            continue
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    if pip.returncode != 0 and "No matching distribution" in pip.stderr:
        pytest.skip(f"no package index reachable to fetch the build backend: {pip.stderr[-300:]}")
    assert pip.returncode == 0, pip.stderr
    out = subprocess.run(
        [str(venv / "bin" / "trellis"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"trellis {trellis.__version__}"
    shown = subprocess.run(
        [str(venv / "bin" / "pip"), "show", "trellis-otp"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Name: trellis-otp" in shown.stdout

"""The tree file: generated from Settings, valid for ``trellis check``, runnable with
``trellis run``, and settings that cannot work are refused by name."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from examples.market_data._common import group_symbols
from examples.market_data.tree import Settings, render_toml

import trellis.config

TREE = Path(__file__).resolve().parents[2] / "examples" / "market_data" / "tree.toml"
TRELLIS = [sys.executable, "-m", "trellis"]


def test_tree_toml_is_rendered_from_the_default_settings() -> None:
    """tree.toml is exactly render_toml(Settings()) (regenerate: --write-tree)."""
    assert TREE.read_text(encoding="utf-8") == render_toml(Settings())


def test_tree_shape() -> None:
    """infra (rest_for_one: exchange, store, gatekeeper), recovery, collectors and
    sentinel under a one_for_one root."""
    tree = trellis.config.load(TREE)
    assert tree.name == "market_data"
    assert tree.flags["strategy"] == "one_for_one"
    assert [c.id for c in tree.children] == ["infra", "recovery", "collectors", "sentinel"]
    outline = {n.id: n for n in tree.outline}
    assert outline["infra"].detail == "rest_for_one"
    assert [n.id for n in outline["infra"].children] == ["exchange", "store", "gatekeeper"]
    assert outline["infra"].children[0].kind == "command"
    assert [n.id for n in outline["collectors"].children] == [f"collector-{g}" for g in range(4)]


def test_trellis_check_passes() -> None:
    out = subprocess.run([*TRELLIS, "check", str(TREE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{TREE}: ok" in out.stdout


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_trellis_run_collects_ticks(tmp_path: Path) -> None:
    """``trellis run tree.toml`` starts the pipeline (kwargs from the file); after SIGTERM
    it exits 0 and the database in its working directory holds every symbol's ticks."""
    settings = Settings()
    if _busy(settings.feed_port) or _busy(settings.http_port):
        pytest.skip(f"ports {settings.feed_port}/{settings.http_port} of tree.toml are in use")
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(trellis.__file__).resolve().parents[1]),
        "TRELLIS_STATE_DIR": str(tmp_path),
        "XDG_RUNTIME_DIR": str(tmp_path),
    }
    proc = subprocess.Popen(
        # the tree alone: the journal, metrics and control API have their own tests
        [*TRELLIS, "run", str(TREE), "--no-journal", "--no-control", "--no-metrics"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    db = tmp_path / "market_data.db"
    try:
        deadline = time.monotonic() + 30
        symbols = 0
        while time.monotonic() < deadline and symbols < settings.symbols:
            time.sleep(0.2)
            if proc.poll() is not None:
                break
            if db.exists():
                with closing(sqlite3.connect(db)) as conn:
                    try:
                        symbols = conn.execute(
                            "SELECT COUNT(DISTINCT symbol) FROM ticks"
                        ).fetchone()[0]
                    except sqlite3.OperationalError:
                        symbols = 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            output += "\n(trellis run did not stop within 30 s of SIGTERM: killed)"
        Path(settings.state_file.replace("{ppid}", str(proc.pid))).unlink(missing_ok=True)
    assert proc.returncode == 0, output
    assert symbols == settings.symbols, output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gate_rate": 25.0}, "gate_rate (25.0) must be below the exchange's history_rate"),
        ({"gate_burst": 8.0}, "gate_burst (8.0) must be >= 1"),
        ({"groups": 0}, "groups must be in 1..symbols"),
        ({"symbols": 2, "groups": 3}, "groups must be in 1..symbols (2)"),
        ({"heartbeat": 3.0}, "heartbeat (3.0) must be shorter than silence"),
        ({"feed_port": 0}, "feed_port must be 1-65535"),
        ({"rate": float("nan")}, "rate must be finite"),
    ],
)
def test_settings_that_cannot_work_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="invalid market-data settings") as info:
        Settings(**change)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_groups_split_busy_and_quiet_symbols() -> None:
    groups = [group_symbols(10, 3, g) for g in range(3)]
    assert groups == [["S00", "S03", "S06", "S09"], ["S01", "S04", "S07"], ["S02", "S05", "S08"]]
    with pytest.raises(ValueError, match=r"group must be in 0\.\.2, got 3"):
        group_symbols(10, 3, 3)

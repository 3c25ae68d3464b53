"""The report on a real run (`trellis run` with a journal, a child that flaps) agrees
with what the child itself saw, within half a percentage point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trellis.sre import read_records, report

FLAPPER = """
import asyncio, time

async def flap(log):
    with open(log, "a") as f:
        f.write(f"start {time.time()!r}\\n")
    await asyncio.sleep(0.25)
    with open(log, "a") as f:
        f.write(f"crash {time.time()!r}\\n")
    raise RuntimeError("flap")

async def steady():
    await asyncio.sleep(3600)
"""

TREE = """
[supervisor]
name = "flappy"
intensity = 1000
period = 1.0

[[supervisor.children]]
id = "steady"
worker = "flapper:steady"

[[supervisor.children]]
id = "flapper"
worker = "flapper:flap"
args = ["{log}"]
backoff = {{ min = 0.1, max = 0.1, factor = 1.0, jitter = 0.0 }}
slo = {{ objective = 0.99, window = "1h" }}
"""


def test_flapping_child_within_half_a_point(tmp_path: Path) -> None:
    log = tmp_path / "flap.log"
    (tmp_path / "flapper.py").write_text(textwrap.dedent(FLAPPER))
    (tmp_path / "tree.toml").write_text(TREE.format(log=log))
    url = f"sqlite:///{tmp_path}/j.db"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", "tree.toml", "--journal", url, "--no-control"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            crashes = log.read_text().count("crash") if log.exists() else 0
            if crashes >= 8:
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.1)
        else:
            pytest.fail("the flapper did not flap 8 times in 30 s")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()

    lines = [line.split() for line in log.read_text().splitlines()]
    starts = [float(t) for k, t in lines if k == "start"]
    crashes = [float(t) for k, t in lines if k == "crash"]
    since, until = starts[0], crashes[-1]
    up = sum(c - s for s, c in zip(starts, crashes, strict=False) if c <= until)
    truth = up / (until - since)
    assert 0.5 < truth < 0.9  # it really flapped

    from trellis.config import load
    from trellis.sre import tree_info

    doc = report(
        read_records(url),
        since=since,
        until=until,
        tree=tree_info(load(tmp_path / "tree.toml")),
    )
    ents = {(e["kind"], e["path"]): e for e in doc["entities"]}
    flapper = ents[("child", "flappy/flapper")]
    print(f"availability: report {flapper['availability']:.5f} truth {truth:.5f}")
    assert abs(flapper["availability"] * 100 - truth * 100) < 0.5, (flapper, truth)
    failures_in = sum(1 for c in crashes if c < until)
    assert flapper["failures"] == failures_in
    assert flapper["restarts"] == len([s for s in starts[1:] if s <= until])
    repairs = [s - c for c, s in zip(crashes, starts[1:], strict=False)]
    assert abs(flapper["mttr_seconds"] - sum(repairs) / len(repairs)) < 0.01
    assert flapper["slo"]["source"] == "tree"
    steady = ents[("child", "flappy/steady")]
    assert steady["availability"] == 1.0
    subtree = ents[("subtree", "flappy")]
    assert abs(subtree["availability"] - flapper["availability"]) < 1e-9


TWO = """
[supervisor]
name = "two"

[[supervisor.children]]
id = "w"
worker = "flapper:steady"
"""


def _run(tmp_path: Path, url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", "two.toml", "--journal", url, "--no-control"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_for(url: str, kind: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if sum(1 for r in read_records(url) if r["kind"] == kind) >= count:
                return
        except Exception:
            pass
        time.sleep(0.1)
    pytest.fail(f"no {count} {kind} records in 30 s")


def test_kill_9_between_runs_is_down(tmp_path: Path) -> None:
    """A tree killed with -9 and started again: the time from the killed run's last
    record to the next run's first is down; a clean stop ends the last run."""
    (tmp_path / "flapper.py").write_text(textwrap.dedent(FLAPPER))
    (tmp_path / "two.toml").write_text(TWO)
    url = f"sqlite:///{tmp_path}/j.db"
    first = _run(tmp_path, url)
    try:
        _wait_for(url, "supervisor.started", 1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the tree and its journal writer
        first.wait(timeout=30)
    time.sleep(0.5)
    second = _run(tmp_path, url)
    try:
        _wait_for(url, "supervisor.started", 2)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    records = read_records(url)
    kinds = [r["kind"] for r in records]
    assert "run.unclean_end" in kinds
    assert kinds[-1] == "run.stopped"
    doc = report(records)
    assert [r["end_how"] for r in doc["runs"]] == ["unclean", "clean"]
    from trellis.sre._timeline import parse_utc

    unclean = next(r for r in records if r["kind"] == "run.unclean_end")
    killed_at = parse_utc(unclean["data"]["last_utc"])
    i = records.index(unclean)
    # the next run's first record: its run.started, dated when its journal started
    back_at = next(parse_utc(r["utc"]) for r in records[i:] if r["kind"] == "run.started")
    w = {(e["kind"], e["path"]): e for e in doc["entities"]}[("child", "two/w")]
    assert w["down_seconds"] == pytest.approx(back_at - killed_at, abs=1e-6)
    assert w["failures"] == 1
    assert w["up_seconds"] > 0

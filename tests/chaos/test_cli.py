"""``trellis chaos``: the plan printed up front (dry run), input errors, and a short real
run of a tree file in a subprocess with its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from trellis.cli.chaos import chaos

ROOT = Path(__file__).resolve().parents[2]

TREE = textwrap.dedent(
    """\
    [supervisor]
    name = "root"
    intensity = 20
    period = 5.0

    [[supervisor.children]]
    id = "collectors"
    strategy = "one_for_one"
    intensity = 20

    [[supervisor.children.children]]
    id = "c1"
    server = "chaos_parts:Echo"

    [[supervisor.children.children]]
    id = "c2"
    server = "chaos_parts:Echo"

    [[supervisor.children.children]]
    id = "c3"
    server = "chaos_parts:Echo"

    [[supervisor.children]]
    id = "feed"
    command = ["{python}", "-c", "import time; time.sleep(60)"]
    shutdown = 1.0
    """
)

PARTS = textwrap.dedent(
    """\
    import trellis

    class Echo(trellis.Server):
        async def handle_call(self, request, caller):
            return request
    """
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "chaos_parts.py").write_text(PARTS)
    path = tmp_path / "tree.toml"
    path.write_text(TREE.replace("{python}", sys.executable))
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(chaos, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_dry_run_prints_the_seed_the_plan_and_its_targets(tree: Path) -> None:
    args = [str(tree), "--fault", "kill:root/collectors/*:every=1,percent=50", "--duration", "3.5"]
    code, out, err = invoke(*args, "--seed", "7", "--dry-run")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:5] == [
        "seed: 7",
        "chaos plan: seed 7, duration 3.5s, 3 faults",
        "  #1    +    1.000s  kill    root/collectors/* (50% of matches)",
        "  #2    +    2.000s  kill    root/collectors/* (50% of matches)",
        "  #3    +    3.000s  kill    root/collectors/* (50% of matches)",
    ]
    assert lines[5] == "targets if every child of root runs:"
    picks = [line.split(maxsplit=1)[1].split(", ") for line in lines[6:]]
    assert len(picks) == 3
    assert all(len(p) == 2 and all(t.startswith("root/collectors/c") for t in p) for p in picks)
    assert invoke(*args, "--seed", "7", "--dry-run")[1] == out  # reproducible from the seed
    assert invoke(*args, "--seed", "8", "--dry-run")[1] != out


def test_faults_from_the_tree_file_and_from_a_plan_file(tree: Path, tmp_path: Path) -> None:
    tree.write_text(
        tree.read_text()
        + '\n[[chaos]]\nfault = "hang"\ntarget = "root/collectors/c2"\nat = 1\nduration = 2\n'
    )
    code, out, _ = invoke(str(tree), "--seed", "1", "--dry-run")
    assert code == 0
    assert "hang    root/collectors/c2 for 2s" in out
    plan = tmp_path / "plan.toml"
    plan.write_text(
        textwrap.dedent(
            """\
            seed = 42
            duration = 10
            max_concurrent = 1

            [proxies.redis]
            listen = 0
            upstream = "127.0.0.1:6379"

            [[chaos]]
            fault = "outage"
            proxy = "redis"
            at = 5
            duration = 1
            """
        )
    )
    code, out, _ = invoke(str(tree), "--plan", str(plan), "--dry-run")
    assert code == 0
    assert out.splitlines()[:3] == [
        "seed: 42",
        "chaos plan: seed 42, duration 10s, 1 fault",
        "  #1    +    5.000s  outage  proxy redis for 1s",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fault", "kill:root/*:every=0"], "--fault[0].every: must be > 0"),
        (["--fault", "kill"], "--fault 'kill': expected FAULT:TARGET"),
        (["--fault", "hang:root/*:at=1"], "--fault[0].duration: required for hang"),
        (["--fault", "outage:redis:at=1,duration=1"], "--fault[0].proxy: no proxy named 'redis'"),
        (["--fault", "kill:root/*:at=1", "--max-concurrent", "0"], "max_concurrent: must be"),
        (["--fault", "kill:root/*:at=5", "--duration", "2"], "--fault[0].at: 5 is not before"),
    ],
)
def test_bad_faults_exit_2_naming_the_problem(tree: Path, args: list[str], message: str) -> None:
    code, out, err = invoke(str(tree), *args, "--dry-run")
    assert code == 2
    assert message in err
    assert out == ""


def test_tree_file_errors_and_missing_faults(tree: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[supervisor]\nintensity = -1\n")
    code, _, err = invoke(str(bad), "--fault", "kill:x:at=1")
    assert code == 2
    assert "supervisor.intensity" in err
    code, _, err = invoke(str(tree))
    assert code == 2
    assert "no faults" in err
    code, _, err = invoke(str(tree), "--fault", "kill:x:at=1", "--proxy", "redis=notaport")
    assert code == 2
    assert "--proxy" in err


def test_a_short_run_prints_actions_and_the_report(tree: Path, tmp_path: Path) -> None:
    """A real run in its own process: the plan up front, each action as it happens, the
    report at the end (and as JSON); exit 0 once the chaos is over and the tree stopped."""
    report_path = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    faults = [
        "kill:root/collectors/*:every=0.3,count=1",
        "hang:root/feed:at=0.2,duration=0.4",
        "raise:root/feed:at=0.8",
    ]
    argv = [sys.executable, "-c", "from trellis.cli.chaos import chaos; chaos()", str(tree)]
    for f in faults:
        argv += ["--fault", f]
    argv += ["--seed", "3", "--duration", "1.2", "--settle", "3", "--no-journal", "--no-control"]
    argv += ["--json", str(report_path)]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("seed: 3\nchaos plan: seed 3, duration 1.2s, 5 faults\n")
    assert "fault:hang root/feed ok (fault 1.1)" in out
    assert "heal:hang root/feed ok (fault 1.1)" in out
    assert "chaos report: seed 3" in out
    assert "time to recover: p50" in out
    report = json.loads(report_path.read_text())
    assert report["seed"] == 3
    faults = {f["id"]: f for f in report["faults"]}
    assert all(f["result"] == "ok" for f in faults.values())
    kills = [f for f in faults.values() if f["fault"] == "kill"]
    assert len(kills) == 3
    assert all(f["target"].startswith("root/collectors/c") for f in kills)
    assert all(f["exit_class"] == "killed" and f["recover"] is not None for f in kills)
    [crash] = [f for f in faults.values() if f["fault"] == "raise"]
    assert crash["exit_class"] == "crash"
    assert crash["os_pid"] is not None
    assert report["summary"]["injected"] == 5

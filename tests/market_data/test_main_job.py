"""The main job: the pipeline under a seeded chaos schedule (in-process and OS-process
faults) heals completely, the schedule and its targets follow from the seed, and the
command prints a report whose figures are the JSON report's."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from examples.market_data._common import ROOT
from examples.market_data.main_job import JobOptions, _parser, job_plan, run_job
from examples.market_data.pipeline import Pipeline
from rich.console import Console

from trellis import chaos
from trellis.journal import tail

from .conftest import RedisServer

REPO = Path(__file__).resolve().parents[2]
# small and quick: 6 symbols in 3 collectors, a short sentinel silence and watchdog
SMALL = {
    "symbols": 6,
    "groups": 3,
    "rate": 400.0,
    "silence": 0.8,
    "heartbeat": 0.1,
    "exchange_watchdog": 0.6,
}


def _predicted_targets(plan: chaos.Plan, tmp_path: Path) -> dict[int, list[str]]:
    """What each step of ``plan`` hits in the pipeline's tree (every node a server but
    the exchange; the specs match by path only), chosen from the seed alone."""
    p = Pipeline(symbols=SMALL["symbols"], groups=SMALL["groups"], workdir=tmp_path / "shape")
    paths = [path for role, path in p.paths.items() if role != "root"] + p.collector_paths
    nodes = [(path, "server") for path in paths]
    return {
        s.n: ["proxy:" + str(s.proxy)] if s.fault == "outage" else s.choose(nodes, root=ROOT)
        for s in plan.steps
    }


def _targets(faults: list[Any]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for f in faults:
        step, target = (f["step"], f["target"]) if isinstance(f, dict) else (f.step, f.target)
        out.setdefault(step, []).append(target)
    return out


async def test_pipeline_heals_under_seeded_chaos(tmp_path: Path) -> None:
    """Collectors killed, hung and crashed, the store and gatekeeper killed, the exchange
    SIGKILLed and SIGSTOPped: afterwards every symbol's seqs are all stored, no 429 came
    back, every gap is closed, and the journal verifies and holds an operator.action by
    chaos for each injected fault. The targets are the ones the seed picks."""
    opts = JobOptions(
        seconds=8, seed=21, workdir=str(tmp_path / "run"), live=False, status_every=60, **SMALL
    )
    out = io.StringIO()
    result = await run_job(opts, Console(file=out, width=140))
    text = out.getvalue()
    assert result.ok, f"{result.failures}\n{text}"
    assert result.chaos is not None
    assert result.integrity is not None
    integrity = result.integrity
    assert len(integrity.expected) == 6
    assert all(n > 0 for n in integrity.expected.values())
    assert integrity.missing == {}
    assert integrity.stored == integrity.expected
    assert integrity.rejected_429 == integrity.exchange_rejected_429 == 0
    assert integrity.gaps_opened == integrity.gaps_closed > 0

    injected = result.chaos.injected
    by_kind = {(f.fault, f.os_pid is not None) for f in injected}
    assert {("kill", True), ("hang", True)} <= by_kind  # the exchange: SIGKILL, SIGSTOP
    assert {("kill", False), ("hang", False), ("raise", False)} <= by_kind  # in-process
    hung = {f.target.rsplit("/", 1)[-1] for f in injected if f.exit_class == "hung"}
    assert "exchange" in hung  # its watchdog
    assert any(t.startswith("collector-") for t in hung)  # the sentinel
    assert result.report["sentinel_hung_kills"] >= 1

    url = result.report["journal"]["url"]
    assert result.report["journal"]["ok"]
    records = list(tail(url, since_seq=1))
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    chaos_faults = {
        (r["data"]["detail"]["fault"], r["data"]["action"], r["path"])
        for r in records
        if r["kind"] == "operator.action"
        and r["data"]["who"] == "chaos"
        and r["data"]["result"] == "ok"
    }
    assert {(f.id, f"fault:{f.fault}", f.target) for f in injected} <= chaos_faults
    exited = {r["path"] for r in records if r["kind"] == "child.exited"}
    assert {f.target for f in injected} <= exited  # each fault's DOWN is journaled too

    plan = job_plan(opts)
    assert result.chaos.plan == plan
    assert _targets(list(result.chaos.faults)) == _predicted_targets(plan, tmp_path)


async def test_redis_outage_under_chaos(tmp_path: Path, redis_server: RedisServer) -> None:
    """With Redis behind a ChaosProxy the plan cuts it while a collector hangs: the
    gatekeeper falls back (the hung collector's gap is fetched meanwhile), every episode
    ends and it uses Redis at the end; nothing is missing and no 429 came back."""
    opts = JobOptions(
        seconds=6,
        seed=23,
        redis=redis_server.url,
        max_concurrent=6,
        workdir=str(tmp_path / "run"),
        live=False,
        status_every=60,
        **SMALL,
    )
    out = io.StringIO()
    result = await run_job(opts, Console(file=out, width=140))
    assert result.ok, f"{result.failures}\n{out.getvalue()}"
    assert result.chaos is not None
    outages = [f for f in result.chaos.injected if f.fault == "outage"]
    assert [f.target for f in outages] == ["proxy:redis"]
    assert outages[0].healed is not None
    episodes = result.report["fallback"]["episodes"]
    assert episodes
    assert outages[0].at is not None
    assert episodes[0]["started"] >= outages[0].at
    # each ended: Redis was back, or (windows overlap in so short a run) the gatekeeper
    # was restarted with the store or the exchange, and the new one starts on Redis
    assert all(e["ended"] is not None for e in episodes)
    assert result.report["fallback"]["mode_at_end"] == "redis"
    kinds = result.report["journal"]["records_by_kind"]
    assert kinds.get("market_data.gatekeeper.fallback", 0) == len(episodes)
    assert "gatekeeper fallback episodes: " + str(len(episodes)) in out.getvalue()


def test_the_schedule_follows_from_the_seed(tmp_path: Path) -> None:
    """The same seed gives the same plan and the same targets in the pipeline; another
    seed gives other times and other picks."""
    opts = JobOptions(seconds=60, seed=5, redis="redis://127.0.0.1:6379/0", **SMALL)
    first, again, other = job_plan(opts), job_plan(opts), job_plan(opts, seed=6)
    assert first == again
    assert first.describe() == again.describe()
    assert _predicted_targets(first, tmp_path) == _predicted_targets(again, tmp_path)
    assert [s.fault for s in first.steps] == [s.fault for s in other.steps]
    assert [s.offset for s in first.steps] != [s.offset for s in other.steps]
    assert _predicted_targets(first, tmp_path) != _predicted_targets(other, tmp_path)
    assert "outage" in {s.fault for s in first.steps}


def _figure(pattern: str, text: str) -> tuple[str, ...]:
    m = re.search(pattern, text)
    assert m is not None, f"{pattern!r} not in the output:\n{text}"
    return m.groups()


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}s"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def test_every_option_of_the_main_job_has_help() -> None:
    """``scripts/main-job --help`` documents every option it takes."""
    for action in _parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"


def test_main_job_command(tmp_path: Path) -> None:
    """``python -m examples.market_data chaos`` prints the seed and the plan first, then
    status lines, then the report; it exits 0, and every figure it prints is the JSON
    report's. Its faults hit the targets the seed picks. Its temporary work directory is
    gone afterwards."""
    report_path = tmp_path / "report.json"
    argv = [sys.executable, "-m", "examples.market_data", "chaos", "--seconds", "8"]
    argv += ["--seed", "22", "--json", str(report_path)]
    argv += ["--status-every", "2"]
    for key, value in SMALL.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=150, env=env)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert not list(temp.glob("market-data-chaos-*")), "the temporary work directory was kept"
    report = json.loads(report_path.read_text("utf-8"))
    plan = job_plan(JobOptions(seconds=8, seed=22, **SMALL))

    head, _, rest = out.partition("chaos report")
    assert head.startswith("seed 22 ")
    assert plan.describe() in head  # the whole plan, before anything ran
    assert re.search(r"^\[\s*\d+\.\ds\] faults \d+/\d+ ", head, re.M)  # status, not a TTY
    assert report["ok"] is True
    assert report["failures"] == []
    assert _targets(report["chaos"]["faults"]) == _predicted_targets(plan, tmp_path)

    summary = report["chaos"]["summary"]
    assert _figure(r"faults: (\d+) injected, (\d+) skipped", rest) == (
        str(summary["injected"]),
        str(summary["skipped"]),
    )
    ticks = report["ticks"]
    assert ticks["missing"] == 0
    assert ticks["expected"] == ticks["stored"] > 0
    assert _figure(r"ticks expected (\d+), stored (\d+), missing (\d+) \((\d+) symbols", rest) == (
        str(ticks["expected"]),
        str(ticks["stored"]),
        "0",
        "6",
    )
    for row in ticks["per_symbol"]:  # 6 symbols: every row is printed
        line = rf"^{row['symbol']}\s+{row['expected']}\s+{row['stored']}\s+{row['missing']}$"
        assert re.search(line, rest, re.M), line
    gaps = report["gaps"]
    assert gaps["opened"] == gaps["closed"] > 0
    assert _figure(r"gaps opened (\d+), closed (\d+)", rest) == (
        str(gaps["opened"]),
        str(gaps["closed"]),
    )
    recover = report["recover"]
    assert _figure(r"time to recover: p50 (\S+), p95 (\S+) \((\d+) faults", rest) == (
        _secs(recover["p50"]),
        _secs(recover["p95"]),
        str(recover["recovered"]),
    )
    delay = report["backfill_start_delay"]
    assert _figure(r"backfill start delay after UP: p50 (.+?), max (.+?) over (\d+)", rest) == (
        _ms(delay["p50"]),
        _ms(delay["max"]),
        str(delay["outages"]),
    )
    rate = report["rate_limit"]
    assert rate["rejected_429"] == rate["exchange_rejected_429"] == 0
    assert _figure(r"429s received: (\d+) \(history requests (\d+)", rest) == (
        "0",
        str(rate["history_requests"]),
    )
    journal = report["journal"]
    assert journal["ok"]
    assert journal["records"] > 0
    assert not journal["injected_not_journaled"]
    assert _figure(r"journal verify: (\w+), (\d+) records", rest) == ("OK", str(journal["records"]))
    assert journal["chaos_faults"] >= summary["injected"]
    assert journal["written"] == journal["records"]  # every record written is intact
    assert _figure(r"journal writer: (\d+) records written, (\d+) dropped", rest) == (
        str(journal["written"]),
        "0",
    )
    assert "RESULT: OK" in rest

"""The engine: the schedule kept to the clock, seeded target choice, percentages, the cap,
operator actions, the report against telemetry, health and integrity checks, and the
ways to run it (context manager, background, ``trellis.run`` extension)."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

import trellis
from trellis import Supervisor
from trellis.chaos import Chaos, ChaosSpecError, Plan, Report, percentile, start
from trellis.testing import VirtualClock, capture_telemetry


class Echo(trellis.Server):
    async def handle_call(self, request: Any, caller: trellis.Caller) -> Any:
        return request


def servers(n: int, prefix: str = "c", **kw: Any) -> list[Any]:
    return [Echo.child_spec(id=f"{prefix}{i:02d}", **kw) for i in range(n)]


async def drive(
    clock: VirtualClock, sup: Any, plan: Plan, until: float, **options: Any
) -> tuple[Report, list[dict[str, Any]]]:
    """Run ``plan`` on the virtual clock up to ``until``; the report and the telemetry."""
    options.setdefault("settle", 1.0)
    with capture_telemetry() as cap:
        async with Chaos(sup, plan, **options) as engine:
            task = asyncio.ensure_future(engine.run())
            await clock.advance(until)
            assert task.done(), "the run did not end"
            report = task.result()
    return report, cap.events


def actions(events: list[dict[str, Any]], prefix: str = "fault:") -> list[dict[str, Any]]:
    return [
        e for e in events if e["event"] == "operator.action" and str(e["action"]).startswith(prefix)
    ]


@pytest.fixture
async def collectors(clock: VirtualClock) -> AsyncIterator[Any]:
    sup = await Supervisor.start_link(
        [Supervisor.child_spec(servers(10), id="collectors", intensity=100)], name="root"
    )
    yield sup
    if sup.alive:
        await sup.stop()


async def test_faults_happen_at_their_planned_offsets(clock: VirtualClock, collectors: Any) -> None:
    plan = Plan.from_spec(
        {"fault": "kill", "target": "root/collectors/*", "every": 2, "jitter": 0.5, "count": 1},
        seed=21,
        duration=10,
    )
    report, events = await drive(clock, collectors, plan, 12)
    t0 = 0.0
    assert [e["time"] - t0 for e in actions(events)] == [s.offset for s in plan.steps]
    assert [f.at for f in report.faults] == [s.offset for s in plan.steps]
    assert all(f.result == "ok" for f in report.faults)


async def test_same_seed_same_tree_same_targets(clock: VirtualClock) -> None:
    """Two runs of one plan against two trees of the same shape hit the same paths; another
    seed hits others."""
    spec = {"fault": "kill", "target": "root/collectors/*", "every": 1, "count": 1}

    async def targets(seed: int) -> list[tuple[str, str]]:
        sup = await Supervisor.start_link(
            [Supervisor.child_spec(servers(10), id="collectors", intensity=100)], name="root"
        )
        plan = Plan.from_spec(spec, seed=seed, duration=10)
        start_at = clock.now()
        report, _ = await drive(clock, sup, plan, 12)
        assert clock.now() == start_at + 12
        await sup.stop()
        return [(f.id, f.target) for f in report.faults]

    first = await targets(5)
    assert len(first) == 9
    assert len({t for _, t in first}) > 1
    assert await targets(5) == first
    assert await targets(6) != first


async def test_percentage_and_kind_of_the_matches(clock: VirtualClock) -> None:
    """percent picks ceil(p% of the matches) of the right kind, by the seeded RNG."""

    async def loop_forever() -> None:
        while True:
            await trellis.sleep(1.0)

    children = [*servers(10), *(trellis.worker(f"w{i}", loop_forever) for i in range(5))]
    sup = await Supervisor.start_link(children, name="root", intensity=100)
    plan = Plan.from_spec(
        {"fault": "kill", "target": "root/*", "kind": "server", "at": 1, "percent": 30},
        seed=2,
        duration=2,
    )
    report, _ = await drive(clock, sup, plan, 4)
    hit = [f.target for f in report.faults]
    assert len(hit) == 3
    assert hit == sorted(hit)
    assert all(t.startswith("root/c") for t in hit)
    assert hit == plan.steps[0].choose(
        [(f"root/c{i:02d}", "server") for i in range(10)], root="root"
    )
    await sup.stop()


async def test_cap_on_concurrent_faults(clock: VirtualClock, collectors: Any) -> None:
    """Over max_concurrent open faults, a step is skipped; once a fault settles (healed,
    or its target recovered), the next goes ahead."""
    plan = Plan.from_spec(
        [
            {"fault": "hang", "target": "root/collectors/c00", "at": 1, "duration": 3},
            {"fault": "hang", "target": "root/collectors/c01", "at": 2, "duration": 3},
            {"fault": "kill", "target": "root/collectors/c02", "at": 3},
            {"fault": "hang", "target": "root/collectors/c03", "at": 5, "duration": 1},
            {"fault": "kill", "target": "root/collectors/c04", "at": 7},
            {"fault": "kill", "target": "root/collectors/c05", "at": 7.5},
        ],
        seed=1,
        duration=10,
    )
    report, events = await drive(clock, collectors, plan, 12, max_concurrent=1)
    results = [(f.target.rsplit("/", 1)[1], f.result) for f in report.faults]
    assert results == [
        ("c00", "ok"),
        ("c01", "skipped: cap: 1 faults open (max_concurrent=1)"),
        ("c02", "skipped: cap: 1 faults open (max_concurrent=1)"),
        ("c03", "ok"),
        ("c04", "ok"),  # a kill settles as soon as the child is back up
        ("c05", "ok"),
    ]
    assert len(actions(events)) == 4
    # never more than one open: each fault settled before the next was injected
    done = [f for f in report.faults if f.result == "ok"]
    for a, b in itertools.pairwise(done):
        assert a.at is not None
        assert b.at is not None
        assert a.at + (a.healed or a.recover or 0.0) <= b.at


async def test_operator_actions_carry_who_what_and_the_seed(
    clock: VirtualClock, collectors: Any
) -> None:
    plan = Plan.from_spec(
        [
            {"fault": "kill", "target": "root/collectors/c01", "at": 1},
            {
                "fault": "slow",
                "target": "root/collectors/c02",
                "at": 2,
                "duration": 1,
                "delay": 0.1,
            },
        ],
        seed=77,
        duration=5,
    )
    _, events = await drive(clock, collectors, plan, 7)
    got = [
        (e["time"], e["who"], e["action"], e["target"], e["source"], e["result"], e["detail"])
        for e in actions(events, "")
    ]
    assert got == [
        (1.0, "chaos", "fault:kill", "root/collectors/c01", "chaos", "ok",
         {"seed": 77, "fault": "1.1", "step": 1}),
        (2.0, "chaos", "fault:slow", "root/collectors/c02", "chaos", "ok",
         {"seed": 77, "fault": "2.1", "step": 2, "duration": 1.0, "delay": 0.1}),
        (3.0, "chaos", "heal:slow", "root/collectors/c02", "chaos", "ok",
         {"seed": 77, "fault": "2.1", "step": 2}),
    ]  # fmt: skip


async def test_detect_and_recover_match_the_telemetry(clock: VirtualClock) -> None:
    """detect = child.exited - injection; recover = the restart (delayed by a backoff)."""
    sup = await Supervisor.start_link(
        servers(2, backoff=trellis.Backoff(min=0.75, max=0.75)), name="root"
    )
    plan = Plan.from_spec(
        [
            {"fault": "kill", "target": "root/c00", "at": 1},
            {"fault": "raise", "target": "root/c01", "at": 2},
        ],
        seed=3,
        duration=5,
    )
    report, events = await drive(clock, sup, plan, 7)
    for f in report.faults:
        path = f.target
        cid = path.rsplit("/", 1)[1]
        injected = next(e["time"] for e in actions(events) if e["target"] == path)
        exited = next(e for e in events if e["event"] == "child.exited" and e["child_id"] == cid)
        restarted = next(
            e for e in events if e["event"] == "child.restarted" and e["child_id"] == cid
        )
        assert f.detect == exited["time"] - injected
        assert f.recover == restarted["time"] - injected == 0.75
        assert f.restarts == 1
    assert report.summary()["recover_p50"] == 0.75
    await sup.stop()


async def test_detect_and_recover_of_an_os_process_match_the_telemetry() -> None:
    """The same in real time, against an OS process (detect and recover are > 0)."""
    sup = await Supervisor.start_link(
        [trellis.Command([sys.executable, "-c", "import time; time.sleep(60)"], id="p")],
        name="root",
    )
    plan = Plan.from_spec({"fault": "kill", "target": "root/p", "at": 0.05}, seed=3, duration=0.3)
    with capture_telemetry() as cap:
        async with Chaos(sup, plan, settle=5) as engine:
            report = await engine.run()
    [f] = report.faults
    injected = actions(cap.events)[0]["time"]
    exited = cap.named("child.exited")[0]["time"]
    restarted = cap.named("child.restarted")[0]["time"]
    assert f.detect == exited - injected
    assert f.recover == restarted - injected
    assert 0 < f.detect <= f.recover
    await sup.stop()


async def test_recovery_waits_for_the_health_check(clock: VirtualClock, collectors: Any) -> None:
    """With healthy(), a fault recovers when the check passes after the restart (or after
    the heal, for a fault that brought nothing down)."""
    up = {"ok": True}
    checks: list[float] = []

    async def healthy() -> bool:
        checks.append(clock.now())
        return up["ok"]

    plan = Plan.from_spec(
        [
            {"fault": "kill", "target": "root/collectors/c01", "at": 1},
            {"fault": "hang", "target": "root/collectors/c02", "at": 3, "duration": 1},
        ],
        seed=1,
        duration=6,
    )
    async with Chaos(collectors, plan, healthy=healthy, health_interval=0.25, settle=2) as engine:
        task = asyncio.ensure_future(engine.run())
        await clock.advance(0.5)
        up["ok"] = False  # unhealthy from before the kill (at 1) until 2.4
        await clock.advance(1.9)
        up["ok"] = True
        await clock.advance(7.0)
        report = task.result()
    kill, hang = report.faults
    assert kill.detect == 0.0
    assert kill.recover == 1.5  # checks every 0.25 s from the restart: the one at 2.5
    assert hang.detect is None
    assert hang.healed == 1.0
    assert hang.recover == 1.0  # healthy at once after the heal
    assert checks  # it really was polled


async def test_health_check_may_call_servers_of_the_tree(
    clock: VirtualClock, collectors: Any
) -> None:
    """The health check runs as no Trellis process (not as the supervisor whose event
    started it), so it can `call` any server of the tree, the supervisor included."""
    calls: list[int] = []
    [(_, inner, _)] = await collectors.which_children()  # root/collectors emits the events

    async def healthy() -> bool:
        calls.append(len(await inner.which_children()))
        return True

    plan = Plan.from_spec(
        {"fault": "kill", "target": "root/collectors/c01", "at": 1}, seed=1, duration=3
    )
    async with Chaos(collectors, plan, healthy=healthy, health_interval=0.25, settle=2) as engine:
        task = asyncio.ensure_future(engine.run())
        await clock.advance(6.0)
        report = task.result()
    [kill] = report.faults
    assert kill.recover == 0.0  # healthy at the first check after the restart
    assert calls
    assert set(calls) == {10}


async def test_integrity_slot(clock: VirtualClock, collectors: Any) -> None:
    plan = Plan.from_spec(
        {"fault": "kill", "target": "root/collectors/c01", "at": 1}, seed=1, duration=2
    )

    async def check() -> dict[str, int]:
        return {"missing_ticks": 0, "symbols": 50}

    report, _ = await drive(clock, collectors, plan, 4, integrity=check)
    assert report.integrity == {"missing_ticks": 0, "symbols": 50}
    assert json.loads(report.to_json())["integrity"] == {"missing_ticks": 0, "symbols": 50}
    assert "integrity: missing_ticks=0, symbols=50" in str(report)

    def broken() -> dict[str, int]:
        raise RuntimeError("store unreachable")

    report, _ = await drive(clock, collectors, plan, 4, integrity=broken)
    assert report.integrity == {"error": "RuntimeError: store unreachable"}


async def test_escalation_is_counted_and_recovery_waits_for_the_restarted_supervisor(
    clock: VirtualClock,
) -> None:
    inner = Supervisor.child_spec(servers(2), id="inner", intensity=0)
    sup = await Supervisor.start_link([inner], name="root", intensity=5)
    plan = Plan.from_spec(
        {"fault": "kill", "target": "root/inner/c00", "at": 1}, seed=1, duration=2
    )
    report, events = await drive(clock, sup, plan, 4)
    [f] = report.faults
    assert f.escalations == 1
    gave_up = next(e for e in events if e["event"] == "supervisor.gave_up")
    assert gave_up["supervisor"] == "root/inner"
    restarted = [e for e in events if e["event"] == "child.restarted"]
    assert [e["child_id"] for e in restarted] == ["inner"]
    assert f.restarts == 1
    assert f.recover == restarted[0]["time"] - 1.0
    assert report.summary()["escalations"] == 1
    await sup.stop()


async def test_skips_are_reported_and_not_journaled(clock: VirtualClock) -> None:
    sup = await Supervisor.start_link(
        [Echo.child_spec(id="t", restart="temporary"), Echo.child_spec(id="keep")], name="root"
    )
    plan = Plan.from_spec(
        [
            {"fault": "kill", "target": "root/nothing*", "at": 1},
            {"fault": "exit", "target": "root/keep", "at": 2},
        ],
        seed=1,
        duration=3,
    )
    report, events = await drive(clock, sup, plan, 5)
    assert [f.result for f in report.faults] == ["skipped: no target matched", "ok"]
    assert len(actions(events)) == 1
    assert report.summary()["skipped"] == 1
    await sup.stop()


async def test_report_summary_table_and_json(clock: VirtualClock, collectors: Any) -> None:
    plan = Plan.from_spec(
        {"fault": "kill", "target": "root/collectors/*", "every": 1, "count": 2},
        seed=4,
        duration=5,
    )
    report, _ = await drive(clock, collectors, plan, 7)
    s = report.summary()
    assert (s["planned_steps"], s["injected"], s["detected"], s["recovered"]) == (4, 8, 8, 8)
    assert s["restarts"] == 8
    data = json.loads(report.to_json())
    assert data["seed"] == 4
    assert len(data["faults"]) == 8
    assert data["summary"]["detect_p95"] == 0.0
    assert data["faults"][0]["exit_class"] == "killed"
    text = str(report)
    assert "chaos report: seed 4" in text
    assert "time to recover: p50 0.000s" in text
    assert "4.2" in text


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert percentile([float(i) for i in range(101)], 95) == 95.0


async def test_start_in_the_background_and_stop_early(clock: VirtualClock, collectors: Any) -> None:
    """stop() ends a run at once: every held fault is healed, the report says so."""
    c01 = (await (await collectors.which_child("collectors")).pid.which_child("c01")).pid
    plan = Plan.from_spec(
        {"fault": "hang", "target": "root/collectors/c01", "at": 1, "duration": 100},
        seed=1,
        duration=200,
    )
    engine = await start(collectors, plan)
    await clock.advance(2)
    pending = asyncio.ensure_future(trellis.call(c01, "x", timeout=None))
    await clock.settle()
    assert not pending.done()
    await engine.stop()
    await clock.settle()
    assert pending.result() == "x"
    report = engine.report()
    assert report.faults[0].healed == 1.0
    assert report.notes == ("stopped early, 2.000s into the run",)
    assert await engine.wait() == report


async def test_as_an_extension_of_trellis_run() -> None:
    """Passed to run_async, it starts with the tree and stops the tree when it is done."""
    plan = Plan.from_spec(
        {"fault": "kill", "target": "root/*", "every": 0.1, "count": 1}, seed=8, duration=0.35
    )
    engine = Chaos(None, plan, settle=2)
    spec = Supervisor.child_spec(servers(3), id="root", name="root", intensity=100)
    code = await asyncio.wait_for(trellis.run_async(spec, extensions=[engine]), 30)
    assert code == 0
    report = engine.report()
    assert [f.result for f in report.faults] == ["ok", "ok", "ok"]
    assert all(f.recover is not None for f in report.faults)


async def test_bad_engine_options() -> None:
    plan = Plan.from_spec({"fault": "kill", "target": "x", "at": 0}, seed=1, duration=1)
    with pytest.raises(ChaosSpecError, match="max_concurrent: must be an int >= 1, got 0"):
        Chaos(None, plan, max_concurrent=0)
    with pytest.raises(ChaosSpecError, match="settle: must be seconds >= 0"):
        Chaos(None, plan, settle=-1)
    with pytest.raises(RuntimeError, match="no root"):
        await Chaos(None, plan).run()


def test_chaos_is_off_unless_imported() -> None:
    """Importing trellis (and running a tree) loads no chaos code."""
    code = (
        "import sys, asyncio, trellis\n"
        "async def main():\n"
        "    sup = await trellis.Supervisor.start_link([])\n"
        "    await sup.stop()\n"
        "asyncio.run(main())\n"
        "print('trellis.chaos' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

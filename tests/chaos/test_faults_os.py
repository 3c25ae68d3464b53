"""Each fault against real OS-process children (``trellis.Command``), in real time: the
signal's effect (seen in /proc and in the exit reason) and the heal."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import trellis
from trellis import Supervisor
from trellis.chaos import Chaos, Plan, Report
from trellis.testing import capture_telemetry

# Exits 0 on SIGTERM (a program that handles the stop request), else sleeps in short naps.
POLITE = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
    "while True: time.sleep(0.02)\n"
)
# Keeps the default SIGTERM action: dies of it.
PLAIN = "import time\nwhile True: time.sleep(0.02)\n"
MARK = f"trellis-chaos-test-{os.getpid()}"  # this session only: never touch others'


def state(os_pid: int) -> str | None:
    """The /proc state letter (R, S, T, Z, ...) of a process, or None if there is none."""
    try:
        data = Path(f"/proc/{os_pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()[0]


def argv(code: str) -> list[str]:
    return [sys.executable, "-c", code, MARK]


def ours() -> set[int]:
    """Live processes started by these tests (marked on their command line)."""
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if MARK.encode() in cmdline and state(int(entry.name)) not in (None, "Z", "X"):
                found.add(int(entry.name))
    return found


@pytest.fixture(autouse=True)
async def _no_os_leaks() -> AsyncIterator[None]:
    before = ours()
    yield
    left: set[int] = set()
    for _ in range(150):
        left = ours() - before
        if not left:
            return
        await asyncio.sleep(0.02)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    pytest.fail(f"test left OS processes behind: {left}")


@pytest.fixture
async def sup() -> AsyncIterator[Any]:
    s = await Supervisor.start_link(
        [
            trellis.Command(argv(POLITE), id="polite", shutdown=1.0),
            trellis.Command(argv(PLAIN), id="plain", shutdown=1.0),
        ],
        name="root",
        intensity=10,
    )
    yield s
    if s.alive:
        await s.stop()


async def os_pid(sup: Any, cid: str) -> int:
    pid = (await sup.which_child(cid)).pid
    assert isinstance(pid, trellis.CommandPid)
    assert pid.os_pid is not None
    return pid.os_pid


async def run(sup: Any, *specs: dict[str, Any], duration: float = 1.0) -> Report:
    plan = Plan.from_spec(list(specs), seed=1, duration=duration)
    async with Chaos(sup, plan, settle=3.0, recover_timeout=3.0) as engine:
        return await engine.run()


async def test_kill_sigkills_the_group(sup: Any) -> None:
    before = await os_pid(sup, "plain")
    with capture_telemetry(["child.exited"]) as cap:
        report = await run(sup, {"fault": "kill", "target": "root/plain", "at": 0.1})
    assert cap.named("child.exited")[0]["reason"] == trellis.Signaled("SIGKILL")
    [f] = report.faults
    assert (f.result, f.os_pid, f.exit_class) == ("ok", before, "killed")
    assert f.detect is not None
    assert f.recover is not None
    assert f.recover >= f.detect
    assert await os_pid(sup, "plain") != before


async def test_raise_is_an_abnormal_end_by_sigabrt(sup: Any) -> None:
    with capture_telemetry(["child.exited"]) as cap:
        report = await run(sup, {"fault": "raise", "target": "root/polite", "at": 0.1})
    assert cap.named("child.exited")[0]["reason"] == trellis.Signaled("SIGABRT")
    assert report.faults[0].exit_class == "crash"


async def test_exit_sends_sigterm_and_reports_what_the_program_did(sup: Any) -> None:
    """exit on an OS process is SIGTERM: a program that handles it ends NORMAL, one that
    does not dies of it (abnormal); the report says which."""
    with capture_telemetry(["child.exited"]) as cap:
        report = await run(
            sup,
            {"fault": "exit", "target": "root/polite", "at": 0.1},
            {"fault": "exit", "target": "root/plain", "at": 0.2},
        )
    reasons = {e["child_id"]: e["reason"] for e in cap.named("child.exited")}
    assert reasons == {"polite": trellis.NORMAL, "plain": trellis.Signaled("SIGTERM")}
    assert [f.exit_class for f in report.faults] == ["normal", "crash"]


async def test_hang_stops_the_process_and_the_heal_resumes_it(sup: Any) -> None:
    pid = await os_pid(sup, "plain")
    plan = Plan.from_spec(
        {"fault": "hang", "target": "root/plain", "at": 0.1, "duration": 0.6}, seed=1, duration=2
    )
    async with Chaos(sup, plan, settle=1.0) as engine:
        task = asyncio.ensure_future(engine.run())
        seen = await watch(pid, 1.2)
        report = await task
    assert "T" in seen  # stopped during the fault
    assert seen[-1] in "RS"  # running again after the heal
    assert state(pid) in ("R", "S")
    assert await os_pid(sup, "plain") == pid  # the same process: never restarted
    [f] = report.faults
    assert f.detect is None
    assert f.healed is not None


async def test_a_stopped_process_is_resumed_by_the_final_heal(sup: Any) -> None:
    """A hang longer than the run ends with the run: SIGCONT at the final heal."""
    pid = await os_pid(sup, "polite")
    report = await run(
        sup, {"fault": "hang", "target": "root/polite", "at": 0.1, "duration": 60}, duration=0.5
    )
    assert state(pid) in ("R", "S")
    assert report.faults[0].healed is not None
    assert 0.3 < report.faults[0].healed < 5


async def test_slow_is_a_stop_and_resume_duty_cycle(sup: Any) -> None:
    pid = await os_pid(sup, "plain")
    plan = Plan.from_spec(
        {"fault": "slow", "target": "root/plain", "at": 0.1, "duration": 1.0, "delay": 0.1},
        seed=1,
        duration=2,
    )
    async with Chaos(sup, plan, settle=1.0) as engine:
        task = asyncio.ensure_future(engine.run())
        seen = await watch(pid, 1.5)
        report = await task
    assert seen.count("T") >= 2  # stopped, resumed, stopped again: a cycle
    assert state(pid) in ("R", "S")
    assert report.faults[0].result == "ok"


async def watch(pid: int, seconds: float) -> str:
    """The process's state letters sampled every 10 ms (repeats collapsed)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    seen = ""
    while loop.time() < end:
        s = state(pid) or "-"
        if not seen or seen[-1] != s:
            seen += s
        await asyncio.sleep(0.01)
    return seen


async def test_a_tree_stopped_mid_hang_resumes_its_processes_first() -> None:
    """A signal (here request_stop) that stops the tree while a child is SIGSTOPped: the
    chaos run ends first (SIGCONT), so the child stops politely on SIGTERM instead of
    being killed after its whole shutdown budget."""
    plan = Plan.from_spec(
        {"fault": "hang", "target": "root/polite", "at": 0.2, "duration": 60},
        seed=1,
        duration=120,
    )
    engine = Chaos(None, plan, settle=0)
    held = asyncio.Event()

    class StopWhenHeld:
        async def start(self) -> None:
            pass

        async def tree_started(self, root: Any, request_stop: Any) -> None:
            async def later() -> None:
                await held.wait()
                request_stop()

            self.task = asyncio.ensure_future(later())

        async def stop(self) -> None:
            await self.task

    spec = Supervisor.child_spec(
        [trellis.Command(argv(POLITE), id="polite", shutdown=30.0)], id="root", name="root"
    )
    with capture_telemetry(["operator.action", "child.terminated"]) as cap:
        hid = trellis.telemetry.attach(
            lambda e: held.set() if e.get("action") == "fault:hang" else None,
            ["operator.action"],
        )
        try:
            code = await asyncio.wait_for(
                trellis.run_async(spec, extensions=[engine, StopWhenHeld()]), 20
            )
        finally:
            trellis.telemetry.detach(hid)
    assert code == 0
    actions = [e["action"] for e in cap.named("operator.action")]
    assert actions == ["fault:hang", "heal:hang"]
    [terminated] = cap.named("child.terminated")
    assert terminated["reason"] == trellis.SHUTDOWN

"""Property tests: supervisors against small pure-Python reference models.

1. Strategies (SPEC 26-28, 32-35): for random children (restart types), a random failing
   child and exit reason, which children are kept, restarted, stopped or removed, and the
   exact order of terminations and starts.
2. Intensity (SPEC 41, 43, 44): for random crash times on a virtual clock, the supervisor
   gives up exactly at the crash where a sliding-window model says so.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trellis
from _helpers import settle
from trellis import KILL, KILLED, NORMAL, SHUTDOWN, Shutdown, Supervisor
from trellis.testing import VirtualClock, use_clock

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class Child(trellis.Server):
    """A trapping child logging ("start", id) and ("terminate", id); a cast r makes it Stop(r)."""

    trap_exits = True

    async def init(self, log: list[tuple[str, str]], pids: dict[str, Any], name: str) -> None:
        self.log, self.name = log, name
        log.append(("start", name))
        pids[name] = self.pid

    async def handle_cast(self, msg: Any) -> Any:
        return trellis.Stop(msg)

    async def terminate(self, reason: Any) -> None:
        self.log.append(("terminate", self.name))


async def joined(pid: trellis.Pid, timeout: float = 5.0) -> Any:
    return await asyncio.wait_for(pid.join(), timeout)


# ---------------------------------------------------------------------------
# 1. Strategies
# ---------------------------------------------------------------------------

REASONS = {
    "normal": NORMAL,
    "shutdown": SHUTDOWN,
    "shutdown_detail": Shutdown("detail"),
    "killed": KILLED,
    "crash": None,  # a fresh exception per example
}
CLEAN = {"normal", "shutdown", "shutdown_detail"}


def model(
    strategy: str, types: list[str], failing: int, clean: bool, crash_terminates: bool
) -> tuple[dict[int, str], list[tuple[str, int]]]:
    """Reference model: outcome per child ("same", "restarted", "stopped", "removed") and the
    expected log after the crash (the failing child's own terminate first, when its exit
    runs terminate; then sibling terminations in reverse order; then starts in order)."""
    n = len(types)
    outcome = dict.fromkeys(range(n), "same")
    log: list[tuple[str, int]] = [("terminate", failing)] if crash_terminates else []
    kind = types[failing]
    if not (kind == "permanent" or (kind == "transient" and not clean)):
        outcome[failing] = "removed" if kind == "temporary" else "stopped"
        return outcome, log
    if strategy == "one_for_one":
        affected = [failing]
    elif strategy == "one_for_all":
        affected = list(range(n))
    else:
        affected = list(range(failing, n))
    for j in reversed(affected):
        if j != failing:
            log.append(("terminate", j))
    for j in affected:
        if j != failing and types[j] == "temporary":
            outcome[j] = "removed"
        else:
            outcome[j] = "restarted"
            log.append(("start", j))
    return outcome, log


@st.composite
def scenarios(draw: Any) -> tuple[str, list[str], int, str]:
    strategy = draw(st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"]))
    types = draw(
        st.lists(st.sampled_from(["permanent", "transient", "temporary"]), min_size=1, max_size=5)
    )
    failing = draw(st.integers(0, len(types) - 1))
    reason = draw(st.sampled_from(sorted(REASONS)))
    return strategy, types, failing, reason


def test_model_examples() -> None:
    """The reference model itself, on hand-checked cases (SPEC 27, 34, 35)."""
    out, log = model("rest_for_one", ["permanent"] * 3, 1, False, False)
    assert out == {0: "same", 1: "restarted", 2: "restarted"}
    assert log == [("terminate", 2), ("start", 1), ("start", 2)]
    out, log = model("one_for_all", ["permanent", "temporary", "transient"], 2, True, True)
    assert out == {0: "same", 1: "same", 2: "stopped"}
    assert log == [("terminate", 2)]
    out, log = model("one_for_all", ["permanent", "temporary", "transient"], 0, False, False)
    assert out == {0: "restarted", 1: "removed", 2: "restarted"}
    assert log == [("terminate", 2), ("terminate", 1), ("start", 0), ("start", 2)]


@SETTINGS
@given(scenario=scenarios())
async def test_strategy_matches_model(scenario: tuple[str, list[str], int, str]) -> None:
    """SPEC 26-28, 32-35: for any children, failing child, reason and strategy, the children
    kept, restarted, stopped (pid None) or removed, and the order of terminations (reverse
    start order) and starts (start order), match the reference model."""
    strategy, types, failing, reason_name = scenario
    reason = REASONS[reason_name] if reason_name != "crash" else RuntimeError("crash")
    log: list[tuple[str, str]] = []
    started: dict[str, Any] = {}
    names = [f"c{i}" for i in range(len(types))]
    specs = [
        Child.child_spec(log, started, name, id=name, restart=kind)
        for name, kind in zip(names, types, strict=True)
    ]
    sup = await Supervisor.start_link(specs, strategy=strategy, intensity=10, period=5.0)
    try:
        before = dict(started)
        log.clear()
        victim = before[names[failing]]
        if reason is KILLED:
            trellis.exit(victim, KILL)
        else:
            trellis.cast(victim, reason)
        assert await joined(victim) == reason
        await settle()
        after = {c.id: c.pid for c in await sup.which_children()}

        expected, expected_log = model(
            strategy, types, failing, reason_name in CLEAN, reason is not KILLED
        )
        observed: dict[int, str] = {}
        for i, name in enumerate(names):
            if name not in after:
                observed[i] = "removed"
            elif after[name] is None:
                observed[i] = "stopped"
            elif after[name] == before[name]:
                observed[i] = "same"
            else:
                observed[i] = "restarted"
        assert observed == expected
        assert log == [(kind, names[i]) for kind, i in expected_log]
        assert [c.id for c in await sup.which_children()] == [
            n for i, n in reversed(list(enumerate(names))) if expected[i] != "removed"
        ]
        for i, name in enumerate(names):
            assert before[name].alive == (expected[i] == "same")
        await settle()
        assert sup.alive
    finally:
        if sup.alive:
            await asyncio.wait_for(sup.stop(), 10)


# ---------------------------------------------------------------------------
# 2. Intensity window
# ---------------------------------------------------------------------------


def gives_up_at(gaps: list[float], intensity: int, period: float) -> int | None:
    """Index of the crash at which an OTP supervisor gives up, or None.

    Crash k happens at sum(gaps[:k+1]); each restart adds one timestamp; timestamps T with
    T < Now - period are dropped; more than `intensity` left means give up."""
    restarts: list[float] = []
    now = 0.0
    for k, gap in enumerate(gaps):
        now += gap
        restarts = [t for t in restarts if t >= now - period] + [now]
        if len(restarts) > intensity:
            return k
    return None


def test_window_model_examples() -> None:
    """The window model itself (SPEC 43, 44): inclusive boundary, intensity 0."""
    assert gives_up_at([0.0], 0, 5.0) == 0
    assert gives_up_at([0.0, 5.0], 1, 5.0) == 1
    assert gives_up_at([0.0, 5.5], 1, 5.0) is None
    assert gives_up_at([1.0, 2.5, 2.5, 0.5], 2, 5.0) == 2


@SETTINGS
@given(
    gaps=st.lists(
        st.sampled_from([0.0, 0.5, 1.0, 2.0, 2.5, 3.0, 5.0, 7.5]), min_size=1, max_size=8
    ),
    intensity=st.integers(0, 4),
    period=st.sampled_from([1.0, 2.5, 5.0, 10.0]),
)
async def test_intensity_matches_window_model(
    gaps: list[float], intensity: int, period: float
) -> None:
    """SPEC 41, 43, 44: crashing one child at random virtual times, the supervisor restarts
    it until the sliding-window model (inclusive boundary) says to give up, and then exits
    SHUTDOWN at exactly that crash."""
    expected = gives_up_at(gaps, intensity, period)
    clock = VirtualClock()
    with use_clock(clock):
        log: list[tuple[str, str]] = []
        started: dict[str, Any] = {}
        sup = await Supervisor.start_link(
            [Child.child_spec(log, started, "a", id="a")], intensity=intensity, period=period
        )
        try:
            for k, gap in enumerate(gaps):
                await clock.advance(gap)
                old = started["a"]
                trellis.exit(old, KILL)
                assert await joined(old) == KILLED
                if k == expected:
                    assert await joined(sup) == trellis.SHUTDOWN
                    break
                await settle()
                (info,) = await sup.which_children()
                assert info.pid is not None
                assert info.pid != old
                assert info.pid == started["a"]
            else:
                assert expected is None
                await settle()
                assert sup.alive
            assert log.count(("start", "a")) == 1 + (len(gaps) if expected is None else expected)
        finally:
            if sup.alive:
                await asyncio.wait_for(sup.stop(), 10)

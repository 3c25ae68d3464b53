"""Fault specs and plans: validation errors name the spec and key; one seed fixes the plan."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trellis.chaos import ChaosSpecError, Plan, parse_fault

SPECS: list[dict[str, Any]] = [
    {"fault": "kill", "target": "root/collectors/*", "every": 5, "jitter": 1, "percent": 50},
    {"fault": "hang", "target": "root/collectors/c1", "at": 10, "duration": 4},
    {"fault": "outage", "proxy": "redis", "poisson": 0.05, "duration": 3},
    {"fault": "slow", "kind": ["server", "command"], "poisson": 0.2, "duration": 2, "delay": 0.5},
]


def errors_of(spec: Any, duration: float = 60.0) -> list[tuple[str, str]]:
    with pytest.raises(ChaosSpecError) as info:
        Plan.from_spec(spec, seed=1, duration=duration)
    return info.value.errors


def test_same_seed_gives_the_same_plan() -> None:
    """The whole schedule (times, faults, targets, selection seeds) follows from the seed."""
    a = Plan.from_spec(SPECS, seed=7, duration=60)
    b = Plan.from_spec(SPECS, seed=7, duration=60)
    assert a == b
    assert a.describe() == b.describe()
    assert a.to_json() == b.to_json()
    assert len(a.steps) > 10


def test_another_seed_gives_another_plan() -> None:
    a = Plan.from_spec(SPECS, seed=7, duration=60)
    b = Plan.from_spec(SPECS, seed=8, duration=60)
    assert [s.offset for s in a.steps] != [s.offset for s in b.steps]
    assert [s.pick for s in a.steps] != [s.pick for s in b.steps]


def test_no_seed_draws_one_and_reports_it() -> None:
    plan = Plan.from_spec(SPECS, duration=60)
    assert isinstance(plan.seed, int)
    assert Plan.from_spec(SPECS, seed=plan.seed, duration=60) == plan
    assert f"seed {plan.seed}" in plan.describe()


def test_adding_a_spec_keeps_the_schedule_of_the_others() -> None:
    """Each spec draws from its own stream: appending one does not move the others."""
    a = Plan.from_spec(SPECS[:2], seed=3, duration=60)
    b = Plan.from_spec([*SPECS[:2], SPECS[2]], seed=3, duration=60)

    def key(plan: Plan) -> list[tuple[float, str, int, int]]:
        return [(s.offset, s.fault, s.spec, s.pick) for s in plan.steps if s.spec < 2]

    assert key(a) == key(b)
    assert len(b.steps) > len(a.steps)


def test_steps_are_sorted_and_numbered() -> None:
    plan = Plan.from_spec(SPECS, seed=11, duration=60)
    offsets = [s.offset for s in plan.steps]
    assert offsets == sorted(offsets)
    assert [s.n for s in plan.steps] == list(range(1, len(plan.steps) + 1))
    assert all(0 <= s.offset < 60 for s in plan.steps)


def test_once() -> None:
    plan = Plan.from_spec({"fault": "exit", "target": "root/a", "at": 2.5}, seed=1, duration=5)
    [step] = plan.steps
    assert (step.offset, step.fault, step.target) == (2.5, "exit", "root/a")


def test_every_with_jitter_stays_within_the_jitter_of_each_tick() -> None:
    spec = {"fault": "kill", "target": "root/*", "every": 2, "jitter": 0.5}
    plan = Plan.from_spec(spec, seed=5, duration=20)
    assert len(plan.steps) == 9  # nominal 2, 4, ..., 18
    for k, step in enumerate(plan.steps, 1):
        assert abs(step.offset - 2 * k) <= 0.5
    assert any(step.offset != 2 * k for k, step in enumerate(plan.steps, 1))


def test_every_without_jitter_start_and_until() -> None:
    spec = {"fault": "kill", "target": "root/*", "every": 1, "start": 0.5, "until": 3}
    plan = Plan.from_spec(spec, seed=5, duration=20)
    assert [s.offset for s in plan.steps] == [0.5, 1.5, 2.5]


def test_poisson_rate() -> None:
    """A Poisson schedule of rate r over T seconds has about r*T faults."""
    plan = Plan.from_spec({"fault": "kill", "target": "x", "poisson": 2.0}, seed=9, duration=500)
    assert 850 < len(plan.steps) < 1150
    gaps = [b.offset - a.offset for a, b in zip(plan.steps, plan.steps[1:], strict=False)]
    assert min(gaps) > 0


def test_choose_is_seeded_and_sorted() -> None:
    """percent/count pick from the matches sorted by path, by the step's seeded RNG."""
    nodes = [(f"root/c/{i:02d}", "server") for i in range(20)] + [("root/other", "worker")]
    spec = {"fault": "kill", "target": "root/c/*", "every": 1, "percent": 25}
    plan = Plan.from_spec(spec, seed=4, duration=10)
    picks = [s.choose(nodes, root="root") for s in plan.steps]
    assert all(len(p) == 5 and p == sorted(p) for p in picks)
    assert all(p2.startswith("root/c/") for p in picks for p2 in p)
    assert len({tuple(p) for p in picks}) > 1  # different steps, different picks
    again = Plan.from_spec(spec, seed=4, duration=10)
    assert [s.choose(reversed(nodes), root="root") for s in again.steps] == picks


def test_choose_by_kind_count_and_root_relative_glob() -> None:
    nodes = [
        ("root/a", "server"),
        ("root/b", "command"),
        ("root/c", "worker"),
        ("root/s", "supervisor"),
    ]
    [step] = Plan.from_spec({"fault": "kill", "kind": "server", "at": 0}, seed=1, duration=1).steps
    assert step.choose(nodes, root="root") == ["root/a"]
    [step] = Plan.from_spec(
        {"fault": "kill", "kind": ["server", "command"], "count": 5, "at": 0}, seed=1, duration=1
    ).steps
    assert step.choose(nodes, root="root") == ["root/a", "root/b"]
    [step] = Plan.from_spec({"fault": "kill", "target": "c", "at": 0}, seed=1, duration=1).steps
    assert step.choose(nodes, root="root") == ["root/c"]
    [step] = Plan.from_spec(
        {"fault": "kill", "target": "root/*", "percent": 1, "at": 0}, seed=1, duration=1
    ).steps
    assert len(step.choose(nodes, root="root")) == 1  # at least one when anything matches
    assert step.choose([], root="root") == []


@pytest.mark.parametrize(
    ("spec", "where", "message"),
    [
        ({"target": "x", "at": 1}, "chaos[0].fault", "required"),
        ({"fault": "melt", "target": "x", "at": 1}, "chaos[0].fault", "unknown fault 'melt'"),
        ({"fault": "kill", "at": 1}, "chaos[0].target", "required"),
        ({"fault": "kill", "target": "x"}, "chaos[0]", "give a schedule"),
        ({"fault": "kill", "target": "x", "at": 1, "every": 2}, "chaos[0].every", "only one"),
        ({"fault": "kill", "target": "x", "every": 0}, "chaos[0].every", "must be > 0"),
        ({"fault": "kill", "target": "x", "every": -1}, "chaos[0].every", "must be > 0"),
        ({"fault": "kill", "target": "x", "every": "5"}, "chaos[0].every", "must be a number"),
        ({"fault": "kill", "target": "x", "every": True}, "chaos[0].every", "must be a number"),
        ({"fault": "kill", "target": "x", "every": 2, "jitter": 2}, "chaos[0].jitter", "< every"),
        ({"fault": "kill", "target": "x", "at": 1, "jitter": 0.1}, "chaos[0].jitter", "only with"),
        ({"fault": "kill", "target": "x", "poisson": 0}, "chaos[0].poisson", "must be > 0"),
        ({"fault": "kill", "target": "x", "at": 60}, "chaos[0].at", "not before the end"),
        ({"fault": "kill", "target": "x", "at": -1}, "chaos[0].at", "must be >= 0"),
        ({"fault": "kill", "target": "x", "at": 1, "percent": 0}, "chaos[0].percent", "> 0"),
        ({"fault": "kill", "target": "x", "at": 1, "percent": 101}, "chaos[0].percent", "<= 100"),
        ({"fault": "kill", "target": "x", "at": 1, "count": 0}, "chaos[0].count", ">= 1"),
        (
            {"fault": "kill", "target": "x", "at": 1, "count": 1, "percent": 5},
            "chaos[0].count",
            "not both",
        ),
        ({"fault": "kill", "target": "x", "at": 1, "kind": "robot"}, "chaos[0].kind", "one of"),
        ({"fault": "kill", "target": "x", "at": 1, "duration": 3}, "chaos[0].duration", "instant"),
        ({"fault": "hang", "target": "x", "at": 1}, "chaos[0].duration", "required for hang"),
        ({"fault": "hang", "target": "x", "at": 1, "duration": 0}, "chaos[0].duration", "> 0"),
        ({"fault": "slow", "target": "x", "at": 1, "duration": 1}, "chaos[0].delay", "required"),
        (
            {"fault": "hang", "target": "x", "at": 1, "duration": 1, "delay": 1},
            "chaos[0].delay",
            "only slow",
        ),
        ({"fault": "outage", "at": 1, "duration": 1}, "chaos[0].proxy", "required"),
        (
            {"fault": "outage", "proxy": "r", "target": "x", "at": 1, "duration": 1},
            "chaos[0].target",
            "proxy, not tree nodes",
        ),
        ({"fault": "kill", "target": "x", "proxy": "r", "at": 1}, "chaos[0].proxy", "only an"),
        ({"fault": "kill", "target": "x", "at": 1, "colour": "red"}, "chaos[0].colour", "unknown"),
        ({"fault": "kill", "target": "", "at": 1}, "chaos[0].target", "path glob"),
        (
            {"fault": "kill", "target": "x", "every": 1, "until": 0.5, "start": 1},
            "chaos[0].until",
            "> start",
        ),
    ],
)
def test_bad_spec_names_index_and_key(spec: dict[str, Any], where: str, message: str) -> None:
    errors = errors_of(spec)
    assert any(w == where and message in m for w, m in errors), errors


def test_every_error_is_reported_at_once_with_its_index() -> None:
    specs = [
        {"fault": "kill", "target": "x", "every": 5},
        {"fault": "kill", "target": "x", "every": 5},
        {"fault": "kill", "target": "x", "every": 0},
        {"fault": "hang", "target": "x", "at": 1},
    ]
    with pytest.raises(ChaosSpecError) as info:
        Plan.from_spec(specs, seed=1, duration=60)
    assert str(info.value).splitlines() == [
        "chaos[2].every: must be > 0",
        "chaos[3].duration: required for hang (seconds until it is healed)",
    ]


def test_bad_plan_arguments() -> None:
    assert errors_of({"fault": "kill", "target": "x", "at": 0}, duration=0) == [
        ("duration", "must be > 0 and finite, got 0")
    ]
    with pytest.raises(ChaosSpecError, match="seed: must be an int"):
        Plan.from_spec([], seed="x", duration=1)  # type: ignore[arg-type]
    with pytest.raises(ChaosSpecError, match=r"chaos\[1\]: expected a table"):
        Plan.from_spec([{"fault": "kill", "target": "x", "at": 0}, 3], seed=1, duration=1)  # type: ignore[list-item]
    with pytest.raises(ChaosSpecError, match=r"--fault\[0\].every"):
        Plan.from_spec([{"fault": "kill", "target": "x", "every": 0}], duration=1, where="--fault")


def test_parse_fault() -> None:
    assert parse_fault("kill:root/workers/*:every=5,jitter=1.5,percent=50") == {
        "fault": "kill",
        "target": "root/workers/*",
        "every": 5,
        "jitter": 1.5,
        "percent": 50,
    }
    assert parse_fault("outage:redis:poisson=0.05:duration=3") == {
        "fault": "outage",
        "proxy": "redis",
        "poisson": 0.05,
        "duration": 3,
    }
    assert parse_fault("slow:root/*:at=1,kind=server|command,delay=0.2,duration=2")["kind"] == [
        "server",
        "command",
    ]
    assert parse_fault("exit:root/a") == {"fault": "exit", "target": "root/a"}
    for bad in ("kill", "kill:", ":x", "kill:x:every"):
        with pytest.raises(ChaosSpecError, match=repr(bad).replace("*", r"\*")):
            parse_fault(bad)


def test_describe_and_json() -> None:
    plan = Plan.from_spec(SPECS[1:3], seed=2, duration=60)
    lines = plan.describe().splitlines()
    assert lines[0] == f"chaos plan: seed 2, duration 60s, {len(plan.steps)} faults"
    assert any("hang    root/collectors/c1 for 4s" in line for line in lines)
    assert any("outage  proxy redis for 3s" in line for line in lines)
    data = json.loads(plan.to_json())
    assert data["seed"] == 2
    assert len(data["steps"]) == len(plan.steps)
    assert data["specs"][0]["target"] == "root/collectors/c1"

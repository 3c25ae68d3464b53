"""Supervisor lifecycle under stress: backoff that never overflows, and a tree that is
stopping never restarts a child nor starts one it had not started yet."""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import pytest

import trellis
from trellis.testing import VirtualClock, capture_telemetry


class Boom(Exception):
    """A crash reason."""


async def crash_at_once() -> None:
    await asyncio.sleep(0)
    raise Boom("crash")


async def wait_forever() -> None:
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------
# Backoff: the exponent is capped
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1024, 1025, 1100, 10**6, 10**30])
def test_backoff_delay_stays_at_max_for_huge_n(n: int) -> None:
    """Restart 1,025 of a 2x backoff used to raise OverflowError (2.0**1024): from the
    restart where the delay reaches max on, every restart waits max, forever."""
    b = trellis.Backoff(min=0.1, max=30.0, factor=2.0)
    assert b.delay(n) == 30.0
    jittered = trellis.Backoff(min=0.1, max=30.0, factor=2.0, jitter=0.5, seed=1)

    d = jittered.delay(n, random.Random(1))
    assert 15.0 <= d <= 45.0
    assert math.isfinite(d)


def test_backoff_delay_unchanged_below_the_cap() -> None:
    b = trellis.Backoff(min=1.0, max=5.0, factor=2.0)
    assert [b.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert trellis.Backoff(min=0.0, max=5.0).delay(10**6) == 0.0
    assert trellis.Backoff(min=3.0, max=3.0, factor=10.0).delay(10**6) == 3.0
    assert trellis.Backoff(min=2.0, max=9.0, factor=1.0).delay(10**6) == 2.0
    assert trellis.Backoff(min=1.0, max=1e300, factor=1e10).delay(10**6) == 1e300


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("backoff.min", {"min": math.nan}),
        ("backoff.max", {"max": math.inf}),
        ("backoff.max", {"max": math.nan}),
        ("backoff.factor", {"factor": math.inf}),
        ("backoff.jitter", {"jitter": math.nan}),
        ("backoff.reset_after", {"reset_after": math.inf}),
    ],
)
def test_backoff_rejects_non_finite(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(trellis.ChildSpecError) as err:
        trellis.Backoff(**kwargs)
    assert err.value.field == field


async def test_supervisor_keeps_retrying_at_max_after_1100_backoff_restarts(
    clock: VirtualClock,
) -> None:
    """1,100 backoff restarts of a child that crashes at once (8.5 h of a failing
    dependency with the README's backoff): the supervisor keeps retrying at max instead of
    crashing on an OverflowError at restart 1,025."""
    backoff = trellis.Backoff(min=0.001, max=2.0, factor=2.0)
    with capture_telemetry(["child.backoff", "supervisor.gave_up"]) as cap:
        sup = await trellis.Supervisor.start(
            [trellis.worker("flaky", wait_forever, backoff=backoff)], intensity=5, period=1.0
        )
        try:
            pid = (await sup.which_child("flaky")).pid
            trellis.exit(pid, Boom("first crash"))
            await clock.settle()
            n = 0
            while len(cap.named("child.backoff")) < 1100:
                n += 1
                assert n < 5000, "restarts stopped happening"
                live = (await sup.which_child("flaky")).pid
                if isinstance(live, trellis.Pid):
                    trellis.exit(live, Boom("crash"))
                await clock.advance(2.0)
            assert sup.alive
            delays = [e["delay"] for e in cap.named("child.backoff")]
            assert delays[-1] == 2.0
            assert delays[1099] == 2.0
            assert cap.named("supervisor.gave_up") == []
        finally:
            await sup.stop()

"""The DR drill demo: its RTO/RPO arithmetic on synthetic timelines, and a short node-kill
drill through the demo's own code path against the real service."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from examples.notify.demo import Options, measure_rpo, measure_rto, percentile, render, run
from examples.notify.harness import missing

SLO = 2.0


def steady(t0: float, t1: float, step: float = 0.1) -> list[float]:
    per_s = round(1 / step)
    return [t0 + i / per_s for i in range(round((t1 - t0) * per_s))]


def test_percentile_is_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 99) == 99.0
    assert percentile(values, 50) == 50.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, math.inf], 99) == math.inf


def test_rto_is_the_first_of_three_good_buckets_and_waits_for_stranded_work() -> None:
    fault = 100.0
    times = steady(95.0, 125.0)
    # every request accepted except for one second after the failure (the dead node)
    attempts = [(t, not (100.0 <= t < 101.0)) for t in times]
    deliveries: list[tuple[float, float | None]] = []
    for t in times:
        if 100.0 <= t < 101.0:
            continue  # not accepted: nothing to deliver
        delay = 4.0 if 101.0 <= t < 102.0 else 0.05  # redelivered after the ack wait
        deliveries.append((t, t + delay))
    # accepted just before the failure, stranded on the dead node, out at +6.5 s
    deliveries.append((99.95, 106.5))
    rto, buckets = measure_rto(fault, 120.0, attempts, deliveries, slo_p99=SLO, since=95.0)
    assert [b.good for b in buckets[:4]] == [False, False, True, True]
    assert buckets[0].attempts == 10
    assert buckets[0].accepted == 0
    assert buckets[1].p99 == pytest.approx(4.0)
    # buckets 2, 3, 4 are good (new work meets the SLO from +2 s), but the work the
    # failure delayed is out only at +6.5 s (the stranded one): back at the SLO then
    assert rto == pytest.approx(6.5)

    # without the stranded one: the last of bucket 1's redelivered ones (101.9 + 4 s)
    rto, _ = measure_rto(fault, 120.0, attempts, deliveries[:-1], slo_p99=SLO, since=95.0)
    assert rto == pytest.approx(5.9)
    # work accepted before the phase (since) does not count
    rto, _ = measure_rto(fault, 120.0, attempts, deliveries, slo_p99=SLO, since=99.99)
    assert rto == pytest.approx(5.9)
    # nothing delayed past the SLO: the first run of three good buckets decides
    quick = [(a, a + 0.05) for a, _ in deliveries[:-1]]
    rto, _ = measure_rto(fault, 120.0, attempts, quick, slo_p99=SLO, since=95.0)
    assert rto == pytest.approx(1.0)


def test_rto_waits_for_the_last_bad_bucket_and_99_percent_acceptance() -> None:
    fault = 0.0
    times = steady(0.0, 20.0, 0.01)  # 100 requests per bucket
    # bucket 3 alone is bad: one good pair (1, 2) then a bad one, then good from 4 on;
    # in bucket 6, 1 request of 100 fails: 99 % is still good; in bucket 3, 2 fail
    bad = {300, 301}
    attempts = [(t, i not in bad and not (i < 100) and i != 650) for i, t in enumerate(times)]
    deliveries: list[tuple[float, float | None]] = [(t, t + 0.1) for t in times]
    rto, buckets = measure_rto(fault, 20.0, attempts, deliveries, slo_p99=SLO)
    assert [b.good for b in buckets[:7]] == [False, True, True, False, True, True, True]
    assert rto == pytest.approx(4.0)
    # a relapse later in the window (the restarted node taking its share back) counts:
    # the service is back when every bucket from then on is good
    relapse = [(t, ok and not 11.0 <= t < 11.5) for t, ok in attempts]
    rto, _ = measure_rto(fault, 20.0, relapse, deliveries, slo_p99=SLO)
    assert rto == pytest.approx(12.0)
    # ... and needs three good buckets after it before the window ends
    rto, _ = measure_rto(fault, 14.0, relapse, deliveries, slo_p99=SLO)
    assert rto is None


def test_rto_is_zero_when_nothing_showed_and_none_when_work_was_lost() -> None:
    times = steady(0.0, 10.0)
    attempts = [(t, True) for t in times]
    deliveries: list[tuple[float, float | None]] = [(t, t + 0.2) for t in times]
    assert measure_rto(5.0, 10.0, attempts, deliveries, slo_p99=SLO)[0] == 0.0
    # one accepted just before the failure and never shown: not recovered
    lost = [*deliveries, (4.9, None)]
    assert measure_rto(5.0, 10.0, attempts, lost, slo_p99=SLO, since=0.0)[0] is None
    # never three good buckets in a row: not recovered
    slow = [(t, t + (3.0 if int(t) % 2 else 0.1)) for t in times]
    assert measure_rto(5.0, 10.0, attempts, slow, slo_p99=SLO)[0] is None
    # a bucket without a single request cannot be called good
    gap = [(t, True) for t in times if not 6.0 <= t < 7.0]
    assert measure_rto(5.0, 10.0, gap, deliveries, slo_p99=SLO)[0] == 2.0


def test_rpo_counts_lost_notifications_and_their_time_span() -> None:
    assert measure_rpo([]) == (0, 0.0)
    assert measure_rpo([12.0]) == (1, 0.0)
    assert measure_rpo([15.5, 10.0, 12.0]) == (3, 5.5)


@pytest.mark.skipif(missing() is not None, reason=str(missing()))
@pytest.mark.skipif(
    os.environ.get("TRELLIS_TEST_LOOP") == "uvloop",
    reason="the service runs in processes of its own; the asyncio pass covers it",
)
@pytest.mark.timeout(240)
async def test_a_node_drill_through_the_demo_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    opts = Options(
        drills=["node"], rolling=False, seed=3, rate=60.0, campaign=150, window=8.0, warmup=1.5
    )
    report = await run(opts, tmp_path / "demo")
    (drill,) = report["drills"]
    assert drill["drill"] == "node"
    assert drill["lost"] == 0
    assert drill["rpo_lost"] == 0
    assert drill["shown_twice"] == 0
    assert drill["rto_s"] is not None
    assert drill["rto_met"]
    assert report["totals"]["lost"] == 0
    assert report["totals"]["shown_twice"] == 0
    assert report["totals"]["shown"] == report["totals"]["deliveries_expected"] > 0
    assert report["ok"]
    text = render(report, opts.window)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "PASS" in text

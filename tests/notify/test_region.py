"""The region drill as a real network partition: region west's nodes run in a network
namespace of their own, its veth is taken down under load with the nodes left running,
then brought up again. Nothing accepted is lost or shown twice, the cut-off nodes fence
themselves (their cluster singletons and dispatchers stop by their own clock while their
processes live), the east node takes over, the west nodes rejoin, and every namespace,
link and route is gone afterwards."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from examples.notify.demo import PARTITION, SINGLETONS, Options, render, run
from examples.notify.harness import IP_BIN, Netns, NetnsUnavailable, missing, netns_unavailable


def _netns_reason() -> str | None:
    why = netns_unavailable()
    if why:
        return why
    probe = Netns(["probe"])
    try:
        probe.setup()
    except NetnsUnavailable as e:
        return f"ip netns add failed: {e}"
    finally:
        probe.teardown()
    return None


def _ours() -> list[str]:
    """Namespaces and links of this process left on the host."""
    assert IP_BIN is not None
    tag = f"{os.getpid()}"
    ns = subprocess.run([IP_BIN, "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run([IP_BIN, "-o", "link", "show"], capture_output=True, text=True).stdout
    left = [line.split()[0] for line in ns.splitlines() if f"trellis-notify-{tag}-" in line]
    left += [
        line.split(":")[1].strip()
        for line in links.splitlines()
        if line.split(":")[1].strip().startswith(f"tn{tag}")
    ]
    return left


REASON = missing() or _netns_reason()


@pytest.mark.skipif(REASON is not None, reason=f"region partition drill: {REASON}")
@pytest.mark.skipif(
    os.environ.get("TRELLIS_TEST_LOOP") == "uvloop",
    reason="the service runs in processes of its own; the asyncio pass covers it",
)
@pytest.mark.timeout(240)
async def test_a_partitioned_region_fences_itself_and_loses_nothing(tmp_path: Path) -> None:
    opts = Options(
        drills=["region"],
        rolling=False,
        seed=5,
        rate=60.0,
        campaign=150,
        window=12.0,
        warmup=1.5,
        partition=5.0,
    )
    report = await run(opts, tmp_path / "demo")
    assert _ours() == []  # namespaces, veths: all removed
    (drill,) = report["drills"]
    facts = drill["facts"]
    assert drill["mode"] == PARTITION, facts
    assert report["network"]["mode"] == "network namespaces"

    # nothing accepted lost, nothing shown twice
    assert drill["lost"] == 0
    assert drill["shown_twice"] == 0
    assert report["totals"]["lost"] == 0
    assert report["totals"]["shown_twice"] == 0
    assert report["totals"]["shown"] == report["totals"]["deliveries_expected"] > 0
    assert report["ok"]

    # the west nodes were cut off alive, and fenced themselves: the singletons (moved
    # there first) and every lease they held were lost by their own clock, and from 2 s
    # into the partition their own view counts no lease held
    west = facts["nodes"]
    assert west == ["b", "c"]
    assert facts["alive_during_partition"]
    assert facts["views_during_partition"] > 0
    assert set(facts["singletons_at_cut"].values()) <= set(west), facts["singletons_at_cut"]
    for node in west:
        held = set(facts["held_at_cut"][node])
        fenced = facts["fenced"][node]
        assert held <= set(fenced["leases"]), (node, held, fenced)
        assert fenced["held_after_2s"] == 0, (node, fenced)
    lost_singletons = {s for n in west for s in facts["fenced"][n]["leases"]} & set(SINGLETONS)
    assert lost_singletons == set(SINGLETONS)

    # the east node took over the singletons while the region was cut off
    assert set(SINGLETONS) <= set(facts["taken_over"]["a"]["leases"])
    # and the west nodes rejoined after the heal
    assert facts["rejoined"] == west
    assert drill["rto_s"] is not None
    assert drill["rto_met"]

    text = render(report, opts.window)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert PARTITION in text

"""The notification service end to end: real nats-server, PostgreSQL primary + replica,
provider processes and ``trellis run`` nodes (examples/notify/harness.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from examples.notify.harness import Service, missing

pytestmark = [
    pytest.mark.skipif(missing() is not None, reason=str(missing())),
    pytest.mark.timeout(240),
]


def notes(prefix: str, n: int, priority: str = "normal", tokens: int = 1) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        toks = [f"apns:{prefix}-{i}"] + ([f"fcm:{prefix}-{i}"] if tokens > 1 else [])
        out.append({"key": f"{prefix}-{i}", "priority": priority, "tokens": toks})
    return out


async def test_accepted_notifications_are_each_shown_once_and_queryable(tmp_path: Path) -> None:
    async with Service(tmp_path / "svc", ["a", "b"]) as svc:
        sub = svc.submitter()
        try:
            for prio in ("high", "normal", "bulk"):
                for i in range(0, 60, 20):
                    assert await sub.submit(notes(f"{prio}{i}", 20, prio, tokens=2))
            # a retried request (same keys, another node) is accepted once
            assert await sub.submit(notes("high0", 20, "high", tokens=2))
            expected = svc.deliverable(sub.expected_ids())
            shown = await svc.settled(expected, timeout=60)
            assert expected <= set(shown), sorted(expected - set(shown))[:5]
            assert {k: c for k, c in shown.items() if c != 1} == {}
            # with nothing failing, no provider received anything twice
            repeats = {kind: d["repeats"] for kind, d in (await svc.provider_deliveries()).items()}
            assert repeats == {"apns": {}, "fcm": {}}
            # status from the read replica (or the primary, saying so)
            async with httpx.AsyncClient() as http:
                r = await http.get(f"{svc.live_urls()[0]}/v1/notifications/high0-3")
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["source"] in ("replica", "primary")
                assert {d["state"] for d in body["deliveries"]} <= {"sent", "invalid"}
                r = await http.post(
                    f"{svc.live_urls()[0]}/v1/notifications",
                    json={"key": "x", "priority": "urgent", "tokens": ["apns:1"]},
                )
                assert r.status_code == 400
                assert r.json()["field"] == "priority"
                # the service's own metrics are on the node's /metrics, next to trellis's
                sock = str(svc.nodes["a"].socket)
                async with httpx.AsyncClient(
                    transport=httpx.AsyncHTTPTransport(uds=sock), base_url="http://n"
                ) as ctl:
                    text = (await ctl.get("/metrics")).text
                assert 'notify_send_attempts_total{priority="high",result="ok"}' in text
                assert "notify_time_to_send_seconds_bucket" in text
                assert "trellis_child_up" in text
                # the replica stops replaying: status reads fall back to the primary
                await asyncio.to_thread(svc.pg.pause_replay)
                try:
                    sources = set()
                    for _ in range(40):
                        r = await http.get(f"{svc.live_urls()[1]}/v1/notifications/high0-3")
                        sources.add(r.json()["source"])
                        if "primary" in sources:
                            break
                        await asyncio.sleep(0.25)
                    assert "primary" in sources
                finally:
                    await asyncio.to_thread(svc.pg.resume_replay)
        finally:
            await sub.aclose()


async def test_a_node_killed_mid_batch_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    # slow providers keep batches in flight when the node dies
    async with Service(
        tmp_path / "svc", ["a", "b", "c"], provider_args=["--latency-ms", "40"]
    ) as svc:
        sub = svc.submitter()
        try:

            async def load() -> None:
                for i in range(40):
                    await sub.submit(notes(f"n{i}", 25, ("high", "normal", "bulk")[i % 3], 2))
                    await asyncio.sleep(0.02)

            task = asyncio.create_task(load())
            await asyncio.sleep(1.0)
            svc.nodes["b"].kill()
            await task
            expected = svc.deliverable(sub.expected_ids())
            assert len(sub.accepted) == 1000
            assert not sub.failed
            shown = await svc.settled(expected, timeout=90)
            lost = expected - set(shown)
            assert not lost, f"{len(lost)} accepted deliveries never shown: {sorted(lost)[:5]}"
            assert {k: c for k, c in shown.items() if c != 1} == {}
        finally:
            await sub.aclose()


async def test_bulk_backlog_does_not_delay_high_priority(tmp_path: Path) -> None:
    # one node, provider throughput capped: a bulk backlog of several seconds
    async with Service(tmp_path / "svc", ["a"], env={"NOTIFY_PROVIDER_RATE": "800"}) as svc:
        sub = svc.submitter()
        try:
            for i in range(20):
                assert await sub.submit(notes(f"bulk{i}", 200, "bulk"))
            started = time.time()
            assert await sub.submit(notes("hi", 50, "high"))
            high = svc.deliverable({f"hi-{i}:apns:hi-{i}" for i in range(50)})
            shown = await svc.settled(high, timeout=60)
            high_done = time.time() - started
            bulk_shown = sum(1 for k in shown if k.startswith("bulk"))
            assert high <= set(shown)
            # 4,000 bulk at 800/s take about 5 s; high priority went ahead of most of them
            assert bulk_shown < 3000, (bulk_shown, high_done)
        finally:
            await sub.aclose()


async def test_a_campaign_is_expanded_once_and_survives_a_5xx_burst(tmp_path: Path) -> None:
    from examples.notify.scheduler import campaign_tokens

    async with (
        Service(tmp_path / "svc", ["a", "b"]) as svc,
        httpx.AsyncClient(timeout=10) as http,
    ):
        # the APNS provider fails its next 12 requests: breakers open, nothing is lost
        r = await http.post(
            f"{svc.providers['apns'].url}/v1/faults", json={"mode": "5xx", "requests": 12}
        )
        assert r.status_code == 200, r.text
        r = await http.post(
            f"{svc.live_urls()[0]}/v1/campaigns",
            json={"id": "spring", "total": 500, "priority": "bulk", "payload": {"t": 1}},
        )
        assert r.status_code == 202, r.text
        expected = svc.deliverable(
            {f"spring:{i}:{t}" for i in range(500) for t in campaign_tokens("spring", i)}
        )
        shown = await svc.settled(expected, timeout=90)
        assert expected <= set(shown), sorted(expected - set(shown))[:5]
        assert {k: c for k, c in shown.items() if c != 1} == {}
        stats = (await http.get(f"{svc.providers['apns'].url}/v1/stats")).json()
        assert stats["5xx"] >= 1  # the burst happened and was ridden out

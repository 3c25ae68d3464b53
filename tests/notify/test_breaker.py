"""The provider client side: the circuit breaker and the priority rate limiter on a
virtual clock, and the ProviderClient against a real provider process (the breaker
opens on a 5xx burst and closes after it, 429 pauses the limiter, a dead provider)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.append(ROOT)

from examples.notify.breaker import (  # noqa: E402
    CircuitBreaker,
    ProviderClient,
    ProviderUnavailable,
    RateLimiter,
)
from examples.notify.providers import ProviderProcess, in_burst  # noqa: E402


class VClock:
    """Virtual time: ``sleep`` moves it forward at once."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------
# CircuitBreaker
# ---------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = VClock()
    changes: list[tuple[str, str]] = []
    b = CircuitBreaker(
        failure_threshold=3, open_for=2.0, clock=clock, on_change=lambda *c: changes.append(c)
    )
    b.record_failure()
    b.record_failure()
    b.record_success()  # not consecutive: the count starts again
    b.record_failure()
    b.record_failure()
    assert (b.state, b.allow()) == ("closed", True)
    b.record_failure()
    assert (b.state, b.allow(), b.opened) == ("open", False, 1)
    assert b.retry_in() == pytest.approx(2.0)
    clock.advance(1.5)
    assert (b.state, b.allow()) == ("open", False)
    assert b.retry_in() == pytest.approx(0.5)
    assert changes == [("closed", "open")]


def test_half_open_lets_one_probe_through_and_closes_on_its_success() -> None:
    clock = VClock()
    b = CircuitBreaker(failure_threshold=1, open_for=2.0, clock=clock)
    b.record_failure()
    clock.advance(2.0)
    assert b.state == "half_open"
    assert b.retry_in() == 0.0
    assert b.allow() is True  # the probe
    assert b.allow() is False  # only one at a time
    b.record_success()
    assert (b.state, b.allow(), b.allow()) == ("closed", True, True)


def test_half_open_probe_failure_opens_again() -> None:
    clock = VClock()
    b = CircuitBreaker(failure_threshold=2, open_for=1.0, clock=clock)
    b.record_failure()
    b.record_failure()
    clock.advance(1.0)
    assert b.allow() is True
    b.record_failure()  # one failure is enough in half_open
    assert (b.state, b.opened, b.retry_in()) == ("open", 2, pytest.approx(1.0))
    clock.advance(1.0)
    assert b.allow() is True
    b.release()  # the probe was cancelled: no verdict, another may go
    assert b.allow() is True
    b.record_success()
    assert b.state == "closed"


# ---------------------------------------------------------------------------
# RateLimiter (virtual clock)
# ---------------------------------------------------------------------------


async def test_limiter_grants_the_burst_at_once_then_the_rate() -> None:
    clock = VClock()
    lim = RateLimiter(rate=10, burst=5, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        await lim.acquire()
    assert clock.now == 0.0
    for _ in range(10):
        await lim.acquire()
    assert clock.now == pytest.approx(1.0)  # 10 more at 10/s


async def _contend(lim: RateLimiter, order: list[str], arrivals: list[str]) -> None:
    async def one(prio: str) -> None:
        await lim.acquire(1, prio)
        order.append(prio)

    tasks = [asyncio.create_task(one(p)) for p in arrivals]
    await asyncio.gather(*tasks)


async def test_high_is_served_first_under_contention_and_bulk_still_progresses() -> None:
    clock = VClock()
    lim = RateLimiter(rate=100, burst=1, clock=clock, sleep=clock.sleep)
    await lim.acquire(1, "bulk")  # the bucket is empty now
    order: list[str] = []
    # bulk queued first, then normal, then high: all wait for tokens together
    await _contend(lim, order, ["bulk"] * 20 + ["normal"] * 20 + ["high"] * 40)
    assert order[0] == "high"
    # weights 8:3:1 while all three wait: of the first 12 grants, 8 high, 3 normal, 1 bulk
    assert sorted(order[:12]) == sorted(["high"] * 8 + ["normal"] * 3 + ["bulk"])
    # every high was served before the normal and bulk queues were half done
    last_high = max(i for i, p in enumerate(order) if p == "high")
    assert order[: last_high + 1].count("normal") < 20
    assert order[: last_high + 1].count("bulk") < 10
    assert order[: last_high + 1].count("bulk") >= 1  # bulk was not starved meanwhile
    assert lim.granted == {"high": 40, "normal": 20, "bulk": 21}
    assert clock.now == pytest.approx(80 / 100)  # the rate held


async def test_bulk_cannot_starve_high_nor_high_bulk_under_sustained_load() -> None:
    clock = VClock()
    lim = RateLimiter(rate=50, burst=1, clock=clock, sleep=clock.sleep)
    counts = {"high": 0, "bulk": 0}
    stop = asyncio.Event()

    async def worker(prio: str) -> None:
        while not stop.is_set():
            await lim.acquire(1, prio)
            counts[prio] += 1
            if clock.now >= 10.0:
                stop.set()

    # many more bulk senders than high ones
    tasks = [asyncio.create_task(worker("bulk")) for _ in range(30)]
    tasks += [asyncio.create_task(worker("high")) for _ in range(3)]
    async with asyncio.timeout(30):
        await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await lim.aclose()
    total = counts["high"] + counts["bulk"]
    assert total == pytest.approx(500, abs=5)  # 10 virtual seconds at 50/s
    assert counts["high"] >= 7 * counts["bulk"]  # weight 8:1
    assert counts["bulk"] >= total // 12  # and bulk keeps moving


async def test_high_arriving_while_bulk_waits_for_tokens_goes_first() -> None:
    clock = VClock()
    lim = RateLimiter(rate=1, burst=1, clock=clock, sleep=clock.sleep)
    await lim.acquire()
    order: list[str] = []

    async def one(prio: str) -> None:
        await lim.acquire(1, prio)
        order.append(prio)

    bulk = asyncio.create_task(one("bulk"))
    await asyncio.sleep(0)  # bulk is queued and the limiter waits for a token
    high = asyncio.create_task(one("high"))
    await asyncio.gather(bulk, high)
    assert order == ["high", "bulk"]


async def test_pause_grants_nothing_until_it_ends() -> None:
    clock = VClock()
    lim = RateLimiter(rate=100, burst=10, clock=clock, sleep=clock.sleep)
    await lim.acquire()
    lim.pause(2.0)  # a Retry-After: 2
    assert lim.paused_for == pytest.approx(2.0)
    await lim.acquire(1, "high")
    assert clock.now == pytest.approx(2.01)  # after the pause, from an empty bucket


async def test_a_cancelled_waiter_leaves_the_queue_and_loses_no_tokens() -> None:
    clock = VClock()
    lim = RateLimiter(rate=1, burst=1, clock=clock, sleep=clock.sleep)
    await lim.acquire()
    waiter = asyncio.create_task(lim.acquire(1, "bulk"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await lim.acquire(1, "normal")
    assert lim.granted == {"high": 0, "normal": 2, "bulk": 0}  # the cancelled one got none
    assert clock.now == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# ProviderClient against a real provider process
# ---------------------------------------------------------------------------


@pytest.fixture
def apns() -> Iterator[ProviderProcess]:
    with ProviderProcess("apns", 2, "--invalid-ratio", "0", "--latency-ms", "1") as p:
        yield p


def _msgs(key: str, n: int = 3) -> list[dict[str, Any]]:
    return [{"id": f"{key}:apns:d{i}", "token": f"apns:d{i}", "payload": {}} for i in range(n)]


async def _admin(url: str, method: str, path: str, **kw: Any) -> Any:
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.request(method, path, **kw)
        r.raise_for_status()
        return r.json()


async def test_client_sends_a_batch(apns: ProviderProcess) -> None:
    async with ProviderClient("apns", apns.url, CircuitBreaker(), RateLimiter(1000)) as client:
        results = await client.send(_msgs("k1", 50), "high")
    assert [r["status"] for r in results] == ["ok"] * 50
    assert [r["id"] for r in results] == [m["id"] for m in _msgs("k1", 50)]


async def test_breaker_opens_on_a_5xx_burst_and_closes_after_it(apns: ProviderProcess) -> None:
    clock = VClock()
    breaker = CircuitBreaker(failure_threshold=3, open_for=5.0, clock=clock)
    async with ProviderClient("apns", apns.url, breaker) as client:
        await _admin(apns.url, "POST", "/v1/faults", json={"mode": "5xx", "requests": 4})
        for _ in range(3):
            with pytest.raises(ProviderUnavailable) as err:
                await client.send(_msgs("k1"))
            assert err.value.status is not None
            assert err.value.status >= 500
        assert breaker.state == "open"
        # open: refused here, the provider sees nothing
        with pytest.raises(ProviderUnavailable) as err:
            await client.send(_msgs("k1"))
        assert (err.value.reason, err.value.retry_after) == ("circuit open", 5.0)
        assert (await _admin(apns.url, "GET", "/v1/stats"))["requests"] == 3
        # half_open: the probe meets the burst's last 5xx, so the circuit opens again
        clock.advance(5.0)
        with pytest.raises(ProviderUnavailable) as err:
            await client.send(_msgs("k1"))
        assert err.value.retry_after == pytest.approx(5.0)
        assert (breaker.state, breaker.opened) == ("open", 2)
        # the burst is over: the next probe succeeds and closes the circuit
        clock.advance(5.0)
        results = await client.send(_msgs("k1"))
        assert [r["status"] for r in results] == ["ok"] * 3
        assert breaker.state == "closed"
        assert [r["status"] for r in await client.send(_msgs("k2"))] == ["ok"] * 3


async def test_breaker_rides_out_the_scheduled_bursts_and_nothing_is_lost() -> None:
    """A provider with a 5xx burst of 4 in every 10 requests: a sender that retries
    through the breaker delivers every batch exactly once, and the circuit opens
    in each burst and is closed again after it."""
    seed, every, length = 9, 10, 4
    clock = VClock()
    transitions: list[tuple[str, str]] = []
    breaker = CircuitBreaker(3, 1.0, clock, on_change=lambda *c: transitions.append(c))
    argv = ["--burst-every", str(every), "--burst-len", str(length), "--invalid-ratio", "0"]
    with ProviderProcess("fcm", seed, *argv, "--latency-ms", "0") as p:
        async with ProviderClient("fcm", p.url, breaker) as client:
            delivered: dict[str, str] = {}
            for k in range(12):
                msgs = [{"id": f"k{k}:fcm:x", "token": "fcm:x", "payload": {}}]
                async with asyncio.timeout(30):
                    while True:
                        try:
                            (res,) = await client.send(msgs)
                            break
                        except ProviderUnavailable as exc:
                            clock.advance(max(exc.retry_after, 0.1))
                delivered[res["id"]] = res["status"]
        stats = await _admin(p.url, "GET", "/v1/stats")
        shown = (await _admin(p.url, "GET", "/v1/deliveries"))["shown"]
    assert set(delivered.values()) == {"ok"}
    assert set(shown) == set(delivered)
    assert len(shown) == 12
    assert stats["repeats"] == 0
    bursts = sum(in_burst(seed, s, every, length) for s in range(1, stats["requests"] + 1))
    assert stats["5xx"] == bursts > 0
    assert breaker.opened >= 1
    assert breaker.state == "closed"
    assert ("half_open", "closed") in transitions


async def test_client_can_take_one_limiter_token_per_message(apns: ProviderProcess) -> None:
    clock = VClock()
    limiter = RateLimiter(100, 10, clock=clock, sleep=clock.sleep)
    async with ProviderClient("apns", apns.url, limiter=limiter, cost="message") as client:
        await client.send(_msgs("k1", 10))
        assert clock.now == 0.0  # the burst of 10
        await client.send(_msgs("k2", 10))
        assert clock.now == pytest.approx(0.1)  # 10 more at 100/s
    assert limiter.granted["normal"] == 2


async def test_429_pauses_the_limiter_for_retry_after(apns: ProviderProcess) -> None:
    clock = VClock()
    breaker = CircuitBreaker(clock=clock)
    limiter = RateLimiter(100, 10, clock=clock, sleep=clock.sleep)
    async with ProviderClient("apns", apns.url, breaker, limiter) as client:
        await _admin(
            apns.url, "POST", "/v1/faults", json={"mode": "429", "requests": 1, "retry_after": 0.5}
        )
        with pytest.raises(ProviderUnavailable) as err:
            await client.send(_msgs("k1"), "bulk")
        assert (err.value.status, err.value.retry_after) == (429, 0.5)
        assert limiter.paused_for == pytest.approx(0.5)
        assert (breaker.state, breaker.failures) == ("closed", 0)  # throttled is not down
        results = await client.send(_msgs("k1"), "high")  # waits out the pause
        assert clock.now >= 0.5
        assert [r["status"] for r in results] == ["ok"] * 3
    await limiter.aclose()


async def test_a_dead_provider_is_unavailable_and_counts_as_a_failure() -> None:
    p = ProviderProcess("apns", 1).start()
    url = p.url
    p.stop()
    breaker = CircuitBreaker(failure_threshold=2)
    async with ProviderClient("apns", url, breaker, timeout=2.0) as client:
        for _ in range(2):
            with pytest.raises(ProviderUnavailable) as err:
                await client.send(_msgs("k1"))
            assert err.value.status is None
        assert breaker.state == "open"
        with pytest.raises(ProviderUnavailable, match="circuit open"):
            await client.send(_msgs("k1"))

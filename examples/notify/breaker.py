"""The client side of a push provider: a circuit breaker, a priority rate limiter and
an HTTP client that goes through both.

- :class:`CircuitBreaker`: ``closed`` -> ``open`` after ``failure_threshold``
  consecutive failures -> ``half_open`` once ``open_for`` seconds have passed, where
  one probe request is let through -> ``closed`` on its success, ``open`` again on
  its failure.
- :class:`RateLimiter`: a token bucket whose waiters are served by priority when
  tokens are short: weighted round robin over ``high``, ``normal`` and ``bulk``
  (weights 8, 3, 1 by default), so high goes first and bulk still progresses.
  :meth:`RateLimiter.pause` stops all grants for a ``Retry-After``.
- :class:`ProviderClient`: ``POST /v1/send`` over a keep-alive ``httpx.AsyncClient``;
  takes one limiter token per request (per message with ``cost="message"``, to
  match a provider run with ``--rate-unit messages``), feeds the breaker, and raises
  :class:`ProviderUnavailable` when the breaker is open, on 5xx, 429 and
  connection errors or timeouts.

Clocks are injectable (``clock`` returns seconds, ``sleep`` awaits them), so the
breaker and the limiter can run on a virtual clock in tests.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

__all__ = [
    "PRIORITIES",
    "CircuitBreaker",
    "ProviderClient",
    "ProviderError",
    "ProviderUnavailable",
    "RateLimiter",
]

PRIORITIES = ("high", "normal", "bulk")
_EPS = 1e-9


class ProviderError(Exception):
    """The provider answered something a retry will not fix (a 4xx other than 429,
    or a malformed answer)."""


class ProviderUnavailable(ProviderError):
    """The batch was not delivered; try again in ``retry_after`` seconds (0 = the
    caller's own backoff). ``status`` is the HTTP status, None when there was none."""

    def __init__(self, retry_after: float, reason: str, status: int | None = None) -> None:
        super().__init__(f"provider unavailable ({reason}); retry in {retry_after:.3f} s")
        self.retry_after = retry_after
        self.reason = reason
        self.status = status


# ---------------------------------------------------------------------------
# Circuit breaker
# ---------------------------------------------------------------------------


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a single half-open probe.

    ``on_change(old, new)`` is called on every state change. ``opened`` counts how
    many times the circuit opened.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        open_for: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        if failure_threshold < 1 or open_for < 0:
            raise ValueError("failure_threshold must be >= 1 and open_for >= 0")
        self.failure_threshold = failure_threshold
        self.open_for = open_for
        self.clock = clock
        self.on_change = on_change
        self.failures = 0  # consecutive, while closed
        self.opened = 0
        self._state = "closed"
        self._opened_at = 0.0
        self._probe_at: float | None = None  # when the half-open probe was let through

    def _set(self, new: str) -> None:
        old, self._state = self._state, new
        if old != new and self.on_change is not None:
            self.on_change(old, new)

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (open turns half_open with time)."""
        if self._state == "open" and self.clock() >= self._opened_at + self.open_for:
            self._probe_at = None
            self._set("half_open")
        return self._state

    def allow(self) -> bool:
        """May a request go now? In half_open, True once (the probe) until that probe
        is recorded, or until ``open_for`` passes without a verdict."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        now = self.clock()
        if self._probe_at is None or now >= self._probe_at + max(self.open_for, _EPS):
            self._probe_at = now
            return True
        return False

    def record_success(self) -> None:
        self.failures = 0
        self._probe_at = None
        if self.state == "half_open":
            self._set("closed")

    def record_failure(self) -> None:
        state = self.state
        self._probe_at = None
        if state == "half_open":
            self._open()
        elif state == "closed":
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self._open()
        # open: a late answer to a request sent before the circuit opened; no change

    def _open(self) -> None:
        self.failures = 0
        self.opened += 1
        self._opened_at = self.clock()
        self._set("open")

    def release(self) -> None:
        """Forget a half-open probe that got no verdict (the request was cancelled)."""
        self._probe_at = None

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 unless open)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self._opened_at + self.open_for - self.clock())


# ---------------------------------------------------------------------------
# Priority rate limiter
# ---------------------------------------------------------------------------


class _Waiter:
    __slots__ = ("fut", "n")

    def __init__(self, n: float, fut: asyncio.Future[None]) -> None:
        self.n = n
        self.fut = fut


class RateLimiter:
    """Token bucket: ``rate`` tokens/s, at most ``burst`` banked (default: one
    second's worth, at least 1).

    ``await acquire(n, priority)`` returns at once while tokens last and nobody
    waits; otherwise it queues. Queued acquirers are served in weighted round robin
    across priorities (``weights``, default high 8, normal 3, bulk 1), FIFO within
    one; the choice is made when tokens are there, so a high acquirer that arrives
    while bulk waits for tokens goes first. An ``n`` above ``burst`` is granted
    when the bucket is full and leaves it in debt (the long-run rate holds).

    ``granted`` counts grants per priority.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        weights: dict[str, int] | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        if self.burst <= 0:
            raise ValueError(f"burst must be > 0, got {burst}")
        self.clock = clock
        self._sleep = sleep
        self.weights = {"high": 8, "normal": 3, "bulk": 1, **(weights or {})}
        if set(self.weights) != set(PRIORITIES) or min(self.weights.values()) < 1:
            raise ValueError(f"weights must give each of {PRIORITIES} a weight >= 1")
        self.tokens = self.burst
        self._stamp = clock()  # tokens are counted up to here; may be in the future (pause)
        self._queues: dict[str, deque[_Waiter]] = {p: deque() for p in PRIORITIES}
        self._current = dict.fromkeys(PRIORITIES, 0)  # smooth weighted round robin
        self._pump: asyncio.Task[None] | None = None
        self.granted = dict.fromkeys(PRIORITIES, 0)

    # -- bucket -------------------------------------------------------------

    def _refill(self) -> float:
        now = self.clock()
        if now > self._stamp:
            self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
            self._stamp = now
        return now

    def _wait_for(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens (capped at burst) are there; 0 when they are."""
        need = min(n, self.burst) - self.tokens
        start = max(now, self._stamp)  # a pause defers refilling
        if need <= _EPS and start <= now:
            return 0.0
        return start - now + max(0.0, need) / self.rate

    def pause(self, seconds: float) -> None:
        """Grant nothing for ``seconds`` (a provider's Retry-After); the bucket starts
        refilling from empty afterwards."""
        now = self._refill()
        self.tokens = min(self.tokens, 0.0)
        self._stamp = max(self._stamp, now + max(0.0, seconds))
        self._kick()

    @property
    def paused_for(self) -> float:
        return max(0.0, self._stamp - self.clock())

    @property
    def waiting(self) -> dict[str, int]:
        return {p: sum(not w.fut.done() for w in q) for p, q in self._queues.items()}

    # -- acquire ------------------------------------------------------------

    async def acquire(self, n: float = 1, priority: str = "normal") -> None:
        if priority not in self._queues:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
        if n <= 0:
            return
        now = self._refill()
        if not any(self._queues.values()) and self._wait_for(n, now) == 0.0:
            self.tokens -= n
            self.granted[priority] += 1
            return
        waiter = _Waiter(n, asyncio.get_running_loop().create_future())
        self._queues[priority].append(waiter)
        self._kick()
        try:
            await waiter.fut
        except asyncio.CancelledError:
            if waiter.fut.done() and not waiter.fut.cancelled():
                self.tokens += n  # granted just as we were cancelled: give it back
                self.granted[priority] -= 1
            else:
                waiter.fut.cancel()
            raise

    def _kick(self) -> None:
        if (self._pump is None or self._pump.done()) and any(self._queues.values()):
            self._pump = asyncio.get_running_loop().create_task(self._run())

    def _peek(self) -> str | None:
        """The priority smooth weighted round robin picks next (without moving it)."""
        best, best_score = None, 0
        for p in PRIORITIES:
            q = self._queues[p]
            while q and q[0].fut.done():  # cancelled waiters
                q.popleft()
            if q:
                score = self._current[p] + self.weights[p]
                if best is None or score > best_score:
                    best, best_score = p, score
        return best

    def _commit(self, chosen: str) -> None:
        total = 0
        for p in PRIORITIES:
            if self._queues[p]:
                self._current[p] += self.weights[p]
                total += self.weights[p]
        self._current[chosen] -= total

    async def _run(self) -> None:
        while True:
            chosen = self._peek()
            if chosen is None:
                self._current = dict.fromkeys(PRIORITIES, 0)
                return
            head = self._queues[chosen][0]
            now = self._refill()
            wait = self._wait_for(head.n, now)
            if wait > 0.0:
                await self._sleep(wait)
                continue
            self._commit(chosen)
            self._queues[chosen].popleft()
            self.tokens -= head.n
            self.granted[chosen] += 1
            head.fut.set_result(None)

    async def aclose(self) -> None:
        """Stop the internal task (waiters still queued stay blocked)."""
        if self._pump is not None:
            self._pump.cancel()
            try:
                await self._pump
            except asyncio.CancelledError:
                pass


# ---------------------------------------------------------------------------
# Provider client
# ---------------------------------------------------------------------------


def _retry_after(resp: httpx.Response) -> float:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else 0.0
    except ValueError:
        return 0.0


class ProviderClient:
    """Sends batches to one provider (``kind`` is "apns" or "fcm") at ``base_url``.

    ``send`` returns the provider's per-message results, or raises
    :class:`ProviderUnavailable`: at once when the breaker is open
    (``reason="circuit open"``); on 5xx and connection errors or timeouts, after
    recording a failure in the breaker; on 429, after pausing the limiter for its
    Retry-After (a 429 counts as a success for the breaker: the provider is up).
    """

    def __init__(
        self,
        kind: str,
        base_url: str,
        breaker: CircuitBreaker | None = None,
        limiter: RateLimiter | None = None,
        *,
        timeout: float = 5.0,
        max_connections: int = 16,
        cost: str = "request",
    ) -> None:
        if cost not in ("request", "message"):
            raise ValueError(f"cost must be request or message, got {cost!r}")
        self.cost = cost
        self.kind = kind
        self.base_url = base_url
        self.breaker = breaker
        self.limiter = limiter
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self.counts = {"sent": 0, "unavailable": 0, "rate_limited": 0, "rejected": 0}

    def _unavailable(
        self, reason: str, status: int | None, retry_after: float = 0.0
    ) -> ProviderUnavailable:
        self.counts["unavailable"] += 1
        after = max(retry_after, self.breaker.retry_in() if self.breaker else 0.0)
        return ProviderUnavailable(after, reason, status)

    async def send(
        self, messages: list[dict[str, Any]], priority: str = "normal"
    ) -> list[dict[str, Any]]:
        breaker = self.breaker
        if breaker is not None and breaker.state == "open":
            self.counts["rejected"] += 1
            raise ProviderUnavailable(breaker.retry_in(), "circuit open")
        if self.limiter is not None:
            await self.limiter.acquire(len(messages) if self.cost == "message" else 1, priority)
        if breaker is not None and not breaker.allow():
            self.counts["rejected"] += 1
            raise ProviderUnavailable(max(breaker.retry_in(), 0.05), "circuit open")
        try:
            resp = await self._http.post("/v1/send", json={"messages": messages})
        except httpx.TransportError as exc:  # connect errors, timeouts, broken connections
            if breaker is not None:
                breaker.record_failure()
            raise self._unavailable(f"{type(exc).__name__}: {exc}", None) from exc
        except BaseException:  # cancelled: no verdict, free the half-open probe
            if breaker is not None:
                breaker.release()
            raise
        status = resp.status_code
        if status >= 500:
            if breaker is not None:
                breaker.record_failure()
            raise self._unavailable(f"http {status}", status, _retry_after(resp))
        if breaker is not None:
            breaker.record_success()
        if status == 429:
            after = _retry_after(resp)
            if self.limiter is not None:
                self.limiter.pause(after)
            self.counts["rate_limited"] += 1
            raise self._unavailable("http 429", 429, after)
        if status != 200:
            raise ProviderError(f"{self.kind}: http {status}: {resp.text[:200]}")
        try:
            results = resp.json()["results"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(f"{self.kind}: malformed answer: {resp.text[:200]}") from exc
        if not isinstance(results, list) or len(results) != len(messages):
            raise ProviderError(f"{self.kind}: {len(messages)} messages, answer {results!r:.200}")
        self.counts["sent"] += 1
        return results

    async def aclose(self) -> None:
        """Close the connections (a limiter passed in is the caller's to close)."""
        await self._http.aclose()

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

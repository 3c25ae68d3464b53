"""The gatekeeper: one token bucket for every history request the tree makes.

Without Redis the bucket is local (``rate`` requests/s, ``burst``). With
``redis_url`` it lives in Redis (a Lua script refills and takes atomically, on
Redis's clock), so every process sharing that Redis shares the limit. When Redis
stops answering, the same request is answered from a local bucket of
``fallback_fraction`` of the limit (mode ``"fallback"``); Redis is probed again
every ``probe_interval`` (by the next request, or by a PING when no request
comes), and the first success returns to Redis. The switch is exported three
ways: the server's ``fallback`` property, the telemetry events ``market_data.gatekeeper.fallback`` /
``market_data.gatekeeper.restored`` (field ``fallback``: 1 or 0), and the
``fallback`` gauge of :meth:`Gatekeeper.statistics` (``"stats"`` call), which
:func:`fallback_gauge` turns into a Prometheus gauge.

Keep ``rate``/``burst`` below the exchange's own limit, and ``burst *
(1 + fallback_fraction)`` within its burst: then the exchange never answers 429
because of us, also across a switch.

Example::

    pid = await Gatekeeper.start_link(rate=10, burst=5, name="market_data.gatekeeper")
    grant = await trellis.call(pid, ("acquire", 1))
    if not grant.granted:
        await asyncio.sleep(grant.retry_after)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from examples.market_data._common import close_on_exit, redis_call, redis_client, redis_errors
from examples.market_data.exchange import TokenBucket

import trellis

__all__ = ["LUA_TOKEN_BUCKET", "Gatekeeper", "GatekeeperStats", "Grant", "fallback_gauge"]

_log = logging.getLogger("market_data.gatekeeper")
_PROBE = "probe"

#: KEYS[1] = bucket hash; ARGV = rate, burst, n. Returns {granted 0/1, wait seconds}.
LUA_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local granted = 0
local wait = 0
if tokens >= n then
  tokens = tokens - n
  granted = 1
else
  wait = (n - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {granted, tostring(wait)}
"""


@dataclass(frozen=True, slots=True)
class Grant:
    """The answer to ``("acquire", n)``: ``granted``, else wait ``retry_after`` seconds;
    ``mode`` is ``"redis"``, ``"local"`` (no Redis configured) or ``"fallback"``."""

    granted: bool
    retry_after: float
    mode: str


@dataclass(frozen=True, slots=True)
class GatekeeperStats:
    """Counters and the ``fallback`` gauge (1 while Redis is bypassed, else 0)."""

    mode: str
    fallback: int
    granted: int
    denied: int
    fallbacks: int
    restores: int
    redis_errors: int


class Gatekeeper(trellis.Server):
    """A token bucket in Redis with a local fallback; see the module docstring."""

    async def init(
        self,
        *,
        rate: float,
        burst: float,
        redis_url: str | None = None,
        fallback_fraction: float = 0.5,
        probe_interval: float = 0.5,
        namespace: str = "trellis:md",
        redis_timeout: float = 0.25,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"Gatekeeper: rate must be > 0, got {rate}")
        if not burst >= 1:
            raise ValueError(f"Gatekeeper: burst must be >= 1, got {burst}")
        if not 0 < fallback_fraction <= 1:
            raise ValueError(
                f"Gatekeeper: fallback_fraction must be in (0, 1], got {fallback_fraction}"
            )
        self.rate = float(rate)
        self.burst = float(burst)
        self.fraction = float(fallback_fraction)
        self.probe_interval = float(probe_interval)
        self.key = f"{namespace}:bucket"
        self.local = TokenBucket(self.rate, self.burst)
        self.redis = redis_client(redis_url, redis_timeout) if redis_url else None
        self.script = self.redis.register_script(LUA_TOKEN_BUCKET) if self.redis else None
        self.mode = "redis" if self.redis else "local"
        self.next_probe = 0.0
        self.probe_armed = False
        self.granted = self.denied = self.fallbacks = self.restores = self.errors = 0
        if self.redis is not None:
            close_on_exit(self.pid, self.redis.aclose)

    @property
    def fallback(self) -> bool:
        """Whether requests are answered locally because Redis is unreachable."""
        return self.mode == "fallback"

    def statistics(self) -> GatekeeperStats:
        """The counters and the fallback gauge."""
        return GatekeeperStats(
            self.mode,
            int(self.fallback),
            self.granted,
            self.denied,
            self.fallbacks,
            self.restores,
            self.errors,
        )

    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "stats":
            return self.statistics()
        if isinstance(request, tuple) and len(request) == 2 and request[0] == "acquire":
            n = float(request[1])
            if not 0 < n <= max(1.0, self.burst * self.fraction):
                raise ValueError(f"Gatekeeper: cannot acquire {n} tokens (burst {self.burst})")
            grant = await self.acquire(n)
            if grant.granted:
                self.granted += 1
            else:
                self.denied += 1
            return grant
        raise ValueError(f"Gatekeeper: unknown call {request!r}")

    async def handle_info(self, msg: Any) -> Any:
        if msg != _PROBE:
            return None
        self.probe_armed = False
        if self.mode != "fallback" or self.redis is None:
            return None
        now = time.monotonic()
        if now < self.next_probe:  # a request probed meanwhile
            self._arm_probe(self.next_probe - now)
            return None
        try:
            await redis_call(self.redis.ping())
        except redis_errors() as e:
            self.errors += 1
            self._to_fallback(e, time.monotonic())
        else:
            self._to_redis()
        return None

    def _arm_probe(self, delay: float) -> None:
        """One PING timer at a time, so a quiet gatekeeper also finds Redis back."""
        if not self.probe_armed:
            self.probe_armed = True
            asyncio.get_running_loop().call_later(delay, self.pid.send, _PROBE)

    async def acquire(self, n: float) -> Grant:
        """Take ``n`` tokens from Redis, or from the local bucket when Redis is away."""
        now = time.monotonic()
        if self.mode == "redis" or (self.mode == "fallback" and now >= self.next_probe):
            try:
                answer = self.script(keys=[self.key], args=[self.rate, self.burst, n])  # type: ignore[misc]
                granted, wait = await redis_call(answer)
            except redis_errors() as e:
                self.errors += 1
                self._to_fallback(e, now)
            else:
                if self.mode == "fallback":
                    self._to_redis()
                return Grant(bool(int(granted)), float(wait), "redis")
        if self.local.take(now, n):
            return Grant(True, 0.0, self.mode)
        return Grant(False, self.local.wait_time(now, n), self.mode)

    def _to_fallback(self, error: BaseException, now: float) -> None:
        self.next_probe = now + self.probe_interval
        self._arm_probe(self.probe_interval)
        if self.mode == "fallback":
            return
        self.mode = "fallback"
        self.fallbacks += 1
        # a fresh local bucket at the fallback share, starting full
        self.local = TokenBucket(self.rate * self.fraction, max(1.0, self.burst * self.fraction))
        _log.warning("redis unreachable (%s): local fallback limit", error)
        trellis.telemetry.emit(
            "market_data.gatekeeper.fallback", pid=self.pid, fallback=1, error=repr(error)
        )

    def _to_redis(self) -> None:
        self.mode = "redis"
        self.restores += 1
        _log.info("redis is back: shared limit restored")
        trellis.telemetry.emit("market_data.gatekeeper.restored", pid=self.pid, fallback=0)


def fallback_gauge(registry: Any = None) -> tuple[Any, object]:
    """A Prometheus gauge ``market_data_gatekeeper_fallback`` (1 while the gatekeeper
    answers from its local fallback limit, else 0), kept by a telemetry handler.

    Returns ``(gauge, handler_id)``; ``trellis.telemetry.detach(handler_id)`` stops it.

    Example::

        registry = prometheus_client.CollectorRegistry()
        gauge, hid = fallback_gauge(registry)
    """
    from prometheus_client import REGISTRY, Gauge

    gauge = Gauge(
        "market_data_gatekeeper_fallback",
        "1 while the history-request gatekeeper uses its local fallback limit",
        registry=REGISTRY if registry is None else registry,
    )

    def handle(event: dict[str, Any]) -> None:
        gauge.set(event["fallback"])

    hid = trellis.telemetry.attach(
        handle, ["market_data.gatekeeper.fallback", "market_data.gatekeeper.restored"]
    )
    return gauge, hid

"""The monotonic clock every timer in Trellis goes through, and a virtual one for tests."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["Clock", "LoopClock", "TimerHandle", "VirtualClock", "current_clock", "use_clock"]


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What Trellis needs of a clock: the time, and a timer."""

    def now(self) -> float: ...

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> TimerHandle: ...


class LoopClock:
    """The running event loop's monotonic clock (the default)."""

    __slots__ = ()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> TimerHandle:
        return asyncio.get_running_loop().call_later(delay, fn, *args)


class _VTimer:
    __slots__ = ("args", "cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """A clock that only moves when told to, so time-based behaviour is tested without sleeping.

    Example::

        clock = VirtualClock()
        with use_clock(clock):
            sup = await Supervisor.start_link([...], intensity=1, period=5.0)
            ...
            await clock.advance(6.0)   # the restart window has passed
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._heap: list[tuple[float, int, _VTimer]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_later(self, delay: float, fn: Callable[..., object], *args: Any) -> TimerHandle:
        timer = _VTimer(self._now + max(0.0, delay), fn, args)
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        return timer

    @property
    def pending_timers(self) -> int:
        """How many timers are scheduled and not cancelled."""
        return sum(1 for _, _, t in self._heap if not t.cancelled)

    async def settle(self) -> None:
        """Let the event loop run until nothing is ready to run (in-memory work is done)."""
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        if ready is None:  # a loop without the stdlib internals: spin a fixed amount
            for _ in range(200):
                await asyncio.sleep(0)
            return
        idle = 0
        for _ in range(100_000):
            await asyncio.sleep(0)
            if ready:
                idle = 0
            else:
                idle += 1
                if idle >= 3:
                    return

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing every due timer in order."""
        target = self._now + seconds
        await self.settle()
        # a tolerance so that 0.1 + 0.2 "is" 0.3: timers due at the target fire
        while self._heap and self._heap[0][0] <= target + 1e-9:
            when, _, timer = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            timer.fn(*timer.args)
            await self.settle()
        self._now = max(self._now, target)
        await self.settle()

    async def sleep(self, seconds: float) -> None:
        """Sleep on virtual time (resumes when ``advance`` passes the deadline)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.call_later(seconds, _resolve, fut)
        await fut


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_DEFAULT = LoopClock()
_override: Clock | None = None


def current_clock() -> Clock:
    """The clock in use: the one installed by :func:`use_clock`, else the loop's clock."""
    return _override if _override is not None else _DEFAULT


@contextmanager
def use_clock(clock: Clock) -> Iterator[Clock]:
    """Install ``clock`` for everything Trellis times while the block runs."""
    global _override
    previous = _override
    _override = clock
    try:
        yield clock
    finally:
        _override = previous


async def sleep(seconds: float) -> None:
    """Sleep ``seconds`` on the Trellis clock (virtual under :func:`use_clock`)."""
    await sleep_on(current_clock(), seconds)


async def sleep_on(clock: Clock, seconds: float) -> None:
    """Sleep ``seconds`` on ``clock``; a cancelled sleep cancels its timer."""
    if isinstance(clock, LoopClock):
        await asyncio.sleep(seconds)
        return
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    handle = clock.call_later(seconds, _resolve, fut)
    try:
        await fut
    finally:
        handle.cancel()

"""The telemetry bus: behaviours emit event dicts, subscribers (journal, metrics, logs) attach.

Handlers run synchronously in the emitter and must not block: hand work to a
queue. A handler that raises is detached and reported, never breaking the emitter.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from . import _clock

__all__ = ["Handler", "Subscription", "attach", "detach", "emit", "subscribe"]

Handler = Callable[[dict[str, Any]], object]

_log = logging.getLogger("trellis.telemetry")
_ids = itertools.count(1)
_handlers: dict[object, tuple[Handler, frozenset[str] | None]] = {}
# An immutable snapshot of _handlers for emit() to iterate without copying.
_snapshot: tuple[tuple[object, Handler, frozenset[str] | None], ...] = ()
_emitting_failure = False


def _refresh() -> None:
    global _snapshot
    _snapshot = tuple((hid, fn, names) for hid, (fn, names) in _handlers.items())


def attach(
    handler: Handler, events: Iterable[str] | None = None, *, id: object | None = None
) -> object:
    """Call ``handler(event)`` for every event (or only those named in ``events``).

    Returns the handler id to pass to :func:`detach`.

    Example::

        seen = []
        hid = trellis.telemetry.attach(seen.append, events=["child.restarted"])
        ...
        trellis.telemetry.detach(hid)
    """
    hid = id if id is not None else next(_ids)
    _handlers[hid] = (handler, frozenset(events) if events is not None else None)
    _refresh()
    return hid


def detach(handler_id: object) -> bool:
    """Remove a handler; returns whether it was attached."""
    found = _handlers.pop(handler_id, None) is not None
    _refresh()
    return found


def active() -> bool:
    """Whether any handler is attached (emitters skip building events otherwise)."""
    return bool(_handlers)


def emit(name: str, **fields: Any) -> None:
    """Hand an event to every interested handler (cheap when none is attached).

    ``time`` defaults to the Trellis clock's current time.
    """
    if not _snapshot:
        return
    fields["event"] = name
    if "time" not in fields:  # emitters with a clock at hand pass it
        clock = _clock._override
        try:
            fields["time"] = clock.now() if clock is not None else asyncio.get_running_loop().time()
        except RuntimeError:  # no running loop (e.g. at interpreter exit)
            fields["time"] = 0.0
    for hid, fn, names in _snapshot:
        if names is not None and name not in names:
            continue
        try:
            fn(fields)
        except Exception as exc:
            _handler_failed(hid, fn, name, exc)


def _handler_failed(hid: object, fn: Handler, name: str, exc: Exception) -> None:
    global _emitting_failure
    _handlers.pop(hid, None)
    _refresh()
    _log.error("telemetry handler %r failed on %s and was detached", fn, name, exc_info=exc)
    if _emitting_failure:
        return
    _emitting_failure = True
    try:
        emit("telemetry.handler_failed", handler_id=hid, handler=fn, on=name, error=exc)
    finally:
        _emitting_failure = False


class Subscription:
    """An async iterator over events with a bounded buffer; overflow drops the oldest
    event and counts it in ``dropped`` (never blocks the emitter)."""

    def __init__(self, events: Iterable[str] | None, maxlen: int) -> None:
        self._buf: deque[dict[str, Any]] = deque()
        self._maxlen = maxlen
        self._waiter: asyncio.Future[None] | None = None
        self.dropped = 0
        self._id = attach(self._push, events)

    def _push(self, event: dict[str, Any]) -> None:
        if len(self._buf) >= self._maxlen:
            self._buf.popleft()
            self.dropped += 1
        self._buf.append(event)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def close(self) -> None:
        detach(self._id)

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._buf:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._buf.popleft()


def subscribe(events: Iterable[str] | None = None, *, maxlen: int = 10_000) -> Subscription:
    """An async iterator of events for consumers that do I/O; ``close()`` it when done."""
    return Subscription(events, maxlen)

"""The recovery worker: finds every gap in the stored ticks and backfills exactly it.

It learns collectors' DOWN and UP from Trellis telemetry (``child.exited`` and
``child.started``/``child.restarted`` of the collectors' supervisor). When a
collector subscribes again it reports the first live seq of each symbol; the gap
of that symbol is ``last stored seq below it + 1 .. first live seq - 1``. Every
``scan_interval`` it also scans the store for holes (a missing seq below a stored
one; a hole must be seen twice before it is fetched, so a gap being reported
right now is not fetched twice). Losses of any cause (a killed store, a dropped
subscriber, an exchange restart) show up one way or the other.

Gaps are fetched highest-volume symbol first (the busiest symbol's gap of each
resume goes before all other queued work, so every outage starts at once), each
page through the
gatekeeper (waiting as long as it says when it denies) from the history API,
and written to the store (``INSERT OR IGNORE``: fetching twice changes
nothing). Each gap is a row of ``backfills`` with the time it was requested
and done, and, for an outage, the delay from the collector's UP to the first
request (``start_delay``). A restarted recovery worker picks up the gaps its
previous incarnation left unfinished.

Example::

    pid = await Recovery.start_link(db="ticks.db", exchange="http://127.0.0.1:7462",
                                    symbols=50, name="market_data.recovery")

Calls: ``"report"`` -> dict; ``"idle"`` -> True when nothing is queued or running;
``("backfill", symbol, from_seq, to_seq)`` -> the gap's id (a manual backfill).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from examples.market_data._common import (
    COLLECTORS,
    GATEKEEPER,
    STORE,
    HttpError,
    close_on_exit,
    connect,
    http_json,
)
from examples.market_data.exchange import symbol_names

import trellis

__all__ = ["Gap", "Outage", "Recovery", "reason_class"]

_log = logging.getLogger("market_data.recovery")
_SCAN = "scan"


def reason_class(reason: Any) -> str:
    """normal, shutdown, killed, hung or crash: enough to tell outages apart."""
    if reason is trellis.NORMAL:
        return "normal"
    if reason is trellis.SHUTDOWN or isinstance(reason, trellis.Shutdown):
        return "shutdown"
    if reason is trellis.KILLED or reason is trellis.KILL:
        return "killed"
    if isinstance(reason, trellis.Hung):
        return "hung"
    return "crash"


@dataclass(frozen=True, slots=True)
class Gap:
    """Ticks ``from_seq..to_seq`` of ``symbol`` to fetch; ``ref`` is the loop time its
    start delay counts from (the collector's UP for an outage)."""

    id: int
    symbol: str
    from_seq: int
    to_seq: int
    cause: str
    collector: str | None
    outage: str | None
    ref: float


@dataclass
class Outage:
    """One DOWN..UP of a collector and the gaps it left."""

    key: str
    collector: str
    reason: str
    down_at: float
    up_at: float | None = None
    gaps: list[int] = field(default_factory=list)
    first_request: float | None = None
    done: int = 0
    resolved: bool = False  # the collector has resumed and the gaps are known

    @property
    def start_delay(self) -> float | None:
        """Seconds from UP to the first history request (None: nothing to fetch)."""
        if self.first_request is None or self.up_at is None:
            return None
        return self.first_request - self.up_at

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "collector": self.collector,
            "reason": self.reason,
            "down_at": self.down_at,
            "up_at": self.up_at,
            "gaps": len(self.gaps),
            "gaps_closed": self.done,
            "start_delay": self.start_delay,
            "resolved": self.resolved,
        }


class Recovery(trellis.Server):
    """Gap detection and rate-limited backfill; see the module docstring."""

    async def init(
        self,
        *,
        db: str,
        exchange: str,
        symbols: int,
        scan_interval: float = 1.0,
        page: int = 2000,
        retry_max: float = 1.0,
    ) -> None:
        if not scan_interval > 0:
            raise ValueError(f"Recovery: scan_interval must be > 0, got {scan_interval}")
        if page < 1:
            raise ValueError(f"Recovery: page must be >= 1, got {page}")
        self.conn = connect(db)
        self.names = symbol_names(symbols)
        self.rank = {s: i for i, s in enumerate(self.names)}
        self.scan_interval = scan_interval
        self.loop = asyncio.get_running_loop()
        # (0 for the first gap of a resume, else 1; volume rank; from_seq; gap id)
        self.queue: list[tuple[int, int, int, int]] = []
        self.gaps: dict[int, Gap] = {}  # queued or running
        self.running: set[int] = set()
        self.waiter: Any = None  # the backfiller, waiting for work
        self.open: dict[str, Outage] = {}  # by collector, until it resumes
        self.outages: list[Outage] = []
        self.by_key: dict[str, Outage] = {}
        self.seen: set[str] = set()
        self.contig = dict.fromkeys(self.names, 0)  # every seq 1..n is stored
        self.suspects: set[tuple[str, int, int]] = set()
        self.counts = {"denied": 0, "rejected_429": 0, "opened": 0, "closed": 0, "scans": 0}
        self._resume_unfinished()
        hid = trellis.telemetry.attach(
            self._on_event, ["child.exited", "child.started", "child.restarted"]
        )
        close_on_exit(self.pid, lambda: trellis.telemetry.detach(hid), self.conn.close)
        self.backfiller = trellis.spawn(_backfiller, self.pid, exchange, page, retry_max, link=True)
        self.loop.call_later(scan_interval, self.pid.send, _SCAN)

    def _resume_unfinished(self) -> None:
        """Queue the gaps a previous incarnation opened but did not finish."""
        now = self.loop.time()
        for gid, symbol, a, b, cause, collector, outage in self.conn.execute(
            "SELECT id, symbol, from_seq, to_seq, cause, collector, outage FROM backfills "
            "WHERE done_at IS NULL ORDER BY id"
        ):
            self.gaps[gid] = Gap(gid, symbol, a, b, cause, collector, outage, now)
            heapq.heappush(self.queue, (1, self.rank.get(symbol, len(self.rank)), a, gid))

    def _on_event(self, event: dict[str, Any]) -> None:
        """Telemetry handler (synchronous, must not block): hand collector events over."""
        sup = trellis.whereis(COLLECTORS)
        if sup is None or event.get("sup_pid") is not sup:
            return
        name = event["event"]
        reason = reason_class(event.get("reason")) if name == "child.exited" else None
        self.pid.send(("collector", name, str(event.get("child_id")), event.get("time"), reason))

    # -- callbacks -------------------------------------------------------------------
    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "next_gap":
            if self.queue:
                return self._pop()
            self.waiter = caller
            return trellis.NoReply()
        if request == "idle":
            return not self.queue and not self.running
        if request == "report":
            return self.report()
        if isinstance(request, tuple) and len(request) == 4 and request[0] == "backfill":
            _, symbol, a, b = request
            if symbol not in self.rank:
                raise ValueError(f"Recovery: unknown symbol {symbol!r}")
            if not 1 <= a <= b:
                raise ValueError(f"Recovery: need 1 <= from_seq <= to_seq, got {a}, {b}")
            return self._open_gap(symbol, a, b, "manual", None, None, self.loop.time())
        raise ValueError(f"Recovery: unknown call {request!r}")

    async def handle_cast(self, msg: Any) -> Any:
        if isinstance(msg, tuple) and msg and msg[0] == "resumed":
            _, cid, nxt, _session, at = msg
            await self._resumed(cid, nxt, at)
        return None

    async def handle_info(self, msg: Any) -> Any:
        if msg == _SCAN:
            self._scan()
            self.loop.call_later(self.scan_interval, self.pid.send, _SCAN)
            return None
        kind = msg[0] if isinstance(msg, tuple) and msg else None
        if kind == "collector":
            self._collector_event(*msg[1:])
        elif kind == "request":
            self._request(*msg[1:])
        elif kind == "gap_done":
            self._gap_done(*msg[1:])
        elif kind == "denied":
            self.counts["denied"] += 1
        elif kind == "rejected_429":
            self.counts["rejected_429"] += 1
            self.conn.execute("UPDATE backfills SET rejected = rejected + 1 WHERE id = ?", msg[1:])
        return None

    async def terminate(self, reason: Any) -> None:
        trellis.exit(self.backfiller, trellis.SHUTDOWN)  # linked, but a NORMAL stop spares it

    # -- outages ---------------------------------------------------------------------
    def _collector_event(self, name: str, cid: str, at: float, reason: str | None) -> None:
        if name == "child.exited":
            outage = Outage(f"{cid}@{at:.6f}", cid, reason or "crash", at)
            self.open[cid] = outage
            self.outages.append(outage)
            self.by_key[outage.key] = outage
            _log.info("%s down (%s)", cid, outage.reason)
        else:
            down = self.open.get(cid)
            if down is not None and down.up_at is None:
                down.up_at = at

    async def _resumed(self, cid: str, nxt: dict[str, int], at: float) -> None:
        outage = self.open.pop(cid, None)
        if outage is not None:
            if outage.up_at is None:
                outage.up_at = at
            cause, ref = "outage", outage.up_at
        else:
            cause, ref = ("reconnect" if cid in self.seen else "start"), at
        self.seen.add(cid)
        try:  # what the store holds in memory counts as stored
            await trellis.call(STORE, "flush", timeout=2.0)
        except (trellis.NoProc, trellis.Exited, trellis.CallTimeout):
            pass
        key = outage.key if outage is not None else None
        lead = True  # the busiest symbol's gap goes before any other queued work
        for symbol in sorted(nxt, key=lambda s: self.rank.get(s, len(self.rank))):
            first_live = int(nxt[symbol])
            row = self.conn.execute(
                "SELECT MAX(seq) FROM ticks WHERE symbol = ? AND seq < ?", (symbol, first_live)
            ).fetchone()
            last = row[0] or 0
            if last + 1 <= first_live - 1:
                gid = self._open_gap(symbol, last + 1, first_live - 1, cause, cid, key, ref, lead)
                lead = lead and gid is None
                if outage is not None and gid is not None:
                    outage.gaps.append(gid)
        if outage is not None:
            outage.resolved = True
            _log.info("%s up: %d gaps to backfill", cid, len(outage.gaps))

    # -- holes -----------------------------------------------------------------------
    def _scan(self) -> None:
        """Find holes (missing seqs below a stored one); fetch those seen twice."""
        self.counts["scans"] += 1
        holes: list[tuple[str, int, int]] = []
        for symbol in self.names:
            c = self.contig[symbol]
            expect = c + 1
            first_hole = None
            for (seq,) in self.conn.execute(
                "SELECT seq FROM ticks WHERE symbol = ? AND seq > ? ORDER BY seq", (symbol, c)
            ):
                if seq > expect:
                    holes.append((symbol, expect, seq - 1))
                    if first_hole is None:
                        first_hole = expect
                expect = seq + 1
            self.contig[symbol] = expect - 1 if first_hole is None else first_hole - 1
        suspects = set()
        now = self.loop.time()
        for symbol, a, b in holes:
            for x, y in self._uncovered(symbol, a, b):
                if (symbol, x, y) in self.suspects:
                    self._open_gap(symbol, x, y, "hole", None, None, now)
                else:
                    suspects.add((symbol, x, y))
        self.suspects = suspects

    def _uncovered(self, symbol: str, a: int, b: int) -> list[tuple[int, int]]:
        """The parts of ``a..b`` that no queued or running gap covers."""
        parts = [(a, b)]
        for g in self.gaps.values():
            if g.symbol != symbol:
                continue
            nxt = []
            for x, y in parts:
                if g.to_seq < x or g.from_seq > y:
                    nxt.append((x, y))
                    continue
                if x < g.from_seq:
                    nxt.append((x, g.from_seq - 1))
                if g.to_seq < y:
                    nxt.append((g.to_seq + 1, y))
            parts = nxt
        return parts

    # -- the queue -------------------------------------------------------------------
    def _open_gap(
        self,
        symbol: str,
        a: int,
        b: int,
        cause: str,
        collector: str | None,
        outage: str | None,
        ref: float,
        lead: bool = False,
    ) -> int | None:
        parts = [(a, b)] if cause == "manual" else self._uncovered(symbol, a, b)
        first = None
        for x, y in parts:
            cur = self.conn.execute(
                "INSERT INTO backfills(symbol, from_seq, to_seq, cause, collector, outage, "
                "opened_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (symbol, x, y, cause, collector, outage, time.time()),
            )
            gid = int(cur.lastrowid or 0)
            self.gaps[gid] = Gap(gid, symbol, x, y, cause, collector, outage, ref)
            cls = 0 if lead and first is None else 1
            heapq.heappush(self.queue, (cls, self.rank.get(symbol, len(self.rank)), x, gid))
            self.counts["opened"] += 1
            first = gid if first is None else first
        if self.waiter is not None and self.queue:
            waiter, self.waiter = self.waiter, None
            waiter.reply(self._pop())
        return first

    def _pop(self) -> Gap:
        gid = heapq.heappop(self.queue)[-1]
        self.running.add(gid)
        return self.gaps[gid]

    def _request(self, gid: int, at: float, wall: float) -> None:
        """The backfiller is sending a history request for gap ``gid``."""
        gap = self.gaps.get(gid)
        if gap is None:
            return
        delay = at - gap.ref
        self.conn.execute(  # the first request's figures stay, also for a resumed gap
            "UPDATE backfills SET requested_at = COALESCE(requested_at, ?), "
            "start_delay = COALESCE(start_delay, ?), requests = requests + 1 WHERE id = ?",
            (wall, delay, gid),
        )
        outage = self.by_key.get(gap.outage) if gap.outage else None
        if outage is not None and outage.first_request is None:
            outage.first_request = at

    def _gap_done(self, gid: int, stored: int, wall: float) -> None:
        gap = self.gaps.pop(gid, None)
        self.running.discard(gid)
        self.conn.execute(
            "UPDATE backfills SET done_at = ?, stored = ? WHERE id = ?", (wall, stored, gid)
        )
        self.counts["closed"] += 1
        outage = self.by_key.get(gap.outage) if gap is not None and gap.outage else None
        if outage is not None:
            outage.done += 1

    def report(self) -> dict[str, Any]:
        """Outages with their start delays, gap counts and refusals seen."""
        return {
            "outages": [o.as_dict() for o in self.outages],
            "gaps_opened": self.counts["opened"],
            "gaps_closed": self.counts["closed"],
            "queued": len(self.queue),
            "running": len(self.running),
            "denied": self.counts["denied"],
            "rejected_429": self.counts["rejected_429"],
            "scans": self.counts["scans"],
        }


# ---------------------------------------------------------------------------
# The backfiller
# ---------------------------------------------------------------------------


async def _backfiller(owner: trellis.Pid, exchange: str, page: int, retry_max: float) -> None:
    """Take gaps from ``owner`` one at a time and fetch them; linked to ``owner``."""
    loop = asyncio.get_running_loop()
    while True:
        gap: Gap = await trellis.call(owner, "next_gap", timeout=None)
        stored = 0
        cur = gap.from_seq
        delay = 0.05
        while cur <= gap.to_seq:
            await _acquire(owner, retry_max)
            owner.send(("request", gap.id, loop.time(), time.time()))
            end = min(gap.to_seq, cur + page - 1)
            target = f"/history?symbol={quote(gap.symbol)}&from_seq={cur}&to_seq={end}"
            try:
                body = await http_json(exchange, target, timeout=5.0)
            except HttpError as e:
                if e.status == 429:
                    owner.send(("rejected_429", gap.id))
                    await asyncio.sleep(min(retry_max, e.retry_after or delay))
                    continue
                _log.error("backfill of %s %d..%d refused: %s", gap.symbol, cur, end, e)
                break  # a bad request stays bad; the hole scan will find it again
            except (OSError, TimeoutError, ValueError) as e:
                _log.warning("history API unreachable (%s); retrying", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry_max)
                continue
            delay = 0.05
            ticks = [[t["symbol"], t["seq"], t["ts"], t["price"], t["size"]] for t in body["ticks"]]
            if ticks:
                stored += await _store(ticks, retry_max)
            if body["to_seq"] is None:
                break  # not generated yet: nothing more to fetch
            cur = int(body["to_seq"]) + 1
        owner.send(("gap_done", gap.id, stored, time.time()))


async def _acquire(owner: trellis.Pid, retry_max: float) -> None:
    """Wait for a token from the gatekeeper."""
    delay = 0.05
    while True:
        try:
            grant = await trellis.call(GATEKEEPER, ("acquire", 1), timeout=2.0)
        except (trellis.NoProc, trellis.Exited, trellis.CallTimeout):
            await asyncio.sleep(delay)  # the gatekeeper is restarting
            delay = min(delay * 2, retry_max)
            continue
        if grant.granted:
            return
        owner.send(("denied",))
        await asyncio.sleep(min(retry_max, max(0.005, grant.retry_after)))


async def _store(ticks: list[list[Any]], retry_max: float) -> int:
    """Commit ``ticks`` through the store; returns the rows that were new."""
    delay = 0.05
    while True:
        try:
            return int(await trellis.call(STORE, ("write", ticks, True), timeout=5.0))
        except (trellis.NoProc, trellis.Exited, trellis.CallTimeout):
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry_max)

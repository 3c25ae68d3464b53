"""Drive the market-data pipeline from Python: start it, find its parts, check its data.

Example::

    async with Pipeline(symbols=8, seed=1, groups=2, rate=300, workdir=tmp) as p:
        await asyncio.sleep(3)
        trellis.exit(await p.pid(p.collector_paths[0]), trellis.KILL)
        await p.settle()
        report = await p.integrity()
        assert report.ok  # nothing missing, no 429

The tree runs in the current event loop (``p.root`` is its ``SupervisorPid``),
from the same tree file ``trellis run`` uses, rendered with free loopback ports,
the database in ``workdir`` and a fixed feed epoch. One pipeline per Python
process at a time (its parts find each other by registered names).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from examples.market_data._common import (
    GATEKEEPER,
    RECOVERY,
    ROOT,
    SENTINEL,
    STORE,
    connect,
    http_get,
    http_json,
    wait_closers,
)
from examples.market_data.tree import Settings, render_toml

import trellis
import trellis.config

__all__ = ["Integrity", "Pipeline", "PipelineStartError", "free_port"]

_HERE = Path(__file__).resolve().parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Integrity:
    """The pipeline's data checked seq by seq against what the exchange generated.

    ``expected[s]`` is the last seq the exchange had generated for ``s``;
    ``missing[s]`` every seq in ``1..expected[s]`` not stored (only symbols
    with some). ``backfill_delays`` are per outage: seconds from the collector's
    UP to its first history request. ``history_requests`` and ``rejected_429`` are
    ours, kept in the database across restarts; ``exchange_rejected_429`` is what the
    exchange counted since it last started (from anyone).
    """

    expected: dict[str, int]
    stored: dict[str, int]
    missing: dict[str, list[int]]
    gaps_opened: int
    gaps_closed: int
    gaps_by_cause: dict[str, int]
    backfill_delays: list[float]
    backfilled_ticks: int
    rejected_429: int
    history_requests: int
    exchange_rejected_429: int
    checked_at: float = field(default_factory=time.time)

    @property
    def missing_total(self) -> int:
        """How many expected ticks are not stored."""
        return sum(len(v) for v in self.missing.values())

    @property
    def expected_total(self) -> int:
        return sum(self.expected.values())

    @property
    def ok(self) -> bool:
        """Nothing missing and not one 429."""
        return self.missing_total == 0 and self.rejected_429 == self.exchange_rejected_429 == 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with the totals)."""
        out = asdict(self)
        out["missing_total"] = self.missing_total
        out["expected_total"] = self.expected_total
        out["ok"] = self.ok
        return out

    def summary(self) -> str:
        """A few lines for a terminal."""
        delays = sorted(self.backfill_delays)
        worst = f"{delays[-1] * 1000:.0f} ms" if delays else "-"
        lines = [
            f"ticks expected {self.expected_total}, stored {sum(self.stored.values())}, "
            f"missing {self.missing_total} over {len(self.expected)} symbols",
            f"gaps opened {self.gaps_opened}, closed {self.gaps_closed} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.gaps_by_cause.items())) or 'none'}),"
            f" {self.backfilled_ticks} ticks backfilled",
            f"backfill start delay after UP: {len(delays)} outages, worst {worst}",
            f"history requests {self.history_requests}, 429s {self.rejected_429} "
            f"(the exchange counted {self.exchange_rejected_429} since it last started)",
        ]
        for s, seqs in sorted(self.missing.items()):
            shown = ", ".join(map(str, seqs[:10])) + (" ..." if len(seqs) > 10 else "")
            lines.append(f"  {s}: missing {len(seqs)} ({shown})")
        return "\n".join(lines)


class PipelineStartError(RuntimeError):
    """The tree did not start; the message says why (with the exchange's own words)."""


class Pipeline:
    """The market-data tree, started in the current event loop; see the module docstring.

    Keyword arguments beyond the first four set :class:`Settings` fields
    (``groups``, ``rate``, ``silence``, ``gate_rate``...). Ports are picked free
    unless given.
    """

    def __init__(
        self,
        symbols: int = 50,
        seed: int = 1,
        redis_url: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        **settings: Any,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="market-data-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        host = settings.pop("host", "127.0.0.1")
        self.settings = Settings(
            symbols=symbols,
            seed=seed,
            redis_url=redis_url,
            host=host,
            feed_port=settings.pop("feed_port", None) or free_port(host),
            http_port=settings.pop("http_port", None) or free_port(host),
            db=str(self.workdir / "market_data.db"),
            python=sys.executable,
            exchange_script=str(_HERE / "exchange.py"),
            exchange_cwd=str(self.workdir),
            epoch=settings.pop("epoch", None) or time.time(),
            logs=str(self.workdir / "logs"),
            parts="examples.market_data.md_parts",
            **settings,
        )
        self.root: Any = None

    # -- lifecycle -------------------------------------------------------------------
    def tree_text(self) -> str:
        """The tree file this pipeline runs."""
        return render_toml(self.settings)

    async def start(self) -> Any:
        """Start the tree (every part ready when this returns); returns the root pid."""
        if trellis.whereis(ROOT) is not None:
            raise RuntimeError("a market-data pipeline already runs in this process")
        tree = trellis.config.loads(self.tree_text(), source=str(self.workdir / "tree.toml"))
        try:
            self.root = await tree.start()
        except trellis.StartError as e:
            await wait_closers()
            said = self._exchange_said()
            raise PipelineStartError(f"the market-data tree did not start: {e}{said}") from e
        except BaseException:
            await wait_closers()
            raise
        return self.root

    def _exchange_said(self) -> str:
        """The exchange's last stderr lines, for a start error."""
        try:
            # log files are named by the child's path: <root>.exchange.err.log
            [found] = (self.workdir / "logs").glob("*exchange.err.log")
            text = found.read_text("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        lines = [line for line in text.splitlines() if line.strip()][-3:]
        return "; the exchange said: " + " / ".join(lines) if lines else ""

    async def stop(self) -> None:
        """Stop the tree in reverse start order and release everything it held."""
        try:
            if self.root is not None and self.root.alive:
                await self.root.stop()
        finally:
            await wait_closers()
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    async def __aenter__(self) -> Pipeline:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- where things are ------------------------------------------------------------
    @property
    def collector_paths(self) -> list[str]:
        """Tree paths of the collectors (``market_data/collectors/collector-0``, ...)."""
        return [f"{ROOT}/collectors/{cid}" for cid in self.settings.collector_ids()]

    @property
    def paths(self) -> dict[str, str]:
        """Tree paths of every part by role."""
        return {
            "root": ROOT,
            "infra": f"{ROOT}/infra",
            "exchange": f"{ROOT}/infra/exchange",
            "store": f"{ROOT}/infra/store",
            "gatekeeper": f"{ROOT}/infra/gatekeeper",
            "recovery": f"{ROOT}/recovery",
            "collectors": f"{ROOT}/collectors",
            "sentinel": f"{ROOT}/sentinel",
        }

    @property
    def db_path(self) -> str:
        return self.settings.db

    @property
    def exchange_url(self) -> str:
        return self.settings.exchange_url

    async def pid(self, path: str) -> trellis.Pid | None:
        """The running pid at tree ``path`` (``market_data/collectors/collector-0``), or
        None while it is restarting or gone."""
        parts = path.strip("/").split("/")
        if parts and parts[0] == ROOT:
            parts = parts[1:]
        node: Any = self.root
        for part in parts:
            if node is None or not node.alive or not hasattr(node, "which_children"):
                return None
            try:
                infos = await node.which_children()
            except trellis.TrellisError:
                return None
            node = next((i.pid for i in infos if str(i.id) == part), None)
            if not isinstance(node, trellis.Pid):
                return None
        return node if isinstance(node, trellis.Pid) else None

    async def healthy(self, timeout: float = 1.0) -> bool:
        """Whether the service works right now: the exchange answers, every part is
        up and answering, and every collector is subscribed to the feed.

        Example (with ``trellis.chaos``)::

            Chaos(p.root, plan, healthy=p.healthy, integrity=p.figures)
        """
        try:
            status, _h, _b = await http_get(self.exchange_url, "/health", timeout=timeout)
        except (OSError, TimeoutError):
            return False
        if status != 200:
            return False
        try:
            for name, request in ((STORE, "stats"), (GATEKEEPER, "stats"), (RECOVERY, "idle")):
                await trellis.call(name, request, timeout=timeout)
            await trellis.call(SENTINEL, "stats", timeout=timeout)
            for path in self.collector_paths:
                pid = await self.pid(path)
                if pid is None:
                    return False
                if not (await trellis.call(pid, "stats", timeout=timeout))["connected"]:
                    return False
        except (trellis.NoProc, trellis.Exited, trellis.CallTimeout):
            return False
        return True

    # -- figures ---------------------------------------------------------------------
    async def exchange_stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """The exchange's ``/stats``, retried while it restarts (up to ``timeout``)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                stats: dict[str, Any] = await http_json(self.exchange_url, "/stats", timeout=2.0)
                return stats
            except (OSError, TimeoutError):
                if asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.1)

    async def _flush_store(self) -> None:
        try:
            await trellis.call(STORE, "flush", timeout=2.0)
        except (trellis.NoProc, trellis.Exited, trellis.CallTimeout):
            pass

    def _complete(self, expected: dict[str, int]) -> dict[str, int]:
        """Stored seqs in ``1..expected[s]`` per symbol (equal to it means complete)."""
        conn = connect(self.settings.db)
        try:
            return {
                s: conn.execute(
                    "SELECT COUNT(*) FROM ticks WHERE symbol = ? AND seq <= ?", (s, e)
                ).fetchone()[0]
                for s, e in expected.items()
            }
        finally:
            conn.close()

    async def settle(self, timeout: float = 30.0) -> bool:
        """Wait until every tick the exchange had generated when this was called is
        stored and the recovery worker is idle; False if ``timeout`` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        expected = (await self.exchange_stats())["generated"]
        while True:
            await self._flush_store()
            complete = self._complete(expected) == expected
            try:
                idle = bool(await trellis.call(RECOVERY, "idle", timeout=2.0))
            except (trellis.NoProc, trellis.Exited, trellis.CallTimeout):
                idle = False
            if complete and idle:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def integrity(self, wait: float = 2.0) -> Integrity:
        """Compare every symbol's stored seqs with ``1..last generated`` (no sampling).

        Ticks still in flight get up to ``wait`` seconds to land first.
        """
        loop = asyncio.get_running_loop()
        stats = await self.exchange_stats()
        expected: dict[str, int] = stats["generated"]
        deadline = loop.time() + wait
        while True:
            await self._flush_store()
            if self._complete(expected) == expected or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        conn = connect(self.settings.db)
        try:
            stored: dict[str, int] = {}
            missing: dict[str, list[int]] = {}
            for s, last in expected.items():
                want = 1
                gone: list[int] = []
                n = 0
                for (seq,) in conn.execute(
                    "SELECT seq FROM ticks WHERE symbol = ? AND seq <= ? ORDER BY seq", (s, last)
                ):
                    gone.extend(range(want, seq))
                    want = seq + 1
                    n += 1
                gone.extend(range(want, last + 1))
                stored[s] = n
                if gone:
                    missing[s] = gone
            rows = conn.execute(
                "SELECT cause, outage, start_delay, done_at, stored, requests, rejected "
                "FROM backfills"
            ).fetchall()
        finally:
            conn.close()
        by_cause: dict[str, int] = {}
        first: dict[str, float] = {}
        for cause, outage, delay, *_ in rows:
            by_cause[cause] = by_cause.get(cause, 0) + 1
            if outage is not None and delay is not None:
                first[outage] = min(delay, first.get(outage, delay))
        stats = await self.exchange_stats()
        return Integrity(
            expected=expected,
            stored=stored,
            missing=missing,
            gaps_opened=len(rows),
            gaps_closed=sum(1 for r in rows if r[3] is not None),
            gaps_by_cause=by_cause,
            backfill_delays=list(first.values()),
            backfilled_ticks=sum(r[4] or 0 for r in rows),
            rejected_429=sum(r[6] for r in rows),
            history_requests=sum(r[5] for r in rows),
            exchange_rejected_429=int(stats["rejected_429"]),
        )

    async def figures(self, settle: float | None = None) -> dict[str, Any]:
        """Everything a report needs: integrity, exchange stats, the gatekeeper's,
        the recovery worker's and the sentinel's (None for a part that is down).

        With ``settle`` seconds, first wait for the backfills (:meth:`settle`); the
        dict then says whether they finished (``"settled"``).

        Example::

            Chaos(p.root, plan, integrity=lambda: p.figures(settle=60))
        """
        settled = await self.settle(settle) if settle is not None else None

        async def ask(name: Any, request: Any) -> Any:
            try:
                return await trellis.call(name, request, timeout=2.0)
            except (trellis.NoProc, trellis.Exited, trellis.CallTimeout):
                return None

        integrity = await self.integrity()
        gate = await ask(GATEKEEPER, "stats")
        collectors = {}
        for path in self.collector_paths:
            pid = await self.pid(path)
            collectors[path] = await ask(pid, "stats") if pid is not None else None
        return {
            "settled": settled,
            "integrity": integrity.to_dict(),
            "exchange": await self.exchange_stats(),
            "gatekeeper": asdict(gate) if gate is not None else None,
            "recovery": await ask(RECOVERY, "report"),
            "sentinel": await ask(SENTINEL, "stats"),
            "collectors": collectors,
        }

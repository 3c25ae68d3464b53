"""The main job: the market-data pipeline under a seeded chaos schedule, shown live while
it runs, then a report that checks every symbol's ticks by sequence number.

From a fresh clone (``scripts/main-job`` sets up ``.venv`` first)::

    scripts/main-job                          # 50 symbols, about 60 s of chaos
    scripts/main-job --seed 7 --seconds 30 --json report.json
    scripts/main-job --redis redis://127.0.0.1:6379/0   # Redis store + gatekeeper, outage

From Python::

    result = await run_job(JobOptions(seconds=10, seed=3, symbols=8, groups=2))
    assert result.ok, result.failures

The run: a journal (``trellis.journal.Journal``, SQLite in the work directory) and
metrics (``trellis.metrics.Metrics``) are attached before the tree starts and stay until
it has stopped, so every supervision event and every fault (``operator.action`` by
``chaos``) is journaled. The plan (:func:`chaos_specs`, fixed by the seed and printed
first) kills, crashes and hangs collectors (the sentinel kills the hung one as
``hung``), kills the store and the gatekeeper, SIGKILLs and SIGSTOPs the exchange (an
OS process; its watchdog restarts it as ``hung``), and with ``--redis`` cuts Redis
through a ``trellis.chaos.ChaosProxy``. After the plan, the backfill settles and the
report says whether every tick is stored, no 429 came back, every gap closed, and the
journal verifies; the exit code is 0 only then.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from examples.market_data._common import (
    GATEKEEPER,
    RECOVERY,
    ROOT,
    http_json,
    redis_client,
    redis_errors,
)
from examples.market_data.pipeline import Integrity, Pipeline, PipelineStartError
from examples.market_data.recovery import reason_class
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

import trellis
from trellis import chaos
from trellis.journal import Journal, tail, verify
from trellis.metrics import Metrics

__all__ = [
    "JobOptions",
    "JobResult",
    "chaos_specs",
    "job_plan",
    "main",
    "run_job",
]

_log = logging.getLogger("market_data.main_job")

#: Backfills should start this soon after a collector is UP again (the seed user's was 5 min).
BACKFILL_TARGET = 1.0


# ---------------------------------------------------------------------------
# Options and the plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JobOptions:
    """What to run: pipeline size, chaos length and seed, where to keep the files.

    ``seed`` fixes the whole run: the exchange's ticks and the chaos plan (``None``
    draws one, printed first). ``silence``, ``heartbeat`` and ``exchange_watchdog``
    are the pipeline's :class:`~examples.market_data.tree.Settings` (the plan's hang
    durations follow them). ``live`` shows the rich live view (``None``: when the
    console is a terminal); otherwise a status line every ``status_every`` seconds.
    """

    seconds: float = 60.0
    seed: int | None = None
    symbols: int = 50
    groups: int = 4
    rate: float = 200.0
    redis: str | None = None
    workdir: str | None = None
    settle: float = 60.0
    max_concurrent: int = 3
    silence: float = 2.0
    heartbeat: float = 0.2
    exchange_watchdog: float = 1.5
    live: bool | None = None
    status_every: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("seconds", "settle", "rate", "silence", "heartbeat", "exchange_watchdog"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                problems.append(f"{name} must be a number, got {v!r}")
            elif not v > 0:
                problems.append(f"{name} must be > 0, got {v!r}")
        if not self.status_every > 0:
            problems.append(f"status_every must be > 0, got {self.status_every!r}")
        if isinstance(self.seconds, int | float) and 0 < self.seconds < 4:
            problems.append(f"seconds must be >= 4 (the plan needs room), got {self.seconds!r}")
        for name in ("symbols", "groups", "max_concurrent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be an int >= 1, got {v!r}")
        symbols, groups = self.symbols, self.groups
        if isinstance(symbols, int) and isinstance(groups, int) and groups > symbols:
            problems.append(f"groups ({groups}) must not exceed symbols ({symbols})")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            problems.append(f"seed must be an int, got {seed!r}")
        if self.redis is not None:
            url = urlsplit(self.redis)
            if url.scheme != "redis" or not url.hostname:
                problems.append(
                    f"redis must be a URL like redis://127.0.0.1:6379/0, got {self.redis!r}"
                )
        if problems:
            raise ValueError("main job: " + "; ".join(problems))


def chaos_specs(
    seconds: float, *, silence: float = 2.0, exchange_watchdog: float = 1.5, redis: bool = False
) -> list[dict[str, Any]]:
    """The main job's fault specs for a run of ``seconds`` (``trellis.chaos.Plan`` input).

    The run is cut into one window per fault (a hang's window twice as wide: the
    sentinel or the watchdog takes a while), so one fault has healed before the next:

    kill a collector, SIGKILL the exchange, kill a collector, hang a collector (the
    sentinel kills it as hung), kill the store, kill a collector, SIGSTOP the exchange
    (its watchdog restarts it as hung), kill a collector, kill the gatekeeper, crash a
    collector (``raise``), kill a collector. With ``redis`` a Redis outage spans the
    hang's window, so that gap is backfilled while the gatekeeper is in fallback.

    The seed jitters each time within its window and picks the collectors.

    Example::

        plan = Plan.from_spec(chaos_specs(60), seed=7, duration=60)
        print(plan.describe())
    """
    collector = {"target": f"{ROOT}/collectors/collector-*", "count": 1}
    infra = f"{ROOT}/infra"
    sequence: list[tuple[dict[str, Any], float]] = [
        ({"fault": "kill", **collector}, 1.0),
        ({"fault": "kill", "target": f"{infra}/exchange"}, 1.5),
        ({"fault": "kill", **collector}, 1.0),
        ({"fault": "hang", **collector, "duration": silence + 1.5}, 2.0),
        ({"fault": "kill", "target": f"{infra}/store"}, 1.0),
        ({"fault": "kill", **collector}, 1.0),
        ({"fault": "hang", "target": f"{infra}/exchange", "duration": exchange_watchdog + 1.5},
         2.0),
        ({"fault": "kill", **collector}, 1.0),
        ({"fault": "kill", "target": f"{infra}/gatekeeper"}, 1.0),
        ({"fault": "raise", **collector}, 1.0),
        ({"fault": "kill", **collector}, 1.0),
    ]  # fmt: skip
    lead_in = 0.5  # the pipeline runs undisturbed first
    unit = float(seconds) / (lead_in + sum(w for _, w in sequence))
    specs: list[dict[str, Any]] = []
    start = lead_in * unit
    for spec, weight in sequence:
        width = weight * unit
        # one occurrence in (start + 0.1 width, start + 0.5 width): `every` longer than
        # the run, and the seed's jitter
        specs.append(
            {**spec, "every": float(seconds), "start": start + 0.3 * width, "jitter": 0.2 * width}
        )
        if redis and spec["fault"] == "hang" and spec["target"] == collector["target"]:
            specs.append(
                {
                    "fault": "outage",
                    "proxy": "redis",
                    # until the sentinel's kill and the backfill are over
                    "duration": max(0.9 * width, 0.55 * width + silence + 1.0),
                    "every": float(seconds),
                    "start": start + 0.05 * width,
                    "jitter": 0.01 * width,
                }
            )
        start += width
    return specs


def job_plan(opts: JobOptions, seed: int | None = None) -> chaos.Plan:
    """The plan of a run with ``opts`` (``seed`` overrides ``opts.seed``)."""
    return chaos.Plan.from_spec(
        chaos_specs(
            opts.seconds,
            silence=opts.silence,
            exchange_watchdog=opts.exchange_watchdog,
            redis=opts.redis is not None,
        ),
        seed=opts.seed if seed is None else seed,
        duration=opts.seconds,
        where="main-job",
    )


# ---------------------------------------------------------------------------
# Watching the run (telemetry, no I/O in the handler)
# ---------------------------------------------------------------------------


@dataclass
class _Episode:
    started: float
    ended: float | None = None
    how: str = "still in fallback"


class _Watch:
    """Counts what the live view and the report need, from telemetry."""

    EVENTS = (
        "child.exited",
        "child.restarted",
        "operator.action",
        "market_data.gatekeeper.fallback",
        "market_data.gatekeeper.restored",
        "market_data.sentinel.hung",
    )

    def __init__(self, t0: float, gatekeeper_path: str, exchange_path: str) -> None:
        self.t0 = t0
        self.gatekeeper_path = gatekeeper_path
        self.exchange_path = exchange_path
        self.exchange_down: list[list[float | None]] = []  # [down, up] since t0
        self.restarts: dict[str, int] = {}
        self.last_exit: dict[str, str] = {}
        self.faults = 0  # chaos fault actions that worked
        self.actions: list[str] = []
        self.hung_kills = 0
        self.episodes: list[_Episode] = []
        self._hid: object | None = None

    def attach(self) -> _Watch:
        self._hid = trellis.telemetry.attach(self._on_event, list(self.EVENTS))
        return self

    def detach(self) -> None:
        if self._hid is not None:
            trellis.telemetry.detach(self._hid)
            self._hid = None

    @property
    def fallback(self) -> bool:
        return bool(self.episodes) and self.episodes[-1].ended is None

    def _on_event(self, event: dict[str, Any]) -> None:
        name = event["event"]
        t = float(event.get("time") or 0.0) - self.t0
        if name == "operator.action":
            if event.get("who") != "chaos":
                return
            action = str(event.get("action"))
            if action.startswith("fault:") and event.get("result") == "ok":
                self.faults += 1
            self.actions.append(f"{t:6.1f}s {action} {event.get('target')} {event.get('result')}")
            del self.actions[:-4]
            return
        if name == "market_data.gatekeeper.fallback":
            if not self.fallback:
                self.episodes.append(_Episode(t))
            return
        if name == "market_data.gatekeeper.restored":
            self._end_episode(t, "returned to Redis")
            return
        if name == "market_data.sentinel.hung":
            self.hung_kills += 1
            return
        path = f"{event.get('supervisor')}/{event.get('child_id')}"
        if name == "child.exited":
            self.last_exit[path] = reason_class(event.get("reason"))
            if path == self.exchange_path:
                self.exchange_down.append([t, None])
            return
        self.restarts[path] = self.restarts.get(path, 0) + 1
        if path == self.exchange_path and self.exchange_down and self.exchange_down[-1][1] is None:
            self.exchange_down[-1][1] = t
        if path == self.gatekeeper_path:  # also when its rest_for_one sibling failed
            self._end_episode(t, "gatekeeper restarted (the new one starts on Redis)")

    def _end_episode(self, t: float, how: str) -> None:
        if self.fallback:
            self.episodes[-1].ended = t
            self.episodes[-1].how = how


async def _tree_rows(root: Any, timeout: float = 0.5) -> list[tuple[int, str, str, str, Any]]:
    """``(depth, path, id, state, os_pid)`` of every node, parents first, start order."""
    rows: list[tuple[int, str, str, str, Any]] = []

    async def visit(sup: Any, path: str, depth: int) -> None:
        try:
            infos = await asyncio.wait_for(sup.which_children(), timeout)
        except (trellis.TrellisError, TimeoutError):
            rows.append((depth, path + "/…", "…", "busy", None))
            return
        for info in reversed(infos):  # newest first
            child = f"{path}/{info.id}"
            pid = info.pid
            if isinstance(pid, trellis.Pid):
                state = "running" if pid.alive else "stopped"
            else:
                state = "stopped" if pid is None else "restarting"
            os_pid = getattr(pid, "os_pid", None) if isinstance(pid, trellis.Pid) else None
            rows.append((depth, child, str(info.id), state, os_pid))
            if str(info.type) == "supervisor" and isinstance(pid, trellis.Pid) and pid.alive:
                await visit(pid, child, depth + 1)

    if root is not None and root.alive:
        rows.append((0, ROOT, ROOT, "running", None))
        await visit(root, ROOT, 1)
    else:
        rows.append((0, ROOT, ROOT, "stopped", None))
    return rows


def _db_counts(db: str) -> tuple[int, int, int]:
    """(ticks stored, gaps open, gaps closed), read in a thread."""
    conn = sqlite3.connect(db, timeout=2.0)
    try:
        ticks = conn.execute("SELECT COUNT(*) FROM ticks").fetchone()[0]
        open_, closed = conn.execute(
            "SELECT COALESCE(SUM(done_at IS NULL), 0), COALESCE(SUM(done_at IS NOT NULL), 0) "
            "FROM backfills"
        ).fetchone()
        return int(ticks), int(open_), int(closed)
    except sqlite3.Error:
        return -1, -1, -1
    finally:
        conn.close()


@dataclass
class _Snapshot:
    elapsed: float
    rows: list[tuple[int, str, str, str, Any]]
    ticks: int
    generated: int | None
    open_gaps: int
    closed_gaps: int
    faults: int
    planned: int
    mode: str
    hung_kills: int
    actions: list[str]


async def _snapshot(p: Pipeline, watch: _Watch, planned: int, redis: bool) -> _Snapshot:
    loop = asyncio.get_running_loop()
    rows = await _tree_rows(p.root)
    ticks, open_gaps, closed = await asyncio.to_thread(_db_counts, p.db_path)
    try:
        stats = await http_json(p.exchange_url, "/stats", timeout=0.5)
        generated: int | None = int(stats["ticks_total"])
    except (OSError, TimeoutError, ValueError, KeyError):
        generated = None
    mode = ("FALLBACK (local limit)" if watch.fallback else "redis") if redis else "local"
    return _Snapshot(
        loop.time() - watch.t0,
        rows,
        ticks,
        generated,
        open_gaps,
        closed,
        watch.faults,
        planned,
        mode,
        watch.hung_kills,
        list(watch.actions),
    )


def _live_view(snap: _Snapshot, watch: _Watch, seconds: float, seed: int) -> RenderableType:
    head = Text.assemble(
        ("market-data main job", "bold"),
        f"  seed {seed}  {snap.elapsed:5.1f}s of {seconds:g}s chaos  ",
        (f"faults injected {snap.faults}", "yellow"),
        f" ({snap.planned} planned steps)",
    )
    gen = "-" if snap.generated is None else str(snap.generated)
    figures = Text(
        f"ticks stored {snap.ticks} / generated {gen}   open gaps {snap.open_gaps} "
        f"(closed {snap.closed_gaps})   gatekeeper {snap.mode}   sentinel hung kills "
        f"{snap.hung_kills}"
    )
    t = Table(box=None, pad_edge=False, show_edge=False)
    t.add_column("node")
    t.add_column("state")
    t.add_column("restarts", justify="right")
    t.add_column("last exit")
    t.add_column("os pid", justify="right")
    colour = {"running": "green", "restarting": "yellow", "stopped": "red", "busy": "yellow"}
    for depth, path, cid, state, os_pid in snap.rows:
        t.add_row(
            "  " * depth + cid,
            Text(state, style=colour.get(state, "")),
            str(watch.restarts.get(path, 0)),
            watch.last_exit.get(path, ""),
            "" if os_pid is None else str(os_pid),
        )
    recent = Text("\n".join(snap.actions) or "(no fault yet)", style="dim")
    return Group(head, figures, t, Text("recent chaos actions:", style="bold"), recent)


def _status_line(snap: _Snapshot, watch: _Watch) -> str:
    down = [cid for _d, _p, cid, state, _o in snap.rows if state not in ("running",)]
    gen = "-" if snap.generated is None else str(snap.generated)
    restarts = sum(watch.restarts.values())
    return (
        f"[{snap.elapsed:6.1f}s] faults {snap.faults}/{snap.planned}  restarts {restarts}  "
        f"ticks {snap.ticks}/{gen}  open gaps {snap.open_gaps}  gatekeeper {snap.mode}"
        + (f"  not running: {', '.join(down)}" if down else "")
    )


# ---------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------


@dataclass
class JobResult:
    """The main job's outcome: ``ok`` and ``failures`` (why not), ``report`` (the JSON
    report as a dict), ``chaos`` (the chaos engine's report) and ``integrity``."""

    ok: bool
    failures: list[str]
    report: dict[str, Any]
    chaos: chaos.Report | None = None
    integrity: Integrity | None = None
    exit_code: int = field(init=False)

    def __post_init__(self) -> None:
        self.exit_code = 0 if self.ok else 1


def _pct(values: list[float], q: float) -> float | None:
    return chaos.percentile(values, q)


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}s"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def _metrics_summary(metrics: Metrics) -> dict[str, Any]:
    """Restart and exit counters (by exit class) from the Prometheus registry."""
    out: dict[str, Any] = {"child_restarts_total": {}, "child_exits_total": {}}
    for family in metrics.registry.collect():
        for sample in family.samples:
            for name in ("child_restarts_total", "child_exits_total"):
                if sample.name == f"trellis_{name}":
                    reason = sample.labels.get("reason", "?")
                    out[name][reason] = out[name].get(reason, 0) + int(sample.value)
    return out


def _journal_figures(url: str, injected: list[chaos.FaultResult]) -> dict[str, Any]:
    """``journal verify`` and the chaos actions the journal holds."""
    result = verify(url)
    faults: list[dict[str, Any]] = []
    heals = 0
    kinds: dict[str, int] = {}
    for record in tail(url, since_seq=1):
        kind = str(record["kind"])
        kinds[kind] = kinds.get(kind, 0) + 1
        data = record.get("data")
        if kind != "operator.action" or not isinstance(data, dict) or data.get("who") != "chaos":
            continue
        action = str(data.get("action", ""))
        if action.startswith("fault:"):
            detail = data.get("detail") or {}
            faults.append(
                {
                    "fault": detail.get("fault") if isinstance(detail, dict) else None,
                    "action": action,
                    "target": data.get("target"),
                    "result": data.get("result"),
                }
            )
        elif action.startswith("heal:"):
            heals += 1
    journaled = {(f["fault"], f["action"], f["target"]) for f in faults if f["result"] == "ok"}
    unjournaled = [f.id for f in injected if (f.id, f"fault:{f.fault}", f.target) not in journaled]
    return {
        "url": url,
        "ok": result.ok,
        "records": result.records,
        "problem": result.problem,
        "first_bad_seq": result.first_bad_seq,
        "chaos_faults": len(faults),
        "chaos_heals": heals,
        "injected_not_journaled": unjournaled,
        "records_by_kind": dict(sorted(kinds.items())),
    }


def _build_report(
    *,
    opts: JobOptions,
    seed: int,
    plan: chaos.Plan,
    workdir: Path,
    creport: chaos.Report,
    integrity: Integrity,
    settled: bool,
    recovery: dict[str, Any] | None,
    gatekeeper: dict[str, Any] | None,
    episodes: list[_Episode],
    journal: dict[str, Any],
    metrics: dict[str, Any],
    hung_kills: int,
    t0: float,
    exchange_down: list[list[float | None]],
) -> tuple[dict[str, Any], list[str]]:
    summary = creport.summary()
    delays = sorted(integrity.backfill_delays)
    symbols = [
        {
            "symbol": s,
            "expected": integrity.expected[s],
            "stored": integrity.stored.get(s, 0),
            "missing": len(integrity.missing.get(s, [])),
        }
        for s in integrity.expected
    ]
    failures = []
    if integrity.missing_total:
        failures.append(
            f"{integrity.missing_total} ticks missing in {len(integrity.missing)} symbols"
        )
    if integrity.rejected_429 or integrity.exchange_rejected_429:
        failures.append(
            f"429s received: {integrity.rejected_429} (the exchange counted "
            f"{integrity.exchange_rejected_429})"
        )
    if integrity.gaps_closed != integrity.gaps_opened:
        failures.append(
            f"{integrity.gaps_opened - integrity.gaps_closed} of {integrity.gaps_opened} gaps "
            "not closed"
        )
    if not journal["ok"]:
        failures.append(f"journal verify BROKEN: {journal['problem']}")
    if journal["injected_not_journaled"]:
        failures.append(f"faults not journaled: {', '.join(journal['injected_not_journaled'])}")
    report = {
        "seed": seed,
        "seconds": opts.seconds,
        "symbols": opts.symbols,
        "groups": opts.groups,
        "rate": opts.rate,
        "redis": opts.redis,
        "workdir": str(workdir),
        "ok": not failures,
        "failures": failures,
        "settled": settled,
        "chaos": creport.to_dict(),
        "ticks": {
            "expected": integrity.expected_total,
            "stored": sum(integrity.stored.values()),
            "missing": integrity.missing_total,
            "symbols_checked": len(integrity.expected),
            "per_symbol": symbols,
            "missing_seqs": integrity.missing,
        },
        "gaps": {
            "opened": integrity.gaps_opened,
            "closed": integrity.gaps_closed,
            "by_cause": integrity.gaps_by_cause,
            "backfilled_ticks": integrity.backfilled_ticks,
        },
        "recover": {
            "p50": summary["recover_p50"],
            "p95": summary["recover_p95"],
            "recovered": summary["recovered"],
            "detect_p50": summary["detect_p50"],
            "detect_p95": summary["detect_p95"],
        },
        "backfill_start_delay": {
            "outages": len(delays),
            "p50": _pct(delays, 50),
            "max": delays[-1] if delays else None,
            "target": BACKFILL_TARGET,
            "met": all(d < BACKFILL_TARGET for d in delays),
            "over_target": _slow_outages(recovery, t0, exchange_down),
        },
        "rate_limit": {
            "history_requests": integrity.history_requests,
            "rejected_429": integrity.rejected_429,
            "exchange_rejected_429": integrity.exchange_rejected_429,
        },
        "fallback": {
            "episodes": [asdict(e) for e in episodes],
            "mode_at_end": gatekeeper["mode"] if gatekeeper is not None else None,
        },
        "gatekeeper": gatekeeper,
        "sentinel_hung_kills": hung_kills,
        "recovery": recovery,
        "journal": journal,
        "metrics": metrics,
    }
    return report, failures


def _slow_outages(
    recovery: dict[str, Any] | None, t0: float, exchange_down: list[list[float | None]]
) -> list[dict[str, Any]]:
    """The outages whose backfill started ``BACKFILL_TARGET`` or later after UP, and
    whether the exchange was down meanwhile (a collector cannot resubscribe then)."""
    out = []
    for o in (recovery or {}).get("outages", []):
        delay = o.get("start_delay")
        if delay is None or delay < BACKFILL_TARGET or o.get("up_at") is None:
            continue
        up = o["up_at"] - t0
        overlap = any(
            a is not None and a < up + delay and (b is None or b > up) for a, b in exchange_down
        )
        out.append(
            {
                "collector": o["collector"],
                "reason": o["reason"],
                "up_at": up,
                "delay": delay,
                "exchange_down_meanwhile": overlap,
            }
        )
    return out


def _render_report(report: dict[str, Any], creport: chaos.Report, console: Console) -> None:
    console.rule("chaos report")
    console.print(creport.renderable())
    ticks = report["ticks"]
    console.rule("ticks: expected vs stored per symbol (every seq compared)")
    t = Table(box=None, pad_edge=False)
    for col in ("symbol", "expected", "stored", "missing"):
        t.add_column(col, justify="left" if col == "symbol" else "right")
    rows = ticks["per_symbol"]
    shown = [r for i, r in enumerate(rows) if i < 10 or r["missing"]]
    for r in shown:
        t.add_row(r["symbol"], str(r["expected"]), str(r["stored"]), str(r["missing"]))
    if len(rows) > len(shown):
        rest = [r for r in rows if r not in shown]
        complete = "all complete" if not any(r["missing"] for r in rest) else "SOME MISSING"
        t.add_row(f"… {len(rest)} more", str(sum(r["expected"] for r in rest)),
                  str(sum(r["stored"] for r in rest)), str(sum(r["missing"] for r in rest)),
                  end_section=True)  # fmt: skip
        t.add_row(Text(f"({complete})", style="dim"), "", "", "", end_section=True)
    t.add_row("total", str(ticks["expected"]), str(ticks["stored"]), str(ticks["missing"]),
              style="bold")  # fmt: skip
    console.print(t)
    console.print(
        f"ticks expected {ticks['expected']}, stored {ticks['stored']}, missing "
        f"{ticks['missing']} ({ticks['symbols_checked']} symbols, every seq 1..last compared)"
    )
    console.rule("recovery")
    g = report["gaps"]
    causes = ", ".join(f"{k} {v}" for k, v in sorted(g["by_cause"].items())) or "none"
    console.print(
        f"gaps opened {g['opened']}, closed {g['closed']} ({causes}); "
        f"{g['backfilled_ticks']} ticks backfilled"
    )
    r = report["recover"]
    console.print(
        f"time to recover: p50 {_secs(r['p50'])}, p95 {_secs(r['p95'])} "
        f"({r['recovered']} faults recovered)"
    )
    b = report["backfill_start_delay"]
    met = "met" if b["met"] else "NOT met"
    console.print(
        f"backfill start delay after UP: p50 {_ms(b['p50'])}, max {_ms(b['max'])} over "
        f"{b['outages']} outages (target < {b['target']:g} s: {met})"
    )
    for o in b["over_target"]:
        why = " (the exchange was down meanwhile)" if o["exchange_down_meanwhile"] else ""
        console.print(
            f"  {o['collector']} ({o['reason']}) UP at {o['up_at']:.1f}s: first history "
            f"request after {_ms(o['delay'])}{why}"
        )
    console.print(f"sentinel: {report['sentinel_hung_kills']} hung collectors killed")
    rl = report["rate_limit"]
    console.print(
        f"429s received: {rl['rejected_429']} (history requests {rl['history_requests']}; the "
        f"exchange counted {rl['exchange_rejected_429']} since it last started)"
    )
    if report["redis"] is not None:
        eps = report["fallback"]["episodes"]
        mode = report["fallback"]["mode_at_end"]
        console.print(f"gatekeeper fallback episodes: {len(eps)} (mode at the end: {mode})")
        for e in eps:
            end = "-" if e["ended"] is None else f"{e['ended']:.1f}s"
            console.print(f"  {e['started']:.1f}s -> {end}: {e['how']}")
    console.rule("journal and metrics")
    j = report["journal"]
    state = "OK" if j["ok"] else f"BROKEN at seq {j['first_bad_seq']}: {j['problem']}"
    console.print(f"journal verify: {state}, {j['records']} records ({j['url']})")
    console.print(
        f"journaled chaos actions: {j['chaos_faults']} faults, {j['chaos_heals']} heals "
        f"(every injected fault journaled: {'yes' if not j['injected_not_journaled'] else 'NO'})"
    )
    m = report["metrics"]
    restarts = m["child_restarts_total"]
    console.print(
        f"metrics: trellis_child_restarts_total {sum(restarts.values())} ("
        + ", ".join(f"{k} {v}" for k, v in sorted(restarts.items()))
        + ")"
    )
    console.rule()
    if report["ok"]:
        console.print("RESULT: OK (no tick missing, no 429, every gap closed, journal verified)")
    else:
        console.print("RESULT: FAILED: " + "; ".join(report["failures"]))


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


class JobError(Exception):
    """The job could not run or finish: a dependency is unreachable, the tree did not
    start (``code`` 2), or it stopped during the run (``code`` 1)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def _quiet_logs(level: str) -> Iterator[None]:
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    try:
        yield
    finally:
        root.handlers[:] = old_handlers
        root.setLevel(old_level)


async def _check_redis(url: str) -> None:
    client = redis_client(url, timeout=2.0)
    try:
        await client.ping()
    except redis_errors() as e:
        raise JobError(f"--redis {url}: Redis does not answer ({e})") from None
    finally:
        await client.aclose()


def _proxied(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = (auth + "@" if auth else "") + f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def _ask(name: str, request: Any) -> Any:
    """A part's answer, or None while it is down."""
    try:
        return await trellis.call(name, request, timeout=2.0)
    except (trellis.NoProc, trellis.Exited, trellis.CallTimeout):
        return None


def _workdir(given: str | None) -> tuple[Path, str]:
    """The work directory (made if missing) and the journal's URL in it."""
    workdir = Path(given or tempfile.mkdtemp(prefix="market-data-chaos-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    journal_path = workdir / "journal.db"
    if journal_path.exists():
        raise JobError(f"{journal_path} exists: give a fresh --workdir (one journal per run)")
    return workdir, f"sqlite:///{journal_path}"


def _write_json(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n", "utf-8")


async def run_job(
    opts: JobOptions,
    console: Console | None = None,
    *,
    json_path: str | os.PathLike[str] | None = None,
) -> JobResult:
    """Run the main job with ``opts``, printing to ``console`` (default stdout); the
    report also goes to ``json_path`` as JSON. Raises :class:`JobError` when it cannot
    run at all.

    Example::

        result = await run_job(JobOptions(seconds=10, symbols=8, groups=2, seed=3))
        print(result.ok, result.failures)
    """
    console = console or Console()
    seed = opts.seed if opts.seed is not None else int.from_bytes(os.urandom(4), "big")
    opts = replace(opts, seed=seed)
    plan = job_plan(opts)
    workdir, journal_url = _workdir(opts.workdir)
    console.print(f"seed {seed} (rerun this exact schedule with --seed {seed})")
    console.print(plan.describe(), markup=False, highlight=False)
    console.print(f"work directory {workdir} (journal {journal_url})", markup=False)

    if opts.redis is not None:
        await _check_redis(opts.redis)
    loop = asyncio.get_running_loop()
    proxies: dict[str, chaos.ChaosProxy] = {}
    journal = Journal(journal_url, node="market-data")
    metrics = Metrics(node="market-data")
    engine: chaos.Chaos | None = None
    p: Pipeline | None = None
    watch: _Watch | None = None
    try:
        redis_url = None
        if opts.redis is not None:
            up = urlsplit(opts.redis)
            proxy = chaos.ChaosProxy((up.hostname or "127.0.0.1", up.port or 6379), name="redis")
            proxies["redis"] = await proxy.start()
            redis_url = _proxied(opts.redis, proxy.port)
        try:
            p = Pipeline(
                symbols=opts.symbols,
                seed=seed,
                redis_url=redis_url,
                workdir=workdir,
                groups=opts.groups,
                rate=opts.rate,
                silence=opts.silence,
                heartbeat=opts.heartbeat,
                exchange_watchdog=opts.exchange_watchdog,
                namespace=f"trellis:md:{seed}:{os.getpid()}",
            )
        except ValueError as e:  # settings that cannot work together
            raise JobError(str(e)) from None
        await journal.start()  # before the tree starts: every event of it is journaled
        metrics.attach()
        watch = _Watch(loop.time(), p.paths["gatekeeper"], p.paths["exchange"]).attach()
        try:
            await p.start()
        except PipelineStartError as e:
            raise JobError(str(e)) from None
        metrics.track(p.root)
        watch.t0 = loop.time()
        engine = await chaos.start(
            p.root,
            plan,
            proxies=proxies,
            max_concurrent=opts.max_concurrent,
            healthy=p.healthy,
            recover_timeout=30.0,
            settle=10.0,
        )
        creport = await _watch_run(engine, p, watch, opts, seed, len(plan.steps), console)
        console.print("chaos plan done; waiting for the backfill to settle...")
        if p.root is None or not p.root.alive:
            raise JobError("the pipeline's tree stopped during the run (its root gave up)", 1)
        try:
            settled = await p.settle(timeout=opts.settle)
            integrity = await p.integrity()
        except (OSError, TimeoutError) as e:
            raise JobError(f"the exchange stopped answering after the run: {e}", 1) from None
        recovery = await _ask(RECOVERY, "report")
        gate = await _ask(GATEKEEPER, "stats")
        metrics_figures = _metrics_summary(metrics)
    finally:
        if engine is not None:
            await engine.stop()
        if p is not None:
            await p.stop()
        await journal.stop()
        metrics.detach()
        if watch is not None:
            watch.detach()
        for proxy in proxies.values():
            await proxy.close()
    journal_figures = await asyncio.to_thread(_journal_figures, journal_url, creport.injected)
    report, failures = _build_report(
        opts=opts,
        seed=seed,
        plan=plan,
        workdir=workdir,
        creport=creport,
        integrity=integrity,
        settled=settled,
        recovery=recovery,
        gatekeeper=asdict(gate) if gate is not None else None,
        episodes=watch.episodes,
        journal=journal_figures,
        metrics=metrics_figures,
        hung_kills=watch.hung_kills,
        t0=watch.t0,
        exchange_down=watch.exchange_down,
    )
    _render_report(report, creport, console)
    if json_path is not None:
        _write_json(json_path, report)
        console.print(f"report written to {json_path}")
    return JobResult(not failures, failures, report, creport, integrity)


async def _watch_run(
    engine: chaos.Chaos,
    p: Pipeline,
    watch: _Watch,
    opts: JobOptions,
    seed: int,
    planned: int,
    console: Console,
) -> chaos.Report:
    """Show status until the chaos run is over; its report."""
    done = asyncio.ensure_future(engine.wait())
    live = console.is_terminal if opts.live is None else opts.live
    redis = opts.redis is not None
    try:
        if live:
            snap = await _snapshot(p, watch, planned, redis)
            with Live(
                _live_view(snap, watch, opts.seconds, seed), console=console, auto_refresh=False
            ) as view:
                while not done.done():
                    await asyncio.wait([done], timeout=0.5)
                    snap = await _snapshot(p, watch, planned, redis)
                    view.update(_live_view(snap, watch, opts.seconds, seed), refresh=True)
        else:
            while not done.done():
                await asyncio.wait([done], timeout=opts.status_every)
                snap = await _snapshot(p, watch, planned, redis)
                console.print(_status_line(snap, watch), markup=False, highlight=False)
        return await done
    finally:
        if not done.done():
            done.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await done


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m examples.market_data chaos",
        description="Run the market-data pipeline under a seeded chaos schedule with live "
        "status, then report: ticks expected vs stored per symbol, gaps, time to recover, "
        "backfill start delay, 429s and journal verify. Exit 0 only if nothing is missing, "
        "no 429 came back, every gap closed and the journal verifies.",
    )
    d = JobOptions()
    ap.add_argument("--seconds", type=float, default=d.seconds, help="chaos duration (60)")
    ap.add_argument("--seed", type=int, default=None, help="fixes the run (default: random)")
    ap.add_argument("--symbols", type=int, default=d.symbols)
    ap.add_argument("--groups", type=int, default=d.groups, help="collectors")
    ap.add_argument("--rate", type=float, default=d.rate, help="ticks/s over all symbols")
    ap.add_argument(
        "--redis",
        metavar="URL",
        help="Redis store buffer and gatekeeper behind a ChaosProxy, with a Redis outage",
    )
    ap.add_argument("--json", dest="json_path", metavar="FILE", help="write the report as JSON")
    ap.add_argument("--workdir", help="where the database, journal and logs go (default: new)")
    ap.add_argument("--settle", type=float, default=d.settle, help="backfill wait after chaos")
    ap.add_argument("--max-concurrent", type=int, default=d.max_concurrent)
    ap.add_argument("--silence", type=float, default=d.silence, help="sentinel's hang limit")
    ap.add_argument("--heartbeat", type=float, default=d.heartbeat)
    ap.add_argument("--exchange-watchdog", type=float, default=d.exchange_watchdog)
    ap.add_argument("--status-every", type=float, default=d.status_every,
                    help="seconds between status lines when stdout is not a terminal")  # fmt: skip
    live = ap.add_mutually_exclusive_group()
    live.add_argument("--live", dest="live", action="store_true", default=None)
    live.add_argument("--no-live", dest="live", action="store_false")
    levels = ["debug", "info", "warning", "error", "critical"]
    ap.add_argument("--log-level", default="critical", choices=levels,
                    help="the tree's logs on stderr (crashes are normal under chaos)")  # fmt: skip
    return ap


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    """``python -m examples.market_data chaos [options]``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        opts = JobOptions(
            seconds=args.seconds,
            seed=args.seed,
            symbols=args.symbols,
            groups=args.groups,
            rate=args.rate,
            redis=args.redis,
            workdir=args.workdir,
            settle=args.settle,
            max_concurrent=args.max_concurrent,
            silence=args.silence,
            heartbeat=args.heartbeat,
            exchange_watchdog=args.exchange_watchdog,
            live=args.live,
            status_every=args.status_every,
        )
        job_plan(replace(opts, seed=0))  # bad numbers fail here, before anything starts
    except (ValueError, chaos.ChaosSpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if console is None:
        console = Console() if sys.stdout.isatty() else Console(width=140)
    with _quiet_logs(args.log_level):
        try:
            result = asyncio.run(run_job(opts, console, json_path=args.json_path))
        except JobError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.code
        except KeyboardInterrupt:  # the faults were healed and the tree stopped
            print("interrupted: the tree was stopped, no report", file=sys.stderr)
            return 130
    return result.exit_code

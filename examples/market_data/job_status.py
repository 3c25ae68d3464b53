"""What the main job shows while it runs: counts kept from telemetry (restarts, last
exits, chaos actions, fallback episodes, the exchange's outages) and a snapshot of the
tree and the figures, as a rich live view or one plain line."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from typing import Any

from examples.market_data._common import ROOT, http_json
from examples.market_data.pipeline import Pipeline
from examples.market_data.recovery import reason_class
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

import trellis

__all__ = ["Episode", "Snapshot", "Watch", "live_view", "snapshot", "status_line"]


@dataclass
class Episode:
    """One gatekeeper fallback: seconds since the run started, and how it ended."""

    started: float
    ended: float | None = None
    how: str = "still in fallback"


class Watch:
    """Counts what the live view and the report need, from telemetry (the handler only
    updates counters). Times are seconds since ``t0`` (the Trellis clock).

    Example::

        watch = Watch(loop.time(), p.paths["gatekeeper"], p.paths["exchange"]).attach()
        ...
        print(watch.restarts, watch.episodes)
        watch.detach()
    """

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
        self.episodes: list[Episode] = []
        self._hid: object | None = None

    def attach(self) -> Watch:
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
                self.episodes.append(Episode(t))
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
class Snapshot:
    """The tree and the figures at one moment, for one frame or line."""

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


async def snapshot(p: Pipeline, watch: Watch, planned: int, redis: bool) -> Snapshot:
    """Walk the tree, count ticks and gaps in the database, ask the exchange."""
    loop = asyncio.get_running_loop()
    rows = await _tree_rows(p.root)
    ticks, open_gaps, closed = await asyncio.to_thread(_db_counts, p.db_path)
    try:
        stats = await http_json(p.exchange_url, "/stats", timeout=0.5)
        generated: int | None = int(stats["ticks_total"])
    except (OSError, TimeoutError, ValueError, KeyError):
        generated = None
    mode = ("FALLBACK (local limit)" if watch.fallback else "redis") if redis else "local"
    return Snapshot(
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


def live_view(snap: Snapshot, watch: Watch, seconds: float, seed: int) -> RenderableType:
    """One frame of the live view: figures, the tree (state, restarts, last exit), the
    latest chaos actions."""
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


def status_line(snap: Snapshot, watch: Watch) -> str:
    """The live view as one line, for output that is not a terminal."""
    down = [cid for _d, _p, cid, state, _o in snap.rows if state not in ("running",)]
    gen = "-" if snap.generated is None else str(snap.generated)
    restarts = sum(watch.restarts.values())
    return (
        f"[{snap.elapsed:6.1f}s] faults {snap.faults}/{snap.planned}  restarts {restarts}  "
        f"ticks {snap.ticks}/{gen}  open gaps {snap.open_gaps}  gatekeeper {snap.mode}"
        + (f"  not running: {', '.join(down)}" if down else "")
    )

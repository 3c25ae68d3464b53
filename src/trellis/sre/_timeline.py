"""Journal records -> per-child up/down/stopped timelines, run by run, node by node.

A child is **up** from ``child.started``/``child.restarted`` to its exit; **down**
while it is owed a restart (exited with ``restart``, waiting or backing off, or a
start that failed), after an abnormal exit nobody restarts, while its supervisor
gave up, and from the last record of a run that ended uncleanly (the tree was
killed, or its root gave up) to the start of the next run; **stopped** when it is
not running on purpose (not started yet, terminated by an operator or a clean
shutdown, a transient or temporary child that finished, between a clean stop of the
tree and its next run). Stopped time is left out of every SLI.

Run boundaries come from ``run.started`` / ``run.stopped`` / ``run.unclean_end``
records when the journal has them; otherwise a run ends at the root's
``supervisor.stopped``, and a new run is recognised when a child already running
is started again or the root supervisor starts a second time.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DOWN", "STOPPED", "UP", "Mark", "Timelines", "build", "parse_utc"]

UP = "up"
DOWN = "down"
STOPPED = "stopped"

_CLEAN = frozenset({"normal", "shutdown"})
_STOP_ACTIONS = frozenset({"stop", "terminate", "terminate_child", "delete"})


def parse_utc(text: str) -> float:
    """Epoch seconds of a journal ``utc`` text such as ``2026-12-07T18:32:39.776339Z``."""
    t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return t.timestamp()


@dataclass(frozen=True, slots=True)
class Mark:
    """A journal record worth showing on a timeline: a restart, an exit, an operator
    action, a chaos fault, a run boundary."""

    t: float
    node: str
    path: str | None
    kind: str
    text: str
    seq: int


@dataclass(slots=True)
class _Child:
    changes: list[tuple[float, str]] = field(default_factory=list)
    running: dict[str, float] = field(default_factory=dict)  # pid text -> started at
    pending: int = 0  # exits owed a restart
    failed: bool = False  # abnormal exit, not restarted
    held: bool = False  # down because its supervisor gave up
    terminated: bool = False  # terminated (maybe a bystander of a group restart)
    by_operator: bool = False  # stopped by an operator: stays stopped
    clean_exit: bool = False  # exited cleanly without restart (transient/temporary)
    restarts: list[float] = field(default_factory=list)
    exits: list[tuple[float, str]] = field(default_factory=list)  # (t, reason_class)
    is_supervisor: bool = False
    deleted: bool = False  # deleted from its supervisor (a reload removed it): not a member
    membership: list[tuple[float, bool]] = field(default_factory=list)  # (t, left its subtree)

    def leave(self, t: float, gone: bool) -> None:
        if self.deleted != gone:
            self.deleted = gone
            self.membership.append((t, gone))

    def state(self) -> str:
        if self.pending or self.failed or self.held:
            return DOWN
        return UP if self.running else STOPPED

    def set(self, t: float) -> None:
        s = self.state()
        if not self.changes or self.changes[-1][1] != s:
            if self.changes and self.changes[-1][0] == t:
                self.changes[-1] = (t, s)
                if len(self.changes) > 1 and self.changes[-2][1] == s:
                    self.changes.pop()
            else:
                self.changes.append((t, s))


@dataclass(slots=True)
class Timelines:
    """What :func:`build` found: per ``(node, path)`` the state changes ``[(t, state)]``
    (the state holds from ``t`` to the next change), restart times, exits, the runs
    ``[(node, start, end, how)]`` and the records worth marking."""

    children: dict[tuple[str, str], list[tuple[float, str]]]
    left: dict[tuple[str, str], list[tuple[float, bool]]]  # (t, True): deleted, out of
    # its subtree from t on; (t, False): started again, a member again
    restarts: dict[tuple[str, str], list[float]]
    exits: dict[tuple[str, str], list[tuple[float, str]]]
    supervisors: set[tuple[str, str]]
    transient: set[tuple[str, str]]  # children seen to end cleanly without a restart
    runs: list[tuple[str, float, float | None, str]]
    marks: list[Mark]
    first: float | None
    last: float | None
    open_run: bool


class _Node:
    def __init__(self, name: str) -> None:
        self.name = name
        self.children: dict[str, _Child] = {}
        self.in_run = False
        self.run_start = 0.0
        self.last_t: float | None = None
        self.root: str | None = None
        self.root_started = False
        self.gave_up: set[str] = set()
        self.explicit = False  # the journal has run.* records for this node
        self.pids: set[str] = set()  # pid numbers started in this run
        self.records = 0  # records of this run after its start
        self.run_id: object = None  # from run.started
        self.descendants: dict[str, list[_Child]] = {}  # path -> every child below it

    def child(self, path: str) -> _Child:
        c = self.children.get(path)
        if c is None:
            c = self.children[path] = _Child()
            parts = path.split("/")
            for k in range(1, len(parts)):  # every ancestor has descendants now
                self.descendants.setdefault("/".join(parts[:k]), []).append(c)
        return c

    def under(self, sup: str) -> list[_Child]:
        """Every child below ``sup`` (nested ones too)."""
        return self.descendants.get(sup, [])


def _pid(data: dict[str, Any]) -> str:
    return str(data.get("pid"))


def build(records: Iterable[dict[str, Any]]) -> Timelines:
    """Timelines from journal records (dicts as ``trellis.journal.tail`` yields them),
    oldest first."""
    nodes: dict[str, _Node] = {}
    runs: list[tuple[str, float, float | None, str]] = []
    marks: list[Mark] = []
    first: float | None = None
    last: float | None = None

    def end_run(n: _Node, t: float, how: str) -> None:
        """End ``n``'s run at ``t``: clean -> every child stopped; otherwise whatever
        was not stopped is down until the next run."""
        for c in n.children.values():
            if c.deleted:
                continue
            if how == "clean":
                c.running.clear()
                c.pending = 0
                c.failed = c.held = False
            elif c.state() != STOPPED:
                c.running.clear()
                c.held = True
            c.set(t)
        n.in_run = False
        runs.append((n.name, n.run_start, t, how))
        marks.append(Mark(t, n.name, None, "run.end", f"run ended ({how})", 0))

    def start_run(n: _Node, t: float, seq: int) -> None:
        for c in n.children.values():
            c.running.clear()
            c.pending = 0
            c.failed = c.held = c.terminated = c.by_operator = False
            c.set(t)
        n.in_run = True
        n.run_start = t
        n.root_started = False
        n.gave_up.clear()
        n.pids.clear()
        n.records = 0
        marks.append(Mark(t, n.name, None, "run.start", "run started", seq))

    for rec, t in _times(records):
        kind = str(rec.get("kind"))
        name = str(rec.get("node") or "")
        path = rec.get("path")
        data = rec.get("data")
        if not isinstance(data, dict):
            data = {}
        seq = int(rec.get("seq") or 0)
        first = t if first is None else min(first, t)
        last = t if last is None else max(last, t)
        n = nodes.get(name)
        if n is None:
            n = nodes[name] = _Node(name)
        if n.last_t is not None and t < n.last_t:
            t = n.last_t  # handed over a moment out of order: time never runs backwards

        # -- run boundaries ----------------------------------------------------------
        if kind == "run.started":
            n.explicit = True
            if n.in_run:
                end_run(n, n.last_t if n.last_t is not None else t, "unclean")
            start_run(n, t, seq)
            n.run_id = data.get("run_id")
            n.last_t = t
            continue
        if kind == "run.unclean_end":
            n.explicit = True
            about = data.get("run_id")
            mine = about is None or n.run_id is None or about == n.run_id
            if n.in_run and n.records and mine:  # (right after run.started it is about
                # the run that run.started already ended; another node's run is not ours)
                at = data.get("last_utc")
                end = parse_utc(at) if isinstance(at, str) else n.last_t
                end_run(n, end if end is not None else t, "unclean")
            n.last_t = t
            continue
        if kind == "run.stopped":
            n.explicit = True
            if n.in_run:
                end_run(n, t, "clean" if not (n.root and n.root in n.gave_up) else "gave_up")
            n.last_t = t
            continue
        if not n.in_run and kind.startswith(("child.", "supervisor.")):
            start_run(n, t, seq)
        elif n.in_run and not n.explicit and _new_run(n, kind, path, data):
            end_run(n, n.last_t if n.last_t is not None else t, "unclean")
            start_run(n, t, seq)
        n.last_t = t
        n.records += 1

        if kind == "operator.action":
            action = str(data.get("action", ""))
            target = data.get("target")
            who = data.get("who", "?")
            chaos = data.get("source") == "chaos" or action.startswith(("fault:", "heal:"))
            label = "chaos" if chaos else "operator"
            marks.append(
                Mark(
                    t,
                    name,
                    target if isinstance(target, str) else None,
                    label,
                    f"{label}: {action} {target or 'tree'} by {who} ({data.get('result')})",
                    seq,
                )
            )
            if isinstance(target, str) and action in _STOP_ACTIONS and data.get("result") == "ok":
                c = n.child(target)
                c.by_operator = True
                c.terminated = False
            continue
        if not isinstance(path, str):
            continue

        if kind in ("child.started", "child.restarted"):
            c = n.child(path)
            if n.root is None and "/" in path:
                n.root = path.split("/", 1)[0]
            if kind == "child.restarted":
                c.restarts.append(t)
                c.pending = max(0, c.pending - 1)
                if c.terminated and not c.by_operator and c.changes:
                    # a bystander of a group restart: it was down, not stopped
                    ts, st = c.changes[-1]
                    if st == STOPPED:
                        c.changes[-1] = (ts, DOWN)
                marks.append(Mark(t, name, path, "restart", "restarted", seq))
            else:
                c.pending = 0
            c.running[_pid(data)] = t
            c.leave(t, False)
            n.pids.add(_pid_number(data))
            c.failed = c.held = c.terminated = c.by_operator = c.clean_exit = False
            c.set(t)
        elif kind == "child.exited":
            c = n.child(path)
            c.running.pop(_pid(data), None)
            rc = str(data.get("reason_class", "crash"))
            c.exits.append((t, rc))
            if data.get("restart"):
                c.pending += 1
            elif rc not in _CLEAN:
                c.failed = True
            else:
                c.clean_exit = True
            if rc not in _CLEAN:
                marks.append(Mark(t, name, path, "exit", f"exited: {data.get('reason')}", seq))
            c.set(t)
            for d in n.under(path):  # a supervisor child: its children went with it
                if d.deleted:
                    continue
                d.running.clear()
                d.pending = 0
                d.held = c.state() == DOWN
                d.set(t)
        elif kind == "child.start_failed":
            c = n.child(path)
            c.failed = True
            marks.append(
                Mark(t, name, path, "start_failed", f"start failed: {data.get('reason')}", seq)
            )
            c.set(t)
        elif kind == "child.terminated":
            c = n.child(path)
            c.running.pop(_pid(data), None)
            if not c.running:
                c.pending = 0
                c.failed = False
            c.terminated = True
            c.set(t)
            for d in n.under(path):
                d.running.clear()
                d.pending = 0
                d.failed = d.held = False
                d.set(t)
        elif kind == "child.deleted":
            # gone from its supervisor (a reload removed it, or an operator deleted it):
            # stopped, and no longer a member of its subtree, until it is started again
            c = n.child(path)
            c.running.clear()
            c.pending = 0
            c.failed = c.held = c.terminated = False
            c.set(t)
            for d in [c, *n.under(path)]:  # a deleted supervisor's children went with it
                d.leave(t, True)
        elif kind == "supervisor.started":
            c = n.child(path)
            c.is_supervisor = True
            if "/" not in path:
                n.root = path
                n.root_started = True
                c.running[_pid(data) if "pid" in data else str(data.get("sup_pid"))] = t
                c.held = c.failed = False
                c.set(t)
            n.gave_up.discard(path)
        elif kind == "supervisor.gave_up":
            n.gave_up.add(path)
            marks.append(Mark(t, name, path, "gave_up", "supervisor gave up", seq))
            for d in n.under(path):
                if d.deleted:
                    continue
                if d.state() != STOPPED or d.terminated:
                    d.held = True
                    d.running.clear()
                    d.set(t)
        elif kind == "supervisor.stopped":
            c = n.child(path)
            c.is_supervisor = True
            gave_up = path in n.gave_up
            for d in n.under(path):
                if d.deleted:
                    continue
                d.running.clear()
                d.pending = 0
                d.failed = False
                if gave_up and (d.held or d.terminated):
                    d.held = True
                d.set(t)
            if "/" not in path:
                c.running.clear()
                if gave_up:
                    c.held = True
                c.set(t)
                if not n.explicit:
                    end_run(n, t, "gave_up" if gave_up else "clean")
    for n in nodes.values():
        if n.in_run:
            runs.append((n.name, n.run_start, None, "open"))
    out: dict[tuple[str, str], list[tuple[float, str]]] = {}
    left: dict[tuple[str, str], list[tuple[float, bool]]] = {}
    restarts: dict[tuple[str, str], list[float]] = {}
    exits: dict[tuple[str, str], list[tuple[float, str]]] = {}
    sups: set[tuple[str, str]] = set()
    transient: set[tuple[str, str]] = set()
    for n in nodes.values():
        for p, c in n.children.items():
            out[(n.name, p)] = c.changes
            left[(n.name, p)] = c.membership
            restarts[(n.name, p)] = c.restarts
            exits[(n.name, p)] = c.exits
            if c.is_supervisor:
                sups.add((n.name, p))
            if c.clean_exit and not c.running:
                transient.add((n.name, p))
    marks.sort(key=lambda m: (m.t, m.seq))
    return Timelines(
        out,
        left,
        restarts,
        exits,
        sups,
        transient,
        runs,
        marks,
        first,
        last,
        any(r[2] is None for r in runs),
    )


def _times(records: Iterable[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """Each record with its time. A ``run.*`` record is written when the journal's
    writer opens, which may be after the run's first events were handed over (and
    given their times): it takes the time of the node's next other record if that is
    earlier, so a run starts no later than its first event."""
    out: list[tuple[dict[str, Any], float]] = []
    for rec in records:
        utc = rec.get("utc")
        if isinstance(utc, str):
            out.append((rec, parse_utc(utc)))
    nxt: dict[str, float] = {}
    for i in range(len(out) - 1, -1, -1):
        rec, t = out[i]
        node = str(rec.get("node") or "")
        if str(rec.get("kind")).startswith("run."):
            if node in nxt and nxt[node] < t:
                out[i] = (rec, nxt[node])
        else:
            nxt[node] = t
    return out


_PID_NUMBER = re.compile(r"<Pid (\d+)")


def _pid_number(data: dict[str, Any]) -> str:
    text = _pid(data)
    m = _PID_NUMBER.match(text)
    return m.group(1) if m else text


def _new_run(n: _Node, kind: str, path: object, data: dict[str, Any]) -> bool:
    """Whether a record shows a new run began without the last one's end recorded: the
    root supervisor starts again, or a child starts with a pid number already used in
    this run (pids are never reused within one process)."""
    if not isinstance(path, str):
        return False
    if kind == "supervisor.started" and "/" not in path and n.root_started and path == n.root:
        return True
    return kind == "child.started" and _pid_number(data) in n.pids

"""The SLO report: availability, MTBF, MTTR, incidents, error budget and burn rates per
child and per subtree, from the journal alone (see :func:`report`)."""

from __future__ import annotations

import datetime as _dt
import time as _time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._math import (
    BURN_WINDOWS,
    budget_seconds,
    burn_rate,
    exhaustion_seconds,
    percentile,
    window_text,
)
from ._timeline import DOWN, STOPPED, UP, Mark, Timelines, build

__all__ = [
    "DEFAULT_MERGE",
    "DEFAULT_OBJECTIVE",
    "DEFAULT_WINDOW",
    "PROMETHEUS_SLIS",
    "SCHEMA",
    "TreeInfo",
    "iso",
    "prometheus_slos",
    "read_records",
    "report",
    "tree_info",
]

#: The ``schema`` value of :func:`report`'s JSON document.
SCHEMA = "trellis.slo.report/1"
#: The SLO assumed for a child or subtree the tree file gives none.
DEFAULT_OBJECTIVE = 0.999
DEFAULT_WINDOW = 30 * 86400.0
#: Down intervals closer than this (seconds) are one incident (a restart storm).
DEFAULT_MERGE = 60.0

Segment = tuple[float, float, str]


def iso(t: float | None) -> str | None:
    """Epoch seconds as ``2026-12-07T18:32:39.776339Z``."""
    if t is None:
        return None
    d = _dt.datetime.fromtimestamp(t, _dt.UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class TreeInfo:
    """What the report takes from a tree file: the root's name, the permanent children
    by tree path, and the ``slo``/``runbook``/``owner`` entries by tree path."""

    root: str
    permanent: frozenset[str]
    sre: Mapping[str, Mapping[str, Any]]


def tree_info(tree: Any) -> TreeInfo:
    """A :class:`TreeInfo` from a loaded :class:`trellis.config.TreeSpec`."""
    permanent: set[str] = set()

    def walk(specs: Iterable[Any], prefix: str) -> None:
        for spec in specs:
            path = f"{prefix}/{spec.id}"
            if str(getattr(spec.restart, "value", spec.restart)) == "permanent":
                permanent.add(path)
            args = getattr(spec, "args", ())
            if args and isinstance(args[0], list | tuple):
                walk([a for a in args[0] if hasattr(a, "restart")], path)

    walk(tree.children, tree.name)
    return TreeInfo(tree.name, frozenset(permanent), dict(tree.settings.get("slo", {})))


def read_records(url: str) -> list[dict[str, Any]]:
    """Every record of the journal at ``url``, oldest first."""
    from trellis.journal import tail

    return list(tail(url, n=0, since_seq=1))


# ---------------------------------------------------------------------------
# Segments
# ---------------------------------------------------------------------------


def segments(changes: list[tuple[float, str]], since: float, until: float) -> list[Segment]:
    """``changes`` as ``(start, end, state)`` pieces covering ``[since, until]``."""
    out: list[Segment] = []
    state = STOPPED
    at = since
    for t, s in changes:
        if t <= since:
            state = s
            continue
        if t >= until:
            break
        if s != state:
            if t > at:
                out.append((at, t, state))
            at, state = t, s
    if until > at:
        out.append((at, until, state))
    return out


#: A member's state while it is out of its subtree (deleted, e.g. removed by a reload).
_GONE = "gone"


def membership(
    changes: list[tuple[float, str]], left: list[tuple[float, bool]]
) -> list[tuple[float, str]]:
    """A member's ``changes`` with the time it was out of its subtree (``left``:
    ``(t, True)`` deleted, ``(t, False)`` started again) as the state ``gone``."""
    if not left:
        return changes
    events = sorted([(t, 0, st) for t, st in changes] + [(t, 1, g) for t, g in left])
    out: list[tuple[float, str]] = []
    state, gone = STOPPED, False
    for t, what, v in events:
        if what:
            gone = bool(v)
        else:
            state = str(v)
        s = _GONE if gone else state
        if out and out[-1][0] == t:
            out[-1] = (t, s)
        elif not out or out[-1][1] != s:
            out.append((t, s))
    return out


def combine(members: list[list[tuple[float, str]]]) -> list[tuple[float, str]]:
    """The changes of a subtree: down while any member is down, up while every member
    still in it is up (a member deleted from the tree is ``gone``: not counted),
    stopped otherwise (one sweep over all members' changes, counting)."""
    merged = sorted((t, i, st) for i, ch in enumerate(members) for t, st in ch)
    cur = [STOPPED] * len(members)
    count = {UP: 0, DOWN: 0, STOPPED: len(members), _GONE: 0}
    out: list[tuple[float, str]] = []
    k = 0
    while k < len(merged):
        t = merged[k][0]
        while k < len(merged) and merged[k][0] == t:  # every change at this instant
            _, i, st = merged[k]
            count[cur[i]] -= 1
            count[st] += 1
            cur[i] = st
            k += 1
        if count[DOWN]:
            s = DOWN
        elif count[UP] and count[UP] == len(members) - count[_GONE]:
            s = UP
        else:
            s = STOPPED
        if not out or out[-1][1] != s:
            out.append((t, s))
    return out


def _time_in(segs: list[Segment], a: float, b: float) -> tuple[float, float]:
    """(up, down) seconds of ``segs`` inside ``[a, b]``."""
    up = down = 0.0
    for s, e, st in segs:
        lo, hi = max(s, a), min(e, b)
        if hi <= lo:
            continue
        if st == UP:
            up += hi - lo
        elif st == DOWN:
            down += hi - lo
    return up, down


def _incidents(downs: list[tuple[float, float]], merge: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s, e in downs:
        if out and s - out[-1]["_end"] < merge:
            cur = out[-1]
            cur["_end"] = e
            cur["down_seconds"] += e - s
            cur["failures"] += 1
        else:
            out.append({"_start": s, "_end": e, "down_seconds": e - s, "failures": 1})
    for inc in out:
        inc["start"] = iso(inc["_start"])
        inc["end"] = iso(inc["_end"])
        inc["start_ts"] = inc.pop("_start")
        inc["end_ts"] = inc.pop("_end")
        inc["duration_seconds"] = inc["end_ts"] - inc["start_ts"]
    return out


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _entity(
    kind: str,
    node: str,
    path: str,
    changes: list[tuple[float, str]],
    restarts: list[float],
    since: float,
    until: float,
    sre: Mapping[str, Any],
    merge: float,
    members: list[str] | None = None,
) -> dict[str, Any]:
    segs = segments(changes, since, until)
    up, down = _time_in(segs, since, until)
    stopped = (until - since) - up - down
    downs = [(s, e) for s, e, st in segs if st == DOWN]
    repairs = [e - s for s, e in downs]
    failures = len(downs)
    mtbf = up / failures if failures else None
    mttr = down / failures if failures else None
    slo_given = sre.get("slo")
    slo = {
        "objective": (slo_given or {}).get("objective", DEFAULT_OBJECTIVE),
        "window_seconds": (slo_given or {}).get("window", DEFAULT_WINDOW),
        "sli": (slo_given or {}).get("sli", "up"),
        "source": "tree" if slo_given else "default",
    }
    slo["window"] = window_text(slo["window_seconds"])
    objective, window = slo["objective"], slo["window_seconds"]
    total = budget_seconds(objective, window)
    # the budget and burn rates look back from `until` over their own windows, whatever
    # --since says: a postmortem of one hour still shows what is left of the month
    longest = max(window, BURN_WINDOWS[-1][1])
    back = segments(changes, min(since, until - longest), until)
    b_lo = until - window
    _, b_down = _time_in(back, b_lo, until)
    remaining = total - b_down
    burns: dict[str, float | None] = {}
    for label, w in BURN_WINDOWS:
        w_up, w_down = _time_in(back, until - w, until)
        er = _ratio(w_down, w_up + w_down)
        burns[label] = burn_rate(er, objective) if er is not None else None
    burn_1h = burns["1h"]
    if remaining <= 0:
        ex_s: float | None = 0.0
    elif burn_1h is None:
        ex_s = None
    else:
        ex_s = exhaustion_seconds(remaining / total, burn_1h, window)
    out: dict[str, Any] = {
        "kind": kind,
        "node": node,
        "path": path,
        "slo": slo,
        "runbook": sre.get("runbook"),
        "owner": sre.get("owner"),
        "observed_seconds": up + down,
        "up_seconds": up,
        "down_seconds": down,
        "stopped_seconds": stopped,
        "availability": _ratio(up, up + down),
        "availability_mtbf": _ratio(mtbf, mtbf + mttr)
        if mtbf is not None and mttr is not None
        else _ratio(up, up + down),
        "failures": failures,
        "mtbf_seconds": mtbf,
        "mttr_seconds": mttr,
        "mttr_p50_seconds": percentile(repairs, 0.5),
        "mttr_p95_seconds": percentile(repairs, 0.95),
        "restarts": sum(1 for t in restarts if since <= t <= until),
        "incidents": _incidents(downs, merge),
        "budget": {
            "window_seconds": window,
            "from": iso(b_lo),
            "total_seconds": total,
            "consumed_seconds": b_down,
            "remaining_seconds": remaining,
            "consumed_ratio": b_down / total if total else None,
            "remaining_ratio": remaining / total if total else None,
        },
        "burn_rates": burns,
        "exhaustion": {
            "burn_window": "1h",
            "exhausted": remaining <= 0,
            "seconds": ex_s,
            "at": iso(until + ex_s) if ex_s is not None else None,
        },
        "timeline": [[s, e, st] for s, e, st in segs],
    }
    if members is not None:
        out["members"] = members
    return out


def report(
    records: Iterable[dict[str, Any]],
    *,
    since: float | None = None,
    until: float | None = None,
    tree: TreeInfo | None = None,
    merge: float = DEFAULT_MERGE,
    journal: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The SLO report of journal ``records`` over ``[since, until]`` (epoch seconds; by
    default from the first record to the last, or to ``now`` while a run is still
    open). ``tree`` names the permanent children and the SLOs; without it every child
    seen is permanent unless it ended cleanly without a restart, and every SLO is the
    default (99.9% over 30 days). The document's layout is ``docs/api.md``'s
    "SLO report schema"; ``schema`` is ``trellis.slo.report/1``.

    Example::

        doc = report(read_records("sqlite:///journal.db"), tree=tree_info(load("tree.toml")))
        for e in doc["entities"]:
            print(e["path"], e["availability"], e["budget"]["remaining_seconds"])
    """
    tl = build(records)
    t_now = _time.time() if now is None else now
    if since is None:
        since = tl.first if tl.first is not None else t_now
    if until is None:
        until = (t_now if tl.open_run else tl.last) if tl.last is not None else t_now
        until = max(until, since)
    if until < since:
        raise ValueError(f"--until ({iso(until)}) is before --since ({iso(since)})")
    sre_of = tree.sre if tree is not None else {}
    entities: list[dict[str, Any]] = []
    nodes = sorted({n for n, _ in tl.children})
    for node in nodes:
        paths = sorted(p for n, p in tl.children if n == node)
        roots = sorted({p.split("/", 1)[0] for p in paths})
        for p in paths:
            if "/" not in p:
                continue
            entities.append(
                _entity(
                    "child",
                    node,
                    p,
                    tl.children[(node, p)],
                    tl.restarts[(node, p)],
                    since,
                    until,
                    sre_of.get(p, {}),
                    merge,
                )
            )
        sups = sorted({p for n, p in tl.supervisors if n == node} | set(roots))
        for s in sups:
            members = _members(tl, node, s, paths, tree)
            if not members:
                continue
            changes = combine(
                [
                    membership(tl.children.get((node, m), []), tl.left.get((node, m), []))
                    for m in members
                ]
            )
            entities.append(
                _entity(
                    "subtree",
                    node,
                    s,
                    changes,
                    [t for m in members for t in tl.restarts.get((node, m), [])],
                    since,
                    until,
                    sre_of.get(s, {}),
                    merge,
                    members,
                )
            )
    return {
        "schema": SCHEMA,
        "journal": journal,
        "generated": iso(t_now),
        "since": iso(since),
        "until": iso(until),
        "since_ts": since,
        "until_ts": until,
        "merge_seconds": merge,
        "nodes": nodes,
        "runs": [
            {"node": n, "start": iso(s), "end": iso(e), "start_ts": s, "end_ts": e, "end_how": h}
            for n, s, e, h in tl.runs
            if (e is None or e >= since) and s <= until
        ],
        "entities": entities,
        "marks": [_mark(m) for m in tl.marks if since <= m.t <= until],
        "prometheus_slos": prometheus_slos(sre_of),
    }


#: The SLI kinds the journal cannot measure: they come from the application's metrics.
PROMETHEUS_SLIS = ("ratio", "latency")


def prometheus_slos(sre: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The tree file's SLOs on application metrics (``sli = "ratio"`` or
    ``"latency"``): listed in the report as measured by Prometheus (``trellis slo
    rules`` records them), with no figures, since the journal does not see them."""
    out = []
    for path, entry in sorted(sre.items()):
        for slo in entry.get("slos", ()):
            sli = slo.get("sli", "up")
            if sli not in PROMETHEUS_SLIS:
                continue
            window = slo.get("window", DEFAULT_WINDOW)
            item: dict[str, Any] = {
                "path": path,
                "name": slo.get("name", sli),
                "sli": sli,
                "objective": slo["objective"],
                "window": window_text(window),
                "window_seconds": window,
                "measured_by": "prometheus",
                "owner": entry.get("owner"),
                "runbook": entry.get("runbook"),
            }
            keys = ("good", "total") if sli == "ratio" else ("metric", "threshold")
            item.update({k: slo.get(k) for k in keys})
            out.append(item)
    return out


def _mark(m: Mark) -> dict[str, Any]:
    return {
        "t": iso(m.t),
        "ts": m.t,
        "node": m.node,
        "path": m.path,
        "kind": m.kind,
        "text": m.text,
        "seq": m.seq,
    }


def _members(
    tl: Timelines, node: str, sup: str, paths: list[str], tree: TreeInfo | None
) -> list[str]:
    """The children a subtree's SLI watches: its permanent children, nested ones
    included, and the supervisor itself when it is not the root."""
    prefix = sup + "/"
    if tree is not None and tree.permanent and sup.split("/", 1)[0] == tree.root:
        seen = set(paths)
        under = sorted(p for p in tree.permanent if p.startswith(prefix) and p in seen)
    else:
        under = sorted(p for p in paths if p.startswith(prefix) and (node, p) not in tl.transient)
    if "/" in sup:
        under.insert(0, sup)
    return under

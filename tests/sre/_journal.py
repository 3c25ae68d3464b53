"""Writing a journal with exact wall times through the real writer (process, chain,
SQLite or PostgreSQL): each event is handed to the journal's telemetry handler with
the wall time it should carry."""

from __future__ import annotations

from typing import Any

from trellis.journal import Journal

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def pid(n: int, name: str | None = None) -> str:
    return f"<Pid {n} {name!r}>" if name else f"<Pid {n}>"


def started(t: float, sup: str, cid: str, p: int) -> tuple[float, str, dict[str, Any]]:
    return (t, "child.started", {"supervisor": sup, "child_id": cid, "pid": pid(p)})


def restarted(t: float, sup: str, cid: str, p: int) -> tuple[float, str, dict[str, Any]]:
    return (t, "child.restarted", {"supervisor": sup, "child_id": cid, "pid": pid(p)})


def exited(
    t: float, sup: str, cid: str, p: int, restart: bool = True, reason: Any = None
) -> tuple[float, str, dict[str, Any]]:
    return (
        t,
        "child.exited",
        {
            "supervisor": sup,
            "child_id": cid,
            "pid": pid(p),
            "reason": reason if reason is not None else RuntimeError("boom"),
            "restart": restart,
        },
    )


def terminated(t: float, sup: str, cid: str, p: int) -> tuple[float, str, dict[str, Any]]:
    return (
        t,
        "child.terminated",
        {"supervisor": sup, "child_id": cid, "pid": pid(p), "reason": "shutdown"},
    )


def sup_started(t: float, sup: str) -> tuple[float, str, dict[str, Any]]:
    return (t, "supervisor.started", {"supervisor": sup, "strategy": "one_for_one"})


def sup_stopped(t: float, sup: str) -> tuple[float, str, dict[str, Any]]:
    return (t, "supervisor.stopped", {"supervisor": sup, "reason": "shutdown"})


def operator(
    t: float, action: str, target: str | None, source: str = "api"
) -> tuple[float, str, dict[str, Any]]:
    return (
        t,
        "operator.action",
        {"who": "alice", "action": action, "target": target, "source": source, "result": "ok"},
    )


def write(url: str, node: str, events: list[tuple[float, str, dict[str, Any]]]) -> None:
    """Journal ``events`` ``(seconds after T0, name, fields)`` as node ``node``."""
    with Journal(url, node=node, flush_interval=0.0) as journal:
        for t, name, fields in events:
            event = {**fields, "event": name, "time": 1000.0 + t}
            journal._on_event(event, lambda t=t: T0 + t)

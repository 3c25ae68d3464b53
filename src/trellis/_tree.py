"""A running tree seen from outside: walk it by path, classify exit reasons, and track
per-child history from telemetry (for the journal, metrics, control API and chaos)."""

from __future__ import annotations

import asyncio
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any

from ._children import ExitCode, Hung, LimitExceeded, ReadyTimeout, Signaled
from ._core import _telemetry
from ._core._exceptions import TrellisError
from ._core._process import Pid
from ._core._reasons import KILL, KILLED, NORMAL, SHUTDOWN, Shutdown
from ._supervisor import _AdminPid

__all__ = [
    "Node",
    "Tracker",
    "classify",
    "event_path",
    "find",
    "glob",
    "jsonable",
    "reason_text",
    "walk",
]

#: The exit classes a reason falls in (a closed set: safe as a metric label).
CLASSES = ("normal", "shutdown", "crash", "hung", "killed", "oom", "timeout")


_TIMEOUTS = (ReadyTimeout, asyncio.TimeoutError, TimeoutError)


def classify(reason: Any) -> str:
    """The class of an exit reason: normal, shutdown, crash, hung, killed, oom or timeout.

    Example::

        assert classify(trellis.Hung("no heartbeat")) == "hung"
    """
    if reason is NORMAL or reason == NORMAL:
        return "normal"
    if reason is SHUTDOWN or reason == SHUTDOWN or isinstance(reason, Shutdown):
        return "shutdown"
    if reason is KILLED or reason is KILL or reason == KILLED:
        return "killed"
    if isinstance(reason, Hung):
        return "hung"
    if isinstance(reason, LimitExceeded):
        return "oom" if "memory" in reason.limit else "crash"
    if isinstance(reason, _TIMEOUTS):
        return "timeout"
    if isinstance(reason, Signaled):
        return "killed" if reason.signal in ("SIGKILL", "KILL") else "crash"
    if isinstance(reason, ExitCode):
        return "normal" if reason.code == 0 else "crash"
    if isinstance(reason, str) and reason in CLASSES:
        return reason
    return "crash"


def reason_text(reason: Any, limit: int = 500) -> str:
    """A short human text for an exit reason (``ValueError: boom``, ``exit code 3``)."""
    if isinstance(reason, BaseException) and not isinstance(reason, TrellisError):
        text = f"{type(reason).__name__}: {reason}"
    else:
        text = str(reason)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Node:
    """One child of a running tree (or the root): where it is and what it is doing."""

    path: str
    id: Any
    pid: Pid | None
    type: str  # "supervisor" | "worker"
    state: str  # "running" | "restarting" | "stopped"
    os_pid: int | None = None
    parent: Pid | None = None
    children: list[Node] = field(default_factory=list)

    def flat(self) -> list[Node]:
        """This node and every node below it, parents before children."""
        out = [self]
        for c in self.children:
            out.extend(c.flat())
        return out


async def walk(root: Pid, *, name: str | None = None, timeout: float = 5.0) -> Node:
    """The running tree under ``root`` (a supervisor pid), children in start order.

    Example::

        tree = await walk(sup)
        for node in tree.flat():
            print(node.path, node.state)
    """
    path = name if name is not None else _root_path(root)
    node = Node(path, path, root, "supervisor", "running" if root.alive else "stopped")
    await _fill(node, timeout)
    return node


def _root_path(root: Pid) -> str:
    server = getattr(root, "_server", None)
    p = getattr(server, "path", None)
    return p if isinstance(p, str) else str(root.name) if root.name is not None else "root"


async def _fill(node: Node, timeout: float) -> None:
    pid = node.pid
    if not isinstance(pid, _AdminPid) or not pid.alive:
        return
    try:
        infos = await asyncio.wait_for(pid.which_children(), timeout)
    except Exception:  # stopping or gone: an empty subtree, not an error
        return
    for info in reversed(infos):  # which_children is newest first
        cpid = info.pid
        if isinstance(cpid, Pid):
            state = "running" if cpid.alive else "stopped"
        elif cpid is None:
            state = "stopped"
        else:
            state = "restarting"
        child = Node(
            f"{node.path}/{info.id}",
            info.id,
            cpid if isinstance(cpid, Pid) else None,
            str(info.type),
            state,
            os_pid=getattr(cpid, "os_pid", None),
            parent=pid,
        )
        node.children.append(child)
        if child.type == "supervisor":
            await _fill(child, timeout)


def find(tree: Node, path: str) -> Node | None:
    """The node at ``path`` (``root/infra/store``); the root's own name may be left out."""
    path = path.strip("/")
    for n in tree.flat():
        if n.path == path or n.path == f"{tree.path}/{path}":
            return n
    return None


def glob(tree: Node, pattern: str) -> list[Node]:
    """Nodes whose path matches a shell glob (``root/collectors/*``), root excluded."""
    pattern = pattern.strip("/")
    return [
        n
        for n in tree.flat()[1:]
        if fnmatch.fnmatchcase(n.path, pattern)
        or fnmatch.fnmatchcase(n.path, f"{tree.path}/{pattern}")
    ]


@dataclass
class ChildStats:
    """What telemetry told about one child path."""

    starts: int = 0
    restarts: int = 0
    exits: int = 0
    started_wall: float | None = None  # time.time() of the last start
    started_mono: float | None = None  # Trellis clock of the last start
    down_since: float | None = None  # Trellis clock of the last exit, while down
    last_reason: Any = None  # the last exit reason itself (formatted on demand)
    os_pid: int | None = None

    @property
    def last_exit(self) -> str | None:
        """The last exit reason as text (``ValueError: boom``)."""
        return None if self.exits == 0 else reason_text(self.last_reason)

    @property
    def last_class(self) -> str | None:
        """The class of the last exit (see :func:`classify`)."""
        return None if self.exits == 0 else classify(self.last_reason)


class Tracker:
    """Per-child history from telemetry: starts, restarts, last exit; attach before the
    tree starts. ``stats[path]`` is a :class:`ChildStats`.

    Example::

        tracker = Tracker().attach()
        ...
        print(tracker.stats["root/worker"].restarts)
        tracker.detach()
    """

    EVENTS = ("child.started", "child.restarted", "child.exited", "process.spawned")

    def __init__(self) -> None:
        self.stats: dict[str, ChildStats] = {}
        self._hid: object | None = None

    def attach(self) -> Tracker:
        self._hid = _telemetry.attach(self.handle, self.EVENTS)
        return self

    def detach(self) -> None:
        if self._hid is not None:
            _telemetry.detach(self._hid)
            self._hid = None

    def handle(self, event: dict[str, Any]) -> None:
        name = event["event"]
        if name == "process.spawned":
            ps = self.stats.setdefault(str(event.get("path")), ChildStats())
            ps.os_pid = event.get("os_pid")
            return
        path = f"{event.get('supervisor')}/{event.get('child_id')}"
        s = self.stats.get(path)
        if s is None:
            s = self.stats[path] = ChildStats()
        if name == "child.exited":
            s.exits += 1
            s.last_reason = event.get("reason")
            s.down_since = event.get("time")
            return
        s.starts += 1
        if name == "child.restarted":
            s.restarts += 1
        s.started_wall = time.time()
        s.started_mono = event.get("time")
        s.down_since = None


def event_path(event: dict[str, Any]) -> str | None:
    """The tree path an event is about: ``supervisor/child_id`` for child events, the
    supervisor's own path for supervisor events, ``path`` for process events and the
    ``target`` of an operator action."""
    p = event.get("path")
    if isinstance(p, str):
        return p
    if event.get("event") == "operator.action":
        t = event.get("target")
        return t if isinstance(t, str) else None
    sup = event.get("supervisor")
    if sup is None:
        return None
    if "child_id" in event and not str(event.get("event", "")).startswith("supervisor."):
        return f"{sup}/{event['child_id']}"
    return str(sup)


def jsonable(event: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy of a telemetry event: pids become strings (``os_pid`` stays an
    int), exit reasons become ``reason`` text plus ``reason_class``, and anything else
    that JSON cannot hold becomes its ``repr``. Always has ``event``, ``time`` and
    ``path`` (None when the event is about no child).

    Example::

        json.dumps(jsonable({"event": "child.exited", "reason": ValueError("x")}))
    """
    out: dict[str, Any] = {"event": event.get("event"), "path": event_path(event)}
    for k, v in event.items():
        if k in ("event", "path"):
            continue
        if k == "reason":
            out["reason"] = reason_text(v)
            out["reason_class"] = classify(v)
        elif isinstance(v, Pid):
            out[k] = repr(v)
            os_pid = getattr(v, "os_pid", None)
            if os_pid is not None and "os_pid" not in event:
                out["os_pid"] = os_pid
        else:
            out[k] = _plain(v)
    return out


def _plain(v: Any, depth: int = 0) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if depth < 4 and isinstance(v, list | tuple):
        return [_plain(x, depth + 1) for x in v]
    if depth < 4 and isinstance(v, dict):
        return {str(k): _plain(x, depth + 1) for k, x in v.items()}
    if isinstance(v, BaseException):
        return reason_text(v)
    return repr(v) if not hasattr(v, "value") or not isinstance(v.value, str) else v.value

"""A running tree seen from outside: walk it by path, classify exit reasons, and track
per-child history from telemetry (for the journal, metrics, control API and chaos)."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ._children import ExitCode, Hung, LimitExceeded, ReadyTimeout, Signaled
from ._core import _clock, _telemetry
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
    "flat",
    "glob",
    "jsonable",
    "reason_text",
    "walk",
]

_log = logging.getLogger("trellis.tree")
_wall = time.time

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
    declared = getattr(reason, "exit_class", None)  # e.g. PluginError: oom, timeout, crash
    if isinstance(declared, str) and declared in CLASSES:
        return declared
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
    """What telemetry told about one child path (``supervisor/child_id``; dynamic
    children with one spec id share it)."""

    starts: int = 0
    restarts: int = 0
    exits: int = 0
    started_wall: float | None = None  # time.time() of the last start
    started_mono: float | None = None  # Trellis clock of the last start
    down_since: float | None = None  # Trellis clock of the last exit, while down
    last_reason: Any = None  # the last exit reason itself (formatted on demand)
    os_pid: int | None = None
    #: The last lines the child's OS process wrote, as ``(stream, line)`` (see
    #: :attr:`Tracker.OUTPUT_LINES`); None until it writes any.
    output: deque[tuple[str, str]] | None = None
    #: The last stderr lines (:attr:`Tracker.STDERR_LINES`), kept apart: a child that
    #: writes much to stdout still shows why it crashed.
    stderr: deque[str] | None = None

    @property
    def last_exit(self) -> str | None:
        """The last exit reason as text (``ValueError: boom``)."""
        return None if self.exits == 0 else reason_text(self.last_reason)

    @property
    def last_class(self) -> str | None:
        """The class of the last exit (see :func:`classify`)."""
        return None if self.exits == 0 else classify(self.last_reason)


#: The states a tracked child can be in.
STATES = ("starting", "running", "restarting", "stopped")


class _Child:
    """One child of a supervisor as telemetry showed it (mutated on the tree's loop)."""

    __slots__ = (
        "dynamic",
        "id",
        "key",
        "os_pid",
        "pid",
        "restart",
        "retry_at",
        "since",
        "since_wall",
        "state",
        "stats",
        "type",
    )

    def __init__(self, id: Any, stats: ChildStats, dynamic: bool) -> None:
        self.id = id
        self.key: Any = id  # its key in its supervisor's children (a serial if dynamic)
        self.stats = stats
        self.dynamic = dynamic
        self.pid: Pid | None = None
        self.os_pid: int | None = None
        self.type: str | None = None  # "worker" | "supervisor" (None: not known yet)
        self.restart: str | None = None  # permanent | transient | temporary
        self.state = "starting"
        self.since = 0.0  # Trellis clock
        self.since_wall = time.time()
        self.retry_at: float | None = None  # Trellis clock of a backoff's next attempt


class _Sup:
    """One supervisor's children, in start order."""

    __slots__ = (
        "by_os",
        "by_pid",
        "children",
        "dynamic",
        "keep",
        "pending",
        "pid",
        "since",
        "since_wall",
        "state",
        "strategy",
    )

    def __init__(self, pid: Any, dynamic: bool) -> None:
        self.pid = pid
        self.dynamic = dynamic
        self.strategy: str | None = None
        self.state = "starting"  # until supervisor.started
        self.since_wall = time.time()
        self.since = 0.0
        self.keep = False  # a static parent restarts it under the same path
        # static: child id -> child; dynamic: a serial number -> child
        self.children: dict[Any, _Child] = {}
        self.by_pid: dict[Pid, _Child] = {}  # dynamic only
        self.pending: dict[Any, list[_Child]] = {}  # dynamic: restarting, by child id
        self.by_os: dict[int, _Child] = {}  # dynamic: spawned, not started yet


class Tracker:
    """The shape and state of running trees, kept from telemetry alone: observers (the
    control API, metrics, dashboards) read it without asking a supervisor anything, so
    they answer at once however busy the supervisors are (a supervisor waiting for a
    child's readiness cannot answer ``which_children``). Attach it before the tree
    starts; it only ever runs inside telemetry handlers, on the tree's loop.

    What it keeps:

    - per supervisor (by its event path): its children in start order, each with its
      id, pid, OS pid, type and restart type (read from the supervisor's own record of
      the child when it starts), its state — ``starting`` (an OS process spawned, not
      ready yet), ``running``, ``restarting`` (exited and about to be started again,
      in backoff, or its start failed and is retried; also a child that a
      ``one_for_all``/``rest_for_one`` sibling's restart stopped, and the children of
      a restarting supervisor) or ``stopped`` — and since when. Children of a
      ``DynamicSupervisor`` or ``simple_one_for_one`` supervisor are told apart by pid
      even when they share a spec id.
    - ``stats[path]``: a :class:`ChildStats` per ``supervisor/child_id``: starts,
      restarts, exits, last exit, and the last :attr:`OUTPUT_LINES` lines an OS
      child wrote (from ``process.output`` events).

    Reading it (the snapshot API): :meth:`snapshot` returns plain dicts, a copy that
    is safe to keep, serialise or hand to another thread, and may itself be called
    from another thread (it reads the live records without locks; a child's fields
    may then be one event apart, never torn). :meth:`not_ready` lists what makes a tree
    not ready. Both cost O(children); for very large trees call them off the loop
    (``await asyncio.to_thread(tracker.snapshot, root)``).

    Each snapshot node is a dict with: ``path`` (tree path; ``id@n`` for dynamic
    children sharing an id), ``id``, ``key`` (``supervisor/child_id``, the key of
    ``stats`` and of event paths), ``supervisor`` (the parent's event path),
    ``type``, ``restart``, ``state``, ``since`` (Unix time the state began),
    ``retry_in`` (seconds to a backoff's next attempt, or None), ``pid`` (the
    :class:`Pid` or None), ``os_pid``, ``dynamic`` (its parent forgets it when it
    stops), ``restarts``, ``exits``, ``last_exit``, ``last_class``, ``stderr`` (its
    last stderr lines), ``output`` (a list
    of ``(stream, line)``) and ``children`` (for supervisors).

    Example::

        tracker = Tracker().attach()
        ...
        print(tracker.stats["root/worker"].restarts)
        tree = tracker.snapshot("root")
        print(tree["state"], [c["state"] for c in tree["children"]])
        tracker.detach()
    """

    EVENTS = (
        "child.started",
        "child.restarted",
        "child.exited",
        "child.backoff",
        "child.start_failed",
        "child.terminated",
        "child.deleted",
        "supervisor.started",
        "supervisor.stopped",
        "supervisor.reordered",
        "process.spawned",
        "process.exited",
        "process.output",
    )
    #: How many output lines are kept per child path (and stderr lines apart).
    OUTPUT_LINES = 20
    STDERR_LINES = 10

    def __init__(self) -> None:
        self.stats: dict[str, ChildStats] = {}
        self.errors = 0  # events the tracker could not apply (it is then unsure)
        self._sups: dict[str, _Sup] = {}
        self._sup_paths: dict[Pid, str] = {}  # supervisor pid -> its event path
        self._serial = 0
        self._pinned: set[str] = set()
        self._hid: object | None = None

    # -- lifecycle -------------------------------------------------------------------
    def attach(self) -> Tracker:
        """Start following telemetry (idempotent); returns ``self``."""
        if self._hid is None:
            self._hid = _telemetry.attach(self.handle, self.EVENTS)
        return self

    def detach(self) -> None:
        """Stop following telemetry (idempotent)."""
        if self._hid is not None:
            _telemetry.detach(self._hid)
            self._hid = None

    @property
    def attached(self) -> bool:
        """Whether the tracker follows telemetry (it is detached if its handler fails)."""
        return self._hid is not None

    # -- the telemetry handler ---------------------------------------------------------
    def handle(self, event: dict[str, Any]) -> None:
        try:
            if not self._fast(event):
                self._apply(event)
        except Exception:  # never detached by a bad event; but now unsure
            self.errors += 1
            if self.errors == 1:
                _log.exception("the tree tracker could not apply %r", event.get("event"))

    def _fast(self, ev: dict[str, Any]) -> bool:
        """The two events of a plain restart of a known worker under a static supervisor
        (the hot path: no method calls); False to take the general path."""
        name = ev["event"]
        exited = name == "child.exited"
        if not exited and name != "child.restarted":
            return False
        s = self._sups.get(ev["supervisor"])
        if s is None or s.dynamic:
            return False
        cid = ev["child_id"]
        if cid.__hash__ is None:
            return False
        c = s.children.get(cid)
        if c is None or c.type != "worker" or c.restart is None:
            return False
        t = ev["time"]
        st = c.stats
        if exited:
            if not ev["restart"]:
                return False
            st.exits += 1
            st.last_reason = ev["reason"]
            st.down_since = t
            c.state = "restarting"
            c.since = t
            return True
        pid = ev["pid"]
        c.pid = pid
        os_pid = c.os_pid = getattr(pid, "os_pid", None)
        c.state = "running"
        c.since = t
        c.retry_at = None
        st.starts += 1
        st.restarts += 1
        st.started_wall = _wall()
        st.started_mono = t
        st.down_since = None
        if os_pid is not None:
            st.os_pid = os_pid
        return True

    def _apply(self, ev: dict[str, Any]) -> None:
        name = ev["event"]
        if name == "process.output":
            path = str(ev.get("path"))
            ps = self.stats.get(path)
            if ps is None:
                ps = self.stats[path] = ChildStats()
            out = ps.output
            if out is None:
                out = ps.output = deque(maxlen=self.OUTPUT_LINES)
            stream, line = str(ev.get("stream")), str(ev.get("line"))
            out.append((stream, line))
            if stream == "stderr":
                err = ps.stderr
                if err is None:
                    err = ps.stderr = deque(maxlen=self.STDERR_LINES)
                err.append(line)
            return
        if name == "process.spawned":
            self._spawned(ev)
            return
        if name == "process.exited":
            self._process_exited(ev)
            return
        if name.startswith("supervisor."):
            self._supervisor_event(name, ev)
            return
        sup_path = ev["supervisor"]
        s = self._sups.get(sup_path)
        if s is None:
            s = self._sup(sup_path, ev.get("sup_pid"))
        cid = ev["child_id"]
        if cid.__hash__ is None:  # an unhashable id: known by its text
            cid = repr(cid)
        t = ev.get("time", 0.0)
        if name == "child.exited":
            c = self._find(s, cid, ev.get("pid"))
            st = self._stats(sup_path, cid)
            st.exits += 1
            st.last_reason = ev.get("reason")
            st.down_since = t
            if c is None:
                return
            if ev.get("restart"):
                self._set(c, "restarting", t)
                if c.dynamic:
                    self._unbind(s, c)
                    s.pending.setdefault(cid, []).append(c)
                if c.type == "supervisor":
                    self._descendants(c, sup_path, "restarting", t)
            else:
                self._set(c, "stopped", t)
                if c.dynamic or c.restart == "temporary":
                    self._forget(s, cid, c)
            return
        if name == "child.started" or name == "child.restarted":
            self._started(s, sup_path, cid, ev, t, name == "child.restarted")
            return
        if name == "child.backoff":
            c = self._find(s, cid, None)
            if c is not None:
                if c.state != "restarting":
                    self._set(c, "restarting", t)
                c.retry_at = t + float(ev.get("delay") or 0.0)
            return
        if name == "child.start_failed":
            c = self._find(s, cid, None)
            if c is not None and c.state != "restarting":
                self._set(c, "restarting", t)
            return
        if name == "child.terminated":
            c = self._find(s, cid, ev.get("pid"))
            if c is None:
                return
            bystander = s.strategy in ("one_for_all", "rest_for_one") and any(
                o.state == "restarting" for o in s.children.values() if o is not c
            )
            self._set(c, "restarting" if bystander else "stopped", t)
            if c.dynamic or c.restart == "temporary":
                self._forget(s, cid, c)
            return
        if name == "child.deleted":
            c = s.children.get(cid)
            if c is not None:
                self._forget(s, cid, c)

    def _sup(self, path: str, pid: Any) -> _Sup:
        server = getattr(pid, "_server", None)
        s = self._sups[path] = _Sup(pid, getattr(server, "mode", "static") != "static")
        if isinstance(pid, Pid):
            self._sup_paths[pid] = path
        return s

    def _stats(self, sup: str, cid: Any) -> ChildStats:
        path = f"{sup}/{cid}"
        st = self.stats.get(path)
        if st is None:
            st = self.stats[path] = ChildStats()
        return st

    @staticmethod
    def _set(c: _Child, state: str, t: float) -> None:
        c.state = state
        c.since = t
        if state != "restarting":
            c.retry_at = None

    def _find(self, s: _Sup, cid: Any, pid: Any) -> _Child | None:
        if not s.dynamic:
            return s.children.get(cid)
        if isinstance(pid, Pid):
            c = s.by_pid.get(pid)
            if c is not None:
                return c
        waiting = s.pending.get(cid)
        if not waiting:
            return None
        if isinstance(pid, Pid):  # a restarting child keeps its last pid
            for c in waiting:
                if c.pid is pid:
                    return c
        return waiting[0]

    def _unbind(self, s: _Sup, c: _Child) -> None:
        if c.pid is not None:
            s.by_pid.pop(c.pid, None)
        if c.os_pid is not None:
            s.by_os.pop(c.os_pid, None)

    def _forget(self, s: _Sup, cid: Any, c: _Child) -> None:
        if c.dynamic:
            self._unbind(s, c)
            waiting = s.pending.get(cid)
            if waiting and c in waiting:
                waiting.remove(c)
                if not waiting:
                    del s.pending[cid]
            if s.children.get(c.key) is c:
                del s.children[c.key]
        elif s.children.get(cid) is c:
            del s.children[cid]

    def _new_child(self, s: _Sup, sup_path: str, cid: Any) -> _Child:
        c = _Child(cid, self._stats(sup_path, cid), s.dynamic)
        if s.dynamic:
            self._serial += 1
            c.key = self._serial
            s.children[c.key] = c
        else:
            s.children[cid] = c
        return c

    def _started(
        self, s: _Sup, sup_path: str, cid: Any, ev: dict[str, Any], t: float, restarted: bool
    ) -> None:
        pid = ev.get("pid")
        os_pid = getattr(pid, "os_pid", None)
        c: _Child | None
        if s.dynamic:
            c = s.by_os.pop(os_pid, None) if os_pid is not None else None
            if c is None:
                waiting = s.pending.get(cid) if restarted else None
                if waiting:
                    c = waiting.pop(0)
                    if not waiting:
                        del s.pending[cid]
                else:
                    c = self._new_child(s, sup_path, cid)
            if isinstance(pid, Pid):
                s.by_pid[pid] = c
        else:
            c = s.children.get(cid)
            if c is None:
                c = self._new_child(s, sup_path, cid)
        c.pid = pid if isinstance(pid, Pid) else None
        c.os_pid = os_pid
        if c.restart is None:
            self._learn_spec(c, ev.get("sup_pid"), pid)
        self._set(c, "running", t)
        st = c.stats
        st.starts += 1
        if restarted:
            st.restarts += 1
        st.started_wall = time.time()
        st.started_mono = t
        st.down_since = None
        if os_pid is not None:
            st.os_pid = os_pid
        if c.type == "supervisor" and not s.dynamic:
            own = self._sups.get(f"{sup_path}/{cid}")
            if own is not None:
                own.keep = True

    def _learn_spec(self, c: _Child, sup_pid: Any, pid: Any) -> None:
        """The child's type and restart type, from its supervisor's record of it (a
        read of the supervisor's memory on this loop: never a message)."""
        server = getattr(sup_pid, "_server", None)
        record = getattr(server, "by_pid", {}).get(pid) if server is not None else None
        spec = getattr(record, "spec", None)
        if spec is not None:
            c.type = str(spec.type)
            c.restart = str(spec.restart)
        elif isinstance(pid, Pid) and pid in self._sup_paths:
            c.type = "supervisor"

    def _spawned(self, ev: dict[str, Any]) -> None:
        """An OS child's process exists but it has not reported ready: ``starting`` (a
        first start) or still ``restarting``, now with its OS pid."""
        path = str(ev.get("path"))
        cid = ev.get("child_id")
        if cid.__hash__ is None:
            cid = repr(cid)
        sup_path = path[: -len(str(cid)) - 1] if path.endswith(f"/{cid}") else None
        s = self._sups.get(sup_path) if sup_path is not None else None
        os_pid = ev.get("os_pid")
        st = self.stats.get(path)
        if st is None:
            st = self.stats[path] = ChildStats()
        st.os_pid = os_pid
        if s is None or sup_path is None:
            return
        c = self._find(s, cid, None)
        if c is None or (s.dynamic and c.state != "restarting"):
            c = self._new_child(s, sup_path, cid)
            c.type = "worker"
            self._set(c, "starting", ev.get("time", 0.0))
        elif c.state != "restarting":
            self._set(c, "starting", ev.get("time", 0.0))
        c.os_pid = os_pid
        if s.dynamic and isinstance(os_pid, int):
            s.by_os[os_pid] = c

    def _process_exited(self, ev: dict[str, Any]) -> None:
        """An OS child's process ended before its first start completed (it never got
        ready): its supervisor does not keep it, so neither do we."""
        path = str(ev.get("path"))
        cid = ev.get("child_id")
        if cid.__hash__ is None:
            cid = repr(cid)
        sup_path = path[: -len(str(cid)) - 1] if path.endswith(f"/{cid}") else None
        s = self._sups.get(sup_path) if sup_path is not None else None
        if s is None or sup_path is None:
            return
        os_pid = ev.get("os_pid")
        if not isinstance(os_pid, int):
            return
        c = s.by_os.get(os_pid) if s.dynamic else s.children.get(cid)
        if c is None or c.state != "starting" or c.os_pid != os_pid:
            return
        if c.stats.starts == 0 or c.dynamic:  # a first start that failed: never added
            self._forget(s, cid, c)
        else:  # a stopped child started again by hand: its spec stays, stopped
            self._set(c, "stopped", ev.get("time", 0.0))

    def _supervisor_event(self, name: str, ev: dict[str, Any]) -> None:
        path = ev["supervisor"]
        s = self._sups.get(path)
        pid = ev.get("sup_pid")
        if s is None or (s.pid is not pid and name == "supervisor.started"):
            keep = s.keep if s is not None else False
            old = s
            s = self._sup(path, pid)
            s.keep = keep
            if old is not None:
                s.children = old.children  # a restarted static supervisor: same shape
        t = ev.get("time", 0.0)
        if name == "supervisor.started":
            s.state = "running"
            s.since = t
            s.strategy = str(ev.get("strategy"))
        elif name == "supervisor.stopped":
            s.state = "stopped"
            s.since = t
            if isinstance(pid, Pid):
                self._sup_paths.pop(pid, None)
            if not s.keep and path not in self._pinned:
                del self._sups[path]
                return
            for c in s.children.values():
                if c.state != "stopped":
                    self._set(c, "stopped", t)
        elif name == "supervisor.reordered" and not s.dynamic:  # trellis reload
            ids = [i if i.__hash__ is not None else repr(i) for i in ev["children"]]
            rank = {i: n for n, i in enumerate(ids)}
            order = sorted(s.children, key=lambda k: rank.get(k, len(rank)))
            s.children = {k: s.children[k] for k in order}

    def _descendants(self, c: _Child, sup_path: str, state: str, t: float) -> None:
        """Mark the children of the supervisor child ``c`` (and theirs) ``state``."""
        own = self._sups.get(f"{sup_path}/{c.id}") if not c.dynamic else None
        if own is None:
            return
        own.state = "restarting"
        own.since = t
        for g in own.children.values():
            self._set(g, state, t)
            if g.type == "supervisor":
                self._descendants(g, f"{sup_path}/{c.id}", state, t)

    def pin(self, root: Pid | str) -> None:
        """Keep the record of the supervisor ``root`` (a pid or event path) after it
        stops, so a stopped root still shows as stopped (other supervisors that no
        static parent restarts are forgotten when they stop)."""
        self._pinned.add(
            root if isinstance(root, str) else self._sup_paths.get(root) or _root_path(root)
        )

    # -- reading -----------------------------------------------------------------------
    def supervisors(self) -> list[str]:
        """The event paths of the supervisors the tracker knows."""
        return list(self._sups)

    def snapshot(
        self, root: str | Pid | None = None, *, depth: int | None = None
    ) -> dict[str, Any] | None:
        """The tree under ``root`` (a supervisor's event path or pid; the only tree when
        there is one) as plain dicts (see the class docstring), or None if the tracker
        has not seen that supervisor. ``depth`` limits the levels shown (0: the root
        alone, with no children).

        Example::

            tree = tracker.snapshot("root")
            down = [n["path"] for n in flat(tree) if n["state"] != "running"]
        """
        path = self._resolve(root)
        if path is None:
            return None
        s = self._sups.get(path)
        if s is None:
            return None
        now_mono = self._now()
        wall = time.time()
        node: dict[str, Any] = {
            "path": path,
            "id": path,
            "key": path,
            "supervisor": None,
            "type": "supervisor",
            "restart": None,
            "state": s.state if s.state != "starting" else "starting",
            "since": wall - (now_mono - s.since) if s.since else s.since_wall,
            "retry_in": None,
            "pid": s.pid if isinstance(s.pid, Pid) else None,
            "os_pid": None,
            "dynamic": False,
            "restarts": 0,
            "exits": 0,
            "last_exit": None,
            "last_class": None,
            "output": [],
            "stderr": [],
            "children": [],
        }
        if depth is None or depth > 0:
            self._fill(node, path, s, now_mono, 0 if depth is None else 65 - depth)
        return node

    def _resolve(self, root: str | Pid | None) -> str | None:
        if isinstance(root, str):
            return root
        if isinstance(root, Pid):
            p = self._sup_paths.get(root)
            if p is not None:
                return p
            return _root_path(root)
        sups = list(self._sups)
        tops = [p for p in sups if not any(p.startswith(q + "/") for q in sups)]
        return tops[0] if len(tops) == 1 else None

    @staticmethod
    def _now() -> float:
        clock = _clock._override  # the Trellis clock, as events are stamped
        if clock is not None:
            return clock.now()
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # another thread: asyncio's loops read this clock
            return time.monotonic()

    def _fill(
        self,
        node: dict[str, Any],
        sup_path: str,
        s: _Sup,
        now: float,
        depth: int,
        shown: str | None = None,
    ) -> None:
        kids = list(s.children.values())  # a copy in one step: safe from another thread
        counts: dict[str, int] = {}
        if s.dynamic:
            for c in kids:
                k = str(c.id)
                counts[k] = counts.get(k, 0) + 1
        out = node["children"]
        parent_state = shown or s.state
        wall = time.time()  # a state's Unix time, from its Trellis-clock time
        for c in kids:
            seg = str(c.id)
            pid = c.pid
            if s.dynamic and counts.get(seg, 0) > 1:
                seg = f"{seg}@{pid.id if pid is not None else '?'}"
            st = c.stats
            state = c.state
            if state == "stopped" and parent_state in ("restarting", "starting"):
                state = parent_state  # its supervisor will start it again
            retry = c.retry_at
            output = st.output
            child: dict[str, Any] = {
                "path": f"{node['path']}/{seg}",
                "id": c.id,
                "key": f"{sup_path}/{c.id}",
                "supervisor": sup_path,
                "type": c.type,
                "restart": c.restart,
                "state": state,
                "since": wall - (now - c.since) if c.since else c.since_wall,
                "retry_in": None if retry is None else max(0.0, retry - now),
                "pid": pid,
                "os_pid": c.os_pid,
                "dynamic": c.dynamic,
                "restarts": st.restarts,
                "exits": st.exits,
                "last_exit": st.last_exit,
                "last_class": st.last_class,
                "output": list(output) if output else [],
                "stderr": list(st.stderr) if st.stderr else [],
                "children": [],
            }
            out.append(child)
            if c.type == "supervisor" and depth < 64:
                own_path = self._sup_paths.get(pid) if pid is not None else None
                if own_path is None and not c.dynamic:
                    own_path = f"{sup_path}/{c.id}"
                own = self._sups.get(own_path) if own_path is not None else None
                if own is not None and own_path is not None:
                    override = state if state in ("restarting", "starting") else None
                    self._fill(child, own_path, own, now, depth + 1, override)

    def states(
        self, root: str | Pid | None = None
    ) -> Iterator[tuple[str, Any, str, Pid | None, str | None]]:
        """``(supervisor path, child id, state, pid, restart type)`` for every child of
        the tree under ``root`` (parents before children; the state as :meth:`snapshot`
        shows it): a lean walk for large trees that keeps nothing (metrics read it at
        each scrape, readiness at each probe)."""
        path = self._resolve(root)
        s = self._sups.get(path) if path is not None else None
        if path is None or s is None:
            return
        stack: list[tuple[str, _Sup, str | None, int]] = [(path, s, None, 0)]
        while stack:
            sup_path, sup, shown, depth = stack.pop()
            parent_state = shown or sup.state
            later = []
            for c in list(sup.children.values()):
                state = c.state
                if state == "stopped" and parent_state in ("restarting", "starting"):
                    state = parent_state
                yield sup_path, c.id, state, c.pid, c.restart
                if c.type == "supervisor" and depth < 64:
                    own_path = self._sup_paths.get(c.pid) if c.pid is not None else None
                    if own_path is None and not c.dynamic:
                        own_path = f"{sup_path}/{c.id}"
                    own = self._sups.get(own_path) if own_path is not None else None
                    if own is not None and own_path is not None:
                        override = state if state in ("restarting", "starting") else None
                        later.append((own_path, own, override, depth + 1))
            stack.extend(reversed(later))

    def not_ready(self, root: str | Pid | None = None) -> tuple[str | None, list[dict[str, Any]]]:
        """Why the tree under ``root`` is not ready: ``(reason, nodes)``; ``(None, [])``
        when it is. Not ready: the tracker is detached or missed an event (unsure), the
        root is not running, or a child is starting or restarting, or a child that
        should run is not running (permanent, or of unknown restart type: fail closed).
        A stopped transient or temporary child is fine."""
        if not self.attached:
            return "the tree tracker is not following telemetry", []
        if self.errors:
            return f"the tree tracker missed {self.errors} event(s): state unknown", []
        top = self.snapshot(root, depth=0)
        if top is None:
            return "the tree tracker has not seen the root supervisor start", []
        if top["state"] != "running":
            return f"the root supervisor is {top['state']}", []
        if all(  # the common case, without building a snapshot of a large tree
            state == "running" or (state == "stopped" and restart in ("transient", "temporary"))
            for _, _, state, _, restart in self.states(root)
        ):
            return None, []
        tree = self.snapshot(root)
        assert tree is not None
        bad = [
            n
            for n in flat(tree)[1:]
            if n["state"] in ("starting", "restarting")
            or (n["state"] != "running" and n["restart"] not in ("transient", "temporary"))
        ]
        if bad:
            shown = ", ".join(f"{n['path']} ({n['state']})" for n in bad[:20])
            more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
            return f"not running: {shown}{more}", bad
        return None, []


def flat(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """A :meth:`Tracker.snapshot` node and every node below it, parents first."""
    out = [tree]
    for c in tree["children"]:
        out.extend(flat(c))
    return out


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

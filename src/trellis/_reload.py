"""Live reload of a tree file: re-read it, diff it against the running tree, and apply
only the difference through the supervisors' administration API.

What a reload does, supervisor by supervisor (parents before their children):

- a child gone from the file is stopped and forgotten (in reverse start order);
- a new child is started (in file order) and then put at its place in the start order;
- a child whose table changed is restarted with its new spec, unless only keys that
  do not change the running program changed: ``restart``, ``shutdown``,
  ``significant`` and ``backoff`` replace its spec in place (used from its next
  restart), ``slo``, ``runbook`` and ``owner`` are descriptive;
- a nested supervisor whose ``intensity`` or ``period`` changed is updated in place;
  a change of its ``strategy``, ``auto_shutdown`` or ``name`` restarts it (and its
  subtree); otherwise its children are reloaded the same way, recursively;
- everything else is left alone: same pids, same OS processes.

An invalid file, or one that changes what cannot change while the tree runs (the
root's ``name``, ``strategy`` or ``auto_shutdown``), changes nothing. Each reload emits
``tree.reloading`` and then ``tree.reloaded`` (with the diff) plus an
``operator.action``, so the journal keeps it. This module is an extension of
:func:`trellis.run`; it imports no journal, metrics or control code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._childspec import ChildSpec, ChildType
from ._core import _telemetry
from ._core._exceptions import NotFound, StartError, TrellisError
from ._core._process import Pid
from ._core._reasons import RESTARTING
from ._supervisor import SupervisorPid
from .config import ConfigError, ConfigIssue, TreeSpec, _loads

__all__ = ["Change", "ReloadResult", "Reloader", "read_tree"]

_log = logging.getLogger("trellis.reload")

#: Keys whose change replaces the child's spec in place (no restart).
SPEC_ONLY = frozenset({"restart", "shutdown", "significant", "backoff"})
#: Keys that describe a child without changing how it runs.
DESCRIPTIVE = frozenset({"slo", "runbook", "owner"})
#: Supervisor flags updated in place.
FLAGS_IN_PLACE = frozenset({"intensity", "period"})
#: Root keys that cannot change while the tree runs.
ROOT_FIXED = ("name", "strategy", "auto_shutdown")


def read_tree(path: str | os.PathLike[str]) -> tuple[TreeSpec, dict[str, Any]]:
    """Read and validate a tree file once: its :class:`TreeSpec` and the parsed TOML.

    Raises :class:`ConfigError` (as :func:`trellis.config.load` does).

    Example::

        tree, raw = read_tree("examples/trees/services.toml")
    """
    p = Path(path)
    source = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([ConfigIssue("", None, f"cannot read: {e.strerror or e}")], source) from e
    except UnicodeDecodeError as e:
        raise ConfigError([ConfigIssue("", None, f"not UTF-8 text: {e}")], source) from e
    base = p.resolve().parent
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))
    tree = _loads(text, source, base)
    return tree, tomllib.loads(text)


# ---------------------------------------------------------------------------
# The tree as the file gives it
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Node:
    """One child: its spec, its table without ``children``, and its children (for a
    supervisor). ``pending``: it should run but its last start from a reload failed."""

    id: str
    spec: ChildSpec
    table: dict[str, Any]
    children: list[_Node] | None = None
    pending: bool = False


@dataclass(slots=True)
class _View:
    name: str
    root: dict[str, Any]
    children: list[_Node]
    settings: dict[str, Any]


def _table(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "children"}


def _nodes(raw: object, specs: Sequence[ChildSpec]) -> list[_Node]:
    """Pair the file's child tables with the specs built from them (same order)."""
    tables = raw if isinstance(raw, list) else []
    if len(tables) != len(specs):  # cannot happen for a valid file
        raise ValueError("the tree file's children do not match its specs")
    out = []
    for data, spec in zip(tables, specs, strict=True):
        kids = None
        sub = spec.args[0] if spec.args else []
        # a server-backed supervisor (a DistributedSupervisor) has no child specs here
        if (
            spec.type is ChildType.SUPERVISOR
            and isinstance(sub, list | tuple)
            and all(isinstance(c, ChildSpec) for c in sub)
        ):
            kids = _nodes(data.get("children"), sub)
        out.append(_Node(str(spec.id), spec, _table(data), kids))
    return out


def _view(tree: TreeSpec, raw: dict[str, Any]) -> _View:
    sup = raw.get("supervisor", {})
    settings = {k: v for k, v in raw.items() if k != "supervisor"}
    return _View(tree.name, _table(sup), _nodes(sup.get("children"), tree.children), settings)


def _changed_keys(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING)}


_MISSING = object()


# ---------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One applied change: ``kind`` is ``added``, ``removed``, ``restarted``,
    ``updated`` (spec or flags replaced in place, no restart) or ``reordered``;
    ``keys`` are the tree-file keys that changed."""

    kind: str
    path: str
    keys: tuple[str, ...] = ()

    def text(self) -> str:
        return f"{self.kind} {self.path}" + (f" ({', '.join(self.keys)})" if self.keys else "")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"change": self.kind, "path": self.path}
        if self.keys:
            out["keys"] = list(self.keys)
        return out


@dataclass(slots=True)
class ReloadResult:
    """``result``: ``ok`` (applied; ``changes`` may be empty), ``invalid`` (the file is
    invalid: nothing changed), ``refused`` (nothing changed: the file changes what
    cannot change while the tree runs, the root's ``name``, ``strategy`` or
    ``auto_shutdown``, and then ``bad_input`` is true; or the tree is not running or
    is stopping) or ``failed`` (some changes could not be applied: see ``errors``; the
    others were)."""

    file: str
    result: str = "ok"
    changes: list[Change] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: nothing changed because of what the file says (``invalid``, or ``refused`` for a
    #: root key that cannot change while the tree runs): a usage error (422, exit 2)
    bad_input: bool = False

    @property
    def ok(self) -> bool:
        return self.result == "ok"

    def summary(self) -> str:
        if self.result in ("invalid", "refused"):
            return f"{self.file}: nothing changed: " + "; ".join(self.errors)
        parts = [c.text() for c in self.changes] or ["no changes"]
        text = f"{self.file}: " + "; ".join(parts)
        if self.errors:
            text += "; errors: " + "; ".join(self.errors)
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": "reload",
            "file": self.file,
            "result": self.result,
            "changes": [c.as_dict() for c in self.changes],
            "errors": list(self.errors),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------
# The extension
# ---------------------------------------------------------------------------


class Reloader:
    """Reloads the tree file a running tree was started from (an extension of
    :func:`trellis.run`; ``trellis run`` adds one). ``reload()`` is what ``trellis
    reload``, ``POST /v1/reload`` and SIGHUP call; reloads run one at a time.

    Example::

        tree, raw = read_tree("tree.toml")
        reloader = Reloader("tree.toml", tree, raw)
        trellis.run(tree.child_spec(), extensions=[reloader])
    """

    def __init__(self, path: str | os.PathLike[str], tree: TreeSpec, raw: dict[str, Any]) -> None:
        self.path = os.path.abspath(path)
        self.cwd = os.getcwd()
        self._view = _view(tree, raw)
        self._root: Pid | None = None
        self._lock = asyncio.Lock()
        self._stopping = False
        self._tasks: set[asyncio.Task[ReloadResult]] = set()

    # -- Extension ----------------------------------------------------------------
    async def start(self) -> None:
        pass

    async def tree_started(self, root: Pid, request_stop: Callable[[], None]) -> None:
        self._root = root

    async def tree_stopping(self) -> None:
        """A stop cancels a reload in progress: the supervisors finish the operation they
        are doing, nothing more is started, and the reload is reported as cancelled."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()

    async def stop(self) -> None:
        self._stopping = True
        self._root = None

    async def sighup(self) -> None:
        """Called by :func:`trellis.run` on SIGHUP: reload, log and journal the result."""
        await self.reload(who="signal:SIGHUP", source="signal")

    # -- reload ---------------------------------------------------------------------
    async def reload(
        self, *, who: str = "api", source: str = "api", reason: str | None = None
    ) -> ReloadResult:
        """Re-read the tree file and apply the difference; a bad file or a failed change
        is in the result, never raised. A caller that goes away does not stop the reload."""
        task = asyncio.ensure_future(self._locked(who, source, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def shown_path(self) -> str:
        """The tree file's path as `trellis run` was given it (relative to its cwd)."""
        if self.path.startswith(self.cwd + os.sep):
            return os.path.relpath(self.path, self.cwd)
        return self.path

    async def _locked(self, who: str, source: str, reason: str | None) -> ReloadResult:
        result = ReloadResult(self.shown_path())
        async with self._lock:
            if self._stopping or self._root is None:
                result.result = "refused"
                why = "the tree is stopping" if self._stopping else "the tree is not running yet"
                result.errors.append(why)
            else:
                _telemetry.emit("tree.reloading", file=result.file, monotonic=time.monotonic())
                try:
                    await self._reload(result)
                except asyncio.CancelledError:
                    result.result = "failed"
                    result.errors.append("cancelled: the tree is stopping")
                except Exception as e:  # a bug here must not end the tree
                    _log.exception("reload failed")
                    result.result = "failed"
                    result.errors.append(f"internal error: {type(e).__name__}: {e}")
            self._report(result, who, source, reason)
        return result

    def _report(self, result: ReloadResult, who: str, source: str, reason: str | None) -> None:
        fields: dict[str, Any] = {
            "file": result.file,
            "result": result.result,
            "changes": [c.as_dict() for c in result.changes],
            "errors": list(result.errors),
            "summary": result.summary(),
        }
        if result.notes:
            fields["notes"] = list(result.notes)
        _telemetry.emit("tree.reloaded", **fields)
        action: dict[str, Any] = {
            "who": who,
            "action": "reload",
            "target": result.file,
            "source": source,
            "result": "ok" if result.ok else f"{result.result}: " + "; ".join(result.errors),
        }
        if reason is not None:
            action["detail"] = reason
        _telemetry.emit("operator.action", **action)

    async def _reload(self, result: ReloadResult) -> None:
        try:
            tree, raw = await asyncio.to_thread(_read_in, self.path, self.cwd)
        except ConfigError as e:
            result.result = "invalid"
            result.bad_input = True
            result.errors.extend(issue.format(result.file) for issue in e.errors)
            return
        new = _view(tree, raw)
        old = self._view
        fixed = [k for k in ROOT_FIXED if old.root.get(k) != new.root.get(k)]
        if fixed:  # a valid file this tree cannot take while it runs: refused whole
            result.result = "refused"
            result.bad_input = True
            where = await asyncio.to_thread(_locate, self.path)
            for key in fixed:
                line = where(("supervisor", key))
                result.errors.append(
                    f"{result.file}:{line}: supervisor.{key}: the root's {key} cannot change "
                    f"while the tree runs ({old.root.get(key)!r} -> {new.root.get(key)!r}); "
                    "restart `trellis run`"
                )
            return
        for key in sorted(_changed_keys(old.settings, new.settings)):
            result.notes.append(f"[{key}] changed: it applies at the next `trellis run`")
        root = self._root
        assert isinstance(root, SupervisorPid)
        keys = sorted(_changed_keys(old.root, new.root) & FLAGS_IN_PLACE)
        if keys:
            flags = (new.root.get("intensity", 3), new.root.get("period", 5.0))
            try:
                await root._admin("set_flags", flags)
            except TrellisError as e:
                result.errors.append(f"{new.name}: cannot update {', '.join(keys)}: {e}")
            else:
                result.changes.append(Change("updated", new.name, tuple(keys)))
                old.root = new.root
        old.settings = new.settings
        old.children = await _Apply(result).supervisor(root, new.name, old.children, new.children)
        if result.errors:
            result.result = "failed"


def _locate(path: str) -> Callable[[tuple[str, ...]], int]:
    """The line of a key path in the tree file (of its nearest written ancestor; 1)."""
    from ._config._locate import Locator

    try:
        with open(path, encoding="utf-8") as f:
            locator = Locator(f.read())
    except (OSError, UnicodeDecodeError):
        return lambda _path: 1
    return lambda key: locator.line(key) or 1


def _read_in(path: str, cwd: str) -> tuple[TreeSpec, dict[str, Any]]:
    """Read the tree file as `trellis run` did: imports from its directory and from the
    directory `trellis run` started in."""
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return read_tree(path)


class _Apply:
    """Applies one reload's changes, recording them in ``result``."""

    def __init__(self, result: ReloadResult) -> None:
        self.result = result

    def error(self, path: str, what: str, e: BaseException) -> None:
        reason = e.reason if isinstance(e, StartError) and e.reason is not None else e
        why = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else reason
        self.result.errors.append(f"{path}: {what}: {why}")

    async def supervisor(
        self, sup: SupervisorPid, path: str, old: list[_Node], new: list[_Node]
    ) -> list[_Node]:
        """Apply the difference between ``old`` and ``new`` children of ``sup``; returns
        what now describes its children (a failed change keeps the old entry)."""
        new_ids = {n.id for n in new}
        state: dict[str, _Node] = {n.id: n for n in old}
        touched = False
        for node in reversed(old):  # stop removed children, last started first
            if node.id in new_ids:
                continue
            where = f"{path}/{node.id}"
            try:
                try:
                    await sup.terminate_child(node.id)
                    await sup.delete_child(node.id)
                except NotFound:
                    pass  # a temporary child that already ended
            except TrellisError as e:
                self.error(where, "cannot remove", e)
                continue
            del state[node.id]
            self.result.changes.append(Change("removed", where))
        for node in new:
            where = f"{path}/{node.id}"
            cur = state.get(node.id)
            if cur is None:
                touched = True
                try:
                    await sup.start_child(node.spec)
                except TrellisError as e:
                    self.error(where, "cannot start", e)
                    continue
                state[node.id] = node
                self.result.changes.append(Change("added", where))
            else:
                state[node.id] = await self.child(sup, where, cur, node)
        order = [n.id for n in new if n.id in state] + [i for i in state if i not in new_ids]
        old_order = [n.id for n in old if n.id in state]
        if touched or old_order != [i for i in order if i in old_order]:
            try:
                await sup._admin("reorder", order)
            except TrellisError as e:
                self.error(path, "cannot reorder", e)
            else:
                if old_order != [i for i in order if i in old_order]:
                    self.result.changes.append(Change("reordered", path))
        return [state[i] for i in order]

    async def child(self, sup: SupervisorPid, where: str, cur: _Node, new: _Node) -> _Node:
        keys = _changed_keys(cur.table, new.table)
        shown = tuple(sorted(keys))
        if cur.pending or (cur.children is None) != (new.children is None):
            return await self.restart(sup, where, cur, new, shown)
        if new.children is None:  # a leaf
            if not keys:
                return cur
            if keys <= DESCRIPTIVE:
                cur.table = new.table
                self.result.changes.append(Change("updated", where, shown))
                return cur
            if keys <= SPEC_ONLY | DESCRIPTIVE:
                return await self.replace(sup, where, cur, new, shown)
            return await self.restart(sup, where, cur, new, shown)
        # a nested supervisor
        assert cur.children is not None
        if keys - SPEC_ONLY - DESCRIPTIVE - FLAGS_IN_PLACE:
            return await self.restart(sup, where, cur, new, shown)
        try:
            info = await sup.which_child(new.id)
        except TrellisError as e:
            self.error(where, "cannot find it", e)
            return cur
        pid = info.pid
        flags = keys & FLAGS_IN_PLACE
        if flags and isinstance(pid, SupervisorPid):
            value = (new.table.get("intensity", 3), new.table.get("period", 5.0))
            try:
                await pid._admin("set_flags", value)
            except TrellisError as e:
                self.error(where, "cannot update its flags", e)
                return cur
        children = new.children
        if isinstance(pid, SupervisorPid):
            children = await self.supervisor(pid, where, cur.children, new.children)
        try:
            await sup._admin("replace_childspec", new.spec)
        except TrellisError as e:
            self.error(where, "cannot replace its spec", e)
            return _Node(cur.id, cur.spec, cur.table, children)
        if keys:
            self.result.changes.append(Change("updated", where, shown))
        return _Node(new.id, new.spec, new.table, children)

    async def replace(
        self, sup: SupervisorPid, where: str, cur: _Node, new: _Node, keys: tuple[str, ...]
    ) -> _Node:
        try:
            await sup._admin("replace_childspec", new.spec)
        except NotFound:  # a temporary child that ended: nothing runs to update
            self.result.changes.append(Change("updated", where, keys))
            return new
        except TrellisError as e:
            self.error(where, "cannot update", e)
            return cur
        self.result.changes.append(Change("updated", where, keys))
        return new

    async def restart(
        self, sup: SupervisorPid, where: str, cur: _Node, new: _Node, keys: tuple[str, ...]
    ) -> _Node:
        """Stop the child, give it its new spec, and start it again if it was running
        (or should have been); it keeps its place in the start order."""
        try:
            info = await sup.which_child(new.id)
        except NotFound:
            info = None
        except TrellisError as e:
            self.error(where, "cannot restart", e)
            return cur
        try:
            if info is None:  # a temporary child that ended: start it with the new table
                await sup.start_child(new.spec)
                self.result.changes.append(Change("restarted", where, keys))
                return new
            running = isinstance(info.pid, Pid) or info.pid is RESTARTING or cur.pending
            await sup.terminate_child(new.id)
            await sup._admin("replace_childspec", new.spec)
            if not running:
                self.result.changes.append(Change("updated", where, keys))
                return new
            await sup.restart_child(new.id)
        except TrellisError as e:
            self.error(where, "cannot restart", e)
            return _Node(cur.id, cur.spec, cur.table, cur.children, pending=True)
        self.result.changes.append(Change("restarted", where, keys))
        return new

"""Walk a parsed tree file: validate every table, check the environment, build child specs.

Every problem is collected as ``(key path, message)``; nothing stops at the
first one. A child whose own table is valid is built even when a sibling is not.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pwd
import shlex
import shutil
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .._children import Command, Health, Limits, Logs, Ready
from .._childspec import Backoff, ChildSpec, SupervisorSpec
from .._core._exceptions import ChildSpecError, SupervisorFlagsError
from .._server import Server
from .._supervisor import Supervisor
from .._worker import worker
from ._locate import KeyPath, format_path
from ._models import (
    _SRE_KEYS,
    CHILD_KINDS,
    SLI_KEYS,
    BackoffModel,
    CommandChild,
    Document,
    HealthModel,
    IsolatedChild,
    PluginChild,
    ReadyModel,
    RootSupervisor,
    ServerChild,
    SloArray,
    SloModel,
    SupervisorChild,
    WorkerChild,
    _Child,
    _Model,
    _Sre,
    suggest,
)

__all__ = ["Node", "Tree", "walk"]

M = TypeVar("M", bound=_Model)

_SUPERVISOR_KEYS = ("children", "strategy", "intensity", "period", "auto_shutdown")
#: The keys that name what a child runs (a supervisor is known by its own keys).
_KIND_KEYS = ("command", "server", "isolated", "worker", "plugin")
_SPEC_OPTIONS = frozenset({"id", "restart", "shutdown", "significant", "backoff", "name"})


@dataclass(frozen=True, slots=True)
class Node:
    """One line of a tree outline: a child's id, kind, what it runs, and its children."""

    id: str
    kind: str
    detail: str
    children: tuple[Node, ...] = ()


@dataclass(frozen=True, slots=True)
class Tree:
    """The root supervisor of a valid tree file."""

    name: str
    flags: dict[str, Any]
    children: tuple[ChildSpec, ...]
    outline: tuple[Node, ...]
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Built:
    spec: ChildSpec | None
    id: str | None
    node: Node | None


def walk(
    data: dict[str, Any], base_dir: Path, issue: Callable[[KeyPath, str], None]
) -> Tree | None:
    """Validate ``data`` (a parsed tree file); report problems through ``issue``.

    Returns the tree when there were no problems. Relative ``cwd`` and ``logs.dir``
    are taken from ``base_dir``.
    """
    return _Walker(base_dir, issue).document(data)


class _Walker:
    def __init__(self, base_dir: Path, issue: Callable[[KeyPath, str], None]) -> None:
        self.base_dir = base_dir
        self.issue = issue
        self.failed = False
        self.ids: dict[KeyPath, str | None] = {}  # key path of a child -> its id
        self.sre: dict[KeyPath, dict[str, Any]] = {}  # key path -> slo/runbook/owner
        self.names: dict[str, KeyPath] = {}  # registered name -> where it is given
        self.tree_name = "root"  # cluster singletons' leases are named TREE.ID

    def error(self, path: KeyPath, message: str) -> None:
        self.failed = True
        self.issue(path, message)

    # -- validation ------------------------------------------------------------------
    def validate(self, cls: type[M], data: object, path: KeyPath) -> M | None:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            for err in e.errors(include_url=False):
                self._pydantic_error(cls, path, err)  # type: ignore[arg-type]
            return None

    def validate_rest(self, cls: type[M], data: dict[str, Any]) -> M | None:
        """``data`` validated without its invalid keys (errors already reported), so the
        environment checks still run on the valid ones; None if that is not possible."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            bad = {err["loc"][0] for err in e.errors() if err["loc"]}
        try:
            return cls.model_validate({k: v for k, v in data.items() if k not in bad})
        except ValidationError:
            return None

    def _pydantic_error(self, cls: type[_Model], path: KeyPath, err: dict[str, Any]) -> None:
        loc: KeyPath = tuple(err["loc"])
        if loc and loc[-1] == "[key]":  # a table's key itself is wrong (e.g. an env name)
            loc = loc[:-1]
        kind = err["type"]
        if kind == "extra_forbidden":
            model = _model_at(cls, loc[:-1])
            key = str(loc[-1])
            if model is None:
                self.error((*path, *loc), f"unknown key {key!r}")
                return
            where = f" for {model.what}" if model is cls else f" in {model.what}"
            hint = suggest(key, model.model_fields)
            self.error((*path, *loc), f"unknown key {key!r}{where}{hint}")
        elif kind == "missing":
            self.error((*path, *loc[:-1]), f"missing key {loc[-1]!r}")
        elif kind == "trellis":
            self.error((*path, *loc), err["msg"])
        elif loc and loc[-1] == "children" and isinstance(err["input"], dict):
            where = format_path((*path, *loc))
            self.error((*path, *loc), f"children is an array of tables: write [[{where}]]")
        else:
            msg = err["msg"]
            self.error((*path, *loc), f"{msg[:1].lower()}{msg[1:]}, got {_show(err['input'])}")

    def core_error(
        self,
        path: KeyPath,
        e: ChildSpecError | SupervisorFlagsError,
        keys: dict[str, str] | None = None,
    ) -> None:
        """A core spec/flag error, reported at the key it names."""
        field = (keys or {}).get(e.field, e.field)
        parts = tuple(field.split(".")) if field and " " not in field else ()
        self.error((*path, *parts), str(e))

    # -- the document ----------------------------------------------------------------
    def document(self, data: dict[str, Any]) -> Tree | None:
        doc = self.validate(Document, data, ())
        if doc is None:
            return None
        path: KeyPath = ("supervisor",)
        root = self.validate(RootSupervisor, doc.supervisor, path)
        self.tree_name = (root.name if root is not None else None) or "root"
        if root is not None:
            self.note_sre(root, path)
            self.register_name(root.name or "root", (*path, "name"))  # the root's own
        else:
            self.slo_errors(doc.supervisor, path, False)
        raw_children = doc.supervisor.get("children")
        auto = (root.auto_shutdown or "never") if root is not None else None
        built = self.children(raw_children, (*path, "children"), auto)
        if root is None:
            return None
        self.check_flags(root, path, len(built))
        if self.failed:
            return None
        settings = self.settings(doc)
        if self.sre:
            settings["slo"] = self.sre_settings(root.name or "root")
        return Tree(
            name=root.name or "root",
            flags=root.flags(),
            children=tuple(b.spec for b in built if b.spec is not None),
            outline=tuple(b.node for b in built if b.node is not None),
            settings=settings,
        )

    def note_sre(self, model: _Sre, path: KeyPath) -> None:
        """Remember a child's or supervisor's ``slo``, ``runbook`` and ``owner``.

        ``slo`` is a table or an array of tables: each is validated here (so errors
        name the key in the table), then checked for the keys of its SLI kind, and the
        names (default: the kind) must differ on one child."""
        given = model.given("id")
        entry: dict[str, Any] = {k: given[k] for k in ("runbook", "owner") if k in given}
        if model.slo is not None:
            slos = self.slo_tables(model.slo, path, isinstance(model, ServerChild))
            if slos:
                journal = [s for s in slos if s.get("sli", "up") in ("up", "calls")]
                if journal:  # what `trellis slo report` measures from the journal
                    entry["slo"] = {k: v for k, v in journal[0].items() if k != "name"}
                entry["slos"] = [
                    {"name": s.get("name", s.get("sli", "up")), "sli": s.get("sli", "up"), **s}
                    for s in slos
                ]
        if entry:
            self.sre[path] = entry

    def slo_errors(self, data: dict[str, Any], path: KeyPath, server: bool) -> None:
        """The ``slo`` tables' errors of a child whose other keys are broken."""
        raw = data.get("slo")
        if isinstance(raw, dict) or (isinstance(raw, list) and raw):
            self.slo_tables(raw, path, server)

    def slo_tables(self, raw: Any, path: KeyPath, server: bool) -> list[dict[str, Any]]:
        """The ``slo`` tables of one child, validated (``[]`` after any error)."""
        array = isinstance(raw, list)
        before = self.failed
        self.failed = False
        models: list[SloModel | None] = []
        for i, table in enumerate(raw if array else [raw]):
            try:  # one table at a time: a broken one does not hide its siblings' errors
                models.append(SloArray.model_validate({"slo": [table]}).slo[0])
            except ValidationError as e:
                models.append(None)
                for err in e.errors(include_url=False):
                    loc = ("slo", i, *err["loc"][2:]) if array else ("slo", *err["loc"][2:])
                    self._pydantic_error(SloArray, path, {**err, "loc": loc})
        names: dict[str, KeyPath] = {}
        out = []
        for i, m in enumerate(models):
            if m is None:
                continue
            where: KeyPath = (*path, "slo", i) if array else (*path, "slo")
            given = m.given()
            kind = m.sli or "up"
            if kind == "calls" and not server:
                self.error(
                    (*where, "sli"),
                    "sli = 'calls' needs a server child (calls are what a server answers); "
                    "use sli = 'up'",
                )
            takes = SLI_KEYS[kind]
            for key in (k for keys in SLI_KEYS.values() for k in keys):
                if key in given and key not in takes:
                    default = "" if m.sli else " (the default)"
                    fits = [k for k, keys in SLI_KEYS.items() if key in keys]
                    self.error(
                        (*where, key),
                        f"key {key!r} does not belong to sli = {kind!r}{default}: it is for "
                        f"sli = {fits[0]!r}"
                        + (f"; sli = {kind!r} takes {' and '.join(takes)}" if takes else ""),
                    )
            for key in takes:
                if key not in given:
                    self.error(
                        where,
                        f"missing key {key!r} (sli = {kind!r} needs {' and '.join(takes)})",
                    )
            name = m.name or kind
            name_at: KeyPath = (*where, "name") if m.name else where
            if name in names:
                first = format_path(names[name])
                how = "" if m.name else f" (the default name is the sli kind, {kind!r})"
                self.error(
                    name_at,
                    f"duplicate slo name {name!r} on this child (also {first}){how}: "
                    "give each slo its own name",
                )
            else:
                names[name] = where
            out.append(given)
        failed, self.failed = self.failed, before or self.failed
        return [] if failed else out

    def sre_settings(self, root: str) -> dict[str, dict[str, Any]]:
        """``{tree path: {"slo": {...}, "runbook": ..., "owner": ...}}``."""
        out: dict[str, dict[str, Any]] = {}
        for path, entry in self.sre.items():
            parts = [root]
            for n in range(3, len(path) + 1, 2):
                parts.append(str(self.ids.get(path[:n])))
            out["/".join(parts)] = entry
        return out

    def settings(self, doc: Document) -> dict[str, Any]:
        """How to operate the tree: ``node``, ``journal``, ``control``, ``metrics`` and
        ``chaos`` as the file gave them (a relative SQLite journal path is taken from
        the tree file's directory)."""
        out: dict[str, Any] = {}
        if doc.node is not None:
            out["node"] = doc.node
        for key in ("journal", "control", "metrics", "run", "cluster"):
            model = getattr(doc, key)
            if model is not None:
                out[key] = model.given()
        url = out.get("journal", {}).get("url")
        if (
            isinstance(url, str)
            and url.startswith("sqlite:///")
            and not url.startswith("sqlite:////")
        ):
            out["journal"]["url"] = "sqlite:///" + str(self.base_dir / url[len("sqlite:///") :])
        anchor = out.get("journal", {}).get("anchor")
        if isinstance(anchor, str) and not anchor.startswith("/"):
            out["journal"]["anchor"] = str(self.base_dir / anchor)
        sock = out.get("control", {}).get("socket")
        if isinstance(sock, str) and not sock.startswith("/"):
            out["control"]["socket"] = str(self.base_dir / sock)
        for key in ("creds", "nkey", "tls_ca", "tls_cert", "tls_key"):  # files, like cwd
            value = out.get("cluster", {}).get(key)
            if isinstance(value, str) and not value.startswith("/"):
                out["cluster"][key] = str(self.base_dir / value)
        if doc.chaos is not None:
            out["chaos"] = doc.chaos
        return out

    def check_flags(self, model: RootSupervisor | SupervisorChild, path: KeyPath, n: int) -> None:
        """The flag combinations, by the core's rules (each flag is already valid)."""
        try:
            SupervisorSpec([None] * n, **model.flags())
        except SupervisorFlagsError as e:
            self.core_error(path, e)

    def children(self, raw: object, path: KeyPath, auto_shutdown: str | None) -> list[_Built]:
        if not isinstance(raw, list):
            return []  # absent, or already reported by the parent's model
        built = [self.child(item, (*path, i), auto_shutdown) for i, item in enumerate(raw)]
        for i, b in enumerate(built):
            self.ids[(*path, i)] = b.id
        seen: dict[str, KeyPath] = {}
        for i, b in enumerate(built):
            if b.id is None:
                continue
            item = raw[i]
            where: KeyPath = (*path, i, "id") if "id" in item else (*path, i)
            if b.id in seen:
                first = format_path(seen[b.id])
                self.error(where, f"duplicate child id {b.id!r} (also used by {first})")
            else:
                seen[b.id] = (*path, i)
        return built

    def register_name(self, name: object, path: KeyPath) -> None:
        """A registered name is unique in the running system: a second process with the
        same name cannot start (``AlreadyStarted``), so the file is refused."""
        if not isinstance(name, str):
            return
        first = self.names.setdefault(name, path)
        if first != path:
            self.error(
                path,
                f"name {name!r} is already registered by {format_path(first[:-1])} (names "
                "are unique in a running tree: the second could never start)",
            )

    def child(self, data: object, path: KeyPath, auto_shutdown: str | None) -> _Built:
        if not isinstance(data, dict):
            self.error(path, f"a child is a table, got {data!r}")
            return _Built(None, None, None)
        self.register_name(data.get("name"), (*path, "name"))
        kinds = [k for k in _KIND_KEYS if k in data]
        sup_keys = [k for k in data if k in _SUPERVISOR_KEYS]
        if sup_keys:
            kinds.append("supervisor")
        if len(kinds) != 1:
            keys = [k for k in data if k in _KIND_KEYS or k in sup_keys]
            if keys:
                names = " and ".join(repr(k) for k in keys)
                msg = f"conflicting kinds: {names}; a child is exactly one of"
                where: KeyPath = (*path, keys[1])
            else:
                msg = "a child needs one of"
                where = path
                known = set().union(*(cls.model_fields for cls in CHILD_KINDS.values()))
                for key in data:
                    if key not in known:
                        self.error((*path, key), f"unknown key {key!r}{suggest(key, known)}")
            self.error(where, f"{msg} command, server, isolated, worker or children (a supervisor)")
            if "children" in data:
                self.children(data["children"], (*path, "children"), None)
            return _Built(None, None, None)
        kind = kinds[0]
        model = self.validate(CHILD_KINDS[kind], data, path)
        if model is not None:
            self.note_sre(model, path)
        else:
            self.slo_errors(data, path, kind == "server")
        if kind == "supervisor":
            auto = (model.auto_shutdown or "never") if isinstance(model, SupervisorChild) else None
            built = self.children(data.get("children"), (*path, "children"), auto)
            if isinstance(model, SupervisorChild):
                return self.scoped(model, self.supervisor(model, path, built, auto_shutdown))
            return _Built(None, _str(data.get("id")), None)
        checks_only = model is None
        if model is None:
            model = self.validate_rest(CHILD_KINDS[kind], data)
            if model is None:
                return _Built(None, _str(data.get("id")), None)
        before = self.failed
        self.failed = checks_only  # a failed child runs its checks but is not built
        try:
            if isinstance(model, CommandChild):
                result = self.command(model, path)
            elif isinstance(model, ServerChild):
                result = self.server(model, path)
            elif isinstance(model, IsolatedChild):
                result = self.isolated(model, path)
            elif isinstance(model, PluginChild):
                result = self.plugin(model, path)
            else:
                assert isinstance(model, WorkerChild)
                result = self.worker(model, path)
            if result.spec is not None:
                self.check_significant(result.spec, path, auto_shutdown)
            return self.scoped(model, result) if not self.failed else _Built(None, result.id, None)
        finally:
            self.failed = self.failed or before

    def scoped(self, model: _Child, built: _Built) -> _Built:
        """``scope = "cluster"``: the child becomes a cluster singleton (its lease is named
        ``TREE.ID``); trellis.cluster is imported only for such trees."""
        if model.scope != "cluster" or built.spec is None:
            return built
        from ..cluster._singleton import singleton

        key = f"{self.tree_name}.{built.spec.id}"
        node = built.node
        if node is not None:
            node = dataclasses.replace(node, detail=f"{node.detail} [scope=cluster]")
        return _Built(singleton(built.spec, key=key), built.id, node)

    def check_significant(self, spec: ChildSpec, path: KeyPath, auto_shutdown: str | None) -> None:
        """``auto_shutdown`` is the parent's (None when the parent's table is invalid)."""
        if spec.significant and auto_shutdown == "never":
            self.error(
                (*path, "significant"),
                f"child {spec.id!r} is significant but its supervisor's auto_shutdown is "
                "'never' (set auto_shutdown to 'any_significant' or 'all_significant')",
            )

    # -- common child options --------------------------------------------------------
    def options(self, model: _Child, path: KeyPath) -> dict[str, Any] | None:
        """restart/shutdown/significant/backoff as keyword arguments (None on error)."""
        opts = {
            k: v for k, v in model.given().items() if k in ("restart", "shutdown", "significant")
        }
        if model.backoff is not None:
            backoff = self.backoff(model.backoff, (*path, "backoff"))
            if backoff is None:
                return None
            opts["backoff"] = backoff
        return opts

    def backoff(self, model: BackoffModel, path: KeyPath) -> Backoff | None:
        try:
            return Backoff(**model.given())
        except ChildSpecError as e:
            field = e.field.split(".")[-1]
            self.error((*path, field), str(e))
            return None

    def make(
        self, path: KeyPath, build: Callable[[], ChildSpec], keys: dict[str, str] | None = None
    ) -> ChildSpec | None:
        """Call ``build``; a spec error becomes an issue at the key it names (``keys`` maps
        the core's field names to the file's)."""
        try:
            return build()
        except (ChildSpecError, SupervisorFlagsError) as e:
            self.core_error(path, e, keys)
        except (TypeError, ValueError) as e:
            self.error(path, str(e))
        return None

    # -- supervisors -----------------------------------------------------------------
    def supervisor(
        self, model: SupervisorChild, path: KeyPath, built: list[_Built], auto_shutdown: str | None
    ) -> _Built:
        cid = model.id or model.name
        if cid is None:
            self.error(path, "missing key 'id' (a supervisor child needs an id or a name)")
        self.check_flags(model, path, len(built))
        opts = self.options(model, path)
        specs = [b.spec for b in built]
        if cid is None or opts is None or None in specs:
            return _Built(None, cid, None)
        backoff = opts.pop("backoff", None)
        name: dict[str, Any] = {"name": model.name} if model.name else {}
        flags = model.flags()
        spec = self.make(
            path,
            lambda: Supervisor.child_spec(specs, id=cid, **opts, **name, **flags),
        )
        if spec is not None and backoff is not None:
            spec = dataclasses.replace(spec, backoff=backoff)
        if spec is None:
            return _Built(None, cid, None)
        self.check_significant(spec, path, auto_shutdown)
        detail = str(flags.get("strategy", "one_for_one"))
        nodes = tuple(b.node for b in built if b.node is not None)
        return _Built(spec, cid, Node(cid, "supervisor", detail, nodes))

    # -- servers and workers ---------------------------------------------------------
    def import_ref(self, ref: str, path: KeyPath) -> object | None:
        module_name, _, attr = ref.partition(":")
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            self.error(path, f"cannot import {ref!r}: no module named {e.name!r}")
            return None
        except Exception as e:
            self.error(path, f"cannot import {ref!r}: {type(e).__name__}: {e}")
            return None
        where = module_name
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                names = [n for n in dir(obj) if not n.startswith("_")]
                hint = suggest(part, names)
                self.error(
                    path, f"cannot import {ref!r}: {where!r} has no attribute {part!r}{hint}"
                )
                return None
            where = f"{where}.{part}"
        return obj

    def check_arguments(
        self,
        fn: Callable[..., Any],
        bind: Callable[[inspect.Signature], object],
        shown: str,
        model: ServerChild | IsolatedChild | WorkerChild,
        path: KeyPath,
    ) -> None:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            return
        try:
            bind(sig)
        except TypeError as e:
            key = "args" if model.args is not None else "kwargs" if model.kwargs else None
            kind = (
                "server"
                if isinstance(model, ServerChild)
                else "isolated"
                if isinstance(model, IsolatedChild)
                else "worker"
            )
            where: KeyPath = (*path, key) if key else (*path, kind)
            self.error(where, f"arguments do not match {shown}: {e}")

    def check_kwargs(self, model: ServerChild | IsolatedChild | WorkerChild, path: KeyPath) -> bool:
        clash = sorted(_SPEC_OPTIONS.intersection(model.kwargs or {}))
        for key in clash:
            self.error(
                (*path, "kwargs", key),
                f"{key!r} is a child option; set it on the child, not in kwargs",
            )
        return not clash

    def server(self, model: ServerChild, path: KeyPath) -> _Built:
        cls = self.import_ref(model.server, (*path, "server"))
        opts = self.options(model, path)
        if cls is None or not self.check_kwargs(model, path):
            return _Built(None, model.id, None)
        if not (inspect.isclass(cls) and issubclass(cls, Server)):
            self.error(
                (*path, "server"),
                f"{model.server!r} is not a trellis.Server subclass (got {_describe(cls)})",
            )
            return _Built(None, model.id, None)
        args, kwargs = list(model.args or ()), dict(model.kwargs or {})
        shown = f"{cls.__name__}.init{_plain_signature(cls.init, skip=1)}"
        self.check_arguments(cls.init, lambda s: s.bind(None, *args, **kwargs), shown, model, path)
        cid = model.id or cls.__name__
        if opts is None or self.failed:
            return _Built(None, cid, None)
        name: dict[str, Any] = {"name": model.name} if model.name else {}
        spec = self.make(path, lambda: cls.child_spec(*args, id=cid, **opts, **name, **kwargs))
        node = Node(cid, "server", model.server)
        return _Built(spec, cid, node if spec is not None else None)

    def isolated(self, model: IsolatedChild, path: KeyPath) -> _Built:
        """A server in an interpreter of its own: the class is imported here to check it
        (and its init's arguments); the new interpreter imports it again by name."""
        cls = self.import_ref(model.isolated, (*path, "isolated"))
        opts = self.options(model, path)
        if cls is None or not self.check_kwargs(model, path):
            return _Built(None, model.id, None)
        if not (inspect.isclass(cls) and issubclass(cls, Server)):
            self.error(
                (*path, "isolated"),
                f"{model.isolated!r} is not a trellis.Server subclass (got {_describe(cls)})",
            )
            return _Built(None, model.id, None)
        args, kwargs = list(model.args or ()), dict(model.kwargs or {})
        shown = f"{cls.__name__}.init{_plain_signature(cls.init, skip=1)}"
        self.check_arguments(cls.init, lambda s: s.bind(None, *args, **kwargs), shown, model, path)
        cwd = self.directory(model.cwd, (*path, "cwd")) if model.cwd is not None else None
        cid = model.id or cls.__name__
        if opts is None or self.failed:
            return _Built(None, cid, None)
        extra: dict[str, Any] = {
            key: getattr(model, key)
            for key in ("name", "python", "serializer", "heartbeat", "env", "standby")
            if getattr(model, key) is not None
        }
        if model.limits is not None:
            extra["limits"] = Limits(**model.limits.given())
        if cwd is not None:
            extra["cwd"] = str(cwd)
        from .._isolated import Isolated  # msgspec is imported only for trees that need it

        spec = self.make(
            path, lambda: Isolated(model.isolated, *args, id=cid, **opts, **extra, **kwargs)
        )
        node = Node(cid, "isolated", model.isolated)
        return _Built(spec, cid, node if spec is not None else None)

    def worker(self, model: WorkerChild, path: KeyPath) -> _Built:
        fn = self.import_ref(model.worker, (*path, "worker"))
        opts = self.options(model, path)
        if fn is None or not self.check_kwargs(model, path):
            return _Built(None, model.id, None)
        if not inspect.iscoroutinefunction(fn):
            self.error(
                (*path, "worker"),
                f"{model.worker!r} is not a coroutine function (use async def; "
                f"got {_describe(fn)})",
            )
            return _Built(None, model.id, None)
        args, kwargs = list(model.args or ()), dict(model.kwargs or {})
        name = getattr(fn, "__name__", model.worker)
        self.check_arguments(
            fn, lambda s: s.bind(*args, **kwargs), f"{name}{_plain_signature(fn)}", model, path
        )
        cid = model.id or name
        if opts is None or self.failed:
            return _Built(None, cid, None)
        extra: dict[str, Any] = {}
        if model.name:
            extra["name"] = model.name
        if model.trap_exits is not None:
            extra["trap_exits"] = model.trap_exits
        spec = self.make(path, lambda: worker(cid, fn, *args, **opts, **extra, **kwargs))
        node = Node(cid, "worker", model.worker)
        return _Built(spec, cid, node if spec is not None else None)

    # -- WASM plugins ----------------------------------------------------------------
    def plugin(self, model: PluginChild, path: KeyPath) -> _Built:
        source = self.base_dir / model.plugin  # relative to the tree file, like cwd
        cid = model.id or Path(model.plugin).stem
        opts = self.options(model, path)
        if opts is None or self.failed:
            return _Built(None, cid, None)
        kwargs = model.given("plugin", "id", "restart", "shutdown", "significant", "backoff",
                             *_SRE_KEYS)  # fmt: skip
        kwargs.update(opts)
        if model.allowed_paths:
            kwargs["allowed_paths"] = [str(self.base_dir / p) for p in model.allowed_paths]

        def build() -> ChildSpec:
            from .._plugins import Plugin  # imports wasmtime: only for trees with plugins

            spec: ChildSpec = Plugin(source, id=cid, **kwargs)
            return spec

        spec = self.make(path, build)
        node = Node(cid, "plugin", model.plugin)
        return _Built(spec, cid, node if spec is not None else None)

    # -- OS processes ----------------------------------------------------------------
    def command(self, model: CommandChild, path: KeyPath) -> _Built:
        argv = model.command
        words = shlex.split(argv) if isinstance(argv, str) else argv
        cid = model.id or (os.path.basename(words[0]) if words else "command")
        if isinstance(argv, str) and not model.shell:
            self.error(
                (*path, "command"),
                "command is a string only with shell = true; otherwise use a list, "
                f"such as {shlex.split(argv)!r}",
            )
        cwd = self.directory(model.cwd, (*path, "cwd")) if model.cwd is not None else None
        if isinstance(argv, list):
            # one rule for relative paths (command, cwd, logs.dir): the tree file's dir
            self.check_executable(argv[0], (*path, "command"), self.base_dir, model)
            if argv and "/" in argv[0] and not os.path.isabs(argv[0]):
                argv = [str(self.base_dir / argv[0]), *argv[1:]]
        health = model.health.command if model.health is not None else None
        probe = shlex.split(health) if isinstance(health, str) else health
        if probe and ("/" not in probe[0] or os.path.isabs(probe[0])):
            self.check_executable(probe[0], (*path, "health", "command"), cwd, model)
        if model.user is not None:
            self.check_user(model.user, (*path, "user"))
        logs_dir = None
        if model.logs is not None:
            logs_dir = self.base_dir / (model.logs.dir or "logs")
            key: KeyPath = ("logs", "dir") if model.logs.dir else ("logs",)
            self.check_logs_dir(logs_dir, (*path, *key))
        opts = self.options(model, path)
        if opts is None or self.failed:
            return _Built(None, cid, None)
        kwargs = model.given(
            "command", "id", "restart", "shutdown", "significant", "backoff", "ready", "health",
            *_SRE_KEYS,
        )  # fmt: skip
        kwargs.update(opts)
        if cwd is not None:
            kwargs["cwd"] = str(cwd)
        if isinstance(model.inherit_env, list):
            kwargs["inherit_env"] = tuple(model.inherit_env)
        if model.limits is not None:
            kwargs["limits"] = model.limits.given()
        if model.logs is not None:
            kwargs["logs"] = {**model.logs.given(), "dir": str(logs_dir)}
        if model.pidfile is not None:  # relative to the tree file, like cwd and logs.dir
            kwargs["pidfile"] = str(self.base_dir / model.pidfile)
        spec = self.make(path, lambda: _command(argv, cid, model, kwargs), {"argv": "command"})
        shown = argv if isinstance(argv, str) else shlex.join(argv)
        node = Node(cid, "command", shown)
        return _Built(spec, cid, node if spec is not None else None)

    def directory(self, value: str, path: KeyPath) -> Path | None:
        p = self.base_dir / value
        if not p.exists():
            self.error(path, f"cwd does not exist: {str(p)!r}")
        elif not p.is_dir():
            self.error(path, f"cwd is not a directory: {str(p)!r}")
        elif not os.access(p, os.X_OK):
            self.error(path, f"permission denied: cannot enter cwd {str(p)!r}")
        else:
            return p
        return None

    def check_executable(
        self, program: str, path: KeyPath, cwd: Path | None, model: CommandChild
    ) -> None:
        if "/" in program:
            p = Path(program)
            if not p.is_absolute():
                p = (cwd or Path.cwd()) / p
            if not p.exists():
                self.error(path, f"executable not found: {program!r}")
            elif p.is_dir():
                self.error(path, f"not an executable: {program!r} is a directory")
            elif not os.access(p, os.X_OK):
                self.error(path, f"permission denied: {program!r} is not executable")
            return
        search = (model.env or {}).get("PATH", os.environ.get("PATH", os.defpath))
        if shutil.which(program, path=search) is not None:
            return
        for d in search.split(os.pathsep):
            candidate = Path(d or ".") / program
            if candidate.is_file():
                self.error(path, f"permission denied: {str(candidate)!r} is not executable")
                return
        self.error(path, f"executable not found: {program!r} (not on PATH)")

    def check_user(self, user: str | int, path: KeyPath) -> None:
        try:
            entry = pwd.getpwnam(user) if isinstance(user, str) else pwd.getpwuid(user)
        except KeyError:
            self.error(path, f"unknown user {user!r}")
            return
        euid = os.geteuid()
        if entry.pw_uid != euid and euid != 0:
            self.error(
                path,
                f"permission denied: running as user {user!r} needs root "
                f"(trellis runs as uid {euid})",
            )

    def check_logs_dir(self, p: Path, path: KeyPath) -> None:
        if p.exists():
            if not p.is_dir():
                self.error(path, f"logs dir is not a directory: {str(p)!r}")
            elif not os.access(p, os.W_OK | os.X_OK):
                self.error(path, f"permission denied: cannot write to logs dir {str(p)!r}")
            else:
                from .._children._output import unsafe_dir_reason

                why = unsafe_dir_reason(p.stat(), str(p))
                if why is not None:
                    self.error(path, why)
            return
        parent = p.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            self.error(path, f"cannot create logs dir {str(p)!r}: {str(parent)!r} is a file")
        elif not os.access(parent, os.W_OK | os.X_OK):
            self.error(
                path, f"cannot create logs dir {str(p)!r}: permission denied in {str(parent)!r}"
            )


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _model_at(cls: type[_Model], loc: KeyPath) -> type[_Model] | None:
    """The model that validates the table at ``loc`` inside ``cls``."""
    model: type[_Model] = cls
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        sub = _find_model(field.annotation)
        if sub is None:
            return None
        model = sub
    return model


def _find_model(annotation: object) -> type[_Model] | None:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation  # type: ignore[return-value]
    for arg in typing.get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _plain_signature(fn: Callable[..., Any], skip: int = 0) -> str:
    """``(label, crash=False)``: the parameters without annotations."""
    try:
        params = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return "(...)"
    plain = [p.replace(annotation=inspect.Parameter.empty) for p in params]
    return str(inspect.Signature(plain))


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _describe(obj: object) -> str:
    if inspect.isclass(obj):
        return f"class {obj.__module__}.{obj.__qualname__}"
    return f"{type(obj).__name__} {obj!r}" if not callable(obj) else type(obj).__name__


def _command(
    argv: list[str] | str, cid: str, model: CommandChild, kwargs: dict[str, Any]
) -> ChildSpec:
    """``trellis.Command(argv, ...)`` with readiness, health, limits and logs built."""
    if model.ready is not None:
        kwargs["ready"] = _ready(model.ready)
    if model.health is not None:
        kwargs["health"] = _health(model.health)
    if "limits" in kwargs:
        kwargs["limits"] = Limits(**kwargs["limits"])
    if "logs" in kwargs:
        kwargs["logs"] = Logs(**kwargs["logs"])
    return Command(argv, id=cid, **kwargs)


def _ready(model: ReadyModel) -> Ready:
    timeout = {"timeout": model.timeout} if model.timeout is not None else {}
    if model.notify:
        return Ready.notify(**timeout)
    if model.tcp is not None:
        host, port = model.tcp
        return Ready.tcp(port, host=host, **timeout)
    if model.http is not None:
        return Ready.http(model.http, **timeout)
    if model.log is not None:
        return Ready.log(model.log, **timeout)
    return Ready.started()


def _health(model: HealthModel) -> Health:
    opts = model.given("command", "tcp", "http")
    if model.command is not None:
        argv = shlex.split(model.command) if isinstance(model.command, str) else model.command
        return Health.command(argv, **opts)
    if model.tcp is not None:
        host, port = model.tcp
        return Health.tcp(port, host=host, **opts)
    assert model.http is not None
    return Health.http(model.http, **opts)

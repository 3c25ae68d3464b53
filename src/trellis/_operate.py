"""What runs beside a tree under ``trellis run``: the journal, metrics and the control API,
chosen from the tree file's settings and the command line."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._core import _telemetry
from ._core._exceptions import TrellisError
from ._run import Extension
from ._tree import Tracker

__all__ = [
    "Operations",
    "OperationsError",
    "TreeLock",
    "TreeLocked",
    "lock_holder",
    "lock_tree",
    "operations",
    "parse_token_roles",
    "parse_tokens",
]

DEFAULT_TOKEN_ENV = "TRELLIS_CONTROL_TOKEN"


def new_run_id() -> str:
    """A new run id: UTC start time and 8 random hex digits, ``20261207T184512Z-3f2a9c01``
    (sorts by start time, unique across runs and nodes)."""
    import secrets
    import time

    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


class OperationsError(TrellisError, ValueError):
    """A journal, control or metrics setting that cannot be used (names which one)."""


class TreeLocked(OperationsError):
    """Another ``trellis run`` holds the tree's lock (its control socket or journal)."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


@dataclass
class Operations:
    """The resolved settings: where the journal goes, where the control API listens."""

    name: str
    node: str
    journal_url: str | None = None
    journal_options: dict[str, Any] = field(default_factory=dict)
    socket: str | None = None
    tcp: tuple[str, int] | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    #: each token's role by name: ``read`` or ``operator`` (see :func:`parse_token_roles`)
    roles: dict[str, str] = field(default_factory=dict)
    control_options: dict[str, Any] = field(default_factory=dict)
    metrics: bool = True
    tracker: Tracker = field(default_factory=Tracker)
    reloader: Any = None
    #: this run's id: journal records carry it (``run.started`` ... ``run.stopped``)
    run_id: str = field(default_factory=lambda: new_run_id())
    #: the tree file's ``slo``/``runbook``/``owner`` by tree path (the dashboard's budgets)
    slo: dict[str, Any] = field(default_factory=dict)
    """The tree file's reloader (``trellis run`` sets it): SIGHUP and POST /v1/reload."""
    #: ``[cluster]`` / ``--cluster``: a ``trellis.cluster.ClusterSettings``, or None
    cluster: Any = None

    def extensions(self) -> list[Extension]:
        """The extensions, in start order: tracker, metrics, journal, control API."""
        exts: list[Any] = [_TrackerExtension(self.tracker)]
        metrics = None
        if self.metrics:
            from .metrics import Metrics

            metrics = Metrics(node=self.node, tracker=self.tracker)
            exts.append(metrics)
        if self.journal_url is not None:
            from .journal import Journal

            journal = Journal(
                self.journal_url,
                node=self.node,
                open_in_background=True,
                run_id=self.run_id,
                **self.journal_options,
            )
            exts.append(journal)
        if self.cluster is not None:  # after the journal: its lease events are journaled
            from .cluster import Cluster

            exts.append(Cluster(self.cluster, run_id=self.run_id))
        if self.reloader is not None:
            exts.append(self.reloader)
        if self.socket is not None or self.tcp is not None:
            tcp = f"{self.tcp[0]}:{self.tcp[1]}" if self.tcp is not None else None
            kwargs = {
                "socket": self.socket,
                "tcp": tcp,
                "tokens": self.tokens or None,
                "roles": self.roles or None,
                "metrics": metrics,
                "tracker": self.tracker,
                "node": self.node,
                **self.control_options,
            }
            control = _ControlOnceStarted(kwargs, self.reloader)
            control.slo_source = (self.journal_url, self.name, self.slo)
            exts.append(control)
        return exts


class _TrackerExtension:
    """Attaches the per-child history tracker for the tree's whole life."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    async def start(self) -> None:
        self.tracker.attach()

    async def tree_started(self, root: Any, request_stop: Any) -> None:
        pass

    async def stop(self) -> None:
        self.tracker.detach()


class _ControlOnceStarted:
    """The control API, imported and bound once the tree runs: the tree does not wait
    for starlette's import (a socket in use still ends the run with a clear error)."""

    def __init__(self, kwargs: dict[str, Any], reloader: Any = None) -> None:
        self.kwargs = kwargs
        self.reloader = reloader
        self.server: Any = None
        # events of the start with their wall time, for history replay
        self.early: list[tuple[float, dict[str, Any]]] = []
        self.hid: object | None = None
        self.slo_source: Any = None  # (journal url, tree name, slo settings)

    async def start(self) -> None:
        self.hid = _telemetry.attach(self._early)

    def _early(self, event: dict[str, Any]) -> None:
        self.early.append((time.time(), event))  # when it happened, not when replayed

    async def tree_started(self, root: Any, request_stop: Any) -> None:
        # starlette and uvicorn take ~0.2 s to import: in a thread, so the tree's loop
        # keeps serving meanwhile (the events of that time are still collected in early)
        ControlServer = await asyncio.to_thread(_import_control_server)
        self._detach()
        server = ControlServer(**self.kwargs)
        server.reloader = self.reloader
        server.slo_source = self.slo_source  # GET /v1/slo (the dashboard)
        for wall, event in self.early:  # its history rings keep what fits (output apart)
            server._remember(event, wall)
        self.early.clear()
        await server.start()
        self.server = server
        await server.tree_started(root, request_stop)

    def _detach(self) -> None:
        if self.hid is not None:
            _telemetry.detach(self.hid)
            self.hid = None

    async def stop(self) -> None:
        self._detach()
        if self.server is not None:
            await self.server.stop()


def _import_control_server() -> Any:
    from .control import ControlServer

    return ControlServer


def parse_tokens(value: str, source: str) -> dict[str, str]:
    """Bearer tokens from ``token`` or ``name:token[:role],name2:token2[:role]``, by name
    (the roles: :func:`parse_token_roles`).

    Example::

        assert parse_tokens("ops:s3cret", "env") == {"ops": "s3cret"}
    """
    return parse_token_roles(value, source)[0]


#: The roles a token can have; a token without one is an ``operator``.
TOKEN_ROLES = ("read", "operator")


def parse_token_roles(value: str, source: str) -> tuple[dict[str, str], dict[str, str]]:
    """Bearer tokens and their roles from ``token`` or ``name:token[:role],...``.

    ``role`` is ``read`` (status, tree, events, logs, metrics: no actions) or
    ``operator`` (everything; the default, as before roles existed). A bare ``token``
    is named ``default`` and is an operator.

    Example::

        tokens, roles = parse_token_roles("ops:s3cret...:operator,ci:t0ken...:read", "env")
        assert roles == {"ops": "operator", "ci": "read"}
    """
    tokens: dict[str, str] = {}
    roles: dict[str, str] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, token = part.partition(":")
        role = "operator"
        if not sep:
            name, token = "default", part
        else:
            head, colon, tail = token.rpartition(":")
            if colon and tail in TOKEN_ROLES:
                token, role = head, tail
            elif colon and tail.isalpha() and len(tail) < 16:
                raise OperationsError(
                    f"{source}: the token named {name!r} has role {tail!r}; "
                    f"roles are {' and '.join(TOKEN_ROLES)}"
                )
        if not name or len(token) < 16:
            raise OperationsError(
                f"{source}: each token needs at least 16 characters "
                "(give 'token' or 'name:token[:read|:operator]')"
            )
        tokens[name] = token
        roles[name] = role
    if not tokens:
        raise OperationsError(f"{source}: no token given")
    return tokens, roles


def operations(
    name: str,
    settings: dict[str, Any],
    *,
    journal: str | bool | None = None,
    control: bool | None = None,
    socket_path: str | bool | None = None,
    tcp: tuple[str, int] | None = None,
    metrics: bool | None = None,
    node: str | None = None,
    environ: dict[str, str] | None = None,
    cluster: str | None = None,
) -> Operations:
    """Resolve the tree file's ``settings`` and command-line overrides (``None`` = not
    given; ``False`` = off) into :class:`Operations`. ``control=False`` turns the whole
    control API off (the file's ``tcp`` too); ``socket_path=False`` only its socket.

    Example::

        ops = operations("shop", load("tree.toml").settings, journal=False)
        trellis.run(spec, extensions=ops.extensions())
    """
    env = os.environ if environ is None else environ
    ops = Operations(name=name, node=node or settings.get("node") or socket.gethostname())

    jset = dict(settings.get("journal", {}))
    enabled = jset.pop("enabled", True)
    url = jset.pop("url", None)
    key_env = jset.pop("key_env", None)
    if journal is False or (journal is None and not enabled):
        ops.journal_url = None
    else:
        if isinstance(journal, str):
            ops.journal_url = journal
        elif url is not None:
            ops.journal_url = url
        else:
            from .journal._paths import default_journal_url

            ops.journal_url = default_journal_url(name)
        if key_env is not None:
            key = env.get(key_env)
            if not key:
                raise OperationsError(f"journal.key_env: environment variable {key_env} is not set")
            jset["key"] = key
        ops.journal_options = jset
        if ops.journal_url.startswith("sqlite:///"):
            from .journal._errors import JournalError
            from .journal._paths import journal_dir, private_dir

            db = Path(ops.journal_url[len("sqlite:///") :])
            try:  # created 0700; the default state directory is checked too
                private_dir(db.parent, check_existing=db.parent == journal_dir())
            except JournalError as e:
                raise OperationsError(str(e)) from None

    cset = settings.get("control", {})
    enabled = control is not False and (control is True or cset.get("enabled", True))
    if control is False or socket_path is False:
        ops.socket = None
    elif isinstance(socket_path, str):
        ops.socket = socket_path
    elif enabled:
        sock = cset.get("socket", True)
        if sock is True:
            from .control import default_socket_path

            ops.socket = str(default_socket_path(name))
        elif isinstance(sock, str):
            ops.socket = sock
    for key in ("idle_timeout", "max_connections", "read_uids"):
        if cset.get(key) is not None:
            ops.control_options[key] = cset[key]
    if control is not False:  # a --tcp given explicitly serves even if the file says off
        ops.tcp = tcp if tcp is not None else cset.get("tcp") if enabled else None
    if ops.tcp is not None:
        token_env = cset.get("token_env", DEFAULT_TOKEN_ENV)
        value = env.get(token_env)
        if not value:
            raise OperationsError(
                f"control.tcp: the control API listens on TCP only with a bearer token; "
                f"set {token_env} (a token of 16+ characters, or name:token,...)"
            )
        ops.tokens, ops.roles = parse_token_roles(value, token_env)

    mset = settings.get("metrics", {})
    ops.metrics = metrics if metrics is not None else bool(mset.get("enabled", True))
    ops.slo = dict(settings.get("slo", {}))
    if cluster is not None or settings.get("cluster"):
        from .cluster._settings import ClusterError, ClusterSettings

        table = dict(settings.get("cluster", {}))
        table.setdefault("node", ops.node)
        try:
            ops.cluster = ClusterSettings.from_settings(table, url=cluster, node=node)
        except ClusterError as e:
            raise OperationsError(str(e)) from None
    return ops


# ---------------------------------------------------------------------------
# The tree's lock: one `trellis run` per control socket and per SQLite journal
# ---------------------------------------------------------------------------


class TreeLock:
    """The lock files a running tree holds (``flock``, released when the process ends,
    even by SIGKILL). :func:`lock_tree` takes them."""

    def __init__(self, fds: list[int], paths: list[Path]) -> None:
        self.fds = fds
        self.paths = paths

    def release(self) -> None:
        """Unlock (closing the files); the lock files themselves stay."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def lock_paths(ops: Operations) -> list[tuple[Path, str]]:
    """The lock files that guard ``ops``'s resources: ``<socket>.lock`` beside the
    control socket and ``<db>.lock`` beside a SQLite journal, with what each guards."""
    out: list[tuple[Path, str]] = []
    if ops.socket is not None:
        out.append((Path(ops.socket + ".lock"), f"control socket {ops.socket}"))
    url = ops.journal_url
    if url is not None and url.startswith("sqlite:///"):
        db = url[len("sqlite:///") :].partition("?")[0]
        out.append((Path(db + ".lock"), f"journal {db}"))
    return out


def lock_tree(ops: Operations) -> TreeLock:
    """Take the tree's locks before anything is started or journaled; raises
    :class:`TreeLocked` naming the running tree (and its pid) if another process holds
    one, or :class:`OperationsError` if a lock file cannot be created.

    Example::

        lock = lock_tree(ops)   # held until the process exits (or lock.release())
    """
    fds: list[int] = []
    paths: list[Path] = []
    try:
        for path, what in lock_paths(ops):
            if what.startswith("control socket"):
                _socket_dir(path.parent)  # closed (0700), ours: else say whose it is
            fd = _open_lock(path)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                if holder is not None and not _ours(holder[0]):
                    raise OperationsError(
                        f"the lock file {path} is locked by a process that is not a "
                        f"`trellis run` of uid {os.getuid()} (it names pid {holder[0]}); "
                        f"find it with `fuser {path}`, or give this run another --socket "
                        "and --journal"
                    ) from None
                pid = f"pid {holder[0]}" if holder is not None else "pid unknown"
                name = holder[1] if holder is not None and holder[1] else ops.name
                raise TreeLocked(
                    f"tree {name!r} is already running ({pid}): it holds the lock on its "
                    f"{what} ({path}). Stop it first (trellis stop), or give this run "
                    "another --socket and --journal",
                    holder[0] if holder is not None else None,
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {ops.name}\n".encode(), 0)
            paths.append(path)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return TreeLock(fds, paths)


def lock_holder(path: Path) -> int | None:
    """The pid of the live ``trellis run`` holding the lock file ``path`` (-1 if it has
    not written its pid yet), else None (no such file, or nobody holds it: a socket
    beside it is stale)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            return holder[0] if holder is not None else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _socket_dir(directory: Path) -> None:
    """Create the control socket's directory (mode 0700) if missing and check it as the
    control API will (the default one ours and 0700; another not writable by others
    unless sticky), so a squatted directory is named before its lock file is opened."""
    from .control._errors import ControlError
    from .control._paths import make_socket_dir, socket_dir

    try:
        make_socket_dir(directory, private=directory == socket_dir())
    except ControlError as e:
        raise OperationsError(str(e)) from None


def _not_ours(path: Path, st: os.stat_result) -> OperationsError | None:
    """Why the lock file ``path`` (stat ``st``) must not be used, if it must not: another
    uid's file (in a shared directory such as /tmp anyone may plant it and hold its
    lock), a link, or not a regular file."""
    me = os.getuid()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        return OperationsError(
            f"the lock file {path} is not a regular file (a symbolic link?): someone may "
            "have planted it; remove it, or choose a socket path in a directory of yours"
        )
    if st.st_uid != me:
        return OperationsError(
            f"the lock file {path} is owned by uid {st.st_uid}, not by uid {me} who runs "
            "this tree: another user created it (anyone can, in a shared directory such "
            f"as /tmp) and may hold its lock; remove it (as uid {st.st_uid} or root), or "
            "choose a socket path in a directory of yours"
        )
    if st.st_nlink != 1:
        return OperationsError(
            f"the lock file {path} has {st.st_nlink} links: someone may have linked it "
            "elsewhere; remove it"
        )
    return None


def _open_lock(path: Path) -> int:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OperationsError(f"cannot open the lock file {path}: {e.strerror or e}") from None
    else:
        why = _not_ours(path, st)
        if why is not None:
            raise why
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise OperationsError(f"cannot open the lock file {path}: {e.strerror or e}") from None
    why = _not_ours(path, os.fstat(fd))  # what was opened: it may have been swapped
    if why is not None:
        os.close(fd)
        raise why
    return fd


def _ours(pid: int) -> bool:
    """Whether ``pid`` is a live process of our uid or root's (the lock file is ours
    and 0600: only they can hold it; a pid written there by anyone else is a lie)."""
    if pid <= 0:
        return False
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc: cannot tell
    return uid in (os.getuid(), 0)


def _read_holder(fd: int) -> tuple[int, str] | None:
    """``(pid, tree name)`` as the holder wrote them, or None."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return None
    pid, _, name = text.strip().partition(" ")
    return (int(pid), name) if pid.isdigit() else None

"""What runs beside a tree under ``trellis run``: the journal, metrics and the control API,
chosen from the tree file's settings and the command line."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._core import _telemetry
from ._core._exceptions import TrellisError
from ._run import Extension
from ._tree import Tracker

__all__ = ["Operations", "OperationsError", "operations", "parse_tokens"]

DEFAULT_TOKEN_ENV = "TRELLIS_CONTROL_TOKEN"


class OperationsError(TrellisError, ValueError):
    """A journal, control or metrics setting that cannot be used (names which one)."""


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
    metrics: bool = True
    tracker: Tracker = field(default_factory=Tracker)
    reloader: Any = None
    """The tree file's reloader (``trellis run`` sets it): SIGHUP and POST /v1/reload."""

    def extensions(self) -> list[Extension]:
        """The extensions, in start order: tracker, metrics, journal, control API."""
        exts: list[Any] = [_TrackerExtension(self.tracker)]
        metrics = None
        if self.metrics:
            from .metrics import Metrics

            metrics = Metrics(node=self.node)
            exts.append(metrics)
        if self.journal_url is not None:
            from .journal import Journal

            journal = Journal(
                self.journal_url, node=self.node, open_in_background=True, **self.journal_options
            )
            exts.append(journal)
        if self.reloader is not None:
            exts.append(self.reloader)
        if self.socket is not None or self.tcp is not None:
            tcp = f"{self.tcp[0]}:{self.tcp[1]}" if self.tcp is not None else None
            kwargs = {
                "socket": self.socket,
                "tcp": tcp,
                "tokens": self.tokens or None,
                "metrics": metrics,
                "tracker": self.tracker,
                "node": self.node,
            }
            exts.append(_ControlOnceStarted(kwargs, self.reloader))
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
        self.early: list[dict[str, Any]] = []  # events of the start, for history replay
        self.hid: object | None = None

    async def start(self) -> None:
        self.hid = _telemetry.attach(self.early.append)

    async def tree_started(self, root: Any, request_stop: Any) -> None:
        from .control import ControlServer

        self._detach()
        server = ControlServer(**self.kwargs)
        server.reloader = self.reloader
        for event in self.early[-(server._history.maxlen or 1) :]:
            server._remember(event)
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


def parse_tokens(value: str, source: str) -> dict[str, str]:
    """Bearer tokens from ``token`` or ``name:token,name2:token2``.

    Example::

        assert parse_tokens("ops:s3cret", "env") == {"ops": "s3cret"}
    """
    tokens: dict[str, str] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, token = part.partition(":")
        if not sep:
            name, token = "default", part
        if not name or len(token) < 16:
            raise OperationsError(
                f"{source}: each token needs at least 16 characters (give 'token' or 'name:token')"
            )
        tokens[name] = token
    if not tokens:
        raise OperationsError(f"{source}: no token given")
    return tokens


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
            db = Path(ops.journal_url[len("sqlite:///") :])
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OperationsError(f"journal: cannot create {db.parent}: {e}") from None

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
        ops.tokens = parse_tokens(value, token_env)

    mset = settings.get("metrics", {})
    ops.metrics = metrics if metrics is not None else bool(mset.get("enabled", True))
    return ops

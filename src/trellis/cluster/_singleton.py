"""Cluster singletons: ``singleton(spec)`` (``scope = "cluster"`` in a tree file) runs
``spec`` on exactly one live node, under a lease, and hands the child its fencing token.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import logging
import os
from typing import Any

from .._children._command import _start_command
from .._childspec import ChildSpec, ShutdownMode
from .._core._exceptions import TrellisError
from .._core._process import Pid, _signal, kill_and_wait
from .._core._reasons import IGNORE, KILL, NORMAL, SHUTDOWN, Exit
from .._server import Server, Stop
from ._node import Lease, current, kill_os_process
from ._settings import ClusterError

__all__ = ["FENCING_TOKEN_ENV", "LeaseLost", "fencing_token", "singleton"]

FENCING_TOKEN_ENV = "TRELLIS_FENCING_TOKEN"
_log = logging.getLogger("trellis.cluster")

#: (lease, token) of the singleton the current process runs under
_held: contextvars.ContextVar[tuple[Lease, int] | None] = contextvars.ContextVar(
    "trellis_fencing", default=None
)

_ACQUIRED = "trellis.cluster.acquired"
_LOST = "trellis.cluster.lost"


class LeaseLost(TrellisError):
    """This node no longer holds the lease of the singleton asking for its token (its
    renew deadline passed): stop acting, the child is being killed."""


def fencing_token() -> int | None:
    """The fencing token of the cluster singleton the calling code runs under.

    In-process children of a ``scope = "cluster"`` child get it from here; it is the
    KV revision that acquired the lease, so it strictly increases across owners. Pass
    it with every write to a shared resource and have the resource refuse a token
    lower than one it has seen (``UPDATE ... WHERE token <= $token``). Raises
    :class:`LeaseLost` if this node's lease passed its renew deadline (checked on the
    monotonic clock at each call). In an OS child (a Python program started by a
    cluster-scoped command) it reads ``$TRELLIS_FENCING_TOKEN``. None elsewhere.

    Example::

        token = trellis.cluster.fencing_token()
        await db.execute("UPDATE jobs SET owner_token=$1 WHERE owner_token <= $1", token)
    """
    held = _held.get()
    if held is None:
        env = os.environ.get(FENCING_TOKEN_ENV)
        return int(env) if env and env.isdigit() else None
    lease, token = held
    if not lease.valid(token):
        raise LeaseLost(f"the lease {lease.key!r} (token {token}) is no longer held here")
    return token


def singleton(spec: ChildSpec, *, key: str | None = None) -> ChildSpec:
    """Wrap ``spec`` so its child runs on exactly one live node of the cluster.

    The returned spec (same id, restart, type, significant, backoff) starts a keeper
    that contends for the lease ``key`` (default: the child id) and starts ``spec``'s
    child only while this node holds it: an OS child gets ``$TRELLIS_FENCING_TOKEN``,
    in-process code :func:`fencing_token`. When the lease is lost (renewals failed for
    0.6 TTL, or this process was frozen) the child is killed at once; when the keeper is
    stopped it stops the child within its ``shutdown`` and releases the lease, so the
    next node starts it at once. A child that exits ends the keeper with the same
    reason (its supervisor then restarts it as usual, and the lease is contended again).
    Needs a cluster (``trellis run --cluster URL`` or a :class:`~trellis.cluster.Cluster`
    extension); without one the keeper fails to start with :class:`ClusterError`.

    Example::

        spec = trellis.cluster.singleton(trellis.Command(["./leader"], id="leader"))
    """
    spec = ChildSpec.coerce(spec)
    shutdown = spec.shutdown
    if shutdown is ShutdownMode.BRUTAL_KILL:
        keeper_shutdown: Any = 5.0
    elif shutdown is ShutdownMode.INFINITY:
        keeper_shutdown = ShutdownMode.INFINITY
    else:
        keeper_shutdown = float(shutdown) + 5.0  # the child's own budget, then the release
    return ChildSpec(
        id=spec.id,
        start=_Keeper.start_link,
        args=(spec, key if key is not None else str(spec.id)),
        restart=spec.restart,
        shutdown=keeper_shutdown,
        type=spec.type,
        significant=spec.significant,
        modules=spec.modules,
        backoff=spec.backoff,
    )


def with_token(spec: ChildSpec, token: int) -> ChildSpec:
    """``spec`` with ``TRELLIS_FENCING_TOKEN`` in the environment of every command in it
    (a command child, or the commands of a supervisor's children)."""
    if spec.start is _start_command and spec.args:
        cfg = spec.args[0]
        env = {**cfg.env, FENCING_TOKEN_ENV: str(token)}
        return dataclasses.replace(spec, args=(dataclasses.replace(cfg, env=env), *spec.args[1:]))
    args = tuple(
        [with_token(c, token) if isinstance(c, ChildSpec) else c for c in a]
        if isinstance(a, list | tuple) and a and all(isinstance(c, ChildSpec) for c in a)
        else a
        for a in spec.args
    )
    return dataclasses.replace(spec, args=args) if args != spec.args else spec


class _Keeper(Server):
    """Holds (or waits for) a singleton's lease and runs its child while held."""

    trap_exits = True

    async def init(self, spec: ChildSpec, key: str) -> None:
        cluster = current()
        if cluster is None:
            raise ClusterError(
                f"child {spec.id!r} has scope 'cluster' but this node is in no cluster: "
                "give [cluster] url in the tree file or trellis run --cluster URL"
            )
        self.spec = spec
        self.inner: Pid | None = None
        self.killed: set[Pid] = set()
        me = self.pid

        def acquired(token: int) -> None:
            me.send((_ACQUIRED, token))

        def lost(why: str) -> None:
            inner = self.inner
            if inner is not None and not inner._dead:
                self.killed.add(inner)
                kill_os_process(inner)
                _signal(inner, None, KILL, False)
            self.inner = None
            me.send((_LOST, why))

        def kill_now() -> None:  # watchdog thread: only signals OS processes
            inner = self.inner
            if inner is not None:
                kill_os_process(inner)

        self.lease = cluster.lease(key, acquired, lost, kill_now)
        self.lease.owner_alive = lambda: not me._dead

    async def handle_info(self, msg: Any) -> Any:
        if type(msg) is tuple and len(msg) == 2 and msg[0] == _ACQUIRED:
            return await self._start_child(msg[1])
        if type(msg) is tuple and len(msg) == 2 and msg[0] == _LOST:
            return None  # the child was killed where the loss was noticed
        if isinstance(msg, Exit):
            if msg.pid in self.killed:
                self.killed.discard(msg.pid)
                return None
            if msg.pid is self.inner:
                self.inner = None
                return Stop(msg.reason)
            return Stop(msg.reason)
        return None

    async def _start_child(self, token: int) -> Any:
        if self.inner is not None or not self.lease.valid(token):
            return None
        spec = with_token(self.spec, token)
        ctx = _held.set((self.lease, token))
        try:
            started = spec.start(*spec.args, **spec.kwargs)
            if inspect.isawaitable(started):
                started = await started
        except Exception as e:
            _log.error("singleton %r could not start under token %s: %r", spec.id, token, e)
            return Stop(e)
        finally:
            _held.reset(ctx)
        if isinstance(started, tuple):
            started = started[0]
        if started is IGNORE or not isinstance(started, Pid):
            return Stop(NORMAL)
        if not self.lease.valid(token):  # lost while it started
            self.killed.add(started)
            kill_os_process(started)
            _signal(started, None, KILL, False)
            return None
        self.inner = started
        return None

    async def terminate(self, reason: Any) -> None:
        inner, self.inner = self.inner, None
        if inner is not None and not inner._dead:
            mode = self.spec.shutdown
            if mode is ShutdownMode.BRUTAL_KILL:
                await kill_and_wait(inner)
            else:
                _signal(inner, self.pid, SHUTDOWN, False)
                try:
                    await inner.join(None if mode is ShutdownMode.INFINITY else float(mode))
                except TimeoutError:
                    await kill_and_wait(inner)
        await self.lease.release()

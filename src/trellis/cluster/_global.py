"""Global names: ``trellis.Global("name")`` registers a server cluster-wide and is a
``call``/``cast`` target from any node.

``Global(name)`` is ``Via("trellis.global", name)``: the node's global registry (a
process the cluster extension starts) answers for it. A name registered here resolves
to the local pid (no NATS on the way); a name registered on another node resolves to a
*relay*, a local process standing for the remote server: a ``call`` to it crosses over
NATS request/reply to the owner node, which calls the real server there. When the
remote server dies mid-call the relay exits with :class:`RemoteExit`, so the caller
gets ``Exited`` (and a monitor on it a ``Down``); when the owner node leaves the
cluster the relay exits the same way. A name nobody holds gives ``NoProc`` at once.

The registry lives in the KV bucket ``trellis_<cluster>_names`` (key: the name in hex,
value: owner node, run, pid); an entry counts only while its owner node heartbeats.
Two nodes registering one name at once: the KV create decides, and the later server
is stopped with reason ``AlreadyRegistered``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from .._core._exceptions import AlreadyRegistered, CallTimeout, Exited, NoProc, TrellisError
from .._core._process import Pid, Via, exit, resolve, spawn
from .._core._reasons import KILL
from .._server import _CAST, Caller, call, cast
from ._wire import decode, encode

if TYPE_CHECKING:
    from ._node import Cluster

__all__ = ["REGISTRY_NAME", "Global", "GlobalNames", "RemoteExit"]

REGISTRY_NAME = "trellis.global"
_log = logging.getLogger("trellis.cluster")
_EXIT = "trellis.cluster.relay_exit"


def Global(name: str) -> Via:
    """A cluster-wide name: ``name=trellis.Global("ledger")`` when starting a server on
    one node, ``await trellis.call(trellis.Global("ledger"), req)`` from any node.

    Example::

        await Ledger.start_link(name=trellis.Global("ledger"))
        total = await trellis.call(trellis.Global("ledger"), "total", timeout=2.0)
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a global name is a non-empty str, got {name!r}")
    return Via(REGISTRY_NAME, name)


class RemoteExit(TrellisError):
    """The exit reason of a relay: the remote server it stood for ended (``reason`` is
    the remote exit reason as text), or its node left the cluster."""

    def __init__(self, name: str, node: str, reason: str) -> None:
        super().__init__(f"global {name!r} on node {node!r}: {reason}")
        self.name = name
        self.node = node
        self.reason = reason


class GlobalRegistryPid(Pid):
    """The node's global registry process (resolves ``Global`` names)."""

    __slots__ = ("names",)

    names: GlobalNames | None

    def _via_whereis(self, key: Any) -> Pid | None:
        names = self.names
        return names.whereis(key) if names is not None else None

    def _via_register(self, key: Any, pid: Pid) -> None:
        names = self.names
        if names is None:
            raise NoProc(REGISTRY_NAME)
        names.register(key, pid)


class GlobalNames:
    """The global names of one node: its own, the cached remote ones, and relays."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.kv: Any = None
        self.local: dict[str, Pid] = {}
        self.revisions: dict[str, int] = {}  # our KV revision of each local name
        self.remote: dict[str, tuple[str, int]] = {}  # name -> (owner node, revision)
        self.relays: dict[str, tuple[Pid, str, int]] = {}
        self.registry: GlobalRegistryPid | None = None
        self._sub: Any = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self.subject = f"trellis.{cluster.settings.name}.rpc.{_hex(cluster.settings.node)}"

    # -- lifecycle ------------------------------------------------------------------------
    def start_registry(self) -> None:
        from .._core._process import _new_pid, _start_task, register

        pid = _new_pid(False, GlobalRegistryPid, None)
        assert isinstance(pid, GlobalRegistryPid)
        pid.names = self

        async def idle() -> None:
            await asyncio.Event().wait()

        _start_task(pid, idle())
        register(REGISTRY_NAME, pid)
        self.registry = pid

    async def connected(self) -> None:
        """NATS is up: open the bucket, serve calls, publish our names."""
        if self.kv is None:
            self.kv = await self.cluster._bucket("names", ttl=None)
        if self._sub is None:
            self._sub = await self.cluster.nc.subscribe(self.subject, cb=self._on_request)
        for name, pid in list(self.local.items()):
            self._spawn(self._publish(name, pid))

    async def stop(self) -> None:
        for name in list(self.local):
            await self._unpublish(name)
        for task in list(self._tasks):
            task.cancel()
        for relay, _, _ in list(self.relays.values()):
            exit(relay, KILL)
        self.relays.clear()
        if self.registry is not None:
            exit(self.registry, KILL)
            with contextlib.suppress(BaseException):
                await self.registry.join(2.0)
            self.registry = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- registering ----------------------------------------------------------------------
    def register(self, name: str, pid: Pid) -> None:
        held = self.local.get(name)
        if held is not None and not held._dead:
            raise AlreadyRegistered(name)
        self.local[name] = pid
        pid.name = Via(REGISTRY_NAME, name)
        waiter = asyncio.ensure_future(pid.join())
        waiter.add_done_callback(lambda _f: self._spawn(self._ended(name, pid)))
        if self.kv is not None:
            self._spawn(self._publish(name, pid))

    async def _publish(self, name: str, pid: Pid) -> None:
        import nats.js.errors as jse

        s = self.cluster.settings
        value = json.dumps({"name": name, "node": s.node, "run": self.cluster.run_id}).encode()
        key = _hex(name)
        try:
            rev = await self.kv.create(key, value)
        except jse.KeyWrongLastSequenceError:
            try:
                entry = await self.kv.get(key)
                owner = json.loads(entry.value or b"{}").get("node")
            except jse.KeyNotFoundError:
                owner, entry = None, None
            if entry is not None and owner not in (s.node, None) and self.cluster.alive(owner):
                _log.error("global name %r is held by node %r: stopping %r", name, owner, pid)
                if self.local.get(name) is pid:
                    del self.local[name]
                exit(pid, AlreadyRegistered(f"global name {name!r} is held by node {owner!r}"))
                return
            rev = await self.kv.update(key, value, last=entry.revision if entry else 0)
        if self.local.get(name) is pid and not pid._dead:
            self.revisions[name] = int(rev)
        else:
            with contextlib.suppress(Exception):
                await self.kv.delete(key, last=int(rev))

    async def _ended(self, name: str, pid: Pid) -> None:
        if self.local.get(name) is pid:
            del self.local[name]
            await self._unpublish(name)

    async def _unpublish(self, name: str) -> None:
        rev = self.revisions.pop(name, None)
        if rev is not None and self.kv is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.kv.delete(_hex(name), last=rev), 2.0)

    # -- resolving ------------------------------------------------------------------------
    def whereis(self, name: Any) -> Pid | None:
        pid = self.local.get(name)
        if pid is not None and not pid._dead:
            return pid
        held = self.remote.get(name)
        if held is None or not self.cluster.alive(held[0]):
            return None
        relay = self.relays.get(name)
        if relay is not None and not relay[0]._dead and relay[1:] == held:
            return relay[0]
        pid = spawn(_relay, self, name, held[0])
        self.relays[name] = (pid, *held)
        return pid

    async def refresh(self) -> None:
        """Read the names bucket (every quarter TTL): who holds which name."""
        import nats.js.errors as jse

        if self.kv is None:
            return
        from ._node import kv_keys

        keys = await kv_keys(self.cluster.js, self.cluster.settings.bucket("names"))
        seen: dict[str, tuple[str, int]] = {}
        for key in keys:
            try:
                entry = await self.kv.get(key)
                value = json.loads(entry.value or b"{}")
            except (jse.KeyNotFoundError, ValueError):
                continue
            node = value.get("node")
            name = value.get("name")
            if not isinstance(node, str) or not isinstance(name, str) or _hex(name) != key:
                continue
            if node != self.cluster.settings.node:
                seen[name] = (node, int(entry.revision or 0))
        self.remote = seen
        for name, (relay, node, rev) in list(self.relays.items()):
            if seen.get(name) != (node, rev) or not self.cluster.alive(node):
                why = "node left the cluster" if not self.cluster.alive(node) else "unregistered"
                relay.send((_EXIT, RemoteExit(name, node, why)))
                del self.relays[name]

    # -- the owner's side -----------------------------------------------------------------
    async def _on_request(self, msg: Any) -> None:
        self._spawn(self._serve(msg))

    async def _serve(self, msg: Any) -> None:
        try:
            kind, name, request = decode(msg.data)
        except Exception as e:  # not msgpack, an unregistered type, the wrong shape
            _log.warning("refused a malformed global request: %s", e)
            if msg.reply:
                await msg.respond(encode(("error", f"malformed request: {type(e).__name__}")))
            return
        pid = self.local.get(name) if isinstance(name, str) else None
        if kind == "cast":
            if pid is not None:
                cast(pid, request)
            return
        if kind != "call" or not msg.reply:
            return
        if pid is None or pid._dead:
            out: tuple[Any, ...] = ("noproc",)
        else:
            try:
                out = ("ok", await call(pid, request, timeout=self.cluster.call_timeout))
            except NoProc:
                out = ("noproc",)
            except Exited as e:
                out = ("exited", _reason_text(e.reason))
            except CallTimeout:
                out = ("timeout",)
        try:
            data = encode(out)
        except Exception as e:
            data = encode(("error", f"the reply cannot be sent: {e}"))
        with contextlib.suppress(Exception):
            await msg.respond(data)


async def _relay(names: GlobalNames, name: str, node: str) -> None:
    """A local stand-in for the server registered as ``name`` on ``node``."""
    from .._core._process import receive
    from .._core._process import self as me

    subject = f"trellis.{names.cluster.settings.name}.rpc.{_hex(node)}"
    pending: set[Caller] = set()
    reason: Any = RemoteExit(name, node, "relay stopped")

    async def one(caller: Caller) -> None:
        nc = names.cluster.nc
        try:
            data = encode(("call", name, caller.request))
        except Exception as e:
            _fail(caller, e)
            return
        import nats.errors

        timeout = names.cluster.call_timeout
        try:
            if nc is None:
                raise ConnectionError("not connected to NATS")
            reply = await nc.request(subject, data, timeout=timeout)
            out = decode(reply.data)
        except nats.errors.NoRespondersError:  # the owner node is gone
            _fail(caller, NoProc(Global(name)))
            return
        except (nats.errors.TimeoutError, TimeoutError):
            _fail(caller, CallTimeout(Global(name), caller.request, timeout))
            return
        except Exception as e:
            _fail(caller, Exited(RemoteExit(name, node, f"no answer: {e!r}"), Global(name)))
            return
        finally:
            pending.discard(caller)
        if out[0] == "ok":
            caller.reply(out[1])
        elif out[0] == "noproc":
            _fail(caller, NoProc(Global(name)))
        elif out[0] == "exited":
            why = RemoteExit(name, node, str(out[1]))
            _fail(caller, Exited(why, Global(name)))
            me().send((_EXIT, why))
        elif out[0] == "timeout":
            _fail(caller, CallTimeout(Global(name), caller.request, names.cluster.call_timeout))
        else:
            _fail(caller, RemoteExit(name, node, str(out[-1])))

    tasks: set[asyncio.Future[Any]] = set()
    try:
        while True:
            msg = await receive()
            if type(msg) is Caller:
                pending.add(msg)
                task: asyncio.Future[Any] = asyncio.ensure_future(one(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif type(msg) is tuple and len(msg) == 2 and msg[0] is _CAST:
                nc = names.cluster.nc
                with contextlib.suppress(Exception):
                    if nc is not None:
                        await nc.publish(subject, encode(("cast", name, msg[1])))
            elif type(msg) is tuple and len(msg) == 2 and msg[0] == _EXIT:
                reason = msg[1]
                exit(me(), reason)
    finally:
        for task in tasks:
            task.cancel()
        for caller in pending:
            _fail(caller, Exited(reason, Global(name)))


def _fail(caller: Caller, exc: BaseException) -> None:
    fut = caller._fut
    if not fut.done():
        fut.set_exception(exc)


def _reason_text(reason: Any) -> str:
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return str(getattr(reason, "value", reason))


def _hex(text: str) -> str:
    return text.encode().hex()


def registry_pid() -> Pid | None:
    """The node's global registry (None outside a cluster)."""
    return resolve(REGISTRY_NAME)

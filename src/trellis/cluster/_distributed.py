"""``DistributedSupervisor``: dynamic children spread over the cluster's live nodes by
rendezvous hashing on the child id (Horde's job, with fenced leases).

Every node that runs ``DistributedSupervisor.child_spec("workers", kinds)`` takes part
in ``"workers"``. ``await trellis.cluster.start_child("workers", "feed", "BTC", "BTC")``
(from any node) stores the child (kind, id, arguments as msgpack) in the KV bucket
``trellis_<cluster>_dsup``; each participating node computes, for every stored id, the
live participant with the highest ``sha256(node, id)`` score, and runs the ids it wins.
Each child runs as a :func:`~trellis.cluster.singleton` keyed by the supervisor and the
id, so no id ever runs twice: when a node joins, only the ids whose winner changed move
(the old owner stops its child and releases the lease, the new one starts at once);
when a node dies, its ids start elsewhere once their leases lapse (TTL). Children
receive their fencing token as singletons do.

``kinds`` maps a kind name to a function ``(id, *args) -> ChildSpec``; it must be the
same on every node (only the kind name and the arguments cross the network).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from .._childspec import ChildSpec
from .._core._exceptions import AlreadyPresent, NotFound
from .._server import Server
from .._supervisor import DynamicSupervisor
from ._node import current, kv_keys
from ._settings import ClusterError
from ._singleton import singleton
from ._wire import decode, encode

__all__ = ["DistributedSupervisor", "owner_of", "start_child", "terminate_child", "which_children"]

_log = logging.getLogger("trellis.cluster")
_TICK = "trellis.cluster.dsup_tick"


def owner_of(child_id: str, nodes: list[str]) -> str | None:
    """The rendezvous (highest random weight) owner of ``child_id`` among ``nodes``."""
    best, best_score = None, -1
    for node in nodes:
        score = int.from_bytes(hashlib.sha256(f"{node}\0{child_id}".encode()).digest()[:8], "big")
        if score > best_score or (score == best_score and best is not None and node > best):
            best, best_score = node, score
    return best


def _key(name: str, child_id: str) -> str:
    return f"{name.encode().hex()}.{child_id.encode().hex()}"


def _lease_key(name: str, child_id: str) -> str:
    return f"dsup.{name.encode().hex()}.{child_id.encode().hex()}"


def _cluster() -> Any:
    cluster = current()
    if cluster is None:
        raise ClusterError("DistributedSupervisor needs a cluster (trellis run --cluster URL)")
    return cluster


async def _bucket(cluster: Any) -> Any:
    for _ in range(100):
        if cluster.js is not None:
            return await cluster._bucket("dsup", ttl=None)
        await asyncio.sleep(0.05)
    raise ClusterError("not connected to NATS")


async def start_child(name: str, kind: str, child_id: str, *args: Any) -> None:
    """Add a child to the distributed supervisor ``name`` (from any node of the cluster):
    it will run on one live node that takes part in ``name``. Raises ``AlreadyPresent``
    if ``child_id`` is there already."""
    import nats.js.errors as jse

    kv = await _bucket(_cluster())
    try:
        await kv.create(_key(name, child_id), encode((kind, child_id, list(args))))
    except jse.KeyWrongLastSequenceError:
        raise AlreadyPresent(child_id) from None


async def terminate_child(name: str, child_id: str) -> None:
    """Remove a child: the node running it stops it. Raises ``NotFound``."""
    import nats.js.errors as jse

    kv = await _bucket(_cluster())
    try:
        await kv.get(_key(name, child_id))
    except (jse.KeyNotFoundError, jse.KeyDeletedError):
        raise NotFound(child_id) from None
    await kv.delete(_key(name, child_id))


async def which_children(name: str) -> dict[str, str | None]:
    """``{child id: node running it (None: not running now)}`` of ``name``."""
    import json

    import nats.js.errors as jse

    cluster = _cluster()
    kv = await _bucket(cluster)
    out: dict[str, str | None] = {}
    prefix = name.encode().hex() + "."
    for key in await kv_keys(cluster.js, cluster.settings.bucket("dsup")):
        if not key.startswith(prefix):
            continue
        try:
            await kv.get(key)
        except (jse.KeyNotFoundError, jse.KeyDeletedError):
            continue
        child_id = bytes.fromhex(key[len(prefix) :]).decode()
        node = None
        leases = cluster.leases_kv
        if leases is not None:
            try:
                entry = await leases.get(_lease_key(name, child_id))
                node = json.loads(entry.value or b"{}").get("node")
            except (jse.KeyNotFoundError, jse.KeyDeletedError):
                pass
        out[child_id] = node
    return out


class DistributedSupervisor(Server):
    """This node's part of a distributed supervisor (see the module docs).

    Example::

        spec = DistributedSupervisor.child_spec("feeds", {"feed": lambda id, sym: ...})
    """

    trap_exits = True

    @classmethod
    def child_spec(  # type: ignore[override]
        cls,
        name: str,
        kinds: dict[str, Callable[..., ChildSpec]],
        *,
        id: Any = None,
        restart: str = "permanent",
    ) -> Any:
        return ChildSpec(
            id=id if id is not None else f"dsup:{name}",
            start=cls.start_link,
            args=(name, kinds),
            restart=restart,
            shutdown="infinity",
            type="supervisor",
        )

    async def init(self, name: str, kinds: dict[str, Callable[..., ChildSpec]]) -> None:
        self.cluster = _cluster()
        self.name = name
        self.kinds = kinds
        self.sup = await DynamicSupervisor.start_link(intensity=100, period=5.0)
        self.running: dict[str, Any] = {}  # id -> keeper pid in self.sup
        self.cluster.dsups.add(name)
        self.pid.send(_TICK)

    async def handle_info(self, msg: Any) -> Any:
        if msg == _TICK:
            try:
                await self._reconcile()
            except Exception as e:
                _log.debug("distributed supervisor %s: %r", self.name, e)
            loop = asyncio.get_running_loop()
            pid = self.pid
            loop.call_later(self.cluster.settings.lease_ttl / 4, lambda: pid.send(_TICK))
            return None
        from .._core._reasons import Exit
        from .._server import Stop

        if isinstance(msg, Exit):
            return Stop(msg.reason)
        return None

    async def _reconcile(self) -> None:
        import nats.js.errors as jse

        cluster = self.cluster
        if cluster.js is None:
            return
        kv = await cluster._bucket("dsup", ttl=None)
        prefix = self.name.encode().hex() + "."
        wanted: dict[str, tuple[str, list[Any]]] = {}
        for key in await kv_keys(cluster.js, cluster.settings.bucket("dsup")):
            if not key.startswith(prefix):
                continue
            try:
                entry = await kv.get(key)
                kind, child_id, args = decode(entry.value or b"")
            except (jse.KeyNotFoundError, jse.KeyDeletedError):
                continue
            except Exception as e:
                _log.warning("distributed supervisor %s: bad entry %s: %s", self.name, key, e)
                continue
            wanted[str(child_id)] = (str(kind), list(args))
        nodes = cluster.participants(self.name)
        me = cluster.settings.node
        for child_id, pid in list(self.running.items()):
            if child_id not in wanted or owner_of(child_id, nodes) != me or pid._dead:
                del self.running[child_id]
                if not pid._dead:  # graceful: stop the child, release the lease
                    await self.sup.terminate_child(pid)
        for child_id, (kind, args) in wanted.items():
            if child_id in self.running or owner_of(child_id, nodes) != me:
                continue
            factory = self.kinds.get(kind)
            if factory is None:
                _log.error("distributed supervisor %s: unknown kind %r", self.name, kind)
                continue
            spec = singleton(factory(child_id, *args), key=_lease_key(self.name, child_id))
            spec = ChildSpec(
                id=child_id,
                start=spec.start,
                args=spec.args,
                restart="transient",
                shutdown=spec.shutdown,
                type=spec.type,
            )
            self.running[child_id] = await self.sup.start_child(spec)

    async def terminate(self, reason: Any) -> None:
        self.cluster.dsups.discard(self.name)
        from .._server import stop

        try:
            await stop(self.sup)
        except Exception:
            pass

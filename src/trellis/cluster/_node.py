"""The cluster extension: a connection to NATS, membership heartbeats, and the leases
behind ``scope = "cluster"`` singletons.

It runs beside the tree (an :class:`~trellis._run.Extension`) and never holds the tree
up: it connects in the background, and a node that cannot reach NATS keeps its
node-scope children running untouched (only the singletons it holds stop, because
their leases can no longer be renewed).

Leases (NATS 2.9 KV has per-bucket ``max_age`` only, no per-key TTL, so expiry is
judged by the contenders on their own monotonic clocks, as Kubernetes leader election
does):

* A holder renews with ``update(key, last=revision)`` every ``lease_ttl / 4``. If no
  renewal it sent in the last ``0.6 * lease_ttl`` succeeded, it kills its child at
  once (a watchdog thread checks the monotonic clock every 20 ms, so a process that was
  frozen kills an OS child as soon as it runs again, before its event loop does
  anything else).
* A contender reads the key every ``lease_ttl / 10``. When it has seen the same
  revision for a whole ``lease_ttl`` (measured from when *it* first saw that revision,
  which is after the holder sent it), it takes the lease with ``update(key,
  last=revision)``: a compare-and-set, so of several contenders one wins, and a holder's
  late renewal fails. A released lease (deleted key) is taken at once with ``create``.
* The fencing token is the KV revision of the write that acquired the lease: a stream
  sequence, so it strictly increases across owners.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .._core import _telemetry
from ._settings import ClusterSettings

__all__ = ["Cluster", "Lease", "current"]

_log = logging.getLogger("trellis.cluster")

_current: Cluster | None = None


def current() -> Cluster | None:
    """The cluster this process has joined (``trellis run --cluster``), or None."""
    return _current


def _now() -> float:
    return time.monotonic()


class Lease:
    """One singleton's lease on this node: contended until held, renewed while held.

    ``on_acquired(token)`` and ``on_lost(why)`` are called in the event loop;
    ``kill_now()`` may be called from the watchdog thread when the renew deadline
    passed (it must only signal OS processes)."""

    def __init__(
        self,
        cluster: Cluster,
        key: str,
        on_acquired: Callable[[int], None],
        on_lost: Callable[[str], None],
        kill_now: Callable[[], None],
    ) -> None:
        self.cluster = cluster
        self.key = key
        self.on_acquired = on_acquired
        self.on_lost = on_lost
        self.kill_now = kill_now
        self.token: int | None = None  # while held
        self.revision = 0  # our last write while held
        self.renewed_at = 0.0  # monotonic send time of the last successful renewal
        self.expired = False  # set by the watchdog thread
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        #: whether the process the lease is for still lives (its keeper sets it)
        self.owner_alive: Callable[[], bool] = lambda: True

    # -- read by fencing_token() and the watchdog ------------------------------------------
    def valid(self, token: int | None = None) -> bool:
        """Whether this node still holds the lease (with ``token``) by its own clock."""
        held = self.token
        if held is None or self.expired or (token is not None and token != held):
            return False
        return _now() - self.renewed_at <= self.cluster.settings.renew_deadline

    # -- the loop ---------------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        s = self.cluster.settings
        seen_rev = -1
        seen_at = _now()
        while not self.closed:
            if not self.owner_alive():  # its keeper was killed: stop renewing, let it expire
                self.closed = True
                if self.token is not None:
                    self.cluster._emit("abandoned", self.key, token=self.token)
                self.token = None
                self.cluster._leases.discard(self)
                return
            try:
                if self.token is not None:
                    await self._renew()
                    continue
                kv = self.cluster.leases_kv
                if kv is None:
                    seen_rev, seen_at = -1, _now()  # nothing seen: start over when back
                    await asyncio.sleep(s.poll_interval)
                    continue
                entry = await self._get(kv)
                if entry is None:  # free (never taken, or released)
                    await self._take(kv, None)
                elif entry.revision != seen_rev:
                    seen_rev, seen_at = entry.revision, _now()
                elif _now() - seen_at >= s.lease_ttl:
                    await self._take(kv, seen_rev)
                if self.token is None:
                    await asyncio.sleep(s.poll_interval)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection trouble: look again later
                _log.debug("lease %s: %r", self.key, e)
                if self.token is None:
                    seen_rev, seen_at = -1, _now()
                await asyncio.sleep(s.poll_interval)

    async def _get(self, kv: Any) -> Any:
        import nats.js.errors as jse

        try:
            return await asyncio.wait_for(kv.get(self.key), self.cluster.settings.lease_ttl)
        except (jse.KeyNotFoundError, jse.KeyDeletedError):
            return None

    def _value(self) -> bytes:
        c = self.cluster
        return json.dumps({"node": c.settings.node, "pid": os.getpid(), "run": c.run_id}).encode()

    async def _take(self, kv: Any, last: int | None) -> None:
        import nats.js.errors as jse

        sent = _now()
        try:
            if last is None:
                rev = await asyncio.wait_for(
                    kv.create(self.key, self._value()), self.cluster.settings.lease_ttl
                )
            else:
                rev = await asyncio.wait_for(
                    kv.update(self.key, self._value(), last=last), self.cluster.settings.lease_ttl
                )
        except (jse.KeyWrongLastSequenceError, jse.APIError):
            return  # someone else was first (or renewed)
        # Confirm with a second compare-and-set on our own revision before running
        # anything: NATS 2.9 in a clustered (replicated) stream was seen to accept two
        # compare-and-sets against the same last revision when they raced; the loser's
        # confirmation fails (the last revision is the winner's), so it never starts.
        confirm_sent = _now()
        try:
            confirmed = await asyncio.wait_for(
                kv.update(self.key, self._value(), last=int(rev)), self.cluster.settings.lease_ttl
            )
        except (jse.KeyWrongLastSequenceError, jse.APIError):
            self.cluster._emit("contended", self.key, token=int(rev), previous=last)
            return
        if self.closed:
            with contextlib.suppress(Exception):
                await kv.delete(self.key, last=int(confirmed))
            return
        if confirm_sent - sent > self.cluster.settings.renew_deadline:
            return  # too slow: it will lapse; contend again
        self.token = int(rev)
        self.revision = int(confirmed)
        self.renewed_at = sent
        self.expired = False
        self.cluster._emit("acquired", self.key, token=self.token, previous=last)
        self.on_acquired(self.token)

    async def _renew(self) -> None:
        import nats.js.errors as jse

        s = self.cluster.settings
        await asyncio.sleep(s.renew_interval)
        if self.token is None or self.closed:
            return
        if not self.valid():
            self._lose("renew deadline passed")
            return
        kv = self.cluster.leases_kv
        sent = _now()
        left = self.renewed_at + s.renew_deadline - sent
        try:
            if kv is None:
                raise ConnectionError("not connected to NATS")
            rev = await asyncio.wait_for(
                kv.update(self.key, self._value(), last=self.revision), max(0.01, left)
            )
        except jse.KeyWrongLastSequenceError:
            self._lose("the lease was taken over (this node was too slow to renew)")
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.cluster._emit("renew_failed", self.key, token=self.token, error=repr(e))
            if not self.valid():
                self._lose(f"renew deadline passed ({e!r})")
            return
        if self.token is None:
            return
        if not self.valid():  # the reply came too late: we already count it as lost
            self._lose("renew deadline passed (a late renewal)")
            return
        self.revision = int(rev)
        self.renewed_at = sent

    def _lose(self, why: str) -> None:
        token, self.token = self.token, None
        if token is None:
            return
        self.cluster._emit("lost", self.key, token=token, why=why)
        self.on_lost(why)

    def expire_from_thread(self) -> None:
        """Watchdog thread: the renew deadline passed; kill OS children at once."""
        if self.token is None or self.expired:
            return
        self.expired = True
        try:
            self.kill_now()
        except Exception:
            pass
        loop = self.cluster.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._lose, "renew deadline passed (frozen or cut off)")

    async def release(self) -> None:
        """Give the lease back (the child is stopped): the next owner starts at once."""
        self.closed = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        token, self.token = self.token, None
        kv = self.cluster.leases_kv
        if token is not None:
            handed = False
            if kv is not None and not self.expired:
                try:
                    await asyncio.wait_for(
                        kv.delete(self.key, last=self.revision), self.cluster.settings.lease_ttl
                    )
                    handed = True
                except Exception as e:
                    _log.warning("lease %s: could not release: %r", self.key, e)
            self.cluster._emit("released", self.key, token=token, handed_off=handed)
        self.cluster._leases.discard(self)


class Cluster:
    """The cluster extension (see the module docs). ``trellis run --cluster URL`` adds
    it; in code: ``trellis.run(root, extensions=[Cluster(ClusterSettings(url, node))])``."""

    def __init__(self, settings: ClusterSettings, *, run_id: str | None = None) -> None:
        self.settings = settings
        self.run_id = run_id or uuid.uuid4().hex  # tells two processes of one name apart
        self.nc: Any = None
        self.js: Any = None
        self.nodes_kv: Any = None
        self.leases_kv: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connected = False
        self.started_at = time.time()
        self._tasks: list[asyncio.Task[Any]] = []
        self._leases: set[Lease] = set()
        self._peers: dict[str, dict[str, Any]] = {}  # node -> last heartbeat + seen_at
        self._same_name_seen: set[tuple[Any, Any]] = set()  # (run, pid) under our name
        self._beat_revision: int | None = None  # of this node's last heartbeat
        self._guard: threading.Thread | None = None
        self._guard_stop = threading.Event()
        #: how long the owner of a global name waits for its server's reply
        self.call_timeout = 60.0
        self._pubsub_sub: Any = None
        #: the distributed supervisors this node takes part in (in its heartbeat)
        self.dsups: set[str] = set()
        from ._events import EventShipper
        from ._global import GlobalNames

        self.names = GlobalNames(self)
        self.events = EventShipper(self)

    # -- the Extension protocol ----------------------------------------------------------
    async def start(self) -> None:
        global _current
        self.loop = asyncio.get_running_loop()
        _current = self
        self.names.start_registry()
        self.events.attach()
        self._tasks.append(asyncio.ensure_future(self._connect_loop()))
        self._guard = threading.Thread(target=self._watch, name="trellis-lease-guard", daemon=True)
        self._guard.start()

    async def tree_started(self, root: Any, request_stop: Any) -> None:
        pass

    async def stop(self) -> None:
        global _current
        for lease in list(self._leases):
            await lease.release()
        await self.names.stop()
        await self.events.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # nats-py can turn a cancellation into another error, which the loop then
            # logs and goes on from: cancel again until the task has ended
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._guard_stop.set()
        if self.nodes_kv is not None and self.connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nodes_kv.delete(self.settings.node), 1.0)
        if self.nc is not None:
            await _close(self.nc)
        self._emit("left", None)
        if _current is self:
            _current = None

    # -- leases ------------------------------------------------------------------------------
    def lease(
        self,
        key: str,
        on_acquired: Callable[[int], None],
        on_lost: Callable[[str], None],
        kill_now: Callable[[], None],
    ) -> Lease:
        lease = Lease(self, _kv_key(key), on_acquired, on_lost, kill_now)
        self._leases.add(lease)
        lease.start()
        return lease

    def _watch(self) -> None:
        """The lease guard thread: kills what a lease past its deadline protects."""
        deadline = self.settings.renew_deadline
        while not self._guard_stop.wait(0.02):
            now = _now()
            for lease in list(self._leases):
                held = lease.token is not None and not lease.expired
                if held and now - lease.renewed_at > deadline:
                    lease.expire_from_thread()

    # -- connection and membership -------------------------------------------------------
    async def _connect_loop(self) -> None:
        import nats

        s = self.settings
        while True:
            try:
                self.nc = await nats.connect(
                    **s.connect_options(),
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                    error_cb=self._error,
                )
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                _log.warning("cluster: cannot reach NATS at %s (%r); retrying", s.url, e)
                await asyncio.sleep(min(1.0, s.lease_ttl))
        self.js = self.nc.jetstream(timeout=s.lease_ttl)
        while True:
            try:
                self.nodes_kv = await self._bucket("nodes", ttl=max(5 * s.lease_ttl, 3.0))
                self.leases_kv = await self._bucket("leases", ttl=None)
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                _log.warning("cluster: cannot open the KV buckets (%r); retrying", e)
                await asyncio.sleep(min(1.0, s.lease_ttl))
        while True:
            try:
                await self.names.connected()
                if self._pubsub_sub is None:
                    self._pubsub_sub = await self.nc.subscribe(
                        f"trellis.{s.name}.pubsub.>", cb=self._on_pubsub
                    )
                if self.events.task is None:
                    await self.events.ensure_stream(self.js)
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                _log.warning("cluster: cannot subscribe (%r); retrying", e)
                await asyncio.sleep(min(1.0, s.lease_ttl))
        self.connected = True
        self._emit("joined", None, url=_redact(s.url))
        self._tasks.append(asyncio.ensure_future(self._heartbeat_loop()))
        self._tasks.append(asyncio.ensure_future(self._names_loop()))

    async def _names_loop(self) -> None:
        while True:
            try:
                await self.names.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                _log.debug("cluster: reading the names failed: %r", e)
            await asyncio.sleep(max(0.05, self.settings.lease_ttl / 4))

    async def _on_pubsub(self, msg: Any) -> None:
        from . import pubsub

        await pubsub.on_message(self, msg)

    def participants(self, dsup: str) -> list[str]:
        """The live nodes that take part in the distributed supervisor ``dsup``."""
        out = [self.settings.node] if dsup in self.dsups else []
        for node, peer in self._peers.items():
            theirs = dsup in peer["value"].get("dsups", [])
            if node != self.settings.node and theirs and self.alive(node):
                out.append(node)
        return sorted(out)

    def alive(self, node: str) -> bool:
        """Whether ``node`` heartbeats (as this node last saw it); this node always."""
        if node == self.settings.node:
            return True
        peer = self._peers.get(node)
        return peer is not None and _now() - peer["seen_at"] <= 2 * self.settings.lease_ttl

    def _publish_soon(self, subject: str, data: bytes) -> None:
        """Publish without waiting (nats-py buffers it; dropped if the connection is gone)."""
        nc = self.nc
        if nc is None or nc.is_closed:
            return
        task = asyncio.ensure_future(nc.publish(subject, data))
        task.add_done_callback(_ignore_result)

    async def _bucket(self, what: str, ttl: float | None) -> Any:
        import nats.js.errors as jse

        name = self.settings.bucket(what)
        try:
            return await self.js.key_value(name)
        except jse.BucketNotFoundError:
            pass
        try:
            return await self.js.create_key_value(
                bucket=name, history=1, ttl=ttl, replicas=self.settings.replicas
            )
        except jse.APIError:  # created by another node meanwhile
            return await self.js.key_value(name)

    async def _disconnected(self) -> None:
        self.connected = False
        self._emit("disconnected", None)

    async def _reconnected(self) -> None:
        self.connected = True
        self._emit("reconnected", None)

    async def _error(self, e: Exception) -> None:
        _log.debug("cluster: NATS error %r", e)

    def heartbeat_value(self) -> dict[str, Any]:
        return {
            "node": self.settings.node,
            "pid": os.getpid(),
            "run": self.run_id,
            "started": self.started_at,
            "at": time.time(),
            "lease_ttl": self.settings.lease_ttl,
            "runs": sorted(
                display_key(lease.key) for lease in self._leases if lease.token is not None
            ),
            "dsups": sorted(self.dsups),
        }

    async def _heartbeat_loop(self) -> None:
        s = self.settings
        while True:
            try:
                await asyncio.wait_for(self._beat(), s.lease_ttl)
                await self._look_at_peers()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                _log.debug("cluster: heartbeat failed: %r", e)
            await asyncio.sleep(s.lease_ttl / 3)

    async def _look_at_peers(self) -> None:
        import nats.js.errors as jse

        keys = await kv_keys(self.js, self.settings.bucket("nodes"))
        now = _now()
        for key in keys:
            try:
                entry = await self.nodes_kv.get(key)
            except (jse.KeyNotFoundError, jse.KeyDeletedError):
                self._peers.pop(key, None)
                continue
            old = self._peers.get(key)
            if old is None or old["revision"] != entry.revision:
                try:
                    value = json.loads(entry.value)
                except ValueError:
                    continue
                if old is None:
                    self._emit("node_seen", None, peer=key)
                self._peers[key] = {"revision": entry.revision, "seen_at": now, "value": value}
        for key in list(self._peers):
            if key not in keys:
                self._peers.pop(key)

    async def _beat(self) -> None:
        """Write this node's heartbeat on top of its previous one (compare-and-set): if
        another process wrote in between under the same name, say so (``_same_name``)."""
        import nats.js.errors as jse

        value = json.dumps(self.heartbeat_value()).encode()
        if self._beat_revision is not None:
            try:
                self._beat_revision = await self.nodes_kv.update(
                    self.settings.node, value, last=self._beat_revision
                )
                return
            except jse.KeyWrongLastSequenceError:
                try:
                    entry = await self.nodes_kv.get(self.settings.node)
                    self._same_name(json.loads(entry.value or b"{}"))
                except (jse.KeyNotFoundError, jse.KeyDeletedError, ValueError):
                    pass
        self._beat_revision = await self.nodes_kv.put(self.settings.node, value)

    def _same_name(self, value: Any) -> None:
        """Another process heartbeats under this node's name: say so, once per process."""
        if not isinstance(value, dict):
            return
        other = (value.get("run"), value.get("pid"))
        if other == (self.run_id, os.getpid()) or other in self._same_name_seen:
            return
        self._same_name_seen.add(other)
        _log.error(
            "cluster: another process (pid %s, run %s) heartbeats as node %r: two nodes "
            "share a name and take turns in its heartbeat; give each its own --node",
            value.get("pid"),
            value.get("run"),
            self.settings.node,
        )
        self._emit("duplicate_name", None, other_pid=value.get("pid"), other_run=value.get("run"))

    def nodes(self) -> list[dict[str, Any]]:
        """This node's view of the cluster: every node that heartbeated lately, with
        the seconds since its last heartbeat (``age``) and the leases it holds."""
        now = _now()
        out = []
        for name, peer in sorted(self._peers.items()):
            value = peer["value"]
            age = now - peer["seen_at"]
            out.append(
                {
                    "node": name,
                    "alive": age <= self.settings.lease_ttl * 2,
                    "age": round(age, 3),
                    "pid": value.get("pid"),
                    "up_since": value.get("started"),
                    "runs": value.get("runs", []),
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/cluster`` answers."""
        s = self.settings
        return {
            "cluster": s.name,
            "node": s.node,
            "url": _redact(s.url),
            "connected": self.connected,
            "lease_ttl": s.lease_ttl,
            "nodes": self.nodes(),
            "leases": [
                {"key": display_key(lease.key), "held": lease.valid(), "token": lease.token}
                for lease in sorted(self._leases, key=lambda x: x.key)
            ],
        }

    def _emit(self, action: str, key: str | None, **fields: Any) -> None:
        if key is not None:
            _telemetry.emit(
                "cluster.lease",
                action=action,
                lease=key,
                node=self.settings.node,
                cluster=self.settings.name,
                **fields,
            )
        else:
            _telemetry.emit(
                "cluster.node",
                action=action,
                node=self.settings.node,
                cluster=self.settings.name,
                **fields,
            )


async def kv_keys(js: Any, bucket: str) -> list[str]:
    """The keys of the KV ``bucket`` (deleted ones too: their marker is a message), from
    the stream's per-subject counts. nats-py's ``kv.keys()`` makes a consumer per call
    and leaves its tasks behind when cancelled; this is one request."""
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=prefix + ">")
    subjects = info.state.subjects or {}
    return [s[len(prefix) :] for s in subjects if s.startswith(prefix)]


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _close(nc: Any) -> None:
    """Close a NATS connection, also when it is down: nats-py's ``close`` raises
    ``ConnectionResetError`` then, before it cancels its subscriptions' tasks, so
    those are cancelled here (else they would outlive the cluster)."""
    try:
        await asyncio.wait_for(nc.close(), 2.0)
    except Exception as e:
        _log.debug("cluster: closing the NATS connection: %r", e)
    tasks = []
    for sub in list(getattr(nc, "_subs", {}).values()):
        task = getattr(sub, "_wait_for_msgs_task", None)
        if task is not None and not task.done():
            task.cancel()
            tasks.append(task)
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


def display_key(key: str) -> str:
    """A lease key for people: ``dsup.<hex name>.<hex id>`` becomes ``name/id``."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "dsup":
        try:
            return f"{bytes.fromhex(parts[1]).decode()}/{bytes.fromhex(parts[2]).decode()}"
        except ValueError:
            pass
    return key


def _kv_key(key: str) -> str:
    """A KV key from any singleton name (NATS keys: letters, digits, ``-_=./``)."""
    return "".join(c if c.isalnum() or c in "-_=." else "_" for c in key) or "_"


def _redact(url: str) -> str:
    """The URL without a password or token in it."""
    out = []
    for part in url.split(","):
        scheme, sep, rest = part.strip().partition("://")
        if "@" in rest:
            rest = "***@" + rest.rpartition("@")[2]
        out.append(scheme + sep + rest)
    return ",".join(out)


def kill_os_process(pid: Any) -> None:
    """SIGKILL the OS process group of a command child (safe from another thread)."""
    send = getattr(pid, "send_signal", None)
    if send is not None:
        with contextlib.suppress(ProcessLookupError, OSError):
            send(signal.SIGKILL, group=True)

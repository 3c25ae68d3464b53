"""The parent's side of an isolated server: a Trellis server that stands in for it.

The stand-in holds the server's name, so ``call``/``cast``/``send``/``stop`` reach it
like any server. It owns the interpreter as an OS-process child (a ``Command``: own
process group, the guardian, limits, a watchdog), forwards each message over a Unix
socket and replies when the answer comes back. When the interpreter ends, the stand-in
ends with its reason, so the supervisor restarts it by its spec and every caller still
waiting gets ``Exited`` at once.

Each interpreter is held by a small ``_Holder`` process (the OS process's owner), so that
one can be started ahead of time: once a stand-in is up, it starts a *standby* (Python
started, Trellis and msgspec imported, connected, waiting for GO, no ``init`` run). The
stand-in of the next restart adopts it and sends GO, so a restart after a crash does not
pay for Python's start and imports. Only a restart adopts a standby (one whose sponsor,
the stand-in that started it, has ended): never a running sibling's. A standby is
killed when its child is stopped, when the supervisor ends, or when its supervisor no
longer has a restart of the child coming; like every OS child it is known to the
guardian, so it does not outlive Trellis either.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .._children._command import Command
from .._children._output import ring_for
from .._children._types import ExitCode, Hung, LimitExceeded, Limits, Signaled
from .._childspec import Backoff, ChildSpec
from .._core import _telemetry
from .._core._exceptions import InvalidChildSpec, TrellisError
from .._core._process import Pid, kill_and_wait, link, monitor
from .._core._process import exit as exit_process
from .._core._process import self as self_pid
from .._core._reasons import (
    KILL,
    NORMAL,
    RESTARTING,
    SHUTDOWN,
    Down,
    Exit,
    Shutdown,
    is_clean,
)
from .._server import Caller, NoReply, Server, Stop
from ._child import EXIT_START_FAILED, PATH_ENV, SERIALIZER_ENV, SOCKET_ENV
from ._wire import (
    CALL,
    CAST,
    EXIT,
    FAIL,
    GO,
    HELLO,
    INFO,
    READY,
    REPLY,
    REPLY_ERROR,
    STOP,
    TELEMETRY,
    Codec,
    FrameReader,
    UnsupportedMessage,
    cast_transport,
)

__all__ = ["Isolated", "IsolatedExit"]

_log = logging.getLogger("trellis.isolated")

#: What the isolated interpreter inherits from ours unless ``inherit_env`` says otherwise.
DEFAULT_INHERIT = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "PYTHONPATH", "VIRTUAL_ENV")


class IsolatedExit(TrellisError):
    """An isolated server ended abnormally in its own interpreter; ``text`` says how
    (``ValueError: boom``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IsolatedExit) and other.text == self.text

    def __hash__(self) -> int:
        return hash(("IsolatedExit", self.text))


@dataclass(frozen=True)
class _Config:
    id: str
    target: str
    go: bytes  # the GO frame: [GO, target, args, kwargs]
    serializer: str
    python: str
    env: dict[str, str] = field(default_factory=dict)
    inherit_env: bool | tuple[str, ...] = DEFAULT_INHERIT
    cwd: str | None = None
    limits: Limits | None = None
    heartbeat: float | None = 5.0
    start_timeout: float = 30.0
    stop_timeout: float = 5.0
    standby: bool = True
    adopt_within: float = 30.0  # an unused standby lives this long after its stand-in


def Isolated(
    server: type[Server] | str,
    *args: Any,
    id: str,
    name: object = None,
    limits: Limits | None = None,
    python: str | None = None,
    serializer: str = "msgpack",
    heartbeat: float | None = 5.0,
    env: dict[str, str] | None = None,
    inherit_env: bool | tuple[str, ...] = DEFAULT_INHERIT,
    cwd: str | os.PathLike[str] | None = None,
    start_timeout: float = 30.0,
    standby: bool = True,
    restart: str = "permanent",
    shutdown: Any = 5.0,
    significant: bool = False,
    backoff: Backoff | None = None,
    **kwargs: Any,
) -> ChildSpec:
    """A child spec that runs ``server(*args, **kwargs)`` in an interpreter of its own.

    ``server`` is a ``trellis.Server`` subclass defined in an importable module (or its
    ``"module:Class"`` name). ``call``/``cast``/``send``/``stop`` on ``name`` (or the pid
    the supervisor holds) work as for an in-process server; arguments, messages and
    replies cross a Unix socket as msgpack (builtins, tuples, ``msgspec.Struct`` types
    registered with :func:`trellis.message_type`). ``serializer="pickle"`` accepts any
    picklable value and trusts the child with unpickling in the parent: use it only
    for code you trust.

    A crash, segfault, ``os._exit``, an rlimit (``limits``) or a kernel kill ends the
    interpreter; the child then exits with that reason (class ``crash``, ``killed``,
    ``oom``) and callers waiting get ``Exited`` at once. ``heartbeat`` (seconds, None
    for none): an interpreter whose event loop sends no heartbeat for that long is
    killed as ``hung``.

    ``standby`` (default on for a restartable child): keep one more interpreter started
    and waiting, so that a restart after a crash adopts it instead of starting Python
    (a restart then costs the server's ``init``, not the interpreter's start and
    imports). The standby has the same environment, limits and arguments; it runs
    nothing of the server, not even the import of its module, until it is adopted, so a
    restarted server starts from scratch as before. It costs one idle interpreter
    (about 20 MB) per isolated child. A child stopped by its supervisor starts cold.

    Example::

        spec = trellis.Isolated(Parser, "strict", id="parser", name="parser",
                                limits=trellis.Limits(memory="512MiB"))
        await trellis.call("parser", ("parse", raw))
    """
    if isinstance(server, str):
        target = server
        module, sep, qual = target.partition(":")
        if not sep or not module or not qual:
            raise InvalidChildSpec(server, "give 'module:Class'", field="server")
    elif isinstance(server, type) and issubclass(server, Server):
        module = server.__module__
        if module == "__main__" or "<locals>" in server.__qualname__:
            raise InvalidChildSpec(
                server,
                "an isolated server's class must be importable by the new interpreter: "
                "define it at the top level of a module (not __main__, not in a function)",
                field="server",
            )
        target = f"{module}:{server.__qualname__}"
    else:
        raise InvalidChildSpec(server, "must be a trellis.Server subclass", field="server")
    if not isinstance(id, str) or not id or "/" in id:
        raise InvalidChildSpec(id, "must be a non-empty str without '/'", field="id")
    codec = _codec(serializer)
    try:
        go = codec.encode([GO, target, list(args), kwargs])
    except UnsupportedMessage as e:
        raise InvalidChildSpec(
            args, f"the arguments cannot be sent to the new interpreter: {e}", field="args"
        ) from None
    if heartbeat is not None and not (isinstance(heartbeat, int | float) and heartbeat > 0):
        raise InvalidChildSpec(heartbeat, "must be seconds > 0 or None", field="heartbeat")
    stop_timeout = float(shutdown) if isinstance(shutdown, int | float) else 5.0
    wait = 0.0
    if backoff is not None:  # a restart may come this much later: the standby waits
        wait = float(backoff.max) * (1.0 + float(backoff.jitter))
    cfg = _Config(
        id=id,
        target=target,
        go=go,
        serializer=serializer,
        python=python or sys.executable,
        env=dict(env or {}),
        inherit_env=inherit_env if isinstance(inherit_env, bool) else tuple(inherit_env),
        cwd=os.fspath(cwd) if cwd is not None else None,
        limits=limits,
        heartbeat=float(heartbeat) if heartbeat is not None else None,
        start_timeout=float(start_timeout),
        stop_timeout=max(stop_timeout * 0.9, 0.0),
        standby=bool(standby) and restart != "temporary",  # never restarted: no use
        adopt_within=30.0 + wait,
    )
    return ChildSpec(
        id=id,
        start=_Proxy.start_link,
        args=(cfg,),
        kwargs={"name": name} if name is not None else {},
        restart=restart,
        shutdown=shutdown,
        significant=significant,
        modules=(module,),
        backoff=backoff,
    )


def _codec(serializer: str) -> Codec:
    try:
        return Codec(serializer)
    except ValueError as e:
        raise InvalidChildSpec(serializer, str(e), field="serializer") from None


class _Link(asyncio.Protocol):
    """The parent's end of the socket."""

    def __init__(self, proxy: _Proxy, reader: FrameReader) -> None:
        self.proxy = proxy
        self.reader = reader  # the holder's: whatever it had buffered stays

    def connection_lost(self, exc: BaseException | None) -> None:
        p = self.proxy
        if p.link is not self:  # a standby given up for a cold start: not ours any more
            return
        p.transport = None
        if not p.ready.done():
            p.ready.set_result(("lost", None))

    def data_received(self, data: bytes) -> None:
        p = self.proxy
        if p.link is not self:
            return
        try:
            bodies = self.reader.feed(data)
        except ValueError:
            if p.transport is not None:
                p.transport.close()
            return
        pending = p.pending
        decode = p.codec.decode
        for body in bodies:
            try:
                frame = decode(body)
            except UnsupportedMessage as e:
                p.undecodable(body, str(e))
                continue
            kind = frame[0]
            if kind == REPLY:
                caller = pending.pop(frame[1], None)
                if caller is not None:
                    caller.reply(frame[2])
            elif kind == REPLY_ERROR:
                caller = pending.pop(frame[1], None)
                if caller is not None:
                    _fail(caller, UnsupportedMessage(frame[2]))
            elif kind == TELEMETRY:
                p.relay(frame[1])
            elif kind == READY:
                if not p.ready.done():
                    p.ready.set_result(("ready", None))
            elif kind == FAIL:
                if not p.ready.done():
                    p.ready.set_result(("failed", frame[1]))
            elif kind == EXIT:
                p.remote_exit = (bool(frame[1]), str(frame[2]))


def _fail(caller: Caller, exc: BaseException) -> None:
    fut = caller._fut
    if not fut.done():
        fut.set_exception(exc)
    owner = getattr(caller, "_owner", None)
    if owner is not None:
        caller._owner = None
        if owner._deferred is not None:
            owner._deferred.discard(caller)


class _Proxy(Server):
    """Stands in for the isolated server in this interpreter."""

    trap_exits = True

    async def init(self, cfg: _Config) -> None:
        self.cfg = cfg
        self.codec = Codec(cfg.serializer)
        self.pending: dict[int, Caller] = {}
        self.next_ref = 0
        me = self_pid()
        parent = me._parent
        # `path` is what the OS child's owner reads to name itself: our supervisor's path
        self.path = getattr(getattr(parent, "_server", None), "path", None)
        self.child_path = f"{self.path}/{cfg.id}" if self.path else cfg.id
        # where this child's standby waits: one per (supervisor, child id)
        self.slot = (parent.id, cfg.id) if parent is not None and cfg.standby else None
        self.spare: Pid | None = None  # the standby we started for the next restart
        self.os_child: Any = None
        self.given_up: list[Pid] = []  # a dead standby's holder and OS child: their exits
        holder = _take_standby(self.slot, cfg)
        if holder is not None:
            try:
                await self._run(holder)
            except _StandbyLost:
                # it died (or lost its connection) before READY, e.g. killed with the
                # interpreter it stood by for: this restart starts cold, as without it
                self.given_up += [holder.pid, holder.cmd]
                self._close()
                holder.adopted = False  # given up: it closes a connection it still holds
                await _stop_holder(holder)
                holder = None
        if holder is None:
            holder = (await _Holder.start(cfg, self.path, None, None, False))._server
            await self._run(holder)
        if self.slot is not None:
            me.send(_SPARE)  # after the calls already waiting for us

    async def _run(self, holder: _Holder) -> None:
        """Make ``holder``'s interpreter ours and send it GO; on any failure it is
        stopped (a standby that died before READY raises ``_StandbyLost``)."""
        self.transport: asyncio.Transport | None = None
        self.link: _Link | None = None
        self.remote_exit: tuple[bool, str] | None = None
        self.ready: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        self.lost = False
        try:
            link(holder.pid)  # not its parent: our crash is not its crash
            self.holder: _Holder = holder
            self.os_child = holder.cmd
            link(holder.cmd)  # its exit (with the OS reason) reaches us as it does our holder
            holder.adopted = True
            await self._start(holder)
        except BaseException as e:
            if holder.spare and self.lost and isinstance(e, Exception):
                raise _StandbyLost() from e
            self._close()
            holder.adopted = False  # failed: it closes a connection that came too late
            await _stop_holder(holder)
            raise

    async def _start(self, holder: _Holder) -> None:
        cfg = self.cfg
        exited = asyncio.ensure_future(holder.cmd.join())
        try:
            await asyncio.wait(
                {holder.hello, exited},
                timeout=cfg.start_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            transport = holder.hello.result() if holder.hello.done() else None
            if transport is not None:
                if holder.spare:  # a standby: from now on it is this child's interpreter
                    _rename(holder, self.child_path)
                self.link = _Link(self, holder.reader)
                transport.set_protocol(self.link)
                self.transport = transport
                transport.write(cfg.go)
                await asyncio.wait(
                    {self.ready, exited},
                    timeout=cfg.start_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            if self.ready.done():
                what, detail = self.ready.result()
                if what == "ready":
                    return
                if what == "failed":
                    raise IsolatedExit(f"init failed: {detail}")
                self.lost = True  # the connection was lost before READY
                reason = await asyncio.wait_for(asyncio.shield(exited), cfg.start_timeout)
                raise _start_failure(reason)
            if exited.done():
                self.lost = True
                raise _start_failure(exited.result())
            if holder.hello.done() and transport is None:  # connection lost before HELLO
                self.lost = True
                reason = await asyncio.wait_for(asyncio.shield(exited), cfg.start_timeout)
                raise _start_failure(reason)
            raise TimeoutError(
                f"isolated server {cfg.target} did not start within {cfg.start_timeout} s"
            )
        finally:
            if not exited.done():
                exited.cancel()

    async def _make_spare(self) -> None:
        """Start the standby the next restart adopts (unlinked from us: it must outlive
        our crash; it watches our supervisor and us instead)."""
        slot = self.slot
        if slot is None or self.spare is not None:
            return
        me = self_pid()
        try:
            hpid = await _Holder.start(self.cfg, self.path, me._parent, me, True)
        except Exception as e:  # no standby: the next restart starts cold, as without
            _log.warning("isolated server %s: no standby interpreter: %s", self.cfg.id, e)
            return
        self.spare = hpid
        _standbys.setdefault(slot, []).append(hpid._server)

    def relay(self, event: dict[str, Any]) -> None:
        name = event.pop("event", "event")
        event.pop("time", None)
        _telemetry.emit(f"isolated.{name}", path=self.child_path, child_id=self.cfg.id, **event)

    def undecodable(self, body: bytes, why: str) -> None:
        import msgspec

        try:
            head = msgspec.msgpack.decode(body, ext_hook=lambda _c, _d: None)
        except Exception:
            return
        if head and head[0] == REPLY:
            caller = self.pending.pop(head[1], None)
            if caller is not None:
                _fail(caller, UnsupportedMessage(f"the reply cannot be read here: {why}"))

    def _send(self, frame: Any) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        t.write(self.codec.encode(frame))
        return True

    async def handle_call(self, request: Any, caller: Caller) -> Any:
        ref = self.next_ref = self.next_ref + 1
        try:
            data = self.codec.encode([CALL, ref, request])
        except UnsupportedMessage as e:
            _fail(caller, UnsupportedMessage(f"cannot send this request to {self.cfg.id}: {e}"))
            return NoReply()
        t = self.transport
        if t is None or t.is_closing():
            return NoReply()  # the interpreter is going: its exit answers the caller
        self.pending[ref] = caller
        t.write(data)
        return NoReply()

    async def handle_cast(self, msg: Any) -> None:
        try:
            self._send([CAST, msg])
        except UnsupportedMessage as e:
            _log.error("cast to isolated server %s dropped: %s", self.cfg.id, e)

    async def handle_info(self, msg: Any) -> Any:
        if type(msg) is Exit:
            if msg.pid is self.os_child:
                return Stop(self._reason(msg.reason))
            if msg.pid is self.holder.pid:  # it ends after the interpreter: seen above
                return None if is_clean(msg.reason) else Stop(msg.reason)
            if msg.pid in self.given_up:  # the standby this restart did not use
                return None
        elif msg is _SPARE:
            await self._make_spare()
            return None
        try:
            self._send([INFO, msg])
        except UnsupportedMessage as e:
            _log.error("message to isolated server %s dropped: %s", self.cfg.id, e)
        return None

    def _reason(self, os_reason: Any) -> Any:
        remote = self.remote_exit
        if isinstance(os_reason, LimitExceeded | Hung | Signaled):
            return os_reason
        if remote is not None:
            clean, text = remote
            if clean:
                return NORMAL if text == "normal" else SHUTDOWN
            return IsolatedExit(text)
        return os_reason

    async def terminate(self, reason: Any) -> None:
        child = self.os_child
        if not child._dead:
            sent = False
            try:
                sent = self._send([STOP, _encode_reason(reason)])
            except UnsupportedMessage:
                pass
            if sent:
                try:
                    await child.join(self.cfg.stop_timeout)
                except TimeoutError:
                    pass
        self._close()
        await _stop_holder(self.holder)  # SIGKILLs what is left of the interpreter's group
        spare = self.spare
        if spare is not None and (is_clean(reason) or reason is KILL):
            # stopped, not crashed: no restart is coming to adopt it. Only while it is
            # still unadopted and ours (then nobody else can take it: see _take_standby)
            standby = spare._server
            if not standby.adopted and standby.sponsor_pid is self_pid():
                _unlist(standby)
                await _stop_holder(standby)

    def _close(self) -> None:
        t = self.transport
        if t is not None:
            t.close()


_SPARE = object()  # a message to ourselves: start the standby


class _StandbyLost(Exception):
    """The adopted standby died before READY: start cold instead."""


#: The unadopted standbys by (supervisor pid id, child id). One per child, but children
#: of a dynamic supervisor started from one spec share the id, hence the slot.
_standbys: dict[tuple[int, str], list[_Holder]] = {}


def _take_standby(slot: tuple[int, str] | None, cfg: _Config) -> _Holder | None:
    """A standby for this starting child: one whose sponsor (the stand-in that started
    it) has ended, so that this is (as far as we can tell) its restart; never a live
    sibling's. It must be alive and started from the same spec (same arguments,
    environment, limits, interpreter); a dead one is stopped, another spec's is left
    to its own restart (it ends when none comes)."""
    if slot is None:
        return None
    waiting = _standbys.get(slot)
    if not waiting:
        return None
    found = None
    for holder in list(waiting):
        sponsor = holder.sponsor_pid
        if sponsor is not None and not sponsor._dead:
            continue  # the spare of a child that runs
        if holder.pid._dead or holder.cmd._dead or holder.adopted:
            waiting.remove(holder)
            exit_process(holder.pid, SHUTDOWN)
        elif holder.cfg == cfg:
            waiting.remove(holder)
            found = holder
            break
    if not waiting:
        del _standbys[slot]
    return found


def _unlist(holder: _Holder) -> None:
    for slot, waiting in list(_standbys.items()):
        if holder in waiting:
            waiting.remove(holder)
            if not waiting:
                del _standbys[slot]


async def _stop_holder(holder: Any) -> None:
    """Stop a holder and wait until its interpreter is killed and reaped."""
    if holder is None:
        return
    pid = holder.pid
    if not pid._dead:
        exit_process(pid, SHUTDOWN)
        try:
            await pid.join(10.0)
        except TimeoutError:
            await kill_and_wait(pid)
    cmd = holder.cmd
    if cmd is not None and not cmd._dead:
        await kill_and_wait(cmd)


def _rename(holder: _Holder, path: str) -> None:
    """A standby's OS process becomes the child's: its output, hang and exit events now
    carry the child's path, and the tree sees the child's new OS pid."""
    runner = getattr(holder.cmd, "_runner", None)
    if runner is not None:
        runner.path = path
        runner.ring = ring_for(path)
    _telemetry.emit(
        "process.spawned",
        path=path,
        child_id=holder.cfg.id,
        os_pid=getattr(holder.cmd, "os_pid", None),
        argv=[holder.cfg.python, "-m", "trellis._isolated._child"],
    )


class _Waiting(asyncio.Protocol):
    """The holder's end of the socket until a stand-in takes it over: waits for HELLO."""

    def __init__(self, holder: _Holder) -> None:
        self.holder = holder

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        h = self.holder
        transport = cast_transport(transport)  # uvloop's transports are not subclasses
        if h.transport is not None or h.ended or h.pid._dead:  # one interpreter, one
            transport.close()  # connection; or made after the holder ended
            return
        h.transport = transport
        h.close_listener()  # nobody else may connect

    def connection_lost(self, exc: BaseException | None) -> None:
        h = self.holder
        h.transport = None
        if not h.hello.done():
            h.hello.set_result(None)

    def data_received(self, data: bytes) -> None:
        h = self.holder
        try:
            bodies = h.reader.feed(data)
        except ValueError:
            bodies = []
        for body in bodies:
            try:
                frame = h.codec.decode(body)
            except UnsupportedMessage:
                continue
            if frame and frame[0] == HELLO and not h.hello.done():
                h.hello.set_result(h.transport)


class _Holder(Server):
    """Owns one isolated interpreter (its ``Command``) from its start until it ends.

    For a standby, from before any stand-in adopts it: it watches the supervisor (gone:
    the standby goes) and the stand-in that started it (gone: it waits while the
    supervisor has a restart of the child coming, at most ``adopt_within`` seconds).
    Once adopted it is linked to the stand-in, and the stand-in's end, however it ends,
    stops the interpreter."""

    trap_exits = True

    async def init(
        self, cfg: _Config, path: str | None, sup: Pid | None, sponsor: Pid | None, spare: bool
    ) -> None:
        self.cfg = cfg
        self.pid = self_pid()
        self.adopted = False
        self.ended = False  # terminate ran: a connection accepted since is closed at once
        self.cmd: Any = None
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.codec = Codec(cfg.serializer)
        self.loop = loop = asyncio.get_running_loop()
        #: the connected transport once HELLO arrived (None: the connection was lost)
        self.hello: asyncio.Future[asyncio.Transport | None] = loop.create_future()
        self.expiry: asyncio.TimerHandle | None = None
        self.spare = spare
        self.sup = sup
        self.sponsor_pid = sponsor
        self.sponsor: Any = None  # the monitor of the sponsor
        self.checking: asyncio.TimerHandle | None = None
        self.asking: asyncio.Future[None] | None = None
        # what the OS child's owner (us) reads to name itself "<path>/<id>": a standby's
        # events go under a path no tree view knows, until its adoption renames it
        self.path = (f"{path}~standby" if path else "~standby") if spare else path
        self.dir: str | None = tempfile.mkdtemp(prefix="trellis-isolated-")  # 0700
        sock = os.path.join(self.dir, "s")
        # accepted by hand, not with loop.create_unix_server: asyncio's server leaks a
        # connection accepted just before it is closed (its transport fails to attach to
        # the closed server, and nothing closes its socket); a holder can end just as its
        # interpreter connects, and must close whatever it accepted
        self.listener: socket.socket | None = None
        self.accepted: socket.socket | None = None  # the connection, until wrapped
        self.accepting: asyncio.Future[Any] | None = None
        # however this holder ends (a kill skips terminate), its sockets are closed
        task = getattr(self.pid, "_task", None)
        if task is not None:
            task.add_done_callback(lambda _t: self._close_all())
        try:
            self.listener = _listen(sock)
            loop.add_reader(self.listener.fileno(), self._accept)
            spec = Command(
                [cfg.python, "-m", "trellis._isolated._child"],
                id=cfg.id,
                env={
                    **cfg.env,
                    SOCKET_ENV: sock,
                    SERIALIZER_ENV: cfg.serializer,
                    PATH_ENV: _sys_path(),
                },
                inherit_env=cfg.inherit_env,
                cwd=cfg.cwd,
                limits=cfg.limits,
                watchdog=cfg.heartbeat,
                stop_signal="SIGKILL",  # a graceful stop goes over the socket first
            )
            self.cmd = await spec.start(*spec.args)
        except BaseException:
            self.close_listener()
            raise
        if spare:
            if sup is not None:
                monitor(sup)
            if sponsor is not None:
                self.sponsor = monitor(sponsor)

    def _accept(self) -> None:
        """The listener is readable: take the interpreter's connection (the only one),
        stop listening, and wrap it in a transport, unless the holder has ended."""
        if self.listener is None:
            return
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # out of descriptors, say: the start fails, and says why
            _log.warning("isolated server %s: cannot accept its interpreter: %s", self.cfg.id, e)
            self.close_listener()
            if not self.hello.done():
                self.hello.set_result(None)
            return
        self.close_listener()  # nobody else may connect
        if self.ended or self.pid._dead:
            conn.close()
            return
        conn.setblocking(False)
        self.accepted = conn
        self.accepting = fut = asyncio.ensure_future(
            self.loop.connect_accepted_socket(lambda: _Waiting(self), conn)
        )
        fut.add_done_callback(self._wrapped)

    def _wrapped(self, fut: asyncio.Future[Any]) -> None:
        self.accepting = None
        if fut.cancelled() or fut.exception() is not None:
            # never wrapped (or wrapping failed): the socket is still ours to close
            if self.accepted is not None:
                self.accepted.close()
            if not self.hello.done():
                self.hello.set_result(None)
        self.accepted = None

    def _close_all(self) -> None:
        self.ended = True  # a connection made after this is closed at once
        self.close_listener()
        if self.accepting is not None:
            self.accepting.cancel()  # its done-callback closes the socket
        if self.transport is not None:  # the interpreter's connection, whoever used it
            self.transport.close()

    def close_listener(self) -> None:
        if self.listener is not None:
            listener, self.listener = self.listener, None
            if not self.loop.is_closed():
                self.loop.remove_reader(listener.fileno())
            listener.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    async def handle_info(self, msg: Any) -> Any:
        t = type(msg)
        if t is Exit:
            if msg.pid is self.cmd and not self.adopted and not is_clean(msg.reason):
                _log.warning(
                    "standby interpreter of isolated server %s ended before it was used: %r",
                    self.cfg.id,
                    msg.reason,
                )
            return Stop(NORMAL)  # the interpreter ended, or the stand-in that adopted it
        if t is Down:
            if msg.ref is self.sponsor:
                if not self.adopted:  # a restart may come: wait that long for it
                    me = self.pid
                    loop = asyncio.get_running_loop()
                    self.expiry = loop.call_later(self.cfg.adopt_within, me.send, _EXPIRED)
                    self._check()
                return None
            return Stop(NORMAL)  # the supervisor ended
        if self.adopted:
            return None
        if msg is _EXPIRED:
            return Stop(NORMAL)
        if msg is _CHECK:
            self.checking = None
            self._check()
        elif t is _Checked:
            self.asking = None
            if msg.pending is False:
                return Stop(NORMAL)
            self.checking = asyncio.get_running_loop().call_later(1.0, self.pid.send, _CHECK)
        return None

    def _check(self) -> None:
        """After the sponsor's end: ask its supervisor whether it may still restart
        the child; stop if not. Asked first when the supervisor has handled the
        sponsor's exit (the question waits behind it, and behind an immediate restart),
        then every second, until a restart adopts us or ``adopt_within`` has passed.
        Asked from a task: meanwhile we answer an exit signal (from a restart that
        gives us up) at once, while the supervisor may be waiting for that."""
        me = self.pid

        async def ask() -> None:
            me.send(_Checked(await _restart_pending(self.sup, self.cfg.id)))

        self.asking = asyncio.ensure_future(ask())

    async def terminate(self, reason: Any) -> None:
        self.ended = True
        if self.expiry is not None:
            self.expiry.cancel()
        if self.checking is not None:
            self.checking.cancel()
        if self.asking is not None:
            self.asking.cancel()
        _unlist(self)
        self.close_listener()
        if not self.adopted and self.transport is not None:
            self.transport.close()
        cmd = self.cmd
        if cmd is not None and not cmd._dead:
            exit_process(cmd, SHUTDOWN)  # its owner SIGKILLs the group, then reaps it
            try:
                await cmd.join(10.0)
            except TimeoutError:
                await kill_and_wait(cmd)
        # the interpreter is gone: its connection, whoever used it, is closed by
        # _close_all as this holder's task ends


def _listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind(path)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


_EXPIRED = object()
_CHECK = object()


class _Checked:
    __slots__ = ("pending",)

    def __init__(self, pending: bool | None) -> None:
        self.pending = pending


async def _restart_pending(sup: Pid | None, child_id: str) -> bool | None:
    """Whether the supervisor ``sup`` has a child ``child_id`` that is not running but
    may start again (in its backoff, a retry due); None when it cannot tell (not a
    Trellis supervisor, or it does not answer soon): the standby then waits out
    ``adopt_within``."""
    which = getattr(sup, "which_children", None)
    if sup is None or which is None:
        return None
    if sup._dead:
        return False
    try:
        children = await asyncio.wait_for(which(), 10.0)
    except Exception:
        return False if sup._dead else None
    for info in children:
        if info.id != child_id:
            continue
        if info.pid is RESTARTING or (isinstance(info.pid, Pid) and info.pid._dead):
            return True
    return False


def _encode_reason(reason: Any) -> str:
    if reason is NORMAL or reason == NORMAL:
        return "normal"
    if reason is SHUTDOWN or reason == SHUTDOWN or reason is KILL:
        return "shutdown"
    if isinstance(reason, Shutdown):
        return str(getattr(reason, "detail", reason))
    return "shutdown" if is_clean(reason) else str(reason)


def _sys_path() -> str:
    """Our import path, so the new interpreter finds the modules we found (as
    multiprocessing's spawn does)."""
    return os.pathsep.join(p if p else os.getcwd() for p in sys.path)


def _start_failure(reason: Any) -> BaseException:
    if isinstance(reason, ExitCode) and reason.code == EXIT_START_FAILED:
        return IsolatedExit("init failed (see its output)")
    if isinstance(reason, BaseException):
        return reason
    return IsolatedExit(f"ended before it was ready: {reason}")

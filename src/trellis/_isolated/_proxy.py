"""The parent's side of an isolated server: a Trellis server that stands in for it.

The stand-in holds the server's name, so ``call``/``cast``/``send``/``stop`` reach it
like any server. It owns the interpreter as an OS-process child (a ``Command``: own
process group, the guardian, limits, a watchdog), forwards each message over a Unix
socket and replies when the answer comes back. When the interpreter ends, the stand-in
ends with its reason, so the supervisor restarts it by its spec and every caller still
waiting gets ``Exited`` at once.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .._children._command import Command
from .._children._types import ExitCode, Hung, LimitExceeded, Limits, Signaled
from .._childspec import Backoff, ChildSpec
from .._core import _telemetry
from .._core._exceptions import InvalidChildSpec, TrellisError
from .._core._process import exit as exit_process
from .._core._process import self as self_pid
from .._core._reasons import KILL, NORMAL, SHUTDOWN, Exit, Shutdown, is_clean
from .._server import Caller, NoReply, Server, Stop
from ._child import EXIT_START_FAILED, PATH_ENV, SOCKET_ENV, SPEC_ENV
from ._wire import (
    CALL,
    CAST,
    EXIT,
    FAIL,
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
    spec: str  # serializer:base64 of [target, args, kwargs]
    serializer: str
    python: str
    env: dict[str, str] = field(default_factory=dict)
    inherit_env: bool | tuple[str, ...] = DEFAULT_INHERIT
    cwd: str | None = None
    limits: Limits | None = None
    heartbeat: float | None = 5.0
    start_timeout: float = 30.0
    stop_timeout: float = 5.0


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
        payload = codec.encode([target, list(args), kwargs])[4:]
    except UnsupportedMessage as e:
        raise InvalidChildSpec(
            args, f"the arguments cannot be sent to the new interpreter: {e}", field="args"
        ) from None
    if heartbeat is not None and not (isinstance(heartbeat, int | float) and heartbeat > 0):
        raise InvalidChildSpec(heartbeat, "must be seconds > 0 or None", field="heartbeat")
    stop_timeout = float(shutdown) if isinstance(shutdown, int | float) else 5.0
    cfg = _Config(
        id=id,
        target=target,
        spec=f"{serializer}:{base64.b64encode(payload).decode()}",
        serializer=serializer,
        python=python or sys.executable,
        env=dict(env or {}),
        inherit_env=inherit_env if isinstance(inherit_env, bool) else tuple(inherit_env),
        cwd=os.fspath(cwd) if cwd is not None else None,
        limits=limits,
        heartbeat=float(heartbeat) if heartbeat is not None else None,
        start_timeout=float(start_timeout),
        stop_timeout=max(stop_timeout * 0.9, 0.0),
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

    def __init__(self, proxy: _Proxy) -> None:
        self.proxy = proxy
        self.reader = FrameReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        p = self.proxy
        transport = cast_transport(transport)  # uvloop's transports are not subclasses
        if p.transport is not None:  # one interpreter, one connection
            transport.close()
            return
        p.transport = transport

    def connection_lost(self, exc: BaseException | None) -> None:
        p = self.proxy
        p.transport = None
        if not p.ready.done():
            p.ready.set_result(("lost", None))

    def data_received(self, data: bytes) -> None:
        p = self.proxy
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
        self.transport: asyncio.Transport | None = None
        self.remote_exit: tuple[bool, str] | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[tuple[str, Any]] = loop.create_future()
        self.dir = tempfile.mkdtemp(prefix="trellis-isolated-")  # 0700
        path = os.path.join(self.dir, "s")
        self.listener = await loop.create_unix_server(lambda: _Link(self), path)
        parent = self_pid()._parent
        # `path` is what the OS child's owner reads to name itself: our supervisor's path
        self.path = getattr(getattr(parent, "_server", None), "path", None)
        self.child_path = f"{self.path}/{cfg.id}" if self.path else cfg.id
        self.os_child: Any = None
        try:
            await self._start(path)
        except BaseException:
            child = self.os_child
            if child is not None and not child._dead:
                exit_process(child, KILL)  # its owner SIGKILLs the group and reaps it
                await child.join()
            self._close()
            raise

    async def _start(self, path: str) -> None:
        cfg = self.cfg
        spec = Command(
            [cfg.python, "-m", "trellis._isolated._child"],
            id=cfg.id,
            env={**cfg.env, SPEC_ENV: cfg.spec, SOCKET_ENV: path, PATH_ENV: _sys_path()},
            inherit_env=cfg.inherit_env,
            cwd=cfg.cwd,
            limits=cfg.limits,
            watchdog=cfg.heartbeat,
            stop_signal="SIGKILL",  # a graceful stop goes over the socket first
        )
        self.os_child = await spec.start(*spec.args)
        exited = asyncio.ensure_future(self.os_child.join())
        try:
            done, _ = await asyncio.wait(
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
                reason = await asyncio.wait_for(asyncio.shield(exited), cfg.start_timeout)
                raise _start_failure(reason)
            if exited in done:
                raise _start_failure(exited.result())
            raise TimeoutError(
                f"isolated server {cfg.target} did not start within {cfg.start_timeout} s"
            )
        finally:
            if not exited.done():
                exited.cancel()

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
        if type(msg) is Exit and msg.pid is self.os_child:
            return Stop(self._reason(msg.reason))
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
        # our exit reaches the owner of the OS process through the link: it SIGKILLs
        # whatever is left of the group

    def _close(self) -> None:
        t = self.transport
        if t is not None:
            t.close()
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


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

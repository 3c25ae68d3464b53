"""``Command``: an OS process as a child of a supervision tree.

Example::

    sup = await trellis.Supervisor.start_link(
        [
            trellis.Command(["redis-server", "--port", "6380"], id="redis",
                            ready=trellis.Ready.tcp(6380)),
            trellis.Command(["python3", "-m", "collector"], id="collector",
                            watchdog=10.0, ready=trellis.Ready.notify()),
        ],
        strategy="rest_for_one",
    )

Each child is owned by a Trellis process (its ``CommandPid``). The OS process runs
in its own session and process group. Its exit is seen at once through a pidfd
(no polling), and stopping it signals the whole group: ``stop_signal``, then
SIGKILL after the supervisor's shutdown budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess

from .._childspec import Backoff, ChildSpec
from .._core import _telemetry
from .._core._clock import current_clock, sleep_on
from .._core._exceptions import InvalidChildSpec, StartError
from .._core._process import (
    ExitWith,
    Pid,
    _current,
    _kill,
    _link_pair,
    _live,
    _new_pid,
    _start_task,
)
from .._core._reasons import KILLED, NORMAL, Exit, is_clean
from . import _guardian, _orphans
from ._notify import NotifySocket
from ._output import LineProtocol, RotatingFile, log_name, open_logs_dir, ring_for
from ._types import (
    ExitCode,
    Health,
    Hung,
    LimitExceeded,
    Limits,
    Logs,
    Ready,
    ReadyTimeout,
    Signaled,
    check_argv_env,
    signal_number,
)

__all__ = ["Command", "CommandPid"]

_log = logging.getLogger("trellis")

DEFAULT_INHERIT = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "TMPDIR")

# What a process that hit a memory or descriptor limit usually says (matched lazily).
_MEMORY_ERRORS = rb"MemoryError|Cannot allocate memory|[Oo]ut of memory|bad_alloc|ENOMEM"
_FILE_ERRORS = rb"Too many open files|EMFILE"


class CommandPid(Pid):
    """The Trellis process that owns an OS-process child; ``os_pid`` is the OS pid."""

    __slots__ = ("_runner", "os_pid")

    def __init__(self) -> None:
        super().__init__()
        self.os_pid: int | None = None
        self._runner: _Runner | None = None

    def send_signal(self, sig: int | str, group: bool = False) -> int:
        """Send ``sig`` to the OS process (``group=True``: to its whole process group);
        returns the OS pid signalled. Raises ``ProcessLookupError`` when it is not running.

        Example::

            pid.send_signal("HUP")  # nginx: reload its configuration
        """
        runner = self._runner
        if runner is None or runner.os_pid is None or runner.status is not None:
            raise ProcessLookupError("the OS process is not running")
        num = signal_number(sig)
        if group:
            os.killpg(runner.pgid or runner.os_pid, num)
        else:
            os.kill(runner.os_pid, num)
        return runner.os_pid


@dataclass(frozen=True, slots=True)
class _Config:
    id: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    inherit_env: bool | tuple[str, ...]
    cwd: str | None
    user: str | int | None
    stop_signal: int
    ready: Ready
    watchdog: float | None
    health: Health | None
    limits: Limits | None
    logs: Logs | None
    pidfile: str | None = None
    notify_access: str = "all"


def Command(
    argv: Sequence[str] | str,
    *,
    id: str | None = None,
    env: Mapping[str, str] | None = None,
    inherit_env: bool | Sequence[str] = DEFAULT_INHERIT,
    cwd: str | os.PathLike[str] | None = None,
    user: str | int | None = None,
    shell: bool = False,
    stop_signal: int | str = "SIGTERM",
    ready: Ready | None = None,
    watchdog: float | None = None,
    health: Health | None = None,
    limits: Limits | None = None,
    logs: Logs | None = None,
    pidfile: str | os.PathLike[str] | None = None,
    notify_access: str = "all",
    restart: str = "permanent",
    shutdown: Any = 5.0,
    significant: bool = False,
    backoff: Backoff | None = None,
) -> ChildSpec:
    """A child spec that runs ``argv`` as a supervised OS process.

    ``argv`` is a list (no shell). A string is accepted only with ``shell=True``.
    The environment is explicit: only the names in ``inherit_env`` are taken from
    ours (``True`` means all of them), and ``env`` is added on top. Every OS child
    also gets ``TRELLIS_TAG`` (how Trellis finds its descendants that leave its group).

    ``user`` runs it as that user: uid, the user's group and supplementary groups
    (initgroups), and ``HOME``/``USER``/``LOGNAME``/``SHELL`` from its passwd entry (as
    systemd ``User=`` does; ``env`` still wins).

    ``pidfile`` is for programs that daemonize (systemd ``Type=forking``): the
    process Trellis starts must exit 0 after forking, and the daemon's pid is then
    read from ``pidfile``; Trellis follows that process from there on.

    ``notify_access`` says who may send on ``NOTIFY_SOCKET`` (as systemd
    ``NotifyAccess=``): ``"all"`` (default) the child's processes (its session),
    ``"main"`` only the main process. Messages from anyone else are ignored.

    Example::

        spec = trellis.Command(["python3", "-m", "http.server", "8080"], id="web",
                               ready=trellis.Ready.http("http://127.0.0.1:8080/"))
    """
    if shell:
        if not isinstance(argv, str):
            raise InvalidChildSpec(argv, "with shell=True, give the command as a str", field="argv")
        args: tuple[str, ...] = ("/bin/sh", "-c", argv)
    else:
        if isinstance(argv, str):
            raise InvalidChildSpec(
                argv, "give argv as a list (or pass shell=True for a shell string)", field="argv"
            )
        if not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidChildSpec(argv, "argv must be a non-empty list of str", field="argv")
        args = tuple(argv)
    if env is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise InvalidChildSpec(env, "env must map str to str", field="env")
    check_argv_env(args, env)
    if watchdog is not None and (
        not isinstance(watchdog, int | float)
        or isinstance(watchdog, bool)
        or not 0 < watchdog < float("inf")
    ):
        raise InvalidChildSpec(watchdog, "must be seconds > 0", field="watchdog")
    if notify_access not in ("main", "all"):
        raise InvalidChildSpec(notify_access, 'must be "main" or "all"', field="notify_access")
    if pidfile is not None and not isinstance(pidfile, str | os.PathLike):
        raise InvalidChildSpec(pidfile, "must be a path", field="pidfile")
    inherit = inherit_env if isinstance(inherit_env, bool) else tuple(inherit_env)
    cfg = _Config(
        id=id if id is not None else os.path.basename(args[0] if not shell else "sh"),
        argv=args,
        env=dict(env or {}),
        inherit_env=inherit,
        cwd=os.fspath(cwd) if cwd is not None else None,
        user=user,
        stop_signal=signal_number(stop_signal),
        ready=ready if ready is not None else Ready.started(),
        watchdog=float(watchdog) if watchdog is not None else None,
        health=health,
        limits=limits if limits else None,
        logs=logs,
        pidfile=os.fspath(pidfile) if pidfile is not None else None,
        notify_access=notify_access,
    )
    return ChildSpec(
        id=cfg.id,
        start=_start_command,
        args=(cfg,),
        restart=restart,
        shutdown=shutdown,
        significant=significant,
        modules=(args[0],),
        backoff=backoff,
    )


async def _start_command(cfg: _Config) -> CommandPid:
    """Start function: spawn the owner process and wait until the OS process is ready."""
    parent = _current.get()
    pid = _new_pid(True, CommandPid, parent)
    assert isinstance(pid, CommandPid)
    ack: asyncio.Future[Any] = pid._loop.create_future()  # type: ignore[union-attr]
    pid._ack = ack
    if parent is not None:
        _link_pair(parent, pid)
    runner = _Runner(pid, cfg)
    pid._runner = runner
    if cfg.ready.kind == "started" and cfg.pidfile is None:
        # Ready as soon as it is spawned: spawn right here, and leave only the watching to
        # the owner process (no loop turn per child, so a big tree starts at once).
        try:
            runner.spawn()
        except Exception as e:
            runner.close_fds()
            _live.pop(pid.id, None)  # it never ran: nothing to notify
            if parent is not None and parent._links is not None:
                parent._links.discard(pid)
            raise StartError(e, f"{cfg.id}: {e}") from e
        pid._ack = None
        _start_task(pid, runner.run(spawned=True))
        # if the owner is killed before its first step, run() never runs its cleanup
        pid._task.add_done_callback(lambda _t: runner._cleanup())  # type: ignore[union-attr]
        return pid
    _start_task(pid, runner.run())
    try:
        res = await ack
    except asyncio.CancelledError:
        _kill(pid, KILLED)  # the starter gave up: the OS process must not live on
        raise
    if res is True:
        return pid
    reason = res[1]
    if isinstance(reason, BaseException):
        raise StartError(reason, f"{cfg.id}: {reason}") from reason
    raise StartError(reason, f"{cfg.id}: {reason!r}")


# ---------------------------------------------------------------------------
# The owner process
# ---------------------------------------------------------------------------


class _Runner:
    def __init__(self, pid: CommandPid, cfg: _Config) -> None:
        self.pid = pid
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.clock = current_clock()
        self.os_pid: int | None = None
        self.pgid: int | None = None  # the group signalled (a followed daemon's own)
        self.sid: int | None = None  # its session: who may talk on the notify socket
        self.tag = _guardian.new_tag()
        self.forking = cfg.pidfile is not None  # until the daemon's pid is known
        self.main_start: int | None = None  # (pidfile) when the main process started
        self.signalled = False  # we signalled its group (a stop, a kill): not daemonizing
        self.popen: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self.status: int | None = None
        self.exited: asyncio.Future[int] = self.loop.create_future()
        self.notify: NotifySocket | None = None
        self.ready_event: asyncio.Future[None] = self.loop.create_future()
        self.ready_regex = re.compile(cfg.ready.target) if cfg.ready.kind == "log" else None
        self.protocols: list[LineProtocol] = []
        self.pipe_fds: list[int] = []
        self.transports: list[Any] = []
        self.pipes_closed: list[asyncio.Future[None]] = []
        self.watchdog_timer: Any = None
        self.watchdog_due = 0.0
        self.main_exit: asyncio.Future[int] = self.loop.create_future()
        self.hung: Hung | None = None
        self.health_task: asyncio.Task[None] | None = None
        self.checks = 0  # health-check commands run (each gets a tag of its own)
        self._fds: list[int] = []
        self._cleaned = False
        parent = pid._parent
        path = getattr(parent._server, "path", None) if parent is not None else None
        self.path = f"{path}/{cfg.id}" if path else cfg.id  # the child's path in the tree
        self.ring = ring_for(self.path)

    # -- the process body ----------------------------------------------------------
    async def run(self, spawned: bool = False) -> ExitWith:
        pid = self.pid
        try:
            if not spawned:
                try:
                    self.spawn()
                    if self.forking:
                        await self._follow_pidfile()
                    await self._wait_ready()
                except Exception as e:
                    self.close_fds()
                    await self._stop_os_process(signal.SIGKILL)
                    self._fail_start(e)
                    return ExitWith(e)
                ack = pid._ack
                pid._ack = None
                if ack is not None and not ack.done():
                    ack.set_result(True)
            if self.cfg.health is not None:
                self.health_task = self.loop.create_task(self._health_loop(self.cfg.health))
            return ExitWith(await self._supervise())
        except asyncio.CancelledError:
            # killed (brutal_kill, or the shutdown budget ran out): SIGKILL the group now
            self._kill_group(signal.SIGKILL)
            raise
        finally:
            self._cleanup()

    def close_fds(self) -> None:
        """After a failed spawn: close what it had opened."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    def _fail_start(self, reason: object) -> None:
        pid = self.pid
        parent = pid._parent
        if parent is not None and pid._links is not None and parent in pid._links:
            pid._links.discard(parent)  # a failed start sends no exit signal (OTP 26+)
            if parent._links is not None:
                parent._links.discard(pid)
        ack = pid._ack
        pid._ack = None
        if ack is not None and not ack.done():
            ack.set_result(("error", reason))

    async def _supervise(self) -> object:
        """Wait for the OS process to end, or for a stop request; return the exit reason."""
        pid = self.pid
        parent = pid._parent
        while True:
            msg = await pid._next()
            if msg is _EXITED:
                if self.cfg.limits is not None:
                    await self._drain_pipes()  # the reason may be in its last words
                return self._exit_reason()
            if msg is _HUNG:
                _telemetry.emit(
                    "process.hung",
                    path=self.path,
                    child_id=self.cfg.id,
                    os_pid=self.os_pid,
                    reason=self.hung,
                )
                await self._stop_os_process(signal.SIGKILL)
                return self.hung
            if type(msg) is Exit and (msg.pid is parent or not is_clean(msg.reason)):
                # the supervisor stops us: stop_signal to the group; the supervisor
                # kills us (and so SIGKILLs the group) when its shutdown budget ends
                self._kill_group(self.cfg.stop_signal)
                await self.exited  # the group's leftovers are killed before the reap
                await self._drain_pipes()  # their last lines (the tree may be stopping)
                return msg.reason

    # -- spawning ---------------------------------------------------------------------
    def _environ(self) -> dict[str, str]:
        inherit = self.cfg.inherit_env
        if inherit is True:
            env = dict(os.environ)
        elif inherit is False:
            env = {}
        else:
            env = {k: os.environ[k] for k in inherit if k in os.environ}
        if self.cfg.user is not None:
            env.update(_user_env(self.cfg.user))
        env.update(self.cfg.env)
        env[_guardian.TAG_VAR] = self.tag
        return env

    def spawn(self) -> None:
        """Start the OS process (synchronous: posix_spawn returns once it has exec'd)."""
        cfg = self.cfg
        _guardian.ensure_started()  # before the first spawn, not on the first register
        env = self._environ()
        if cfg.ready.kind == "notify" or cfg.watchdog is not None:
            self.notify = NotifySocket(self.loop, self._on_notify, self._notify_allowed)
            env["NOTIFY_SOCKET"] = self.notify.address
            if cfg.watchdog is not None:
                env["WATCHDOG_USEC"] = str(int(cfg.watchdog * 1_000_000))
        logs = self._open_logs()  # before the spawn: a refused logs dir starts nothing
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._fds = [out_r, err_r]
        try:
            self.os_pid, self.popen = _spawn_os(cfg, cfg.argv, env, out_w, err_w)
        except BaseException:
            for log in logs:
                if log is not None:
                    log.close()
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        self._fds = []  # the readers own them from here on
        assert self.os_pid is not None
        self.pid.os_pid = self.os_pid
        self.pgid = self.sid = self.os_pid  # setsid: it leads its own session and group
        if self.forking:  # its daemon starts after it (see _own_daemon)
            self.main_start = _orphans.start_ticks(self.os_pid)
        # known to the guardian before spawn returns (and tagged before that, in case
        # Trellis dies in between); its owner reaps it, not the orphan sweep
        _guardian.register(self.os_pid)
        _orphans.claim(self.os_pid, self.tag)
        self.pidfd = os.pidfd_open(self.os_pid)
        self.loop.add_reader(self.pidfd, self._on_pidfd)
        self._read_pipe("stdout", out_r, logs[0])
        self._read_pipe("stderr", err_r, logs[1])
        _telemetry.emit(
            "process.spawned",
            path=self.path,
            child_id=cfg.id,
            os_pid=self.os_pid,
            argv=list(cfg.argv),
        )
        if cfg.watchdog is not None:
            self._arm_watchdog()

    def _open_logs(self) -> tuple[RotatingFile | None, RotatingFile | None]:
        """The stdout and stderr log files (with ``logs``), in a logs dir that nobody
        but us can write to, never opened through a symlink (see ``_output``)."""
        logs = self.cfg.logs
        if logs is None:
            return None, None
        base = log_name(self.path)  # by path: two children with one id differ
        dir_fd = open_logs_dir(logs.dir)
        try:
            out = RotatingFile(dir_fd, f"{base}.out.log", logs.max_bytes, logs.backups)
            try:
                err = RotatingFile(dir_fd, f"{base}.err.log", logs.max_bytes, logs.backups)
            except BaseException:
                out.close()
                raise
        finally:
            os.close(dir_fd)
        return out, err

    def _read_pipe(self, stream: str, fd: int, log: RotatingFile | None) -> None:
        closed: asyncio.Future[None] = self.loop.create_future()
        proto = LineProtocol(stream, self._on_line, log, closed)
        pipe = os.fdopen(fd, "rb", buffering=0)
        make = getattr(self.loop, "_make_read_pipe_transport", None)
        if make is not None:
            # asyncio's own constructor: the transport is ready now, without the loop turn
            # that connect_read_pipe spends waiting for connection_made (per pipe, per spawn)
            transport = make(pipe, proto)
        else:  # another loop implementation: the public API, awaited by a small task
            transport = _PendingTransport(
                self.loop, self.loop.connect_read_pipe(lambda: proto, pipe)
            )
        self.protocols.append(proto)
        self.pipe_fds.append(fd)
        self.transports.append(transport)
        self.pipes_closed.append(closed)

    # -- events from the OS process -------------------------------------------------
    def _on_pidfd(self) -> None:
        if self.os_pid is None or self.status is not None:
            return
        # The leader is a zombie now, so its group id cannot have been reused: kill what
        # is left of the group (grandchildren never outlive their child), then reap. A
        # daemonizer's main process is let go alone: its daemon may share its group.
        if not self.forking:
            signalled = self.signalled
            self._kill_group(signal.SIGKILL)
            self.signalled = signalled  # cleaning up its group is not a stop
        try:
            got, status = os.waitpid(self.os_pid, os.WNOHANG)
        except ChildProcessError:
            got, status = self.os_pid, 0
        if got == 0:
            return
        self._reaped(status)

    def _reaped(self, status: int) -> None:
        self.status = status
        if self.popen is not None:
            self.popen.returncode = os.waitstatus_to_exitcode(status)
        if self.pidfd is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                self.loop.remove_reader(self.pidfd)
        if self.pgid is not None:
            _guardian.unregister(self.pgid)
        if self.forking:  # the daemonizer's main process: _follow_pidfile takes over
            if not self.main_exit.done():
                self.main_exit.set_result(status)
            return
        assert self.os_pid is not None
        left = _orphans.left_behind(self.tag)  # [] unless Trellis is a subreaper
        _orphans.release(self.os_pid, self.tag)
        if left:
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and not self.signalled:
                self._daemonized(left)  # exit 0 by itself, its processes still running
            else:
                _log.info("%s: killing %d process(es) it left behind", self.path, len(left))
            _orphans.sweep()  # what it left behind (setsid, daemons) dies with it
        if not self.exited.done():
            self.exited.set_result(status)
        self.pid._deliver(_EXITED)

    def _daemonized(self, left: list[int]) -> None:
        what = ", ".join(f"{p} ({_orphans.cmdline(p)[:80]})" for p in left[:3])
        _log.warning(
            "%s: its main process exited and left %d process(es) running: %s. It "
            "daemonized (or started a background process); Trellis killed them so "
            "nothing is orphaned. Run the program in the foreground (e.g. redis-server "
            "--daemonize no, nginx -g 'daemon off;'), or set pidfile = \"...\" so "
            "Trellis follows the daemon (like systemd Type=forking).",
            self.path,
            len(left),
            what,
        )
        _telemetry.emit(
            "process.daemonized",
            path=self.path,
            child_id=self.cfg.id,
            os_pid=self.os_pid,
            left=left,
        )

    async def _follow_pidfile(self) -> None:
        """systemd ``Type=forking``: the main process must exit 0, then the pidfile names
        the daemon (a live process of ours, not a stale file), which we follow."""
        cfg = self.cfg
        assert cfg.pidfile is not None
        _orphans.enable()  # the daemon is re-parented to us, so we can reap it
        _orphans.begin_following()
        try:
            await self._await_daemon()
        finally:
            _orphans.end_following()

    async def _await_daemon(self) -> None:
        cfg = self.cfg
        assert cfg.pidfile is not None
        timeout = cfg.ready.timeout
        deadline = self.clock.now() + timeout
        expire: asyncio.Future[None] = self.loop.create_future()
        handle = self.clock.call_later(timeout, _set_done, expire)
        try:
            waiting: list[asyncio.Future[Any]] = [self.main_exit, expire]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            handle.cancel()
        if not self.main_exit.done():
            raise ReadyTimeout("pidfile: the main process did not exit", timeout)
        code = os.waitstatus_to_exitcode(self.main_exit.result())
        if code != 0:
            await self._drain_pipes()
            raise _as_exception(self._exit_reason())
        delay = 0.002
        while True:
            daemon = _read_pidfile(cfg.pidfile)
            if daemon is not None and self._own_daemon(daemon):
                break
            if self.clock.now() >= deadline:
                raise ReadyTimeout(f"pidfile {cfg.pidfile} naming a live daemon", timeout)
            await sleep_on(self.clock, delay)
            delay = min(delay * 2, 0.1)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        main = self.os_pid
        self.forking = False
        self.status = None
        self.exited = self.loop.create_future()
        self.os_pid = self.pid.os_pid = daemon
        st = _orphans.stat(daemon)
        self.sid = st[2] if st is not None else daemon
        self.pgid = st[1] if st is not None and st[1] != os.getpgrp() else None
        if self.pgid is not None:
            _guardian.register(self.pgid)
        _orphans.adopt(daemon)
        if main is not None:
            _orphans.release(main, None)
        self.pidfd = os.pidfd_open(daemon)
        self.loop.add_reader(self.pidfd, self._on_pidfd)
        _telemetry.emit(
            "process.following",
            path=self.path,
            child_id=cfg.id,
            os_pid=daemon,
            pidfile=cfg.pidfile,
        )

    def _own_daemon(self, pid: int) -> bool:
        """Whether the pidfile's ``pid`` is this child's daemon: a live process carrying
        this child's own tag. A process whose environment lost the tag (a daemon that
        rewrites its environ area for its process title, as redis does) is accepted only
        if it can be nothing else's: re-parented to us, in a session of its own, started
        after our main process, and neither a child's process nor another's tagged one.
        Never another child's main process, its descendants, or Trellis's own helpers."""
        st = _orphans.stat(pid)
        if st is None or st[0] in "ZX":
            return False
        tag = _orphans.tag_of(pid)
        if tag is not None:
            return tag == self.tag
        if _orphans.is_spawned(pid) or pid == _guardian.guardian_pid():
            return False
        if pid not in _orphans.direct_children() or st[2] == os.getsid(0):
            return False
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if _guardian.TAG_VAR.encode() + b"=" in f.read():
                    return False  # some other Trellis's, or a forged tag
        except OSError:
            return False
        started = _orphans.start_ticks(pid)
        return started is not None and self.main_start is not None and started >= self.main_start

    def _on_line(self, stream: str, line: bytes) -> None:
        self.ring.append(stream, self.os_pid, line)
        regex = self.ready_regex
        if (
            regex is not None
            and not self.ready_event.done()
            and regex.search(line.decode("utf-8", "replace"))
        ):
            self.ready_event.set_result(None)
        logs = self.cfg.logs
        if _telemetry._snapshot and (logs is None or logs.telemetry):
            _telemetry.emit(
                "process.output",
                path=self.path,
                child_id=self.cfg.id,
                os_pid=self.os_pid,
                stream=stream,
                line=line.decode("utf-8", "replace"),
            )

    def _notify_allowed(self, sender: int) -> bool:
        """Only the child's own processes may notify (systemd ``NotifyAccess=all`` with
        the child's session standing in for its cgroup): the main process, or a process
        in its session."""
        if sender == self.os_pid:
            return True
        if self.cfg.notify_access == "main":
            return False
        st = _orphans.stat(sender)
        return st is not None and self.sid is not None and st[2] == self.sid

    def _on_notify(self, fields: dict[str, str]) -> None:
        if fields.get("READY") == "1" and not self.ready_event.done():
            self.ready_event.set_result(None)
        if fields.get("WATCHDOG") == "1" and self.cfg.watchdog is not None:
            self._arm_watchdog()
        if fields.get("WATCHDOG") == "trigger":
            self._set_hung("the process triggered its watchdog")

    def _arm_watchdog(self) -> None:
        if self.watchdog_timer is not None:
            self.watchdog_timer.cancel()
        assert self.cfg.watchdog is not None
        self.watchdog_due = self.clock.now() + self.cfg.watchdog
        self.watchdog_timer = self.clock.call_later(self.cfg.watchdog, self._watchdog_expired)

    def _watchdog_expired(self) -> None:
        """The deadline passed. Heartbeats that are waiting in the socket count first
        (after a SIGSTOP/SIGCONT or a paused container the timer and the datagrams are
        ready together); and a deadline that passed while Trellis itself was not running
        (the timer fired much later than due) is not judged: the child gets one more
        full period from now."""
        wd = self.cfg.watchdog
        assert wd is not None
        timer = self.watchdog_timer
        if self.notify is not None:
            self.notify.drain()
            if self.watchdog_timer is not timer:
                return  # a WATCHDOG=1 was waiting: re-armed
        late = self.clock.now() - self.watchdog_due
        if late > min(1.0, wd / 2):
            _log.info(
                "%s: watchdog deadline passed %.1fs ago while Trellis was not running "
                "(stopped or frozen); waiting one more period",
                self.path,
                late,
            )
            self._arm_watchdog()
            return
        self._set_hung(f"no WATCHDOG=1 within {wd}s")

    def _set_hung(self, detail: str) -> None:
        if self.hung is None and self.status is None:
            self.hung = Hung(detail)
            self.pid._deliver(_HUNG)

    # -- readiness ------------------------------------------------------------------
    async def _wait_ready(self) -> None:
        ready = self.cfg.ready
        if ready.kind == "started":
            return
        deadline = self.clock.now() + ready.timeout
        if ready.kind in ("notify", "log"):
            waiter: asyncio.Future[Any] = self.ready_event
        elif ready.kind == "tcp":
            host, port = ready.target
            waiter = self.loop.create_task(self._poll(lambda: _tcp_ok(host, port, 1.0)))
        else:
            waiter = self.loop.create_task(self._poll(lambda: _http_ok(ready.target, 1.0)))
        expire: asyncio.Future[None] = self.loop.create_future()
        handle = self.clock.call_later(max(0.0, deadline - self.clock.now()), _set_done, expire)
        try:
            done, _ = await asyncio.wait(
                [waiter, self.exited, expire], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            handle.cancel()
            if waiter is not self.ready_event and not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        if waiter in done:
            return
        if self.exited in done:
            await self._drain_pipes()
            if waiter is self.ready_event and waiter.done():
                return  # it said it was ready before it exited (its pipe was read late)
            raise _as_exception(self._exit_reason())
        raise ReadyTimeout(ready.kind, ready.timeout)

    async def _poll(self, probe: Any) -> None:
        delay = 0.005
        while True:
            if await probe():
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    # -- health checks --------------------------------------------------------------
    async def _health_loop(self, health: Health) -> None:
        failures = 0
        while self.status is None:
            await sleep_on(self.clock, health.interval)
            try:
                ok = await self._check(health)
            except Exception:
                _log.exception("health check of %s failed to run", self.cfg.id)
                ok = False
            failures = 0 if ok else failures + 1
            if failures >= health.failures:
                self._set_hung(f"{failures} failed {health.kind} health checks")
                return

    async def _check(self, health: Health) -> bool:
        if health.kind == "tcp":
            host, port = health.target
            return await _tcp_ok(host, port, health.timeout)
        if health.kind == "http":
            return await _http_ok(health.target, health.timeout)
        return await self._run_check(health)

    async def _run_check(self, health: Health) -> bool:
        """A health-check command: the child's environment (not Trellis's), its user and
        cwd, its own process group (killed whole on timeout), known to the guardian."""
        self.checks += 1
        tag = f"{self.tag}.h{self.checks}"  # its own: what it leaves is found by it
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            try:
                env = self._environ()
                env[_guardian.TAG_VAR] = tag
                os_pid, popen = _spawn_os(self.cfg, health.target, env, devnull, devnull)
            except (OSError, LookupError) as e:
                _log.warning("%s: health check %s cannot run: %s", self.path, health.target, e)
                return False
        finally:
            os.close(devnull)
        _guardian.register(os_pid)
        _orphans.claim(os_pid, tag)
        loop = self.loop
        fd = os.pidfd_open(os_pid)
        done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _set_done, done)
        expire: asyncio.Future[None] = loop.create_future()
        handle = self.clock.call_later(health.timeout, _set_done, expire)
        status: int | None = None
        timed_out = True
        try:
            await asyncio.wait([done, expire], return_when=asyncio.FIRST_COMPLETED)
            timed_out = not done.done()
            # the leader is unreaped, so its group id is still ours: kill the whole group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os_pid, signal.SIGKILL)
            if timed_out:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await done
            got, st = os.waitpid(os_pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG
            if got:
                status = st
            return not timed_out and status is not None and os.waitstatus_to_exitcode(status) == 0
        finally:
            handle.cancel()
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_reader(fd)
            os.close(fd)
            if status is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(os_pid, signal.SIGKILL)
                status = _reap_blocking(os_pid)
            if popen is not None:
                popen.returncode = os.waitstatus_to_exitcode(status) if status is not None else -9
            _guardian.unregister(os_pid)
            _orphans.release(os_pid, tag)
            if timed_out:  # or cancelled
                # it ran over: what it started in sessions of its own (setsid) carries
                # its tag; kill that too, or one process per timeout would pile up
                n = _orphans.kill_tagged(tag)
                if n:
                    _log.info("%s: killed %d process(es) its health check left", self.path, n)
            else:
                _orphans.sweep()  # what it left re-parented to us carries a dead tag

    # -- stopping and exit reasons ----------------------------------------------------
    def _kill_group(self, sig: int) -> None:
        # Never signal by number once reaped: the id may belong to a new process by then.
        if self.os_pid is None or self.status is not None:
            return
        self.signalled = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.pgid is not None:
                os.killpg(self.pgid, sig)  # the child leads its own group (setsid)
            else:
                os.kill(self.os_pid, sig)  # a followed daemon in no group of its own

    async def _stop_os_process(self, sig: int) -> None:
        if self.os_pid is None or self.status is not None:
            return
        self._kill_group(sig)
        await self.exited

    async def _drain_pipes(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):
                for closed in self.pipes_closed:
                    await closed

    def _exit_reason(self) -> object:
        status = self.status
        assert status is not None
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            name = _signame(sig)
            if sig == signal.SIGXCPU:
                return LimitExceeded("cpu", name)
            if sig == signal.SIGXFSZ:
                return LimitExceeded("file_size", name)
            return self._limit_from_output() or Signaled(name)
        code = os.waitstatus_to_exitcode(status)
        if code == 0:
            return NORMAL
        return self._limit_from_output() or ExitCode(code)

    def _limit_from_output(self) -> LimitExceeded | None:
        """With limits set, recognise the common messages of a process that hit one."""
        limits = self.cfg.limits
        if limits is None:
            return None
        tail = b"\n".join(line for p in self.protocols for line in p.tail)
        if limits.memory is not None and re.search(_MEMORY_ERRORS, tail):
            return LimitExceeded("memory", f"address space limit {limits.memory} bytes")
        if limits.open_files is not None and re.search(_FILE_ERRORS, tail):
            return LimitExceeded("open_files", f"limit {limits.open_files}")
        return None

    def _cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        if self.status is None and self.os_pid is not None:
            # still running (killed owner, or a failed start): SIGKILL the group and reap
            self._kill_group(signal.SIGKILL)
            status = _reap_blocking(self.os_pid)
            if status is not None:
                self._reaped(status)
        if self.watchdog_timer is not None:
            self.watchdog_timer.cancel()
        if self.health_task is not None:
            self.health_task.cancel()
        if self.pidfd is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        if self.notify is not None:
            self.notify.close()
        if self.os_pid is not None:
            _orphans.release(self.os_pid, self.tag)
            _orphans.sweep()
        # The pipes reach EOF on their own now that the group is dead, delivering the
        # last lines and closing the log files; a grandchild that escaped the group could
        # hold them open, so close them anyway after a while.
        # Most often the pipes are at EOF already: read what is left now, so the
        # transports are closed even if the loop stops right after (no leaked pipes).
        for fd, t, proto in zip(self.pipe_fds, self.transports, self.protocols, strict=False):
            if not t.is_closing() and not _drain_now(fd, t, proto):
                self.loop.call_later(5.0, t.close)
        if self.os_pid is not None:
            _telemetry.emit(
                "process.exited",
                path=self.path,
                child_id=self.cfg.id,
                os_pid=self.os_pid,
                status=self.status,
            )


def _drain_now(fd: int, transport: Any, proto: LineProtocol) -> bool:
    """Read what is left in a child's pipe; True (and the transport closed) at EOF, False
    while a writer (an escaped descendant) still holds it."""
    if isinstance(transport, _PendingTransport):
        return False
    try:
        for _ in range(64):  # at most 4 MiB here; the rest through the loop
            data = os.read(fd, 65536)
            if not data:
                proto.eof_received()
                transport.close()
                return True
            proto.data_received(data)
    except OSError:  # BlockingIOError: not at EOF yet
        return False
    return False


class _PendingTransport:
    """Stands in for a read transport that another event loop still has to connect."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connecting: Any) -> None:
        self._task = loop.create_task(connecting)
        self._closing = False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        if self._task.done() and not self._task.cancelled() and self._task.exception() is None:
            self._task.result()[0].close()
        else:
            self._task.add_done_callback(
                lambda t: t.cancelled() or t.exception() or t.result()[0].close()
            )


_which_cache: dict[tuple[str, str], str] = {}


def _which(exe: str, path: str) -> str:
    """Resolve ``exe`` on ``path`` (cached) or check that an explicit path is executable."""
    if os.sep in exe:
        if not os.access(exe, os.X_OK):
            raise PermissionError(f"not executable: {exe!r}")
        return exe
    key = (exe, path)
    found = _which_cache.get(key)
    if found is not None and os.access(found, os.X_OK):
        return found
    for folder in path.split(os.pathsep):
        candidate = os.path.join(folder or ".", exe)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            _which_cache[key] = candidate
            return candidate
    raise FileNotFoundError(f"executable not found: {exe!r}")


class _Marker:
    __slots__ = ("name",)
    _trellis_system = True

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_EXITED = _Marker("os process exited")
_HUNG = _Marker("os process hung")


def _as_exception(reason: object) -> BaseException:
    if isinstance(reason, BaseException):
        return reason
    return ExitCode(0)  # exited cleanly before it was ready


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _reap_blocking(os_pid: int, limit: float = 2.0) -> int | None:
    """Reap a SIGKILLed process; a few milliseconds at most unless it is stuck in the kernel."""
    deadline = time.monotonic() + limit
    delay = 0.0005
    while True:
        try:
            got, status = os.waitpid(os_pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if got:
            return status
        if time.monotonic() > deadline:
            _log.error("OS process %d did not die after SIGKILL", os_pid)
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _passwd(user: str | int) -> Any:
    import pwd

    try:
        return pwd.getpwnam(user) if isinstance(user, str) else pwd.getpwuid(user)
    except KeyError:
        raise LookupError(f"unknown user {user!r}") from None


def _user_env(user: str | int) -> dict[str, str]:
    """What systemd ``User=`` sets: HOME, USER, LOGNAME, SHELL from the passwd entry."""
    pw = _passwd(user)
    return {
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "SHELL": pw.pw_shell or "/bin/sh",
    }


def _spawn_os(
    cfg: _Config, argv: Sequence[str], env: dict[str, str], out_fd: int, err_fd: int
) -> tuple[int, subprocess.Popen[bytes] | None]:
    """Spawn ``argv`` in its own session with ``cfg``'s cwd, user and limits."""
    exe = _which(argv[0], env.get("PATH", os.defpath))
    if cfg.cwd is None and cfg.user is None and cfg.limits is None:
        # posix_spawn returns once the child has exec'd (vfork): ~0.1 ms
        os_pid = os.posix_spawn(
            exe,
            list(argv),
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_fd, 1),
                (os.POSIX_SPAWN_DUP2, err_fd, 2),
            ],
            setsid=True,
        )
        return os_pid, None
    # cwd/user/limits need a fork with a pre-exec step (a few ms)
    import subprocess  # only this path needs it

    ids: dict[str, Any] = {}
    if cfg.user is not None:
        pw = _passwd(cfg.user)
        ids["user"] = pw.pw_uid
        if os.geteuid() == 0:  # the user's group and supplementary groups (initgroups)
            ids["group"] = pw.pw_gid
            ids["extra_groups"] = os.getgrouplist(pw.pw_name, pw.pw_gid)
    popen = subprocess.Popen(
        [exe, *argv[1:]],
        env=env,
        cwd=cfg.cwd,
        stdin=subprocess.DEVNULL,
        stdout=out_fd,
        stderr=err_fd,
        start_new_session=True,
        preexec_fn=_rlimits(cfg.limits) if cfg.limits is not None else None,
        **ids,
    )
    return popen.pid, popen


def _read_pidfile(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read(64).strip()
    except OSError:
        return None
    try:
        pid = int(text.split()[0]) if text else 0
    except ValueError:
        return None
    return pid if pid > 1 else None


def _rlimits(limits: Limits) -> Any:
    import resource

    pairs = []
    if limits.memory is not None:
        pairs.append((resource.RLIMIT_AS, limits.memory))
    if limits.open_files is not None:
        pairs.append((resource.RLIMIT_NOFILE, limits.open_files))
    if limits.cpu is not None:
        pairs.append((resource.RLIMIT_CPU, limits.cpu))

    def apply() -> None:  # runs in the child between fork and exec
        for res, value in pairs:
            hard = value + 1 if res == resource.RLIMIT_CPU else value  # SIGXCPU before SIGKILL
            resource.setrlimit(res, (value, hard))

    return apply


async def _tcp_ok(host: str, port: int, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _http_ok(url: str, timeout: float) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(
                    f"GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    fields = status_line.split()
    return len(fields) >= 2 and fields[1][:1] == b"2"

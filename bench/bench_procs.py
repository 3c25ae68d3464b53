#!/usr/bin/env python
"""OS-process supervision: Trellis against supervisord, circus, PM2, runit and s6, in one run.

Run from the repository root (root needed only to apt-get the Debian peers):

    .venv/bin/python bench/bench_procs.py            # full run (~15 min)
    .venv/bin/python bench/bench_procs.py --quick    # smoke run (~3 min): idle 5 s, 10 kills

Every peer supervises the same 50 programs: copies of one tiny C program (compiled here into a
temporary directory, never committed) that reports its own start to the bench and then sleeps
in ``pause()``. Per peer: cold start (launch -> all 50 running), idle CPU of the supervisor's
process tree, and restart latency after ``kill -9`` of a child. Peers that are not installed
are installed by this script: ``supervisor``, ``runit`` and ``s6`` with apt-get; circus into a
throwaway venv and PM2 into a throwaway npm prefix under /tmp (never project dependencies).
See bench/README.md ("OS-process supervisors") for the method and each peer's settings.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SRC = REPO / "src"
RESULTS_DIR = HERE / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
now_ns = time.monotonic_ns  # CLOCK_MONOTONIC: the same clock the C program stamps with

TARGETS = {"restart_ms": 2.0, "idle_cpu_s_per_60s": 0.01, "cold_start_s": 0.08}

# The supervised program. argv: NAME NOTIFY_FIFO [READY_FD]. At the top of main() it stamps
# CLOCK_MONOTONIC and writes "NAME PID NS\n" to the bench's FIFO (one write < PIPE_BUF is
# atomic; O_NONBLOCK so it never blocks or fails the program when the bench is gone). With
# READY_FD (s6 notification-fd) it writes "\n" there. Then it sleeps until killed.
C_SOURCE = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    if (argc > 2) {
        char buf[200];
        int n = snprintf(buf, sizeof buf, "%s %d %lld\n", argv[1], (int)getpid(),
                         (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
        int fd = open(argv[2], O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd >= 0) {
            if (write(fd, buf, (size_t)n) < 0) { /* the bench is gone: keep running */ }
            close(fd);
        }
    }
    if (argc > 3) {
        int rfd = atoi(argv[3]);
        if (write(rfd, "\n", 1) < 0) { /* not supervised by s6: ignore */ }
        close(rfd);
    }
    for (;;)
        pause();
}
"""

# Trellis runs as a program of its own: this runner (written to the temp dir) imports trellis
# from the checkout's src/ and runs a one_for_one Supervisor of N Command children. It reports
# when the interpreter is up, when trellis is imported and when trellis.run() is entered, on
# the same FIFO, so the bench can split the cold start. With a trace path it also records
# every child.* telemetry event with CLOCK_MONOTONIC and writes them when run() returns.
RUNNER = r"""
import os, sys, time
T0 = time.monotonic_ns()
src, prog, fifo, n, trace = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]


def note(tag, t):
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.write(fd, f"{tag} {os.getpid()} {t}\n".encode())
    finally:
        os.close(fd)


note("@interpreter", T0)
sys.path.insert(0, src)
import trellis  # noqa: E402

note("@imported", time.monotonic_ns())
events = []
if trace:
    mono = time.monotonic_ns

    def handler(event):
        events.append((mono(), event["event"], str(event.get("child_id")), repr(event.get("reason"))))

    trellis.telemetry.attach(handler)


class Root(trellis.Supervisor):
    async def init(self):
        children = [
            trellis.Command([prog, f"prog-{i}", fifo], id=f"p{i}", ready=trellis.Ready.started())
            for i in range(n)
        ]
        return trellis.SupervisorSpec(children, strategy="one_for_one", intensity=1_000_000, period=1.0)


note("@run", time.monotonic_ns())
rc = trellis.run(Root, loop=os.environ.get("TRELLIS_LOOP", "asyncio"))
if trace:
    import json
    with open(trace, "w") as f:
        json.dump(events, f)
sys.exit(rc)
"""

# A reference point, not a peer: the least a Python supervisor must do. Plain asyncio, no
# framework: posix_spawn (setsid) each program, watch it with a pidfd in the event loop, and on
# exit reap it and spawn it again at once. No intensity, no events, no logging.
FLOOR = r"""
import asyncio, os, signal, sys
prog, fifo, n = sys.argv[1], sys.argv[2], int(sys.argv[3])


async def main():
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    procs = {}

    def spawn(i):
        pid = os.posix_spawn(prog, [prog, f"prog-{i}", fifo], os.environ, setsid=True)
        fd = os.pidfd_open(pid)
        procs[i] = (pid, fd)
        loop.add_reader(fd, exited, i)

    def exited(i):
        pid, fd = procs.pop(i)
        loop.remove_reader(fd)
        os.close(fd)
        os.waitpid(pid, 0)
        if not stop.is_set():
            spawn(i)

    for i in range(n):
        spawn(i)
    await stop.wait()
    for pid, fd in list(procs.values()):
        os.kill(pid, signal.SIGTERM)
    for pid, fd in list(procs.values()):
        os.waitpid(pid, 0)


if os.environ.get("TRELLIS_LOOP") == "uvloop":
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
else:
    asyncio.run(main())
"""

# --------------------------------------------------------------------------------------------
# /proc helpers


@dataclass
class ProcInfo:
    pid: int
    ppid: int
    sid: int
    cmdline: bytes
    state: str


def read_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    # comm may contain spaces and parentheses: fields start after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def proc_table() -> dict[int, ProcInfo]:
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        st = read_stat(pid)
        if st is None:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            cmd = b""
        # st[0] = state, st[1] = ppid, st[2] = pgrp, st[3] = session
        table[pid] = ProcInfo(pid, int(st[1]), int(st[3]), cmd, st[0])
    return table


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def cwd_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def cpu_snapshot(pids: list[int]) -> dict[int, tuple[int, int]]:
    """pid -> (utime+stime in clock ticks, sum of its threads' sched runtime in ns)."""
    snap = {}
    for pid in pids:
        st = read_stat(pid)
        if st is None:
            continue
        ticks = int(st[11]) + int(st[12])  # utime, stime (fields 14 and 15)
        ns = 0
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ns += int(f.read().split()[0])
        snap[pid] = (ticks, ns)
    return snap


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    total = sum(vals[:8])  # user nice system idle iowait irq softirq steal
    return total - vals[3] - vals[4], total


def busy_pct(a: tuple[int, int], b: tuple[int, int]) -> float:
    return 100.0 * (b[0] - a[0]) / max(1, b[1] - a[1])


def descendants(roots: list[int], table: dict[int, ProcInfo]) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


# --------------------------------------------------------------------------------------------
# The bench's side of the start notifications


class Notifications:
    """Reads "NAME PID NS" lines from the FIFO the programs (and the Trellis runner) write."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path, 0o600)
        self.path = path
        self.rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.keep = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # no EOF while we live
        self.buf = b""
        self.poll = select.poll()
        self.poll.register(self.rfd, select.POLLIN)

    def read(self, timeout: float) -> list[tuple[str, int, int]]:
        """Lines available within ``timeout`` seconds (all that are queued, at least one
        unless the timeout passed)."""
        out: list[tuple[str, int, int]] = []
        if not self.poll.poll(max(0, int(timeout * 1000))):
            return out
        while True:
            try:
                chunk = os.read(self.rfd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            name, pid, ns = line.decode().split()
            out.append((name, int(pid), int(ns)))
        return out

    def drain(self) -> list[tuple[str, int, int]]:
        out = []
        while batch := self.read(0):
            out.extend(batch)
        return out

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.keep)


# --------------------------------------------------------------------------------------------
# Peers


@dataclass
class Ctx:
    root: Path  # the bench's temp dir; every process with it in argv/cwd is ours
    prog: Path
    fifo: Path
    n: int
    peers_dir: Path
    trace: bool
    loop: str = "asyncio"  # the Python supervisors' event loop (trellis, trellis-toml, floor)


def run_cmd(argv: list[str], **kw: Any) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    return (out.stdout + out.stderr).strip()


class Peer:
    key = ""
    label = ""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_dir = ctx.root
        self.t_launch = 0
        self.sids: set[int] = set()

    # what the peer needs, and how it is set up
    def missing(self) -> str | None:
        return None

    def version(self) -> str:
        return "?"

    def settings(self) -> dict[str, str]:
        return {}

    def prepare(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("PM2")}

    def launch(self) -> None:
        log = open(self.run_dir / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.t_launch = now_ns()
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.run_dir,
            env=self.env(),
            start_new_session=True,
        )
        self.sids.add(self.proc.pid)

    def roots(self) -> list[int]:
        """The supervisor processes whose tree's CPU time is the idle figure."""
        assert self.proc is not None
        return [self.proc.pid]

    def graceful_stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_daemon(self, timeout: float) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class Supervisord(Peer):
    key, label = "supervisord", "supervisord"

    def missing(self) -> str | None:
        return None if shutil.which("supervisord") else "supervisord not installed"

    def version(self) -> str:
        return run_cmd(["supervisord", "--version"]) + f" (Debian {dpkg_version('supervisor')})"

    def settings(self) -> dict[str, str]:
        return {
            "program": "autostart=true autorestart=true startsecs=0 startretries=1000000 "
            "stdout/stderr_logfile=NONE stopsignal=TERM stopwaitsecs=5",
            "supervisord": "nodaemon=true loglevel=warn, unix_http_server on a socket in the temp dir",
            "lowest restart delay": "none configurable: startsecs=0 is the minimum; the restart "
            "waits for supervisord's 1 s poll (see README)",
        }

    def prepare(self, run_dir: Path) -> None:
        super().prepare(run_dir)
        d, c = run_dir, self.ctx
        conf = [
            "[unix_http_server]",
            f"file = {d}/supervisor.sock",
            "[supervisord]",
            "nodaemon = true",
            f"logfile = {d}/supervisord.log",
            f"pidfile = {d}/supervisord.pid",
            f"childlogdir = {d}",
            "loglevel = warn",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "[supervisorctl]",
            f"serverurl = unix://{d}/supervisor.sock",
        ]
        for i in range(c.n):
            conf += [
                f"[program:prog-{i}]",
                f"command = {c.prog} prog-{i} {c.fifo}",
                "autostart = true",
                "autorestart = true",
                "startsecs = 0",
                "startretries = 1000000",
                "stdout_logfile = NONE",
                "stderr_logfile = NONE",
                "stopsignal = TERM",
                "stopwaitsecs = 5",
            ]
        (d / "supervisord.conf").write_text("\n".join(conf) + "\n")

    def argv(self) -> list[str]:
        return ["supervisord", "-n", "-c", str(self.run_dir / "supervisord.conf")]


class Circus(Peer):
    key, label = "circus", "circus (check_delay 0.1 s)"
    check_delay = 0.1

    @property
    def venv(self) -> Path:
        return self.ctx.peers_dir / "circus-venv"

    def missing(self) -> str | None:
        return None if (self.venv / "bin" / "circusd").exists() else "circus venv missing"

    def version(self) -> str:
        py = str(self.venv / "bin" / "python")
        v = run_cmd([py, "-c", "import circus, zmq; print(circus.__version__, zmq.__version__)"])
        circus_v, _, zmq_v = v.partition(" ")
        return f"circus {circus_v} (pyzmq {zmq_v}, {run_cmd([py, '--version'])})"

    def settings(self) -> dict[str, str]:
        return {
            "circus": f"check_delay={self.check_delay} (default 5.0; circus reaps and respawns "
            "only from this periodic check), statsd=false (no circusd-stats), httpd=false, "
            "multicast_endpoint empty (no UDP discovery socket), ipc:// endpoints in the temp dir",
            "watcher": "numprocesses=1 respawn=true warmup_delay=0 check_flapping=false",
        }

    def prepare(self, run_dir: Path) -> None:
        super().prepare(run_dir)
        d, c = run_dir, self.ctx
        conf = [
            "[circus]",
            f"check_delay = {self.check_delay}",
            f"endpoint = ipc://{d}/endpoint",
            f"pubsub_endpoint = ipc://{d}/pubsub",
            # no stats_endpoint: setting one forces statsd on (a circusd-stats poller process)
            "statsd = false",
            "multicast_endpoint = ",  # default: joins a UDP multicast group for discovery
            "httpd = false",
            "loglevel = WARNING",
            f"logoutput = {d}/circusd.log",
            f"pidfile = {d}/circusd.pid",
        ]
        for i in range(c.n):
            conf += [
                f"[watcher:prog-{i}]",
                f"cmd = {c.prog}",
                f"args = prog-{i} {c.fifo}",
                "numprocesses = 1",
                "respawn = true",
                "warmup_delay = 0",
                "check_flapping = false",
            ]
        (d / "circus.ini").write_text("\n".join(conf) + "\n")

    def argv(self) -> list[str]:
        return [str(self.venv / "bin" / "circusd"), str(self.run_dir / "circus.ini")]


class CircusDefault(Circus):
    key, label = "circus-default", "circus (default check_delay 5 s)"
    check_delay = 5.0


class PM2(Peer):
    key, label = "pm2", "PM2"

    @property
    def bin(self) -> Path:
        return self.ctx.peers_dir / "pm2" / "node_modules" / ".bin" / "pm2"

    def missing(self) -> str | None:
        if not shutil.which("node"):
            return "node not installed"
        return None if self.bin.exists() else "pm2 not installed"

    def version(self) -> str:
        pkg = self.ctx.peers_dir / "pm2" / "node_modules" / "pm2" / "package.json"
        v = json.loads(pkg.read_text())["version"]  # `pm2 --version` would start a daemon
        return f"PM2 {v} (node {run_cmd(['node', '--version'])})"

    def settings(self) -> dict[str, str]:
        return {
            "app": "interpreter=none exec_mode=fork autorestart=true restart_delay=0 "
            "min_uptime=100 max_restarts=1000000 vizion=false pmx=false "
            "out/error_file=/dev/null",
            "daemon": "PM2_HOME in the temp dir; started by `pm2 start apps.json`, "
            "stopped with `pm2 kill`",
        }

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PM2_HOME"] = str(self.run_dir / "pm2home")
        return env

    def prepare(self, run_dir: Path) -> None:
        super().prepare(run_dir)
        c = self.ctx
        apps = [
            {
                "name": f"prog-{i}",
                "script": str(c.prog),
                "args": [f"prog-{i}", str(c.fifo)],
                "interpreter": "none",
                "exec_mode": "fork",
                "autorestart": True,
                "restart_delay": 0,
                "min_uptime": 100,
                "max_restarts": 1_000_000,
                "vizion": False,
                "pmx": False,
                "watch": False,
                "out_file": "/dev/null",
                "error_file": "/dev/null",
            }
            for i in range(c.n)
        ]
        (run_dir / "apps.json").write_text(json.dumps({"apps": apps}, indent=1))

    def argv(self) -> list[str]:
        return [str(self.bin), "start", str(self.run_dir / "apps.json")]

    def daemon_pid(self) -> int | None:
        try:
            return int((self.run_dir / "pm2home" / "pm2.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def roots(self) -> list[int]:
        pid = self.daemon_pid()
        return [pid] if pid else []

    def graceful_stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)  # the `pm2 start` CLI
        subprocess.run(
            [str(self.bin), "kill"],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )


class Runit(Peer):
    key, label = "runit", "runit"

    def missing(self) -> str | None:
        return None if shutil.which("runsvdir") else "runit not installed"

    def version(self) -> str:
        return f"runit {dpkg_version('runit')} (Debian)"

    def settings(self) -> dict[str, str]:
        return {
            "runsvdir": "default (`runsvdir DIR`), one service dir per program",
            "run": "#!/bin/sh + exec PROG prog-N FIFO (the usual run script)",
            "restart delay": "none configurable; runsv waits 1 s only if the service ran < 1 s "
            "(the bench only kills programs that have been up >= 1.5 s)",
            "stop": "SIGHUP to runsvdir (TERM to each runsv, which stops its service)",
        }

    def prepare(self, run_dir: Path) -> None:
        super().prepare(run_dir)
        write_service_dirs(run_dir / "sv", self.ctx, ready_fd=None)

    def argv(self) -> list[str]:
        return ["runsvdir", str(self.run_dir / "sv")]

    def graceful_stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)


class S6(Peer):
    key, label = "s6", "s6 (default)"
    ready_fd: int | None = None

    def missing(self) -> str | None:
        return None if shutil.which("s6-svscan") else "s6 not installed"

    def version(self) -> str:
        return f"s6 {dpkg_version('s6')} (Debian)"

    def settings(self) -> dict[str, str]:
        s = {
            "s6-svscan": "default (`s6-svscan DIR`), one service dir per program",
            "run": "#!/bin/sh + exec PROG prog-N FIFO (the usual run script)",
            "restart delay": "none configurable; s6-supervise waits until 1 s after the "
            "service was last started or became ready",
            "stop": "SIGTERM to s6-svscan",
        }
        if self.ready_fd is not None:
            s["readiness"] = (
                f"notification-fd={self.ready_fd}; the program writes a newline to fd "
                f"{self.ready_fd} at start"
            )
        return s

    def prepare(self, run_dir: Path) -> None:
        super().prepare(run_dir)
        write_service_dirs(run_dir / "s6", self.ctx, ready_fd=self.ready_fd)

    def argv(self) -> list[str]:
        return ["s6-svscan", str(self.run_dir / "s6")]


class S6Ready(S6):
    key, label = "s6-ready", "s6 (notification-fd)"
    ready_fd = 3


def src_digest() -> str:
    """Digest of src/trellis/**/*.py: the code a Trellis start imports (it may be edited while
    the bench runs; every Trellis launch records it)."""
    h = hashlib.sha1()
    for f in sorted((SRC / "trellis").rglob("*.py")):
        h.update(str(f.relative_to(SRC)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


SRC_DIGESTS: set[str] = set()


def python_env(ctx: Ctx) -> dict[str, str]:
    """Environment for the Python supervisors we launch: byte-code caching on (as in a
    deployment: pip compiles on install), with the caches in the temp dir, not the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(ctx.root / "pycache")
    env["TRELLIS_LOOP"] = ctx.loop  # read by trellis run, runner.py and floor.py
    return env


def warm_pycache(ctx: Ctx, modules: str) -> None:
    """Compile once, untimed, so no measured start pays for compiling trellis."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, sys.argv[1]); import {modules}",
            str(SRC),
        ],
        env=python_env(ctx),
        check=False,
        capture_output=True,
    )


class Trellis(Peer):
    key, label = "trellis", "Trellis (Python runner)"
    warm_modules = "asyncio, trellis"

    def launch(self) -> None:
        SRC_DIGESTS.add(src_digest())
        super().launch()

    def env(self) -> dict[str, str]:
        return python_env(self.ctx)

    def missing(self) -> str | None:
        out = run_cmd(
            [
                sys.executable,
                "-c",
                "import sys; sys.path.insert(0, sys.argv[1]); import trellis; "
                "trellis.Command, trellis.Ready.started, trellis.SupervisorSpec, trellis.run",
                str(SRC),
            ]
        )
        return f"trellis.Command not available: {out.splitlines()[-1]}" if out else None

    def version(self) -> str:
        v = run_cmd(
            [
                sys.executable,
                "-c",
                "import sys; sys.path.insert(0, sys.argv[1]); import trellis; "
                "print(getattr(trellis, '__version__', '?'))",
                str(SRC),
            ]
        )
        rev = run_cmd(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
        return (
            f"trellis {v} ({rev}, src {src_digest()}), Python {platform.python_version()}, "
            f"loop {self.ctx.loop}"
        )

    def settings(self) -> dict[str, str]:
        return {
            "tree": "trellis.run(Root): Supervisor one_for_one, intensity=1000000, period=1.0, "
            f"{self.ctx.n} x trellis.Command([PROG, 'prog-N', FIFO], id='pN', "
            "ready=trellis.Ready.started()); restart=permanent, backoff=None (defaults)",
            "process": f"{sys.executable} runner.py (imports trellis from {SRC})",
        }

    def prepare(self, run_dir: Path) -> None:
        super().prepare(run_dir)
        (self.ctx.root / "runner.py").write_text(RUNNER)
        warm_pycache(self.ctx, self.warm_modules)

    def argv(self) -> list[str]:
        trace = str(self.run_dir / "trace.json") if self.ctx.trace else ""
        return [
            sys.executable,
            str(self.ctx.root / "runner.py"),
            str(SRC),
            str(self.ctx.prog),
            str(self.ctx.fifo),
            str(self.ctx.n),
            trace,
        ]


class TrellisToml(Trellis):
    key, label = "trellis-toml", "Trellis (`trellis run tree.toml`)"
    warm_modules = "asyncio, trellis, trellis.config, trellis.cli"

    def missing(self) -> str | None:
        if err := super().missing():
            return err
        out = run_cmd(
            [
                sys.executable,
                "-c",
                "import sys; sys.path.insert(0, sys.argv[1]); import trellis.config, "
                "trellis.cli; trellis.config.load",
                str(SRC),
            ]
        )
        return f"trellis.config / CLI not available: {out.splitlines()[-1]}" if out else None

    def settings(self) -> dict[str, str]:
        return {
            "tree": f"tree.toml: one_for_one, intensity=1000000, period=1.0, {self.ctx.n} "
            "children with command=[PROG, 'prog-N', FIFO], ready='started'",
            "process": f"PYTHONPATH={SRC} {sys.executable} -m trellis run tree.toml "
            "--log-level warning",
        }

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = str(SRC)
        return env

    def prepare(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        warm_pycache(self.ctx, self.warm_modules)
        c = self.ctx
        lines = [
            "[supervisor]",
            'name = "bench"',
            'strategy = "one_for_one"',
            "intensity = 1000000",
            "period = 1.0",
        ]
        for i in range(c.n):
            lines += [
                "",
                "[[supervisor.children]]",
                f'id = "p{i}"',
                f"command = {json.dumps([str(c.prog), f'prog-{i}', str(c.fifo)])}",
                'ready = "started"',
            ]
        (run_dir / "tree.toml").write_text("\n".join(lines) + "\n")

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "trellis",
            "run",
            str(self.run_dir / "tree.toml"),
            "--log-level",
            "warning",
        ]


class Floor(Peer):
    key, label = "floor", "*asyncio floor (posix_spawn + pidfd)*"

    def version(self) -> str:
        return (
            f"plain asyncio, Python {platform.python_version()}, loop {self.ctx.loop} "
            "(reference, not a peer)"
        )

    def settings(self) -> dict[str, str]:
        return {
            "floor": "os.posix_spawn(setsid=True) + os.pidfd_open + loop.add_reader; on exit "
            "waitpid and spawn again at once; no framework, no intensity, no events",
        }

    def env(self) -> dict[str, str]:
        return python_env(self.ctx)

    def prepare(self, run_dir: Path) -> None:
        super().prepare(run_dir)
        (self.ctx.root / "floor.py").write_text(FLOOR)
        warm_pycache(self.ctx, "asyncio")

    def argv(self) -> list[str]:
        c = self.ctx
        return [sys.executable, str(c.root / "floor.py"), str(c.prog), str(c.fifo), str(c.n)]


PEERS: list[type[Peer]] = [
    Trellis,
    TrellisToml,
    Floor,
    Supervisord,
    Circus,
    CircusDefault,
    PM2,
    Runit,
    S6,
    S6Ready,
]


def write_service_dirs(base: Path, ctx: Ctx, ready_fd: int | None) -> None:
    base.mkdir()
    for i in range(ctx.n):
        sd = base / f"prog-{i}"
        sd.mkdir()
        extra = f" {ready_fd}" if ready_fd is not None else ""
        run = sd / "run"
        run.write_text(f"#!/bin/sh\nexec {ctx.prog} prog-{i} {ctx.fifo}{extra}\n")
        run.chmod(0o755)
        if ready_fd is not None:
            (sd / "notification-fd").write_text(f"{ready_fd}\n")


def dpkg_version(pkg: str) -> str:
    return run_cmd(["dpkg-query", "-W", "-f", "${Version}", pkg]) or "?"


# --------------------------------------------------------------------------------------------
# Installing the peers (benchmark-only tools, never project dependencies)


def install_peers(peers_dir: Path, wanted: set[str]) -> None:
    debs = {"supervisord": "supervisor", "runsvdir": "runit", "s6-svscan": "s6"}
    need = [pkg for binary, pkg in debs.items() if not shutil.which(binary)]
    if need and wanted & {"supervisord", "runit", "s6", "s6-ready"}:
        if not shutil.which("apt-get"):
            print(f"cannot install {need}: no apt-get")
        else:
            print(f"installing Debian packages {need} (apt-get)...", flush=True)
            if not Path("/usr/sbin/policy-rc.d").exists():
                print(
                    "  note: no /usr/sbin/policy-rc.d, so the packages' own system services "
                    "may be started by their postinst; this bench never uses them"
                )
            subprocess.run(["apt-get", "update", "-q"], check=False, stdout=subprocess.DEVNULL)
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *need],
                check=False,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
    venv = peers_dir / "circus-venv"
    if wanted & {"circus", "circus-default"} and not (venv / "bin" / "circusd").exists():
        print(f"installing circus into a throwaway venv {venv}...", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "circus"],
            check=False,
            stdout=subprocess.DEVNULL,
        )
    prefix = peers_dir / "pm2"
    if "pm2" in wanted and shutil.which("npm") and not (prefix / "node_modules/.bin/pm2").exists():
        print(f"installing PM2 into a throwaway npm prefix {prefix}...", flush=True)
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "pm2"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def compile_prog(root: Path) -> Path:
    src = root / "prog.c"
    src.write_text(C_SOURCE)
    prog = root / "prog"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(prog), str(src)], check=True)
    return prog


# --------------------------------------------------------------------------------------------
# Measurement


class Failure(Exception):
    pass


@dataclass
class Live:
    """What the bench knows of the running programs, from their notifications."""

    pid: dict[str, int] = field(default_factory=dict)
    started: dict[str, int] = field(default_factory=dict)  # ns, CLOCK_MONOTONIC
    runner: dict[str, int] = field(default_factory=dict)  # Trellis runner phases
    starts: int = 0
    #: CPU time (s, threads' schedstat) of the launched process when the last program was
    #: seen up: the start's cost on a shared machine, where wall time includes waiting
    cpu_at_up_s: float | None = None

    def add(self, batch: list[tuple[str, int, int]]) -> None:
        for name, pid, ns in batch:
            if name.startswith("@"):
                self.runner[name] = ns
                continue
            self.starts += 1
            self.pid[name] = pid
            self.started[name] = ns


def expect_cmd(ctx: Ctx, name: str) -> bytes:
    return b"\0".join([str(ctx.prog).encode(), name.encode(), str(ctx.fifo).encode()])


def alive_check(ctx: Ctx, live: Live) -> list[str]:
    """Names whose last notified pid is not alive with the expected argv (by /proc)."""
    bad = []
    for name, pid in live.pid.items():
        if not cmdline(pid).startswith(expect_cmd(ctx, name)):
            bad.append(name)
    return bad


def proc_scan_programs(ctx: Ctx) -> dict[str, int]:
    """Programs alive by a full /proc scan: name -> pid."""
    found = {}
    prefix = str(ctx.prog).encode() + b"\0"
    for p in proc_table().values():
        if p.cmdline.startswith(prefix):
            found[p.cmdline.split(b"\0")[1].decode()] = p.pid
    return found


def ours(ctx: Ctx, sids: set[int]) -> list[int]:
    """Every process belonging to this bench run: the temp dir in its argv or cwd, or in the
    session of a daemon we launched. Never the bench itself."""
    me = os.getpid()
    root_b = str(ctx.root).encode()
    root_s = str(ctx.root)
    out = []
    for p in proc_table().values():
        if p.pid == me or p.state == "Z":  # zombies are gone, just not reaped yet
            continue
        if root_b in p.cmdline or p.sid in sids or cwd_of(p.pid).startswith(root_s):
            out.append(p.pid)
    return out


def sweep(ctx: Ctx, sids: set[int]) -> int:
    """SIGKILL whatever is left; return how many were left."""
    left = ours(ctx, sids)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while ours(ctx, sids) and time.monotonic() < deadline:
        time.sleep(0.02)
    still = ours(ctx, sids)
    if still:
        raise Failure(f"could not clean up processes {still}")
    return len(left)


def start_and_wait(peer: Peer, notes: Notifications, timeout: float) -> tuple[Live, float]:
    ctx = peer.ctx
    notes.drain()
    live = Live()
    peer.launch()
    deadline = time.monotonic() + timeout
    while len(live.pid) < ctx.n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure(f"only {len(live.pid)}/{ctx.n} programs started within {timeout} s")
        live.add(notes.read(left))
    if peer.proc is not None:
        snap = cpu_snapshot([peer.proc.pid]).get(peer.proc.pid)
        live.cpu_at_up_s = snap[1] / 1e9 if snap is not None else None
    cold = (max(live.started.values()) - peer.t_launch) / 1e9
    return live, cold


def python_startup(ctx: Ctx, runs: int = 15) -> dict[str, float]:
    """``python -c pass`` in the environment of the Python supervisors: medians of wall
    time and CPU time (user+sys, from the rusage of the exited process), the reference
    for what any Python supervisor pays before its first line."""
    walls, cpus = [], []
    for _ in range(runs):
        t0 = now_ns()
        proc = subprocess.Popen([sys.executable, "-c", "pass"], env=python_env(ctx))
        _, _, ru = os.wait4(proc.pid, 0)
        walls.append((now_ns() - t0) / 1e9)
        cpus.append(ru.ru_utime + ru.ru_stime)
        proc.returncode = 0  # reaped above
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "n": runs}


def stop_peer(peer: Peer, notes: Notifications) -> dict[str, Any]:
    t0 = time.monotonic()
    err = None
    try:
        peer.graceful_stop()
    except Exception as exc:  # keep cleaning up
        err = f"{type(exc).__name__}: {exc}"
    # wait for every program and supervisor process to go (graceful), up to 15 s
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if peer.proc is not None:
            peer.proc.poll()  # reap the daemon when it exits
        if not ours(peer.ctx, peer.sids):
            break
        time.sleep(0.02)
    graceful_s = time.monotonic() - t0
    peer.wait_daemon(1)
    left = sweep(peer.ctx, peer.sids)
    peer.close()
    notes.drain()
    return {"stop_s": graceful_s, "killed_after_stop": left, "stop_error": err}


def measure_idle(peer: Peer, ctx: Ctx, live: Live, notes: Notifications, seconds: float) -> dict:
    table = proc_table()
    progs = set(live.pid.values())
    tree = [p for p in descendants(peer.roots(), table) if p not in progs]
    if not tree:
        raise Failure("no supervisor process found for the idle measurement")
    m0 = machine_cpu()
    before = cpu_snapshot(tree)
    time.sleep(seconds)
    after = cpu_snapshot(tree)
    m1 = machine_cpu()
    restarts = notes.drain()
    live.add(restarts)
    ticks = sum(after[p][0] - before[p][0] for p in after if p in before)
    ns = sum(after[p][1] - before[p][1] for p in after if p in before)
    table2 = proc_table()
    tree2 = [p for p in descendants(peer.roots(), table2) if p not in set(live.pid.values())]
    return {
        "seconds": seconds,
        "processes": len(tree),
        "cpu_s": ticks / CLK_TCK,
        "cpu_s_schedstat": ns / 1e9,
        "cpu_s_per_60s": ticks / CLK_TCK * 60 / seconds,
        "cpu_s_per_60s_schedstat": ns / 1e9 * 60 / seconds,
        "exited_during": sorted(set(before) - set(after)),
        "new_processes": sorted(set(tree2) - set(tree)),
        "restarts_during": len(restarts),
        "machine_busy_pct": busy_pct(m0, m1),
    }


def measure_kills(
    peer: Peer, ctx: Ctx, live: Live, notes: Notifications, cfg: argparse.Namespace
) -> dict:
    rng = random.Random(cfg.seed)
    names = [f"prog-{i}" for i in range(ctx.n)]
    lat_ms: list[float] = []
    log: list[dict[str, Any]] = []
    timeouts = 0
    last = None
    min_up = int(cfg.min_uptime * 1e9)
    while len(log) < cfg.kills:
        live.add(notes.drain())
        now = now_ns()
        eligible = [n for n in names if now - live.started[n] >= min_up and n != last]
        if not eligible:
            soonest = min(live.started[n] for n in names if n != last) + min_up
            time.sleep(max(0, soonest - now) / 1e9 + 0.001)
            continue
        name = rng.choice(eligible)
        last = name
        old = live.pid[name]
        if not cmdline(old).startswith(expect_cmd(ctx, name)):
            raise Failure(f"{name}: pid {old} is not the program")
        t0 = now_ns()
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + cfg.kill_timeout
        got = None
        while got is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for n, pid, ns in notes.read(left):
                live.add([(n, pid, ns)])
                if n == name and pid != old:
                    got = (pid, ns)
        if got is None:
            timeouts += 1
            log.append({"name": name, "old": old, "t_kill": t0, "timeout": True})
            continue
        ms = (got[1] - t0) / 1e6
        lat_ms.append(ms)
        log.append({"name": name, "old": old, "new": got[0], "t_kill": t0, "t_new": got[1]})
        time.sleep(cfg.gap)
    return {"latency_ms": lat_ms, "timeouts": timeouts, "kills": log}


def summarize(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"median": None, "p95": None, "min": None, "max": None, "n": 0}
    s = sorted(xs)
    p95 = s[max(0, math.ceil(0.95 * len(s)) - 1)]  # nearest rank
    return {"median": statistics.median(s), "p95": p95, "min": s[0], "max": s[-1], "n": len(s)}


def cold_only(peer: Peer, ctx: Ctx, notes: Notifications, run_dir: Path, cfg) -> dict:
    run_dir.mkdir()
    peer.prepare(run_dir)
    try:
        live, cold = start_and_wait(peer, notes, cfg.start_timeout)
        rec: dict[str, Any] = {
            "cold_start_s": cold,
            "cpu_at_up_s": live.cpu_at_up_s,
            "first_up_s": (min(live.started.values()) - peer.t_launch) / 1e9,
            "runner": phases(peer, live),
        }
        time.sleep(0.3)  # let late duplicate starts show up
        live.add(notes.drain())
        rec["starts"] = live.starts
        scan = proc_scan_programs(ctx)
        rec["alive_by_proc_scan"] = len(scan)
    finally:
        rec_stop = stop_peer(peer, notes)
    return {**rec, **rec_stop}


def phases(peer: Peer, live: Live) -> dict[str, float]:
    """Trellis runner phases (s since launch), and the tree start -> 50 up."""
    if not live.runner:
        return {}
    out = {k.lstrip("@"): (v - peer.t_launch) / 1e9 for k, v in live.runner.items()}
    if "@run" in live.runner:
        out["run_to_all_up"] = (max(live.started.values()) - live.runner["@run"]) / 1e9
    return out


def full_run(peer: Peer, ctx: Ctx, notes: Notifications, run_dir: Path, cfg) -> dict:
    run_dir.mkdir()
    peer.prepare(run_dir)
    rec: dict[str, Any] = {}
    try:
        live, cold = start_and_wait(peer, notes, cfg.start_timeout)
        rec["cold_start_s"] = cold
        rec["cpu_at_up_s"] = live.cpu_at_up_s
        rec["first_up_s"] = (min(live.started.values()) - peer.t_launch) / 1e9
        rec["runner"] = phases(peer, live)
        time.sleep(cfg.settle)
        live.add(notes.drain())
        rec["starts_before_idle"] = live.starts
        bad = alive_check(ctx, live)
        scan = proc_scan_programs(ctx)
        if bad or len(scan) != ctx.n:
            raise Failure(f"not all alive after start: bad={bad} scan={len(scan)}")
        rec["idle"] = measure_idle(peer, ctx, live, notes, cfg.idle_seconds)
        m0 = machine_cpu()
        k = measure_kills(peer, ctx, live, notes, cfg)
        rec["machine_busy_kills_pct"] = busy_pct(m0, machine_cpu())
        rec["restart"] = {**summarize(k["latency_ms"]), "timeouts": k["timeouts"]}
        rec["restart_samples_ms"] = k["latency_ms"]
        rec["kills"] = k["kills"]
        time.sleep(0.3)
        live.add(notes.drain())
        rec["alive_after_kills_by_proc_scan"] = len(proc_scan_programs(ctx))
    except Failure as exc:
        rec["error"] = str(exc)
    finally:
        rec.update(stop_peer(peer, notes))
    if ctx.trace and isinstance(peer, Trellis) and (run_dir / "trace.json").exists():
        rec["trace"] = trace_breakdown(json.loads((run_dir / "trace.json").read_text()), rec)
    return rec


def trace_breakdown(events: list[list[Any]], rec: dict) -> dict:
    """Split each restart: kill -> child.exited seen by the supervisor -> child.restarted ->
    the new program's main() (its own stamp)."""
    by_child: dict[str, list[tuple[int, str]]] = {}
    for t, name, child, _reason in events:
        by_child.setdefault(child, []).append((t, name))
    rows = []
    for k in rec.get("kills", []):
        if k.get("timeout"):
            continue
        child = "p" + k["name"].split("-")[1]
        evs = [(t, n) for t, n in by_child.get(child, []) if t >= k["t_kill"]]
        exited = next((t for t, n in evs if n == "child.exited"), None)
        restarted = next((t for t, n in evs if n == "child.restarted"), None)
        rows.append(
            {
                "kill_to_exited_ms": (exited - k["t_kill"]) / 1e6 if exited else None,
                "exited_to_restarted_ms": (restarted - exited) / 1e6
                if exited and restarted
                else None,
                "kill_to_main_ms": (k["t_new"] - k["t_kill"]) / 1e6,
                "restarted_to_main_ms": (k["t_new"] - restarted) / 1e6 if restarted else None,
            }
        )
    out: dict[str, Any] = {"events": len(events)}
    for key in ("kill_to_exited_ms", "exited_to_restarted_ms", "restarted_to_main_ms"):
        vals = [r[key] for r in rows if r[key] is not None]
        out[key] = summarize(vals)
    return out


# --------------------------------------------------------------------------------------------
# Report


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def render(results: dict[str, dict], labels: dict[str, str], idle_s: float) -> str:
    head = (
        "| peer | restart median, ms | restart p95, ms | idle CPU, s per 60 s "
        "(ticks / schedstat) | cold start → 50 up, s (median, min-max, n) | notes |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for key, r in results.items():
        rs = r.get("restart", {})
        idle = r.get("idle", {})
        cs = r.get("cold", {})
        notes = []
        if r.get("error"):
            notes.append(f"error: {r['error']}")
        if rs.get("timeouts"):
            notes.append(f"{rs['timeouts']} kills not restarted in time")
        if idle.get("machine_busy_pct", 0) > 10:
            notes.append(f"machine {idle['machine_busy_pct']:.0f}% busy while idle")
        if r.get("machine_busy_kills_pct", 0) > 25:
            notes.append(f"machine {r['machine_busy_kills_pct']:.0f}% busy during kills")
        if idle.get("restarts_during"):
            notes.append(f"{idle['restarts_during']} restarts while idle")
        if r.get("killed_after_stop"):
            notes.append(f"{r['killed_after_stop']} processes left after stop (killed)")
        if r.get("run_to_all_up") is not None:
            notes.append(f"trellis.run() → 50 up {r['run_to_all_up']:.3f} s")
        if r.get("cold_cpu", {}).get("n"):
            notes.append(f"CPU of the launched process at 50 up {r['cold_cpu']['median']:.3f} s")
        idle_txt = (
            f"{idle['cpu_s_per_60s']:.2f} / {idle['cpu_s_per_60s_schedstat']:.3f}" if idle else "—"
        )
        cold_txt = (
            f"{cs['median']:.3f} ({cs['min']:.3f}-{cs['max']:.3f}, {cs['n']})"
            if cs.get("n")
            else "—"
        )
        lines.append(
            f"| {labels[key]} | {fmt(rs.get('median'), '.2f')} | {fmt(rs.get('p95'), '.2f')} "
            f"| {idle_txt} | {cold_txt} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def verdicts(r: dict, idle_s: float) -> list[tuple[str, str, str]]:
    out = []
    med = r.get("restart", {}).get("median")
    out.append(
        (
            "restart latency median ≤ 2 ms",
            fmt(med, ".2f") + " ms",
            "—" if med is None else ("PASS" if med <= TARGETS["restart_ms"] else "FAIL"),
        )
    )
    idle = r.get("idle", {}).get("cpu_s_per_60s_schedstat")
    out.append(
        (
            "idle CPU ≤ 0.01 s per 60 s (schedstat, ns resolution)",
            fmt(idle, ".3f") + " s",
            "—" if idle is None else ("PASS" if idle <= TARGETS["idle_cpu_s_per_60s"] else "FAIL"),
        )
    )
    cold = r.get("cold", {}).get("median")
    out.append(
        (
            "cold start ≤ 0.08 s (process launch → 50 up)",
            fmt(cold, ".3f") + " s",
            "—" if cold is None else ("PASS" if cold <= TARGETS["cold_start_s"] else "FAIL"),
        )
    )
    run_up = r.get("run_to_all_up")
    if run_up is not None:
        out.append(
            (
                "cold start ≤ 0.08 s (trellis.run() entered → 50 up)",
                f"{run_up:.3f} s",
                "PASS" if run_up <= TARGETS["cold_start_s"] else "FAIL",
            )
        )
    return out


# --------------------------------------------------------------------------------------------


def environment(argv: list[str]) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "command": shlex.join(argv),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    keys = [c.key for c in PEERS]
    p.add_argument("--quick", action="store_true", help="smoke run: idle 5 s, 10 kills")
    p.add_argument("--only", help=f"comma list of peers: {','.join(keys)}")
    p.add_argument("--skip", help="comma list of peers to leave out")
    p.add_argument("-n", "--programs", type=int, default=50, help="supervised programs (50)")
    p.add_argument("--idle-seconds", type=float, help="idle CPU window (60; quick 5)")
    p.add_argument("--kills", type=int, help="kill -9 samples per peer (30; quick 10)")
    p.add_argument("--cold-repeats", type=int, help="extra cold starts per peer (4; quick 1)")
    p.add_argument("--gap", type=float, default=0.05, help="pause after each restart, s")
    p.add_argument(
        "--min-uptime",
        type=float,
        default=1.5,
        help="only kill programs up at least this long, s (runit/s6 delay a restart by 1 s "
        "when the service ran < 1 s)",
    )
    p.add_argument("--settle", type=float, default=3.0, help="wait after start before idle, s")
    p.add_argument("--kill-timeout", type=float, default=15.0)
    p.add_argument("--start-timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--trellis-trace",
        action="store_true",
        help="record Trellis telemetry in the runner and split each restart (adds a handler)",
    )
    p.add_argument("--no-install", action="store_true", help="do not install missing peers")
    p.add_argument(
        "--peers-dir",
        type=Path,
        default=Path("/tmp/trellis-bench-peers"),
        help="throwaway circus venv and PM2 npm prefix",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop of the Python supervisors: Trellis (both) and the floor",
    )
    p.add_argument("--json", type=Path, help="where to write the JSON (default bench/results/)")
    cfg = p.parse_args(argv)
    defaults = {"idle_seconds": 60.0, "kills": 30, "cold_repeats": 4}
    if cfg.quick:
        defaults = {"idle_seconds": 5.0, "kills": 10, "cold_repeats": 1}
    for k, v in defaults.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.only:
        sel = cfg.only.split(",")
    else:
        sel = [k for k in keys if not (cfg.quick and k == "circus-default")]
    if cfg.skip:
        sel = [k for k in sel if k not in cfg.skip.split(",")]
    unknown = set(sel) - set(keys)
    if unknown:
        p.error(f"unknown peers {sorted(unknown)}; choose from {keys}")
    cfg.peers = sel
    return cfg


@contextlib.contextmanager
def temp_root(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="trellis-bench-procs-"))
    try:
        yield root
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(sys.argv[1:] if argv is None else argv)
    env = environment(getattr(sys, "orig_argv", sys.argv))
    print(f"command: {env['command']}")
    print(
        f"date: {env['date']}; {env['cpus']} CPUs: {env['cpu']}; {env['platform']}; "
        f"load before: {' '.join(f'{x:.2f}' for x in env['load_before'])}"
    )
    if not cfg.no_install:
        install_peers(cfg.peers_dir, set(cfg.peers))
    t_start = time.monotonic()
    with temp_root(cfg.keep_tmp) as root:
        prog = compile_prog(root)
        ctx = Ctx(
            root,
            prog,
            root / "notify.fifo",
            cfg.programs,
            cfg.peers_dir,
            cfg.trellis_trace,
            cfg.loop,
        )
        notes = Notifications(ctx.fifo)
        peers: list[Peer] = []
        skipped: dict[str, str] = {}
        for cls in PEERS:
            if cls.key not in cfg.peers:
                continue
            peer = cls(ctx)
            why = peer.missing()
            if why:
                skipped[cls.key] = why
            else:
                peers.append(peer)
        versions = {p.key: p.version() for p in peers}
        settings = {p.key: p.settings() for p in peers}
        labels = {p.key: p.label for p in peers}
        print(
            f"config: {json.dumps({k: v for k, v in vars(cfg).items() if k != 'json'}, default=str)}"
        )
        print("peers:")
        for p in peers:
            print(f"  {p.label}: {versions[p.key]}")
            for what, how in settings[p.key].items():
                print(f"      {what}: {how}")
        for k, why in skipped.items():
            print(f"  {k}: SKIPPED ({why})")
        pystart = python_startup(ctx)
        print(
            f"reference: python -c pass {pystart['wall_s'] * 1000:.1f} ms wall, "
            f"{pystart['cpu_s'] * 1000:.1f} ms CPU (medians of {pystart['n']})",
            flush=True,
        )
        print(flush=True)
        results: dict[str, dict[str, Any]] = {p.key: {"cold_samples": []} for p in peers}
        # Phase 1: extra cold starts, interleaved (order alternates per round)
        for rnd in range(cfg.cold_repeats):
            order = peers if rnd % 2 == 0 else peers[::-1]
            for p in order:
                rd = root / f"{p.key}-cold{rnd}"
                try:
                    rec = cold_only(p, ctx, notes, rd, cfg)
                except Failure as exc:
                    rec = {"error": str(exc)}
                results[p.key].setdefault("cold_runs", []).append(rec)
                if "cold_start_s" in rec:
                    results[p.key]["cold_samples"].append(rec["cold_start_s"])
                print(
                    f"cold round {rnd + 1}/{cfg.cold_repeats} {p.label}: "
                    f"{fmt(rec.get('cold_start_s'), '.3f')} s (CPU "
                    f"{fmt(rec.get('cpu_at_up_s'), '.3f')} s) {rec.get('error', '')}",
                    flush=True,
                )
        # Phase 2: per peer, start (one more cold sample), idle window, kills; order reversed
        # from the last cold round so no peer always runs first.
        order = peers[::-1] if cfg.cold_repeats % 2 == 0 else peers
        for p in order:
            print(
                f"{p.label}: start, {cfg.idle_seconds:g} s idle, {cfg.kills} kills...", flush=True
            )
            rec = full_run(p, ctx, notes, root / f"{p.key}-full", cfg)
            if "cold_start_s" in rec:
                results[p.key]["cold_samples"].append(rec["cold_start_s"])
            results[p.key].update(rec)
            rs = rec.get("restart", {})
            print(
                f"  restart median {fmt(rs.get('median'), '.2f')} ms, "
                f"p95 {fmt(rs.get('p95'), '.2f')} ms; idle "
                f"{fmt(rec.get('idle', {}).get('cpu_s_per_60s'), '.3f')} s/60 s; "
                f"left after stop {rec.get('killed_after_stop')} {rec.get('error', '')}",
                flush=True,
            )
        for r in results.values():
            r["cold"] = summarize(r["cold_samples"])
            cpus = [c["cpu_at_up_s"] for c in r.get("cold_runs", []) if c.get("cpu_at_up_s")]
            if r.get("cpu_at_up_s"):
                cpus.append(r["cpu_at_up_s"])
            r["cold_cpu"] = summarize(cpus)
            runs = [c for c in r.get("cold_runs", []) if c.get("runner")]
            if r.get("runner"):
                runs.append({"runner": r["runner"]})
            ups = [c["runner"]["run_to_all_up"] for c in runs if "run_to_all_up" in c["runner"]]
            if ups:
                r["run_to_all_up"] = statistics.median(ups)
                for ph in ("interpreter", "imported", "run"):
                    xs = [c["runner"][ph] for c in runs if ph in c["runner"]]
                    r[f"launch_to_{ph}_s"] = statistics.median(xs) if xs else None
        leftovers = ours(ctx, set())
        notes.close()
    elapsed = time.monotonic() - t_start

    print()
    print(render(results, labels, cfg.idle_seconds))
    print()
    print(
        f"{cfg.programs} programs. Restart: kill -9 of a random program (up ≥ {cfg.min_uptime} s) "
        f"→ the new process's main() (its own CLOCK_MONOTONIC stamp), {cfg.kills} kills, "
        f"{cfg.gap * 1000:.0f} ms apart. Idle: utime+stime of the supervisor's process tree "
        f"(programs excluded) over {cfg.idle_seconds:g} s, scaled to 60 s; after the slash the "
        f"same from the threads' schedstat (ns resolution; the PASS/FAIL figure). Cold: launch of the daemon/CLI → "
        f"the 50th program's main(), median of {cfg.cold_repeats + 1} interleaved starts. "
        f"Took {elapsed:.0f} s."
    )
    for key, r in results.items():
        if key.startswith("trellis"):
            print(f"\n{labels[key]} vs targets:")
            for what, value, verdict in verdicts(r, cfg.idle_seconds):
                print(f"  {verdict:4}  {what}: {value}")
            cc = r.get("cold_cpu", {})
            if cc.get("n"):
                print(
                    f"  cold start CPU (launched process, at 50 up): median {cc['median']:.3f} s "
                    f"({cc['min']:.3f}-{cc['max']:.3f}, {cc['n']}); python -c pass: "
                    f"{pystart['cpu_s']:.3f} s CPU, {pystart['wall_s']:.3f} s wall"
                )
            if r.get("run_to_all_up") is not None:
                print(
                    f"  cold start split (medians, s since launch): interpreter up "
                    f"{fmt(r.get('launch_to_interpreter_s'), '.3f')}, trellis imported "
                    f"{fmt(r.get('launch_to_imported_s'), '.3f')}, run() entered "
                    f"{fmt(r.get('launch_to_run_s'), '.3f')}, then 50 up after "
                    f"{r['run_to_all_up']:.3f}"
                )
            if r.get("trace"):
                t = r["trace"]
                print(
                    "  restart split (medians, ms): kill → child.exited "
                    f"{fmt(t['kill_to_exited_ms']['median'], '.2f')}, → child.restarted "
                    f"{fmt(t['exited_to_restarted_ms']['median'], '.2f')}, → program main() "
                    f"{fmt(t['restarted_to_main_ms']['median'], '.2f')}"
                )
    for k, why in skipped.items():
        print(f"\n{k}: SKIPPED ({why})")
    if leftovers:
        print(f"\nWARNING: leftover processes {leftovers}")
    if len(SRC_DIGESTS) > 1:
        print(f"\nWARNING: src/trellis changed during the run (digests {sorted(SRC_DIGESTS)})")
    doc = {
        "environment": env,
        "config": vars(cfg),
        "elapsed_s": elapsed,
        "targets": TARGETS,
        "versions": versions,
        "settings": settings,
        "skipped": skipped,
        "results": results,
        "python_startup": pystart,
        "leftovers": leftovers,
        "trellis_src_digests": sorted(SRC_DIGESTS),
    }
    path = cfg.json
    if path is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        path = RESULTS_DIR / f"procs-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nJSON: {path}")
    failed = any(
        v == "FAIL"
        for key, r in results.items()
        if key.startswith("trellis")
        for _, _, v in verdicts(r, cfg.idle_seconds)[:3]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

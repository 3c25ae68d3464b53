"""Throwaway NATS servers and ``trellis run`` nodes for the cluster tests."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

_SBIN = "/usr/sbin/nats-server"
NATS = shutil.which("nats-server") or (_SBIN if os.path.exists(_SBIN) else None)
needs_nats = pytest.mark.skipif(
    NATS is None,
    reason="needs nats-server with JetStream on PATH (Debian: apt install nats-server, "
    "or the static binary from the NATS releases)",
)


TTL = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str, step: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


class NatsServer:
    """``nats-server -js`` on a free loopback port with a store directory of its own."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert NATS is not None
        self.proc = subprocess.Popen(
            [NATS, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False

        wait_for(up, 10.0, "nats-server to listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class NatsCluster:
    """Three ``nats-server -js`` routed into one NATS cluster (JetStream in Raft)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.ports = [free_port() for _ in range(3)]
        self.routes = [free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None, None, None]

    @property
    def url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.ports)

    def start(self, i: int) -> None:
        assert NATS is not None
        routes = ",".join(f"nats://127.0.0.1:{r}" for j, r in enumerate(self.routes) if j != i)
        args = [NATS, "-js", "-a", "127.0.0.1", "-p", str(self.ports[i])]
        args += ["-sd", str(self.store / f"n{i}"), "--server_name", f"n{i}"]
        args += ["--cluster_name", "tc", "--cluster", f"nats://127.0.0.1:{self.routes[i]}"]
        args += ["--routes", routes]
        self.procs[i] = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start_all(self) -> None:
        for i in range(3):
            self.start(i)

        def up() -> bool:
            try:
                for p in self.ports:
                    socket.create_connection(("127.0.0.1", p), 0.2).close()
                return True
            except OSError:
                return False

        wait_for(up, 10.0, "the three nats-servers to listen")

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


SINGLETON = 'echo "start $TRELLIS_TEST_NODE $TRELLIS_FENCING_TOKEN $$" >> {log}; exec sleep 1000'
LOCAL = 'echo "local $TRELLIS_TEST_NODE $$" >> {log}; exec sleep 1000'


def tree_file(tmp: Path, name: str = "demo", extra: str = "") -> Path:
    """A tree with one cluster singleton (``leader``) and one node-scope child (``local``)."""
    path = tmp / "tree.toml"
    path.write_text(
        f"""
[cluster]
name = "{name}"
lease_ttl = {TTL}
{extra}

[supervisor]
name = "demo"
[[supervisor.children]]
id = "leader"
command = ["sh", "-c", {json.dumps(SINGLETON.format(log=tmp / "singleton.log"))}]
inherit_env = ["PATH", "TRELLIS_TEST_NODE"]
shutdown = 2
scope = "cluster"
[[supervisor.children]]
id = "local"
command = ["sh", "-c", {json.dumps(LOCAL.format(log=tmp / "local.log"))}]
inherit_env = ["PATH", "TRELLIS_TEST_NODE"]
"""
    )
    return path


class Node:
    """One ``trellis run TREE --cluster URL --node NAME`` process."""

    def __init__(
        self,
        tmp: Path,
        tree: Path,
        url: str,
        name: str,
        control: bool = False,
        env: dict[str, str] | None = None,
    ):
        self.name = name
        self.tmp = tmp
        self.sock = None
        args = [sys.executable, "-m", "trellis", "run", str(tree), "--cluster", url, "--node", name]
        args += ["--journal", f"sqlite:///{tmp}/journal-{name}.db", "--no-metrics"]
        if control:
            self.sock = tempfile.mktemp(prefix=f"tc-{name}-", suffix=".sock", dir="/tmp")
            args += ["--socket", self.sock]
        else:
            args += ["--no-control"]
        env = {**os.environ, **(env or {}), "TRELLIS_TEST_NODE": name}
        env["TRELLIS_STATE_DIR"] = str(tmp / f"state-{name}")
        self.log = open(tmp / f"node-{name}.log", "ab")  # noqa: SIM115 (closed by stop)
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.terminate()
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if self.sock:
            for p in (self.sock, self.sock + ".lock"):
                try:
                    os.unlink(p)
                except OSError:
                    pass

    def output(self) -> str:
        return (self.tmp / f"node-{self.name}.log").read_text(errors="replace")


def starts(tmp: Path) -> list[tuple[str, int, int]]:
    """Every start of the singleton: (node, token, pid), in order."""
    path = tmp / "singleton.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "start":
            out.append((parts[1], int(parts[2]), int(parts[3])))
    return out


def running(tmp: Path) -> list[tuple[str, int, int]]:
    """The singleton's copies running now."""
    return [s for s in starts(tmp) if alive(s[2])]


def locals_(tmp: Path) -> dict[str, int]:
    path = tmp / "local.log"
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            _, node, pid = line.split()
            out[node] = int(pid)
    return out


class LoopThread:
    """An event loop in a thread (for a ChaosProxy next to blocking test code)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

"""Start the whole notification service on one machine: a throwaway NATS (JetStream),
PostgreSQL primary + streaming replica, the two simulated providers and N Trellis
nodes, each a ``trellis run examples/notify/node.toml`` process. Used by the demo, the
drills, the benchmark and the tests.

Example::

    async with Service(Path(tmp), nodes=["a", "b", "c"]) as svc:
        client = svc.client()
        await client.submit({"key": "k1", "priority": "high", "tokens": ["apns:x"]})
        await svc.wait_delivered({"k1"}, timeout=10)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["NATS_BIN", "NatsServer", "Node", "Service", "Submitter", "free_port", "missing"]

ROOT = Path(__file__).resolve().parents[2]
NATS_BIN = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None
)


def missing() -> str | None:
    """Why the service cannot start here (what to install), or None."""
    from examples.notify.pgcluster import skip_reason

    if NATS_BIN is None:
        return "needs nats-server with JetStream (Debian: apt install nats-server)"
    try:
        import nats  # noqa: F401
        import psycopg  # noqa: F401
    except ImportError as e:
        return f"needs {e.name}: pip install -e '.[test]'"
    return skip_reason()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class NatsServer:
    """``nats-server -js`` on a free loopback port, its store in ``store``."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert NATS_BIN is not None
        self.proc = subprocess.Popen(
            [NATS_BIN, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False

        _wait(up, 15.0, "nats-server to listen")

    def stop(self) -> None:
        _stop(self.proc)


class Provider:
    """A simulated provider process (``python -m examples.notify.providers``)."""

    def __init__(self, kind: str, seed: int, log: Path, extra: list[str]) -> None:
        self.kind = kind
        self.log = log
        argv = [sys.executable, "-m", "examples.notify.providers", "--kind", kind]
        argv += ["--port", "0", "--seed", str(seed), *extra]
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "READY":
            self.stop()
            raise RuntimeError(f"provider {kind} did not start; see {log}")
        self.url = f"http://127.0.0.1:{int(line[1])}"

    def stop(self) -> None:
        _stop(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Node:
    """One ``trellis run examples/notify/node.toml`` process."""

    def __init__(
        self, name: str, region: str, base: Path, env: dict[str, str], cluster: str
    ) -> None:
        self.name = name
        self.region = region
        self.dir = base / f"node-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        #: in the load balancer's rotation: set once the intake listens, cleared before
        #: a kill or a drain (a rolling deploy takes the node out of rotation first)
        self.serving = False

    @property
    def socket(self) -> Path:
        return self.dir / "control.sock"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.serving = False
        port_file = self.dir / "intake.port"
        port_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            **self.env,
            "NOTIFY_NODE": self.name,
            "NOTIFY_HTTP_PORT": str(self.port),  # a restarted node keeps its port
            "NOTIFY_PORT_FILE": str(port_file),
            "PYTHONPATH": str(ROOT),
        }
        cmd = [
            sys.executable,
            "-m",
            "trellis",
            "run",
            str(ROOT / "examples/notify/node.toml"),
            "--node",
            self.name,
            "--cluster",
            self.cluster,
            "--socket",
            str(self.socket),
            "--journal",
            f"sqlite:///{self.dir / 'journal.db'}",
            "--log-level",
            "info",
        ]
        with (self.dir / "node.log").open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
            )
        self.port = int(_wait(lambda: self._port(port_file), 60.0, f"node {self.name}'s intake"))
        self.serving = True

    def _port(self, path: Path) -> int | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"node {self.name} exited {self.proc.returncode}; see {self.dir / 'node.log'}"
            )
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9 of the node's trellis process (its guardian cleans up after it)."""
        self.serving = False
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait: the node drains (intake first, then dispatchers)."""
        self.serving = False
        if self.proc is None:
            return None
        _stop(self.proc, timeout)
        return self.proc.returncode

    def terminate(self) -> None:
        """SIGTERM without waiting (see :meth:`stop`)."""
        self.serving = False
        if self.alive:
            assert self.proc is not None
            self.proc.terminate()


class Service:
    """NATS + PostgreSQL (primary, replica) + providers + nodes, all throwaway."""

    def __init__(
        self,
        base: Path,
        nodes: list[str] | dict[str, str] = ("a", "b", "c"),  # type: ignore[assignment]
        *,
        seed: int = 7,
        invalid_ratio: float = 0.01,
        replica: bool = True,
        partitions: int = 2,
        provider_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.base = base
        self.regions = dict(nodes) if isinstance(nodes, dict) else dict.fromkeys(nodes, "r1")
        self.seed = seed
        self.invalid_ratio = invalid_ratio
        self.replica = replica
        self.partitions = partitions
        self.provider_args = provider_args or []
        self.extra_env = env or {}
        self.nats: NatsServer | None = None
        self.pg: Any = None
        self.providers: dict[str, Provider] = {}
        self.nodes: dict[str, Node] = {}
        self._pg_tmp: Path | None = None

    async def __aenter__(self) -> Service:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def start(self) -> None:
        from examples.notify.pgcluster import PgCluster

        self.base.mkdir(parents=True, exist_ok=True)
        try:
            self.nats = NatsServer(self.base / "nats")
            self.nats.start()
            self.pg = PgCluster(self._pg_dir())
            self.pg.start(replica=self.replica)
            for kind in ("apns", "fcm"):
                self.providers[kind] = Provider(
                    kind,
                    self.seed,
                    self.base / f"{kind}.log",
                    ["--invalid-ratio", str(self.invalid_ratio), *self.provider_args],
                )
            self.env = {
                "NOTIFY_NATS": self.nats.url,
                "NOTIFY_PG": self.pg.write_dsn,
                "NOTIFY_PG_REPLICA": self.pg.replica_dsn if self.replica else "",
                "NOTIFY_APNS": self.providers["apns"].url,
                "NOTIFY_FCM": self.providers["fcm"].url,
                "NOTIFY_PARTITIONS": str(self.partitions),
                **self.extra_env,
            }
            asyncio.run(self._schema())
            for name, region in self.regions.items():
                self.nodes[name] = Node(name, region, self.base, self.env, self.nats.url)
            for node in self.nodes.values():
                node.start()
        except BaseException:
            self.stop()
            raise

    def _pg_dir(self) -> Path:
        """``base/pg``, or a directory of its own under /tmp when the postgres user (the
        servers run as it when we are root) cannot reach ``base`` (pytest's tmp_path)."""
        base = self.base.absolute()
        if os.geteuid() != 0 or all(os.stat(p).st_mode & 0o001 for p in [base, *base.parents]):
            return self.base / "pg"
        self._pg_tmp = Path(tempfile.mkdtemp(prefix="notify-pg-", dir="/tmp"))
        os.chmod(self._pg_tmp, 0o755)
        return self._pg_tmp / "pg"

    async def _schema(self) -> None:
        from examples.notify.store import Store

        store = await Store.open(self.pg.write_dsn)
        try:
            await store.init_schema()
        finally:
            await store.close()

    def stop(self) -> None:
        for node in self.nodes.values():  # all drain at once
            with contextlib.suppress(Exception):
                node.terminate()
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.stop(timeout=20.0)
        for p in self.providers.values():
            p.stop()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.stop()
        if self.nats is not None:
            self.nats.stop()
        if self._pg_tmp is not None:
            shutil.rmtree(self._pg_tmp, ignore_errors=True)
            self._pg_tmp = None

    def live_urls(self) -> list[str]:
        return [n.url for n in self.nodes.values() if n.alive and n.serving]

    def submitter(self, **kw: Any) -> Submitter:
        return Submitter(self, **kw)

    async def provider_deliveries(self) -> dict[str, dict[str, Any]]:
        """``{provider: /v1/deliveries}``."""
        out = {}
        async with httpx.AsyncClient(timeout=30.0) as http:
            for kind, p in self.providers.items():
                out[kind] = (await http.get(f"{p.url}/v1/deliveries")).json()
        return out

    async def shown_ids(self) -> dict[str, int]:
        """``{provider id "<key>:<token>": times shown}`` over both providers."""
        shown: dict[str, int] = {}
        for d in (await self.provider_deliveries()).values():
            for pid, rec in d.get("shown", {}).items():
                shown[pid] = shown.get(pid, 0) + int(rec["count"])
        return shown

    def deliverable(self, ids: set[str]) -> set[str]:
        """The provider ids in ``ids`` whose token the providers will take (the rest are
        answered invalid_token: final, never shown)."""
        from examples.notify.providers import token_invalid

        def ok(pid: str) -> bool:
            # "<key>:<token>": a key may hold ':' (campaign keys do); a token starts with
            # its provider's name
            at = max(pid.rfind(f":{kind}:") for kind in ("apns", "fcm"))
            token = pid[at + 1 :] if at >= 0 else pid
            kind = token.split(":", 1)[0]
            return not token_invalid(self.seed, token, self.invalid_ratio, kind)

        return {pid for pid in ids if ok(pid)}

    async def settled(self, expected: set[str], timeout: float) -> dict[str, int]:
        """Wait until every deliverable provider id in ``expected`` was shown, or
        ``timeout``; the shown counts (of every id shown, expected or not)."""
        want = self.deliverable(expected)
        deadline = time.monotonic() + timeout
        while True:
            shown = await self.shown_ids()
            if want <= set(shown) or time.monotonic() > deadline:
                return shown
            await asyncio.sleep(0.25)


class Submitter:
    """A client that spreads notifications over the live nodes' intakes, retrying a
    refused or failed request on the next node with the same idempotency key (what a
    load balancer in front of the nodes does). ``accepted`` holds every key answered 202."""

    def __init__(self, service: Service, *, timeout: float = 5.0) -> None:
        self.service = service
        self.http = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=64))
        self.accepted: dict[str, dict[str, Any]] = {}  # key -> notification (+ accepted_at)
        self.failed: dict[str, str] = {}  # key -> last error, never accepted
        self.attempts = 0
        #: every request: (start, end, notifications in it, HTTP status or 0 on an error)
        self.log: list[tuple[float, float, int, int]] = []
        self._rr = 0

    async def aclose(self) -> None:
        await self.http.aclose()

    async def submit(self, docs: list[dict[str, Any]], retry_for: float = 30.0) -> bool:
        """Submit a batch; True once accepted (then every key is in ``accepted``)."""
        deadline = time.monotonic() + retry_for
        last = "no live node"
        while time.monotonic() < deadline:
            urls = self.service.live_urls()
            if urls:
                self._rr += 1
                url = urls[self._rr % len(urls)]
                self.attempts += 1
                started = time.time()
                try:
                    r = await self.http.post(
                        f"{url}/v1/notifications", json={"notifications": docs}
                    )
                    self.log.append((started, time.time(), len(docs), r.status_code))
                    if r.status_code == 202:
                        now = time.time()
                        for doc in docs:
                            self.accepted[doc["key"]] = {**doc, "accepted_at": now}
                            self.failed.pop(doc["key"], None)
                        return True
                    if r.status_code == 400:
                        raise ValueError(f"intake refused the batch: {r.text}")
                    last = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    self.log.append((started, time.time(), len(docs), 0))
                    last = f"{type(e).__name__}"
            await asyncio.sleep(0.05)
        for doc in docs:
            self.failed[doc["key"]] = last
        return False

    def expected_ids(self) -> set[str]:
        return {f"{k}:{t}" for k, d in self.accepted.items() for t in d["tokens"]}


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)

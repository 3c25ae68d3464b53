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
import atexit
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

__all__ = [
    "NATS_BIN",
    "NatsServer",
    "Netns",
    "NetnsUnavailable",
    "Node",
    "Service",
    "Submitter",
    "free_port",
    "missing",
    "netns_unavailable",
]

ROOT = Path(__file__).resolve().parents[2]
NATS_BIN = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None
)
IP_BIN = shutil.which("ip") or ("/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else None)
NETNS_PREFIX = "trellis-notify-"


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be used here; the message says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert IP_BIN is not None
    r = subprocess.run([IP_BIN, *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {(r.stderr or r.stdout).strip()}")
    return r


def netns_unavailable() -> str | None:
    """Why regions cannot get network namespaces here (then the region drill kills
    processes instead), or None. Checks root and iproute2; ``ip netns add`` itself is
    tried by :meth:`Netns.setup`."""
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_NET_ADMIN)"
    if IP_BIN is None:
        return "no `ip` command (install iproute2)"
    r = _ip("netns", "help", check=False)
    if "netns" not in (r.stdout + r.stderr):
        return "`ip` has no netns support (install iproute2)"
    return None


class Netns:
    """A network namespace per region, each linked to the host by a veth pair, and a
    "core" address on the host where NATS, PostgreSQL and the providers listen.

    Addresses come from one 10.231.N.0/24 that no host route or address overlaps: the
    core address ``.1`` sits on a veth pair of its own whose two ends stay on the host
    (no drill touches it); region ``i`` gets the /30 ``.4(i+1)``: host end ``.4i+5``,
    namespace end ``.4i+6``. A namespace has ``lo`` up, its veth end, and one route,
    to the core address; the host has an ``unreachable`` route for the whole /24, so
    that while a region's link is down nothing addressed to it leaves by the default
    route. Traffic thus stays on loopback, the veths and the namespaces created here.

    :meth:`cut` takes a region's host-side veth down: its processes keep running but
    reach nothing and nothing reaches them; :meth:`heal` brings it up again.
    :meth:`teardown` (also run at interpreter exit) kills what is left in the
    namespaces, deletes the veths, the namespaces and the route. Names carry this
    process's id (``trellis-notify-<pid>-<region>``, links ``tn<pid>...``); leftovers
    of a dead process (kill -9) are removed by the next :meth:`setup`.
    """

    def __init__(self, regions: list[str]) -> None:
        self.pid = os.getpid()
        self.regions = list(dict.fromkeys(regions))
        self.net = ""
        self.created_ns: list[str] = []
        self.created_links: list[str] = []
        self.route = False
        self.cut_regions: set[str] = set()
        self._atexit = False

    # -- names and addresses --------------------------------------------------------
    def ns(self, region: str) -> str:
        return f"{NETNS_PREFIX}{self.pid}-{region}"

    def _i(self, region: str) -> int:
        return self.regions.index(region)

    def host_link(self, region: str) -> str:
        return f"tn{self.pid}r{self._i(region)}"

    def addr(self, region: str) -> str:
        """The namespace end's address (where the region's intakes listen)."""
        return f"{self.net}.{4 * self._i(region) + 6}"

    def host_addr(self, region: str) -> str:
        return f"{self.net}.{4 * self._i(region) + 5}"

    @property
    def core(self) -> str:
        return f"{self.net}.1"

    @property
    def subnet(self) -> str:
        return f"{self.net}.0/24"

    def exec_prefix(self, region: str) -> list[str]:
        assert IP_BIN is not None
        return [IP_BIN, "netns", "exec", self.ns(region)]

    # -- lifecycle -----------------------------------------------------------------
    def setup(self) -> None:
        """Create the namespaces, links and routes; :class:`NetnsUnavailable` (with
        everything created so far removed) when that is not possible here."""
        why = netns_unavailable()
        if why:
            raise NetnsUnavailable(why)
        if len(self.regions) > 60:
            raise NetnsUnavailable("at most 60 regions")
        if not self._atexit:
            atexit.register(self.teardown)
            self._atexit = True
        _sweep_stale()
        try:
            self.net = _free_net()
            core, peer = f"tn{self.pid}c", f"tn{self.pid}cp"
            _ip("link", "add", core, "type", "veth", "peer", "name", peer)
            self.created_links.append(core)
            _ip("addr", "add", f"{self.core}/32", "dev", core)
            _ip("link", "set", core, "up")
            _ip("link", "set", peer, "up")
            _ip("route", "add", "unreachable", self.subnet)
            self.route = True
            for region in self.regions:
                ns, host = self.ns(region), self.host_link(region)
                inner = f"{host}n"
                _ip("netns", "add", ns)
                self.created_ns.append(ns)
                _ip("link", "add", host, "type", "veth", "peer", "name", inner)
                self.created_links.append(host)
                _ip("link", "set", inner, "netns", ns)
                _ip("addr", "add", f"{self.host_addr(region)}/30", "dev", host)
                _ip("link", "set", host, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(region)}/30", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                _ip("-n", ns, "route", "add", f"{self.core}/32", "via", self.host_addr(region))
            self._check()
        except BaseException:
            self.teardown()
            raise

    def _check(self) -> None:
        """Each namespace reaches the core address (a listener there, for a moment)."""
        with socket.socket() as s:
            s.bind((self.core, 0))
            s.listen(8)
            port = s.getsockname()[1]
            for region in self.regions:
                r = subprocess.run(
                    [
                        *self.exec_prefix(region),
                        sys.executable,
                        "-c",
                        "import socket,sys;"
                        "socket.create_connection((sys.argv[1],int(sys.argv[2])),5).close()",
                        self.core,
                        str(port),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                if r.returncode != 0:
                    raise NetnsUnavailable(
                        f"namespace {self.ns(region)} cannot reach {self.core}: "
                        f"{r.stderr.strip()[-300:]}"
                    )
                with contextlib.suppress(OSError):
                    s.settimeout(1.0)
                    s.accept()[0].close()

    def cut(self, region: str) -> None:
        """The region's link down: its processes stay up, cut off from everything."""
        _ip("link", "set", self.host_link(region), "down")
        self.cut_regions.add(region)

    def heal(self, region: str) -> None:
        _ip("link", "set", self.host_link(region), "up")
        self.cut_regions.discard(region)

    def pids(self, region: str) -> list[int]:
        r = _ip("netns", "pids", self.ns(region), check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit()]

    def teardown(self) -> None:
        """Remove everything :meth:`setup` created (idempotent)."""
        for ns in list(self.created_ns):
            for pid in _ns_pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for link in self.created_links:
            _ip("link", "del", link, check=False)
        self.created_links.clear()
        for ns in self.created_ns:
            _ip("netns", "del", ns, check=False)
        self.created_ns.clear()
        if self.route:
            _ip("route", "del", "unreachable", self.subnet, check=False)
            self.route = False
        self.cut_regions.clear()


def _ns_pids(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def _sweep_stale() -> None:
    """Remove namespaces (and their links and route) left by a demo that died."""
    r = _ip("netns", "list", check=False)
    dead: set[int] = set()
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(NETNS_PREFIX):
            continue
        pid_s = name[len(NETNS_PREFIX) :].split("-", 1)[0]
        if not pid_s.isdigit() or _alive(int(pid_s)):
            continue
        dead.add(int(pid_s))
        for pid in _ns_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _ip("netns", "del", name, check=False)
    for pid in dead:
        core = _ip("-o", "-4", "addr", "show", "dev", f"tn{pid}c", check=False).stdout.split()
        if "inet" in core:
            net = core[core.index("inet") + 1].rsplit(".", 1)[0]
            _ip("route", "del", "unreachable", f"{net}.0/24", check=False)
        links = _ip("-o", "link", "show", check=False).stdout
        for line in links.splitlines():
            parts = line.split(":")
            if len(parts) < 2:
                continue
            name = parts[1].strip().split("@", 1)[0]
            if name.startswith(f"tn{pid}r") or name == f"tn{pid}c":
                _ip("link", "del", name, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_net() -> str:
    """A ``10.231.N`` whose /24 overlaps no address or route of the host."""
    import ipaddress

    used = []
    for table in (("route", "show", "table", "all"), ("addr", "show")):
        for word in _ip("-4", *table, check=False).stdout.split():
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(word, strict=False))
    start = os.getpid() % 256
    for k in range(256):
        n = (start + k) % 256
        net = ipaddress.ip_network(f"10.231.{n}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return f"10.231.{n}"
    raise NetnsUnavailable("every 10.231.N.0/24 overlaps a host route or address")


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

    def __init__(self, store: Path, host: str = "127.0.0.1") -> None:
        self.store = store
        self.host = host
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> None:
        assert NATS_BIN is not None
        self.proc = subprocess.Popen(
            [NATS_BIN, "-js", "-a", self.host, "-p", str(self.port), "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            try:
                socket.create_connection((self.host, self.port), 0.2).close()
                return True
            except OSError:
                return False

        _wait(up, 15.0, "nats-server to listen")

    def stop(self) -> None:
        _stop(self.proc)


class Provider:
    """A simulated provider process (``python -m examples.notify.providers``)."""

    def __init__(
        self, kind: str, seed: int, log: Path, extra: list[str], host: str = "127.0.0.1"
    ) -> None:
        self.kind = kind
        self.log = log
        argv = [sys.executable, "-m", "examples.notify.providers", "--kind", kind]
        argv += ["--host", host, "--port", "0", "--seed", str(seed), *extra]
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "READY":
            self.stop()
            raise RuntimeError(f"provider {kind} did not start; see {log}")
        self.url = f"http://{host}:{int(line[1])}"

    def stop(self) -> None:
        _stop(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Node:
    """One ``trellis run examples/notify/node.toml`` process."""

    def __init__(
        self,
        name: str,
        region: str,
        base: Path,
        env: dict[str, str],
        cluster: str,
        *,
        host: str = "127.0.0.1",
        prefix: list[str] | None = None,
    ) -> None:
        self.name = name
        self.region = region
        #: where the intake listens (the region's namespace address, or loopback)
        self.host = host
        #: run the node under this (``ip netns exec NS``)
        self.prefix = list(prefix or [])
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
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.serving = False
        port_file = self.dir / "intake.port"
        port_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            **self.env,
            "NOTIFY_NODE": self.name,
            "NOTIFY_HTTP_HOST": self.host,
            "NOTIFY_HTTP_PORT": str(self.port),  # a restarted node keeps its port
            "NOTIFY_PORT_FILE": str(port_file),
            "PYTHONPATH": str(ROOT),
        }
        cmd = [
            *self.prefix,
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
    """NATS + PostgreSQL (primary, replica) + providers + nodes, all throwaway.

    With ``netns=True`` (root and iproute2 needed) each region's nodes run in a network
    namespace of their own (:class:`Netns`), NATS, PostgreSQL and the providers listen on
    the host's core address, and :meth:`cut` / :meth:`heal` partition a region. When
    namespaces cannot be made, the service runs on loopback as without ``netns``;
    :attr:`netns` is then None and :attr:`netns_reason` says why.
    """

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
        netns: bool = False,
    ) -> None:
        self.base = base
        self.want_netns = netns
        self.netns: Netns | None = None
        self.netns_reason: str | None = None if netns else "not asked for"
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
            host = "127.0.0.1"
            listen: tuple[str, ...] = ()
            allow: tuple[str, ...] = ()
            if self.want_netns:
                netns = Netns(sorted(set(self.regions.values())))
                try:
                    netns.setup()
                except NetnsUnavailable as e:
                    self.netns_reason = str(e)
                else:
                    self.netns = netns
                    self.netns_reason = None
                    host, listen, allow = netns.core, (netns.core,), (netns.subnet,)
            self.nats = NatsServer(self.base / "nats", host)
            self.nats.start()
            self.pg = PgCluster(self._pg_dir(), listen=listen, allow=allow)
            self.pg.start(replica=self.replica)
            for kind in ("apns", "fcm"):
                self.providers[kind] = Provider(
                    kind,
                    self.seed,
                    self.base / f"{kind}.log",
                    ["--invalid-ratio", str(self.invalid_ratio), *self.provider_args],
                    host,
                )

            def at(dsn: str | None) -> str:  # the nodes reach PostgreSQL on the core address
                return "" if dsn is None else dsn.replace("127.0.0.1", host)

            self.env = {
                "NOTIFY_NATS": self.nats.url,
                "NOTIFY_PG": at(self.pg.write_dsn),
                "NOTIFY_PG_REPLICA": at(self.pg.replica_dsn) if self.replica else "",
                "NOTIFY_APNS": self.providers["apns"].url,
                "NOTIFY_FCM": self.providers["fcm"].url,
                "NOTIFY_PARTITIONS": str(self.partitions),
                **self.extra_env,
            }
            asyncio.run(self._schema())
            for name, region in self.regions.items():
                where: dict[str, Any] = {}
                if self.netns is not None:
                    where = {
                        "host": self.netns.addr(region),
                        "prefix": self.netns.exec_prefix(region),
                    }
                self.nodes[name] = Node(name, region, self.base, self.env, self.nats.url, **where)
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

    def cut(self, region: str) -> list[str]:
        """Partition ``region`` (its link down; see :class:`Netns`): its nodes leave the
        client's rotation (a load balancer's health check would fail) and keep running,
        cut off. The names of its nodes."""
        if self.netns is None:
            raise RuntimeError(f"no network namespaces: {self.netns_reason}")
        names = sorted(n for n, node in self.nodes.items() if node.region == region)
        for n in names:
            self.nodes[n].serving = False
        self.netns.cut(region)
        return names

    def heal(self, region: str) -> None:
        """Bring ``region``'s link up again (its nodes rejoin the rotation once
        :meth:`rejoin` finds them healthy)."""
        if self.netns is not None:
            self.netns.heal(region)

    async def rejoin(self, names: list[str], timeout: float = 30.0) -> list[str]:
        """Put ``names`` back in the rotation once each one's ``/v1/health`` answers 200
        (its intake is connected to NATS again); the names that did, in time."""
        back: list[str] = []
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=1.0) as http:
            while len(back) < len(names) and time.monotonic() < deadline:
                for n in names:
                    node = self.nodes[n]
                    if n in back or not node.alive:
                        continue
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(f"{node.url}/v1/health")).status_code == 200:
                            node.serving = True
                            back.append(n)
                await asyncio.sleep(0.1)
        return back

    async def lease_holders(self) -> dict[str, str]:
        """``{lease: node}`` for the leases the running nodes hold, each by its own view
        (``/v1/cluster`` on its control socket); keys as Trellis displays them
        (``root.scheduler``, ``dispatchers/high-0``)."""
        holders: dict[str, str] = {}
        for name, node in self.nodes.items():
            if not node.alive:
                continue
            view = await self.cluster_view(name)
            for lease in (view or {}).get("leases", []):
                if lease.get("held"):
                    holders[str(lease.get("key"))] = name
        return holders

    async def control(self, node: str, *args: str) -> int:
        """``trellis ARGS --socket <node's socket>``; its exit status."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "trellis",
            *args,
            "--socket",
            str(self.nodes[node].socket),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return await proc.wait()

    async def cluster_view(self, node: str) -> dict[str, Any] | None:
        """The node's own view of the cluster (``/v1/cluster`` on its control socket,
        which works while the node is cut off): ``leases`` with ``held`` by its own
        clock. None if it does not answer."""
        path = self.nodes[node].socket
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        try:
            async with httpx.AsyncClient(transport=transport, timeout=2.0) as http:
                r = await http.get("http://trellis/v1/cluster")
                return dict(r.json()) if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def journal(self, node: str, kind: str | None = None) -> list[dict[str, Any]]:
        """The node's journal records (``time`` as a Unix time, ``kind``, ``path``,
        ``data``), of ``kind`` only if given; read while the node runs."""
        import datetime
        import sqlite3

        path = self.nodes[node].dir / "journal.db"
        if not path.exists():
            return []
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            q = "SELECT utc, kind, path, data FROM journal"
            rows = conn.execute(
                q + (" WHERE kind = ?" if kind else "") + " ORDER BY seq", (kind,) if kind else ()
            ).fetchall()
        finally:
            conn.close()
        out = []
        for utc, k, p, data in rows:
            with contextlib.suppress(ValueError):
                t = datetime.datetime.fromisoformat(str(utc).replace("Z", "+00:00")).timestamp()
                try:
                    doc = json.loads(data)
                except ValueError:
                    doc = {"text": data}
                out.append({"time": t, "kind": k, "path": p, "data": doc})
        return out

    def stop(self) -> None:
        if self.netns is not None:  # a cut region's nodes can drain only once healed
            for region in list(self.netns.cut_regions):
                with contextlib.suppress(Exception):
                    self.netns.heal(region)
        try:
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
        finally:
            if self.netns is not None:
                self.netns.teardown()

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

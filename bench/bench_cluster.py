"""Cluster benchmarks: singleton failover after kill -9, next to two polling baselines
measured in the same run; remote vs local call round trips; membership convergence.

    .venv/bin/python bench/bench_cluster.py            # 20 kills at TTL 1 s and 2 s (~6 min)
    .venv/bin/python bench/bench_cluster.py --quick    # 5 kills at TTL 1 s (~1 min)

Needs nats-server (JetStream) and redis-server on PATH (the Redis baseline is skipped
without it). Every figure comes from this run on this machine.

* **trellis**: three ``trellis run`` nodes (separate OS processes) with one
  ``scope = "cluster"`` OS child; the holder node is killed with SIGKILL; failover =
  time until the new child has started (it appends its token to a file at start), with
  the killed node restarted before the next kill.
* **nats-kv poll**: the naive lock on the same NATS: a bucket with ``max_age = TTL``,
  the holder re-``put``s every TTL/4, three contenders try ``create`` every TTL/10;
  the holder's task is cancelled (what a kill -9 leaves behind). Failover = time until
  a contender's create succeeds (the server must first expire the key).
* **redis poll**: ``SET key me NX PX ttl`` every TTL/10 by three contenders, the holder
  renews with ``PEXPIRE`` every TTL/4; the holder's task is cancelled.

Neither baseline fences: a holder that was paused keeps acting after its key expired.
"""

# ruff: noqa: ASYNC110, ASYNC220  (a benchmark script: blocking spawns and polls are timed on purpose)
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


class Nats:
    def __init__(self, store: Path) -> None:
        self.port = free_port()
        exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.proc = subprocess.Popen(
            [exe, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        self.url = f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p95": pct(values, 95),
        "max": max(values) if values else float("nan"),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


# ---------------------------------------------------------------------------------------
# trellis: three trellis run nodes, kill -9 of the holder
# ---------------------------------------------------------------------------------------

TREE = """
[cluster]
name = "bench"
lease_ttl = {ttl}

[supervisor]
name = "bench"
[[supervisor.children]]
id = "leader"
command = ["sh", "-c", {cmd}]
inherit_env = ["PATH", "TRELLIS_TEST_NODE"]
scope = "cluster"
"""


def trellis_failover(ttl: float, kills: int, work: Path) -> list[float]:
    nats = Nats(work / f"nats-{ttl}")
    log = work / f"starts-{ttl}.log"
    tree = work / f"tree-{ttl}.toml"
    cmd = json.dumps(
        f'echo "$TRELLIS_TEST_NODE $TRELLIS_FENCING_TOKEN $$" >> {log}; exec sleep 1000'
    )
    tree.write_text(TREE.format(ttl=ttl, cmd=cmd))
    nodes: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str) -> None:
        env = {**os.environ, "TRELLIS_TEST_NODE": name, "TRELLIS_STATE_DIR": str(work / name)}
        args = [sys.executable, "-m", "trellis", "run", str(tree), "--cluster", nats.url]
        args += ["--node", name, "--no-journal", "--no-control", "--no-metrics"]
        args += ["--log-level", "warning"]
        nodes[name] = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def starts() -> list[tuple[str, int]]:
        if not log.exists():
            return []
        out = []
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                out.append((parts[0], int(parts[1])))
        return out

    results = []
    try:
        for name in "abc":
            start(name)
        while not starts():
            time.sleep(0.05)
        for _ in range(kills):
            time.sleep(2 * ttl)  # every node has seen the holder renew; restarted ones joined
            holder, token = starts()[-1]
            t0 = time.monotonic()
            nodes[holder].send_signal(signal.SIGKILL)
            while not any(t > token for _, t in starts()):
                time.sleep(0.002)
                if time.monotonic() - t0 > 30:
                    raise RuntimeError("no failover within 30 s")
            results.append(time.monotonic() - t0)
            nodes[holder].wait()
            start(holder)
            print(f"  trellis ttl={ttl}: failover {results[-1]:.3f}s", file=sys.stderr)
    finally:
        for proc in nodes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in nodes.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        nats.stop()
    return results


# ---------------------------------------------------------------------------------------
# baselines: polling locks with server-side expiry
# ---------------------------------------------------------------------------------------


async def _baseline(ttl: float, kills: int, acquire: Any, renew: Any) -> list[float]:
    """Three contenders; each kill cancels the holder's task and measures until another
    contender acquires. ``acquire(me) -> bool`` and ``renew(me) -> None``."""
    holder: list[str | None] = [None]
    acquired = asyncio.Event()

    async def contender(me: str) -> None:
        while True:
            if holder[0] == me:
                await renew(me)
                await asyncio.sleep(ttl / 4)
            else:
                if await acquire(me):
                    holder[0] = me
                    acquired.set()
                await asyncio.sleep(ttl / 10)

    tasks = {n: asyncio.ensure_future(contender(n)) for n in "abc"}
    out = []
    try:
        await acquired.wait()
        for _ in range(kills):
            await asyncio.sleep(ttl * random.uniform(1.0, 1.5))
            dead = holder[0]
            assert dead is not None
            tasks[dead].cancel()
            holder[0] = None
            acquired.clear()
            t0 = time.monotonic()
            await acquired.wait()
            out.append(time.monotonic() - t0)
            tasks[dead] = asyncio.ensure_future(contender(dead))
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return out


async def nats_kv_baseline(ttl: float, kills: int, work: Path) -> list[float]:
    import nats
    import nats.js.errors as jse

    server = Nats(work / f"nats-base-{ttl}")
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket="lock", history=1, ttl=ttl)

        async def acquire(me: str) -> bool:
            try:
                await kv.create("leader", me.encode())
                return True
            except (jse.KeyWrongLastSequenceError, jse.APIError):
                return False

        async def renew(me: str) -> None:
            await kv.put("leader", me.encode())

        return await _baseline(ttl, kills, acquire, renew)
    finally:
        await nc.close()
        server.stop()


async def redis_baseline(ttl: float, kills: int, work: Path) -> list[float] | None:
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    import redis.asyncio as redis

    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    r = redis.Redis(port=port)
    ms = int(ttl * 1000)
    try:

        async def acquire(me: str) -> bool:
            return bool(await r.set("leader", me, nx=True, px=ms))

        async def renew(me: str) -> None:
            await r.pexpire("leader", ms)

        return await _baseline(ttl, kills, acquire, renew)
    finally:
        await r.aclose()
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------------------------------
# remote calls and membership
# ---------------------------------------------------------------------------------------

OWNER = """
import sys, trellis, trellis.cluster as tc
class Echo(trellis.Server):
    async def handle_call(self, request, caller):
        return request
cluster = tc.Cluster(tc.ClusterSettings(sys.argv[1], node=sys.argv[2], name="bench", lease_ttl=1.0))
spec = Echo.child_spec(id="echo", name=trellis.Global("echo-" + sys.argv[2]))
sys.exit(trellis.run(lambda: trellis.Supervisor.start_link([spec]), extensions=[cluster]))
"""


async def calls_and_membership(work: Path, seconds: float) -> dict[str, Any]:
    import trellis
    from trellis.cluster import Cluster, ClusterSettings

    nats_server = Nats(work / "nats-calls")
    cluster = Cluster(ClusterSettings(nats_server.url, node="bench", name="bench", lease_ttl=1.0))
    await cluster.start()
    out: dict[str, Any] = {}
    procs = []
    try:
        # membership convergence: process start -> seen alive here
        t0 = time.monotonic()
        procs.append(subprocess.Popen([sys.executable, "-c", OWNER, nats_server.url, "n1"]))
        while not any(n["node"] == "n1" and n["alive"] for n in cluster.nodes()):
            await asyncio.sleep(0.01)
        out["join_seen_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        py = await asyncio.create_subprocess_exec(sys.executable, "-c", "import trellis.cluster")
        await py.wait()
        out["python_import_s"] = time.monotonic() - t0

        class Echo(trellis.Server):
            async def handle_call(self, request: Any, caller: Any) -> Any:
                return request

        local = await Echo.start()
        g = trellis.Global("echo-n1")
        while True:
            try:
                await trellis.call(g, 0, timeout=2.0)
                break
            except (trellis.NoProc, trellis.Exited, trellis.CallTimeout):
                await asyncio.sleep(0.05)
        for what, target in (("local", local), ("remote", g)):
            n, lat = 0, []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t = time.perf_counter()
                await trellis.call(target, n, timeout=5.0)
                lat.append(time.perf_counter() - t)
                n += 1
            out[f"{what}_calls_per_s"] = n / seconds
            out[f"{what}_p50_us"] = pct(lat, 50) * 1e6
            out[f"{what}_p99_us"] = pct(lat, 99) * 1e6
        await trellis.stop(local)
        # leave: kill -9 -> not alive here (by design after 2 TTL without a heartbeat)
        t0 = time.monotonic()
        procs[0].send_signal(signal.SIGKILL)
        while any(n["node"] == "n1" and n["alive"] for n in cluster.nodes()):
            await asyncio.sleep(0.01)
        out["death_seen_s"] = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait(10)
        await cluster.stop()
        nats_server.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--ttls", default="1,2")
    ap.add_argument("--seconds", type=float, default=3.0, help="per call measurement")
    ap.add_argument("--quick", action="store_true", help="5 kills at TTL 1 s")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.quick:
        args.kills, args.ttls, args.seconds = 5, "1", 1.0
    ttls = [float(x) for x in args.ttls.split(",")]
    work = Path(tempfile.mkdtemp(prefix="trellis-bench-cluster-"))
    print(f"$ {' '.join(sys.argv)}")
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    result: dict[str, Any] = {"failover": {}}
    try:
        for ttl in ttls:
            row = {
                "trellis": summary(trellis_failover(ttl, args.kills, work)),
                "nats-kv poll": summary(asyncio.run(nats_kv_baseline(ttl, args.kills, work))),
            }
            red = asyncio.run(redis_baseline(ttl, args.kills, work))
            if red is not None:
                row["redis poll"] = summary(red)
            result["failover"][ttl] = row
        result["calls"] = asyncio.run(calls_and_membership(work, args.seconds))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nFailover after the holder's death (seconds; kills per row in n):\n")
    print("| TTL | lock | n | p50 | p95 | max | bound TTL+0.5 |")
    print("|---|---|---|---|---|---|---|")
    for ttl, row in result["failover"].items():
        for name, s in row.items():
            bound = (
                "yes"
                if name == "trellis" and s["max"] <= ttl + 0.5
                else ("no" if name == "trellis" else "-")
            )
            print(
                f"| {ttl:g} s | {name} | {s['n']} | {s['p50']:.3f} | {s['p95']:.3f} | {s['max']:.3f} | {bound} |"
            )
    c = result["calls"]
    print("\nCalls (sequential, one caller) and membership:\n")
    print("| measure | value |")
    print("|---|---|")
    print(
        f"| local call | {c['local_calls_per_s']:,.0f}/s, p50 {c['local_p50_us']:.0f} µs, p99 {c['local_p99_us']:.0f} µs |"
    )
    print(
        f"| remote call (Global, over NATS) | {c['remote_calls_per_s']:,.0f}/s, p50 {c['remote_p50_us']:.0f} µs, p99 {c['remote_p99_us']:.0f} µs |"
    )
    print(
        f"| node start -> seen alive by another node | {c['join_seen_s']:.2f} s (of which `import trellis.cluster` in a fresh interpreter: {c['python_import_s']:.2f} s) |"
    )
    print(f"| kill -9 -> seen gone by another node (TTL 1 s) | {c['death_seen_s']:.2f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    ok = all(row["trellis"]["max"] <= ttl + 0.5 for ttl, row in result["failover"].items())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end throughput of the notification service (examples/notify): notifications/s
from the first submit until the provider has shown every accepted one, with three
``trellis run`` nodes and with one node, measured in the same run.

    .venv/bin/python bench/bench_notify.py                 # 5 repeats of 10,000 (~1 min)
    .venv/bin/python bench/bench_notify.py --repeats 5 --count 5000

Both configurations are started (two independent services; the idle one costs little)
and their repeats are interleaved, so a change in the machine's load hits both. Each
configuration is the whole service (examples/notify/harness.py: NATS with
JetStream, PostgreSQL primary + synchronous replica, simulated APNS/FCM with 3 ms
latency, the nodes), warms it up, then per repeat submits ``count`` notifications of
one device token (priorities mixed 20/50/30 high/normal/bulk) through ``clients``
concurrent clients in requests of ``batch``, as fast as they are accepted, and waits
until every deliverable one was shown. Throughput = notifications / (last shown - first
submit); the intake rate (all accepted) is printed beside it. Medians over the repeats;
the ratio is three nodes over one. Needs nats-server and the PostgreSQL server binaries.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.notify.harness import Service, missing  # noqa: E402

PRIOS = ("high",) * 2 + ("normal",) * 5 + ("bulk",) * 3


def docs(prefix: str, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        key = f"{prefix}-{i}"
        tok = f"{'apns' if i % 2 else 'fcm'}:{key}"
        out.append({"key": key, "priority": PRIOS[i % len(PRIOS)], "tokens": [tok]})
    return out


async def last_shown(svc: Service, want: set[str], timeout: float) -> float:
    """The provider's first-shown time of the last of ``want`` (all shown), wall clock."""
    deadline = time.monotonic() + timeout
    while True:
        firsts: dict[str, float] = {}
        for d in (await svc.provider_deliveries()).values():
            for pid, rec in d.get("shown", {}).items():
                if pid in want:
                    firsts[pid] = float(rec["first"])
        if len(firsts) == len(want):
            return max(firsts.values())
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(want) - len(firsts)} of {len(want)} never shown")
        await asyncio.sleep(0.1)


async def one_repeat(
    svc: Service, prefix: str, count: int, clients: int, batch: int
) -> tuple[float, float]:
    sub = svc.submitter(timeout=30.0)
    try:
        todo = docs(prefix, count)
        batches = [todo[i : i + batch] for i in range(0, count, batch)]
        it = iter(batches)

        async def client() -> None:
            for b in it:
                if not await sub.submit(b, retry_for=60.0):
                    raise RuntimeError(f"a batch was refused: {sub.failed}")

        t0 = time.time()
        await asyncio.gather(*(client() for _ in range(clients)))
        accepted = time.time()
        want = svc.deliverable(sub.expected_ids())
        last = await last_shown(svc, want, timeout=300.0)
        return count / (last - t0), count / (accepted - t0)
    finally:
        await sub.aclose()


async def main_async(args: argparse.Namespace) -> int:
    print(
        f"bench_notify: {args.repeats} repeats of {args.count:,} notifications, "
        f"{args.clients} clients, {args.batch} per request; python {platform.python_version()}, "
        f"{os.cpu_count()} cores; three nodes and one node, both up, repeats interleaved"
    )
    bases = [Path(tempfile.mkdtemp(prefix="bench-notify-", dir="/tmp")) for _ in range(2)]
    for b in bases:
        os.chmod(b, 0o755)
    results: dict[int, dict[str, list[float]]] = {
        3: {"e2e": [], "intake": []},
        1: {"e2e": [], "intake": []},
    }
    try:
        async with (
            Service(bases[0], ["a", "b", "c"], seed=args.seed) as three,
            Service(bases[1], ["a"], seed=args.seed) as one,
        ):
            services = {3: three, 1: one}
            for n, svc in services.items():
                await one_repeat(svc, f"warm{n}", 300, args.clients, args.batch)
            # interleaved (3, 1, 1, 3, 3, 1, ...): a change in the machine's load hits both
            order = [3, 1]
            for r in range(args.repeats):
                for n in order if r % 2 == 0 else order[::-1]:
                    a, b = await one_repeat(
                        services[n], f"n{n}-{r}", args.count, args.clients, args.batch
                    )
                    results[n]["e2e"].append(a)
                    results[n]["intake"].append(b)
                    print(
                        f"  {n} node(s), repeat {r + 1}: {a:,.0f} notifications/s end to end"
                        f" (intake {b:,.0f}/s)",
                        flush=True,
                    )
    finally:
        for b in bases:
            shutil.rmtree(b, ignore_errors=True)
    m3, m1 = statistics.median(results[3]["e2e"]), statistics.median(results[1]["e2e"])
    i3, i1 = statistics.median(results[3]["intake"]), statistics.median(results[1]["intake"])
    print()
    print(f"{'':<10}{'end to end (median)':>22}{'intake (median)':>18}")
    print(f"{'3 nodes':<10}{m3:>16,.0f} /s   {i3:>12,.0f} /s")
    print(f"{'1 node':<10}{m1:>16,.0f} /s   {i1:>12,.0f} /s")
    print(f"ratio 3 nodes / 1 node: {m3 / m1:.2f}x end to end, {i3 / i1:.2f}x intake")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    why = missing()
    if why:
        print(f"bench_notify: {why}", file=sys.stderr)
        return 2
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

"""The notification service's disaster-recovery drills, under load, with a report.

    scripts/notify-demo [--drill node|region|database|all] [--rolling] [--seed N]
                        [--rate R] [--no-netns] [--partition S] [--keep] [--json FILE]

Starts the whole service on this machine (examples/notify/harness.py: a throwaway NATS
with JetStream, a PostgreSQL primary and synchronous streaming replica, simulated APNS
and FCM, and three ``trellis run`` nodes: ``a`` in region east, ``b`` and ``c`` in
region west), puts a steady mixed load on it (high/normal/bulk notifications of one or
two device tokens, submitted by a client that retries another node with the same
idempotency key) plus a bulk campaign per drill, and runs the drills one after the
other, each under that load, with recovery in between:

- ``node``: ``kill -9`` one node (drawn from the seed), restart it 5 s later;
- ``region``: as root with iproute2, a network partition: the west nodes run in a
  network namespace, its veth goes down for 8 s with them running (they fence
  themselves, node ``a`` takes over), then up (they rejoin); otherwise (or with
  ``--no-netns``) ``kill -9`` both west nodes at once, restart them 8 s later. The
  report names the mode;
- ``database``: stop the PostgreSQL primary (``pg_ctl stop -m immediate``) and promote
  the replica (``pg_ctl promote``);
- ``rolling``: SIGTERM each node in turn (taken out of the client's rotation first),
  wait for it to exit, start it again, wait until it serves, next.

Then it waits until every accepted notification was shown, and reports per drill the
measured RTO and RPO (definitions: :func:`measure_rto`, :func:`measure_rpo` and the
README), the notifications lost, the ids a device was shown twice and the provider
repeats, next to the recovery objectives. Exit status 0 only if nothing accepted was
lost and nothing was shown twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DRILLS",
    "OBJECTIVES",
    "Options",
    "Phase",
    "main",
    "measure_rpo",
    "measure_rto",
    "percentile",
    "render",
    "run",
]

DRILLS = ("node", "region", "database")
#: the seed objectives: drill -> (RTO seconds, RPO seconds)
OBJECTIVES: dict[str, tuple[float, float]] = {
    "node": (300.0, 0.0),
    "region": (900.0, 300.0),
    "database": (1800.0, 900.0),
}
REGIONS = {"a": "east", "b": "west", "c": "west"}
PRIORITY_MIX = (("high", 0.2), ("normal", 0.5), ("bulk", 0.3))


# ---------------------------------------------------------------------------
# The measures (pure functions of a timeline; unit-tested)
# ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values`` (``inf`` counts as a value)."""
    if not values:
        raise ValueError("percentile of nothing")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Bucket:
    start: float  # seconds after the failure
    attempts: int
    accepted: int
    deliveries: int
    p99: (
        float | None
    )  # time-to-send p99 of deliveries accepted in the bucket (inf: some never shown)
    good: bool

    def doc(self) -> dict[str, Any]:
        p99 = None if self.p99 is None else (self.p99 if math.isfinite(self.p99) else "never")
        return {
            "t": round(self.start, 3),
            "attempts": self.attempts,
            "accepted": self.accepted,
            "deliveries": self.deliveries,
            "p99_s": p99 if not isinstance(p99, float) else round(p99, 4),
            "good": self.good,
        }


def measure_rto(
    fault: float,
    end: float,
    attempts: Iterable[tuple[float, bool]],
    deliveries: Iterable[tuple[float, float | None]],
    *,
    slo_p99: float,
    min_acceptance: float = 0.99,
    consecutive: int = 3,
    width: float = 1.0,
    since: float | None = None,
) -> tuple[float | None, list[Bucket]]:
    """The recovery time after a failure at ``fault`` (None: not recovered by ``end``).

    ``attempts`` are the client's intake requests ``(start time, answered 202)``;
    ``deliveries`` are ``(client's accept time, provider's first-shown time or None)``,
    one per deliverable (notification, device token). Time is cut into ``width``-second
    buckets from ``fault`` on; a bucket is *good* when it saw at least one request, at
    least ``min_acceptance`` of its requests were accepted, and the p99 time-to-send of
    the deliveries accepted in it (never shown = infinite) is at most ``slo_p99``.

    RTO = the larger of
      * the start of the first bucket after the last bad one (0 if none was bad),
        provided at least ``consecutive`` good buckets follow until ``end``: from
        then on, every bucket is good; and
      * the time the last delivery that missed the SLO, of those accepted from
        ``since`` until that bucket, was shown (the work the failure stranded or
        delayed is out),
    both counted from ``fault``. None (not recovered by ``end``) when fewer than
    ``consecutive`` good buckets end the window or a delivery of that span was never
    shown.
    """
    attempts = list(attempts)
    deliveries = list(deliveries)
    n = int((end - fault) // width)
    buckets: list[Bucket] = []
    for k in range(n):
        lo, hi = fault + k * width, fault + (k + 1) * width
        tried = [ok for t, ok in attempts if lo <= t < hi]
        tts = [
            (shown - acc) if shown is not None else math.inf
            for acc, shown in deliveries
            if lo <= acc < hi
        ]
        p99 = percentile(tts, 99) if tts else None
        accepted = sum(tried)
        good = (
            bool(tried)
            and accepted >= min_acceptance * len(tried)
            and (p99 is None or p99 <= slo_p99)
        )
        buckets.append(Bucket(k * width, len(tried), accepted, len(tts), p99, good))
    bad = [k for k, b in enumerate(buckets) if not b.good]
    first_good = bad[-1] + 1 if bad else 0
    if n - first_good < consecutive:
        return None, buckets
    back = first_good * width
    lo = -math.inf if since is None else since
    hi = fault + back
    for acc, shown in deliveries:
        if lo <= acc < hi:
            if shown is None:
                return None, buckets
            if shown - acc > slo_p99:
                back = max(back, shown - fault)
    return back, buckets


def measure_rpo(lost_accept_times: Iterable[float]) -> tuple[int, float]:
    """``(notifications lost, seconds)``: the data lost, as a count and as the span of
    time its acceptances cover (0 s when one or none was lost)."""
    times = sorted(lost_accept_times)
    if not times:
        return 0, 0.0
    return len(times), times[-1] - times[0]


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


@dataclass
class Options:
    drills: list[str] = field(default_factory=lambda: list(DRILLS))
    rolling: bool = True
    seed: int = 7
    rate: float = 100.0  # notifications/s submitted by the steady load
    campaign: int = 400  # notifications per drill's campaign (0: none)
    window: float = 20.0  # seconds observed after each fault
    warmup: float = 3.0
    slo_p99: float = 1.0  # time-to-send p99 objective, seconds (node.toml: 1 s)
    keep: bool = False
    json: Path | None = None
    settle: float = 90.0  # seconds to wait for every accepted notification at the end
    promote_after: float = 0.0  # database drill: seconds between the stop and the promote
    #: region drill: partition region west in a network namespace when possible (root,
    #: iproute2); False, or when namespaces cannot be made: kill -9 its processes
    netns: bool = True
    partition: float = 8.0  # region drill: seconds the region is cut off (or down)


@dataclass
class Phase:
    name: str
    start: float
    fault: float = 0.0
    end: float = 0.0
    events: list[tuple[float, str]] = field(default_factory=list)
    campaign: tuple[str, int, float] | None = None  # (id, total, registered at)
    facts: dict[str, Any] = field(default_factory=dict)  # drill specifics for the report

    def note(self, what: str) -> None:
        self.events.append((time.time(), what))
        print(f"  {time.strftime('%H:%M:%S')} {self.name}: {what}", flush=True)


class Load:
    """The steady mixed load: ``rate`` notifications/s in requests of ``per_request``."""

    def __init__(self, sub: Any, rate: float, seed: int, per_request: int = 5) -> None:
        self.sub = sub
        self.rate = rate
        self.rng = random.Random(seed)
        self.per_request = per_request
        self.prefix = f"s{seed}"
        self.n = 0
        self.tasks: set[asyncio.Task[bool]] = set()
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    def _doc(self) -> dict[str, Any]:
        self.n += 1
        key = f"{self.prefix}-{self.n}"
        r = self.rng.random()
        priority = "bulk"
        for prio, share in PRIORITY_MIX:
            if r < share:
                priority = prio
                break
            r -= share
        tokens = [f"apns:{key}"] if self.rng.random() < 0.5 else [f"fcm:{key}"]
        if self.rng.random() < 0.4:
            tokens = [f"apns:{key}", f"fcm:{key}"]
        return {"key": key, "priority": priority, "tokens": tokens, "payload": {"n": self.n}}

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.per_request / self.rate
        next_at = loop.time()
        while not self._stop.is_set():
            if len(self.tasks) < 400:  # a stalled service does not pile up unbounded work
                docs = [self._doc() for _ in range(self.per_request)]
                task = asyncio.create_task(self.sub.submit(docs, retry_for=60.0))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            next_at += interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - loop.time()))

    async def stop(self) -> None:
        self._stop.set()
        if self._runner is not None:
            await self._runner
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def _campaign(svc: Any, phase: Phase, total: int) -> None:
    import httpx

    cid = f"camp-{phase.name}"
    async with httpx.AsyncClient(timeout=5.0) as http:
        for _ in range(100):
            for url in svc.live_urls():
                with contextlib.suppress(httpx.HTTPError):
                    r = await http.post(
                        f"{url}/v1/campaigns",
                        json={"id": cid, "total": total, "priority": "bulk"},
                    )
                    if r.status_code == 202:
                        phase.campaign = (cid, total, time.time())
                        phase.note(f"campaign {cid} of {total} bulk notifications registered")
                        return
            await asyncio.sleep(0.2)
    phase.note(f"campaign {cid} could not be registered")


async def _restart(svc: Any, names: Sequence[str], phase: Phase) -> None:
    await asyncio.gather(*(asyncio.to_thread(svc.nodes[n].start) for n in names))
    phase.note(f"node{'s' if len(names) > 1 else ''} {', '.join(names)} serving again")


async def _sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.time()))


async def drill_node(svc: Any, phase: Phase, opts: Options, rng: random.Random) -> None:
    victim = rng.choice(sorted(svc.nodes))
    phase.fault = time.time()
    svc.nodes[victim].kill()
    phase.note(f"kill -9 node {victim}")
    await asyncio.sleep(5.0)
    await _restart(svc, [victim], phase)


async def drill_region(svc: Any, phase: Phase, opts: Options, rng: random.Random) -> None:
    west = sorted(n for n, node in svc.nodes.items() if node.region == "west")
    if svc.netns is not None:
        await _partition_region(svc, phase, opts, "west", west)
        return
    phase.facts = {"mode": KILLED, "why": svc.netns_reason}
    phase.fault = time.time()
    for n in west:
        svc.nodes[n].kill()
    phase.note(
        f"kill -9 region west (nodes {', '.join(west)}; no network namespace: {svc.netns_reason})"
    )
    await asyncio.sleep(opts.partition)
    await _restart(svc, west, phase)


PARTITION = "network namespace partition"
KILLED = "processes killed"
SINGLETONS = ("scheduler", "reaper")


def _lease_name(key: str) -> str:
    """``root.scheduler`` -> ``scheduler``; ``dsup.<hex>.<hex>`` -> ``dispatchers/high-0``."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "dsup":
        with contextlib.suppress(ValueError):
            return f"{bytes.fromhex(parts[1]).decode()}/{bytes.fromhex(parts[2]).decode()}"
    return key.removeprefix("root.")


async def _singletons_into(svc: Any, phase: Phase, nodes: list[str]) -> dict[str, str]:
    """Move the cluster singletons onto ``nodes`` (stop each where it runs, wait until
    one of ``nodes`` took its lease, start it again there as a standby), so that the
    partition shows them fenced and taken over. Who holds them afterwards."""
    holders = {_lease_name(k): n for k, n in (await svc.lease_holders()).items()}
    moved = []
    for name in SINGLETONS:
        holder = holders.get(name)
        if holder is None or holder in nodes:
            continue
        await svc.control(holder, "stop", name, "--reason", "region drill: move into west")
        for _ in range(50):
            await asyncio.sleep(0.2)
            holders = {_lease_name(k): n for k, n in (await svc.lease_holders()).items()}
            if holders.get(name) in nodes:
                break
        await svc.control(holder, "start", name)
        moved.append(f"{name} {holder} -> {holders.get(name)}")
    if moved:
        phase.note(f"singletons moved into the region first: {', '.join(moved)}")
    return {name: holders.get(name, "?") for name in SINGLETONS}


async def _partition_region(
    svc: Any, phase: Phase, opts: Options, region: str, names: list[str]
) -> None:
    """Cut ``region`` off (its veth down) for ``opts.partition`` seconds with its nodes
    running, heal it and let them rejoin; record what fenced them (their journals and
    their own view of their leases) and who took over."""
    others = sorted(n for n in svc.nodes if n not in names)
    singletons = await _singletons_into(svc, phase, names)
    before = await svc.lease_holders()
    phase.fault = time.time()
    svc.cut(region)
    link = svc.netns.host_link(region)
    phase.note(
        f"network partition: region {region} (nodes {', '.join(names)}) cut off "
        f"(ip link set {link} down); its processes keep running (scheduler on "
        f"{singletons['scheduler']}, reaper on {singletons['reaper']})"
    )
    alive = True
    held_late: dict[str, int] = dict.fromkeys(names, 0)  # leases a node still counted held
    views = 0
    heal_at = phase.fault + opts.partition
    while time.time() < heal_at:
        await asyncio.sleep(min(0.5, max(0.0, heal_at - time.time())))
        alive = alive and all(svc.nodes[n].alive for n in names)
        if time.time() - phase.fault < 2.0:  # lease_ttl 1 s: fenced by then
            continue
        for n in names:
            view = await svc.cluster_view(n)
            if view is not None:
                views += 1
                held = sum(1 for lease in view.get("leases", []) if lease.get("held"))
                held_late[n] = max(held_late[n], held)
    svc.heal(region)
    healed = time.time()
    phase.note(f"healed (ip link set {link} up)")
    back = await svc.rejoin(names, timeout=30.0)
    phase.note(
        f"node{'s' if len(back) > 1 else ''} {', '.join(back) or 'none'} rejoined "
        "(intake connected to NATS, back in rotation)"
    )
    fenced: dict[str, dict[str, Any]] = {}
    for n in names:
        lost = [
            r
            for r in svc.journal(n, "cluster.lease")
            if r["data"].get("action") == "lost" and phase.fault <= r["time"] <= healed
        ]
        fenced[n] = {
            "leases": sorted({_lease_name(str(r["data"].get("lease"))) for r in lost}),
            "first_s": round(min(r["time"] for r in lost) - phase.fault, 2) if lost else None,
            "last_s": round(max(r["time"] for r in lost) - phase.fault, 2) if lost else None,
            "why": sorted({str(r["data"].get("why")) for r in lost}),
            "held_after_2s": held_late[n],
        }
        if lost:
            singles = ", ".join(x for x in fenced[n]["leases"] if "/" not in x)
            phase.events.append(
                (
                    max(r["time"] for r in lost),
                    f"node {n}: fenced by its own clock, process alive: "
                    f"{len(fenced[n]['leases'])} leases lost "
                    f"({singles + ' and ' if singles else ''}dispatchers), their children stopped",
                )
            )
    taken: dict[str, dict[str, Any]] = {}
    for n in others:
        got = [
            r
            for r in svc.journal(n, "cluster.lease")
            if r["data"].get("action") == "acquired" and phase.fault <= r["time"] <= healed
        ]
        if got:
            taken[n] = {
                "leases": sorted({_lease_name(str(r["data"].get("lease"))) for r in got}),
                "first_s": round(min(r["time"] for r in got) - phase.fault, 2),
                "last_s": round(max(r["time"] for r in got) - phase.fault, 2),
            }
            phase.events.append(
                (
                    max(r["time"] for r in got),
                    f"node {n} took over {len(taken[n]['leases'])} leases "
                    f"(from +{taken[n]['first_s']:.1f} s)",
                )
            )
    phase.events.sort()
    phase.facts = {
        "mode": PARTITION,
        "region": region,
        "nodes": names,
        "namespace": svc.netns.ns(region),
        "link": link,
        "subnet": svc.netns.subnet,
        "singletons_at_cut": singletons,
        "held_at_cut": {
            n: sorted(_lease_name(k) for k, h in before.items() if h == n) for n in names
        },
        "alive_during_partition": alive,
        "views_during_partition": views,
        "fenced": fenced,
        "taken_over": taken,
        "healed_at_s": round(healed - phase.fault, 2),
        "rejoined": back,
    }


async def drill_database(svc: Any, phase: Phase, opts: Options, rng: random.Random) -> None:
    phase.fault = time.time()
    await asyncio.to_thread(svc.pg.stop_primary)
    phase.note("PostgreSQL primary stopped (pg_ctl stop -m immediate)")
    await asyncio.sleep(opts.promote_after)
    await asyncio.to_thread(svc.pg.promote)
    phase.note("replica promoted (pg_ctl promote): it is the primary now")


async def drill_rolling(svc: Any, phase: Phase, opts: Options, rng: random.Random) -> None:
    import httpx

    phase.fault = time.time()
    async with httpx.AsyncClient(timeout=2.0) as http:
        for name in sorted(svc.nodes):
            node = svc.nodes[name]
            phase.note(f"node {name}: out of rotation, SIGTERM, draining")
            code = await asyncio.to_thread(node.stop, 60.0)
            phase.note(f"node {name}: exited {code}; starting it again")
            await asyncio.to_thread(node.start)
            for _ in range(100):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{node.url}/v1/health")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            phase.note(f"node {name}: serving")


DRILL_FUNCS = {
    "node": drill_node,
    "region": drill_region,
    "database": drill_database,
    "rolling": drill_rolling,
}


async def run(opts: Options, base: Path) -> dict[str, Any]:
    """Start the service under ``base``, run the drills, return the report document."""
    from examples.notify.harness import Service

    rng = random.Random(opts.seed)
    names = [*opts.drills, *(["rolling"] if opts.rolling else [])]
    t0 = time.time()
    print(f"starting NATS, PostgreSQL (primary + replica), providers, nodes in {base}")
    svc = Service(base, dict(REGIONS), seed=opts.seed, netns=opts.netns and "region" in opts.drills)
    try:
        await asyncio.to_thread(svc.start)
        started = time.time()
        print(f"service up in {started - t0:.1f} s: nodes {', '.join(svc.live_urls())}")
        if svc.netns is not None:
            spaces = ", ".join(svc.netns.ns(r) for r in svc.netns.regions)
            print(
                f"regions in network namespaces ({spaces}; {svc.netns.subnet}); "
                f"NATS, PostgreSQL and providers on {svc.netns.core}"
            )
        elif "region" in opts.drills:
            print(f"no network namespaces ({svc.netns_reason}): the region drill kills processes")
        sub = svc.submitter()
        load = Load(sub, opts.rate, opts.seed)
        phases: list[Phase] = []
        try:
            # the cluster settles first (the later nodes take their share of the
            # dispatchers), then the baseline is measured under the steady load
            probe = [{"key": f"probe-{opts.seed}", "priority": "high", "tokens": ["apns:p"]}]
            await sub.submit(probe)
            await svc.settled(sub.expected_ids(), timeout=30.0)
            await asyncio.sleep(2.0)
            sub.accepted.clear()
            sub.log.clear()
            warm = Phase("baseline", time.time())
            phases.append(warm)
            load.start()
            warm.note(f"steady load of {opts.rate:g} notifications/s")
            await asyncio.sleep(opts.warmup)
            warm.fault = warm.end = time.time()
            for name in names:
                phase = Phase(name, time.time())
                phases.append(phase)
                if opts.campaign > 0:
                    await _campaign(svc, phase, opts.campaign)
                await asyncio.sleep(2.0)
                await DRILL_FUNCS[name](svc, phase, opts, rng)
                await _sleep_until(max(phase.fault + opts.window, time.time() + 5.0))
                phase.end = time.time()
            await load.stop()
            print("load stopped; waiting until every accepted notification was shown")
            expected = sub.expected_ids() | _campaign_ids(phases)
            shown_counts = await svc.settled(expected, timeout=opts.settle)
            report = await _report(svc, sub, phases, opts, expected)
            report["network"] = (
                {"mode": "network namespaces", "subnet": svc.netns.subnet}
                if svc.netns is not None
                else {"mode": "loopback", "why": svc.netns_reason}
            )
            report["service_start_s"] = round(started - t0, 2)
            report["run_s"] = round(time.time() - t0, 1)
            if opts.keep:
                report["kept"] = {
                    "dir": str(base),
                    "nodes": {n: node.url for n, node in svc.nodes.items()},
                }
            del shown_counts
        finally:
            await load.stop()
            await sub.aclose()
        if opts.keep:
            _publish(report, opts)
            print(f"--keep: the service runs on ({', '.join(svc.live_urls())}); Ctrl-C stops it")
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        return report
    finally:
        await asyncio.to_thread(svc.stop)


def _campaign_ids(phases: Iterable[Phase]) -> set[str]:
    from examples.notify.scheduler import campaign_tokens

    out = set()
    for ph in phases:
        if ph.campaign:
            cid, total, _ = ph.campaign
            out |= {f"{cid}:{i}:{t}" for i in range(total) for t in campaign_tokens(cid, i)}
    return out


async def _pg_records(svc: Any, timeout: float = 20.0) -> dict[str, str]:
    """``{provider id: state}`` of every delivery row, once none is claimed/pending."""
    import psycopg

    deadline = time.monotonic() + timeout
    rows: list[tuple[str, str, str]] = []
    while True:
        async with await psycopg.AsyncConnection.connect(svc.pg.write_dsn) as conn:
            cur = await conn.execute("SELECT key, token, state FROM deliveries")
            rows = [(str(k), str(t), str(s)) for k, t, s in await cur.fetchall()]
        if all(s not in ("claimed", "pending") for _, _, s in rows):
            break
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    return {f"{k}:{t}": s for k, t, s in rows}


async def _report(
    svc: Any, sub: Any, phases: list[Phase], opts: Options, expected: set[str]
) -> dict[str, Any]:
    provider = await svc.provider_deliveries()
    first: dict[str, float] = {}
    counts: dict[str, int] = {}
    repeats: dict[str, int] = {}
    for d in provider.values():
        for pid, rec in d.get("shown", {}).items():
            counts[pid] = counts.get(pid, 0) + int(rec["count"])
            first[pid] = min(first.get(pid, math.inf), float(rec["first"]))
        for pid, n in d.get("repeats", {}).items():
            repeats[pid] = repeats.get(pid, 0) + int(n)
    deliverable = svc.deliverable(expected)
    records = await _pg_records(svc)

    # who belongs to which phase: client notifications by accept time, campaigns by phase
    def phase_of(t: float) -> Phase:
        owner = phases[0]
        for ph in phases:
            if t >= ph.start:
                owner = ph
        return owner

    accept_of: dict[str, float] = {}
    for key, doc in sub.accepted.items():
        for tok in doc["tokens"]:
            accept_of[f"{key}:{tok}"] = float(doc["accepted_at"])
    campaign_of: dict[str, Phase] = {}
    for ph in phases:
        if ph.campaign:
            cid = ph.campaign[0]
            for pid in expected:
                if pid.startswith(f"{cid}:"):
                    campaign_of[pid] = ph

    def owner(pid: str) -> Phase | None:
        if pid in accept_of:
            return phase_of(accept_of[pid])
        return campaign_of.get(pid)

    per: dict[str, dict[str, Any]] = {
        ph.name: {"lost": [], "twice": 0, "repeats": 0, "deliveries": 0} for ph in phases
    }
    for pid in deliverable:
        of = owner(pid)
        if of is None:
            continue
        per[of.name]["deliveries"] += 1
        if pid not in counts:
            when = accept_of.get(pid, of.campaign[2] if of.campaign else of.start)
            per[of.name]["lost"].append((when, pid))
    for pid, n in counts.items():
        of = owner(pid)
        if of is not None and n > 1:
            per[of.name]["twice"] += 1
    for pid, n in repeats.items():
        of = owner(pid)
        if of is not None:
            per[of.name]["repeats"] += n

    attempts = [(start, status == 202) for start, _end, _n, status in sub.log]
    client_deliveries = [
        (accept_of[pid], first.get(pid)) for pid in deliverable if pid in accept_of
    ]
    sent_rows = {pid for pid, s in records.items() if s == "sent"}
    shown = set(counts)
    missing_records = sorted(shown - sent_rows)
    phantom_records = sorted(sent_rows - shown)

    drills = []
    base_tts = [
        s - a
        for a, s in client_deliveries
        if s is not None and phases[0].start <= a < phases[0].end
    ]
    for ph in phases[1:]:
        rto, buckets = measure_rto(
            ph.fault,
            ph.end,
            attempts,
            client_deliveries,
            slo_p99=opts.slo_p99,
            since=ph.start,
        )
        lost = per[ph.name]["lost"]
        n_lost, rpo_s = measure_rpo(t for t, _ in lost)
        obj = OBJECTIVES.get(ph.name)
        worst = [b for b in buckets if not b.good]
        entry: dict[str, Any] = {
            "drill": ph.name,
            "fault_at_s": round(ph.fault - phases[0].start, 2),
            "rto_s": None if rto is None else round(rto, 2),
            "rpo_lost": n_lost,
            "rpo_s": round(rpo_s, 2),
            "lost": n_lost,
            "lost_ids": [pid for _, pid in sorted(lost)[:20]],
            "shown_twice": per[ph.name]["twice"],
            "provider_repeats": per[ph.name]["repeats"],
            "deliveries": per[ph.name]["deliveries"],
            "events": [(round(t - ph.fault, 2), what) for t, what in ph.events],
            "bad_buckets": len(worst),
            "min_acceptance": min(
                (b.accepted / b.attempts for b in buckets if b.attempts), default=None
            ),
            "max_p99_s": max(
                (b.p99 for b in buckets if b.p99 is not None and math.isfinite(b.p99)),
                default=None,
            ),
            "buckets": [b.doc() for b in buckets],
        }
        if obj is not None:
            entry["objective_rto_s"], entry["objective_rpo_s"] = obj
            entry["rto_met"] = rto is not None and rto <= obj[0]
            entry["rpo_met"] = n_lost == 0 or (obj[1] > 0 and rpo_s <= obj[1])
        if ph.facts:
            entry["mode"] = ph.facts.get("mode")
            entry["facts"] = ph.facts
        if ph.name == "database":
            entry["records_missing_after_promote"] = len(missing_records)
            entry["records_sent_never_shown"] = len(phantom_records)
        drills.append(entry)

    lost_total = sum(len(v["lost"]) for v in per.values())
    twice_total = sum(1 for n in counts.values() if n > 1)
    # a drain finishes its batches and hands back the rest: it must re-send nothing (a
    # kill -9 may re-send the chunk in flight, which the provider's id shows once)
    drain_repeats = per["rolling"]["repeats"] if "rolling" in per else 0
    ok = lost_total == 0 and twice_total == 0 and drain_repeats == 0
    return {
        "command": "scripts/notify-demo " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "seed": opts.seed,
        "rate": opts.rate,
        "nodes": dict(REGIONS),
        "slo": {"time_to_send_p99_s": opts.slo_p99, "acceptance": 0.99, "bucket_s": 1.0},
        "objectives": {k: {"rto_s": v[0], "rpo_s": v[1]} for k, v in OBJECTIVES.items()},
        "baseline": {
            "deliveries": len(base_tts),
            "time_to_send_p50_s": round(percentile(base_tts, 50), 4) if base_tts else None,
            "time_to_send_p99_s": round(percentile(base_tts, 99), 4) if base_tts else None,
        },
        "drills": drills,
        "totals": {
            "accepted_notifications": len(sub.accepted),
            "refused_notifications": len(sub.failed),
            "requests": len(sub.log),
            "requests_accepted": sum(1 for *_, s in sub.log if s == 202),
            "campaign_notifications": sum(ph.campaign[1] for ph in phases if ph.campaign),
            "deliveries_expected": len(deliverable),
            "invalid_tokens": len(expected) - len(deliverable),
            "shown": len(shown & deliverable),
            "shown_unconfirmed": len(shown - expected),
            "lost": lost_total,
            "shown_twice": twice_total,
            "provider_repeats": sum(repeats.values()),
            "pg_records_missing": len(missing_records),
            "pg_records_sent_never_shown": len(phantom_records),
        },
        "ok": ok,
        "drain_repeats": drain_repeats,
    }


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def _dur(s: float | None, window: float | None = None) -> str:
    if s is None:
        return f">{window:g} s" if window else "never"
    if s >= 120:
        return f"{s / 60:.0f} min"
    return f"{s:.1f} s"


def render(report: dict[str, Any], window: float | None = None) -> str:
    """The report as text, at most 80 columns wide."""
    out = []
    t = report["totals"]
    out.append(
        f"DR drills - seed {report['seed']}, {report['rate']:g} notifications/s, "
        "nodes a (east), b, c (west)"
    )
    b = report["baseline"]
    if b["time_to_send_p99_s"] is not None:
        out.append(
            f"baseline: time to send p50 {b['time_to_send_p50_s']:.3f} s, "
            f"p99 {b['time_to_send_p99_s']:.3f} s; SLO p99 <= "
            f"{report['slo']['time_to_send_p99_s']:g} s"
        )
    out.append("")
    head = (
        f"{'drill':<9}{'RTO':>8}  {'objective':<12}{'RPO':>8}  {'objective':<12}"
        f"{'lost':>5}{'twice':>6}{'repeats':>8}"
    )
    out.append(head)
    out.append("-" * len(head))
    for d in report["drills"]:
        rto = _dur(d["rto_s"], window)
        rpo = "0" if d["rpo_lost"] == 0 else f"{d['rpo_lost']}/{d['rpo_s']:.0f}s"
        if "objective_rto_s" in d:
            o_rto = f"{_dur(d['objective_rto_s'])} {'ok' if d['rto_met'] else 'MISS'}"
            o_rpo = (
                f"{_dur(d['objective_rpo_s']) if d['objective_rpo_s'] else '0'} "
                f"{'ok' if d['rpo_met'] else 'MISS'}"
            )
        else:
            o_rto = o_rpo = "-"
        out.append(
            f"{d['drill']:<9}{rto:>8}  {o_rto:<12}{rpo:>8}  {o_rpo:<12}"
            f"{d['lost']:>5}{d['shown_twice']:>6}{d['provider_repeats']:>8}"
        )
    out.append("")
    for d in report["drills"]:
        acc = d["min_acceptance"]
        p99 = d["max_p99_s"]
        line = f"{d['drill']}: "
        if d.get("mode"):
            line += f"[{d['mode']}] "
        line += "; ".join(f"{at:+.1f} s {what}" for at, what in d["events"] if at >= -0.5)
        out.extend(_wrap(line, 80, "    "))
        worst = f"    worst second: {100 * acc:.1f} % accepted" if acc is not None else "   "
        if p99 is not None:
            worst += f", p99 {p99:.2f} s"
        worst += f"; {d['bad_buckets']} of {len(d['buckets'])} seconds under the SLO"
        if "records_missing_after_promote" in d:
            out.append(worst)
            worst = (
                f"    records missing after the promote: {d['records_missing_after_promote']}"
                f", recorded sent but never shown: {d['records_sent_never_shown']}"
            )
        out.append(worst)
    out.append("")
    out.append(
        f"accepted {t['accepted_notifications']} notifications + "
        f"{t['campaign_notifications']} from campaigns: {t['deliveries_expected']} "
        f"deliveries"
    )
    out.append(
        f"  ({t['invalid_tokens']} more to invalid tokens); shown {t['shown']}, "
        f"lost {t['lost']}, shown twice {t['shown_twice']},"
    )
    out.append(f"  provider repeats {t['provider_repeats']}")
    out.append(
        f"requests {t['requests']}, accepted {t['requests_accepted']}; "
        f"refused after retries: {t['refused_notifications']} notifications"
    )
    out.append("RTO: failure -> the SLO holds in every 1-s bucket from then on (>= 99 % of")
    out.append("requests accepted, time to send p99 <= SLO; 3 buckets at least) and all work")
    out.append("accepted before then is sent. RPO: accepted notifications never shown")
    out.append("(count/time span). twice: ids a device showed twice (must be 0).")
    out.append(
        "PASS: nothing accepted was lost, nothing shown twice, no drain re-sent anything"
        if report["ok"]
        else "FAIL: accepted notifications were lost or shown twice, or a drain re-sent"
    )
    return "\n".join(out)


def _wrap(text: str, width: int, indent: str) -> list[str]:
    lines: list[str] = []
    cur = ""
    for word in text.split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = indent + word
        else:
            cur = f"{cur} {word}" if cur else word
    if cur:
        lines.append(cur)
    return lines


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="scripts/notify-demo",
        description="Run the notification service on this machine through "
        "disaster-recovery drills under load and report RTO/RPO.",
    )
    p.add_argument("--drill", choices=[*DRILLS, "all", "none"], default=None)
    p.add_argument("--rolling", action="store_true", help="a rolling restart (default: with all)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rate", type=float, default=100.0, help="notifications/s (default 100)")
    p.add_argument("--campaign", type=int, default=400, help="notifications per drill campaign")
    p.add_argument("--window", type=float, default=20.0, help="seconds observed after a fault")
    p.add_argument("--slo-p99", type=float, default=1.0, help="time-to-send p99 SLO, seconds")
    p.add_argument(
        "--promote-after", type=float, default=0.0, help="database drill: seconds before promote"
    )
    p.add_argument(
        "--no-netns",
        action="store_true",
        help="region drill: kill -9 the region's processes instead of partitioning its "
        "network namespace",
    )
    p.add_argument(
        "--partition", type=float, default=8.0, help="region drill: seconds cut off (or down)"
    )
    p.add_argument("--keep", action="store_true", help="keep the service up and its directory")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    a = p.parse_args(argv)
    if a.drill is None:
        drills, rolling = (list(DRILLS), True) if not a.rolling else ([], True)
    else:
        drills = list(DRILLS) if a.drill == "all" else [] if a.drill == "none" else [a.drill]
        rolling = a.rolling
    if a.rate <= 0:
        p.error("--rate must be positive")
    return Options(
        drills=drills,
        rolling=rolling,
        seed=a.seed,
        rate=a.rate,
        campaign=a.campaign,
        window=a.window,
        slo_p99=a.slo_p99,
        promote_after=a.promote_after,
        netns=not a.no_netns,
        partition=a.partition,
        keep=a.keep,
        json=a.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from examples.notify.harness import missing

    opts = parse(argv)
    why = missing()
    if why:
        print(f"notify-demo: {why}", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="notify-demo-", dir="/tmp"))
    os.chmod(base, 0o755)  # the PostgreSQL servers run as the postgres user
    report: dict[str, Any] | None = None

    async def guarded() -> dict[str, Any]:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        return await run(opts, base)

    try:
        report = asyncio.run(guarded())
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("\nnotify-demo: interrupted; everything stopped", file=sys.stderr)
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)
        return 130
    finally:
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)
    if opts.keep:
        print(f"logs and data kept in {base}")
    else:
        _publish(report, opts)
    return 0 if report["ok"] else 1


def _publish(report: dict[str, Any], opts: Options) -> None:
    print()
    print(render(report, opts.window))
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {opts.json}")


if __name__ == "__main__":
    sys.exit(main())

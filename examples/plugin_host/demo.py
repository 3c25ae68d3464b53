"""The healthcare plugin host: third-party WASM plugins behind an HTTP API, two good
ones serving every request while four bad ones misbehave beside them.

From a fresh clone (``scripts/plugin-host-demo`` sets up ``.venv`` first)::

    scripts/plugin-host-demo                   # about 60 s of load
    scripts/plugin-host-demo --seconds 20 --json report.json

What runs: the plugins are built from source in ``plugins/`` (C for wasm32 with clang
against our own ``extism.h``; WAT with ``wasmtime.wat2wasm``). A tree ``clinic`` holds a
``trellis.PluginHost`` (``plugins``: the FHIR validator and the PHI redactor, two
instances each, and the bad ones: ``runaway`` spins, ``memory_bomb`` grows until its cap,
``trapper`` traps, ``leaker`` keeps memory until its cap) and the API (starlette on
uvicorn, loopback): ``POST /records`` runs a record through validator then redactor,
``POST /bad/{id}`` makes a bad plugin misbehave. A load generator (loopback, bounded:
each of its workers waits for its answer) posts records for ``--seconds``, in phases of
5 s: calm, then storm (the bad plugins triggered over and over, quarantined after their
crash budget and released again at the next storm). Everything is journaled (SQLite,
signed with a key) in the work directory.

The report: requests served, errors by kind, p50/p99 of the good plugin chain in calm
and in storm, every containment event, quarantines, the host's availability against
99.95% from the journal, and ``journal verify`` with the key. Exit 0 only if the good
plugins never failed a request and the host stayed up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import wasmtime
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import trellis
from trellis.journal import Journal, tail, verify

HERE = Path(__file__).resolve().parent
PLUGINS = HERE / "plugins"
GOOD = ("fhir_validator", "phi_redactor")
#: bad plugin id -> (its export, its input, its settings)
BAD: dict[str, tuple[str, bytes, dict[str, Any]]] = {
    "runaway": ("spin", b"", {"timeout": 0.25, "memory": "4MiB"}),
    "memory_bomb": ("bomb", b"", {"timeout": 2.0, "memory": "32MiB"}),
    "trapper": ("trap_on", b"boom", {"timeout": 1.0, "memory": "4MiB"}),
    "leaker": ("leak", b"", {"timeout": 1.0, "memory": "4MiB"}),
}
TARGET = 0.9995
PHASE = 5.0  # seconds of calm, then of storm, alternating


class DemoError(Exception):
    """The demo cannot run here (says why)."""


# ---------------------------------------------------------------------------
# Building the plugins
# ---------------------------------------------------------------------------


def build(out: Path) -> dict[str, Path]:
    """The modules, built from the sources in plugins/ (no binary is shipped)."""
    missing = [t for t in ("clang", "wasm-ld") if shutil.which(t) is None]
    if missing:
        raise DemoError(
            f"{' and '.join(missing)} not found: the C plugins need clang and lld "
            "(apt-get install clang lld)"
        )
    subprocess.run([str(PLUGINS / "build.sh"), str(out), *GOOD], check=True, timeout=300)
    bad = out / "misbehave.wasm"
    bad.write_bytes(bytes(wasmtime.wat2wasm((PLUGINS / "misbehave.wat").read_text())))
    return {**{g: out / f"{g}.wasm" for g in GOOD}, **dict.fromkeys(BAD, bad)}


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------

FAMILIES = ["Lee", "Silva", "Okafor", "Nguyen", "Kowalski", "Haddad", "Tanaka", "Moreau"]
GIVEN = ["Ann", "Marie", "João", "Chidi", "Linh", "Piotr", "Yusuf", "Aiko", "Léa"]


def record(rng: random.Random) -> dict[str, Any]:
    """A Patient resource; about one in five is invalid in some way."""
    r: dict[str, Any] = {
        "resourceType": "Patient",
        "id": f"p{rng.randrange(10**6)}",
        "name": [{"family": rng.choice(FAMILIES), "given": rng.sample(GIVEN, 2)}],
        "gender": rng.choice(["male", "female", "other", "unknown"]),
        "birthDate": f"{rng.randrange(1925, 2024)}-{rng.randrange(1, 13):02}-"
        f"{rng.randrange(1, 29):02}",
        "telecom": [{"system": "phone", "value": f"+1 555 {rng.randrange(10**7):07}"}],
        "identifier": [
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": f"{rng.randrange(10**9):09}"}
        ],
        "note": f"seen on {rng.randrange(1, 29)}/3, call {rng.randrange(10**10):010}",
    }
    flaw = rng.randrange(10)
    if flaw == 0:
        r["birthDate"] = "2001-02-30"
    elif flaw == 1:
        del r["id"]
    return r


# ---------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------


@dataclass
class Served:
    """What the API saw (kept by the API itself, read by the report)."""

    chain: dict[str, list[float]] = field(default_factory=lambda: {"calm": [], "storm": []})
    ok: int = 0
    good_failures: Counter[str] = field(default_factory=Counter)
    bad_outcomes: Counter[str] = field(default_factory=Counter)
    phase: str = "calm"


def make_app(host: trellis.PluginHost, served: Served) -> Starlette:
    async def records(request: Request) -> JSONResponse:
        body = await request.body()
        t = time.perf_counter()
        try:
            verdict = json.loads(await host.call("fhir_validator", "validate", body))
            redacted = await host.call("phi_redactor", "redact", body)
        except trellis.PluginError as e:
            served.good_failures[e.kind] += 1
            return JSONResponse({"error": e.kind, "message": e.message}, status_code=502)
        except trellis.TrellisError as e:
            served.good_failures[type(e).__name__] += 1
            return JSONResponse({"error": str(e)}, status_code=503)
        served.chain[served.phase].append(time.perf_counter() - t)
        served.ok += 1
        return JSONResponse({**verdict, "record": json.loads(redacted)})

    async def bad(request: Request) -> JSONResponse:
        pid = request.path_params["id"]
        if pid not in BAD:
            return JSONResponse({"error": "no such plugin"}, status_code=404)
        function, data, _ = BAD[pid]
        try:
            await host.call(pid, function, data)
            kind = "ok"
        except trellis.PluginError as e:
            kind = e.kind
        served.bad_outcomes[f"{pid}:{kind}"] += 1
        return JSONResponse({"plugin": pid, "kind": kind})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"plugins": host.list()})

    return Starlette(
        routes=[
            Route("/records", records, methods=["POST"]),
            Route("/bad/{id}", bad, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


async def serve(app: Starlette, port: int) -> None:
    """The API as a child: uvicorn on a socket of our own, shut down cleanly when the
    tree stops it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        await task
        raise
    finally:
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------


async def load(
    url: str, seconds: float, served: Served, host: trellis.PluginHost, phase_seconds: float
) -> Counter[int]:
    statuses: Counter[int] = Counter()
    end = time.monotonic() + seconds
    rng = random.Random(7)

    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:

        async def worker(n: int) -> None:
            r = random.Random(n)
            while time.monotonic() < end:
                resp = await client.post("/records", content=json.dumps(record(r)))
                statuses[resp.status_code] += 1

        async def storms() -> None:
            t0 = time.monotonic()
            while time.monotonic() < end:
                phase = "storm" if int((time.monotonic() - t0) / phase_seconds) % 2 else "calm"
                if phase != served.phase:
                    served.phase = phase
                    if phase == "storm":  # a new storm: let the quarantined ones out again
                        for row in host.list():
                            if row["state"] == "quarantined":
                                await host.release(row["id"])
                if phase == "storm":
                    await client.post(f"/bad/{rng.choice(list(BAD))}")
                    await asyncio.sleep(0.05)
                else:
                    await asyncio.sleep(0.05)

        await asyncio.gather(storms(), *(worker(i) for i in range(6)))
    return statuses


# ---------------------------------------------------------------------------
# The run and its report
# ---------------------------------------------------------------------------


def q(xs: list[float], p: int) -> float | None:
    if len(xs) < 2:
        return None
    return statistics.quantiles(xs, n=100)[p - 1]


def journal_report(url: str, key: str, anchor: Path) -> dict[str, Any]:
    records = list(tail(url, n=0, since_seq=1))
    kinds = Counter(r["kind"] for r in records)
    start = min(float(r["mono"]) for r in records)
    end = max(float(r["mono"]) for r in records)
    down = 0.0
    down_since: float | None = None
    for r in records:  # the host (clinic/plugins) and the API (clinic/api): up or down
        if r.get("path") not in ("clinic/plugins", "clinic/api"):
            continue
        if r["kind"] == "child.exited" and down_since is None:
            down_since = float(r["mono"])
        elif r["kind"] in ("child.started", "child.restarted") and down_since is not None:
            down += float(r["mono"]) - down_since
            down_since = None
    if down_since is not None:
        down += end - down_since
    span = max(end - start, 1e-9)
    v = verify(url, key, anchor=anchor)
    return {
        "records": len(records),
        "by_kind": {k: n for k, n in sorted(kinds.items()) if k.startswith("plugin.")},
        "host_seconds": span,
        "host_down_seconds": down,
        "host_availability": 1.0 - down / span,
        "verify_ok": v.ok,
        "verify_records": v.records,
        "verify_signed": v.signed,
        "verify_problem": v.problem,
    }


async def run(seconds: float, workdir: Path, phase_seconds: float = PHASE) -> dict[str, Any]:
    modules = await asyncio.to_thread(build, workdir / "wasm")
    key = secrets.token_hex(32)
    url = f"sqlite:///{workdir / 'journal.db'}"
    anchor = workdir / "journal.anchor"
    journal = Journal(url, node="clinic", key=key, anchor=anchor)
    events: list[dict[str, Any]] = []
    names = [
        "plugin.crashed",
        "plugin.quarantined",
        "plugin.released",
        "plugin.restarted",
        "plugin.loaded",
    ]
    hid = trellis.telemetry.attach(events.append, names)
    host = trellis.PluginHost(name="plugins", intensity=3, period=10.0)
    served = Served()
    port = free_port()
    await journal.start()
    sup = None
    try:
        sup = await trellis.Supervisor.start_link(
            [host.child_spec(), trellis.worker("api", serve, make_app(host, served), port)],
            name="clinic",
        )
        for g in GOOD:
            await host.load(
                g,
                modules[g],
                version="1.0.0",
                memory="16MiB",
                timeout=2.0,
                instances=2,
                config={"max_year": "2026"},
            )
        for b, (_, _, settings) in BAD.items():
            await host.load(b, modules[b], version="0.0.1-bad", **settings)
        api = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=api) as c:
            for _ in range(200):  # uvicorn binds in its own time
                with contextlib.suppress(httpx.TransportError):
                    if (await c.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.02)
        print(f"clinic up: API {api}, journal {url}; load for {seconds:.0f} s...", flush=True)
        statuses = await load(api, seconds, served, host, phase_seconds)
        host_rows = host.list()
        api_pid = next(i.pid for i in await sup.which_children() if i.id == "api")
        host_up = bool(host.sup is not None and host.sup.alive and api_pid)
    finally:
        if sup is not None and sup.alive:
            await sup.stop()
        trellis.telemetry.detach(hid)
        await journal.stop()
    jr = await asyncio.to_thread(journal_report, url, key, anchor)
    containment = Counter(
        f"{e['plugin']}: {e.get('event').split('.')[1]}"
        + (f" ({trellis_class(e.get('reason'))})" if e.get("reason") is not None else "")
        for e in events
        if e["event"] != "plugin.loaded"
    )
    good_crashes = [e for e in events if e["event"] == "plugin.crashed" and e["plugin"] in GOOD]
    report = {
        "seconds": seconds,
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "served_ok": served.ok,
        "good_plugin_failures": dict(served.good_failures),
        "bad_plugin_outcomes": dict(sorted(served.bad_outcomes.items())),
        "chain_latency_ms": {
            phase: {
                "n": len(xs),
                "p50": (q(xs, 50) or 0) * 1000,
                "p99": (q(xs, 99) or 0) * 1000,
            }
            for phase, xs in served.chain.items()
        },
        "containment": dict(sorted(containment.items())),
        "quarantines": sum(1 for e in events if e["event"] == "plugin.quarantined"),
        "plugins": host_rows,
        "journal": jr,
        "host_stayed_up": host_up,
    }
    report["ok"] = (
        not served.good_failures
        and not good_crashes
        and statuses.get(200, 0) == report["requests"]
        and host_up
        and jr["host_availability"] >= TARGET
        and jr["verify_ok"]
    )
    return report


def trellis_class(reason: Any) -> str:
    from trellis._tree import classify

    return classify(reason)


def render(r: dict[str, Any]) -> str:
    lines = [
        "",
        f"requests served: {r['requests']} in {r['seconds']:.0f} s "
        f"(HTTP {', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))})",
        f"good plugin failures: {r['good_plugin_failures'] or 'none'}",
        "bad plugins triggered (plugin:kind -> times):",
        *(f"  {k:28} {v}" for k, v in r["bad_plugin_outcomes"].items()),
        "good chain (validate + redact) latency:",
    ]
    for phase, f in r["chain_latency_ms"].items():
        lines.append(f"  {phase:5}  n={f['n']:<7} p50 {f['p50']:.2f} ms   p99 {f['p99']:.2f} ms")
    lines.append("containment events (plugin: event (exit class) -> times):")
    lines += [f"  {k:40} {v}" for k, v in r["containment"].items()]
    lines.append(f"quarantines: {r['quarantines']}")
    j = r["journal"]
    lines += [
        f"host availability (journal): {j['host_availability'] * 100:.4f}% over "
        f"{j['host_seconds']:.1f} s (target {TARGET * 100:.2f}%), "
        f"down {j['host_down_seconds']:.3f} s",
        f"journal: {j['records']} records; plugin events {j['by_kind']}",
        f"journal verify (signed: {j['verify_signed']}): "
        + ("OK" if j["verify_ok"] else f"FAILED: {j['verify_problem']}")
        + f", {j['verify_records']} records",
        "",
        "RESULT: " + ("OK" if r["ok"] else "FAILED"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="plugin-host-demo",
        description=(__doc__ or "").replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of load (default 60)")
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    ap.add_argument(
        "--workdir",
        type=Path,
        help="where the plugins, journal and key go; kept after the run (default: a new "
        "temporary directory, removed at exit unless --keep)",
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary work directory (to run `trellis journal verify` afterwards)",
    )
    ap.add_argument(
        "--verbose", action="store_true", help="show Trellis's crash reports as they happen"
    )
    args = ap.parse_args(argv)
    if not args.verbose:  # every containment event is in the report
        logging.getLogger("trellis").setLevel(logging.CRITICAL)
    temporary = None
    if args.workdir is None:  # ours: removed at exit unless --keep
        temporary = Path(tempfile.mkdtemp(prefix="plugin-host-"))
        what = "kept at exit (--keep)" if args.keep else "removed at exit (--keep keeps it)"
        print(f"temporary work directory {temporary}: {what}", file=sys.stderr)
    workdir = args.workdir or temporary
    workdir.mkdir(parents=True, exist_ok=True)
    cache = "TRELLIS_PLUGIN_CACHE" not in os.environ
    if cache:
        os.environ["TRELLIS_PLUGIN_CACHE"] = str(workdir / "cache")
    try:
        report = asyncio.run(run(args.seconds, workdir))
    except DemoError as e:
        print(f"plugin-host-demo: {e}", file=sys.stderr)
        return 2
    finally:
        if cache:
            os.environ.pop("TRELLIS_PLUGIN_CACHE", None)
        if temporary is not None:
            if args.keep:
                print(f"work directory kept: {temporary}", file=sys.stderr)
            else:
                shutil.rmtree(temporary, ignore_errors=True)
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

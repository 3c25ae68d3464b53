"""The main job: the market-data pipeline under a seeded chaos schedule, shown live while
it runs, then a report that checks every symbol's ticks by sequence number.

From a fresh clone (``scripts/main-job`` sets up ``.venv`` first)::

    scripts/main-job                          # 50 symbols, about 60 s of chaos
    scripts/main-job --seed 7 --seconds 30 --json report.json
    scripts/main-job --redis redis://127.0.0.1:6379/0   # Redis store + gatekeeper, outage

From Python::

    result = await run_job(JobOptions(seconds=10, seed=3, symbols=8, groups=2))
    assert result.ok, result.failures

The run: a journal (``trellis.journal.Journal``, SQLite in the work directory) and
metrics (``trellis.metrics.Metrics``) are attached before the tree starts and stay until
it has stopped, so every supervision event and every fault (``operator.action`` by
``chaos``) is journaled. The plan (:func:`chaos_specs`, fixed by the seed and printed
first) kills, crashes and hangs collectors (the sentinel kills the hung one as
``hung``), kills the store and the gatekeeper, SIGKILLs and SIGSTOPs the exchange (an
OS process; its watchdog restarts it as ``hung``), and with ``--redis`` cuts Redis
through a ``trellis.chaos.ChaosProxy``. After the plan, the backfill settles and the
report (``job_report``) says whether every tick is stored, no 429 came back, every gap
closed, and the journal verifies and holds every injected fault; the exit code is 0
only then. ``job_status`` keeps what the live view shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from examples.market_data._common import (
    GATEKEEPER,
    RECOVERY,
    ROOT,
    redis_client,
    redis_errors,
)
from examples.market_data.job_report import (
    build_report,
    journal_figures,
    metrics_summary,
    render_report,
    slo_figures,
    slo_summary,
)
from examples.market_data.job_status import Watch, live_view, snapshot, status_line
from examples.market_data.pipeline import Integrity, Pipeline, PipelineStartError
from rich.console import Console
from rich.live import Live

import trellis
from trellis import chaos, sre
from trellis.journal import Journal
from trellis.metrics import Metrics

__all__ = [
    "JobOptions",
    "JobResult",
    "chaos_specs",
    "job_plan",
    "main",
    "run_job",
]

# ---------------------------------------------------------------------------
# Options and the plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JobOptions:
    """What to run: pipeline size, chaos length and seed, where to keep the files.

    ``seed`` fixes the whole run: the exchange's ticks and the chaos plan (``None``
    draws one, printed first). ``silence``, ``heartbeat`` and ``exchange_watchdog``
    are the pipeline's :class:`~examples.market_data.tree.Settings` (the plan's hang
    durations follow them). ``live`` shows the rich live view (``None``: when the
    console is a terminal); otherwise a status line every ``status_every`` seconds.
    """

    seconds: float = 60.0
    seed: int | None = None
    symbols: int = 50
    groups: int = 4
    rate: float = 200.0
    redis: str | None = None
    workdir: str | None = None
    keep: bool = False
    settle: float = 60.0
    max_concurrent: int = 3
    silence: float = 2.0
    heartbeat: float = 0.2
    exchange_watchdog: float = 1.5
    live: bool | None = None
    status_every: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("seconds", "settle", "rate", "silence", "heartbeat", "exchange_watchdog"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                problems.append(f"{name} must be a number, got {v!r}")
            elif not v > 0:
                problems.append(f"{name} must be > 0, got {v!r}")
        if not self.status_every > 0:
            problems.append(f"status_every must be > 0, got {self.status_every!r}")
        if isinstance(self.seconds, int | float) and 0 < self.seconds < 4:
            problems.append(f"seconds must be >= 4 (the plan needs room), got {self.seconds!r}")
        for name in ("symbols", "groups", "max_concurrent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be an int >= 1, got {v!r}")
        symbols, groups = self.symbols, self.groups
        if isinstance(symbols, int) and isinstance(groups, int) and groups > symbols:
            problems.append(f"groups ({groups}) must not exceed symbols ({symbols})")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            problems.append(f"seed must be an int, got {seed!r}")
        if self.redis is not None:
            url = urlsplit(self.redis)
            if url.scheme != "redis" or not url.hostname:
                problems.append(
                    f"redis must be a URL like redis://127.0.0.1:6379/0, got {self.redis!r}"
                )
        if problems:
            raise ValueError("main job: " + "; ".join(problems))


def chaos_specs(
    seconds: float, *, silence: float = 2.0, exchange_watchdog: float = 1.5, redis: bool = False
) -> list[dict[str, Any]]:
    """The main job's fault specs for a run of ``seconds`` (``trellis.chaos.Plan`` input).

    The run is cut into one window per fault (a hang's window twice as wide: the
    sentinel or the watchdog takes a while), so one fault has healed before the next:

    kill a collector, SIGKILL the exchange, kill a collector, hang a collector (the
    sentinel kills it as hung), kill the store, kill a collector, SIGSTOP the exchange
    (its watchdog restarts it as hung), kill a collector, kill the gatekeeper, crash a
    collector (``raise``), kill a collector. With ``redis`` a Redis outage spans the
    hang's window, so that gap is backfilled while the gatekeeper is in fallback.

    The seed jitters each time within its window and picks the collectors.

    Example::

        plan = Plan.from_spec(chaos_specs(60), seed=7, duration=60)
        print(plan.describe())
    """
    collector = {"target": f"{ROOT}/collectors/collector-*", "count": 1}
    infra = f"{ROOT}/infra"
    sequence: list[tuple[dict[str, Any], float]] = [
        ({"fault": "kill", **collector}, 1.0),
        ({"fault": "kill", "target": f"{infra}/exchange"}, 1.5),
        ({"fault": "kill", **collector}, 1.0),
        ({"fault": "hang", **collector, "duration": silence + 1.5}, 2.0),
        ({"fault": "kill", "target": f"{infra}/store"}, 1.0),
        ({"fault": "kill", **collector}, 1.0),
        ({"fault": "hang", "target": f"{infra}/exchange", "duration": exchange_watchdog + 1.5},
         2.0),
        ({"fault": "kill", **collector}, 1.0),
        ({"fault": "kill", "target": f"{infra}/gatekeeper"}, 1.0),
        ({"fault": "raise", **collector}, 1.0),
        ({"fault": "kill", **collector}, 1.0),
    ]  # fmt: skip
    lead_in = 0.5  # the pipeline runs undisturbed first
    unit = float(seconds) / (lead_in + sum(w for _, w in sequence))
    specs: list[dict[str, Any]] = []
    start = lead_in * unit
    for spec, weight in sequence:
        width = weight * unit
        # one occurrence in (start + 0.1 width, start + 0.5 width): `every` longer than
        # the run, and the seed's jitter
        specs.append(
            {**spec, "every": float(seconds), "start": start + 0.3 * width, "jitter": 0.2 * width}
        )
        if redis and spec["fault"] == "hang" and spec["target"] == collector["target"]:
            specs.append(
                {
                    "fault": "outage",
                    "proxy": "redis",
                    # until the sentinel's kill and the backfill are over
                    "duration": max(0.9 * width, 0.55 * width + silence + 1.0),
                    "every": float(seconds),
                    "start": start + 0.05 * width,
                    "jitter": 0.01 * width,
                }
            )
        start += width
    return specs


def job_plan(opts: JobOptions, seed: int | None = None) -> chaos.Plan:
    """The plan of a run with ``opts`` (``seed`` overrides ``opts.seed``)."""
    return chaos.Plan.from_spec(
        chaos_specs(
            opts.seconds,
            silence=opts.silence,
            exchange_watchdog=opts.exchange_watchdog,
            redis=opts.redis is not None,
        ),
        seed=opts.seed if seed is None else seed,
        duration=opts.seconds,
        where="main-job",
    )


# ---------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------


@dataclass
class JobResult:
    """The main job's outcome: ``ok`` and ``failures`` (why not), ``report`` (the JSON
    report as a dict), ``chaos`` (the chaos engine's report) and ``integrity``."""

    ok: bool
    failures: list[str]
    report: dict[str, Any]
    chaos: chaos.Report | None = None
    integrity: Integrity | None = None
    exit_code: int = field(init=False)

    def __post_init__(self) -> None:
        self.exit_code = 0 if self.ok else 1


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


class JobError(Exception):
    """The job could not run or finish: a dependency is unreachable, the tree did not
    start (``code`` 2), or it stopped during the run (``code`` 1)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def _quiet_logs(level: str) -> Iterator[None]:
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    try:
        yield
    finally:
        root.handlers[:] = old_handlers
        root.setLevel(old_level)


async def _check_redis(url: str) -> None:
    client = redis_client(url, timeout=2.0)
    try:
        await client.ping()
    except redis_errors() as e:
        raise JobError(f"--redis {url}: Redis does not answer ({e})") from None
    finally:
        await client.aclose()


def _proxied(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = (auth + "@" if auth else "") + f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def _ask(name: str, request: Any) -> Any:
    """A part's answer, or None while it is down."""
    try:
        return await trellis.call(name, request, timeout=2.0)
    except (trellis.NoProc, trellis.Exited, trellis.CallTimeout):
        return None


def _workdir(given: str | None) -> tuple[Path, str]:
    """The work directory (made if missing) and the journal's URL in it."""
    workdir = Path(given or tempfile.mkdtemp(prefix="market-data-chaos-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    journal_path = workdir / "journal.db"
    if journal_path.exists():
        raise JobError(f"{journal_path} exists: give a fresh --workdir (one journal per run)")
    return workdir, f"sqlite:///{journal_path}"


def _write_json(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n", "utf-8")


def _write_html(path: str | os.PathLike[str], page: str) -> None:
    Path(path).write_text(page, "utf-8")


async def run_job(
    opts: JobOptions,
    console: Console | None = None,
    *,
    json_path: str | os.PathLike[str] | None = None,
    html_path: str | os.PathLike[str] | None = None,
) -> JobResult:
    """Run the main job with ``opts``, printing to ``console`` (default stdout); the
    report also goes to ``json_path`` as JSON, and the SRE report of the run (``trellis
    slo report --html``: timelines, restarts, budgets) to ``html_path``. Raises
    :class:`JobError` when it cannot run at all.

    Example::

        result = await run_job(JobOptions(seconds=10, symbols=8, groups=2, seed=3))
        print(result.ok, result.failures)
    """
    console = console or Console()
    seed = opts.seed if opts.seed is not None else int.from_bytes(os.urandom(4), "big")
    opts = replace(opts, seed=seed)
    plan = job_plan(opts)
    workdir, journal_url = _workdir(opts.workdir)
    console.print(f"seed {seed} (rerun this exact schedule with --seed {seed})")
    console.print(plan.describe(), markup=False, highlight=False)
    console.print(f"work directory {workdir} (journal {journal_url})", markup=False)

    if opts.redis is not None:
        await _check_redis(opts.redis)
    loop = asyncio.get_running_loop()
    proxies: dict[str, chaos.ChaosProxy] = {}
    journal = Journal(journal_url, node="market-data")
    metrics = Metrics(node="market-data")
    engine: chaos.Chaos | None = None
    p: Pipeline | None = None
    watch: Watch | None = None
    try:
        redis_url = None
        if opts.redis is not None:
            up = urlsplit(opts.redis)
            proxy = chaos.ChaosProxy((up.hostname or "127.0.0.1", up.port or 6379), name="redis")
            proxies["redis"] = await proxy.start()
            redis_url = _proxied(opts.redis, proxy.port)
        try:
            p = Pipeline(
                symbols=opts.symbols,
                seed=seed,
                redis_url=redis_url,
                workdir=workdir,
                groups=opts.groups,
                rate=opts.rate,
                silence=opts.silence,
                heartbeat=opts.heartbeat,
                exchange_watchdog=opts.exchange_watchdog,
                namespace=f"trellis:md:{seed}:{os.getpid()}",
            )
        except ValueError as e:  # settings that cannot work together
            raise JobError(str(e)) from None
        await journal.start()  # before the tree starts: every event of it is journaled
        metrics.attach()
        watch = Watch(loop.time(), p.paths["gatekeeper"], p.paths["exchange"]).attach()
        try:
            await p.start()
        except PipelineStartError as e:
            raise JobError(str(e)) from None
        metrics.track(p.root)
        watch.t0 = loop.time()
        engine = await chaos.start(
            p.root,
            plan,
            proxies=proxies,
            max_concurrent=opts.max_concurrent,
            healthy=p.healthy,
            recover_timeout=30.0,
            settle=10.0,
        )
        creport = await _watch_run(engine, p, watch, opts, seed, len(plan.steps), console)
        console.print("chaos plan done; waiting for the backfill to settle...")
        if p.root is None or not p.root.alive:
            raise JobError("the pipeline's tree stopped during the run (its root gave up)", 1)
        try:
            settled = await p.settle(timeout=opts.settle)
            integrity = await p.integrity()
        except (OSError, TimeoutError) as e:
            raise JobError(f"the exchange stopped answering after the run: {e}", 1) from None
        recovery = await _ask(RECOVERY, "report")
        gate = await _ask(GATEKEEPER, "stats")
        metrics_figures = metrics_summary(metrics)
    finally:
        if engine is not None:
            await engine.stop()
        if p is not None:
            await p.stop()
        await journal.stop()
        metrics.detach()
        if watch is not None:
            watch.detach()
        for proxy in proxies.values():
            await proxy.close()
    journaled = await asyncio.to_thread(journal_figures, journal_url, creport.injected)
    stats = journal.statistics()
    journaled.update(written=stats.written, dropped=stats.dropped)
    slo_tree = (
        trellis.config.loads(p.tree_text(), source=str(workdir / "tree.toml"))
        if p is not None
        else None
    )
    slo_doc = await asyncio.to_thread(slo_figures, journal_url, slo_tree)
    report, failures = build_report(
        opts=opts,
        seed=seed,
        workdir=workdir,
        creport=creport,
        integrity=integrity,
        settled=settled,
        recovery=recovery,
        gatekeeper=asdict(gate) if gate is not None else None,
        episodes=watch.episodes,
        journal=journaled,
        metrics=metrics_figures,
        hung_kills=watch.hung_kills,
        t0=watch.t0,
        exchange_down=watch.exchange_down,
    )
    report["slo"] = slo_summary(slo_doc)
    render_report(report, creport, console)
    if html_path is not None:
        _write_html(html_path, sre.html_page(slo_doc))
        console.print(f"SRE report written to {html_path}")
    if json_path is not None:
        _write_json(json_path, report)
        console.print(f"report written to {json_path}")
    return JobResult(not failures, failures, report, creport, integrity)


async def _watch_run(
    engine: chaos.Chaos,
    p: Pipeline,
    watch: Watch,
    opts: JobOptions,
    seed: int,
    planned: int,
    console: Console,
) -> chaos.Report:
    """Show status until the chaos run is over; its report."""
    done = asyncio.ensure_future(engine.wait())
    live = console.is_terminal if opts.live is None else opts.live
    redis = opts.redis is not None
    try:
        if live:
            snap = await snapshot(p, watch, planned, redis)
            with Live(
                live_view(snap, watch, opts.seconds, seed), console=console, auto_refresh=False
            ) as view:
                while not done.done():
                    await asyncio.wait([done], timeout=0.5)
                    snap = await snapshot(p, watch, planned, redis)
                    view.update(live_view(snap, watch, opts.seconds, seed), refresh=True)
        else:
            while not done.done():
                await asyncio.wait([done], timeout=opts.status_every)
                snap = await snapshot(p, watch, planned, redis)
                console.print(status_line(snap, watch), markup=False, highlight=False)
        return await done
    finally:
        if not done.done():
            done.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await done


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m examples.market_data chaos",
        description="Run the market-data pipeline under a seeded chaos schedule with live "
        "status, then report: ticks expected vs stored per symbol, gaps, time to recover, "
        "backfill start delay, 429s and journal verify. Exit 0 only if nothing is missing, "
        "no 429 came back, every gap closed and the journal verifies.",
    )
    d = JobOptions()
    # fmt: off
    ap.add_argument("--seconds", type=float, default=d.seconds,
                    help="how long the chaos schedule runs, in seconds (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=None,
                    help="fixes the whole run: exchange data and fault plan (default: random; "
                    "the seed is printed so a run can be repeated exactly)")
    ap.add_argument("--symbols", type=int, default=d.symbols,
                    help="how many symbols the simulated exchange streams (default: %(default)s)")
    ap.add_argument("--groups", type=int, default=d.groups,
                    help="how many collectors share the symbols (default: %(default)s)")
    ap.add_argument("--rate", type=float, default=d.rate,
                    help="ticks per second over all symbols (default: %(default)s)")
    ap.add_argument("--redis", metavar="URL",
                    help="also use Redis (redis://HOST:PORT/DB) as the store's buffer and the "
                    "gatekeeper's shared bucket, behind a ChaosProxy, and add a Redis outage")
    ap.add_argument("--json", dest="json_path", metavar="FILE",
                    help="also write the report as JSON to FILE")
    ap.add_argument("--html", dest="html_path", metavar="FILE",
                    help="also write the SRE report of the run (availability, MTBF, MTTR, "
                    "error budget per child; up/down timelines) as a self-contained HTML page")
    ap.add_argument("--workdir", metavar="DIR",
                    help="where the tick database, journal and logs go; kept after the run "
                    "(default: a new temporary directory, removed at exit unless --keep)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary work directory (to run `trellis journal verify` "
                    "or look at the logs afterwards)")
    ap.add_argument("--settle", type=float, default=d.settle,
                    help="after the chaos, how long to wait for the backfill to close every "
                    "gap, in seconds (default: %(default)s)")
    ap.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                    help="at most this many faults active at once (default: %(default)s)")
    ap.add_argument("--silence", type=float, default=d.silence,
                    help="the sentinel kills a collector silent this long, in seconds, as "
                    "hung (default: %(default)s)")
    ap.add_argument("--heartbeat", type=float, default=d.heartbeat,
                    help="seconds between the exchange feed's heartbeats (default: %(default)s)")
    ap.add_argument("--exchange-watchdog", type=float, default=d.exchange_watchdog,
                    help="the exchange process's sd_notify watchdog, in seconds: Trellis kills "
                    "it as hung when its heartbeats stop this long (default: %(default)s)")
    ap.add_argument("--status-every", type=float, default=d.status_every,
                    help="seconds between status lines when stdout is not a terminal "
                    "(default: %(default)s)")
    live = ap.add_mutually_exclusive_group()
    live.add_argument("--live", dest="live", action="store_true", default=None,
                      help="a live status panel (default when stdout is a terminal)")
    live.add_argument("--no-live", dest="live", action="store_false",
                      help="plain status lines instead of the live panel")
    levels = ["debug", "info", "warning", "error", "critical"]
    ap.add_argument("--log-level", default="critical", choices=levels,
                    help="the tree's logs on stderr (crashes are normal under chaos; "
                    "default: %(default)s)")
    # fmt: on
    return ap


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    """``python -m examples.market_data chaos [options]``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        opts = JobOptions(
            seconds=args.seconds,
            seed=args.seed,
            symbols=args.symbols,
            groups=args.groups,
            rate=args.rate,
            redis=args.redis,
            workdir=args.workdir,
            keep=args.keep,
            settle=args.settle,
            max_concurrent=args.max_concurrent,
            silence=args.silence,
            heartbeat=args.heartbeat,
            exchange_watchdog=args.exchange_watchdog,
            live=args.live,
            status_every=args.status_every,
        )
        job_plan(replace(opts, seed=0))  # bad numbers fail here, before anything starts
    except (ValueError, chaos.ChaosSpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if console is None:
        console = Console() if sys.stdout.isatty() else Console(width=140)
    temporary = None
    if opts.workdir is None:  # ours: removed at exit unless --keep
        temporary = tempfile.mkdtemp(prefix="market-data-chaos-")
        opts = replace(opts, workdir=temporary)
        what = "kept at exit (--keep)" if opts.keep else "removed at exit (--keep keeps it)"
        print(f"temporary work directory {temporary}: {what}", file=sys.stderr)
    try:
        with _quiet_logs(args.log_level):
            try:
                result = asyncio.run(
                    run_job(opts, console, json_path=args.json_path, html_path=args.html_path)
                )
            except JobError as e:
                print(f"error: {e}", file=sys.stderr)
                return e.code
            except KeyboardInterrupt:  # the faults were healed and the tree stopped
                print("interrupted: the tree was stopped, no report", file=sys.stderr)
                return 130
    finally:
        if temporary is not None:
            if opts.keep:
                print(f"work directory kept: {temporary}", file=sys.stderr)
            else:
                shutil.rmtree(temporary, ignore_errors=True)
    return result.exit_code

"""``trellis chaos``: run a tree file under a seeded fault schedule and report how it healed.

Example::

    $ trellis chaos tree.toml --fault 'kill:root/workers/*:every=5,percent=50' \\
          --seed 7 --duration 60 --json report.json
    $ trellis chaos tree.toml --plan plan.toml --dry-run
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from .._core._exceptions import StartError
from .._operate import OperationsError, operations
from .._run import Extension, run_async
from ..chaos._engine import Chaos
from ..chaos._plan import ChaosSpecError, Plan, parse_fault
from ..chaos._proxy import ChaosProxy
from ..chaos._report import Report
from ..config import TreeSpec
from ..control._errors import ControlError
from ..journal._errors import JournalError
from ._load import load_tree

__all__ = ["chaos", "outline_nodes"]

_EXIT_BAD_INPUT = 2
DEFAULT_DURATION = 60.0


class _ProxyError(Exception):
    """A chaos proxy cannot listen (the message names it)."""


@click.command("chaos")
@click.argument("tree_file", metavar="TREE.toml")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="SPEC",
    help="FAULT:TARGET[:KEY=VALUE,...], e.g. 'kill:root/workers/*:every=5,percent=50' or "
    "'outage:redis:poisson=0.05,duration=3' (repeatable).",
)
@click.option(
    "--plan",
    "plan_file",
    metavar="PLAN.toml",
    help="A plan file: [[chaos]] tables, optional seed, duration, max_concurrent and "
    "[proxies.NAME] (listen, upstream).",
)
@click.option(
    "--seed", type=int, help="The seed of the schedule (default: the plan's, else random)."
)
@click.option("--duration", type=float, help=f"Seconds of chaos (default {DEFAULT_DURATION:g}).")
@click.option("--max-concurrent", type=int, help="Most faults open at once.")
@click.option(
    "--proxy",
    "proxy_options",
    multiple=True,
    metavar="NAME=PORT:HOST:PORT",
    help="A ChaosProxy for outage faults: listen on 127.0.0.1:PORT, forward to HOST:PORT.",
)
@click.option(
    "--settle",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds the tree gets to recover after the final heal.",
)
@click.option(
    "--recover-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds after which a fault that has not recovered counts as not recovered.",
)
@click.option("--json", "json_path", metavar="REPORT.json", help="Also write the report as JSON.")
@click.option("--dry-run", is_flag=True, help="Print the plan (and its targets) and exit.")
@click.option(
    "--journal",
    "journal_url",
    metavar="URL",
    help="Journal URL (default: as `trellis run`, from the tree file).",
)
@click.option("--no-journal", is_flag=True, help="Run without a journal.")
@click.option("--no-control", is_flag=True, help="Run without the control API.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False),
    default="critical",
    show_default=True,
    help="Logs of the tree on stderr (crash reports are expected under chaos: 'error' shows them).",
)
def chaos(
    tree_file: str,
    faults: tuple[str, ...],
    plan_file: str | None,
    seed: int | None,
    duration: float | None,
    max_concurrent: int | None,
    proxy_options: tuple[str, ...],
    settle: float,
    recover_timeout: float,
    json_path: str | None,
    dry_run: bool,
    journal_url: str | None,
    no_journal: bool,
    no_control: bool,
    log_level: str,
) -> None:
    """Run TREE.toml under a seeded chaos schedule, then print the report.

    The faults come from --fault options, a --plan file, or the tree file's [[chaos]]
    tables. The seed and the whole plan are printed before anything runs; the same
    seed and tree give the same faults on the same targets. Exit 0 when the run ends,
    1 when the root gave up, 2 for a bad tree file or fault spec."""
    tree = _load_tree(tree_file)
    plan_doc = _load_plan_file(plan_file) if plan_file is not None else {}
    specs, where = _specs(tree, faults, plan_doc, plan_file)
    if duration is None:
        duration = plan_doc.get("duration", DEFAULT_DURATION)
    if seed is None:
        seed = plan_doc.get("seed")
    if max_concurrent is None:
        max_concurrent = plan_doc.get("max_concurrent")
    try:
        plan = Plan.from_spec(specs, seed=seed, duration=duration, where=where)
    except ChaosSpecError as e:
        _fail(e)
    proxies = _proxies(plan_doc.get("proxies"), proxy_options)
    try:  # checks the proxies named by outages, and the numbers
        Chaos(
            None,
            plan,
            proxies={name: ChaosProxy(up, port=port) for name, (port, up) in proxies.items()},
            max_concurrent=max_concurrent,
            settle=settle,
            recover_timeout=recover_timeout,
        )
    except ChaosSpecError as e:
        _fail(e)

    click.echo(f"seed: {plan.seed}")
    click.echo(plan.describe())
    if dry_run:
        nodes = outline_nodes(tree)
        click.echo(f"targets if every child of {tree.name} runs:")
        for step in plan.steps:
            if step.fault == "outage":
                continue
            chosen = step.choose(nodes, root=tree.name)
            click.echo(f"  #{step.n:<4} {', '.join(chosen) if chosen else '(no match)'}")
        _exit(0)

    _configure_logging(log_level)
    extensions = _operations(tree, journal_url, no_journal, no_control)
    try:
        code, report = asyncio.run(
            _run(tree, plan, proxies, extensions, max_concurrent, settle, recover_timeout)
        )
    except StartError as e:
        click.echo(f"{tree_file}: the tree did not start: {e}", err=True)
        _exit(1)
    except (ControlError, JournalError, _ProxyError) as e:  # could not start beside it
        _fail_text(f"{tree_file}: {e}")
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(report.renderable())
    if json_path is not None:
        Path(json_path).write_text(report.to_json() + "\n", encoding="utf-8")
        click.echo(f"report written to {json_path}")
    _exit(code)


async def _run(
    tree: TreeSpec,
    plan: Plan,
    proxies: Mapping[str, tuple[int, tuple[str, int]]],
    extensions: Sequence[Extension],
    max_concurrent: int | None,
    settle: float,
    recover_timeout: float,
) -> tuple[int, Report]:
    from .._core import _telemetry

    started: dict[str, ChaosProxy] = {}
    try:
        for name, (port, upstream) in proxies.items():
            proxy = ChaosProxy(upstream, port=port, name=name)
            try:
                started[name] = await proxy.start()
            except OSError as e:
                raise _ProxyError(
                    f"proxy {name}: cannot listen on {proxy.host}:{port}: {e.strerror or e}"
                ) from None
        engine = Chaos(
            None,
            plan,
            proxies=started,
            max_concurrent=max_concurrent,
            settle=settle,
            recover_timeout=recover_timeout,
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        def show(event: dict[str, Any]) -> None:
            if event.get("who") != "chaos":
                return
            fid = (event.get("detail") or {}).get("fault")
            click.echo(
                f"[{loop.time() - t0:8.3f}s] {event.get('action')} {event.get('target')} "
                f"{event.get('result')} (fault {fid})"
            )

        hid = _telemetry.attach(show, ["operator.action"])
        try:
            code = await run_async(tree.child_spec(), extensions=[*extensions, engine])
        finally:
            _telemetry.detach(hid)
            await engine.stop()
        return code, engine.report()
    finally:
        for proxy in started.values():
            await proxy.close()


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def _load_tree(path: str) -> TreeSpec:
    tree = load_tree(path)
    if tree is None:
        _exit(_EXIT_BAD_INPUT)
    return tree


_PLAN_KEYS = ("seed", "duration", "max_concurrent", "proxies", "chaos")


def _load_plan_file(path: str) -> dict[str, Any]:
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        _fail_text(f"{path}: cannot read: {e.strerror or e}")
    except tomllib.TOMLDecodeError as e:
        _fail_text(f"{path}: invalid TOML: {e}")
    problems = [
        f"{path}: {k}: unknown key (expected one of {', '.join(_PLAN_KEYS)})"
        for k in doc
        if k not in _PLAN_KEYS
    ]
    for key, kind in (("seed", int), ("max_concurrent", int), ("duration", (int, float))):
        v = doc.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, kind)):
            problems.append(f"{path}: {key}: must be a number, got {v!r}")
    if "chaos" in doc and not isinstance(doc["chaos"], list):
        problems.append(f"{path}: chaos: must be an array of tables ([[chaos]])")
    if problems:
        _fail_text("\n".join(problems))
    doc["_source"] = path
    return doc


def _specs(
    tree: TreeSpec, faults: tuple[str, ...], plan_doc: Mapping[str, Any], plan_file: str | None
) -> tuple[list[Any], str]:
    if faults and plan_doc.get("chaos"):
        raise click.UsageError("give --fault or a --plan with [[chaos]] tables, not both")
    if faults:
        try:
            return [parse_fault(f) for f in faults], "--fault"
        except ChaosSpecError as e:
            _fail(e, prefix="--fault ")
    if plan_doc.get("chaos"):
        return list(plan_doc["chaos"]), f"{plan_file}: chaos"
    from_tree = tree.settings.get("chaos")
    if from_tree:
        return list(from_tree), f"{tree.source}: chaos"
    raise click.UsageError(
        "no faults: give --fault SPEC, a --plan file, or [[chaos]] tables in the tree file"
    )


def _proxies(from_plan: Any, options: tuple[str, ...]) -> dict[str, tuple[int, tuple[str, int]]]:
    out: dict[str, tuple[int, tuple[str, int]]] = {}
    if from_plan is not None:
        if not isinstance(from_plan, dict):
            _fail_text("plan: proxies: must be a table of [proxies.NAME] tables")
        for name, table in from_plan.items():
            listen = table.get("listen") if isinstance(table, dict) else None
            upstream = table.get("upstream") if isinstance(table, dict) else None
            try:
                out[name] = (_port(listen), _hostport(upstream))
            except ValueError as e:
                _fail_text(f"plan: proxies.{name}: {e}")
    for text in options:
        name, sep, rest = text.partition("=")
        port, sep2, upstream = rest.partition(":")
        try:
            if not sep or not sep2 or not name:
                raise ValueError("expected NAME=PORT:HOST:PORT (e.g. redis=16379:127.0.0.1:6379)")
            out[name] = (_port(int(port) if port.isdigit() else port), _hostport(upstream))
        except ValueError as e:
            raise click.BadParameter(f"{text!r}: {e}", param_hint="--proxy") from None
    return out


def _port(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 65536:
        raise ValueError(f"listen must be a port number, got {v!r}")
    return v


def _hostport(v: Any) -> tuple[str, int]:
    if isinstance(v, str):
        host, sep, port = v.rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) < 65536:
            return host.strip("[]"), int(port)
    raise ValueError(f"upstream must be HOST:PORT, got {v!r}")


def outline_nodes(tree: TreeSpec) -> list[tuple[str, str]]:
    """``(path, kind)`` of every child the tree file declares (the root excluded), as a
    running tree would show them: what ``--dry-run`` picks targets from.

    Example::

        step.choose(outline_nodes(load("tree.toml")), root="shop")
    """
    out: list[tuple[str, str]] = []

    def add(nodes: Any, prefix: str) -> None:
        for n in nodes:
            path = f"{prefix}/{n.id}"
            out.append((path, n.kind))
            add(n.children, path)

    add(tree.outline, tree.name)
    return out


def _operations(
    tree: TreeSpec, journal_url: str | None, no_journal: bool, no_control: bool
) -> list[Extension]:
    """The journal and control API as `trellis run` sets them up."""
    if journal_url is not None and no_journal:
        raise click.UsageError("give --journal or --no-journal, not both")
    if no_journal and no_control:
        return []
    try:
        ops = operations(
            tree.name,
            dict(tree.settings),
            journal=False if no_journal else journal_url,
            control=False if no_control else None,
            metrics=False,
        )
        return list(ops.extensions())
    except OperationsError as e:
        _fail_text(f"{tree.source}: {e}")


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# ---------------------------------------------------------------------------
# Exits
# ---------------------------------------------------------------------------


def _fail(e: ChaosSpecError, prefix: str = "") -> NoReturn:
    for where, message in e.errors:
        click.echo(f"{prefix}{where}: {message}", err=True)
    _exit(_EXIT_BAD_INPUT)


def _fail_text(text: str) -> NoReturn:
    click.echo(text, err=True)
    _exit(_EXIT_BAD_INPUT)


def _exit(code: int) -> NoReturn:
    click.get_current_context().exit(code)

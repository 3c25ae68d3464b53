"""``trellis check``, ``run`` and ``demo``: the commands that load and run a tree file."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, NoReturn

import click

from .. import telemetry
from .._core._exceptions import FailedToStartChild, StartError
from .._operate import OperationsError, lock_tree, operations
from .._run import loop_factory
from .._run import run as run_tree
from ..control._errors import ControlError
from ..journal._errors import JournalError
from ._load import load_tree, load_tree_file
from ._logging import configure_logging, log_event

__all__ = ["check", "demo", "run"]

_EXIT_BAD_FILE = 2
LOOP_ENV = "TRELLIS_LOOP"  # the event loop when neither --loop nor [run] loop names one
_cli_log = logging.getLogger("trellis.cli")


@click.command()
def demo() -> None:
    """Run a small tree that crashes, restarts and escalates."""
    from .._demo import demo as run_demo

    _exit(asyncio.run(run_demo()))


@click.command()
@click.argument("trees", metavar="TREE.toml...", nargs=-1, required=True)
def check(trees: tuple[str, ...]) -> None:
    """Validate tree files: exit 0, or 2 with every error as FILE:LINE: KEY: MESSAGE."""
    code = 0
    for path in trees:
        tree = load_tree(path)
        if tree is None:
            code = _EXIT_BAD_FILE
            continue
        click.echo(f"{path}: ok")
        click.echo(tree.describe())
    _exit(code)


@click.command()
@click.argument("tree_file", metavar="TREE.toml")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text for people, json for one JSON object per line.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False),
    default="info",
    show_default=True,
)
@click.option(
    "--journal",
    "journal_url",
    metavar="URL",
    help="Journal URL (sqlite:///path.db or postgresql://...); "
    "default: the tree file's [journal] url, else NAME.journal.db in "
    "$TRELLIS_STATE_DIR or $XDG_STATE_HOME/trellis or ~/.local/state/trellis.",
)
@click.option(
    "--child-stderr-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="Level of a child's stderr lines that declare no level of their own "
    "(a line starting ERROR, [warn], level=error, <3>, or JSON with a level keeps it).",
)
@click.option("--no-journal", is_flag=True, help="Run without a journal.")
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    help="Control API Unix socket (mode 0600); default: the tree file's [control] socket, "
    "else $XDG_RUNTIME_DIR/trellis/NAME.sock or /tmp/trellis-UID/NAME.sock.",
)
@click.option("--no-control", is_flag=True, help="Run without the control API.")
@click.option(
    "--tcp",
    metavar="HOST:PORT",
    help="Also serve the control API on TCP; needs a bearer token in $TRELLIS_CONTROL_TOKEN.",
)
@click.option("--no-metrics", is_flag=True, help="Run without Prometheus metrics.")
@click.option("--node", metavar="NAME", help="Node name in the journal, metrics and cluster.")
@click.option(
    "--cluster",
    "cluster_url",
    metavar="URL",
    help="Join a cluster on NATS (nats://HOST:PORT): scope = 'cluster' children run on "
    "one live node; default: the tree file's [cluster] url.",
)
@click.option(
    "--loop",
    "loop_name",
    type=click.Choice(["asyncio", "uvloop"]),
    default=None,
    help="The event loop: asyncio (default) or uvloop (pip install 'trellis-otp[uvloop]'); "
    "default: the tree file's [run] loop, else $TRELLIS_LOOP, else asyncio.",
)
def run(
    tree_file: str,
    log_format: str,
    log_level: str,
    child_stderr_level: str,
    journal_url: str | None,
    no_journal: bool,
    socket_path: str | None,
    no_control: bool,
    tcp: str | None,
    no_metrics: bool,
    node: str | None,
    cluster_url: str | None,
    loop_name: str | None,
) -> None:
    """Run a tree in the foreground until SIGTERM/SIGINT (exit 0) or until the root
    gives up (exit 1). Exit 2 for an invalid tree file or setting, or when the tree
    is already running (its control socket or journal is locked by another run).
    Logs go to stderr.

    Every supervision event is journaled; `trellis status`, `events`, `restart` and
    `stop` talk to the control API on its Unix socket."""
    loaded = load_tree_file(tree_file)
    if loaded is None:
        _exit(_EXIT_BAD_FILE)
    tree, raw = loaded
    if journal_url is not None and no_journal:
        raise click.UsageError("give --journal or --no-journal, not both")
    if socket_path is not None and no_control:
        raise click.UsageError("give --socket or --no-control, not both")
    if tcp is not None and no_control:
        raise click.UsageError("give --tcp or --no-control, not both")
    loop_name = loop_name or tree.settings.get("run", {}).get("loop") or os.environ.get(LOOP_ENV)
    try:
        loop_factory(loop_name or "asyncio")
    except ValueError as e:
        click.echo(f"trellis run: {e}", err=True)
        _exit(_EXIT_BAD_FILE)
    try:
        ops = operations(
            tree.name,
            dict(tree.settings),
            journal=False if no_journal else journal_url,
            control=False if no_control else None,
            socket_path=socket_path,
            tcp=_parse_tcp(tcp) if tcp is not None else None,
            metrics=False if no_metrics else None,
            node=node,
            cluster=cluster_url,
        )
    except OperationsError as e:
        click.echo(f"{tree_file}: {e}", err=True)
        _exit(_EXIT_BAD_FILE)
    try:  # before anything is started or journaled; held until the process exits
        tree_lock = lock_tree(ops)
    except OperationsError as e:
        click.echo(f"trellis run: {e}", err=True)
        _exit(_EXIT_BAD_FILE)
    from .._reload import Reloader

    ops.reloader = Reloader(tree_file, tree, raw)
    from .._sdnotify import SdNotify

    try:
        notifier = SdNotify.from_environment(tree.name)
    except ValueError as e:
        click.echo(f"trellis: {e}", err=True)
        _exit(_EXIT_BAD_FILE)
    notify = [notifier] if notifier is not None else []
    configure_logging(log_format, log_level, child_stderr_level)
    hid = telemetry.attach(log_event)
    _cli_log.info("tree.starting", extra={"trellis": {"file": tree_file, "root": tree.name}})
    try:
        code = run_tree(
            tree.child_spec(),
            extensions=[*ops.extensions(), *notify],
            loop=loop_name or "asyncio",
        )
    except StartError as e:
        child, reason = _start_failure(e)
        fields = {"child": child, "reason": reason}
        _cli_log.error("tree.start_failed", extra={"trellis": fields})
        code = 1
    except (ControlError, JournalError) as e:  # an extension could not start
        click.echo(f"{tree_file}: {e}", err=True)
        code = _EXIT_BAD_FILE
    finally:
        telemetry.detach(hid)
    _cli_log.info("tree.stopped", extra={"trellis": {"exit_code": code}})
    tree_lock.release()  # everything is stopped and journaled
    _exit(code)


def _parse_tcp(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint="--tcp")
    return host.strip("[]"), int(port)


def _exit(code: int) -> NoReturn:
    """End the command with ``code`` (click turns it into the process exit code)."""
    click.get_current_context().exit(code)


def _start_failure(e: BaseException) -> tuple[str, str]:
    """The path of the child that could not start, and why."""
    ids: list[str] = []
    reason: Any = e
    while isinstance(reason, StartError):
        if isinstance(reason, FailedToStartChild):
            ids.append(str(reason.id))
        if reason.reason is reason or reason.reason is None:
            break
        reason = reason.reason
    why = (
        f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else repr(reason)
    )
    return "/".join(ids), why

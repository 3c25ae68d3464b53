"""The ``trellis`` command: ``check`` and ``run`` tree files, or watch the ``demo``.

Example::

    $ trellis check tree.toml
    $ trellis run tree.toml --log-format json
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from typing import Any, NoReturn

import click
import structlog

from . import __version__, telemetry
from ._cli_load import load_tree
from ._core._exceptions import FailedToStartChild, StartError
from ._core._reasons import is_clean
from ._operate import OperationsError, operations
from ._run import run as run_tree
from .control._errors import ControlError
from .journal._errors import JournalError

__all__ = ["cli", "main"]

_EXIT_BAD_FILE = 2
_events_log = logging.getLogger("trellis.events")
_output_log = logging.getLogger("trellis.output")
_cli_log = logging.getLogger("trellis.cli")


def main(argv: list[str] | None = None) -> int:
    """Run the ``trellis`` command line with ``argv`` (default ``sys.argv[1:]``); returns the
    exit code.

    Example::

        code = main(["check", "tree.toml"])
    """
    try:
        result = cli.main(args=argv, prog_name="trellis", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 1
    return result if isinstance(result, int) else 0


class _LazyGroup(click.Group):
    """Commands from other packages are imported only when named (or listed in --help),
    so `trellis run` does not pay for the client, journal and chaos commands."""

    LAZY = {
        "chaos": "trellis.chaos._cli:chaos",
        "events": "trellis.control._cli:events",
        "journal": "trellis.journal._cli:journal_group",
        "restart": "trellis.control._cli:restart",
        "start": "trellis.control._cli:start",
        "status": "trellis.control._cli:status",
        "stop": "trellis.control._cli:stop",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is not None or cmd_name not in self.LAZY:
            return found
        module, _, attr = self.LAZY[cmd_name].partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        self.add_command(command, cmd_name)
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trellis", message="%(prog)s %(version)s")
def cli() -> None:
    """Erlang/OTP supervision trees for Python services."""


@cli.command()
def demo() -> None:
    """Run a small tree that crashes, restarts and escalates."""
    from ._demo import demo as run_demo

    _exit(asyncio.run(run_demo()))


@cli.command()
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


@cli.command()
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
@click.option("--node", metavar="NAME", help="Node name in the journal and metrics.")
def run(
    tree_file: str,
    log_format: str,
    log_level: str,
    journal_url: str | None,
    no_journal: bool,
    socket_path: str | None,
    no_control: bool,
    tcp: str | None,
    no_metrics: bool,
    node: str | None,
) -> None:
    """Run a tree in the foreground until SIGTERM/SIGINT (exit 0) or until the root
    gives up (exit 1). Exit 2 for an invalid tree file or setting. Logs go to stderr.

    Every supervision event is journaled; `trellis status`, `events`, `restart` and
    `stop` talk to the control API on its Unix socket."""
    tree = load_tree(tree_file)
    if tree is None:
        _exit(_EXIT_BAD_FILE)
    if journal_url is not None and no_journal:
        raise click.UsageError("give --journal or --no-journal, not both")
    if socket_path is not None and no_control:
        raise click.UsageError("give --socket or --no-control, not both")
    if tcp is not None and no_control:
        raise click.UsageError("give --tcp or --no-control, not both")
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
        )
    except OperationsError as e:
        click.echo(f"{tree_file}: {e}", err=True)
        _exit(_EXIT_BAD_FILE)
    configure_logging(log_format, log_level)
    hid = telemetry.attach(_log_event)
    _cli_log.info("tree.starting", extra={"trellis": {"file": tree_file, "root": tree.name}})
    try:
        code = run_tree(tree.child_spec(), extensions=ops.extensions())
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


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------

_ERROR_EVENTS = frozenset(
    {"supervisor.gave_up", "child.start_failed", "process.unkillable", "telemetry.handler_failed"}
)
_WARNING_EVENTS = frozenset({"supervisor.auto_shutdown", "mailbox.overflow", "child.backoff"})


def _log_event(event: dict[str, Any]) -> None:
    """A telemetry handler: each supervision event becomes one log record."""
    name = str(event.get("event"))
    if name == "process.output":
        logger, level = _output_log, logging.INFO
    elif name in _ERROR_EVENTS:
        logger, level = _events_log, logging.ERROR
    elif name in _WARNING_EVENTS:
        logger, level = _events_log, logging.WARNING
    elif name == "child.exited" and not is_clean(event.get("reason")):
        logger, level = _events_log, logging.ERROR
    else:
        logger, level = _events_log, logging.INFO
    if logger.isEnabledFor(level):
        fields = {k: v for k, v in event.items() if k not in ("event", "time")}
        logger.log(level, name, extra={"trellis": fields})


def _add_fields(_logger: Any, _method: str, event_dict: Any) -> Any:
    """Copy the event fields carried by a stdlib record into the structlog event dict."""
    record = event_dict.get("_record")
    fields = getattr(record, "trellis", None)
    if isinstance(fields, dict):
        for key, value in fields.items():
            event_dict.setdefault(key, value)
    return event_dict


class _DropDuplicates(logging.Filter):
    """Drops the core's plain-text reports that a telemetry event already logs."""

    _PREFIXES = ("child_terminated:", "reached_max_restart_intensity:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self._PREFIXES))


def configure_logging(log_format: str = "text", level: str = "info") -> logging.Handler:
    """Send every log record (Trellis events, child output, other libraries) to stderr,
    as text or as one JSON object per line; returns the installed handler.

    Example::

        configure_logging("json", "info")
    """
    renderer: list[Any]
    if log_format == "json":
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        renderer = [
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
        ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            _add_fields,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_DropDuplicates())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler


if __name__ == "__main__":
    sys.exit(main())

"""The ``trellis`` command line: one module per command group (``tree``: check/run/demo;
``control``: status/events/restart/stop/start/reload; ``journal``; ``chaos``).

Example::

    $ trellis check tree.toml
    $ trellis run tree.toml --log-format json
"""

from __future__ import annotations

import os
import signal
import sys


def _hold_sighup_for_run(argv: list[str]) -> None:
    """``trellis run``: ignore SIGHUP until the tree installs its reload handler (about
    a second of imports and setup), so a SIGHUP sent right after launch (a config
    manager reloading early) does not kill the run unjournaled. Nothing else changes:
    other commands keep the default (a hangup ends them)."""
    if argv[:1] == ["run"]:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


# First, before the imports below (most of `trellis run`'s start-up): only when this
# process is the `trellis` command (or `python -m trellis`), never for an importer.
if os.path.basename(sys.argv[0]) in ("trellis", "__main__.py"):
    _hold_sighup_for_run(sys.argv[1:])

import importlib  # noqa: E402

import click  # noqa: E402

from .. import __version__  # noqa: E402
from ._logging import configure_logging  # noqa: E402
from .tree import check, demo, run  # noqa: E402

__all__ = ["cli", "configure_logging", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``trellis`` command line with ``argv`` (default ``sys.argv[1:]``); returns the
    exit code.

    Example::

        code = main(["check", "tree.toml"])
    """
    if argv is None:
        _hold_sighup_for_run(sys.argv[1:])
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
        "chaos": "trellis.cli.chaos:chaos",
        "cluster": "trellis.cli.cluster:cluster_group",
        "dashboard": "trellis.cli.dashboard:dashboard",
        "events": "trellis.cli.control:events",
        "journal": "trellis.cli.journal:journal_group",
        "logs": "trellis.cli.logs:logs",
        "plugin": "trellis.cli.plugin:plugin_group",
        "postmortem": "trellis.cli.slo:postmortem",
        "reload": "trellis.cli.control:reload",
        "restart": "trellis.cli.control:restart",
        "signal": "trellis.cli.logs:signal_command",
        "slo": "trellis.cli.slo:slo_group",
        "start": "trellis.cli.control:start",
        "status": "trellis.cli.control:status",
        "stop": "trellis.cli.control:stop",
        "ls": "trellis.cli.control:ls",
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


cli.add_command(check)
cli.add_command(demo)
cli.add_command(run)

"""``trellis status``, ``events``, ``restart``, ``stop`` and ``start``: the control API's
command-line client.

Exit codes: 0 done; 1 the tree refused (unknown path, action not possible, bad token:
the server's message is printed; or it closed the connection unanswered: busy); 2 bad
command-line input; 3 no tree is listening (or it did not answer).

Example::

    $ trellis status
    $ trellis restart shop/infra/db --reason "new config"
    $ trellis events -f --filter 'child.*'
    $ trellis status --url http://127.0.0.1:8470 --token "$TRELLIS_TOKEN" --json
    $ trellis ls                                  # the trees running here
    $ trellis stop --wait --tree shop && trellis run shop.toml
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from ..control._client import ControlClient, ControlClientError, Refused

__all__ = ["COMMANDS", "events", "ls", "reload", "restart", "start", "status", "stop"]

F = TypeVar("F", bound=Callable[..., Any])

_STATE_STYLE = {"running": "green", "starting": "cyan", "restarting": "yellow", "stopped": "red"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: How many of a crashed child's last stderr lines ``status`` shows.
STDERR_LINES = 5


def _safe(text: object) -> str:
    """``text`` with control characters shown as ``\\xNN``: a child's output must not
    drive the operator's terminal (OSC title changes, CSI cursor moves, bells)."""
    s = str(text)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s) if _CONTROL.search(s) else s


def _age(iso: object) -> float | None:
    """Seconds since an ISO 8601 time (the API's ``since``), or None."""
    if not isinstance(iso, str):
        return None
    try:
        return max(0.0, time.time() - datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return None


_QUIET_FIELDS = frozenset({"event", "path", "time", "utc", "supervisor", "sup_pid", "child_id"})


def _remember_tree(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    ctx.meta["trellis.tree"] = value
    ctx.meta["trellis.tree_source"] = ctx.get_parameter_source(param.name or "tree")


def _connection_options(fn: F) -> F:
    """``--tree``, ``--socket``, ``--url``, ``--token`` and ``--json`` (shared by every
    command; ``--tree`` is read by :func:`_client` from the context)."""
    options = [
        click.option(
            "--tree",
            "tree",
            metavar="NAME",
            envvar="TRELLIS_TREE",
            expose_value=False,
            callback=_remember_tree,
            help="The tree named NAME (its socket is NAME.sock in the socket directory; "
            "see `trellis ls`) [env TRELLIS_TREE; default: the only tree running].",
        ),
        click.option(
            "--socket",
            "socket_path",
            metavar="PATH",
            envvar="TRELLIS_SOCKET",
            help="The tree's control socket [env TRELLIS_SOCKET; default: "
            "$XDG_RUNTIME_DIR/trellis/*.sock or /tmp/trellis-UID/*.sock].",
        ),
        click.option(
            "--url",
            metavar="URL",
            envvar="TRELLIS_URL",
            help="Talk to the control API over TCP, e.g. http://127.0.0.1:8470 [env TRELLIS_URL].",
        ),
        click.option(
            "--token",
            metavar="TOKEN",
            envvar="TRELLIS_TOKEN",
            help="Bearer token for --url [env TRELLIS_TOKEN]; never sent over a Unix "
            "socket (there the caller's uid is checked).",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print JSON for machines."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"trellis: {message}", err=True)
    click.get_current_context().exit(code)


def _client(socket_path: str | None, url: str | None, token: str | None) -> ControlClient:
    """The client for the tree chosen by ``--tree``, ``--socket`` or ``--url`` (two of
    them on the command line are a usage error; the command line beats the
    environment)."""
    ctx = click.get_current_context()
    from_line = click.core.ParameterSource.COMMANDLINE
    tree: str | None = ctx.meta.get("trellis.tree")
    given = {
        "--tree": (tree, ctx.meta.get("trellis.tree_source")),
        "--socket": (socket_path, ctx.get_parameter_source("socket_path")),
        "--url": (url, ctx.get_parameter_source("url")),
    }
    on_line = [k for k, (v, src) in given.items() if v and src == from_line]
    if len(on_line) > 1:
        if len(on_line) == 2:
            raise click.UsageError(f"give {on_line[0]} or {on_line[1]}, not both")
        raise click.UsageError(f"give one of {', '.join(on_line)}, not several")
    if on_line:  # the command line beats the environment
        chosen = on_line[0]
    else:  # from the environment: a URL, then a socket, then a tree name
        chosen = next((k for k in ("--url", "--socket", "--tree") if given[k][0]), "")
    tree = tree if chosen == "--tree" else None
    socket_path = socket_path if chosen == "--socket" else None
    url = url if chosen == "--url" else None
    try:
        return ControlClient(socket=socket_path, url=url, token=token, tree=tree)
    except ControlClientError as e:
        _fail(str(e), e.exit_code)


def _handle_errors(fn: F) -> F:
    """Turn a :class:`ControlClientError` into its message and exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ControlClientError as e:
            _fail(str(e), e.exit_code)

    return wrapper  # type: ignore[return-value]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _label(node: dict[str, Any]) -> Text:
    text = Text()
    text.append(_safe(node.get("id")), style="bold")
    if node.get("type") == "supervisor":
        text.append(" (supervisor)", style="dim")
    state = str(node.get("state"))
    text.append("  ")
    text.append(_safe(state), style=_STATE_STYLE.get(state, ""))
    if state != "running" and node.get("since"):
        age = _age(node["since"])
        text.append(f" since {str(node['since'])[11:19]}")
        if age is not None:
            text.append(f" ({_duration(age)})")
    if node.get("retry_in_s") is not None:
        text.append(f"  next attempt in {_duration(node['retry_in_s'])}")
    if node.get("pid"):
        text.append(f"  {node['pid']}", style="dim")
    if node.get("os_pid") is not None:
        text.append(f"  os pid {node['os_pid']}")
    if node.get("uptime_s") is not None:
        text.append(f"  up {_duration(node['uptime_s'])}")
    restarts = node.get("restarts") or 0
    text.append(f"  restarts {restarts}", style="yellow" if restarts else "")
    if node.get("last_exit"):
        text.append(f"  last exit: {_safe(node['last_exit'])}", style="dim")
        if node.get("last_class"):
            text.append(f" ({_safe(node['last_class'])})", style="dim")
    stderr = node.get("last_stderr")
    if stderr is None:  # an older tree
        stderr = [
            o.get("line", "") for o in node.get("last_output") or [] if o.get("stream") == "stderr"
        ]
    for line in stderr[-STDERR_LINES:]:
        text.append("\n  stderr| ", style="dim")
        text.append(_safe(line), style="red")
    return text


def _add(tree: Tree, node: dict[str, Any]) -> None:
    for child in node.get("children", []):
        _add(tree.add(_label(child)), child)


@click.command()
@_connection_options
@_handle_errors
def status(socket_path: str | None, url: str | None, token: str | None, as_json: bool) -> None:
    """Show the running tree: state (and since when, if not running), pids, uptime,
    restarts, last exit, and the last stderr lines of a child that exited abnormally."""
    with _client(socket_path, url, token) as c:
        data = c.get("/v1/tree")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    root = data["root"]
    tree = Tree(_label(root))
    _add(tree, root)
    out = sys.stdout
    # a pipe or file gets whole lines (rich would cut them at 80 columns)
    console = Console(highlight=False, width=None if out.isatty() else 500)
    if data.get("node"):
        console.print(Text(f"node {data['node']}", style="dim"))
    console.print(tree)


def _event_line(name: str, data: dict[str, Any]) -> str:
    when = str(data.get("utc", ""))[11:23]
    fields = " ".join(
        f"{k}={v}" for k, v in data.items() if k not in _QUIET_FIELDS and v is not None
    )
    return _safe(f"{when} {name:<18} {data.get('path') or '-'} {fields}".rstrip())


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events until Ctrl-C.")
@click.option(
    "--history",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Recent events to show first.",
)
@click.option("--filter", "filter_", metavar="GLOB", help="Only events named like this (child.*).")
@click.option("--path", "path_glob", metavar="GLOB", help="Only events about these tree paths.")
@click.option(
    "--cluster",
    "cluster_url",
    metavar="NATS_URL",
    help="Every node's events from the cluster's event stream instead (see trellis cluster "
    "events: --cluster-name, --since).",
)
@click.option("--cluster-name", metavar="NAME", help="With --cluster: the cluster's name.")
@click.option("--since", default="10m", show_default=True, help="With --cluster: from when.")
@_connection_options
@_handle_errors
def events(
    follow: bool,
    history: int,
    filter_: str | None,
    path_glob: str | None,
    cluster_url: str | None,
    cluster_name: str | None,
    since: str,
    socket_path: str | None,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Print recent telemetry events; with -f, follow new ones."""
    if cluster_url is not None:  # the cluster's stream, from NATS (trellis.cluster)
        from .cluster import events as cluster_events

        click.get_current_context().invoke(
            cluster_events, tree_file=None, url=cluster_url, name=cluster_name,
            as_json=as_json, since=since, follow=follow,
        )  # fmt: skip
        return
    with _client(socket_path, url, token) as c:
        stream = c.events(history=history, follow=follow, filter=filter_, path=path_glob)
        try:
            for name, data in stream:
                if as_json:
                    click.echo(json.dumps(data))
                else:
                    click.echo(_event_line(name, data))
        except KeyboardInterrupt:
            return


def _act(
    action: str,
    path: str,
    reason: str | None,
    socket_path: str | None,
    url: str | None,
    token: str | None,
    as_json: bool,
    *,
    wait: bool = False,
    timeout: float | None = None,
) -> None:
    if not path.strip("/"):
        raise click.BadParameter("give a tree path such as shop/infra/db", param_hint="PATH")
    with _client(socket_path, url, token) as c:
        data = c.post(ControlClient.child_url(path, action), {"reason": reason} if reason else None)
        if wait and not c.wait_child_stopped(str(data.get("path", path)), timeout):
            _fail(f"{data.get('path', path)} did not stop within {timeout:g} s", 1)
    if as_json:
        click.echo(json.dumps(data))
        return
    done = {"restart": "restarted", "stop": "stopped", "start": "started"}[action]
    pid = f" ({data['pid']})" if data.get("pid") else ""
    click.echo(f"{done} {data.get('path', path)}{pid}")


_reason_option = click.option(
    "--reason", metavar="TEXT", help="Why (recorded with the action in the journal)."
)


@click.command()
@click.argument("path")
@_reason_option
@_connection_options
@_handle_errors
def restart(
    path: str,
    reason: str | None,
    socket_path: str | None,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Restart the child at PATH (stop it, then start it again)."""
    _act("restart", path, reason, socket_path, url, token, as_json)


@click.command()
@click.argument("path", required=False)
@_reason_option
@click.option(
    "--wait",
    is_flag=True,
    help="Return only once it has stopped: the child at PATH, or the tree's process "
    "(so a new `trellis run` of the same tree cannot overlap it).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="S",
    help="With --wait: give up after S seconds (exit 1; the stop goes on).",
)
@_connection_options
@_handle_errors
def stop(
    path: str | None,
    reason: str | None,
    wait: bool,
    timeout: float | None,
    socket_path: str | None,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Stop the child at PATH, or the whole tree without PATH."""
    if timeout is not None and not wait:
        raise click.UsageError("--timeout goes with --wait")
    if path is not None:
        _act("stop", path, reason, socket_path, url, token, as_json, wait=wait, timeout=timeout)
        return
    with _client(socket_path, url, token) as c:
        if wait:
            c.hold_server()
        data = c.post("/v1/stop", {"reason": reason} if reason else None)
        where = c.where
        if wait and not c.wait_stopped(timeout):
            _fail(f"the tree on {where} did not stop within {timeout:g} s", 1)
    if as_json:
        click.echo(json.dumps({**data, "result": "stopped"} if wait else data))
    else:
        click.echo(f"{'stopped' if wait else 'stopping'} the tree on {where}")


@click.command()
@click.argument("path")
@_reason_option
@_connection_options
@_handle_errors
def start(
    path: str,
    reason: str | None,
    socket_path: str | None,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Start the stopped child at PATH."""
    _act("start", path, reason, socket_path, url, token, as_json)


@click.command()
@_reason_option
@_connection_options
@_handle_errors
def reload(
    reason: str | None,
    socket_path: str | None,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Re-read the tree file the tree was started from and apply only what changed:
    start added children, stop removed ones, restart changed ones; the rest keep
    running untouched. An invalid file changes nothing (exit 2, errors printed)."""
    with _client(socket_path, url, token) as c:
        try:
            data = c.post("/v1/reload", {"reason": reason} if reason else None)
        except Refused as e:
            if e.status != 422:
                raise
            if as_json:
                click.echo(json.dumps({"error": str(e)}))
            click.echo(str(e), err=True)
            click.get_current_context().exit(2)
    if as_json:
        click.echo(json.dumps(data))
        return
    changes = data.get("changes") or []
    click.echo(f"reloaded {data.get('file')}: {len(changes) or 'no'} change(s)")
    for ch in changes:
        keys = f" ({', '.join(ch['keys'])})" if ch.get("keys") else ""
        click.echo(f"  {ch['change']} {ch['path']}{keys}")
    for note in data.get("notes") or []:
        click.echo(f"  note: {note}")


def _process_uptime(pid: int | None) -> float | None:
    """Seconds since process ``pid`` started (Linux ``/proc``), or None."""
    if pid is None:
        return None
    try:
        import os

        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        with open("/proc/uptime", "rb") as f:
            return max(0.0, float(f.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return None


@click.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@_handle_errors
def ls(as_json: bool) -> None:
    """List the trees running in the socket directory: name, pid, uptime, socket
    (stale sockets left by a crashed tree are skipped)."""
    from ..control._client import live_sockets
    from ..control._paths import socket_dir

    rows: list[dict[str, Any]] = [
        {
            "name": path.stem,
            "pid": pid,
            "uptime_s": None if (up := _process_uptime(pid)) is None else round(up, 1),
            "socket": str(path),
        }
        for path, pid in live_sockets()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no trees running (nothing listens on {socket_dir()}/*.sock)", err=True)
        return
    width = max(4, *(len(r["name"]) for r in rows))
    click.echo(f"{'NAME':<{width}}  {'PID':>7}  {'UPTIME':>8}  SOCKET")
    for r in rows:
        pid = "-" if r["pid"] is None else str(r["pid"])
        click.echo(f"{r['name']:<{width}}  {pid:>7}  {_duration(r['uptime_s']):>8}  {r['socket']}")


#: The commands to register on the ``trellis`` group.
COMMANDS = (status, events, restart, stop, start, reload)  # and `ls` (no connection)

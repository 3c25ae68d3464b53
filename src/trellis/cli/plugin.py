"""``trellis plugin``: the running tree's WASM plugin host over the control API.

Example::

    $ trellis plugin list
    $ trellis plugin load validator plugins/fhir_validator.wasm --version 1.2.0 \\
          --memory 50MiB --timeout 5 --config strict=true
    $ trellis plugin call validator validate --data @record.json
    $ trellis plugin upgrade validator fhir_validator-1.3.wasm --version 1.3.0 \\
          --check validate --check-data '{"resourceType": "Patient"}'
    $ trellis plugin release validator          # lift a quarantine
    $ trellis plugin unload validator

load, upgrade, unload, release and call are operator actions (journaled); a host with a sha256
allow-list refuses a module that is not on it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from .control import _client, _connection_options, _handle_errors, _safe

__all__ = ["plugin_group"]


@click.group("plugin")
def plugin_group() -> None:
    """The tree's WASM plugins (a trellis.PluginHost): list, load, upgrade, call..."""


def _url(pid: str, action: str) -> str:
    from urllib.parse import quote

    return f"/v1/plugins/{quote(pid, safe='')}/{action}"


@plugin_group.command("list")
@_connection_options
@_handle_errors
def list_command(
    socket_path: str | None, url: str | None, token: str | None, as_json: bool
) -> None:
    """Every plugin: state, version, restarts, calls, errors, memory high-water mark."""
    with _client(socket_path, url, token) as c:
        data = c.get("/v1/plugins")
    if as_json:
        click.echo(json.dumps(data))
        return
    hosts: dict[str, list[dict[str, Any]]] = dict(data.get("hosts", {}))
    children = data.get("children") or []
    if children:
        hosts["(plugin children of the tree)"] = [
            {**c, "id": c.get("path", c.get("id"))} for c in children
        ]
    if not hosts:
        click.echo("no plugin in this tree")
        return
    for path, rows in hosts.items():
        click.echo(f"{_safe(path)}:")
        if not rows:
            click.echo("  (no plugins loaded)")
        for r in rows:
            errors = ", ".join(f"{k} {v}" for k, v in (r.get("errors") or {}).items()) or "-"
            click.echo(
                f"  {_safe(r['id']):20} {_safe(r.get('state')):12} "
                f"v{_safe(r.get('version') or '-'):10} restarts {r.get('restarts', 0):<3} "
                f"calls {r.get('calls', 0):<8} errors {errors}  "
                f"mem {int(r.get('memory_high') or 0) // 1024} KiB  "
                f"sha256 {str(r.get('sha256', ''))[:12]}"
            )


@plugin_group.command("load")
@click.argument("plugin_id", metavar="ID")
@click.argument("module", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--version", "version", metavar="V", help="The version to record.")
@click.option("--memory", metavar="SIZE", help="Memory cap, e.g. 50MiB.")
@click.option("--timeout", type=float, metavar="SECONDS", help="Deadline of one call.")
@click.option("--fuel", type=click.IntRange(1), help="Instructions one call may run.")
@click.option("--instances", type=click.IntRange(1, 256), help="Instances in the pool.")
@click.option("--config", "config", multiple=True, metavar="KEY=VALUE", help="Plugin config.")
@click.option("--host", metavar="PATH", help="The plugin host (when the tree has several).")
@click.option("--reason", metavar="TEXT", help="Why (recorded with the action).")
@_connection_options
@_handle_errors
def load_command(
    plugin_id: str,
    module: Path,
    version: str | None,
    memory: str | None,
    timeout: float | None,
    fuel: int | None,
    instances: int | None,
    config: tuple[str, ...],
    host: str | None,
    reason: str | None,
    socket_path: str | None,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Upload MODULE (.wasm) and start it as plugin ID."""
    raw = module.read_bytes()
    body: dict[str, Any] = {
        "module_b64": base64.b64encode(raw).decode(),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    cfg = {}
    for item in config:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--config")
        cfg[key] = value
    for k, v in (
        ("version", version), ("memory", memory), ("timeout", timeout), ("fuel", fuel),
        ("instances", instances), ("config", cfg or None), ("host", host), ("reason", reason),
    ):  # fmt: skip
        if v is not None:
            body[k] = v
    with _client(socket_path, url, token) as c:
        data = c.post(_url(plugin_id, "load"), body)
    if as_json:
        click.echo(json.dumps(data))
        return
    row = data["plugin"]
    click.echo(
        f"loaded {_safe(row['id'])} v{_safe(row.get('version') or '-')} "
        f"(sha256 {row['sha256']}): {row['state']}"
    )


@plugin_group.command("upgrade")
@click.argument("plugin_id", metavar="ID")
@click.argument("module", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--version", "version", metavar="V", help="The new version to record.")
@click.option("--check", "check", metavar="FUNCTION", help="Call it once before switching.")
@click.option("--check-data", default="", metavar="TEXT", help="The check call's input.")
@click.option("--host", metavar="PATH", help="The plugin host (when the tree has several).")
@click.option("--reason", metavar="TEXT", help="Why (recorded with the action).")
@_connection_options
@_handle_errors
def upgrade_command(
    plugin_id: str, module: Path, version: str | None, check: str | None, check_data: str,
    host: str | None, reason: str | None, socket_path: str | None, url: str | None,
    token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Replace plugin ID's module with MODULE: the new version starts (and answers
    --check) before the old one stops; on failure the old one keeps serving."""
    raw = module.read_bytes()
    body: dict[str, Any] = {
        "module_b64": base64.b64encode(raw).decode(),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    for k, v in (("version", version), ("host", host), ("reason", reason)):
        if v is not None:
            body[k] = v
    if check is not None:
        body["check_function"] = check
        body["check_data"] = check_data
    with _client(socket_path, url, token) as c:
        data = c.post(_url(plugin_id, "upgrade"), body)
    if as_json:
        click.echo(json.dumps(data))
        return
    row = data["plugin"]
    click.echo(
        f"upgraded {_safe(row['id'])} to v{_safe(row.get('version') or '-')} "
        f"(sha256 {row['sha256']})"
    )


def _simple(action: str, plugin_id: str, host: str | None, reason: str | None, *conn: Any) -> None:
    socket_path, url, token, as_json = conn
    body = {k: v for k, v in (("host", host), ("reason", reason)) if v is not None}
    with _client(socket_path, url, token) as c:
        data = c.post(_url(plugin_id, action), body)
    if as_json:
        click.echo(json.dumps(data))
    else:
        click.echo(f"{action}ed {plugin_id}" if action != "release" else f"released {plugin_id}")


@plugin_group.command("unload")
@click.argument("plugin_id", metavar="ID")
@click.option("--host", metavar="PATH", help="The plugin host (when the tree has several).")
@click.option("--reason", metavar="TEXT", help="Why (recorded with the action).")
@_connection_options
@_handle_errors
def unload_command(
    plugin_id: str, host: str | None, reason: str | None, socket_path: str | None,
    url: str | None, token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Stop plugin ID and forget it."""
    _simple("unload", plugin_id, host, reason, socket_path, url, token, as_json)


@plugin_group.command("release")
@click.argument("plugin_id", metavar="ID")
@click.option("--host", metavar="PATH", help="The plugin host (when the tree has several).")
@click.option("--reason", metavar="TEXT", help="Why (recorded with the action).")
@_connection_options
@_handle_errors
def release_command(
    plugin_id: str, host: str | None, reason: str | None, socket_path: str | None,
    url: str | None, token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Lift plugin ID's quarantine and start it again."""
    _simple("release", plugin_id, host, reason, socket_path, url, token, as_json)


@plugin_group.command("call")
@click.argument("plugin_id", metavar="ID")
@click.argument("function")
@click.option("--data", default="", help="The input: text, or @FILE, or @- for stdin.")
@click.option("--timeout", type=float, metavar="SECONDS", help="Give up waiting after this.")
@click.option("--host", metavar="PATH", help="The plugin host (when the tree has several).")
@_connection_options
@_handle_errors
def call_command(
    plugin_id: str, function: str, data: str, timeout: float | None, host: str | None,
    socket_path: str | None, url: str | None, token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Call FUNCTION of plugin ID and print what it output."""
    if data.startswith("@"):
        raw = sys.stdin.buffer.read() if data == "@-" else Path(data[1:]).read_bytes()
    else:
        raw = data.encode()
    body: dict[str, Any] = {"function": function, "data_b64": base64.b64encode(raw).decode()}
    if timeout is not None:
        body["timeout"] = timeout
    if host is not None:
        body["host"] = host
    with _client(socket_path, url, token) as c:
        answer = c.post(_url(plugin_id, "call"), body)
    if as_json:
        click.echo(json.dumps(answer))
        return
    out = base64.b64decode(answer["output_b64"])
    sys.stdout.buffer.write(out)
    if out and not out.endswith(b"\n") and sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()

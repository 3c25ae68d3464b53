"""``trellis cluster nodes`` and ``trellis cluster leases``: the cluster as NATS holds it.

Example::

    $ trellis cluster nodes --url nats://127.0.0.1:4222 --name shop
    $ trellis cluster leases tree.toml --json
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import click

__all__ = ["cluster_group"]

_EXIT_BAD = 2


@click.group("cluster")
def cluster_group() -> None:
    """The cluster's nodes and singleton leases (read from NATS)."""


def _options(fn: Any) -> Any:
    fn = click.argument("tree_file", metavar="[TREE.toml]", required=False)(fn)
    fn = click.option("--url", metavar="URL", help="NATS URL (default: the tree's [cluster] url).")(
        fn
    )
    fn = click.option(
        "--name", metavar="NAME", help="Cluster name (default: the tree's, else trellis)."
    )(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")(fn)
    return fn


def _settings(tree_file: str | None, url: str | None, name: str | None) -> Any:
    from ..cluster._settings import ClusterError, ClusterSettings

    table: dict[str, Any] = {}
    if tree_file is not None:
        from ._load import load_tree

        tree = load_tree(tree_file)
        if tree is None:
            click.get_current_context().exit(_EXIT_BAD)
        table = dict(tree.settings.get("cluster", {}))
    if name is not None:
        table["name"] = name
    table.setdefault("node", "trellis-cli")
    try:
        settings = ClusterSettings.from_settings(table, url=url)
    except (ClusterError, TypeError) as e:
        raise click.UsageError(str(e)) from None
    if settings is None:
        raise click.UsageError("give --url nats://HOST:PORT or a tree file with [cluster] url")
    return settings


async def _read(settings: Any, what: str) -> list[tuple[str, int, dict[str, Any]]]:
    """Every live entry of the bucket ``what``: (key, revision, value)."""
    import nats
    import nats.js.errors as jse

    opts = settings.connect_options()
    opts.update(allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3)
    nc = await nats.connect(**opts)
    try:
        js = nc.jetstream(timeout=3.0)
        try:
            kv = await js.key_value(settings.bucket(what))
        except jse.BucketNotFoundError:
            return []
        from ..cluster._node import kv_keys

        keys = await kv_keys(js, settings.bucket(what))
        out = []
        for key in sorted(keys):
            try:
                entry = await kv.get(key)
            except (jse.KeyNotFoundError, jse.KeyDeletedError):
                continue
            try:
                value = json.loads(entry.value or b"{}")
            except ValueError:
                value = {}
            out.append((key, int(entry.revision or 0), value if isinstance(value, dict) else {}))
        return out
    finally:
        await nc.close()


def _fetch(settings: Any, what: str) -> list[tuple[str, int, dict[str, Any]]]:
    try:
        return asyncio.run(_read(settings, what))
    except Exception as e:
        click.echo(f"trellis cluster: cannot read from NATS at {settings.url}: {e!r}", err=True)
        click.get_current_context().exit(1)


@cluster_group.command("nodes")
@_options
def nodes(tree_file: str | None, url: str | None, name: str | None, as_json: bool) -> None:
    """The nodes that heartbeat into the cluster: age of the last heartbeat (by this
    machine's clock), pid, and the singletons each runs. A node is alive while its
    age is within twice its lease TTL; a stopped node is gone at once, a dead one
    after five lease TTLs."""
    settings = _settings(tree_file, url, name)
    now = time.time()
    rows = []
    for key, _rev, value in _fetch(settings, "nodes"):
        age = max(0.0, now - float(value.get("at", 0.0)))
        ttl = float(value.get("lease_ttl", settings.lease_ttl))
        rows.append(
            {
                "node": key,
                "alive": age <= 2 * ttl,
                "age": round(age, 3),
                "pid": value.get("pid"),
                "up_since": value.get("started"),
                "runs": value.get("runs", []),
            }
        )
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo(f"no nodes in cluster {settings.name!r}")
        return
    click.echo(f"{'NODE':<20} {'STATE':<6} {'AGE':>7} {'PID':>8}  RUNS")
    for row in rows:
        state = "alive" if row["alive"] else "silent"
        runs = ", ".join(row["runs"]) or "-"
        click.echo(f"{row['node']:<20} {state:<6} {row['age']:>6.1f}s {row['pid']!s:>8}  {runs}")


@cluster_group.command("leases")
@_options
def leases(tree_file: str | None, url: str | None, name: str | None, as_json: bool) -> None:
    """The singleton leases: who holds each, and the revision of its last renewal
    (the holder's fencing token is the revision that acquired it)."""
    settings = _settings(tree_file, url, name)
    from ..cluster._node import display_key

    rows = [
        {
            "lease": display_key(key),
            "node": value.get("node"),
            "pid": value.get("pid"),
            "revision": rev,
        }
        for key, rev, value in _fetch(settings, "leases")
    ]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo(f"no leases held in cluster {settings.name!r}")
        return
    click.echo(f"{'LEASE':<30} {'NODE':<20} {'PID':>8} {'REVISION':>9}")
    for row in rows:
        click.echo(f"{row['lease']:<30} {row['node']!s:<20} {row['pid']!s:>8} {row['revision']:>9}")


async def _replay(settings: Any, since: float, follow: bool, as_json: bool) -> None:
    import nats

    from ..cluster._events import replay

    opts = settings.connect_options()
    opts.update(allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3)
    nc = await nats.connect(**opts)
    try:
        js = nc.jetstream(timeout=3.0)
        async for e in replay(since, follow=follow, js=js, cluster=settings.name):
            if as_json:
                click.echo(json.dumps(e))
                continue
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(float(e.get("wall", 0))))
            rest = " ".join(
                f"{k}={v}"
                for k, v in e.items()
                if k not in ("event", "path", "node", "wall", "time") and v is not None
            )
            click.echo(f"{stamp}Z {e.get('node')} {e.get('event')} {e.get('path') or '-'} {rest}")
    finally:
        await nc.close()


@cluster_group.command("events")
@_options
@click.option(
    "--since", default="10m", show_default=True, help="10m, 2h, an ISO time or unix time."
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
def events(
    tree_file: str | None,
    url: str | None,
    name: str | None,
    as_json: bool,
    since: str,
    follow: bool,
) -> None:
    """Every node's supervision events from the cluster's JetStream stream (kept 7 days,
    256 MiB at most), oldest first, from --since on."""
    from .logs import parse_since

    settings = _settings(tree_file, url, name)
    start = parse_since(since)
    try:
        asyncio.run(_replay(settings, start, follow, as_json))
    except KeyboardInterrupt:
        pass
    except Exception as e:
        click.echo(f"trellis cluster events: {e!r}", err=True)
        click.get_current_context().exit(1)

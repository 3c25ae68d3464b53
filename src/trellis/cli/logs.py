"""``trellis logs`` and ``trellis signal``: an OS-process child's output and signals.

Example::

    $ trellis logs shop/web -n 50
    $ trellis logs shop/web -f --since 10m
    $ trellis logs shop/web --dir /var/log/shop        # the Logs files, no tree needed
    $ trellis signal shop/nginx HUP                     # reload its configuration
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import click
import httpx

from ..control._client import ControlClient, Refused
from .control import _client, _connection_options, _fail, _handle_errors, _safe

__all__ = ["logs", "signal_command"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# a log file line: "2026-12-07T18:55:01.123Z text"
_STAMPED = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (.*)$", re.S)


def parse_since(text: str, now: float | None = None) -> float:
    """``10m``/``2h``/``30s``/``1d`` ago, an ISO 8601 time, or a unix time -> unix time."""
    now = time.time() if now is None else now
    m = _DURATION.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a duration (10m, 2h), an ISO 8601 time or a unix time",
            param_hint="--since",
        ) from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local time, as the operator typed it
    return dt.timestamp()


def _show(e: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(e))
        return
    utc = e.get("utc") or datetime.fromtimestamp(float(e["time"]), UTC).isoformat(
        timespec="milliseconds"
    )
    click.echo(f"{str(utc)[:23]}Z {e.get('stream', '?'):6}| {_safe(e.get('line', ''))}")


@click.command()
@click.argument("path")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option(
    "-n", "--lines", "n", default=100, show_default=True, metavar="N", type=click.IntRange(0)
)
@click.option("--since", metavar="T", help="Only lines since T: 10m, 2h, ISO 8601 or unix time.")
@click.option(
    "--stream", type=click.Choice(["stdout", "stderr"]), help="Only this stream of the child."
)
@click.option(
    "--dir",
    "log_dir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Read the child's log files in DIR (its `logs` dir) instead of asking the tree.",
)
@_connection_options
@_handle_errors
def logs(
    path: str,
    follow: bool,
    n: int,
    since: str | None,
    stream: str | None,
    log_dir: str | None,
    socket_path: str | None,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Show a child's recent output (stdout and stderr, with time and stream): from the
    running tree's in-memory ring (the last lines are kept after a crash), or with
    --dir from its log files. Control characters are shown escaped."""
    if not path.strip("/"):
        raise click.BadParameter("give a tree path such as shop/web", param_hint="PATH")
    since_t = parse_since(since) if since else None
    if log_dir is not None:
        _from_files(path, log_dir, n, since_t, stream, follow, as_json)
        return
    params: dict[str, str] = {"n": str(n)}
    if since_t is not None:
        params["since"] = repr(since_t)
    if stream:
        params["stream"] = stream
    url_path = f"/v1/logs/{quote(path.strip('/'), safe='/')}"
    with _client(socket_path, url, token) as c:
        if not follow:
            data = c.get(f"{url_path}?{httpx.QueryParams(params)}")
            for e in data.get("lines", []):
                _show(e, as_json)
            return
        params["follow"] = "true"
        try:
            for e in _stream(c, url_path, params):
                _show(e, as_json)
        except KeyboardInterrupt:
            return


def _stream(c: ControlClient, url_path: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
    timeout = httpx.Timeout(10.0, read=None)
    try:
        with c._http.stream("GET", url_path, params=params, timeout=timeout) as r:
            if r.status_code >= 400:
                r.read()
                c._check(r)
            for line in r.iter_lines():
                if line.strip():
                    yield json.loads(line)
    except httpx.RemoteProtocolError:
        return  # the tree stopped
    except (httpx.TransportError, OSError) as e:
        raise c._unreachable(e) from e


# -- log files ---------------------------------------------------------------------------


def _file_lines(fname: str, stream: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        with open(fname, "rb") as f:
            data = f.read()
    except OSError:
        return out
    for raw in data.splitlines():
        out.append(_parse(raw, stream))
    return out


def _parse(raw: bytes, stream: str) -> dict[str, Any]:
    m = _STAMPED.match(raw)
    if m:
        t = datetime.fromisoformat(m.group(1).decode() + "+00:00").timestamp()
        text = m.group(2)
    else:  # a line written before timestamps (or by something else)
        t, text = 0.0, raw
    return {"time": t, "stream": stream, "line": text.decode("utf-8", "replace")}


def _from_files(
    path: str,
    log_dir: str,
    n: int,
    since: float | None,
    stream: str | None,
    follow: bool,
    as_json: bool,
) -> None:
    from .._children._output import log_name

    # files are named by the child's path (shop.payments.web.out.log); before, by its id
    cid = path.strip("/").rsplit("/", 1)[-1]
    for base in dict.fromkeys((log_name(path), cid)):
        files = {
            s: os.path.join(log_dir, f"{base}.{suffix}.log")
            for s, suffix in (("stdout", "out"), ("stderr", "err"))
            if stream in (None, s)
        }
        if any(os.path.exists(f) or os.path.exists(f + ".1") for f in files.values()):
            break
    else:
        files = {
            s: os.path.join(log_dir, f"{log_name(path)}.{suffix}.log")
            for s, suffix in (("stdout", "out"), ("stderr", "err"))
            if stream in (None, s)
        }
        _fail(f"no log files for {path!r} in {log_dir} ({', '.join(files.values())})", 1)
    entries: list[dict[str, Any]] = []
    for s, fname in files.items():
        entries += _file_lines(fname + ".1", s) + _file_lines(fname, s)
    entries.sort(key=lambda e: e["time"])  # stable: each file's order is kept
    if since is not None:
        entries = [e for e in entries if e["time"] >= since]
    for e in entries[-n:] if n else []:
        _show(e, as_json)
    if not follow:
        return
    state = {s: _position(f) for s, f in files.items()}
    try:
        while True:
            time.sleep(0.2)
            for s, fname in files.items():
                for raw in _new_lines(fname, state, s):
                    _show(_parse(raw, s), as_json)
    except KeyboardInterrupt:
        return


def _position(fname: str) -> tuple[int, int, bytes]:
    try:
        st = os.stat(fname)
    except OSError:
        return (0, 0, b"")
    return (st.st_ino, st.st_size, b"")


def _new_lines(fname: str, state: dict[str, tuple[int, int, bytes]], s: str) -> list[bytes]:
    ino, pos, partial = state[s]
    try:
        st = os.stat(fname)
    except OSError:
        return []
    if st.st_ino != ino or st.st_size < pos:  # rotated or truncated: start over
        ino, pos, partial = st.st_ino, 0, b""
    if st.st_size == pos:
        state[s] = (ino, pos, partial)
        return []
    with open(fname, "rb") as f:
        f.seek(pos)
        data = f.read()
    pos += len(data)
    data = partial + data
    lines = data.split(b"\n")
    partial = lines.pop()
    state[s] = (ino, pos, partial)
    return lines


# -- signal ------------------------------------------------------------------------------


@click.command("signal")
@click.argument("path")
@click.argument("sig", metavar="SIGNAL")
@click.option("--group", is_flag=True, help="Signal the child's whole process group.")
@click.option("--reason", metavar="TEXT", help="Why (recorded with the action in the journal).")
@_connection_options
@_handle_errors
def signal_command(
    path: str,
    sig: str,
    group: bool,
    reason: str | None,
    socket_path: str | None,
    url: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Send SIGNAL (HUP, USR1, 10, ...) to a child's OS process, e.g. to make nginx
    reload its configuration or a daemon reopen its log files. Journaled as an operator
    action."""
    if not path.strip("/"):
        raise click.BadParameter("give a tree path such as shop/nginx", param_hint="PATH")
    body: dict[str, Any] = {"signal": int(sig) if sig.isdigit() else sig, "group": group}
    if reason:
        body["reason"] = reason
    with _client(socket_path, url, token) as c:
        try:
            data = c.post(ControlClient.child_url(path, "signal"), body)
        except Refused as e:
            if e.status in (400, 422):  # bad input (an unknown signal): a usage error
                _fail(str(e), 2)
            raise
    if as_json:
        click.echo(json.dumps(data))
        return
    whom = "the process group of " if group else ""
    click.echo(f"sent {data['signal']} to {whom}{data['path']} (os pid {data['os_pid']})")

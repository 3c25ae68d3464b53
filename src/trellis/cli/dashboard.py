"""``trellis dashboard``: the control API's dashboard in a browser.

A browser cannot speak HTTP over a Unix socket, so this opens a loopback port that
forwards to the tree's control socket. The port is guarded by a one-time session
token: the page gets it in the URL's ``#fragment`` (never sent to any server, so it
is in no log) and sends it as a bearer header; the forwarder checks it and strips it
before the request reaches the socket. Anything but the page itself without the token
is refused (403), so other local users cannot borrow the socket's rights through the
port.

Example::

    $ trellis dashboard                 # prints http://127.0.0.1:PORT/#token=... and opens it
    $ trellis dashboard --url http://10.0.0.5:9100   # a TCP API: prints where to go
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import webbrowser
from pathlib import Path

import click

from ..control._client import ControlClientError, Refused
from .control import _client, _connection_options, _fail

__all__ = ["Forwarder", "dashboard"]

_MAX_HEAD = 64 * 1024


class Forwarder:
    """A loopback HTTP port forwarded to a Unix socket, one request per connection,
    each checked for the session token (except ``GET /``)."""

    def __init__(self, socket_path: str | Path, token: str, host: str = "127.0.0.1") -> None:
        self.socket_path = str(socket_path)
        self.token = token.encode()
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> Forwarder:
        self._server = await asyncio.start_server(self._serve, self.host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/#token={self.token.decode()}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            if len(head) > _MAX_HEAD:
                return
            lines = head[:-4].split(b"\r\n")
            method, _, rest = lines[0].partition(b" ")
            target = rest.partition(b" ")[0]
            kept: list[bytes] = []
            given = b""
            for line in lines[1:]:
                name = line.partition(b":")[0].strip().lower()
                if name == b"authorization":
                    given = line.partition(b":")[2].strip()
                elif name in (b"connection", b"keep-alive"):
                    continue
                else:
                    kept.append(line)
            public = method in (b"GET", b"HEAD") and target.split(b"?")[0] == b"/"
            scheme, _, tok = given.partition(b" ")
            ok = scheme.lower() == b"bearer" and hmac.compare_digest(tok.strip(), self.token)
            if not public and not ok:
                body = b'{"error": "this dashboard port needs its session token"}'
                writer.write(
                    b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                await writer.drain()
                return
            up_r, up_w = await asyncio.open_unix_connection(self.socket_path)
            up_w.write(b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await src.read(65536)
            if not data:
                break
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if dst.can_write_eof():
                dst.write_eof()


@click.command("dashboard")
@_connection_options
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="Local port (default: any).")
@click.option("--no-open", is_flag=True, help="Print the URL only; do not open a browser.")
def dashboard(
    socket_path: str | None,
    url: str | None,
    token: str | None,
    as_json: bool,
    port: int,
    no_open: bool,
) -> None:
    """Open the live dashboard of a running tree in a browser (a tree on a Unix socket:
    through a loopback port guarded by a one-time token; a TCP API (--url): print where
    its dashboard is, after checking that a tree answers there). Exit 3 when no tree
    listens, 2 for a usage error (several trees running and none chosen with --tree)."""
    client = _client(socket_path, url, token)
    with client:
        if client.url is not None:
            try:
                client.get("/v1/tree")
            except Refused:
                pass  # a tree answers (the page asks for the token)
            except ControlClientError as e:
                _fail(str(e), e.exit_code)
            page = client.url.rstrip("/") + "/"
            if as_json:
                click.echo(json.dumps({"url": page}))
            else:
                click.echo(
                    f"dashboard: {page} (the page asks for the bearer token; it is not put in URLs)"
                )
            if not no_open:
                webbrowser.open(page)
            return
        path = Path(client.where)
    session = secrets.token_urlsafe(24)

    async def serve() -> None:
        fwd = await Forwarder(path, session).start(port)
        if as_json:
            click.echo(json.dumps({"url": fwd.url, "socket": str(path)}), nl=True)
        else:
            click.echo(f"dashboard of {path}: {fwd.url}")
        click.echo("(the #token part stays in the browser; Ctrl-C to stop)", err=True)
        if not no_open:
            webbrowser.open(fwd.url)
        try:
            await asyncio.Event().wait()
        finally:
            await fwd.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())

"""Helpers for the control API tests: a real tree and a ControlServer on a real Unix socket
(under a short /tmp directory: AF_UNIX paths are limited to 107 bytes) and on a free
loopback TCP port."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

import trellis
from trellis.control import ControlServer

TOKEN = "ops-token-0123456789abcdef"


async def idle() -> None:
    """A child body that waits forever."""
    while True:
        await trellis.receive()


class Flaky:
    """A start function for a permanent child that fails to start while ``broken``."""

    def __init__(self) -> None:
        self.broken = False

    async def __call__(self) -> trellis.Pid:
        if self.broken:
            raise RuntimeError("cannot start: broken on purpose")
        return trellis.spawn(idle, link=True)


def tree_children(flaky: Flaky) -> list[Any]:
    """shop: db, web, jobs (a supervisor with a), tmp (temporary), flaky (with backoff),
    dyn (a dynamic supervisor)."""
    return [
        trellis.worker("db", idle),
        trellis.worker("web", idle),
        trellis.Supervisor.child_spec([trellis.worker("a", idle)], id="jobs"),
        trellis.worker("tmp", idle, restart="temporary"),
        trellis.ChildSpec("flaky", flaky, backoff=trellis.Backoff(min=1.0, max=1.0, factor=1.0)),
        trellis.DynamicSupervisor.child_spec(id="dyn"),
    ]


class FakeMetrics:
    """A stand-in for trellis.metrics.Metrics: anything with ``async render()``."""

    body = b"# HELP trellis_up 1 if up\n# TYPE trellis_up gauge\ntrellis_up 1.0\n"
    content_type = "text/plain; version=0.0.4; charset=utf-8"

    async def render(self) -> tuple[bytes, str]:
        return self.body, self.content_type


@dataclass
class Env:
    """A running tree ``shop`` with its control server."""

    ctl: ControlServer
    sup: Any
    sock: Path
    flaky: Flaky
    stop_requested: asyncio.Event
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    @property
    def tcp_url(self) -> str:
        assert self.ctl.tcp_address is not None
        host, port = self.ctl.tcp_address
        return f"http://{host}:{port}"

    def unix(self) -> httpx.AsyncClient:
        """A client over the Unix socket."""
        c = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.sock)),
            base_url="http://trellis",
            timeout=10.0,
        )
        self.clients.append(c)
        return c

    def tcp(self, token: str | None = TOKEN) -> httpx.AsyncClient:
        """A client over TCP with ``token`` (None: no Authorization header)."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        c = httpx.AsyncClient(base_url=self.tcp_url, headers=headers, timeout=10.0)
        self.clients.append(c)
        return c

    async def child(self, child_id: str, sup: Any = None) -> Any:
        """The current pid (or None/RESTARTING) of ``child_id``."""
        for info in await (sup or self.sup).which_children():
            if info.id == child_id:
                return info.pid
        raise KeyError(child_id)


async def start_env(short_dir: Path, sock: Path | None = None, **kwargs: Any) -> Env:
    """Start a ControlServer on ``sock`` (default ``short_dir/control.sock``) and TCP,
    then the tree."""
    flaky = Flaky()
    sock = sock if sock is not None else short_dir / "control.sock"
    kwargs.setdefault("tcp", "127.0.0.1:0")
    kwargs.setdefault("tokens", {"ops": TOKEN})
    kwargs.setdefault("node", "test-node")
    ctl = ControlServer(socket=sock, **kwargs)
    await ctl.start()
    try:
        sup = await trellis.Supervisor.start_link(tree_children(flaky), name="shop")
    except BaseException:
        await ctl.stop()
        raise
    stop_requested = asyncio.Event()
    await ctl.tree_started(sup, stop_requested.set)
    return Env(ctl, sup, sock, flaky, stop_requested)


async def stop_env(env: Env) -> None:
    for c in env.clients:
        await c.aclose()
    if env.sup.alive:
        await env.sup.stop()
    await env.ctl.stop()

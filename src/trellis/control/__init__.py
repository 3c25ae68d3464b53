"""The control API: operate a running tree over HTTP on a Unix socket (or TCP with a
bearer token), and the CLI client for it.

Example::

    import sys, trellis
    from trellis.control import ControlServer

    ctl = ControlServer()                      # default socket, mode 0600
    sys.exit(trellis.run(root_spec, extensions=[ctl]))

    # elsewhere:  trellis status · trellis restart shop/worker · trellis events -f

Endpoints: ``GET /v1/tree``, ``GET /v1/events`` (Server-Sent Events),
``POST /v1/children/{path}/restart|stop|start``, ``POST /v1/stop``, ``GET /metrics``,
``GET /healthz``, ``GET /readyz``, ``GET /openapi.json``.
"""

from typing import TYPE_CHECKING, Any

from ._errors import ControlError as ControlError
from ._paths import default_socket_path as default_socket_path
from ._paths import socket_dir as socket_dir

if TYPE_CHECKING:
    from ._client import ControlClient as ControlClient
    from ._client import ControlClientError as ControlClientError
    from ._client import NotRunning as NotRunning
    from ._client import Refused as Refused
    from ._listen import Peer as Peer
    from ._openapi import openapi as openapi
    from ._server import ControlServer as ControlServer
    from ._server import MetricsSource as MetricsSource

# The server side (starlette, uvicorn) and the client (httpx) are imported on first
# use: the client does not need the server, and `trellis run` needs neither at start.
_LAZY = {
    "ControlClient": "._client",
    "ControlClientError": "._client",
    "NotRunning": "._client",
    "Refused": "._client",
    "ControlServer": "._server",
    "MetricsSource": "._server",
    "Peer": "._listen",
    "openapi": "._openapi",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)


__all__ = [
    "ControlClient",
    "ControlClientError",
    "ControlError",
    "ControlServer",
    "MetricsSource",
    "NotRunning",
    "Peer",
    "Refused",
    "default_socket_path",
    "openapi",
    "socket_dir",
]

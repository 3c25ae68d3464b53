"""Control API routes for the tree's ``PluginHost`` (see docs/api.md "WASM plugins").

``GET /v1/plugins`` (read-only): every running host's plugins, as
``{"hosts": {path: [row, ...]}}`` (a row as ``PluginHost.list()`` gives it).

Operator actions, journaled as ``operator.action`` (target ``<host path>/<id>``):

- ``POST /v1/plugins/{id}/load`` with ``{"module_b64": ..., "sha256": ..., "version":
  ..., "memory": ..., "timeout": ..., "fuel": ..., "config": {...}, "instances": N,
  "host": ..., "reason": ...}``: the module's bytes travel in the body (a host with an
  allow-list refuses a module whose sha256 is not on it: 403); ``sha256``, when given,
  must match the bytes (422 otherwise);
- ``POST /v1/plugins/{id}/upgrade``: as load, plus ``check_function`` and
  ``check_data``; the new version starts (and answers its check) before the old one
  stops; a failure keeps the old one serving (409);
- ``POST /v1/plugins/{id}/unload``, ``POST /v1/plugins/{id}/release`` (lift a
  quarantine);
- ``POST /v1/plugins/{id}/call`` with ``{"function": ..., "data": text | "data_b64":
  ..., "timeout": seconds}``: answers ``{"output_b64", "output" (when it is UTF-8)}``, or
  the ``PluginError`` (``kind``, ``message``) with status 422.

``host`` names the host (its tree path or last part) when the tree has several.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._core._exceptions import ChildSpecError, NotFound, StartError, TrellisError
from .._plugins import _hosts
from .._plugins._errors import PluginError, PluginRejected
from ._body import error as _error
from ._body import read_json_object

if TYPE_CHECKING:
    from ._server import ControlServer

__all__ = ["ACTIONS", "call", "list_plugins", "load", "release", "unload", "upgrade"]

#: The POST /v1/plugins/{id}/{action} actions.
ACTIONS = frozenset({"load", "upgrade", "unload", "release", "call"})

MAX_MODULE_BODY = 32 * 2**20  # a module upload: 32 MiB of JSON at most
_LOAD_FIELDS = frozenset(
    {"module_b64", "sha256", "version", "memory", "timeout", "fuel", "config", "instances",
     "host", "reason"}
)  # fmt: skip
_CHECK_FIELDS = frozenset({"check_function", "check_data"})
_CALL_FIELDS = frozenset({"function", "data", "data_b64", "timeout", "host", "reason"})
_PLAIN_FIELDS = frozenset({"host", "reason"})


def _host(body: dict[str, Any]) -> Any:
    name = body.get("host")
    if name is not None and not isinstance(name, str):
        raise LookupError("host is a string")
    return _hosts.find(name)


async def list_plugins(ctl: ControlServer, request: Request) -> Response:
    hosts = _hosts.running()
    hosted = tuple(f"{path}/" for path in hosts)
    children = [
        {**server.pool.info(), "name": server.cfg.name, "state": "running"}
        for path, server in sorted(_hosts.plugins().items())
        if not path.startswith(hosted)
    ]
    return JSONResponse(
        {
            "hosts": {path: host.list() for path, host in hosts.items()},
            "children": children,  # plugin children of the tree itself (no host)
            "time": time.time(),
        }
    )


async def _act(
    ctl: ControlServer, request: Request, action: str, allowed: frozenset[str], limit: int
) -> tuple[dict[str, Any], Any, str] | Response:
    pid = request.path_params["id"]
    body = await read_json_object(request, allowed, limit)
    if isinstance(body, Response):
        return body
    try:
        host = _host(body)
    except LookupError as e:
        ctl._operator(request, f"plugin.{action}", pid, str(e))
        return _error(404, str(e))
    return body, host, f"{host.path}/{pid}"


class _Child:
    """A plugin child of the tree, called like a host's plugin."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.path = server.pool.path

    async def call(self, _id: str, function: str, data: bytes, *, timeout: Any) -> bytes:
        from .._plugins._plugin import plugin_call

        out: bytes = await plugin_call(self.server.pid, function, data, timeout=timeout)
        return out


def _detail(body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    d = {k: v for k, v in body.items() if k in ("version", "reason", "function", "sha256")}
    d.update(extra)
    return d


async def load(ctl: ControlServer, request: Request) -> Response:
    return await _install(ctl, request, "load")


async def upgrade(ctl: ControlServer, request: Request) -> Response:
    return await _install(ctl, request, "upgrade")


async def _install(ctl: ControlServer, request: Request, action: str) -> Response:
    allowed = (
        _LOAD_FIELDS | {"check_function", "check_data"} if action == "upgrade" else _LOAD_FIELDS
    )
    got = await _act(ctl, request, action, allowed, MAX_MODULE_BODY)
    if isinstance(got, Response):
        return got
    body, host, target = got
    pid = request.path_params["id"]
    what = f"plugin.{action}"
    try:
        module = base64.b64decode(str(body.get("module_b64", "")), validate=True)
    except (binascii.Error, ValueError):
        return _error(422, "module_b64 must be the module's bytes in base64")
    if not module:
        return _error(422, 'give the module as {"module_b64": ...}')
    sha = hashlib.sha256(module).hexdigest()
    expected = body.get("sha256")
    if expected is not None and str(expected).lower() != sha:
        message = f"the module's sha256 is {sha}, not {expected}"
        ctl._operator(request, what, target, message, _detail(body))
        return _error(422, message, sha256=sha)
    kwargs: dict[str, Any] = {
        k: body[k] for k in ("memory", "timeout", "fuel", "config", "instances") if k in body
    }
    check_fn = body.get("check_function")
    if check_fn is not None:
        if not isinstance(check_fn, str) or not isinstance(body.get("check_data", ""), str):
            return _error(422, "check_function and check_data are strings")
        kwargs["check"] = (check_fn, str(body.get("check_data", "")).encode())
    try:
        if action == "load":
            row = await host.load(pid, module, version=body.get("version"), **kwargs)
        else:
            row = await host.upgrade(pid, module, version=body.get("version"), **kwargs)
    except NotFound:
        message = f"no plugin {pid!r} in host {host.path!r}"
        ctl._operator(request, what, target, message, _detail(body, sha256=sha))
        return _error(404, message)
    except PluginRejected as e:
        ctl._operator(request, what, target, str(e), _detail(body, sha256=sha))
        return _error(403, str(e), sha256=sha)
    except PluginError as e:  # the upgrade's check call failed: the old one serves
        message = f"the new version failed its check ({e.kind}: {e.message}); kept the old"
        ctl._operator(request, what, target, message, _detail(body, sha256=sha))
        return _error(409, message, sha256=sha, kind=e.kind)
    except (ValueError, ChildSpecError, StartError, TypeError, TrellisError) as e:
        ctl._operator(request, what, target, str(e), _detail(body, sha256=sha))
        return _error(409 if isinstance(e, StartError) else 422, str(e), sha256=sha)
    ctl._operator(request, what, target, "ok", _detail(body, sha256=sha))
    return JSONResponse({"action": action, "plugin": row, "result": "ok"})


async def _simple(ctl: ControlServer, request: Request, action: str) -> Response:
    got = await _act(ctl, request, action, _PLAIN_FIELDS, 64 * 1024)
    if isinstance(got, Response):
        return got
    body, host, target = got
    pid = request.path_params["id"]
    try:
        if action == "unload":
            await host.unload(pid)
            row: Any = None
        else:
            row = await host.release(pid)
    except NotFound:
        message = f"no plugin {pid!r} in host {host.path!r}"
        ctl._operator(request, f"plugin.{action}", target, message, _detail(body))
        return _error(404, message)
    except TrellisError as e:
        ctl._operator(request, f"plugin.{action}", target, str(e), _detail(body))
        return _error(409, str(e))
    ctl._operator(request, f"plugin.{action}", target, "ok", _detail(body))
    return JSONResponse({"action": action, "plugin": row, "result": "ok"})


async def unload(ctl: ControlServer, request: Request) -> Response:
    return await _simple(ctl, request, "unload")


async def release(ctl: ControlServer, request: Request) -> Response:
    return await _simple(ctl, request, "release")


async def call(ctl: ControlServer, request: Request) -> Response:
    pid = request.path_params["id"]
    body = await read_json_object(request, _CALL_FIELDS, MAX_MODULE_BODY)
    if isinstance(body, Response):
        return body
    try:
        host: Any = _host(body)
        if not any(row["id"] == pid for row in host.list()):
            raise LookupError(pid)
        target = f"{host.path}/{pid}"
    except LookupError as e:
        if body.get("host") is not None:
            return _error(404, str(e))
        try:  # a plugin child of the tree itself, by path, name or id
            host = _Child(_hosts.find_plugin(pid))
        except LookupError as e2:
            return _error(404, str(e2))
        target = host.path
    function = body.get("function")
    if not isinstance(function, str) or not function:
        return _error(422, 'give {"function": "name", "data": "..."}')
    if "data_b64" in body:
        try:
            data = base64.b64decode(str(body["data_b64"]), validate=True)
        except (binascii.Error, ValueError):
            return _error(422, "data_b64 must be base64")
    else:
        text = body.get("data", "")
        if not isinstance(text, str):
            return _error(422, "data is a string (or give data_b64)")
        data = text.encode()
    timeout = body.get("timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        return _error(422, "timeout is seconds > 0")
    started = time.perf_counter()
    try:
        out = await host.call(pid, function, data, timeout=timeout)
    except NotFound:
        return _error(404, f"no plugin {pid!r} in {host.path!r}")
    except PluginError as e:
        ctl._operator(request, "plugin.call", target, f"{e.kind}: {e.message}", _detail(body))
        return _error(422, e.message or e.kind, kind=e.kind)
    except TrellisError as e:  # CallTimeout, Exited
        ctl._operator(request, "plugin.call", target, str(e), _detail(body))
        return _error(504 if isinstance(e, TimeoutError) else 409, str(e))
    ctl._operator(request, "plugin.call", target, "ok", _detail(body))
    answer: dict[str, Any] = {
        "plugin": pid,
        "function": function,
        "output_b64": base64.b64encode(out).decode(),
        "seconds": time.perf_counter() - started,
    }
    try:
        answer["output"] = out.decode("utf-8")
    except UnicodeDecodeError:
        pass
    return JSONResponse(answer)

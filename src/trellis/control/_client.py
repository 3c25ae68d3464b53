"""A small synchronous client for the control API (used by the CLI)."""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from ._paths import default_socket_path, socket_dir

__all__ = [
    "EXIT_NOT_RUNNING",
    "EXIT_REFUSED",
    "ControlClient",
    "ControlClientError",
    "NotRunning",
    "Refused",
    "find_socket",
]

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3


class ControlClientError(Exception):
    """The control API could not be used; ``exit_code`` is the CLI's exit code."""

    exit_code = EXIT_REFUSED


class NotRunning(ControlClientError):
    """Nothing listens where the client looked (exit code 3)."""

    exit_code = EXIT_NOT_RUNNING


class Refused(ControlClientError):
    """The server answered with an error (``status``) and a message (exit code 1)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Ambiguous(ControlClientError):
    exit_code = EXIT_USAGE


def find_socket() -> Path:
    """The socket to talk to when none is given: ``$TRELLIS_SOCKET``, else
    ``<socket_dir>/control.sock`` if it exists, else the only ``*.sock`` in the socket
    directory (``trellis run`` names its socket after the tree). Several candidates are
    an error that lists them."""
    default = default_socket_path()
    if os.environ.get("TRELLIS_SOCKET") or default.exists():
        return default
    directory = socket_dir()
    try:
        found = sorted(p for p in directory.glob("*.sock") if p.is_socket())
    except OSError:
        found = []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise _Ambiguous(f"several trees listen in {directory} ({names}); choose one with --socket")
    return default


def _errno(exc: BaseException) -> int | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


class ControlClient:
    """Talks to a running tree's control API over its Unix socket or over TCP.

    Example::

        with ControlClient(socket="/run/user/1000/trellis/shop.sock") as c:
            print(c.get("/v1/tree")["root"]["state"])
            c.post(ControlClient.child_url("shop/worker", "restart"))
    """

    def __init__(
        self,
        *,
        socket: str | os.PathLike[str] | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.token = token
        self.url = url
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if url is not None:
            if not url.startswith(("http://", "https://")):
                raise _Ambiguous(f"--url must start with http:// or https://, not {url!r}")
            self.where = url
            self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        else:
            path = Path(socket) if socket is not None else find_socket()
            self.where = str(path)
            self._probe(path)
            transport = httpx.HTTPTransport(uds=str(path))
            self._http = httpx.Client(
                transport=transport, base_url="http://trellis", headers=headers, timeout=timeout
            )

    def _probe(self, path: Path) -> None:
        """Connect once to tell "nothing there" early (and without leaking the socket, as
        httpx's Unix transport does when the connection fails)."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(5.0)
        try:
            probe.connect(str(path))
        except OSError as e:
            raise self._unreachable(e) from e
        finally:
            probe.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @staticmethod
    def child_url(path: str, action: str) -> str:
        """``/v1/children/<path>/<action>`` with the path safely quoted."""
        return f"/v1/children/{quote(path.strip('/'), safe='/')}/{action}"

    # -- requests -----------------------------------------------------------------------
    def _unreachable(self, exc: Exception) -> ControlClientError:
        code = _errno(exc)
        if code in (errno.EACCES, errno.EPERM):
            return ControlClientError(
                f"permission denied on {self.where}: the tree runs as another user "
                "(run this as that user or as root)"
            )
        if isinstance(exc, httpx.TimeoutException | TimeoutError) and not isinstance(
            exc, httpx.ConnectTimeout
        ):
            return NotRunning(f"the Trellis tree on {self.where} did not answer in time")
        if self.url is not None:
            return NotRunning(f"no Trellis tree is listening on {self.where}")
        return NotRunning(
            f"no Trellis tree is listening on {self.where} (start one with `trellis run TREE.toml`)"
        )

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code < 400:
            return response.json()
        try:
            message = str(response.json().get("error"))
        except (ValueError, AttributeError):
            message = response.text.strip() or response.reason_phrase
        if response.status_code == 401:
            message += " (pass --token or set TRELLIS_TOKEN)"
        raise Refused(response.status_code, message)

    def get(self, path: str) -> Any:
        """GET ``path`` and return its JSON; raises :class:`ControlClientError`."""
        try:
            response = self._http.get(path)
        except (httpx.TransportError, OSError) as e:
            raise self._unreachable(e) from e
        return self._check(response)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST ``body`` (JSON) to ``path`` and return the answer's JSON."""
        try:
            response = self._http.post(path, json=body) if body else self._http.post(path)
        except (httpx.TransportError, OSError) as e:
            raise self._unreachable(e) from e
        return self._check(response)

    def events(
        self,
        *,
        history: int = 0,
        follow: bool = True,
        filter: str | None = None,
        path: str | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(name, data)`` for each Server-Sent Event; ends when the server ends the
        stream (after the history when ``follow`` is false, or when the tree stops)."""
        params: dict[str, str] = {"history": str(history), "follow": "true" if follow else "false"}
        if filter:
            params["filter"] = filter
        if path:
            params["path"] = path
        timeout = httpx.Timeout(10.0, read=None)
        try:
            with self._http.stream("GET", "/v1/events", params=params, timeout=timeout) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                name: str | None = None
                data: list[str] = []
                for line in r.iter_lines():
                    if not line:
                        if data:
                            yield name or "message", json.loads("\n".join(data))
                        name, data = None, []
                        continue
                    if line.startswith(":"):
                        continue
                    key, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if key == "event":
                        name = value
                    elif key == "data":
                        data.append(value)
        except httpx.RemoteProtocolError:
            return  # the tree stopped mid-stream
        except (httpx.TransportError, OSError) as e:
            raise self._unreachable(e) from e

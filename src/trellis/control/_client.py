"""A small synchronous client for the control API (used by the CLI)."""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from ._paths import socket_dir, tree_socket_path

__all__ = [
    "EXIT_NOT_RUNNING",
    "EXIT_REFUSED",
    "ControlClient",
    "ControlClientError",
    "NotRunning",
    "Refused",
    "find_socket",
    "live_sockets",
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


def _check_dir(directory: Path) -> bool:
    """False if the socket directory does not exist; raises if it is not safe to talk
    to what listens there (a symlink, or not ours: another user may have made it)."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ControlClientError(
            f"{directory} is not a directory (a symlink?): refusing to use the sockets in it; "
            "remove it"
        )
    if st.st_uid != os.getuid():
        raise ControlClientError(
            f"{directory} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}): "
            "refusing to use the sockets in it (someone else may have created it); remove it"
        )
    return True


def _connect(path: Path, timeout: float = 5.0) -> tuple[bool, int | None]:
    """Whether something accepts connections on ``path``, and its pid (``SO_PEERCRED``;
    None when the OS does not tell). A socket file nobody listens on is stale: False."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(str(path))
        return True, _peer_pid(probe)
    except (ConnectionRefusedError, FileNotFoundError):
        return False, None
    finally:
        probe.close()


def _peer_pid(sock: socket.socket) -> int | None:
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if so_peercred is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
    except OSError:
        return None
    pid = int(struct.unpack("3i", raw)[0])
    return pid or None


def live_sockets(directory: Path | None = None) -> list[tuple[Path, int | None]]:
    """The ``*.sock`` files in the socket directory something listens on, with the
    listener's pid, sorted by name; stale sockets (a crashed tree's) are left out."""
    directory = socket_dir() if directory is None else directory
    if not _check_dir(directory):
        return []
    found: list[tuple[Path, int | None]] = []
    for path in sorted(directory.glob("*.sock")):
        try:
            if not stat.S_ISSOCK(path.lstat().st_mode):
                continue
            live, pid = _connect(path, timeout=2.0)
        except OSError:
            continue  # someone else's, or gone meanwhile
        if live:
            found.append((path, pid))
    return found


def find_socket(tree: str | None = None) -> Path:
    """The socket to talk to when none is given.

    ``tree`` (or ``$TRELLIS_TREE``): ``<socket_dir>/<tree>.sock``. Else
    ``$TRELLIS_SOCKET``; else the only live ``*.sock`` in the socket directory
    (``trellis run`` names its socket after the tree; stale sockets are ignored).
    Several live trees are an error that lists them; none is :class:`NotRunning`,
    naming the directory looked in.
    """
    tree = tree or os.environ.get("TRELLIS_TREE") or None
    directory = socket_dir()
    if tree:
        _check_dir(directory)
        return tree_socket_path(tree)
    env = os.environ.get("TRELLIS_SOCKET")
    if env:
        return Path(env)
    found = live_sockets(directory)
    if len(found) == 1:
        return found[0][0]
    if len(found) > 1:
        names = ", ".join(p.name for p, _pid in found)
        raise _Ambiguous(
            f"several trees listen in {directory} ({names}); choose one with --tree NAME "
            "(see `trellis ls`)"
        )
    raise NotRunning(
        f"no Trellis tree is running: nothing listens on {directory}/*.sock "
        "(start one with `trellis run TREE.toml`)"
    )


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
        tree: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.token = token
        self.url = url
        self.tree = tree
        #: the server's OS pid (from the Unix socket's peer credentials), else None
        self.server_pid: int | None = None
        self._pidfd: int | None = None
        if url is not None:
            if not url.startswith(("http://", "https://")):
                raise _Ambiguous(f"--url must start with http:// or https://, not {url!r}")
            self.where = url
            # The token goes only to the URL named here: never over a Unix socket, where
            # the peer's uid is the credential and whoever listens could read it.
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        else:
            path = Path(socket) if socket is not None else find_socket(self.tree)
            self.where = str(path)
            self._probe(path)
            transport = httpx.HTTPTransport(uds=str(path))
            self._http = httpx.Client(
                transport=transport, base_url="http://trellis", timeout=timeout
            )

    def _probe(self, path: Path) -> None:
        """Connect once to tell "nothing there" early (and without leaking the socket, as
        httpx's Unix transport does when the connection fails); note the server's pid."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(5.0)
        try:
            probe.connect(str(path))
            self.server_pid = _peer_pid(probe)
        except OSError as e:
            raise self._unreachable(e) from e
        finally:
            probe.close()

    # -- waiting ------------------------------------------------------------------------
    def hold_server(self) -> None:
        """Keep a handle on the server process (a pidfd, from the Unix socket's peer
        pid) so :meth:`wait_stopped` can tell when it has exited, even if its pid is
        reused. Call before asking it to stop."""
        pidfd_open = getattr(os, "pidfd_open", None)
        if self.server_pid is None or pidfd_open is None or self._pidfd is not None:
            return
        try:
            self._pidfd = pidfd_open(self.server_pid)
        except OSError:
            self._pidfd = None  # gone already, or not allowed: fall back to the socket

    def wait_stopped(self, timeout: float | None) -> bool:
        """Wait until the tree's process has exited (with :meth:`hold_server`), or else
        until its control API no longer answers; False if ``timeout`` seconds passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._pidfd is not None:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if poller.poll(None if left is None else int(left * 1000) + 1):
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False
        while True:
            if not self._answers():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def _answers(self) -> bool:
        if self.url is None:
            try:
                live, _pid = _connect(Path(self.where), timeout=2.0)
            except OSError:
                return False
            return live
        try:
            self._http.get("/healthz", timeout=2.0)
        except (httpx.TransportError, OSError):
            return False
        return True

    def wait_child_stopped(self, path: str, timeout: float | None) -> bool:
        """Poll the tree until the child at ``path`` is neither running nor restarting
        (or is gone); False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        want = path.strip("/")
        while True:
            root = self.get("/v1/tree")["root"]
            stack, state = [root], None
            while stack:
                node = stack.pop()
                p = str(node.get("path", ""))
                if p == want or p == f"{root.get('path')}/{want}":
                    state = node.get("state")
                    break
                stack.extend(node.get("children") or [])
            if state not in ("running", "restarting"):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

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
        if code in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED) or isinstance(
            exc, httpx.RemoteProtocolError
        ):
            # Something accepted the connection and closed it unanswered: a tree that is
            # busy (every connection it allows is taken) or stopping, not an absent one.
            return ControlClientError(
                f"the Trellis tree on {self.where} closed the connection without answering: "
                "it is busy (all the connections it allows are in use; see its log) or "
                "stopping; try again"
            )
        if isinstance(exc, httpx.TimeoutException | TimeoutError) and not isinstance(
            exc, httpx.ConnectTimeout
        ):
            return NotRunning(f"the Trellis tree on {self.where} did not answer in time")
        if self.url is not None:
            return NotRunning(f"no Trellis tree is listening on {self.where}")
        if self.tree is not None:
            return NotRunning(
                f"no Trellis tree named {self.tree!r} is listening on {self.where} "
                "(see `trellis ls`; start one with `trellis run TREE.toml`)"
            )
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

"""``trellis run`` under a service manager: the sd_notify protocol, spoken to
``$NOTIFY_SOCKET`` (systemd ``Type=notify``, and anything that speaks the same
datagrams).

What is sent, and when:

- ``STATUS=starting tree NAME`` as the run begins;
- ``READY=1`` once the root supervisor has started its children (and the control API,
  if any, listens), with a ``STATUS=`` line;
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` (systemd ``WatchdogSec=``), sent by a
  task on the tree's event loop, so a blocked loop stops the heartbeats and the
  service manager restarts the service;
- ``RELOADING=1`` with ``MONOTONIC_USEC=`` when a reload begins, then ``READY=1`` and
  its result as ``STATUS=`` when it ends (systemd ``Type=notify-reload`` expects both);
- ``STOPPING=1`` when a stop begins (signal or ``trellis stop``), or when the root ends
  by itself (``STATUS=`` says why: which supervisor gave up, after which child).

``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are removed from the
environment once read (as ``sd_notify(unset_environment=1)`` does): children do not
inherit them and cannot talk to the service manager in Trellis's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from ._core import _telemetry
from ._core._process import Pid

__all__ = ["SdNotify"]

_log = logging.getLogger("trellis.sdnotify")


class SdNotify:
    """An extension of :func:`trellis.run` that reports to the service manager.

    Example::

        notify = SdNotify.from_environment("shop")     # None without $NOTIFY_SOCKET
        trellis.run(spec, extensions=[notify] if notify else [])
    """

    def __init__(self, address: str, name: str, watchdog_usec: int | None = None) -> None:
        if not address or address[0] not in "/@":
            raise ValueError(f"NOTIFY_SOCKET must be a path or an @abstract name, not {address!r}")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.name = name
        self.interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._sock: socket.socket | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._hid: object | None = None
        self._stopping = False
        self._failed = False
        self._gave_up: str | None = None  # the first supervisor that gave up, for STATUS=

    @classmethod
    def from_environment(
        cls, name: str, environ: MutableMapping[str, str] | None = None
    ) -> SdNotify | None:
        """The notifier ``$NOTIFY_SOCKET`` asks for (None when unset); the variables are
        removed from ``environ`` (default ``os.environ``)."""
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None)
        usec_text = env.pop("WATCHDOG_USEC", None)
        pid_text = env.pop("WATCHDOG_PID", None)
        if not address:
            return None
        usec: int | None = None
        if usec_text:
            try:
                usec = int(usec_text)
            except ValueError:
                _log.warning("WATCHDOG_USEC=%r is not a number: no watchdog heartbeats", usec_text)
            if pid_text and pid_text.strip() != str(os.getpid()):
                usec = None  # the watchdog is meant for another process
            if usec is not None and usec <= 0:
                usec = None
        return cls(address, name, usec)

    # -- sending --------------------------------------------------------------------
    def send(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; False (logged once) if it could not."""
        sock = self._sock
        if sock is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            sock.sendto(data, self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                _log.warning("cannot notify the service manager at %r: %s", self.address, e)
            return False
        self._failed = False
        return True

    # -- Extension ------------------------------------------------------------------
    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        self._sock = sock
        self.send(f"STATUS=starting tree {self.name}")
        self._hid = _telemetry.attach(
            self._on_event, ("tree.reloading", "tree.reloaded", "supervisor.gave_up")
        )
        if self.interval is not None:
            self._heartbeat = asyncio.ensure_future(self._beat(self.interval))

    async def tree_started(self, root: Pid, request_stop: Callable[[], None]) -> None:
        self.send("READY=1", f"STATUS=running tree {self.name}")

    async def tree_stopping(self) -> None:
        self._stopping = True
        self.send("STOPPING=1", f"STATUS=stopping tree {self.name}")

    async def stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            why = f": {self._gave_up}" if self._gave_up else ""
            self.send("STOPPING=1", f"STATUS=tree {self.name} ended{why}"[:500])
        if self._hid is not None:
            _telemetry.detach(self._hid)
            self._hid = None
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # -- internals ------------------------------------------------------------------
    async def _beat(self, interval: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "supervisor.gave_up":
            if self._gave_up is None:
                self._gave_up = (
                    f"supervisor {event.get('supervisor')} gave up (more than "
                    f"{event.get('intensity')} restarts in {event.get('period')}s, the last "
                    f"of {event.get('child_id')})"
                )
            return
        if self._stopping:
            return
        if event.get("event") == "tree.reloading":
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS=reloading {self.name}")
            return
        result = event.get("result")
        changes = len(event.get("changes") or ())
        if result == "ok":
            status = f"running tree {self.name}; reloaded: {changes} change(s)"
        else:
            errors = event.get("errors") or []
            first = str(errors[0]) if errors else ""
            status = f"running tree {self.name}; reload {result}: {first}"[:500]
        self.send("READY=1", f"STATUS={status}")

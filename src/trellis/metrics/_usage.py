"""USE per OS child: CPU seconds, resident memory, open files and threads, read from
``/proc/PID/stat`` and ``/proc/PID/fd`` (Linux). Read off the tree's loop: at scrape time
in the render thread, and by :class:`UsageSampler` in a worker thread."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from .._core import _telemetry

__all__ = ["Usage", "UsageSampler", "read_usage"]

_log = logging.getLogger("trellis.metrics")

try:
    _TICKS = float(os.sysconf("SC_CLK_TCK"))
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):  # not a POSIX system
    _TICKS, _PAGE = 100.0, 4096


class Usage(NamedTuple):
    """One OS process's use of the machine at one moment."""

    #: user + system CPU time since the process started, seconds
    cpu_seconds: float
    #: resident set size, bytes
    rss_bytes: int
    #: open file descriptors (None: /proc/PID/fd not readable)
    open_fds: int | None
    #: threads
    threads: int


def read_usage(os_pid: int) -> Usage | None:
    """The :class:`Usage` of OS process ``os_pid`` from ``/proc``; None when it is gone
    (or there is no ``/proc``).

    Example::

        u = read_usage(os.getpid())
        print(u.rss_bytes, u.open_fds)
    """
    try:
        with open(f"/proc/{os_pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    rest = stat[stat.rindex(b")") + 2 :].split()
    try:
        utime, stime = int(rest[11]), int(rest[12])  # fields 14, 15 (clock ticks)
        threads = int(rest[17])  # field 20
        rss = int(rest[21]) * _PAGE  # field 24 (pages)
    except (IndexError, ValueError):
        return None
    try:
        fds: int | None = len(os.listdir(f"/proc/{os_pid}/fd"))
    except FileNotFoundError:
        return None  # ended meanwhile
    except OSError:
        fds = None  # not ours to read
    return Usage((utime + stime) / _TICKS, rss, fds, threads)


#: One OS child to sample: ``((supervisor label, child label), supervisor path, child
#: id, OS pid)``.
Target = tuple[tuple[str, str], str, Any, int]


class UsageSampler:
    """Every ``interval`` seconds, reads the :class:`Usage` of each OS child that
    ``targets()`` lists (in a worker thread) and emits one ``process.usage`` telemetry
    event per child (journaled like every event): ``path``, ``supervisor``,
    ``child_id``, ``os_pid``, ``cpu_seconds``, ``rss_bytes``, ``open_fds``, ``threads``.
    ``extra()``, also called in the worker thread, returns more ``(event, fields)`` to
    emit with them.
    """

    def __init__(
        self,
        interval: float,
        targets: Callable[[], list[Target]],
        extra: Callable[[], list[tuple[str, dict[str, Any]]]] | None = None,
    ) -> None:
        self.interval = interval
        self.targets = targets
        self.extra = extra
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(
                self._run(), name="trellis-usage-sampler"
            )

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def _sample(self) -> tuple[list[tuple[Target, Usage]], list[tuple[str, dict[str, Any]]]]:
        out = []
        for target in self.targets():
            u = read_usage(target[3])
            if u is not None:
                out.append((target, u))
        return out, self.extra() if self.extra is not None else []

    async def _run(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.interval)
            try:
                samples, extra = await asyncio.to_thread(self._sample)
            except Exception:
                failures += 1
                if failures == 1:
                    _log.exception("could not sample the OS children's usage")
                continue
            for (_, sup, cid, os_pid), u in samples:
                _telemetry.emit(
                    "process.usage",
                    path=f"{sup}/{cid}",
                    supervisor=sup,
                    child_id=cid,
                    os_pid=os_pid,
                    cpu_seconds=u.cpu_seconds,
                    rss_bytes=u.rss_bytes,
                    open_fds=u.open_fds,
                    threads=u.threads,
                )
            for name, fields in extra:
                _telemetry.emit(name, **fields)

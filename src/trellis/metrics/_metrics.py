"""``Metrics``: a prometheus_client collector fed by telemetry and a scrape-time tree walk.

The telemetry handler only bumps plain numbers kept per ``(supervisor, child id)``;
prometheus_client metric families are built from them when the registry is collected,
so a restart costs a dict lookup and a few additions, not the locks of labelled
``Counter``/``Histogram`` objects.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .._children import ProcessExitReason
from .._core import _telemetry
from .._core._process import Pid
from .._run import LAG_BUCKETS, LoopLag, loop_lag
from .._server import CALL_BUCKETS, CallStats, disable_call_stats, enable_call_stats
from .._server import _call_stats as _server_call_stats
from .._tree import CLASSES, Tracker, classify
from ._usage import Target, Usage, UsageSampler, read_usage

__all__ = ["Metrics"]

_log = logging.getLogger("trellis.metrics")
_wall = time.time

_INF = math.inf
#: Recovery (DOWN -> UP) buckets, seconds: a plain restart is sub-millisecond, a backoff
#: or a slow OS-process start takes seconds.
RECOVERY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Run time before an abnormal exit (time between failures), seconds: up to a week.
RUN_BUCKETS = (0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 43200.0, 86400.0, 604800.0)
#: Journal batch write latency, seconds.
JOURNAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: The telemetry events the handler needs.
EVENTS = (
    "child.exited",
    "child.restarted",
    "child.started",
    "child.terminated",
    "child.start_failed",
    "supervisor.gave_up",
    "journal.batch",
    "journal.dropped",
    "mailbox.overflow",
    "telemetry.handler_failed",
    "plugin.stats",
    "plugin.quarantined",
    "plugin.released",
    "plugin.unloaded",
    "plugin.loaded",
)

_CLEAN = frozenset(("normal", "shutdown"))
_STATES = ("running", "starting", "restarting", "stopped")
_STATE_INDEX = {st: i for i, st in enumerate(_STATES)}
_MAX_LABEL = 120

# Exception types whose class does not depend on the instance: classified once per type
# (classify() costs ~0.8 us for a plain exception). OS-process reasons carry the code,
# signal or limit that decides their class, so they are always classified in full.
_class_by_type: dict[type, str] = {}


def _classify(reason: Any) -> str:
    t = type(reason)
    cls = _class_by_type.get(t)
    if cls is not None:
        return cls
    cls = classify(reason)
    if isinstance(reason, BaseException) and not isinstance(reason, ProcessExitReason):
        _class_by_type[t] = cls
    return cls


# ---------------------------------------------------------------------------
# Label values
# ---------------------------------------------------------------------------

# What a pid, an unnamed process's default name or an object address looks like.
_PIDLIKE = re.compile(r"<Pid \d+[^>]*>|<\d+>|0x[0-9a-fA-F]+")


def _mask(m: re.Match[str]) -> str:
    text = m.group()
    if text.startswith("<Pid"):
        return "<pid>"
    return "<unnamed>" if text.startswith("<") else "0x?"


def _label(value: object) -> str:
    """A label value for a tree path or child id: pid-like parts masked, length capped."""
    if type(value) is str:
        s = value
    else:
        try:
            s = str(value)
        except Exception:
            s = type(value).__name__
    if "<" in s or "0x" in s:
        s = _PIDLIKE.sub(_mask, s)
    return s if len(s) <= _MAX_LABEL else s[: _MAX_LABEL - 1] + "…"


# ---------------------------------------------------------------------------
# What telemetry told, per child key
# ---------------------------------------------------------------------------


class _Hist:
    """Histogram counts per bucket (not cumulative; the last bucket is +Inf) and sum."""

    __slots__ = ("bounds", "counts", "les", "sum")

    def __init__(self, bounds: tuple[float, ...], les: tuple[str, ...]) -> None:
        self.bounds = bounds
        self.les = les  # the bounds as ``le`` label values
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v

    def add(self, other: _Hist) -> None:
        c = self.counts
        for i, n in enumerate(other.counts):
            c[i] += n
        self.sum += other.sum

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        total = 0
        for le, n in zip(self.les, self.counts, strict=True):
            total += n
            out.append((le, float(total)))
        return out


def _bounds(buckets: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[str, ...]]:
    bounds = (*buckets, _INF)
    return bounds, tuple(floatToGoString(b) for b in bounds)  # type: ignore[no-untyped-call]


_RECOVERY = _bounds(RECOVERY_BUCKETS)
_RUN = _bounds(RUN_BUCKETS)
_JOURNAL = _bounds(JOURNAL_BUCKETS)
_CALLS = _bounds(CALL_BUCKETS)
_LAG = _bounds(LAG_BUCKETS)


def _lag_hist(lag: LoopLag) -> _Hist:
    h = _Hist(*_LAG)
    h.counts = list(lag.counts)
    h.sum = lag.sum
    return h


#: Plugin call latency buckets: the ones ``plugin.stats`` reports (trellis._plugins).
PLUGIN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0)
_PLUGIN = _bounds(PLUGIN_BUCKETS)


class _PluginStats:
    """What ``plugin.stats`` and the host's quarantine events said about one plugin."""

    __slots__ = ("calls", "duration", "fuel", "memory_high", "quarantined")

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}  # by kind: ok, error, oom, timeout, fuel, trap
        self.duration = _Hist(*_PLUGIN)
        self.fuel = 0
        self.memory_high = 0
        self.quarantined = 0


class _Red:
    """RED of the servers one ``(supervisor path, child id)`` ran: the servers still
    counting (``live``) and the sums of those that ended (folded in at scrape time)."""

    __slots__ = ("calls", "errors", "hist", "live")

    def __init__(self) -> None:
        self.live: list[CallStats] = []
        self.calls = 0
        self.errors = 0
        self.hist = _Hist(*_CALLS)

    def totals(self) -> tuple[int, int, _Hist]:
        """Calls, errors and the duration histogram so far; servers that ended are
        folded into the sums and forgotten. Called under the scrape lock."""
        calls, errors = self.calls, self.errors
        hist = _Hist(*_CALLS)
        hist.add(self.hist)
        ended = []
        for cs in list(self.live):
            final = cs.ended  # read first: when set, the numbers below are final
            k, counts, total, untimed = cs.errors, list(cs.counts), cs.sum, cs.untimed
            n = sum(counts) + untimed
            calls += n
            errors += k
            for i, c in enumerate(counts):
                hist.counts[i] += c
            hist.sum += total
            if final:
                ended.append((cs, n, k, counts, total))
        for cs, n, k, counts, total in ended:
            self.calls += n
            self.errors += k
            h = self.hist
            for i, c in enumerate(counts):
                h.counts[i] += c
            h.sum += total
            self.live.remove(cs)
        return calls, errors, hist


class _ChildStats:
    """Counts for one ``(supervisor path, child id)``; several dynamic children with one
    spec id share it."""

    __slots__ = (
        "child",
        "down_since",
        "exits",
        "key",
        "last_class",
        "lb",
        "missed",
        "recovery",
        "red",
        "restarts",
        "run",
        "start_failures",
        "start_wall",
        "started_at",
        "starts",
        "sup",
    )

    def __init__(self, sup: str, child: Any) -> None:
        self.sup = sup
        self.child = child
        self.key = (_label(sup), _label(child))  # the label values
        self.lb: str | None = None  # the label set as exposition text (cached)
        self.starts = 0
        # every class from the first sight, at 0: increase() sees the first restart
        self.restarts: dict[str, int] = dict.fromkeys(CLASSES, 0)
        self.exits: dict[str, int] = dict.fromkeys(CLASSES, 0)
        self.start_failures = 0
        self.start_wall: float | None = None  # time.time() of the last start
        self.started_at: float | None = None  # Trellis clock of the last start, while up
        self.down_since: float | None = None  # Trellis clock of the last abnormal exit
        self.last_class: str | None = None  # class of the exit before the next restart
        self.recovery = _Hist(*_RECOVERY)
        self.run = _Hist(*_RUN)
        self.missed = 0  # consecutive scrapes whose walk did not find this child
        self.red: _Red | None = None  # the calls of its servers (RED), if any counts


class _SupStats:
    __slots__ = ("gave_up", "missed")

    def __init__(self) -> None:
        self.gave_up = 0
        self.missed = 0


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics for supervision trees, as a ``trellis.run`` extension.

    Counters and histograms come from telemetry (attached by :meth:`attach` or
    :meth:`start`); the ``up``, ``state`` and ``mailbox_length`` gauges come from the
    :class:`~trellis._tree.Tracker` (the tree's shape and states as telemetry showed
    them) for the tree whose root was given to :meth:`tree_started` (or :meth:`track`),
    read at each scrape: a scrape never waits for a supervisor (one that waits for a
    child's readiness cannot answer), and is rendered in a worker thread so that the
    tree's loop is never held by a large tree. Every series has the labels ``node``,
    ``supervisor`` (tree path) and ``child`` (child id) where they apply, never a pid
    or a free-text reason; ``reason`` is an exit class from
    ``normal, shutdown, crash, hung, killed, oom, timeout``.

    Metrics (all prefixed ``trellis_``): ``child_starts_total``,
    ``child_restarts_total{reason}`` (class of the exit that caused the restart),
    ``child_exits_total{reason}``, ``child_start_failures_total``, ``child_up``,
    ``child_state{state}`` (running, starting, restarting, stopped),
    ``child_start_time_seconds``,
    ``child_recovery_seconds`` (abnormal exit to the next start, Trellis clock),
    ``child_run_seconds`` (start to the next abnormal exit), ``child_mailbox_length``,
    ``supervisor_intensity_exceeded_total``, ``journal_write_seconds``,
    ``journal_events_total``, ``journal_dropped_events_total``,
    ``telemetry_handler_failures_total``, ``mailbox_overflows_total{policy}``,
    ``metrics_event_errors_total``.

    RED per server child, from the call counts each server keeps while metrics are
    attached (see :class:`trellis._server.CallStats`; summed at scrape time, across
    restarts): ``server_calls_total``, ``server_call_errors_total`` (the handler raised,
    the server ended before replying, or the caller had given up before the reply) and
    ``server_call_duration_seconds`` (from ``call()`` to the reply or failure, the wait
    in the mailbox included). Servers started before :meth:`attach` are not counted.

    Children of a ``DynamicSupervisor`` or ``simple_one_for_one`` supervisor that share
    a spec id share one label set: ``child_state`` then counts them and ``child_up`` is
    1 only while all of them run. A child the tracker forgets (a temporary child that
    ended, a deleted child, a dynamic child that was terminated, a subtree that is
    gone) keeps its series for one more scrape, then they are removed; so do the
    series of supervisors outside the tracked tree. Children of a supervisor that is
    restarting keep their series, with ``up`` 0 and their state (``restarting``).
    ``child_restarts_total`` and ``child_exits_total`` have a series at 0 for every
    reason class from the child's first start, so ``increase()`` sees the first one.
    ``child_exits_total`` counts the exits the supervisor reacted to
    (``child.exited``), not the children it stopped itself.

    Args:
        node: The ``node`` label (default: the host name).
        registry: The prometheus_client registry to register in (default: a new one,
            in :attr:`registry`).
        walk_timeout: Kept for compatibility: scrapes no longer ask supervisors.
        tracker: The :class:`~trellis._tree.Tracker` to read the tree from (``trellis
            run`` shares one); without one, a tracker of its own follows telemetry
            while the metrics are attached.
        usage_interval: Seconds between two ``process.usage`` telemetry events per OS
            child (CPU, RSS, open files, threads), emitted while the tree runs as an
            extension (from :meth:`tree_started` to :meth:`stop`); 0 for none. The
            ``trellis_process_*`` gauges are read at each scrape regardless.
        app_registry: A registry of the application's own metrics, exposed after
            Trellis's series on every :meth:`render` (so on ``trellis run``'s
            ``/metrics``). By default prometheus_client's default ``REGISTRY``: a
            ``Counter``/``Histogram``/``Gauge`` a server or worker creates the usual
            way (no ``registry=`` argument) is scraped with the tree. ``None`` for
            Trellis's series only. Its collectors run in the render worker thread,
            never on the tree's loop.

    Application metrics (what ``sli = "ratio"``/``"latency"`` SLOs read)::

        from prometheus_client import Counter, Histogram

        DELIVERIES = Counter("notify_deliveries_total", "Deliveries", ["outcome"])
        TIME_TO_SEND = Histogram("notify_time_to_send_seconds", "Accepted to sent")

        class Dispatcher(trellis.Server):
            async def handle_cast(self, msg):
                ...
                DELIVERIES.labels(outcome="sent").inc()
                TIME_TO_SEND.observe(elapsed)

    Example::

        metrics = Metrics(node="web-1")
        exit_code = await trellis.run_async(root, extensions=[metrics])

        body, content_type = await metrics.render()   # while the tree runs
    """

    def __init__(
        self,
        *,
        node: str | None = None,
        registry: CollectorRegistry | None = None,
        walk_timeout: float = 2.0,
        tracker: Tracker | None = None,
        usage_interval: float = 10.0,
        app_registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        if node is None:
            node = socket.gethostname()
        elif not isinstance(node, str) or not node:
            raise TypeError(f"Metrics(node=...) must be a non-empty string, not {node!r}")
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise TypeError(
                f"Metrics(registry=...) must be a prometheus_client CollectorRegistry, "
                f"not {type(registry).__name__}"
            )
        if (
            isinstance(walk_timeout, bool)
            or not isinstance(walk_timeout, int | float)
            or not walk_timeout > 0
        ):
            raise ValueError(f"Metrics(walk_timeout=...) must be > 0 seconds, not {walk_timeout!r}")
        if app_registry is not None and not isinstance(app_registry, CollectorRegistry):
            raise TypeError(
                f"Metrics(app_registry=...) must be a prometheus_client CollectorRegistry "
                f"or None, not {type(app_registry).__name__}"
            )
        self.node = node
        self.walk_timeout = float(walk_timeout)
        self.registry = CollectorRegistry() if registry is None else registry
        #: the application's registry rendered after :attr:`registry` (None: none)
        self.app_registry = app_registry if app_registry is not self.registry else None
        self._children: dict[tuple[str, Any], _ChildStats] = {}
        self._sups: dict[str, _SupStats] = {}
        self._sup_last: dict[str, str] = {}  # class of each supervisor's last restarting exit
        self._journal = _Hist(*_JOURNAL)
        self._journal_events = 0
        self._journal_dropped = 0
        self._handler_failures = 0
        self._overflows: dict[str, int] = {}
        self._plugins: dict[str, _PluginStats] = {}
        self._errors = 0
        self._scrape_lock = threading.Lock()  # one scrape at a time folds RED sums
        self._root: Pid | None = None
        self._live: dict[tuple[str, str], list[int]] = {}
        self._sup_labels: dict[str, str] = {}
        self._refresh_lock = threading.RLock()
        self._own_tracker = tracker is None
        self.tracker = Tracker() if tracker is None else tracker
        self._hid: object | None = None
        if (
            isinstance(usage_interval, bool)
            or not isinstance(usage_interval, int | float)
            or not usage_interval >= 0
        ):
            raise ValueError(
                f"Metrics(usage_interval=...) must be >= 0 seconds, not {usage_interval!r}"
            )
        self.usage_interval = float(usage_interval)
        self._usage_targets: list[Target] = []  # the OS children at the last refresh
        self._sampler: UsageSampler | None = None
        self._red_last: dict[tuple[str, str], tuple[int, int, float, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # whose lag is exported
        self._collector = _Collector(self)
        try:
            self.registry.register(self._collector)
        except ValueError as e:
            raise ValueError(
                f"this registry already holds trellis metrics (one Metrics per registry): {e}"
            ) from e

    # -- lifecycle -----------------------------------------------------------------
    def attach(self) -> Metrics:
        """Start counting telemetry events (idempotent); returns ``self``."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # attached outside the loop: remembered at start()
            pass
        if self._hid is None:
            if self._own_tracker:
                self.tracker.attach()
            self._hid = _telemetry.attach(self._handle, EVENTS)
            enable_call_stats()
        return self

    def detach(self) -> None:
        """Stop counting (idempotent); what was counted stays exported."""
        if self._hid is not None:
            _telemetry.detach(self._hid)
            self._hid = None
            disable_call_stats()
            if self._own_tracker:
                self.tracker.detach()

    @property
    def attached(self) -> bool:
        """Whether the telemetry handler is attached."""
        return self._hid is not None

    def track(self, root: Pid | None) -> None:
        """Export the ``up``/``state`` gauges of the tree under ``root`` at each
        :meth:`render` (``None``: of no tree).

        :meth:`tree_started` does this under ``trellis.run``; a program that starts its
        tree itself calls it.

        Example::

            metrics = Metrics().attach()
            sup = await trellis.Supervisor.start_link(children, name="app")
            metrics.track(sup)
        """
        if root is not None and not isinstance(root, Pid):
            raise TypeError(f"Metrics.track(root) takes a supervisor pid, not {root!r}")
        self._root = root
        if root is not None:
            self.tracker.pin(root)

    async def start(self) -> None:
        """Extension hook: attach to telemetry before the root starts."""
        self._loop = asyncio.get_running_loop()
        self.attach()

    async def tree_started(self, root: Pid, request_stop: Callable[[], None]) -> None:
        """Extension hook: remember the root for the scrape-time gauges; start the
        ``process.usage`` sampler (every ``usage_interval`` seconds)."""
        self.track(root)
        if self.usage_interval > 0 and self._sampler is None:
            self._sampler = UsageSampler(self.usage_interval, self._os_children, self._red_events)
            self._sampler.start()

    async def stop(self) -> None:
        """Extension hook: stop the usage sampler; detach from telemetry after the tree
        has stopped."""
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            await sampler.stop()
        self.detach()

    def _os_children(self) -> list[Target]:
        """The OS children of the tracked tree (safe in a worker thread)."""
        root = self._root
        out: list[Target] = []
        if root is None:
            return out
        for sup, cid, _, pid, _ in self.tracker.states(root):
            os_pid = getattr(pid, "os_pid", None) if pid is not None else None
            if os_pid is not None and pid is not None and pid.alive:
                out.append(((_label(sup), _label(cid)), sup, cid, os_pid))
        return out

    def _red_events(self) -> list[tuple[str, dict[str, Any]]]:
        """``server.calls`` events for the servers that took calls since the last ones
        (called by the sampler in a worker thread): totals and the interval's share."""
        out: list[tuple[str, dict[str, Any]]] = []
        last = self._red_last
        for key, (calls, errors, h) in self._red_rows().items():
            n = sum(h.counts)
            c0, e0, s0, n0 = last.get(key, (0, 0, 0.0, 0))
            if calls == c0:
                continue
            last[key] = (calls, errors, h.sum, n)
            sup, child = key
            out.append(
                (
                    "server.calls",
                    {
                        "path": f"{sup}/{child}",
                        "supervisor": sup,
                        "child_id": child,
                        "calls": calls,
                        "errors": errors,
                        "interval_calls": max(0, calls - c0),
                        "interval_errors": max(0, errors - e0),
                        "interval_mean_duration": (h.sum - s0) / (n - n0) if n > n0 else None,
                    },
                )
            )
        return out

    def _usage_rows(self) -> dict[tuple[str, str], Usage]:
        """USE per label set, read from /proc now (children sharing a label summed)."""
        rows: dict[tuple[str, str], Usage] = {}
        for key, _, _, os_pid in list(self._usage_targets):
            u = read_usage(os_pid)
            if u is None:
                continue
            had = rows.get(key)
            if had is not None:
                fds = (
                    None
                    if had.open_fds is None or u.open_fds is None
                    else had.open_fds + u.open_fds
                )
                u = Usage(
                    had.cpu_seconds + u.cpu_seconds,
                    had.rss_bytes + u.rss_bytes,
                    fds,
                    had.threads + u.threads,
                )
            rows[key] = u
        return rows

    # -- scraping ------------------------------------------------------------------
    async def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition of the registry, rendered in a worker thread: the tree's loop
        is never held for more than a moment, however large the tree (its state comes
        from the tracker, which no supervisor has to answer for).

        ``accept`` is the scraper's ``Accept`` header: OpenMetrics when it asks for it,
        the Prometheus text format 0.0.4 otherwise. Returns ``(body, content_type)``.

        Example::

            body, content_type = await metrics.render(request.headers.get("accept"))
        """
        return await asyncio.to_thread(self.render_now, accept)

    def render_now(self, accept: str | None = None) -> tuple[bytes, str]:
        """:meth:`render` in the calling thread (safe from any thread).

        Trellis's own series are written by a text encoder of their own (strings only:
        prometheus_client's sample objects took seconds for a 10,000-child tree and
        kept the garbage collector busy); other collectors in the registry are
        encoded by prometheus_client as usual."""
        with self._refresh_lock:  # two scrapers at once take turns (shared rows)
            return self._render(accept)

    def _render(self, accept: str | None) -> tuple[bytes, str]:
        self.refresh_now()
        if accept is None:
            encoder: Callable[[Any], bytes] = generate_latest
            content_type = CONTENT_TYPE_PLAIN_0_0_4
        else:
            encoder, content_type = choose_encoder(accept)
        om = content_type.startswith("application/openmetrics-text")
        ours = self._exposition(om)
        self._collector.skip.on = True  # the others only
        try:
            others = encoder(self.registry).decode()
        finally:
            self._collector.skip.on = False
        app = encoder(self.app_registry).decode() if self.app_registry is not None else ""
        if om:
            others = others.removesuffix("# EOF\n")
            app = app.removesuffix("# EOF\n")
            return b"".join([others.encode(), *ours, app.encode(), b"# EOF\n"]), content_type
        return b"".join([others.encode(), *ours, app.encode()]), content_type

    async def refresh(self) -> None:
        """Update the ``up``/``state``/``mailbox_length`` gauges from the tracker and
        drop the series of children no longer in the tree (see the class docstring)."""
        await asyncio.to_thread(self.refresh_now)

    def refresh_now(self) -> None:
        """:meth:`refresh` in the calling thread."""
        with self._refresh_lock:
            self._refresh()

    def _refresh(self) -> None:
        root = self._root
        if root is None:
            self._live = {}
            self._usage_targets = []
            return
        tracker = self.tracker
        tree = tracker.snapshot(root, depth=0)
        if tree is None:  # not seen yet (or already stopped): nothing is known to be gone
            self._live = {}
            self._usage_targets = []
            return
        targets: list[Target] = []
        # the rows of the last scrape are reused: a scrape of a large tree allocates
        # little (fewer garbage collections, which hold every thread)
        live = self._live
        for row in live.values():
            row[:] = _ZERO
        root_label = _label(tree["path"])
        sups: set[str] = {root_label}
        _count(live, ("", root_label), tree["state"], tree["pid"])
        for sup, cid, state, pid, _ in tracker.states(root):
            sup_label = self._sup_labels.get(sup)
            if sup_label is None:
                sup_label = self._sup_labels[sup] = _label(sup)
                sups.add(sup_label)
            elif sup_label not in sups:
                sups.add(sup_label)
            _count(live, (sup_label, _label(cid)), state, pid)
            os_pid = getattr(pid, "os_pid", None) if pid is not None else None
            if os_pid is not None and pid is not None and pid.alive:  # an OS child: USE
                targets.append(((sup_label, _label(cid)), sup, cid, os_pid))
        for key in [k for k, row in live.items() if not any(row[:4])]:
            del live[key]
        if len(self._sup_labels) > 4 * len(sups) + 64:
            self._sup_labels.clear()
        self._live = live
        self._usage_targets = targets
        self._sweep(live, sups, [])

    def _sweep(
        self, live: dict[tuple[str, str], list[int]], sups: set[str], protected: list[str]
    ) -> None:
        def kept(sup: str) -> bool:
            return any(sup == p or sup.startswith(p + "/") for p in protected)

        for key, e in list(self._children.items()):
            sup = _label(e.sup)
            if (sup, _label(e.child)) in live or kept(sup):
                e.missed = 0
                continue
            e.missed += 1
            if e.missed >= 2:
                del self._children[key]
        for path, s in list(self._sups.items()):
            sup = _label(path)
            if sup in sups or kept(sup):
                s.missed = 0
                continue
            s.missed += 1
            if s.missed >= 2:
                del self._sups[path]
        for path in list(self._sup_last):
            if _label(path) not in sups:
                del self._sup_last[path]

    # -- the telemetry handler (hot path) ---------------------------------------------
    def _handle(self, ev: dict[str, Any]) -> None:
        # Kept flat on purpose: this runs inside the supervisor on every restart.
        try:
            name = ev["event"]
            if name == "child.exited":
                try:
                    e = self._children[ev["supervisor"], ev["child_id"]]
                except (KeyError, TypeError):  # first sight, or an unhashable id
                    e = self._child(ev)
                cls = _class_by_type.get(type(reason := ev["reason"])) or _classify(reason)
                ex = e.exits
                ex[cls] = ex.get(cls, 0) + 1
                e.last_class = cls
                if ev["restart"]:
                    self._sup_last[e.sup] = cls
                if cls not in _CLEAN:
                    t = ev["time"]
                    e.down_since = t
                    if e.started_at is not None:
                        h = e.run
                        v = t - e.started_at
                        h.counts[bisect_left(h.bounds, v)] += 1
                        h.sum += v
                e.started_at = None
            elif name == "child.restarted" or name == "child.started":
                try:
                    e = self._children[ev["supervisor"], ev["child_id"]]
                except (KeyError, TypeError):  # first sight, or an unhashable id
                    e = self._child(ev)
                e.starts += 1
                if name == "child.restarted":
                    cls = e.last_class or self._sup_last.get(e.sup, "shutdown")
                    rs = e.restarts
                    rs[cls] = rs.get(cls, 0) + 1
                t = ev["time"]
                if e.down_since is not None:
                    h = e.recovery
                    v = t - e.down_since
                    h.counts[bisect_left(h.bounds, v)] += 1
                    h.sum += v
                    e.down_since = None
                e.started_at = t
                e.start_wall = _wall()
                if _server_call_stats:
                    cs = _server_call_stats.get(ev["pid"])
                    if cs is not None:  # a server counting its calls: RED per child
                        red = e.red
                        if red is None:
                            red = e.red = _Red()
                        red.live.append(cs)
                        # a child restarting often between scrapes: fold its ended
                        # servers now (never waiting for a scrape in progress)
                        if len(red.live) > 32 and self._scrape_lock.acquire(blocking=False):
                            try:
                                red.totals()
                            finally:
                                self._scrape_lock.release()
            elif name == "child.terminated":
                e = self._child(ev)
                e.started_at = None
                e.last_class = None  # if restarted, it is a bystander of a sibling's exit
            elif name == "child.start_failed":
                self._child(ev).start_failures += 1
            else:
                self._handle_other(name, ev)
        except Exception:  # never let a bad event detach the handler
            self._errors += 1
            if self._errors == 1:
                _log.exception("metrics could not count the event %r", ev.get("event"))

    def _child(self, ev: dict[str, Any]) -> _ChildStats:
        """The stats of the event's child, created on first sight."""
        sup = ev["supervisor"]
        cid = ev["child_id"]
        try:
            e = self._children.get((sup, cid))
        except TypeError:  # an unhashable child id
            cid = repr(cid)
            e = self._children.get((sup, cid))
        if e is None:
            e = self._children[sup, cid] = _ChildStats(sup, cid)
        return e

    def _handle_other(self, name: str, ev: dict[str, Any]) -> None:
        if name == "supervisor.gave_up":
            sup = ev["supervisor"]
            s = self._sups.get(sup)
            if s is None:
                s = self._sups[sup] = _SupStats()
            s.gave_up += 1
        elif name == "journal.batch":
            n = ev["events"]
            secs = float(ev["seconds"])
            if isinstance(n, bool) or not isinstance(n, int) or n < 0 or not secs >= 0:
                raise ValueError(f"bad journal.batch fields: events={n!r} seconds={secs!r}")
            self._journal_events += n
            self._journal.observe(secs)
        elif name == "journal.dropped":
            n = ev["count"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"bad journal.dropped count: {n!r}")
            self._journal_dropped += n
        elif name == "mailbox.overflow":
            policy = _label(ev.get("policy"))
            self._overflows[policy] = self._overflows.get(policy, 0) + 1
        elif name == "telemetry.handler_failed":
            self._handler_failures += 1
        elif name.startswith("plugin."):
            self._plugin_event(name, ev)

    def _plugin_event(self, name: str, ev: dict[str, Any]) -> None:
        key = _label(ev.get("path") or ev.get("plugin"))
        p = self._plugins.get(key)
        if p is None:
            p = self._plugins[key] = _PluginStats()
        if name != "plugin.stats":
            p.quarantined = 1 if name == "plugin.quarantined" else 0
            return
        buckets = ev["buckets"]
        if len(buckets) != len(p.duration.counts):
            raise ValueError(f"bad plugin.stats buckets: {buckets!r}")
        errors = ev.get("errors") or {}
        ok = int(ev["calls"]) - sum(int(n) for n in errors.values())
        for kind, n in (("ok", ok), *errors.items()):
            k = _label(kind)
            p.calls[k] = p.calls.get(k, 0) + int(n)
        for i, (_, n) in enumerate(buckets):
            p.duration.counts[i] += int(n)
        p.duration.sum += float(ev["seconds"])
        p.memory_high = max(p.memory_high, int(ev.get("memory_high") or 0))
        p.fuel += int(ev.get("fuel") or 0)

    # -- exposition ----------------------------------------------------------------
    def _merged(self) -> dict[tuple[str, str], _ChildStats]:
        """The counts per label set (dynamic children sharing a spec id are summed).
        A label set with one child maps to that child's own record (do not change it)."""
        merged: dict[tuple[str, str], _ChildStats] = {}
        shared: set[tuple[str, str]] = set()
        for e in list(self._children.values()):
            key = e.key
            m = merged.get(key)
            if m is None:
                merged[key] = e
                continue
            if key not in shared:  # a second child with these labels: sum into a copy
                shared.add(key)
                first, m = m, _ChildStats(*key)
                merged[key] = m
                _merge(m, first)
            _merge(m, e)
        return merged

    async def stats(self) -> dict[str, Any]:
        """:meth:`stats_now` in a worker thread (it reads /proc)."""
        return await asyncio.to_thread(self.stats_now)

    def stats_now(self) -> dict[str, Any]:
        """The numbers behind the RED, USE and loop-lag series, as plain JSON-able data
        for a dashboard (safe in any thread; reads /proc)::

            {"node": ..., "time": unix time,
             "children": {"sup/child": {"calls", "errors", "duration_sum",
                                        "duration_count", "cpu_seconds", "rss_bytes",
                                        "open_fds", "threads"}},   # what applies
             "loop": {"lag_count", "lag_sum", "lag_last", "blocked"} or None}

        Keys are ``supervisor/child`` from the metric labels (dynamic children sharing
        a spec id are summed, as in the series).
        """
        children: dict[str, dict[str, Any]] = {}
        for (sup, child), (calls, errors, h) in self._red_rows().items():
            children[f"{sup}/{child}"] = {
                "calls": calls,
                "errors": errors,
                "duration_sum": h.sum,
                "duration_count": sum(h.counts),
            }
        self._usage_targets = self._os_children()
        for (sup, child), u in self._usage_rows().items():
            children.setdefault(f"{sup}/{child}", {}).update(u._asdict())
        lag = loop_lag(self._loop) if self._loop is not None else None
        loop = None
        if lag is not None:
            loop = {
                "lag_count": sum(lag.counts),
                "lag_sum": lag.sum,
                "lag_last": lag.last,
                "blocked": lag.blocked,
            }
        return {"node": self.node, "time": _wall(), "children": children, "loop": loop}

    def _red_rows(self) -> dict[tuple[str, str], tuple[int, int, _Hist]]:
        """RED per label set: calls, errors and the duration histogram of the servers
        each child ran (dynamic children sharing a spec id are summed)."""
        rows: dict[tuple[str, str], tuple[int, int, _Hist]] = {}
        with self._scrape_lock:
            for e in list(self._children.values()):
                red = e.red
                if red is None:
                    continue
                calls, errors, hist = red.totals()
                had = rows.get(e.key)
                if had is not None:
                    hist.add(had[2])
                    calls += had[0]
                    errors += had[1]
                rows[e.key] = (calls, errors, hist)
        return rows

    def _exposition(self, om: bool) -> list[bytes]:
        """Trellis's series in the Prometheus text format 0.0.4 (or OpenMetrics, without
        its ``# EOF``): the same families, names and samples as :meth:`_families`,
        written as strings."""
        fams = {f.name: f for f in self._families(empty=True)}
        chunks: list[bytes] = []
        out: list[str] = []

        def add(line: str) -> None:  # encoded a slice at a time: no giant join
            out.append(line)
            if len(out) >= 4096:
                chunks.append("".join(out).encode())
                out.clear()

        def head(name: str) -> str:
            f = fams[name]
            full = name + "_total" if f.type == "counter" else name
            shown = name if om else full
            doc = f.documentation.replace("\\", "\\\\").replace("\n", "\\n")
            add(f"# HELP {shown} {doc}\n# TYPE {shown} {f.type}\n")
            return full

        def hist(name: str, lb: str, h: _Hist) -> None:
            total = 0
            for le, n in zip(h.les, h.counts, strict=True):
                total += n
                add(f'{name}_bucket{{{lb},le="{le}"}} {total}.0\n')
            add(f"{name}_count{{{lb}}} {total}.0\n{name}_sum{{{lb}}} {_num(h.sum)}\n")

        node = _esc(self.node)
        by_key = self._merged()
        merged = list(by_key.values())
        for m in merged:
            if m.lb is None:
                sup, child = m.key
                m.lb = f'node="{node}",supervisor="{_esc(sup)}",child="{_esc(child)}"'
        name = head("trellis_child_starts")
        for m in merged:
            add(f"{name}{{{m.lb}}} {m.starts}.0\n")
        for fam, attr in (("trellis_child_restarts", "restarts"), ("trellis_child_exits", "exits")):
            name = head(fam)
            for m in merged:
                lb = m.lb
                for cls, n in list(getattr(m, attr).items()):
                    add(f'{name}{{{lb},reason="{_esc(cls)}"}} {n}.0\n')
        name = head("trellis_child_start_failures")
        for m in merged:
            add(f"{name}{{{m.lb}}} {m.start_failures}.0\n")
        name = head("trellis_child_start_time_seconds")
        for m in merged:
            if m.start_wall is not None:
                add(f"{name}{{{m.lb}}} {_num(m.start_wall)}\n")
        name = head("trellis_child_recovery_seconds")
        for m in merged:
            hist(name, m.lb or "", m.recovery)
        name = head("trellis_child_run_seconds")
        for m in merged:
            hist(name, m.lb or "", m.run)
        live = list(self._live.items())

        def live_lb(key: tuple[str, str]) -> str:
            m = by_key.get(key)
            if m is not None and m.lb is not None:
                return m.lb
            return f'node="{node}",supervisor="{_esc(key[0])}",child="{_esc(key[1])}"'

        name = head("trellis_child_up")
        for key, row in live:
            n_run = row[0]
            up = 1 if n_run and n_run == row[0] + row[1] + row[2] + row[3] else 0
            add(f"{name}{{{live_lb(key)}}} {up}.0\n")
        name = head("trellis_child_state")
        for key, row in live:
            lb = live_lb(key)
            for i, st in enumerate(_STATES):
                add(f'{name}{{{lb},state="{st}"}} {row[i]}.0\n')
        name = head("trellis_child_mailbox_length")
        for key, row in live:
            add(f"{name}{{{live_lb(key)}}} {row[4]}.0\n")
        red = self._red_rows()
        name = head("trellis_server_calls")
        for key, (calls, _, _) in red.items():
            add(f"{name}{{{live_lb(key)}}} {calls}.0\n")
        name = head("trellis_server_call_errors")
        for key, (_, errors, _) in red.items():
            add(f"{name}{{{live_lb(key)}}} {errors}.0\n")
        name = head("trellis_server_call_duration_seconds")
        for key, (_, _, h) in red.items():
            hist(name, live_lb(key), h)
        use = self._usage_rows()
        for fam, field in _USE_FAMILIES:
            name = head(fam)
            for key, u in use.items():
                v = getattr(u, field)
                if v is not None:
                    add(f"{name}{{{live_lb(key)}}} {_num(v)}\n")
        lag = loop_lag(self._loop) if self._loop is not None else None
        if lag is not None:  # measured by trellis.run's watchdog
            hist(head("trellis_event_loop_lag_seconds"), f'node="{node}"', _lag_hist(lag))
            add(f'{head("trellis_event_loop_blocked")}{{node="{node}"}} {lag.blocked}.0\n')
        name = head("trellis_supervisor_intensity_exceeded")
        gave_up: dict[str, int] = {}
        for path, s in list(self._sups.items()):
            label = _label(path)
            gave_up[label] = gave_up.get(label, 0) + s.gave_up
        for label, n in sorted(gave_up.items()):
            add(f'{name}{{node="{node}",supervisor="{_esc(label)}"}} {n}.0\n')
        nl = f'node="{node}"'
        hist(head("trellis_journal_write_seconds"), nl, self._journal)
        for fam, value in (
            ("trellis_journal_events", self._journal_events),
            ("trellis_journal_dropped_events", self._journal_dropped),
            ("trellis_telemetry_handler_failures", self._handler_failures),
        ):
            add(f"{head(fam)}{{{nl}}} {value}.0\n")
        name = head("trellis_mailbox_overflows")
        for policy, n in sorted(self._overflows.items()):
            add(f'{name}{{{nl},policy="{_esc(policy)}"}} {n}.0\n')
        plugins = sorted(self._plugins.items())
        name = head("trellis_plugin_calls")
        for path, p in plugins:
            for kind, n in sorted(p.calls.items()):
                add(f'{name}{{{nl},plugin="{_esc(path)}",kind="{_esc(kind)}"}} {n}.0\n')
        name = head("trellis_plugin_call_duration_seconds")
        for path, p in plugins:
            hist(name, f'{nl},plugin="{_esc(path)}"', p.duration)
        for fam, attr in (
            ("trellis_plugin_memory_high_bytes", "memory_high"),
            ("trellis_plugin_fuel_consumed", "fuel"),
            ("trellis_plugin_quarantined", "quarantined"),
        ):
            name = head(fam)
            for path, p in plugins:
                add(f'{name}{{{nl},plugin="{_esc(path)}"}} {getattr(p, attr)}.0\n')
        add(f"{head('trellis_metrics_event_errors')}{{{nl}}} {self._errors}.0\n")
        chunks.append("".join(out).encode())
        return chunks

    def _families(self, empty: bool = False) -> list[Metric]:
        node = self.node
        L = ["node", "supervisor", "child"]
        starts = CounterMetricFamily(
            "trellis_child_starts", "Child starts, restarts included.", labels=L
        )
        restarts = CounterMetricFamily(
            "trellis_child_restarts",
            "Child restarts by the class of the exit that caused them.",
            labels=[*L, "reason"],
        )
        exits = CounterMetricFamily(
            "trellis_child_exits", "Child exits by exit class.", labels=[*L, "reason"]
        )
        failures = CounterMetricFamily(
            "trellis_child_start_failures",
            "Starts (first or restart) whose start function failed.",
            labels=L,
        )
        start_time = GaugeMetricFamily(
            "trellis_child_start_time_seconds",
            "Unix time of the child's last start.",
            labels=L,
        )
        recovery = HistogramMetricFamily(
            "trellis_child_recovery_seconds",
            "Time from an abnormal exit to the next start of the child (DOWN to UP).",
            labels=L,
        )
        run = HistogramMetricFamily(
            "trellis_child_run_seconds",
            "Time from a start to the next abnormal exit (time between failures).",
            labels=L,
        )
        up = GaugeMetricFamily(
            "trellis_child_up", "1 while the child runs, 0 otherwise (at scrape time).", labels=L
        )
        state = GaugeMetricFamily(
            "trellis_child_state",
            "Children in each state: running, restarting or stopped (at scrape time).",
            labels=[*L, "state"],
        )
        mailbox = GaugeMetricFamily(
            "trellis_child_mailbox_length",
            "Messages waiting in the child's mailbox (at scrape time).",
            labels=L,
        )
        calls = CounterMetricFamily(
            "trellis_server_calls",
            "Calls a server took from its mailbox, plus those left in it when it ended.",
            labels=L,
        )
        call_errors = CounterMetricFamily(
            "trellis_server_call_errors",
            "Calls that got no reply from the server: its handler raised, it ended "
            "before replying, or the caller had given up (timeout) before the reply.",
            labels=L,
        )
        call_duration = HistogramMetricFamily(
            "trellis_server_call_duration_seconds",
            "Time from call() to the server's reply or the call's failure "
            "(the wait in the mailbox included).",
            labels=L,
        )
        use_fams: list[Metric] = [
            CounterMetricFamily(
                "trellis_process_cpu_seconds",
                "User and system CPU time of the OS child's process (read from /proc).",
                labels=L,
            ),
            GaugeMetricFamily(
                "trellis_process_resident_memory_bytes",
                "Resident memory of the OS child's process (read from /proc).",
                labels=L,
            ),
            GaugeMetricFamily(
                "trellis_process_open_fds",
                "Open file descriptors of the OS child's process (read from /proc).",
                labels=L,
            ),
            GaugeMetricFamily(
                "trellis_process_threads",
                "Threads of the OS child's process (read from /proc).",
                labels=L,
            ),
        ]
        loop_lag_fam = HistogramMetricFamily(
            "trellis_event_loop_lag_seconds",
            "How late the tree's event loop ran the watchdog's callback, sampled "
            "every 100 ms (or lag_threshold if shorter); 0 while the loop waits.",
            labels=["node"],
        )
        loop_blocked = CounterMetricFamily(
            "trellis_event_loop_blocked",
            "Times the event loop did not answer the watchdog within the lag threshold.",
            labels=["node"],
        )
        gave_up = CounterMetricFamily(
            "trellis_supervisor_intensity_exceeded",
            "Times the supervisor reached its maximum restart intensity and gave up.",
            labels=["node", "supervisor"],
        )
        journal = HistogramMetricFamily(
            "trellis_journal_write_seconds", "Journal batch write latency.", labels=["node"]
        )
        journal_events = CounterMetricFamily(
            "trellis_journal_events", "Events written to the journal.", labels=["node"]
        )
        journal_dropped = CounterMetricFamily(
            "trellis_journal_dropped_events",
            "Events the journal dropped because its writer fell behind.",
            labels=["node"],
        )
        handler_failures = CounterMetricFamily(
            "trellis_telemetry_handler_failures",
            "Telemetry handlers that raised and were detached.",
            labels=["node"],
        )
        overflows = CounterMetricFamily(
            "trellis_mailbox_overflows",
            "Messages that met a full bounded mailbox, by policy.",
            labels=["node", "policy"],
        )
        PL = ["node", "plugin"]
        plugin_calls = CounterMetricFamily(
            "trellis_plugin_calls",
            "WASM plugin calls by outcome: ok, or the PluginError kind.",
            labels=[*PL, "kind"],
        )
        plugin_duration = HistogramMetricFamily(
            "trellis_plugin_call_duration_seconds",
            "WASM plugin call latency (queue wait on the instance included).",
            labels=PL,
        )
        plugin_memory = GaugeMetricFamily(
            "trellis_plugin_memory_high_bytes",
            "Highest linear memory a plugin's instances reached.",
            labels=PL,
        )
        plugin_fuel = CounterMetricFamily(
            "trellis_plugin_fuel_consumed", "Fuel used by a plugin's calls.", labels=PL
        )
        plugin_quarantined = GaugeMetricFamily(
            "trellis_plugin_quarantined",
            "1 while a PluginHost keeps the plugin quarantined.",
            labels=PL,
        )
        errors = CounterMetricFamily(
            "trellis_metrics_event_errors",
            "Telemetry events the metrics handler could not count.",
            labels=["node"],
        )
        fams: list[Metric] = [
            starts,
            restarts,
            exits,
            failures,
            start_time,
            recovery,
            run,
            up,
            state,
            mailbox,
            calls,
            call_errors,
            call_duration,
            *use_fams,
            loop_lag_fam,
            loop_blocked,
            gave_up,
            journal,
            journal_events,
            journal_dropped,
            handler_failures,
            overflows,
            plugin_calls,
            plugin_duration,
            plugin_memory,
            plugin_fuel,
            plugin_quarantined,
            errors,
        ]
        if empty:
            return fams

        # children with one label set (dynamic children sharing a spec id, masked
        # paths) are summed
        merged = self._merged()
        for (sup, child), m in merged.items():
            labels = [node, sup, child]
            starts.add_metric(labels, m.starts)
            for cls, n in m.restarts.items():
                restarts.add_metric([*labels, cls], n)
            for cls, n in m.exits.items():
                exits.add_metric([*labels, cls], n)
            failures.add_metric(labels, m.start_failures)
            if m.start_wall is not None:
                start_time.add_metric(labels, m.start_wall)
            recovery.add_metric(labels, m.recovery.buckets(), m.recovery.sum)
            run.add_metric(labels, m.run.buckets(), m.run.sum)
        for (sup, child), row in list(self._live.items()):
            labels = [node, sup, child]
            n_run = row[0]
            up.add_metric(labels, 1 if n_run and n_run == row[0] + row[1] + row[2] + row[3] else 0)
            for i, st in enumerate(_STATES):
                state.add_metric([*labels, st], row[i])
            mailbox.add_metric(labels, row[4])
        for (sup, child), (n, k, h) in self._red_rows().items():
            labels = [node, sup, child]
            calls.add_metric(labels, n)
            call_errors.add_metric(labels, k)
            call_duration.add_metric(labels, h.buckets(), h.sum)
        use = self._usage_rows()
        for fam, (_, field) in zip(use_fams, _USE_FAMILIES, strict=True):
            for (sup, child), u in use.items():
                v = getattr(u, field)
                if v is not None:
                    fam.add_metric([node, sup, child], v)  # type: ignore[attr-defined]
        lag = loop_lag(self._loop) if self._loop is not None else None
        if lag is not None:
            h = _lag_hist(lag)
            loop_lag_fam.add_metric([node], h.buckets(), h.sum)
            loop_blocked.add_metric([node], lag.blocked)
        sup_gave_up: dict[str, int] = {}
        for path, s in list(self._sups.items()):
            label = _label(path)
            sup_gave_up[label] = sup_gave_up.get(label, 0) + s.gave_up
        for label, n in sorted(sup_gave_up.items()):
            gave_up.add_metric([node, label], n)
        journal.add_metric([node], self._journal.buckets(), self._journal.sum)
        journal_events.add_metric([node], self._journal_events)
        journal_dropped.add_metric([node], self._journal_dropped)
        handler_failures.add_metric([node], self._handler_failures)
        for policy, n in sorted(self._overflows.items()):
            overflows.add_metric([node, policy], n)
        for path, p in sorted(self._plugins.items()):
            for kind, n in sorted(p.calls.items()):
                plugin_calls.add_metric([node, path, kind], n)
            plugin_duration.add_metric([node, path], p.duration.buckets(), p.duration.sum)
            plugin_memory.add_metric([node, path], p.memory_high)
            plugin_fuel.add_metric([node, path], p.fuel)
            plugin_quarantined.add_metric([node, path], p.quarantined)
        errors.add_metric([node], self._errors)
        return fams


#: The USE families and the :class:`Usage` field each exports.
_USE_FAMILIES = (
    ("trellis_process_cpu_seconds", "cpu_seconds"),
    ("trellis_process_resident_memory_bytes", "rss_bytes"),
    ("trellis_process_open_fds", "open_fds"),
    ("trellis_process_threads", "threads"),
)


def _esc(value: str) -> str:
    """A label value escaped for the text formats."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _num(v: float) -> str:
    """A sample value as prometheus_client writes it (``1.0``, ``+Inf``)."""
    if type(v) is int:
        return f"{v}.0"
    return str(floatToGoString(v))  # type: ignore[no-untyped-call]


def _merge(m: _ChildStats, e: _ChildStats) -> None:
    """Add the counts of ``e`` to ``m``."""
    m.starts += e.starts
    _add_counts(m.restarts, e.restarts)
    _add_counts(m.exits, e.exits)
    m.start_failures += e.start_failures
    if e.start_wall is not None and (m.start_wall is None or e.start_wall > m.start_wall):
        m.start_wall = e.start_wall
    m.recovery.add(e.recovery)
    m.run.add(e.run)


def _add_counts(into: dict[str, int], other: dict[str, int]) -> None:
    for k, n in list(other.items()):  # a copy: another thread may be collecting
        into[k] = into.get(k, 0) + n


_ZERO = (0, 0, 0, 0, 0)


def _count(
    live: dict[tuple[str, str], list[int]], key: tuple[str, str], state: str, pid: Any
) -> None:
    row = live.get(key)
    if row is None:
        row = live[key] = [0, 0, 0, 0, 0]
    row[_STATE_INDEX[state]] += 1
    if pid is not None and pid.alive:
        row[4] += pid.message_queue_len


class _Collector(Collector):
    """Adapts :class:`Metrics` to prometheus_client's collector protocol."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.skip = threading.local()  # set while render_now encodes the other collectors

    def collect(self) -> Iterable[Metric]:
        if getattr(self.skip, "on", False):
            return []
        with self._metrics._refresh_lock:  # not while a render recounts the gauges
            return self._metrics._families()

    def describe(self) -> Sequence[Metric]:
        return self._metrics._families(empty=True)

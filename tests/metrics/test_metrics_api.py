"""trellis.metrics without a tree: journal and bus events, the constructor, the
extension hooks, exposition formats and the label and classification helpers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

import trellis
from trellis._tree import classify
from trellis.metrics import Metrics
from trellis.metrics._metrics import _classify, _label

Scrape = Callable[..., Awaitable[Any]]
emit = trellis.telemetry.emit


async def test_journal_metrics_from_batch_and_dropped_events(
    metrics: Metrics, scrape: Scrape
) -> None:
    """journal.batch events feed the write-latency histogram and the events counter;
    journal.dropped counts add up; buckets are cumulative by the batch's seconds."""
    emit("journal.batch", events=100, seconds=0.0004)
    emit("journal.batch", events=50, seconds=0.003)
    emit("journal.batch", events=10, seconds=0.2)
    emit("journal.dropped", count=7)
    emit("journal.dropped", count=3)
    s = await scrape(metrics)

    assert s.value("trellis_journal_events_total") == 160
    assert s.value("trellis_journal_dropped_events_total") == 10
    assert s.value("trellis_journal_write_seconds_count") == 3
    assert s.value("trellis_journal_write_seconds_sum") == pytest.approx(0.2034)
    assert s.value("trellis_journal_write_seconds_bucket", le="0.0005") == 1
    assert s.value("trellis_journal_write_seconds_bucket", le="0.0025") == 1
    assert s.value("trellis_journal_write_seconds_bucket", le="0.005") == 2
    assert s.value("trellis_journal_write_seconds_bucket", le="0.1") == 2
    assert s.value("trellis_journal_write_seconds_bucket", le="0.25") == 3
    assert s.value("trellis_journal_write_seconds_bucket", le="+Inf") == 3


async def test_node_wide_counters_start_at_zero(metrics: Metrics, scrape: Scrape) -> None:
    """Before any event the journal, handler-failure and error counters are exported
    as 0, so a dashboard sees them from the first scrape."""
    s = await scrape(metrics)
    for name in (
        "trellis_journal_events_total",
        "trellis_journal_dropped_events_total",
        "trellis_journal_write_seconds_count",
        "trellis_telemetry_handler_failures_total",
        "trellis_metrics_event_errors_total",
    ):
        assert s.value(name) == 0


async def test_malformed_events_are_counted_not_fatal(
    metrics: Metrics, scrape: Scrape, caplog: pytest.LogCaptureFixture
) -> None:
    """A journal.batch with a non-numeric count or a child event without its fields is
    counted as an error; the handler stays attached and keeps counting."""
    with caplog.at_level(logging.ERROR, "trellis.metrics"):
        emit("journal.batch", events="many", seconds=0.1)
        emit("journal.dropped", count=-1)
        emit("child.exited", supervisor="x")
    emit("journal.batch", events=5, seconds=0.001)
    s = await scrape(metrics)

    assert metrics.attached
    assert s.value("trellis_metrics_event_errors_total") == 3
    assert s.value("trellis_journal_events_total") == 5
    assert s.value("trellis_journal_dropped_events_total") == 0
    assert "could not count" in caplog.text


async def test_handler_failures_and_mailbox_overflows(metrics: Metrics, scrape: Scrape) -> None:
    """A telemetry handler that raises is counted once (it is detached); a bounded
    mailbox that overflows counts each refused message under its policy."""

    def bad(event: dict[str, Any]) -> None:
        raise RuntimeError("bad handler")

    class Small(trellis.Server):
        mailbox_size = 1
        mailbox_policy = "drop_newest"

        async def handle_cast(self, msg: Any) -> None:
            pass

    trellis.telemetry.attach(bad, events=["test.ping"])
    emit("test.ping")
    emit("test.ping")  # detached by now: not counted again
    pid = await Small.start_link()
    for i in range(4):  # the server has not run yet: one fits, three overflow
        trellis.cast(pid, i)
    s = await scrape(metrics)
    await trellis.stop(pid)

    assert s.value("trellis_telemetry_handler_failures_total") == 1
    assert s.value("trellis_mailbox_overflows_total", policy="drop_newest") == 3


def test_constructor_rejects_bad_arguments() -> None:
    """node, registry and walk_timeout are checked with errors that name them; a
    second Metrics on one registry is refused."""
    with pytest.raises(TypeError, match="node"):
        Metrics(node="")
    with pytest.raises(TypeError, match="node"):
        Metrics(node=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="registry"):
        Metrics(registry="default")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="walk_timeout"):
        Metrics(walk_timeout=0)
    reg = CollectorRegistry()
    Metrics(node="a", registry=reg)
    with pytest.raises(ValueError, match="one Metrics per registry"):
        Metrics(node="b", registry=reg)
    with pytest.raises(TypeError, match="supervisor pid"):
        Metrics(node="a").track("root")  # type: ignore[arg-type]


def test_default_node_is_the_host_name() -> None:
    """Without node= the node label is the host name."""
    import socket

    assert Metrics().node == socket.gethostname()


async def test_extension_hooks_attach_and_detach() -> None:
    """start() attaches, tree_started() remembers the root, stop() detaches; attach
    and detach are idempotent."""
    m = Metrics(node="n")
    assert not m.attached
    await m.start()
    assert m.attached
    assert m.attach() is m
    sup = await trellis.Supervisor.start_link([], name="m-hooks")
    await m.tree_started(sup, lambda: None)
    body, _ = await m.render()
    assert b'child="m-hooks"' in body
    await sup.stop()
    await m.stop()
    assert not m.attached
    m.detach()
    emit("journal.dropped", count=4)
    body, _ = await m.render()
    assert b'trellis_journal_dropped_events_total{node="n"} 0.0' in body


async def test_without_a_root_only_telemetry_series_are_exported(
    metrics: Metrics, scrape: Scrape
) -> None:
    """Until a root is tracked no tree is walked: no up/state/mailbox series."""
    s = await scrape(metrics)
    assert s.select("trellis_child_up") == []
    assert s.select("trellis_child_state") == []
    assert s.types["trellis_child_up"] == "gauge"


async def test_openmetrics_on_request_and_a_shared_registry() -> None:
    """render(accept) answers OpenMetrics when asked; a registry given to Metrics also
    exports its other collectors."""
    reg = CollectorRegistry()
    Counter("app_requests", "Requests.", registry=reg).inc(2)
    m = Metrics(node="n", registry=reg)
    body, content_type = await m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    body, content_type = await m.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"app_requests", "trellis_child_starts", "trellis_journal_events"} <= names


def test_label_values_mask_pids_and_addresses() -> None:
    """Default process names, pid reprs and object addresses are masked; long values
    are cut; ordinary ids pass unchanged."""
    assert _label("<12>/sub") == "<unnamed>/sub"
    assert _label("<Pid 7 'x'>") == "<pid>"
    assert _label(object()) == "<object object at 0x?>"
    assert _label(("shard", 3)) == "('shard', 3)"
    assert _label("collectors/btc") == "collectors/btc"
    long = _label("x" * 500)
    assert len(long) == 120
    assert long.endswith("…")


@pytest.mark.parametrize(
    "reason",
    [
        RuntimeError("x"),
        TimeoutError(),
        trellis.NORMAL,
        trellis.SHUTDOWN,
        trellis.KILLED,
        trellis.Shutdown("bye"),
        "hung",
        trellis.ExitCode(0),
        trellis.ExitCode(3),
        trellis.Signaled("SIGKILL"),
        trellis.Hung("silent"),
    ],
)
def test_cached_classification_agrees_with_classify(reason: Any) -> None:
    """The per-type cache used on the hot path gives classify()'s answer, also on the
    second (cached) call, and never caches OS-process reasons by type."""
    assert _classify(reason) == classify(reason)
    assert _classify(reason) == classify(reason)
    assert _classify(trellis.ExitCode(0)) == "normal"
    assert _classify(trellis.ExitCode(1)) == "crash"

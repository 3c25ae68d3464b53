"""The application's own prometheus_client metrics on the tree's /metrics: a worker
under `trellis run` counts with a plain `Counter`/`Histogram` (the default registry)
and a real HTTP scrape of the control API shows them beside Trellis's series."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as om_families,
)
from prometheus_client.parser import text_string_to_metric_families

from trellis.metrics import Metrics
from trellis.sre._rules import latency_selectors

WORKER = """
import asyncio, os
from prometheus_client import Counter, Histogram

DELIVERIES = Counter("notify_deliveries_total", "Deliveries by outcome", ["outcome"])
TIME_TO_SEND = Histogram(
    "notify_time_to_send_seconds", "Accepted to sent", buckets=(0.5, 1.0, 5.0)
)

async def dispatch(n, done):
    for i in range(n):
        DELIVERIES.labels(outcome="sent" if i % 4 else "failed").inc()
        TIME_TO_SEND.observe(0.2 if i % 2 else 2.0)
    with open(done, "w") as f:
        f.write("ok")
    await asyncio.sleep(3600)
"""

TREE = """
[supervisor]
name = "notify"

[[supervisor.children]]
id = "dispatch"
worker = "appmetrics_worker:dispatch"
args = [20, "{done}"]
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory for the control socket (AF_UNIX paths are short)."""
    d = Path(tempfile.mkdtemp(prefix="tl-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _samples(text: str, om: bool = False) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    parse = om_families if om else text_string_to_metric_families
    return {
        (s.name, frozenset(s.labels.items())): float(s.value)
        for fam in parse(text)
        for s in fam.samples
    }


def _get(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **lb: str
) -> float:
    found = [v for (n, labels), v in samples.items() if n == name and set(lb.items()) <= labels]
    assert len(found) == 1, (name, lb, found)
    return found[0]


def test_a_worker_s_metrics_on_trellis_run_metrics(short_dir: Path) -> None:
    (short_dir / "appmetrics_worker.py").write_text(textwrap.dedent(WORKER))
    done = short_dir / "done"
    (short_dir / "tree.toml").write_text(TREE.format(done=done))
    sock = short_dir / "c.sock"
    env = {**os.environ, "PYTHONPATH": str(short_dir)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trellis",
            "run",
            "tree.toml",
            "--no-journal",
            "--socket",
            str(sock),
            "--node",
            "n1",
        ],
        cwd=short_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not (done.exists() and sock.exists()):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the worker did not count in 30 s"
            time.sleep(0.05)
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://t", timeout=10) as c:
            r = c.get("/metrics")
            assert r.status_code == 200, r.text
            s = _samples(r.text)
            om = c.get("/metrics", headers={"Accept": "application/openmetrics-text"})
            assert om.headers["content-type"].startswith("application/openmetrics-text")
            assert om.text.count("# EOF") == 1
            assert om.text.endswith("# EOF\n")
            o = _samples(om.text, om=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()

    for got in (s, o):
        # the tree's own series and the worker's, in one scrape
        assert _get(got, "trellis_child_up", node="n1", child="dispatch") == 1.0
        assert _get(got, "notify_deliveries_total", outcome="sent") == 15.0
        assert _get(got, "notify_deliveries_total", outcome="failed") == 5.0
        assert _get(got, "notify_time_to_send_seconds_count") == 20.0
        assert _get(got, "notify_time_to_send_seconds_bucket", le="0.5") == 10.0
    # what `sli = "latency"` with threshold = 1 reads matches the bound as the client
    # writes it (prometheus_client: le="1.0")
    good, total = latency_selectors("notify_time_to_send_seconds", 1.0)
    le = re.search(r'le=~"([^"]*)"', good)
    assert le is not None
    bounds = {
        dict(lb)["le"] for (n, lb), _ in s.items() if n.endswith("_bucket") and "le" in dict(lb)
    }
    assert "1.0" in bounds
    assert re.fullmatch(le.group(1), "1.0")
    assert total == "notify_time_to_send_seconds_count"


def _render(m: Metrics, accept: str | None = None) -> str:
    return m.render_now(accept)[0].decode()


def test_app_registry_choices() -> None:
    app = CollectorRegistry()
    c = Counter("app_jobs_total", "Jobs", registry=app)
    c.inc(3)
    with_app = Metrics(node="n", app_registry=app, usage_interval=0)
    assert "app_jobs_total 3.0" in _render(with_app)
    assert "app_jobs_total" not in _render(Metrics(node="n", app_registry=None, usage_interval=0))
    # the default is prometheus_client's default registry
    from prometheus_client import REGISTRY

    assert Metrics(node="n", usage_interval=0).app_registry is REGISTRY
    # Trellis in the app's registry: each series once
    shared = Metrics(node="n", registry=app, usage_interval=0)
    text = _render(shared)
    assert text.count("app_jobs_total 3.0") == 1
    assert text.count("# TYPE trellis_journal_events_total counter") == 1
    with pytest.raises(TypeError, match="app_registry"):
        Metrics(app_registry="REGISTRY")  # type: ignore[arg-type]

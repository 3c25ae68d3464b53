"""Plugin metrics: trellis.metrics counts plugin.stats and the host's quarantines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import trellis
from trellis.metrics import Metrics

Wat = Callable[[str], Path]


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render_now()
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_plugin_metrics(wat: Wat) -> None:
    metrics = Metrics(node="n").attach()
    host = trellis.PluginHost(intensity=0, defaults={"memory": "4MiB", "timeout": 1.0})
    sup = await trellis.Supervisor.start_link([host.child_spec()], name="clinic")
    try:
        await host.load("m", wat("misbehave"), fuel=10_000_000)
        for _ in range(3):
            await host.call("m", "echo", b"x")
        with pytest.raises(trellis.PluginError):
            await host.call("m", "fail", b"")
        with pytest.raises(trellis.PluginError):
            await host.call("m", "trap_on", b"boom")  # past a budget of 0: quarantined
        for _ in range(200):
            if host.get("m")["state"] == "quarantined":
                break
            await asyncio.sleep(0.01)
        got = samples(metrics)
    finally:
        await sup.stop()
        metrics.detach()
    lb = (("node", "n"), ("plugin", "clinic/plugins/m"))

    def calls(kind: str) -> float:
        return got[("trellis_plugin_calls_total", (("kind", kind), *lb))]

    assert (calls("ok"), calls("error"), calls("trap")) == (3, 1, 1)
    assert got[("trellis_plugin_call_duration_seconds_count", lb)] == 5
    assert got[("trellis_plugin_memory_high_bytes", lb)] >= 65536
    assert got[("trellis_plugin_fuel_consumed_total", lb)] > 0
    assert got[("trellis_plugin_quarantined", lb)] == 1

"""Fixtures for the metrics tests: an attached ``Metrics`` and a scrape parsed back with
the Prometheus text parser."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trellis.metrics import Metrics

NODE = "test-node"


class Samples:
    """One scrape: every sample as ``(name, labels) -> value``."""

    def __init__(self, body: bytes) -> None:
        self.text = body.decode()
        self.rows: list[tuple[str, dict[str, str], float]] = []
        self.types: dict[str, str] = {}
        for fam in text_string_to_metric_families(self.text):
            self.types[fam.name] = fam.type
            for s in fam.samples:
                self.rows.append((s.name, dict(s.labels), s.value))

    def get(self, name: str, **labels: str) -> float | None:
        """The value of the sample ``name`` whose labels are exactly ``labels`` (plus the
        ``node`` label); None if there is none."""
        want = {"node": NODE, **labels}
        found = [v for n, lb, v in self.rows if n == name and lb == want]
        assert len(found) <= 1, f"duplicate samples for {name} {labels}"
        return found[0] if found else None

    def value(self, name: str, **labels: str) -> float:
        v = self.get(name, **labels)
        assert v is not None, f"no sample {name} {labels} in:\n{self.text}"
        return v

    def select(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Samples called ``name`` whose labels include ``labels``."""
        return [
            (lb, v)
            for n, lb, v in self.rows
            if n == name and all(lb.get(k) == x for k, x in labels.items())
        ]

    def label_values(self) -> set[str]:
        return {v for _, lb, _ in self.rows for v in lb.values()}


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    """A ``Metrics`` attached to telemetry for the test (detached afterwards)."""
    m = Metrics(node=NODE).attach()
    try:
        yield m
    finally:
        m.detach()


@pytest.fixture
def scrape() -> Callable[[Metrics], Awaitable[Samples]]:
    """``await scrape(metrics)``: render and parse the exposition text."""

    async def _scrape(m: Metrics, accept: Any = None) -> Samples:
        body, content_type = await m.render(accept)
        assert content_type.startswith("text/plain; version=0.0.4")
        return Samples(body)

    return _scrape

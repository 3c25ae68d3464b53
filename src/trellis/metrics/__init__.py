"""Prometheus metrics for a running tree: counters and histograms fed by telemetry,
gauges (up, state, mailbox length) read by walking the tree at scrape time.

Example::

    import sys, trellis
    from trellis.metrics import Metrics

    metrics = Metrics(node="web-1")
    sys.exit(trellis.run(root, extensions=[metrics]))

    # in the same event loop, e.g. behind GET /metrics:
    body, content_type = await metrics.render()
"""

from ._metrics import Metrics as Metrics

__all__ = ["Metrics"]

Metrics.__module__ = "trellis.metrics"

"""The plugin host demo (examples/plugin_host), short: good plugins never fail while the
bad ones are contained, the host stays up, the journal verifies with its key."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("clang") is None or shutil.which("wasm-ld") is None,
    reason="the demo's C plugins need clang and lld (apt-get install clang lld)",
)


async def test_demo_short_run(tmp_path: Path) -> None:
    from examples.plugin_host.demo import render, run

    logging.getLogger("trellis").setLevel(logging.CRITICAL)
    try:
        report = await run(3.0, tmp_path, phase_seconds=0.75)
    finally:
        logging.getLogger("trellis").setLevel(logging.NOTSET)
    assert report["ok"], render(report)
    assert report["good_plugin_failures"] == {}
    assert report["statuses"] == {200: report["requests"]}
    assert report["requests"] > 50
    kinds = {k.split(":")[1] for k in report["bad_plugin_outcomes"]}
    assert kinds & {"timeout", "oom", "trap"}
    assert report["journal"]["verify_ok"]
    assert report["journal"]["verify_signed"]
    assert report["journal"]["host_availability"] == 1.0

"""The market-data main job ends its report with the SLO table of the run and writes
the SRE report as HTML; the figures agree with the faults chaos injected."""

from __future__ import annotations

import io
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.append(ROOT)

from examples.market_data.main_job import JobOptions, run_job  # noqa: E402
from rich.console import Console  # noqa: E402

SMALL = {
    "symbols": 6,
    "groups": 3,
    "rate": 400.0,
    "silence": 0.8,
    "heartbeat": 0.1,
    "exchange_watchdog": 0.6,
}


async def test_main_job_report_ends_with_the_slo_table(tmp_path: Path) -> None:
    opts = JobOptions(
        seconds=4, seed=21, workdir=str(tmp_path / "run"), live=False, status_every=60, **SMALL
    )
    out = io.StringIO()
    page = tmp_path / "sre.html"
    result = await run_job(opts, Console(file=out, width=140), html_path=page)
    text = out.getvalue()
    assert result.ok, f"{result.failures}\n{text}"
    tail = text[text.index("RESULT: OK") :]
    assert "service levels for the run" in tail
    assert "market_data (subtree)" in tail
    assert tail.rstrip().endswith(f"SRE report written to {page}")

    slo = result.report["slo"]
    assert slo["schema"] == "trellis.slo.report/1"
    ents = {(e["kind"], e["path"]): e for e in slo["entities"]}
    assert "timeline" not in ents[("subtree", "market_data")]  # kept for the HTML only
    assert result.chaos is not None
    # every child a fault hit and that was restarted shows it: restarts, down time
    hit = {f.target for f in result.chaos.injected if f.restarts}
    assert hit
    for path in hit:
        e = ents[("child", path)]
        assert e["restarts"] >= 1, path
        assert e["down_seconds"] > 0, path
        assert e["availability"] < 1.0, path
    root = ents[("subtree", "market_data")]
    assert root["restarts"] == sum(
        e["restarts"] for (k, p), e in ents.items() if k == "child" and p.count("/") >= 1
    )
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>")
    for path in hit:
        assert f'data-path="{path}"' in html

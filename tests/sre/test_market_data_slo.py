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


def test_slo_table_is_readable_at_80_columns(tmp_path: Path) -> None:
    """At 80 columns the job's SLO table keeps every figure whole (it cut every cell to
    `10…`): the least telling columns are left out, long names wrap."""
    from examples.market_data.job_report import render_slo

    from sre._journal import T0, exited, restarted, started, sup_started, write
    from trellis.sre import read_records, report

    url = f"sqlite:///{tmp_path}/j.db"
    root, coll = "market_data", "market_data/collectors"
    write(
        url,
        "n1",
        [
            started(0, coll, "collector-3", 2),
            started(0, coll, "collector-12", 3),
            sup_started(0, coll),
            started(0, root, "collectors", 4),
            sup_started(0, root),
            exited(100, coll, "collector-3", 2),
            restarted(101.25, coll, "collector-3", 5),
            exited(200, coll, "collector-12", 3),
            restarted(200.5, coll, "collector-12", 6),
        ],
    )
    doc = report(read_records(url), since=T0, until=T0 + 1000)
    for width in (80, 100, 140):
        out = io.StringIO()
        render_slo(doc, Console(file=out, width=width, color_system=None))
        text = out.getvalue()
        assert all(len(line) <= width for line in text.splitlines()), text
        assert "…" not in text, text
        for figure in ("99.875%", "99.950%", "99.825%", "1.75x"):  # availability, burn 1h
            assert figure in text, (width, figure, text)
        # each name is whole once its wrapped pieces are joined
        names = "".join(line.split("│")[1].strip() for line in text.splitlines() if "│" in line)
        assert "market_data/collectors/collector-12" in names, text

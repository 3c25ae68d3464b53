"""The chaos report as people read it: every fault's target and result at any width."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from trellis.chaos import Plan
from trellis.chaos._report import FaultResult, Report


def _wide_and_narrow_report() -> Report:
    faults = (
        FaultResult(id="f1", step=0, fault="kill", target="market-data/collectors/collector-3",
                    planned=1.0, at=1.02, result="ok", detect=0.001, recover=0.12,
                    restarts=2, escalations=0, exit_class="killed"),
        FaultResult(id="f2", step=1, fault="hang", target="market-data/infra/gatekeeper",
                    planned=2.0, at=None, result="skipped: max_concurrent reached"),
    )  # fmt: skip
    return Report(seed=1, duration=60, elapsed=61, faults=faults,
                  plan=Plan(seed=1, steps=(), duration=60, specs=()))  # fmt: skip


@pytest.mark.parametrize("width", [80, 100, 140])
def test_report_keeps_target_and_result_at_any_width(width: int) -> None:
    """At 80 columns the target and result columns wrap; nothing is dropped or cut."""
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(_wide_and_narrow_report().renderable())
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert all(len(line) <= width for line in out.splitlines())
    lines = out.splitlines()
    header = next(line for line in lines if " target " in line)
    start, end = header.index("target"), header.index("result")
    body = []
    for line in lines[lines.index(header) + 2 :]:
        if not line.strip():
            break  # the table ends; the summary lines follow
        body.append(line)
    column = "".join(line[start:].split("  ")[0].strip() for line in body)  # wrapped cells
    assert "market-data/collectors/collector-3" in column, out
    assert "market-data/infra/gatekeeper" in column, out
    results = " ".join(line[end:].split("  ")[0].strip() for line in body)
    assert "ok" in results, out
    assert "skipped:" in results, out
    flat = "".join(out.split())
    for text in ("max_concurrent", "reached", "killed", "0.120s", "0.001s", "1.020s"):
        assert text in flat, (text, out)

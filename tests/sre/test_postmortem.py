"""`trellis postmortem`: a blameless draft from the journal of the incident window."""

from __future__ import annotations

from pathlib import Path

import pytest

from sre._journal import T0, operator, write
from sre.test_report import N1
from trellis.cli import main


def test_postmortem_draft(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/j.db"
    chaos = (
        99.0,
        "operator.action",
        {
            "who": "chaos",
            "action": "fault:kill",
            "target": "app/a",
            "source": "chaos",
            "result": "injected",
        },
    )
    events = sorted([*N1, chaos, operator(150, "restart", "app/a")], key=lambda e: e[0])
    write(url, "n1", events)
    tree = tmp_path / "tree.toml"
    tree.write_text(
        '[supervisor]\nname = "app"\n'
        '[[supervisor.children]]\nid = "a"\nworker = "asyncio:sleep"\nargs = [1]\n'
        'slo = { objective = 0.95, window = 1000 }\nowner = "team-a"\n'
        '[[supervisor.children]]\nid = "b"\nworker = "asyncio:sleep"\nargs = [1]\n'
        '[[supervisor.children]]\nid = "sub"\n'
        '[[supervisor.children.children]]\nid = "c"\nworker = "asyncio:sleep"\nargs = [1]\n'
    )
    out = tmp_path / "pm.md"
    code = main(
        [
            "postmortem",
            str(tree),
            "--journal",
            url,
            "--since",
            str(T0),
            "--until",
            str(T0 + 1000),
            "-o",
            str(out),
        ]
    )
    assert code == 0
    md = out.read_text()
    assert md.startswith("# Postmortem (draft): app/a, app/b, app/sub/c")
    assert "Blameless" in md
    # impact in minutes of budget: a was down 15 s of a 50 s budget
    assert "| app/a | 95% / 1000s | 15s | 0.25 min | 30.0% | 0.6 min | 98.333% |" in md
    assert "| app (subtree) |" in md
    # detection, response, recovery
    assert "- **Started:** 2027-01-15 08:01:40.000 UTC — app/a went down." in md
    assert "first automatic restart was 10s after the start (app/a)" in md
    assert "**Response (first operator action):** 2027-01-15 08:02:30.000 UTC, 50s after" in md
    assert "**Recovered:** 2027-01-15 08:08:21.000 UTC, time to recover 6m 41s." in md
    assert "**Chaos:** 1 fault/heal record" in md
    # the timeline marks operator actions and chaos faults
    assert "**[chaos]** `app/a`: chaos: fault:kill app/a by chaos (injected)" in md
    assert "**[operator]** `app/a`: operator: restart app/a by alice (ok)" in md
    assert "`app/a`: exited: RuntimeError: boom" in md
    # what people must write
    for section in ("## Root cause", "## Lessons learned", "## Action items"):
        assert section in md
    assert md.count("_Prompt") >= 6
    assert "| _prompt_ | | team-a | |" in md


def test_postmortem_needs_since_and_until(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["postmortem", "--since", "1h"]) == 2
    assert "--until" in capsys.readouterr().err

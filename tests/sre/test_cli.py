"""`trellis slo report` finds the journal the way `trellis run` writes it, and says
clearly what is wrong with bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sre._journal import T0, started, sup_started, write
from trellis.cli import main
from trellis.cli.slo import parse_time

TREE = """
[supervisor]
name = "app"
[[supervisor.children]]
id = "a"
worker = "asyncio:sleep"
args = [1]
slo = { objective = 0.99, window = "1h" }
"""


def test_journal_from_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRELLIS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("TRELLIS_JOURNAL", raising=False)
    (tmp_path / "state").mkdir()
    write(
        f"sqlite:///{tmp_path}/state/app.journal.db",
        "n",
        [started(0, "app", "a", 2), sup_started(0, "app")],
    )
    (tmp_path / "tree.toml").write_text(TREE)
    code = main(["slo", "report", str(tmp_path / "tree.toml"), "--until", str(T0 + 60), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    (a,) = [e for e in doc["entities"] if e["path"] == "app/a"]
    assert a["slo"]["objective"] == 0.99
    assert a["slo"]["source"] == "tree"
    assert a["up_seconds"] == pytest.approx(60.0)


def test_bad_times(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/j.db"
    write(url, "n", [started(0, "app", "a", 2)])
    assert main(["slo", "report", "--journal", url, "--since", "yesterday"]) == 2
    assert "invalid time 'yesterday'" in capsys.readouterr().err
    assert (
        main(["slo", "report", "--journal", url, "--since", str(T0 + 10), "--until", str(T0)]) == 2
    )
    assert "is before --since" in capsys.readouterr().err
    assert main(["slo", "report", "--journal", f"sqlite:///{tmp_path}/none.db"]) == 2


def test_parse_time() -> None:
    assert parse_time("now", now=1000.0) == 1000.0
    assert parse_time("30m", now=7200.0) == 5400.0
    assert parse_time("-2h", now=7200.0) == 0.0
    assert parse_time("1800000000") == 1_800_000_000.0
    assert parse_time("2027-01-15T08:00:00Z") == T0
    assert parse_time("2027-01-15T08:00:00") == T0  # no zone: UTC

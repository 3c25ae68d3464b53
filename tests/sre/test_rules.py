"""`trellis slo rules` / `openslo` / `grafana`: the rules pass `promtool check rules`,
and `promtool test rules` fires the page alert on a simulated outage (and only the
ticket once the short windows have recovered)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from trellis.cli import main
from trellis.config import loads
from trellis.sre import grafana_dashboard, openslo, prometheus_rules, slos

TREE = """
[supervisor]
name = "app"
slo = { objective = 0.999, window = "30d" }
owner = "team-core"

[[supervisor.children]]
id = "api"
server = "trellis:Server"
slo = { objective = 0.999, window = "30d" }
runbook = "https://runbooks.example/api"
owner = "team-api"

[[supervisor.children]]
id = "sub"
strategy = "one_for_all"

[[supervisor.children.children]]
id = "tick"
worker = "asyncio:sleep"
args = [1]

[[supervisor.children.children]]
id = "once"
worker = "asyncio:sleep"
args = [1]
restart = "temporary"
"""

PROMTOOL = shutil.which("promtool")
RATE5M = 'trellis:slo_errors:ratio_rate5m{node="n1",slo="app/api",slo_name="up"}'
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: apt-get install prometheus (.ci/run installs it)",
)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_slos_of_the_tree() -> None:
    found = {s.path: s for s in slos(loads(TREE))}
    assert set(found) == {"app", "app/api"}
    root = found["app"]
    assert root.subtree
    # the temporary child is not watched; the supervisor child is
    assert root.members == (("app", "api"), ("app", "sub"), ("app/sub", "tick"))
    api = found["app/api"]
    assert not api.subtree
    assert api.members == (("app", "api"),)
    assert (api.objective, api.window, api.sli) == (0.999, 30 * 86400.0, "up")
    assert (api.runbook, api.owner) == ("https://runbooks.example/api", "team-api")


def test_rules_text_has_the_workbook_windows() -> None:
    text = prometheus_rules(loads(TREE))
    for w in ("5m", "30m", "1h", "2h", "6h", "1d", "3d", "30d"):
        assert f"trellis:slo_errors:ratio_rate{w}" in text
    assert "(14.4 * 0.001)" in text
    assert "(6.0 * 0.001)" in text
    assert "(3.0 * 0.001)" in text
    assert "(1.0 * 0.001)" in text
    assert 'runbook_url: "https://runbooks.example/api"' in text
    assert 'severity: "page"' in text
    assert 'severity: "ticket"' in text
    assert 'owner: "team-api"' in text


def _alert(severity: str, owner: str) -> dict[str, Any]:
    labels = {"severity": severity, "slo": "app/api", "owner": owner, "node": "n1"}
    labels["slo_name"] = "up"
    labels["runbook_url"] = "https://runbooks.example/api"
    how = (
        "14.4x over 1h and 5m spends 2% of the budget in 1h; "
        "6x over 6h and 30m spends 5% of the budget in 6h"
        if severity == "page"
        else "3x over 1d and 2h spends 10% of the budget in 1d; "
        "1x over 3d and 6h spends 10% of the budget in 3d"
    )
    return {
        "exp_labels": labels,
        "exp_annotations": {
            "summary": f"app/api is burning its error budget too fast ({severity})",
            "description": "Child app/api (SLO 99.9% over 30d, sli up) on node n1 is spending "
            f"its error budget too fast. Fires on: {how}.",
            "runbook_url": "https://runbooks.example/api",
        },
    }


@needs_promtool
def test_promtool_checks_and_fires_the_page_alert(tmp_path: Path) -> None:
    tree = tmp_path / "tree.toml"
    tree.write_text(TREE)
    assert main(["slo", "rules", str(tree), "-o", str(tmp_path / "slo.rules.yml")]) == 0
    check = _run("check", "rules", "slo.rules.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout

    # api is up for two hours, down for 20 minutes from 121m, then up again
    up = 'trellis_child_up{node="n1",supervisor="app",child="api"}'
    others = [
        'trellis_child_up{node="n1",supervisor="app",child="sub"}',
        'trellis_child_up{node="n1",supervisor="app/sub",child="tick"}',
    ]
    unit = {
        "rule_files": ["slo.rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": up, "values": "1x120 0x19 1x100"}]
                + [{"series": s, "values": "1x240"} for s in others],
                "alert_rule_test": [
                    {
                        "eval_time": "110m",
                        "alertname": "TrellisSLOErrorBudgetBurn",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "130m",
                        "alertname": "TrellisSLOErrorBudgetBurn",
                        "exp_alerts": [
                            _alert("page", "team-api"),
                            {
                                **_alert("page", "team-core"),
                                "exp_labels": {
                                    "severity": "page",
                                    "slo": "app",
                                    "slo_name": "up",
                                    "owner": "team-core",
                                    "node": "n1",
                                },
                                "exp_annotations": _root_annotations("page"),
                            },
                            _alert("ticket", "team-api"),
                            {
                                **_alert("ticket", "team-core"),
                                "exp_labels": {
                                    "severity": "ticket",
                                    "slo": "app",
                                    "slo_name": "up",
                                    "owner": "team-core",
                                    "node": "n1",
                                },
                                "exp_annotations": _root_annotations("ticket"),
                            },
                        ],
                    },
                    {
                        # 40 minutes after recovery the short windows (5m, 30m) are clean:
                        # no page any more, the slow burn still makes a ticket
                        "eval_time": "180m",
                        "alertname": "TrellisSLOErrorBudgetBurn",
                        "exp_alerts": [
                            _alert("ticket", "team-api"),
                            {
                                **_alert("ticket", "team-core"),
                                "exp_labels": {
                                    "severity": "ticket",
                                    "slo": "app",
                                    "slo_name": "up",
                                    "owner": "team-core",
                                    "node": "n1",
                                },
                                "exp_annotations": _root_annotations("ticket"),
                            },
                        ],
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": 'trellis:slo_up{slo="app/api"}',
                        "eval_time": "125m",
                        "exp_samples": [
                            {
                                "labels": 'trellis:slo_up{node="n1",slo="app/api",slo_name="up"}',
                                "value": 0,
                            }
                        ],
                    },
                    {
                        "expr": 'trellis:slo_errors:ratio_rate5m{slo="app/api"}',
                        "eval_time": "130m",
                        "exp_samples": [
                            {
                                "labels": RATE5M,
                                "value": 1,
                            }
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "unit.yml").write_text(json.dumps(unit))  # JSON is YAML
    test = _run("test", "rules", "unit.yml", cwd=tmp_path)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def _root_annotations(severity: str) -> dict[str, str]:
    how = (
        "14.4x over 1h and 5m spends 2% of the budget in 1h; "
        "6x over 6h and 30m spends 5% of the budget in 6h"
        if severity == "page"
        else "3x over 1d and 2h spends 10% of the budget in 1d; "
        "1x over 3d and 6h spends 10% of the budget in 3d"
    )
    return {
        "summary": f"app is burning its error budget too fast ({severity})",
        "description": "Subtree app (SLO 99.9% over 30d, sli up) on node n1 is spending "
        f"its error budget too fast. Fires on: {how}.",
    }


@needs_promtool
def test_promtool_checks_rules_for_a_calls_sli(tmp_path: Path) -> None:
    tree = tmp_path / "tree.toml"
    tree.write_text(
        TREE.replace('window = "30d" }\nrunbook', 'window = "7d", sli = "calls" }\nrunbook')
    )
    assert main(["slo", "rules", str(tree), "-o", str(tmp_path / "r.yml")]) == 0
    text = (tmp_path / "r.yml").read_text()
    assert "trellis_server_calls_total" in text
    assert "trellis:slo_errors:ratio_rate7d" in text
    check = _run("check", "rules", "r.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr


def test_openslo_documents() -> None:
    text = openslo(loads(TREE))
    docs = [d for d in text.split("---\n") if d.strip()]
    assert len(docs) == 2
    for d in docs:
        assert 'apiVersion: "openslo/v1"' in d
        assert 'kind: "SLO"' in d
        assert "ratioMetric:" in d
        assert "target: 0.999" in d
        assert 'duration: "30d"' in d
        assert "isRolling: true" in d
    assert 'name: "app-api"' in text
    assert 'runbook_url: "https://runbooks.example/api"' in text


def test_grafana_dashboard_uses_the_recorded_series() -> None:
    dash = grafana_dashboard(loads(TREE))
    assert dash["title"] == "Trellis SLOs — app"
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert 'trellis:slo_error_budget:remaining_ratio{slo="app/api",slo_name="up"}' in exprs
    assert any("trellis:slo_errors:ratio_rate1h" in e for e in exprs)
    assert any("trellis_child_restarts_total" in e for e in exprs)
    json.dumps(dash)  # plain JSON


def test_rules_need_an_slo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "t.toml"
    tree.write_text('[supervisor]\n[[supervisor.children]]\nworker = "asyncio:sleep"\nargs = [1]\n')
    assert main(["slo", "rules", str(tree)]) == 2
    assert "no slo in the tree file" in capsys.readouterr().err

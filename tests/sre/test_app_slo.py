"""SLOs on the application's own metrics: `sli = "ratio"` (good/total counters) and
`sli = "latency"` (a histogram under a threshold), several per child. The tree file
checks them, `trellis slo rules` records them with the workbook's burn-rate alerts
(promtool fires the page when the ratio drops or requests get slow, and stays silent
while healthy), OpenSLO and Grafana include them, and the journal report lists them
as measured by Prometheus."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sre._journal import T0, started, sup_started, write
from trellis.cli import main
from trellis.config import ConfigError, loads
from trellis.sre import grafana_dashboard, openslo, prometheus_rules, slos
from trellis.sre._rules import latency_selectors

TREE = """
[supervisor]
name = "notify"

[[supervisor.children]]
id = "dispatch"
worker = "asyncio:sleep"
args = [1]
owner = "team-notify"
runbook = "https://runbooks.example/notify"

[[supervisor.children.slo]]
name = "delivery"
sli = "ratio"
objective = 0.999
window = "30d"
good = 'notify_deliveries_total{outcome="sent"}'
total = "notify_deliveries_total"

[[supervisor.children.slo]]
name = "time-to-send"
sli = "latency"
objective = 0.99
window = "30d"
metric = 'notify_time_to_send_seconds{priority="high"}'
threshold = 1
"""

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: apt-get install prometheus (.ci/run installs it)",
)


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# ---------------------------------------------------------------------------
# The tree file
# ---------------------------------------------------------------------------


def test_settings_and_slos() -> None:
    tree = loads(TREE)
    entry = tree.settings["slo"]["notify/dispatch"]
    assert "slo" not in entry  # nothing for the journal to measure
    assert entry["slos"] == [
        {
            "name": "delivery",
            "sli": "ratio",
            "objective": 0.999,
            "window": 30 * 86400.0,
            "good": 'notify_deliveries_total{outcome="sent"}',
            "total": "notify_deliveries_total",
        },
        {
            "name": "time-to-send",
            "sli": "latency",
            "objective": 0.99,
            "window": 30 * 86400.0,
            "metric": 'notify_time_to_send_seconds{priority="high"}',
            "threshold": 1.0,
        },
    ]
    delivery, tts = slos(tree)
    assert (delivery.name, delivery.slo_name, delivery.measured_by) == (
        "notify-dispatch-delivery",
        "delivery",
        "prometheus",
    )
    assert delivery.good_total() == (
        'notify_deliveries_total{outcome="sent"}',
        "notify_deliveries_total",
    )
    assert tts.name == "notify-dispatch-time-to-send"
    assert tts.good_total() == (
        'notify_time_to_send_seconds_bucket{priority="high",le=~"1|1[.]0"}',
        'notify_time_to_send_seconds_count{priority="high"}',
    )


def test_one_table_and_an_up_slo_beside_app_slos() -> None:
    tree = loads(
        """[supervisor]
name = "a"
[[supervisor.children]]
id = "api"
server = "trellis:Server"
slo = [
  { objective = 0.999 },
  { objective = 0.99, sli = "calls" },
  { name = "fast", objective = 0.95, sli = "latency", metric = "api_seconds", threshold = 0.25 },
]
[[supervisor.children]]
id = "w"
worker = "asyncio:sleep"
args = [1]
slo = { objective = 0.9, sli = "ratio", good = 'x_total{ok="1"}', total = "x_total" }
"""
    )
    sre = tree.settings["slo"]
    assert sre["a/api"]["slo"] == {"objective": 0.999}  # the journal's: the first up/calls
    assert [s["name"] for s in sre["a/api"]["slos"]] == ["up", "calls", "fast"]
    assert "slo" not in sre["a/w"]
    found = {(s.path, s.slo_name): s for s in slos(tree)}
    assert found[("a/api", "up")].name == "a-api-up"  # several on one child: suffixed
    assert found[("a/w", "ratio")].name == "a-w"  # one, named by its kind: as before
    assert found[("a/api", "fast")].good_total()[0] == 'api_seconds_bucket{le="0.25"}'
    assert latency_selectors('h{a="}"}', 2.5) == ('h_bucket{a="}",le="2.5"}', 'h_count{a="}"}')


BAD = """[supervisor]
name = "notify"

[[supervisor.children]]
id = "d"
worker = "asyncio:sleep"
args = [1]

[[supervisor.children.slo]]
sli = "ratio"
objective = 0.99
good = "ok_total"

[[supervisor.children.slo]]
name = "slow"
sli = "latency"
objective = 0.99
metric = "h_seconds"
threshold = 0

[[supervisor.children.slo]]
name = "slow"
sli = "latency"
objective = 0.99
threshold = "fast"

[[supervisor.children.slo]]
name = "late"
sli = "latency"
objective = 0.99
metric = "h_seconds"
threshold = 1
good = "x_total"

[[supervisor.children]]
id = "e"
worker = "asyncio:sleep"
args = [1]
slo = { objective = 0.9, total = "x_total", metric = "h_seconds" }

[[supervisor.children]]
id = "f"
worker = "asyncio:sleep"
args = [1]
slo = [{ objective = 0.9 }, { objective = 0.99, window = "1d" }]

[[supervisor.children]]
id = "g"
worker = "asyncio:sleep"
args = [1]
slo = { objective = 0.9, sli = "ratio", good = "sum(rate(x_total[5m]))", total = "x_total" }
"""


def test_bad_app_slos_name_file_line_and_key() -> None:
    with pytest.raises(ConfigError) as info:
        loads(BAD, "bad.toml")
    got = {(i.line, i.path, i.message) for i in info.value.errors}
    assert (
        9,
        "supervisor.children[0].slo[0]",
        "missing key 'total' (sli = 'ratio' needs good and total)",
    ) in got
    assert any(
        line == 19
        and p == "supervisor.children[0].slo[1].threshold"
        and m.startswith("threshold is a number of seconds > 0")
        and m.endswith("got 0")
        for line, p, m in got
    )
    assert any(
        line == 25 and p == "supervisor.children[0].slo[2].threshold" and "got 'fast'" in m
        for line, p, m in got
    )
    # the missing key of a table whose other keys are broken is not guessed at
    assert not any(
        p.startswith("supervisor.children[0].slo[2]") and "metric" in m for _, p, m in got
    )
    assert (
        33,
        "supervisor.children[0].slo[3].good",
        "key 'good' does not belong to sli = 'latency': it is for sli = 'ratio'; "
        "sli = 'latency' takes metric and threshold",
    ) in got
    assert (
        39,
        "supervisor.children[1].slo.total",
        "key 'total' does not belong to sli = 'up' (the default): it is for sli = 'ratio'",
    ) in got
    assert (
        39,
        "supervisor.children[1].slo.metric",
        "key 'metric' does not belong to sli = 'up' (the default): it is for sli = 'latency'",
    ) in got
    assert (
        45,
        "supervisor.children[2].slo[1]",
        "duplicate slo name 'up' on this child (also supervisor.children[2].slo[0]) (the "
        "default name is the sli kind, 'up'): give each slo its own name",
    ) in got
    assert any(
        line == 51 and p == "supervisor.children[3].slo.good" and "takes its rate itself" in m
        for line, p, m in got
    )


def test_duplicate_names_and_shape() -> None:
    def errors(slo: str) -> set[tuple[str, str]]:
        child = 'id = "a"\nworker = "asyncio:sleep"\nargs = [1]\n'
        text = f"[supervisor]\n[[supervisor.children]]\n{child}slo = {slo}\n"
        with pytest.raises(ConfigError) as info:
            loads(text, "t.toml")
        return {(i.path, i.message) for i in info.value.errors}

    got = errors('[{ objective = 0.9, name = "x" }, { objective = 0.99, name = "x" }]')
    assert (
        "supervisor.children[0].slo[1].name",
        "duplicate slo name 'x' on this child (also supervisor.children[0].slo[0]): "
        "give each slo its own name",
    ) in got
    ((path, message),) = errors("5")
    assert path == "supervisor.children[0].slo"
    assert "a non-empty array of them" in message
    ((path, message),) = errors(
        '{ objective = 0.9, sli = "latency", metric = "h_count", threshold = 1 }'
    )
    assert path == "supervisor.children[0].slo.metric"
    assert message.startswith("metric is the histogram's base name: write 'h', not 'h_count'")
    ((path, message),) = errors('{ objective = 0.9, sli = "latncy" }')
    assert path == "supervisor.children[0].slo.sli"
    assert "did you mean 'latency'" in message


def test_trellis_check_prints_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.toml").write_text(BAD)
    assert main(["check", str(tmp_path / "bad.toml")]) != 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad.toml'}:19: supervisor.children[0].slo[1].threshold:" in err


# ---------------------------------------------------------------------------
# Prometheus rules
# ---------------------------------------------------------------------------


def test_rules_text() -> None:
    text = prometheus_rules(loads(TREE))
    assert 'name: "trellis-slo-notify-dispatch-delivery"' in text
    assert 'name: "trellis-slo-notify-dispatch-time-to-send"' in text
    assert 'sum(rate(notify_deliveries_total{outcome="sent"}[5m]))' in text
    assert "sum(rate(notify_deliveries_total[30d]))" in text
    assert 'notify_time_to_send_seconds_bucket{priority="high",le=~"1|1[.]0"}[1h]' in text
    assert "trellis:slo_up" not in text  # no up-time SLO in this tree
    assert "(14.4 * 0.001)" in text
    assert "(14.4 * 0.01)" in text
    assert 'slo_name: "delivery"' in text


_ALERT_HOW = {
    "page": "14.4x over 1h and 5m spends 2% of the budget in 1h; "
    "6x over 6h and 30m spends 5% of the budget in 6h",
    "ticket": "3x over 1d and 2h spends 10% of the budget in 1d; "
    "1x over 3d and 6h spends 10% of the budget in 3d",
}
_WHAT = {
    "delivery": (
        "99.9",
        'the ratio of notify_deliveries_total{outcome="sent"} to notify_deliveries_total',
    ),
    "time-to-send": (
        "99",
        'the fraction of notify_time_to_send_seconds{priority="high"} observations within 1.0s',
    ),
}


def _alert(name: str, severity: str) -> dict[str, Any]:
    pct, what = _WHAT[name]
    return {
        "exp_labels": {
            "severity": severity,
            "slo": "notify/dispatch",
            "slo_name": name,
            "owner": "team-notify",
            "runbook_url": "https://runbooks.example/notify",
        },
        "exp_annotations": {
            "summary": f"notify/dispatch {name} is burning its error budget too fast ({severity})",
            "description": f"Child notify/dispatch slo {name!r} (SLO {pct}% over 30d, sli "
            f"{'ratio' if name == 'delivery' else 'latency'}) ({what}) is spending its "
            f"error budget too fast. Fires on: {_ALERT_HOW[severity]}.",
            "runbook_url": "https://runbooks.example/notify",
        },
    }


def _series(name: str, values: str) -> dict[str, str]:
    return {"series": name, "values": values}


def _unit(healthy_only: bool) -> dict[str, Any]:
    """One minute a sample for four hours; unless ``healthy_only``, from 121m to 140m half
    the deliveries fail and every high-priority send is slower than a second.
    Bulk sends are always slow: the latency SLO's label selector leaves them out."""
    if healthy_only:
        sent, failed = "0+100x240", "0x240"
        fast, count = "0+100x240", "0+100x240"
    else:
        sent, failed = "0+100x120 12050+50x19 13100+100x100", "0x120 50+50x19 1000x100"
        fast, count = "0+100x120 12000x19 12100+100x100", "0+100x240"
    hist = "notify_time_to_send_seconds"
    series = [
        _series('notify_deliveries_total{node="n1",outcome="sent"}', sent),
        _series('notify_deliveries_total{node="n1",outcome="failed"}', failed),
        _series(f'{hist}_bucket{{node="n1",priority="high",le="1.0"}}', fast),
        _series(f'{hist}_bucket{{node="n1",priority="high",le="+Inf"}}', count),
        _series(f'{hist}_count{{node="n1",priority="high"}}', count),
        _series(f'{hist}_bucket{{node="n1",priority="bulk",le="1.0"}}', "0x240"),
        _series(f'{hist}_count{{node="n1",priority="bulk"}}', "0+100x240"),
    ]
    both = ("delivery", "time-to-send")

    def at(t: str, alerts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"eval_time": t, "alertname": "TrellisSLOErrorBudgetBurn", "exp_alerts": alerts}

    if healthy_only:
        checks = [at(t, []) for t in ("30m", "110m", "135m", "200m")]
        exprs = [
            {
                "expr": 'trellis:slo_errors:ratio_rate5m{slo_name="time-to-send"}',
                "eval_time": "135m",
                "exp_samples": [
                    {
                        "labels": 'trellis:slo_errors:ratio_rate5m{slo="notify/dispatch",'
                        'slo_name="time-to-send"}',
                        "value": 0,
                    }
                ],
            }
        ]
    else:
        checks = [
            at("110m", []),
            at("135m", [_alert(n, sev) for n in both for sev in ("page", "ticket")]),
            # an hour after recovery: the short windows are clean, no page; the slow
            # burn still makes tickets
            at("200m", [_alert(n, "ticket") for n in both]),
        ]
        exprs = [
            {
                "expr": 'trellis:slo_errors:ratio_rate5m{slo_name="delivery"}',
                "eval_time": "135m",
                "exp_samples": [
                    {
                        "labels": 'trellis:slo_errors:ratio_rate5m{slo="notify/dispatch",'
                        'slo_name="delivery"}',
                        "value": 0.5,
                    }
                ],
            },
            {
                "expr": 'trellis:slo_errors:ratio_rate5m{slo_name="time-to-send"}',
                "eval_time": "135m",
                "exp_samples": [
                    {
                        "labels": 'trellis:slo_errors:ratio_rate5m{slo="notify/dispatch",'
                        'slo_name="time-to-send"}',
                        "value": 1,
                    }
                ],
            },
        ]
    return {
        "rule_files": ["slo.rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": checks,
                "promql_expr_test": exprs,
            }
        ],
    }


@needs_promtool
@pytest.mark.parametrize("healthy_only", [False, True], ids=["outage", "healthy"])
def test_promtool_pages_on_bad_ratio_and_slow_sends(tmp_path: Path, healthy_only: bool) -> None:
    (tmp_path / "tree.toml").write_text(TREE)
    assert (
        main(["slo", "rules", str(tmp_path / "tree.toml"), "-o", str(tmp_path / "slo.rules.yml")])
        == 0
    )
    check = _promtool("check", "rules", "slo.rules.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "unit.yml").write_text(json.dumps(_unit(healthy_only)))  # JSON is YAML
    test = _promtool("test", "rules", "unit.yml", cwd=tmp_path)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


# ---------------------------------------------------------------------------
# OpenSLO, Grafana, the journal report
# ---------------------------------------------------------------------------


def test_openslo_and_grafana_include_them() -> None:
    tree = loads(TREE)
    docs = [d for d in openslo(tree).split("---\n") if d.strip()]
    assert len(docs) == 2
    delivery, tts = docs
    assert 'name: "notify-dispatch-delivery"' in delivery
    assert 'query: "sum(notify_deliveries_total{outcome=\\"sent\\"})"' in delivery
    assert 'query: "sum(notify_deliveries_total)"' in delivery
    assert "counter: true" in delivery
    assert 'budgetingMethod: "Occurrences"' in delivery
    assert "target: 0.99" in tts
    assert "le=~" in tts
    dash = grafana_dashboard(tree)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert (
        'trellis:slo_error_budget:remaining_ratio{slo="notify/dispatch",slo_name="delivery"}'
        in exprs
    )
    assert (
        '1 - trellis:slo_errors:ratio_rate5m{slo="notify/dispatch",slo_name="time-to-send"}'
        in exprs
    )
    assert not any("trellis_child_up" in e for e in exprs)  # no up state for app SLOs


def test_report_lists_them_as_measured_by_prometheus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/j.db"
    write(url, "n1", [sup_started(0, "notify"), started(0, "notify", "dispatch", 2)])
    (tmp_path / "tree.toml").write_text(TREE)
    args = ["slo", "report", str(tmp_path / "tree.toml"), "--journal", url]
    assert main([*args, "--until", str(T0 + 60), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(p["path"], p["name"], p["sli"], p["measured_by"]) for p in doc["prometheus_slos"]] == [
        ("notify/dispatch", "delivery", "ratio", "prometheus"),
        ("notify/dispatch", "time-to-send", "latency", "prometheus"),
    ]
    assert doc["prometheus_slos"][1]["threshold"] == 1.0
    (child,) = [e for e in doc["entities"] if e["path"] == "notify/dispatch"]
    assert child["slo"]["source"] == "default"  # its up time: no numbers invented for the rest
    assert main([*args, "--until", str(T0 + 60), "--html", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "Measured by Prometheus, not in the journal" in out
    assert "notify/dispatch delivery: 99.90%/30d (ratio: good" in out
    assert "notify/dispatch time-to-send: 99.00%/30d (latency:" in out
    assert "Measured by Prometheus, not in the journal" in (tmp_path / "r.html").read_text()

"""Documents built from the tree file's SLOs: Prometheus recording and alerting rules
(the SRE workbook's multi-window multi-burn-rate alerts), OpenSLO v1, and a Grafana
dashboard, all on the series ``trellis.metrics`` exports (``trellis_child_up``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._math import window_text
from ._report import tree_info

__all__ = [
    "ALERT_WINDOWS",
    "APP_SLIS",
    "RATE_WINDOWS",
    "Slo",
    "grafana_dashboard",
    "latency_selectors",
    "openslo",
    "prometheus_rules",
    "slos",
    "to_yaml",
]

#: The workbook's alerts: (severity, burn-rate factor, long window, short window).
ALERT_WINDOWS: tuple[tuple[str, float, str, str], ...] = (
    ("page", 14.4, "1h", "5m"),
    ("page", 6.0, "6h", "30m"),
    ("ticket", 3.0, "1d", "2h"),
    ("ticket", 1.0, "3d", "6h"),
)
#: The windows error ratios are recorded over.
RATE_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")

#: The call series a server's ``sli = "calls"`` reads (RED metrics).
CALLS_TOTAL = "trellis_server_calls_total"
CALL_ERRORS_TOTAL = "trellis_server_call_errors_total"


#: The SLI kinds measured from application metrics (Prometheus), not the journal.
APP_SLIS = ("ratio", "latency")


@dataclass(frozen=True, slots=True)
class Slo:
    """One SLO of a tree file: the tree ``path``, whether it is a ``subtree``, the
    (supervisor, child) pairs its SLI watches, the objective, window and SLI kind.

    ``slo_name`` tells SLOs of one child apart (the ``slo_name`` label; by default the
    SLI kind). ``sli = "ratio"`` reads the counters ``good`` and ``total``;
    ``sli = "latency"`` reads the histogram ``metric`` (its ``_bucket`` at ``le =
    threshold`` is good, its ``_count`` total)."""

    path: str
    subtree: bool
    members: tuple[tuple[str, str], ...]
    objective: float
    window: float
    sli: str
    runbook: str | None
    owner: str | None
    slo_name: str = ""
    #: whether document and group names carry ``slo_name`` (a child with several
    #: SLOs, or one named otherwise than its kind)
    suffixed: bool = False
    good: str | None = None
    total: str | None = None
    metric: str | None = None
    threshold: float | None = None

    @property
    def name(self) -> str:
        """A name usable in rules and OpenSLO (``app/sub/tick`` -> ``app-sub-tick``;
        ``app/api`` with a second SLO ``delivery`` -> ``app-api-delivery``)."""
        text = f"{self.path}-{self.slo_name}" if self.suffixed else self.path
        return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()

    @property
    def measured_by(self) -> str:
        """``"journal"`` (up, calls) or ``"prometheus"`` (ratio, latency)."""
        return "prometheus" if self.sli in APP_SLIS else "journal"

    def good_total(self) -> tuple[str, str]:
        """The selectors of the good and total counters of an application SLI."""
        if self.sli == "ratio":
            assert self.good is not None
            assert self.total is not None
            return self.good, self.total
        if self.sli == "latency":
            assert self.metric is not None
            assert self.threshold is not None
            return latency_selectors(self.metric, self.threshold)
        raise ValueError(f"sli {self.sli!r} is not read from application metrics")


def latency_selectors(metric: str, threshold: float) -> tuple[str, str]:
    """``('h_seconds{a="b"}', 0.5)`` -> the good series (``h_seconds_bucket{a="b",
    le="0.5"}``) and the total (``h_seconds_count{a="b"}``). A whole-number threshold
    matches both ways clients write the bound (``le="1"`` and ``le="1.0"``)."""
    base, _, rest = metric.partition("{")
    base = base.strip()
    matchers = rest.rpartition("}")[0].strip().rstrip(",").strip()
    if threshold == int(threshold):
        n = int(threshold)
        le = f'le=~"{n}|{n}[.]0"'
    else:
        le = f'le="{threshold!r}"'
    good = f"{base}_bucket{{{matchers + ',' if matchers else ''}{le}}}"
    total = f"{base}_count{{{matchers}}}" if matchers else f"{base}_count"
    return good, total


def _pair(path: str) -> tuple[str, str]:
    sup, _, child = path.rpartition("/")
    return sup, child


def slos(tree: Any) -> list[Slo]:
    """Every SLO a loaded tree file declares, in tree-path order (a child's SLOs in
    the order the file gives them)."""
    info = tree_info(tree)
    out = []
    for path, entry in sorted(info.sre.items()):
        tables = entry.get("slos")
        if tables is None:  # a hand-made entry: its one journal SLO
            tables = [entry["slo"]] if entry.get("slo") else []
        under = sorted(p for p in info.permanent if p.startswith(path + "/"))
        subtree = path == info.root or bool(under)
        members = ([path] if path != info.root else []) + under if subtree else [path]
        for slo in tables:
            sli = str(slo.get("sli", "up"))
            name = str(slo.get("name", sli))
            out.append(
                Slo(
                    path=path,
                    subtree=subtree and sli not in APP_SLIS,
                    members=tuple(_pair(m) for m in members),
                    objective=float(slo["objective"]),
                    window=float(slo.get("window", 30 * 86400.0)),
                    sli=sli,
                    runbook=entry.get("runbook"),
                    owner=entry.get("owner"),
                    slo_name=name,
                    suffixed=len(tables) > 1 or name != sli,
                    good=slo.get("good"),
                    total=slo.get("total"),
                    metric=slo.get("metric"),
                    threshold=slo.get("threshold"),
                )
            )
    return out


# ---------------------------------------------------------------------------
# YAML (a small emitter: strings are written JSON-quoted, which YAML reads as is)
# ---------------------------------------------------------------------------


def to_yaml(value: Any, indent: int = 0) -> str:
    """``value`` (dicts, lists, strings, numbers, booleans) as block YAML."""
    return "\n".join(_yaml(value, indent)) + "\n"


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def _yaml(value: Any, indent: int) -> Iterator[str]:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            yield pad + "{}"
        for k, v in value.items():
            key = _scalar(k) if not str(k).replace("_", "").isalnum() else str(k)
            if isinstance(v, dict | list) and v:
                yield f"{pad}{key}:"
                yield from _yaml(v, indent + 2)
            elif isinstance(v, str) and "\n" in v:
                yield f"{pad}{key}: |-"
                for line in v.split("\n"):
                    yield f"{pad}  {line}" if line else ""
            else:
                yield f"{pad}{key}: {_scalar(v) if not isinstance(v, dict | list) else '[]'}"
    elif isinstance(value, list):
        for item in value:
            lines = list(_yaml(item, indent + 2))
            first = lines[0][indent + 2 :] if lines else ""
            yield f"{pad}- {first}"
            yield from lines[1:]
    else:
        yield pad + _scalar(value)


# ---------------------------------------------------------------------------
# Prometheus
# ---------------------------------------------------------------------------


def _selector(pairs: tuple[tuple[str, str], ...]) -> str:
    parts = [f'trellis_child_up{{supervisor="{_esc(s)}",child="{_esc(c)}"}}' for s, c in pairs]
    return parts[0] if len(parts) == 1 else "(" + " or ".join(parts) + ")"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def _up_expr(slo: Slo) -> str:
    """1 while the SLO's child (or every permanent child of its subtree) is up."""
    return f"min by (node) ({_selector(slo.members)})"


def _labels(slo: Slo) -> dict[str, str]:
    return {"slo": slo.path, "slo_name": slo.slo_name}


def _sel(slo: Slo) -> str:
    """The selector of one SLO's recorded series."""
    return f'{{slo="{_esc(slo.path)}",slo_name="{_esc(slo.slo_name)}"}}'


def _windows(slo: Slo) -> tuple[str, ...]:
    window = window_text(slo.window)
    return RATE_WINDOWS if window in RATE_WINDOWS else (*RATE_WINDOWS, window)


def _error_ratio(slo: Slo, w: str) -> str:
    """The SLO's error ratio over the window ``w`` (PromQL)."""
    if slo.sli == "up":
        return f"1 - avg_over_time(trellis:slo_up{_sel(slo)}[{w}])"
    if slo.sli == "calls":
        s, c = slo.members[0]
        match = f'supervisor="{_esc(s)}",child="{_esc(c)}"'
        return (
            f"sum by (node) (rate({CALL_ERRORS_TOTAL}{{{match}}}[{w}]))\n"
            f"/\nsum by (node) (rate({CALLS_TOTAL}{{{match}}}[{w}]))"
        )
    good, total = slo.good_total()  # service-wide: every node's series summed
    return f"1 - (\n  sum(rate({good}[{w}]))\n/\n  sum(rate({total}[{w}]))\n)"


def _what(slo: Slo) -> str:
    """The SLI in words, for alert descriptions and OpenSLO."""
    if slo.sli == "ratio":
        return f"the ratio of {slo.good} to {slo.total}"
    if slo.sli == "latency":
        return f"the fraction of {slo.metric} observations within {slo.threshold!r}s"
    if slo.sli == "calls":
        return f"the fraction of calls to {slo.path} that succeed"
    return f"the fraction of time {slo.path} is up" + (
        " (every permanent child under it)" if slo.subtree else ""
    )


def prometheus_rules(tree: Any) -> str:
    """Prometheus rule groups (YAML) for every SLO in the tree file: the SLI as
    ``trellis:slo_up`` (up-time SLIs), error ratios ``trellis:slo_errors:ratio_rate<w>``
    over 5m..3d and the SLO window, the objective as ``trellis:slo_objective:ratio``,
    the budget left as ``trellis:slo_error_budget:remaining_ratio``, and the alerts
    ``TrellisSLOErrorBudgetBurn`` (severity ``page`` / ``ticket``) with ``runbook_url``,
    ``owner`` and ``severity`` labels. Every series and alert carries ``slo`` (the tree
    path) and ``slo_name`` (the SLO's name on that child, by default its SLI kind).

    Up-time and call SLIs read the series ``trellis.metrics`` exports, per node;
    ``ratio`` and ``latency`` SLIs read the application's own counters and histogram,
    summed over every node (one service-wide ratio).

    Example::

        text = prometheus_rules(load("tree.toml"))   # promtool check rules accepts it
    """
    groups = []
    seen: dict[str, int] = {}
    for slo in slos(tree):
        sel = _sel(slo)
        window = window_text(slo.window)
        rules: list[dict[str, Any]] = []
        labels = _labels(slo)
        if slo.sli == "up":
            rules.append({"record": "trellis:slo_up", "expr": _up_expr(slo), "labels": labels})
        for w in _windows(slo):
            rules.append(
                {
                    "record": f"trellis:slo_errors:ratio_rate{w}",
                    "expr": _error_ratio(slo, w),
                    "labels": labels,
                }
            )
        rules.append(
            {
                "record": "trellis:slo_objective:ratio",
                "expr": f"vector({slo.objective!r})",
                "labels": labels,
            }
        )
        rules.append(
            {
                "record": "trellis:slo_error_budget:remaining_ratio",
                "expr": f"1 - trellis:slo_errors:ratio_rate{window}{sel} / {_budget(slo)}",
                "labels": labels,
            }
        )
        for severity in ("page", "ticket"):
            pairs = [(f, lw, sw) for sev, f, lw, sw in ALERT_WINDOWS if sev == severity]
            clauses = []
            for factor, long_w, short_w in pairs:
                threshold = f"({factor!r} * {_budget(slo)})"
                clauses.append(
                    f"(\n  trellis:slo_errors:ratio_rate{long_w}{sel} > {threshold}\n"
                    f"  and\n  trellis:slo_errors:ratio_rate{short_w}{sel} > {threshold}\n)"
                )
            alert_labels = {"severity": severity, **labels}
            if slo.owner:
                alert_labels["owner"] = slo.owner
            if slo.runbook:
                alert_labels["runbook_url"] = slo.runbook
            how = "; ".join(
                f"{f:g}x over {lw} and {sw} spends "
                f"{f * _hours(lw) / (slo.window / 3600) * 100:.3g}% of the budget in {lw}"
                for f, lw, sw in pairs
            )
            who = f"{'Subtree' if slo.subtree else 'Child'} {slo.path}"
            if slo.suffixed:
                who += f" slo {slo.slo_name!r}"
            where = (
                " on node {{ $labels.node }}"
                if slo.measured_by == "journal"
                else f" ({_what(slo)})"
            )
            annotations = {
                "summary": f"{slo.path}{' ' + slo.slo_name if slo.suffixed else ''} is "
                f"burning its error budget too fast ({severity})",
                "description": f"{who} (SLO {slo.objective * 100:g}% over {window}, "
                f"sli {slo.sli}){where} is spending its error budget too fast. "
                f"Fires on: {how}.",
            }
            if slo.runbook:
                annotations["runbook_url"] = slo.runbook
            rules.append(
                {
                    "alert": "TrellisSLOErrorBudgetBurn",
                    "expr": "\nor\n".join(clauses),
                    "labels": alert_labels,
                    "annotations": annotations,
                }
            )
        group = f"trellis-slo-{slo.name}"
        seen[group] = seen.get(group, 0) + 1
        if seen[group] > 1:  # two paths that spell the same name (a/b-c and a/b/c)
            group = f"{group}-{seen[group]}"
        groups.append({"name": group, "rules": rules})
    head = (
        "# Generated by `trellis slo rules`: SLO recording rules and multi-window\n"
        "# multi-burn-rate alerts (Google SRE workbook) on trellis_child_up and the\n"
        "# server call counters (up, calls SLIs) and the application's own metrics\n"
        "# (ratio, latency SLIs).\n"
    )
    return head + to_yaml({"groups": groups})


def _budget(slo: Slo) -> str:
    return repr(round(1.0 - slo.objective, 12))


def _hours(w: str) -> float:
    n, unit = float(w[:-1]), w[-1]
    return n * {"m": 1 / 60, "h": 1.0, "d": 24.0}[unit]


# ---------------------------------------------------------------------------
# OpenSLO v1
# ---------------------------------------------------------------------------


def openslo(tree: Any) -> str:
    """The tree file's SLOs as OpenSLO v1 ``SLO`` documents (YAML, one per SLO,
    separated by ``---``), each with an inline ratio indicator on Prometheus.

    Example::

        text = openslo(load("tree.toml"))
    """
    docs = []
    for slo in slos(tree):
        if slo.sli == "up":
            good = f"sum by (node) ({_up_expr(slo)})"
            total = f"count by (node) ({_up_expr(slo)})"
        elif slo.measured_by == "prometheus":
            good_sel, total_sel = slo.good_total()  # counters: the tool takes increases
            good, total = f"sum({good_sel})", f"sum({total_sel})"
        else:
            s, c = slo.members[0]
            match = f'supervisor="{_esc(s)}",child="{_esc(c)}"'
            good = (
                f"sum(rate({CALLS_TOTAL}{{{match}}}[1m])) - "
                f"sum(rate({CALL_ERRORS_TOTAL}{{{match}}}[1m]))"
            )
            total = f"sum(rate({CALLS_TOTAL}{{{match}}}[1m]))"
        labels: dict[str, Any] = {"tree-path": [slo.path]}
        if slo.owner:
            labels["owner"] = [slo.owner]
        annotations: dict[str, str] = {"trellis.dev/sli": slo.sli}
        if slo.suffixed:
            annotations["trellis.dev/slo-name"] = slo.slo_name
        if slo.runbook:
            annotations["runbook_url"] = slo.runbook
        doc = {
            "apiVersion": "openslo/v1",
            "kind": "SLO",
            "metadata": {
                "name": slo.name,
                "displayName": f"{slo.path} {slo.slo_name}"
                if slo.suffixed
                else f"{slo.path} {'subtree ' if slo.subtree else ''}availability",
                "labels": labels,
                "annotations": annotations,
            },
            "spec": {
                "description": _what(slo)[:1].upper() + _what(slo)[1:],
                "service": slo.path.split("/", 1)[0],
                "indicator": {
                    "metadata": {"name": f"{slo.name}-{slo.sli}"},
                    "spec": {
                        "ratioMetric": {
                            "counter": slo.sli != "up",
                            "good": {
                                "metricSource": {
                                    "type": "Prometheus",
                                    "spec": {"query": good},
                                }
                            },
                            "total": {
                                "metricSource": {
                                    "type": "Prometheus",
                                    "spec": {"query": total},
                                }
                            },
                        }
                    },
                },
                "timeWindow": [{"duration": window_text(slo.window), "isRolling": True}],
                "budgetingMethod": "Timeslices" if slo.sli == "up" else "Occurrences",
                "objectives": [
                    {
                        "displayName": f"{slo.objective * 100:g}% "
                        + ("up" if slo.sli == "up" else "good"),
                        "target": slo.objective,
                        **(
                            {"timeSliceTarget": 1.0, "timeSliceWindow": "1m"}
                            if slo.sli == "up"
                            else {}
                        ),
                    }
                ],
            },
        }
        docs.append(to_yaml(doc))
    return "---\n" + "---\n".join(docs)


# ---------------------------------------------------------------------------
# Grafana
# ---------------------------------------------------------------------------


def grafana_dashboard(tree: Any) -> dict[str, Any]:
    """A Grafana dashboard (the JSON model) with, per SLO: availability over the SLO
    window, error budget left, burn rates over 5m/1h/6h/3d and the up state; plus
    restarts by child. Queries use the recording rules of :func:`prometheus_rules`
    and the raw ``trellis_child_*`` series; the data source is a dashboard variable.
    """
    panels: list[dict[str, Any]] = []
    ds = {"type": "prometheus", "uid": "${datasource}"}
    y = 0
    pid = 1
    for slo in slos(tree):
        sel = _sel(slo)
        window = window_text(slo.window)
        panels.append(
            {
                "type": "row",
                "title": f"{slo.path}{' ' + slo.slo_name if slo.suffixed else ''} — "
                f"{slo.objective * 100:g}% over {window}"
                + (f" ({slo.sli})" if slo.measured_by == "prometheus" else "")
                + (f" · owner {slo.owner}" if slo.owner else ""),
                "id": pid,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "collapsed": False,
                "panels": [],
            }
        )
        pid += 1
        y += 1
        good_title = "Availability" if slo.measured_by == "journal" else "Good ratio"
        stats = [
            (good_title, f"1 - trellis:slo_errors:ratio_rate{window}{sel}", "percentunit"),
            ("Error budget left", f"trellis:slo_error_budget:remaining_ratio{sel}", "percentunit"),
        ]
        for i, (title, expr, unit) in enumerate(stats):
            panels.append(
                {
                    "type": "stat",
                    "title": title,
                    "id": pid,
                    "datasource": ds,
                    "gridPos": {"h": 6, "w": 4, "x": 4 * i, "y": y},
                    "targets": [{"refId": "A", "expr": expr, "datasource": ds}],
                    "fieldConfig": {"defaults": {"unit": unit, "decimals": 3}, "overrides": []},
                    "options": {"reduceOptions": {"calcs": ["lastNotNull"]}},
                }
            )
            pid += 1
        burn_targets = [
            {
                "refId": chr(ord("A") + i),
                "expr": f"trellis:slo_errors:ratio_rate{w}{sel} / {_budget(slo)}",
                "legendFormat": f"burn {w} {{{{node}}}}"
                if slo.measured_by == "journal"
                else f"burn {w}",
                "datasource": ds,
            }
            for i, w in enumerate(("5m", "1h", "6h", "3d"))
        ]
        panels.append(
            {
                "type": "timeseries",
                "title": "Burn rate (1 = budget spent exactly over the window)",
                "id": pid,
                "datasource": ds,
                "gridPos": {"h": 6, "w": 10, "x": 8, "y": y},
                "targets": burn_targets,
                "fieldConfig": {"defaults": {"unit": "x"}, "overrides": []},
            }
        )
        pid += 1
        if slo.measured_by == "prometheus":
            panels.append(
                {
                    "type": "timeseries",
                    "title": "Good ratio (5m)",
                    "id": pid,
                    "datasource": ds,
                    "gridPos": {"h": 6, "w": 6, "x": 18, "y": y},
                    "targets": [
                        {
                            "refId": "A",
                            "expr": f"1 - trellis:slo_errors:ratio_rate5m{sel}",
                            "legendFormat": slo.slo_name,
                            "datasource": ds,
                        }
                    ],
                    "fieldConfig": {"defaults": {"unit": "percentunit"}, "overrides": []},
                }
            )
            pid += 1
            y += 6
            continue
        up_expr = f"trellis:slo_up{sel}" if slo.sli == "up" else _up_expr(slo)
        panels.append(
            {
                "type": "state-timeline",
                "title": "Up",
                "id": pid,
                "datasource": ds,
                "gridPos": {"h": 6, "w": 6, "x": 18, "y": y},
                "targets": [
                    {"refId": "A", "expr": up_expr, "legendFormat": "{{node}}", "datasource": ds}
                ],
                "fieldConfig": {
                    "defaults": {
                        "mappings": [
                            {
                                "type": "value",
                                "options": {
                                    "0": {"text": "down", "color": "red"},
                                    "1": {"text": "up", "color": "green"},
                                },
                            }
                        ]
                    },
                    "overrides": [],
                },
            }
        )
        pid += 1
        y += 6
    panels.append(
        {
            "type": "timeseries",
            "title": "Restarts by child (per 5m)",
            "id": pid,
            "datasource": ds,
            "gridPos": {"h": 8, "w": 24, "x": 0, "y": y},
            "targets": [
                {
                    "refId": "A",
                    "expr": "sum by (node, supervisor, child) "
                    "(increase(trellis_child_restarts_total[5m]))",
                    "legendFormat": "{{supervisor}}/{{child}}",
                    "datasource": ds,
                }
            ],
        }
    )
    return {
        "title": f"Trellis SLOs — {tree.name}",
        "uid": f"trellis-slo-{''.join(c if c.isalnum() else '-' for c in tree.name)}"[:40],
        "tags": ["trellis", "slo"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-24h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                }
            ]
        },
        "panels": panels,
    }

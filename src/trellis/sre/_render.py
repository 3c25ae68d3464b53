"""The SLO report as a rich table, as text lines, and as a self-contained HTML page
(inline SVG timelines and restart histograms; nothing loaded from anywhere)."""

from __future__ import annotations

import html
from typing import Any

from ._math import BURN_WINDOWS

__all__ = [
    "PROMETHEUS_NOTE",
    "duration",
    "html_page",
    "pct",
    "prometheus_lines",
    "rich_table",
    "slo_rows",
]


def duration(seconds: float | None) -> str:
    """``3725.5`` -> ``"1h 2m"``; ``0.25`` -> ``"0.25s"``; None -> ``"-"``."""
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 0:
        return "-" + duration(-s)
    if s == 0:
        return "0s"
    if s < 1:
        return f"{s * 1000:.3g}ms"
    if s < 10:
        return f"{s:.3g}s"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60)}s"
    if s < 86400:
        return f"{int(s // 3600)}h {int(s % 3600 // 60)}m"
    return f"{int(s // 86400)}d {int(s % 86400 // 3600)}h"


def pct(ratio: float | None, digits: int = 3) -> str:
    """``0.99951`` -> ``"99.951%"``; None -> ``"-"``."""
    return "-" if ratio is None else f"{ratio * 100:.{digits}f}%"


def _burn(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _name(e: dict[str, Any], nodes: int) -> str:
    prefix = f"{e['node']}:" if nodes > 1 else ""
    return f"{prefix}{e['path']}{' (subtree)' if e['kind'] == 'subtree' else ''}"


def _any_default(doc: dict[str, Any]) -> bool:
    """Whether a row carries ``*`` (an SLO the tree file does not give)."""
    return any(e["slo"]["source"] != "tree" for e in doc["entities"])


def slo_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row of text per entity: the columns of :func:`rich_table`."""
    rows = []
    n = len(doc.get("nodes", []))
    for e in doc["entities"]:
        b = e["budget"]
        ex = e["exhaustion"]
        exhaust = (
            "exhausted"
            if ex["exhausted"]
            else ("-" if ex["seconds"] is None else f"in {duration(ex['seconds'])}")
        )
        rows.append(
            [
                _name(e, n),
                f"{pct(e['slo']['objective'], 2)}/{e['slo']['window']}"
                + ("" if e["slo"]["source"] == "tree" else "*"),
                pct(e["availability"]),
                pct(e["availability_mtbf"]),
                duration(e["mtbf_seconds"]),
                f"{duration(e['mttr_p50_seconds'])} / {duration(e['mttr_p95_seconds'])}",
                str(e["restarts"]),
                str(len(e["incidents"])),
                f"{duration(b['remaining_seconds'])} ({pct(b['remaining_ratio'], 1)})",
                _burn(e["burn_rates"]["1h"]),
                _burn(e["burn_rates"]["6h"]),
                exhaust,
            ]
        )
    return rows


def prometheus_lines(doc: dict[str, Any]) -> list[str]:
    """One line per SLO on application metrics (``sli = "ratio"``/``"latency"``):
    the journal does not measure them, Prometheus does (``trellis slo rules``)."""
    out = []
    for p in doc.get("prometheus_slos", ()):
        what = (
            f"good {p['good']} / total {p['total']}"
            if p["sli"] == "ratio"
            else f"{p['metric']} within {p['threshold']!r}s"
        )
        out.append(
            f"{p['path']} {p['name']}: {pct(p['objective'], 2)}/{p['window']} ({p['sli']}: {what})"
        )
    return out


PROMETHEUS_NOTE = (
    "Measured by Prometheus, not in the journal (`trellis slo rules TREE` records them):"
)


HEADERS = [
    "child / subtree",
    "SLO",
    "availability",
    "MTBF/(MTBF+MTTR)",
    "MTBF",
    "MTTR p50 / p95",
    "restarts",
    "incidents",
    "budget left",
    "burn 1h",
    "burn 6h",
    "exhaustion",
]


#: The columns of the compact table (for 80-140 column terminals).
COMPACT = (0, 2, 4, 5, 6, 7, 8, 9)
#: The order columns are left out in when the table would not fit its width.
_DROP_ORDER = (5, 4, 7, 1, 10, 3, 11, 6)
#: The name column's narrowest width (longer names wrap).
_NAME_MIN = 16


def rich_table(doc: dict[str, Any], compact: bool = False, width: int | None = None) -> Any:
    """A ``rich.table.Table`` of the report (``compact``: availability, MTBF, MTTR,
    restarts, incidents, budget left and the 1h burn rate only). With ``width`` (the
    console's columns), columns that would not fit are left out, least telling first
    (MTTR, MTBF, incidents, ...; availability, restarts, budget left and the 1h burn
    rate stay); a figure is never cut, a long name wraps."""
    from rich.table import Table

    rows = slo_rows(doc)
    if compact or width is not None:  # budget left as a ratio only: it is narrower
        for e, row in zip(doc["entities"], rows, strict=True):
            row[8] = pct(e["budget"]["remaining_ratio"], 1)
    cols = list(COMPACT if compact else range(len(HEADERS)))

    def need(i: int) -> int:
        if i == 0:
            return _NAME_MIN
        head = max(len(word) for word in HEADERS[i].split())
        return max([head, *(len(r[i]) for r in rows)])

    if width is not None:
        drop = [i for i in _DROP_ORDER if i in cols]
        while drop and sum(need(i) + 3 for i in cols) + 1 > width:
            cols.remove(drop.pop(0))
    table = Table(
        title=f"SLO report {doc['since']} .. {doc['until']}",
        caption=("* default SLO (none in the tree file); " if _any_default(doc) else "")
        + "burn 1x spends the budget over its window",
    )
    for i in cols:
        if i == 0:
            table.add_column(HEADERS[i], justify="left", overflow="fold", min_width=_NAME_MIN)
        elif width is None:
            table.add_column(HEADERS[i], justify="right", no_wrap=True)
        else:  # as wide as its widest figure (never cut); the header wraps between words
            table.add_column(HEADERS[i], justify="right", overflow="fold", width=need(i))
    for e, full in zip(doc["entities"], rows, strict=True):
        row = [full[i] for i in cols]
        style = None
        if e["exhaustion"]["exhausted"]:
            style = "red"
        elif e["down_seconds"] > 0:
            style = "yellow"
        table.add_row(*row, style=style)
    return table


# ---------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------

_COLORS = {"up": "#2e9d4f", "down": "#d6403a", "stopped": "#c8ccd2"}
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2430}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #d9dde3;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
th{background:#f2f4f7}.down{background:#fdecea}.exhausted{background:#f9c7c2}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
.muted{color:#67707d;font-size:12px}
svg text{font-size:11px;fill:#1d2430;font-family:inherit}
"""


def _x(t: float, lo: float, hi: float, left: float, width: float) -> float:
    return left + (t - lo) / (hi - lo) * width if hi > lo else left


def _timeline_svg(doc: dict[str, Any]) -> str:
    lo, hi = doc["since_ts"], doc["until_ts"]
    ents = doc["entities"]
    left, width, row = 260.0, 700.0, 22
    height = row * len(ents) + 40
    n = len(doc.get("nodes", []))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20:.0f}" '
        f'height="{height}" role="img" aria-label="up/down timeline">'
    ]
    for i, e in enumerate(ents):
        y = 10 + i * row
        label = html.escape(_name(e, n))
        parts.append(f'<text x="4" y="{y + 13}">{label}</text>')
        for s, end, st in e["timeline"]:
            x0 = _x(s, lo, hi, left, width)
            x1 = _x(end, lo, hi, left, width)
            w = max(x1 - x0, 1.5 if st == "down" else 0.0)  # a short outage stays visible
            if w <= 0:
                continue
            parts.append(
                f'<rect x="{x0:.2f}" y="{y}" width="{w:.2f}" height="{row - 6}" '
                f'fill="{_COLORS[st]}"><title>{st} {html.escape(_short(s))} .. '
                f"{html.escape(_short(end))}</title></rect>"
            )
    ty = 10 + len(ents) * row + 14
    for k in range(5):
        t = lo + (hi - lo) * k / 4
        x = left + width * k / 4
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{ty}" text-anchor="{anchor}">{_short(t)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _short(t: float) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%m-%d %H:%M:%S")


def _histogram_svg(doc: dict[str, Any], restarts: dict[str, list[float]], bins: int = 40) -> str:
    lo, hi = doc["since_ts"], doc["until_ts"]
    left, width, row = 260.0, 700.0, 34
    names = [k for k, v in restarts.items() if v]
    if not names:
        return '<p class="muted">No restarts in this period.</p>'
    span = (hi - lo) or 1.0
    counts = {k: [0] * bins for k in names}
    for k in names:
        for t in restarts[k]:
            if lo <= t <= hi:
                counts[k][min(bins - 1, int((t - lo) / span * bins))] += 1
    top = max(max(c) for c in counts.values()) or 1
    height = row * len(names) + 30
    bw = width / bins
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 60:.0f}" '
        f'height="{height}" role="img" aria-label="restart histogram">'
    ]
    for i, k in enumerate(names):
        y = 8 + i * row
        parts.append(f'<text x="4" y="{y + 18}">{html.escape(k)}</text>')
        parts.append(
            f'<line x1="{left}" y1="{y + row - 6}" x2="{left + width}" y2="{y + row - 6}" '
            'stroke="#d9dde3"/>'
        )
        for b, c in enumerate(counts[k]):
            if not c:
                continue
            h = (row - 8) * c / top
            parts.append(
                f'<rect x="{left + b * bw + 0.5:.2f}" y="{y + row - 6 - h:.2f}" '
                f'width="{max(bw - 1, 0.5):.2f}" height="{h:.2f}" fill="#4b6cb7">'
                f"<title>{c} restart{'s' if c != 1 else ''} from {_short(lo + b * span / bins)}"
                "</title></rect>"
            )
        parts.append(f'<text x="{left + width + 6}" y="{y + 18}">{sum(counts[k])} total</text>')
    parts.append("</svg>")
    return "".join(parts)


def html_page(doc: dict[str, Any], restarts: dict[str, list[float]] | None = None) -> str:
    """The report as one HTML page that needs no server and loads nothing: the SLO
    table, an up/down timeline per child and subtree, a restart histogram per child,
    incidents and the journal's run boundaries. ``restarts`` maps a child's name to its
    restart times (epoch seconds); by default they are taken from ``doc["marks"]``."""
    esc = html.escape
    n = len(doc.get("nodes", []))
    if restarts is None:
        restarts = {}
        for e in doc["entities"]:
            if e["kind"] == "child":
                restarts[_name(e, n)] = []
        for m in doc.get("marks", []):
            if m["kind"] == "restart" and m["path"]:
                key = f"{m['node']}:{m['path']}" if n > 1 else m["path"]
                restarts.setdefault(key, []).append(m["ts"])
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADERS)
    body = []
    for e, row in zip(doc["entities"], slo_rows(doc), strict=True):
        cls = "exhausted" if e["exhaustion"]["exhausted"] else "down" if e["down_seconds"] else ""
        cells = "".join(f"<td>{esc(c)}</td>" for c in row)
        body.append(
            f'<tr class="{cls}" data-path="{esc(e["path"])}" data-kind="{e["kind"]}">{cells}</tr>'
        )
    burn_head = "".join(f"<th>{w}</th>" for w, _ in BURN_WINDOWS)
    burn_rows = "".join(
        f"<tr><td>{esc(_name(e, n))}</td>"
        + "".join(f"<td>{_burn(e['burn_rates'][w])}</td>" for w, _ in BURN_WINDOWS)
        + "</tr>"
        for e in doc["entities"]
    )
    inc_rows = []
    for e in doc["entities"]:
        for inc in e["incidents"]:
            inc_rows.append(
                f"<tr><td>{esc(_name(e, n))}</td><td>{esc(inc['start'])}</td>"
                f"<td>{esc(inc['end'])}</td><td>{duration(inc['duration_seconds'])}</td>"
                f"<td>{duration(inc['down_seconds'])}</td><td>{inc['failures']}</td></tr>"
            )
    run_rows = "".join(
        f"<tr><td>{esc(r['node'])}</td><td>{esc(r['start'] or '')}</td>"
        f"<td>{esc(r['end'] or 'running')}</td><td>{esc(r['end_how'])}</td></tr>"
        for r in doc.get("runs", [])
    )
    star = "* default SLO (none in the tree file). " if _any_default(doc) else ""
    prom = prometheus_lines(doc)
    prom_html = (
        f"<p>{esc(PROMETHEUS_NOTE)}</p><ul>"
        + "".join(f"<li>{esc(line)}</li>" for line in prom)
        + "</ul>"
        if prom
        else ""
    )
    legend = "".join(f'<span style="background:{c}"></span>{s}' for s, c in _COLORS.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Trellis SLO report {esc(doc["since"])} .. {esc(doc["until"])}</title>
<style>{_CSS}</style></head><body>
<h1>SLO report</h1>
<p class="muted">{esc(doc["since"])} .. {esc(doc["until"])} · journal
{esc(str(doc.get("journal") or "-"))} · generated {esc(doc["generated"])} ·
schema {esc(doc["schema"])}</p>
<h2>Service levels</h2>
<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>
<p class="muted">{star}Availability is up time over up plus
down time; stopped time (not started yet, stopped on purpose, between a clean stop and the
next run) is left out.</p>
{prom_html}
<h2>Up/down timeline</h2>
<p class="legend">{legend}</p>
{_timeline_svg(doc)}
<h2>Restarts over time</h2>
{_histogram_svg(doc, restarts)}
<h2>Burn rates</h2>
<table><thead><tr><th>child / subtree</th>{burn_head}</tr></thead><tbody>{burn_rows}</tbody>
</table>
<h2>Incidents</h2>
<table><thead><tr><th>child / subtree</th><th>start</th><th>end</th><th>duration</th>
<th>down</th><th>failures</th></tr></thead><tbody>{
        "".join(inc_rows) or '<tr><td colspan="6">none</td></tr>'
    }</tbody></table>
<h2>Runs</h2>
<table><thead><tr><th>node</th><th>start</th><th>end</th><th>how</th></tr></thead>
<tbody>{run_rows}</tbody></table>
</body></html>
"""

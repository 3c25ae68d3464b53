"""The main job's report: the figures as a JSON-ready dict (with the reasons it failed,
if it did), and the same printed for people."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from examples.market_data.job_status import Episode
from examples.market_data.pipeline import Integrity
from rich.console import Console
from rich.table import Table
from rich.text import Text

from trellis import chaos, sre
from trellis.journal import tail, verify
from trellis.metrics import Metrics

if TYPE_CHECKING:
    from examples.market_data.main_job import JobOptions

__all__ = [
    "BACKFILL_TARGET",
    "build_report",
    "journal_figures",
    "metrics_summary",
    "render_report",
    "render_slo",
    "slo_figures",
    "slo_summary",
]

#: Backfills should start this soon after a collector is UP again (the seed user's was 5 min).
BACKFILL_TARGET = 1.0


def _pct(values: list[float], q: float) -> float | None:
    return chaos.percentile(values, q)


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}s"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def metrics_summary(metrics: Metrics) -> dict[str, Any]:
    """Restart and exit counters (by exit class) from the Prometheus registry."""
    out: dict[str, Any] = {"child_restarts_total": {}, "child_exits_total": {}}
    for family in metrics.registry.collect():
        for sample in family.samples:
            for name in ("child_restarts_total", "child_exits_total"):
                if sample.name == f"trellis_{name}":
                    reason = sample.labels.get("reason", "?")
                    out[name][reason] = out[name].get(reason, 0) + int(sample.value)
    return out


def slo_figures(url: str, tree: Any = None) -> dict[str, Any]:
    """The SRE report of the run (``trellis slo report``) from its journal alone: per
    child and subtree availability, MTBF, MTTR, incidents and error budget."""
    info = sre.tree_info(tree) if tree is not None else None
    return sre.report(sre.read_records(url), tree=info, journal=url)


def slo_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without its timelines and marks (the HTML page has those): what the JSON
    report keeps."""
    entities = [{k: v for k, v in e.items() if k != "timeline"} for e in doc["entities"]]
    return {**{k: v for k, v in doc.items() if k != "marks"}, "entities": entities}


def journal_figures(url: str, injected: list[chaos.FaultResult]) -> dict[str, Any]:
    """``journal verify`` and the chaos actions the journal holds."""
    result = verify(url)
    faults: list[dict[str, Any]] = []
    heals = 0
    kinds: dict[str, int] = {}
    for record in tail(url, since_seq=1):
        kind = str(record["kind"])
        kinds[kind] = kinds.get(kind, 0) + 1
        data = record.get("data")
        if kind != "operator.action" or not isinstance(data, dict) or data.get("who") != "chaos":
            continue
        action = str(data.get("action", ""))
        if action.startswith("fault:"):
            detail = data.get("detail") or {}
            faults.append(
                {
                    "fault": detail.get("fault") if isinstance(detail, dict) else None,
                    "action": action,
                    "target": data.get("target"),
                    "result": data.get("result"),
                }
            )
        elif action.startswith("heal:"):
            heals += 1
    journaled = {(f["fault"], f["action"], f["target"]) for f in faults if f["result"] == "ok"}
    unjournaled = [f.id for f in injected if (f.id, f"fault:{f.fault}", f.target) not in journaled]
    return {
        "url": url,
        "ok": result.ok,
        "records": result.records,
        "problem": result.problem,
        "first_bad_seq": result.first_bad_seq,
        "chaos_faults": len(faults),
        "chaos_heals": heals,
        "injected_not_journaled": unjournaled,
        "records_by_kind": dict(sorted(kinds.items())),
    }


def build_report(
    *,
    opts: JobOptions,
    seed: int,
    workdir: Path,
    creport: chaos.Report,
    integrity: Integrity,
    settled: bool,
    recovery: dict[str, Any] | None,
    gatekeeper: dict[str, Any] | None,
    episodes: list[Episode],
    journal: dict[str, Any],
    metrics: dict[str, Any],
    hung_kills: int,
    t0: float,
    exchange_down: list[list[float | None]],
) -> tuple[dict[str, Any], list[str]]:
    """The report as a JSON-ready dict, and the reasons the run failed (none: it passed:
    no tick missing, no 429, every gap closed, the journal verified and holding every
    injected fault)."""
    summary = creport.summary()
    delays = sorted(integrity.backfill_delays)
    symbols = [
        {
            "symbol": s,
            "expected": integrity.expected[s],
            "stored": integrity.stored.get(s, 0),
            "missing": len(integrity.missing.get(s, [])),
        }
        for s in integrity.expected
    ]
    failures = []
    if integrity.missing_total:
        failures.append(
            f"{integrity.missing_total} ticks missing in {len(integrity.missing)} symbols"
        )
    if integrity.rejected_429 or integrity.exchange_rejected_429:
        failures.append(
            f"429s received: {integrity.rejected_429} (the exchange counted "
            f"{integrity.exchange_rejected_429})"
        )
    if integrity.gaps_closed != integrity.gaps_opened:
        failures.append(
            f"{integrity.gaps_opened - integrity.gaps_closed} of {integrity.gaps_opened} gaps "
            "not closed"
        )
    if not journal["ok"]:
        failures.append(f"journal verify BROKEN: {journal['problem']}")
    if journal["injected_not_journaled"]:
        failures.append(f"faults not journaled: {', '.join(journal['injected_not_journaled'])}")
    if journal.get("dropped"):
        failures.append(f"the journal dropped {journal['dropped']} events (buffer full)")
    report = {
        "seed": seed,
        "seconds": opts.seconds,
        "symbols": opts.symbols,
        "groups": opts.groups,
        "rate": opts.rate,
        "redis": opts.redis,
        "workdir": str(workdir),
        "ok": not failures,
        "failures": failures,
        "settled": settled,
        "chaos": creport.to_dict(),
        "ticks": {
            "expected": integrity.expected_total,
            "stored": sum(integrity.stored.values()),
            "missing": integrity.missing_total,
            "symbols_checked": len(integrity.expected),
            "per_symbol": symbols,
            "missing_seqs": integrity.missing,
        },
        "gaps": {
            "opened": integrity.gaps_opened,
            "closed": integrity.gaps_closed,
            "by_cause": integrity.gaps_by_cause,
            "backfilled_ticks": integrity.backfilled_ticks,
        },
        "recover": {
            "p50": summary["recover_p50"],
            "p95": summary["recover_p95"],
            "recovered": summary["recovered"],
            "detect_p50": summary["detect_p50"],
            "detect_p95": summary["detect_p95"],
        },
        "backfill_start_delay": {
            "outages": len(delays),
            "p50": _pct(delays, 50),
            "max": delays[-1] if delays else None,
            "target": BACKFILL_TARGET,
            "met": all(d < BACKFILL_TARGET for d in delays),
            "over_target": _slow_outages(recovery, t0, exchange_down),
        },
        "rate_limit": {
            "history_requests": integrity.history_requests,
            "rejected_429": integrity.rejected_429,
            "exchange_rejected_429": integrity.exchange_rejected_429,
        },
        "fallback": {
            "episodes": [asdict(e) for e in episodes],
            "mode_at_end": gatekeeper["mode"] if gatekeeper is not None else None,
        },
        "gatekeeper": gatekeeper,
        "sentinel_hung_kills": hung_kills,
        "recovery": recovery,
        "journal": journal,
        "metrics": metrics,
    }
    return report, failures


def _slow_outages(
    recovery: dict[str, Any] | None, t0: float, exchange_down: list[list[float | None]]
) -> list[dict[str, Any]]:
    """The outages whose backfill started ``BACKFILL_TARGET`` or later after UP, and
    whether the exchange was down meanwhile (a collector cannot resubscribe then)."""
    out = []
    for o in (recovery or {}).get("outages", []):
        delay = o.get("start_delay")
        if delay is None or delay < BACKFILL_TARGET or o.get("up_at") is None:
            continue
        up = o["up_at"] - t0
        overlap = any(
            a is not None and a < up + delay and (b is None or b > up) for a, b in exchange_down
        )
        out.append(
            {
                "collector": o["collector"],
                "reason": o["reason"],
                "up_at": up,
                "delay": delay,
                "exchange_down_meanwhile": overlap,
            }
        )
    return out


def render_slo(doc: dict[str, Any], console: Console) -> None:
    """The run's SLO table (a :func:`slo_figures` document), fitted to the console: at
    narrow widths the least telling columns are left out and long names wrap; no figure
    is cut."""
    console.rule("service levels for the run (from the journal; trellis slo report)")
    console.print(sre.rich_table(doc, compact=True, width=console.width))


def render_report(report: dict[str, Any], creport: chaos.Report, console: Console) -> None:
    """Print ``report`` (from :func:`build_report`) and the chaos table to ``console``."""
    console.rule("chaos report")
    console.print(creport.renderable())
    ticks = report["ticks"]
    console.rule("ticks: expected vs stored per symbol (every seq compared)")
    t = Table(box=None, pad_edge=False)
    for col in ("symbol", "expected", "stored", "missing"):
        t.add_column(col, justify="left" if col == "symbol" else "right")
    rows = ticks["per_symbol"]
    shown = [r for i, r in enumerate(rows) if i < 10 or r["missing"]]
    for r in shown:
        t.add_row(r["symbol"], str(r["expected"]), str(r["stored"]), str(r["missing"]))
    if len(rows) > len(shown):
        rest = [r for r in rows if r not in shown]
        complete = "all complete" if not any(r["missing"] for r in rest) else "SOME MISSING"
        t.add_row(f"… {len(rest)} more", str(sum(r["expected"] for r in rest)),
                  str(sum(r["stored"] for r in rest)), str(sum(r["missing"] for r in rest)),
                  end_section=True)  # fmt: skip
        t.add_row(Text(f"({complete})", style="dim"), "", "", "", end_section=True)
    t.add_row("total", str(ticks["expected"]), str(ticks["stored"]), str(ticks["missing"]),
              style="bold")  # fmt: skip
    console.print(t)
    console.print(
        f"ticks expected {ticks['expected']}, stored {ticks['stored']}, missing "
        f"{ticks['missing']} ({ticks['symbols_checked']} symbols, every seq 1..last compared)"
    )
    console.rule("recovery")
    g = report["gaps"]
    causes = ", ".join(f"{k} {v}" for k, v in sorted(g["by_cause"].items())) or "none"
    console.print(
        f"gaps opened {g['opened']}, closed {g['closed']} ({causes}); "
        f"{g['backfilled_ticks']} ticks backfilled"
    )
    console.print(
        Text(
            "  (by cause: 'outage' = ticks missed while a collector was down; 'start' = "
            "ticks the exchange sent before a collector's first subscription; 'reconnect' "
            "= a collector resubscribed with no outage seen, e.g. after the exchange "
            "restarted)",
            style="dim",
        )
    )
    r = report["recover"]
    console.print(
        f"time to recover: p50 {_secs(r['p50'])}, p95 {_secs(r['p95'])} "
        f"({r['recovered']} faults recovered)"
    )
    b = report["backfill_start_delay"]
    met = "met" if b["met"] else "NOT met"
    console.print(
        f"backfill start delay after UP: p50 {_ms(b['p50'])}, max {_ms(b['max'])} over "
        f"{b['outages']} outages (target < {b['target']:g} s: {met})"
    )
    for o in b["over_target"]:
        why = " (the exchange was down meanwhile)" if o["exchange_down_meanwhile"] else ""
        console.print(
            f"  {o['collector']} ({o['reason']}) UP at {o['up_at']:.1f}s: first history "
            f"request after {_ms(o['delay'])}{why}"
        )
    console.print(f"sentinel: {report['sentinel_hung_kills']} hung collectors killed")
    rl = report["rate_limit"]
    console.print(
        f"429s received: {rl['rejected_429']} (history requests {rl['history_requests']}; the "
        f"exchange counted {rl['exchange_rejected_429']} since it last started)"
    )
    if report["redis"] is not None:
        eps = report["fallback"]["episodes"]
        mode = report["fallback"]["mode_at_end"]
        console.print(f"gatekeeper fallback episodes: {len(eps)} (mode at the end: {mode})")
        for e in eps:
            end = "-" if e["ended"] is None else f"{e['ended']:.1f}s"
            console.print(f"  {e['started']:.1f}s -> {end}: {e['how']}")
    console.rule("journal and metrics")
    j = report["journal"]
    state = "OK" if j["ok"] else f"BROKEN at seq {j['first_bad_seq']}: {j['problem']}"
    console.print(f"journal verify: {state}, {j['records']} records ({j['url']})")
    if "written" in j:
        console.print(f"journal writer: {j['written']} records written, {j['dropped']} dropped")
    console.print(
        f"journaled chaos actions: {j['chaos_faults']} faults, {j['chaos_heals']} heals "
        f"(every injected fault journaled: {'yes' if not j['injected_not_journaled'] else 'NO'})"
    )
    m = report["metrics"]
    restarts = m["child_restarts_total"]
    console.print(
        f"metrics: trellis_child_restarts_total {sum(restarts.values())} ("
        + ", ".join(f"{k} {v}" for k, v in sorted(restarts.items()))
        + ")"
    )
    console.rule()
    if report["ok"]:
        console.print("RESULT: OK (no tick missing, no 429, every gap closed, journal verified)")
    else:
        console.print("RESULT: FAILED: " + "; ".join(report["failures"]))
    if report.get("slo") is not None:
        render_slo(report["slo"], console)

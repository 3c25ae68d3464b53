"""A blameless postmortem draft in Markdown from an SLO report of the incident window."""

from __future__ import annotations

from typing import Any

from ._render import duration, pct

__all__ = ["postmortem_markdown"]

_MAX_TIMELINE = 200


def _t(iso_text: str | None) -> str:
    return (iso_text or "-").replace("T", " ").rstrip("Z")[:23]


def postmortem_markdown(doc: dict[str, Any], tree: str | None = None) -> str:
    """A postmortem draft for the period of ``doc`` (a :func:`report` document): what
    happened and when, the impact on each SLO in minutes of error budget, detection,
    response and recovery times, and the journal's timeline with operator actions and
    chaos faults marked. Root cause, lessons and action items are left as prompts for
    the people who were there: the journal knows what happened, not why.

    Example::

        doc = report(read_records(url), since=t0, until=t1)
        print(postmortem_markdown(doc))
    """
    ents = doc["entities"]
    hit = [e for e in ents if e["down_seconds"] > 0]
    children = [e for e in hit if e["kind"] == "child"]
    incidents = sorted(
        ((inc, e) for e in ents for inc in e["incidents"]), key=lambda p: p[0]["start_ts"]
    )
    marks = doc.get("marks", [])
    start_ts = incidents[0][0]["start_ts"] if incidents else None
    end_ts = max((inc["end_ts"] for inc, _ in incidents), default=None)
    still_down = any(
        e["timeline"] and e["timeline"][-1][2] == "down" for e in ents if e["kind"] == "child"
    )
    operator = [m for m in marks if m["kind"] == "operator"]
    chaos = [m for m in marks if m["kind"] == "chaos"]
    first_op = next((m for m in operator if start_ts is None or m["ts"] >= start_ts), None)
    first_restart = next(
        (
            m
            for m in marks
            if m["kind"] == "restart" and start_ts is not None and m["ts"] >= start_ts
        ),
        None,
    )
    out: list[str] = []
    w = out.append
    title = ", ".join(e["path"] for e in children[:3]) or "no outage found"
    w(f"# Postmortem (draft): {title}")
    w("")
    w(
        "*Blameless: this is about how the system and our processes behaved, not about who "
        "did what. Replace every _prompt_ below; keep the figures, which come from the journal.*"
    )
    w("")
    w("| | |")
    w("|---|---|")
    w("| Status | draft |")
    w(f"| Period | {_t(doc['since'])} .. {_t(doc['until'])} UTC |")
    w(f"| Journal | `{doc.get('journal') or '-'}` |")
    if tree:
        w(f"| Tree file | `{tree}` |")
    w(f"| Generated | {_t(doc['generated'])} UTC by `trellis postmortem` |")
    w("| Authors | _prompt: who is writing this_ |")
    w("")
    w("## Summary")
    w("")
    if not incidents:
        w("The journal shows no child or subtree down in this period.")
    else:
        worst = max(children or hit, key=lambda e: e["down_seconds"])
        w(
            f"Between {_t(incidents[0][0]['start'])} and "
            f"{_t(max(incidents, key=lambda p: p[0]['end_ts'])[0]['end'])} UTC, "
            f"{len(children)} child{'ren' if len(children) != 1 else ''} "
            f"went down ({', '.join(e['path'] for e in children) or '-'}); "
            f"{sum(e['restarts'] for e in children)} restarts in all. The longest outage was "
            f"{worst['path']}: {duration(worst['down_seconds'])} down in "
            f"{len(worst['incidents'])} incident{'s' if len(worst['incidents']) != 1 else ''}."
            + (" **It was still down at the end of the period.**" if still_down else "")
        )
    w("")
    w(
        "_Prompt: one paragraph for a reader who was not there — what users saw, for how "
        "long, and what fixed it._"
    )
    w("")
    w("## Impact on each SLO")
    w("")
    w(
        "| child / subtree | SLO | down | budget spent | of the window's budget | budget left | "
        "availability in period |"
    )
    w("|---|---|---:|---:|---:|---:|---:|")
    shown = [
        e
        for e in ents
        if not (e["kind"] == "child" and e["down_seconds"] == 0 and e["slo"]["source"] != "tree")
    ]
    for e in shown:
        total = e["budget"]["total_seconds"]
        spent = e["down_seconds"]
        star = "" if e["slo"]["source"] == "tree" else "*"
        kind = " (subtree)" if e["kind"] == "subtree" else ""
        w(
            f"| {e['path']}{kind} | {e['slo']['objective'] * 100:g}% / {e['slo']['window']}{star} "
            f"| {duration(spent)} | {spent / 60:.2f} min | "
            f"{pct(spent / total if total else None, 1)} | "
            f"{e['budget']['remaining_seconds'] / 60:.1f} min | {pct(e['availability'])} |"
        )
    w("")
    starred = any(e["slo"]["source"] != "tree" for e in shown)  # a row above carries *
    w(
        ("\\* default SLO (99.9% over 30d): none declared in the tree file. " if starred else "")
        + "Budget left is over the SLO window ending at the end of this period."
    )
    w("")
    w("_Prompt: who or what depended on these children (users, downstream jobs, data gaps)?_")
    w("")
    w("## Detection, response and recovery")
    w("")
    if start_ts is None:
        w("No outage in this period.")
    else:
        w(
            f"- **Started:** {_t(incidents[0][0]['start'])} UTC — "
            f"{incidents[0][1]['path']} went down."
        )
        if first_restart is not None:
            w(
                f"- **Detected (supervisor):** at once; the first automatic restart was "
                f"{duration(first_restart['ts'] - start_ts)} after the start "
                f"({first_restart['path']})."
            )
        else:
            w("- **Detected (supervisor):** no automatic restart in the period.")
        if first_op is not None:
            w(
                f"- **Response (first operator action):** {_t(first_op['t'])} UTC, "
                f"{duration(first_op['ts'] - start_ts)} after the start — {first_op['text']}."
            )
        else:
            w("- **Response (first operator action):** none recorded in the journal.")
        if still_down:
            w("- **Recovered:** not within the period (still down at its end).")
        elif end_ts is not None:
            w(
                f"- **Recovered:** {_t(max(incidents, key=lambda p: p[0]['end_ts'])[0]['end'])} "
                f"UTC, time to recover {duration(end_ts - start_ts)}."
            )
        if chaos:
            w(
                f"- **Chaos:** {len(chaos)} fault/heal record{'s' if len(chaos) != 1 else ''} in "
                "the period: this may be an exercise, not an accident."
            )
        w("")
        w(
            "_Prompt: how did people find out (alert, user report, dashboard)? Was the alert "
            "the right one, and on time?_"
        )
    w("")
    w("## Incidents")
    w("")
    if incidents:
        w("| child / subtree | start (UTC) | end (UTC) | span | down | failures |")
        w("|---|---|---|---:|---:|---:|")
        for inc, e in incidents:
            kind = " (subtree)" if e["kind"] == "subtree" else ""
            w(
                f"| {e['path']}{kind} | {_t(inc['start'])} | {_t(inc['end'])} | "
                f"{duration(inc['duration_seconds'])} | {duration(inc['down_seconds'])} | "
                f"{inc['failures']} |"
            )
    else:
        w("None.")
    w("")
    w("## Timeline (UTC, from the journal)")
    w("")
    w(
        "Marked: **[operator]** actions by people or the control API, **[chaos]** injected "
        "faults and heals."
    )
    w("")
    shown = marks[:_MAX_TIMELINE]
    for m in shown:
        tag = {"operator": " **[operator]**", "chaos": " **[chaos]**"}.get(m["kind"], "")
        where = f" `{m['path']}`" if m["path"] else ""
        node = f" ({m['node']})" if len(doc.get("nodes", [])) > 1 else ""
        w(f"- {_t(m['t'])}{node}{tag}{where}: {m['text']} (seq {m['seq']})")
    if len(marks) > len(shown):
        w(f"- … {len(marks) - len(shown)} more records: `trellis journal export` has them all.")
    if not marks:
        w("- (no supervision events in this period)")
    w("")
    w("## Root cause")
    w("")
    w(
        "_Prompt: what made the child fail (the exit reasons above are symptoms)? Ask "
        '"why" until the answer is about the system, not a person._'
    )
    w("")
    w("## What went well")
    w("")
    w("_Prompt: e.g. did the supervisor contain the failure to one subtree?_")
    w("")
    w("## What went wrong")
    w("")
    w("_Prompt:_")
    w("")
    w("## Where we got lucky")
    w("")
    w("_Prompt:_")
    w("")
    w("## Lessons learned")
    w("")
    w("_Prompt:_")
    w("")
    w("## Action items")
    w("")
    w("| action | kind (prevent / mitigate / detect) | owner | ticket |")
    w("|---|---|---|---|")
    owners = sorted({e["owner"] for e in hit if e.get("owner")})
    w(f"| _prompt_ | | {', '.join(owners) or '_prompt_'} | |")
    w("")
    return "\n".join(out)

"""``trellis slo``: SLO reports from the journal, Prometheus rules, OpenSLO and Grafana
documents from the tree file; ``trellis postmortem``: a blameless postmortem draft.

Example::

    $ trellis slo report tree.toml --since 24h --html slo.html
    $ trellis slo report --journal sqlite:///journal.db --json
    $ trellis slo rules tree.toml -o slo.rules.yml && promtool check rules slo.rules.yml
    $ trellis slo openslo tree.toml > slo.yaml
    $ trellis slo grafana tree.toml > dashboard.json
    $ trellis postmortem --since 2026-12-07T10:00:00Z --until 2026-12-07T11:00:00Z tree.toml
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import click

__all__ = ["parse_time", "postmortem", "slo_group"]


class BadInput(click.ClickException):
    """A bad time, journal or tree file: exit code 2."""

    exit_code = 2


_REL = re.compile(r"^-?\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """Epoch seconds from ``now``, an ISO 8601 time (``2026-12-07T10:00:00Z``; no zone
    means UTC), epoch seconds, or a duration ago (``30m``, ``24h``, ``-7d``).

    Example::

        parse_time("1h", now=7200.0) == 3600.0
    """
    t_now = time.time() if now is None else now
    s = text.strip()
    if s == "now":
        return t_now
    m = _REL.match(s)
    if m:
        return t_now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(s)
    except ValueError:
        pass
    try:
        d = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(
            f"invalid time {text!r}: use an ISO 8601 time (2026-12-07T10:00:00Z), epoch "
            "seconds, 'now', or a duration ago such as 30m, 24h or 7d"
        ) from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.UTC)
    return d.timestamp()


def _load(tree: str | None) -> Any:
    if tree is None:
        return None
    from ._load import load_tree

    loaded = load_tree(tree)
    if loaded is None:
        raise click.exceptions.Exit(2)
    return loaded


def _journal_url(journal: str | None, tree: Any) -> str:
    from .journal import _resolve, as_url

    if journal:
        return as_url(journal)
    if tree is not None:
        url = tree.settings.get("journal", {}).get("url")
        if isinstance(url, str):
            return url
        if not os.environ.get("TRELLIS_JOURNAL"):
            from ..journal._paths import journal_dir

            default = journal_dir() / f"{tree.name}.journal.db"
            if default.exists():  # where `trellis run TREE` journals by default
                return f"sqlite:///{default}"
    return _resolve(None, None)


def _report(
    tree_path: str | None, journal: str | None, since: str | None, until: str | None, merge: float
) -> tuple[dict[str, Any], Any]:
    from ..journal._errors import JournalError
    from ..sre import read_records, report, tree_info

    tree = _load(tree_path)
    url = _journal_url(journal, tree)
    now = time.time()
    t0 = parse_time(since, now) if since else None
    t1 = parse_time(until, now) if until else None
    try:
        records = read_records(url)
    except JournalError as e:
        raise BadInput(str(e)) from None
    try:
        doc = report(
            records,
            since=t0,
            until=t1,
            tree=tree_info(tree) if tree is not None else None,
            merge=merge,
            journal=_shown(url),
            now=now,
        )
    except ValueError as e:
        raise BadInput(str(e)) from None
    return doc, tree


def _shown(url: str) -> str:
    try:
        from ..journal._store import parse_url

        return str(parse_url(url).shown)
    except Exception:
        return url


_tree_arg = click.argument("tree", required=False, type=click.Path(dir_okay=False))
_journal_opt = click.option(
    "--journal",
    metavar="URL",
    help="The journal (URL or SQLite path; default: the tree file's [journal] url, "
    "$TRELLIS_JOURNAL, or the only journal in the journal directory).",
)
_since_opt = click.option(
    "--since", metavar="T", help="Start of the period (ISO time, epoch, or '24h' ago)."
)
_until_opt = click.option(
    "--until", metavar="T", help="End of the period (default: the journal's end, or now)."
)
_merge_opt = click.option(
    "--merge",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="Down intervals closer than this are one incident (a restart storm).",
)


@click.group("slo")
def slo_group() -> None:
    """Service levels: reports from the journal, and rules, OpenSLO and Grafana
    documents from the tree file's slo/runbook/owner keys."""


@slo_group.command("report")
@_tree_arg
@_journal_opt
@_since_opt
@_until_opt
@_merge_opt
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (stable schema).")
@click.option(
    "--html",
    "html_file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Also write a self-contained HTML page (timelines, restart histograms).",
)
def report_cmd(
    tree: str | None,
    journal: str | None,
    since: str | None,
    until: str | None,
    merge: float,
    as_json: bool,
    html_file: str | None,
) -> None:
    """Availability, MTBF, MTTR, incidents, error budget and burn rates per child and
    subtree, from the journal alone (TREE adds the SLOs and which children are
    permanent)."""
    doc, _ = _report(tree, journal, since, until, merge)
    if html_file:
        from ..sre import html_page

        Path(html_file).write_text(html_page(doc), encoding="utf-8")
        click.echo(f"wrote {html_file}", err=True)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console

    from ..sre import rich_table

    width = 200 if not sys.stdout.isatty() else None
    console = Console(width=width)
    # narrow terminal: fewer columns, and at most its width (no figure cut)
    console.print(rich_table(doc, compact=console.width < 160, width=console.width))
    from ..sre._render import PROMETHEUS_NOTE, prometheus_lines

    lines = prometheus_lines(doc)
    if lines:
        console.print(PROMETHEUS_NOTE, markup=False, highlight=False)
        for line in lines:
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)


def _need_tree(tree: str) -> Any:
    loaded = _load(tree)
    if not loaded.settings.get("slo"):
        click.echo(
            f"{tree}: no slo in the tree file; add slo = {{ objective = 0.999, window = "
            '"30d" } to a child or supervisor',
            err=True,
        )
        raise click.exceptions.Exit(2)
    return loaded


_out_opt = click.option(
    "-o",
    "--output",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Write to FILE instead of standard output.",
)


def _emit(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=not text.endswith("\n"))


@slo_group.command("rules")
@click.argument("tree", type=click.Path(dir_okay=False))
@_out_opt
def rules_cmd(tree: str, output: str | None) -> None:
    """Prometheus recording rules and multi-window multi-burn-rate alerts (page:
    14.4x over 1h and 5m, 6x over 6h and 30m; ticket: 3x over 1d and 2h, 1x over 3d and
    6h) for every SLO in TREE: up and calls SLIs on the series Trellis exports, ratio
    and latency SLIs on the application's own counters and histograms."""
    from ..sre import prometheus_rules

    _emit(prometheus_rules(_need_tree(tree)), output)


@slo_group.command("openslo")
@click.argument("tree", type=click.Path(dir_okay=False))
@_out_opt
def openslo_cmd(tree: str, output: str | None) -> None:
    """The SLOs of TREE as OpenSLO v1 documents (YAML)."""
    from ..sre import openslo

    _emit(openslo(_need_tree(tree)), output)


@slo_group.command("grafana")
@click.argument("tree", type=click.Path(dir_okay=False))
@_out_opt
def grafana_cmd(tree: str, output: str | None) -> None:
    """A Grafana dashboard (JSON) for TREE's SLOs on the series Trellis exports."""
    from ..sre import grafana_dashboard

    _emit(json.dumps(grafana_dashboard(_need_tree(tree)), indent=2) + "\n", output)


@click.command("postmortem")
@_tree_arg
@_journal_opt
@click.option("--since", metavar="T", required=True, help="Start of the incident window.")
@click.option("--until", metavar="T", required=True, help="End of the incident window.")
@_merge_opt
@_out_opt
def postmortem(
    tree: str | None,
    journal: str | None,
    since: str,
    until: str,
    merge: float,
    output: str | None,
) -> None:
    """A blameless postmortem draft in Markdown: what, when, impact on each SLO in
    minutes of budget, detection, response and recovery, and the journal's timeline
    with operator actions and chaos faults marked."""
    from ..sre import postmortem_markdown

    doc, _ = _report(tree, journal, since, until, merge)
    _emit(postmortem_markdown(doc, tree=os.fspath(tree) if tree else None), output)

"""SRE from the journal: SLO reports (availability, MTBF, MTTR, incidents, error
budget, burn rates), Prometheus rules, OpenSLO and Grafana documents from the tree
file's ``slo`` keys, and postmortem drafts.

Example::

    from trellis.config import load
    from trellis.sre import read_records, report, tree_info, html_page

    tree = load("tree.toml")
    doc = report(read_records("sqlite:///journal.db"), tree=tree_info(tree))
    for e in doc["entities"]:
        print(e["path"], e["availability"], e["budget"]["remaining_seconds"])
    open("slo.html", "w").write(html_page(doc))

Layering: this package reads the journal (``trellis.journal``'s read side) and tree
files; nothing below it imports it.
"""

from ._math import BURN_WINDOWS as BURN_WINDOWS
from ._math import budget_seconds as budget_seconds
from ._math import budget_spent as budget_spent
from ._math import burn_rate as burn_rate
from ._math import exhaustion_seconds as exhaustion_seconds
from ._math import percentile as percentile
from ._postmortem import postmortem_markdown as postmortem_markdown
from ._render import html_page as html_page
from ._render import rich_table as rich_table
from ._render import slo_rows as slo_rows
from ._report import SCHEMA as SCHEMA
from ._report import TreeInfo as TreeInfo
from ._report import read_records as read_records
from ._report import report as report
from ._report import tree_info as tree_info
from ._rules import grafana_dashboard as grafana_dashboard
from ._rules import openslo as openslo
from ._rules import prometheus_rules as prometheus_rules
from ._rules import slos as slos

__all__ = [
    "BURN_WINDOWS",
    "SCHEMA",
    "TreeInfo",
    "budget_seconds",
    "budget_spent",
    "burn_rate",
    "exhaustion_seconds",
    "grafana_dashboard",
    "html_page",
    "openslo",
    "percentile",
    "postmortem_markdown",
    "prometheus_rules",
    "read_records",
    "report",
    "rich_table",
    "slo_rows",
    "slos",
    "tree_info",
]

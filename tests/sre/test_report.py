"""The SLO report against hand-computed figures on a constructed journal (exact
intervals, written through the real journal writer), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sre._journal import (
    T0,
    exited,
    operator,
    restarted,
    started,
    sup_started,
    sup_stopped,
    terminated,
    write,
)
from trellis.cli import main
from trellis.sre import SCHEMA, TreeInfo, html_page, read_records, report

# Node n1, root "app": a, b and the supervisor sub (with c), all permanent.
#   a: down [100,110], [300,302], [330,333]      (3 crashes, the last two one incident)
#   b: down [105,120] (overlaps a), stopped by an operator [600,700]
#   c: down [500,501]
#   the tree stops cleanly at 800 and runs again from 900 (stopped in between)
N1 = [
    started(0, "app", "a", 2),
    started(0, "app", "b", 3),
    started(0, "app/sub", "c", 5),
    sup_started(0, "app/sub"),
    started(0, "app", "sub", 4),
    sup_started(0, "app"),
    exited(100, "app", "a", 2),
    exited(105, "app", "b", 3),
    restarted(110, "app", "a", 6),
    restarted(120, "app", "b", 7),
    exited(300, "app", "a", 6),
    restarted(302, "app", "a", 8),
    exited(330, "app", "a", 8),
    restarted(333, "app", "a", 9),
    exited(500, "app/sub", "c", 5),
    restarted(501, "app/sub", "c", 10),
    terminated(600, "app", "b", 7),
    operator(600, "stop", "app/b"),
    restarted(700, "app", "b", 11),
    operator(700, "start", "app/b"),
    operator(800, "stop_tree", None, source="signal"),
    terminated(800, "app/sub", "c", 10),
    sup_stopped(800, "app/sub"),
    terminated(800, "app", "sub", 4),
    terminated(800, "app", "b", 11),
    terminated(800, "app", "a", 9),
    sup_stopped(800, "app"),
    # the second run
    started(900, "app", "a", 2),
    started(900, "app", "b", 3),
    started(900, "app/sub", "c", 5),
    sup_started(900, "app/sub"),
    started(900, "app", "sub", 4),
    sup_started(900, "app"),
]

# Node n2, root "edge": x crashes twice; the tree is killed (-9) after its last record
# at 395 and starts again at 500: [395, 500] is down, not up and not stopped.
N2 = [
    started(0, "edge", "x", 2),
    sup_started(0, "edge"),
    exited(50, "edge", "x", 2),
    restarted(52, "edge", "x", 3),
    exited(390, "edge", "x", 3),
    restarted(395, "edge", "x", 4),
    started(500, "edge", "x", 2),
    sup_started(500, "edge"),
]

TREE = TreeInfo(
    root="app",
    permanent=frozenset({"app/a", "app/b", "app/sub", "app/sub/c"}),
    sre={
        "app/a": {
            "slo": {"objective": 0.95, "window": 1000.0},
            "runbook": "https://runbooks.example/a",
            "owner": "team-a",
        },
        "app": {"slo": {"objective": 0.9, "window": 1000.0}},
    },
)


def _by_path(doc: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(e["node"], e["kind"], e["path"]): e for e in doc["entities"]}


def _check(doc: dict[str, Any]) -> None:
    assert doc["schema"] == SCHEMA
    assert doc["nodes"] == ["n1", "n2"]
    ents = _by_path(doc)
    approx = pytest.approx

    a = ents[("n1", "child", "app/a")]
    assert a["up_seconds"] == approx(885.0)
    assert a["down_seconds"] == approx(15.0)
    assert a["stopped_seconds"] == approx(100.0)
    assert a["availability"] == approx(885 / 900)
    assert a["availability_mtbf"] == approx(885 / 900)
    assert a["failures"] == 3
    assert a["mtbf_seconds"] == approx(295.0)
    assert a["mttr_seconds"] == approx(5.0)
    assert a["mttr_p50_seconds"] == approx(3.0)
    assert a["mttr_p95_seconds"] == approx(9.3)
    assert a["restarts"] == 3
    inc = [
        (i["start_ts"] - T0, i["end_ts"] - T0, i["down_seconds"], i["failures"])
        for i in a["incidents"]
    ]
    assert inc == [approx((100, 110, 10, 1)), approx((300, 333, 5, 2))]
    assert a["slo"] == {
        "objective": 0.95,
        "window_seconds": 1000.0,
        "window": "1000s",
        "sli": "up",
        "source": "tree",
    }
    assert a["runbook"] == "https://runbooks.example/a"
    assert a["owner"] == "team-a"
    budget = a["budget"]
    assert budget["total_seconds"] == approx(50.0)  # 5% of 1000 s
    assert budget["consumed_seconds"] == approx(15.0)
    assert budget["remaining_seconds"] == approx(35.0)
    assert budget["remaining_ratio"] == approx(0.7)
    # burn: the last 5 min (700..1000) saw no downtime; every longer window holds all of
    # it: (15 / 900) / 0.05 = 1/3
    assert a["burn_rates"]["5m"] == 0.0
    for w in ("30m", "1h", "6h", "1d", "3d"):
        assert a["burn_rates"][w] == approx(1 / 3)
    # 70% of a 1000 s budget left at 1/3x: 0.7 * 1000 / (1/3) = 2100 s
    assert a["exhaustion"]["seconds"] == approx(2100.0)
    assert not a["exhaustion"]["exhausted"]

    b = ents[("n1", "child", "app/b")]
    assert (b["up_seconds"], b["down_seconds"], b["stopped_seconds"]) == approx((785, 15, 200))
    assert b["restarts"] == 2  # the crash, and the operator's start
    assert b["slo"]["source"] == "default"
    assert b["slo"]["objective"] == 0.999

    c = ents[("n1", "child", "app/sub/c")]
    assert (c["up_seconds"], c["down_seconds"], c["failures"]) == approx((899, 1, 1))

    app = ents[("n1", "subtree", "app")]
    assert app["members"] == ["app/a", "app/b", "app/sub", "app/sub/c"]
    # down whenever any member is: [100,120] (a and b overlap), [300,302], [330,333],
    # [500,501]; stopped while b was stopped by the operator and between the runs
    assert app["down_seconds"] == approx(26.0)
    assert app["stopped_seconds"] == approx(200.0)
    assert app["up_seconds"] == approx(774.0)
    assert app["availability"] == approx(774 / 800)
    assert app["failures"] == 4
    assert len(app["incidents"]) == 3
    assert app["restarts"] == 3 + 2 + 1
    assert app["budget"]["total_seconds"] == approx(100.0)
    assert app["budget"]["remaining_seconds"] == approx(74.0)

    sub = ents[("n1", "subtree", "app/sub")]
    assert sub["members"] == ["app/sub", "app/sub/c"]
    assert (sub["up_seconds"], sub["down_seconds"]) == approx((899, 1))

    x = ents[("n2", "child", "edge/x")]
    assert x["down_seconds"] == approx(2 + 110)  # [50,52] and [390,500]
    assert x["up_seconds"] == approx(888.0)
    assert x["stopped_seconds"] == approx(0.0)
    assert x["failures"] == 2
    assert x["availability"] == approx(0.888)
    edge = ents[("n2", "subtree", "edge")]
    assert edge["members"] == ["edge/x"]
    assert edge["down_seconds"] == approx(112.0)

    runs = [(r["node"], r["start_ts"] - T0, r["end_how"]) for r in doc["runs"]]
    assert runs == [
        ("n1", approx(0), "clean"),
        ("n2", approx(0), "unclean"),
        ("n1", approx(900), "open"),
        ("n2", approx(500), "open"),
    ] or sorted(runs) == sorted(
        [
            ("n1", approx(0), "clean"),
            ("n2", approx(0), "unclean"),
            ("n1", approx(900), "open"),
            ("n2", approx(500), "open"),
        ]
    )
    kinds = {(m["kind"], m["path"]) for m in doc["marks"]}
    assert ("operator", "app/b") in kinds
    assert ("restart", "app/a") in kinds


def _write_both(url: str) -> None:
    write(url, "n1", N1)
    write(url, "n2", N2)


def test_report_matches_hand_computed_figures_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/j.db"
    _write_both(url)
    doc = report(read_records(url), since=T0, until=T0 + 1000, tree=TREE)
    _check(doc)


def test_report_matches_hand_computed_figures_postgres(pg_db: str, pg_server: Any) -> None:
    url = pg_server.url(pg_db)
    _write_both(url)
    doc = report(read_records(url), since=T0, until=T0 + 1000, tree=TREE)
    _check(doc)


def test_since_until_clip_the_period(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/j.db"
    write(url, "n1", N1)
    doc = report(read_records(url), since=T0 + 290, until=T0 + 400, tree=TREE)
    a = _by_path(doc)[("n1", "child", "app/a")]
    assert a["down_seconds"] == pytest.approx(5.0)
    assert a["up_seconds"] == pytest.approx(105.0)
    assert a["restarts"] == 2
    # the budget and burn rates look back from --until over their own windows: the
    # crash at 100 (before --since) still counts
    assert a["budget"]["consumed_seconds"] == pytest.approx(15.0)
    assert a["budget"]["remaining_seconds"] == pytest.approx(35.0)
    assert a["burn_rates"]["5m"] == pytest.approx((15 / 300) / 0.05)  # 100..400
    b = _by_path(doc)[("n1", "child", "app/b")]
    assert b["down_seconds"] == 0.0
    assert b["failures"] == 0
    assert b["mtbf_seconds"] is None


def test_explicit_run_records(tmp_path: Path) -> None:
    """run.started / run.stopped / run.unclean_end (as the journal writes them) are the
    run boundaries: a clean stop leaves the gap out, an unclean end makes it down from
    the last record of the killed run. run.* records are written when the writer opens,
    possibly after the run's first events: the run starts at its first event."""
    url = f"sqlite:///{tmp_path}/j.db"
    write(
        url,
        "n3",
        [
            (0.5, "run.started", {"run_id": "r1"}),  # written after the first events
            started(0, "r", "y", 2),
            sup_started(0, "r"),
            (100, "run.stopped", {"run_id": "r1"}),
            (200, "run.started", {"run_id": "r2", "previous_run_id": "r1"}),
            started(200, "r", "y", 2),
            sup_started(200, "r"),
            exited(250, "r", "y", 2),
            restarted(260, "r", "y", 3),
            # killed after 260 (its last record); the next run says so first
            (
                401,
                "run.unclean_end",
                {"run_id": "r2", "last_seq": 9, "last_utc": "2027-01-15T08:04:20.000000Z"},
            ),
            (401, "run.started", {"run_id": "r3", "previous_run_id": "r2"}),
            started(400, "r", "y", 2),
            sup_started(400, "r"),
        ],
    )
    doc = report(read_records(url), since=T0, until=T0 + 500)
    y = _by_path(doc)[("n3", "child", "r/y")]
    # up [0,100], stopped [100,200], up [200,250], down [250,260], up: none after the
    # restart is known, down [260,400] (unclean end), up [400,500]
    assert y["up_seconds"] == pytest.approx(250.0)
    assert y["down_seconds"] == pytest.approx(150.0)
    assert y["stopped_seconds"] == pytest.approx(100.0)
    assert [r["end_how"] for r in doc["runs"]] == ["clean", "unclean", "open"]
    assert [r["start_ts"] - T0 for r in doc["runs"]] == pytest.approx([0, 200, 400])


def test_root_gave_up_is_down_until_the_next_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/j.db"
    write(
        url,
        "n4",
        [
            started(0, "g", "w", 2),
            sup_started(0, "g"),
            exited(10, "g", "w", 2),
            restarted(10, "g", "w", 3),
            exited(20, "g", "w", 3),
            (20, "supervisor.gave_up", {"supervisor": "g", "child_id": "w"}),
            sup_stopped(20, "g"),
            started(60, "g", "w", 2),
            sup_started(60, "g"),
        ],
    )
    doc = report(read_records(url), since=T0, until=T0 + 100)
    w = _by_path(doc)[("n4", "child", "g/w")]
    assert w["down_seconds"] == pytest.approx(40.0)  # [20, 60]: nobody restarted it
    assert w["up_seconds"] == pytest.approx(60.0)
    assert [r["end_how"] for r in doc["runs"]] == ["gave_up", "open"]


def test_dynamic_children_sharing_an_id(tmp_path: Path) -> None:
    """Two instances under one id (a dynamic supervisor): up while one runs and none
    is owed a restart."""
    url = f"sqlite:///{tmp_path}/j.db"
    write(
        url,
        "n5",
        [
            sup_started(0, "d"),
            started(0, "d", "conn", 2),
            started(10, "d", "conn", 3),
            exited(20, "d", "conn", 2),
            restarted(25, "d", "conn", 4),
            exited(40, "d", "conn", 3, restart=False, reason="normal"),
        ],
    )
    doc = report(read_records(url), since=T0, until=T0 + 50)
    e = _by_path(doc)[("n5", "child", "d/conn")]
    assert e["down_seconds"] == pytest.approx(5.0)
    assert e["up_seconds"] == pytest.approx(45.0)


def test_cli_json_and_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/j.db"
    _write_both(url)
    page = tmp_path / "slo.html"
    code = main(
        [
            "slo",
            "report",
            "--journal",
            url,
            "--since",
            str(T0),
            "--until",
            "2027-01-15T08:16:40Z",
            "--json",
            "--html",
            str(page),
        ]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == SCHEMA
    assert doc["until_ts"] == pytest.approx(T0 + 1000)
    a = _by_path(doc)[("n1", "child", "app/a")]
    assert a["down_seconds"] == pytest.approx(15.0)
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "<svg" in text
    assert 'aria-label="up/down timeline"' in text
    assert 'aria-label="restart histogram"' in text
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in text
    assert "<link" not in text
    assert 'data-path="app/a"' in text
    assert html_page(doc) == text
    # the table
    assert main(["slo", "report", "--journal", url, "--since", str(T0), "--until", "1000s"]) == 2
    capsys.readouterr()
    assert (
        main(["slo", "report", "--journal", url, "--since", str(T0), "--until", str(T0 + 1000)])
        == 0
    )
    out = capsys.readouterr().out
    assert "app/a" in out
    assert "98.333%" in out


def test_unclean_end_of_another_nodes_run_is_not_ours(tmp_path: Path) -> None:
    """In a journal shared by several nodes, a run.unclean_end about another node's run
    (its run_id) does not end this node's run."""
    url = f"sqlite:///{tmp_path}/j.db"
    write(url, "a", [(0, "run.started", {"run_id": "ra"}), started(0, "s", "w", 2)])
    write(
        url,
        "b",
        [
            (10, "run.started", {"run_id": "rb"}),
            started(10, "s", "w", 2),
            (50, "run.unclean_end", {"run_id": "ra", "last_utc": "2027-01-15T08:00:00Z"}),
        ],
    )
    doc = report(read_records(url), since=T0, until=T0 + 100)
    ents = _by_path(doc)
    assert ents[("a", "child", "s/w")]["up_seconds"] == pytest.approx(100.0)
    assert ents[("b", "child", "s/w")]["up_seconds"] == pytest.approx(90.0)
    assert ents[("b", "child", "s/w")]["down_seconds"] == 0.0


def test_a_child_removed_by_a_reload_leaves_its_subtree(tmp_path: Path) -> None:
    """Reloads remove p/c, owed a restart (child.deleted only), and p/b (child.terminated,
    child.deleted; tree.reloaded with the diff): from then on p's subtree is up while the
    children still in it are up; neither counts as down for good, b not as stopped (the
    subtree would be stopped for good) nor as down when the root later gives up. Without
    the tree file, as `trellis slo report --journal J` runs."""
    url = f"sqlite:///{tmp_path}/j.db"
    write(
        url,
        "n7",
        [
            started(0, "p", "a", 2),
            started(0, "p", "b", 3),
            started(0, "p", "c", 4),
            sup_started(0, "p"),
            exited(50, "p", "c", 4),  # owed a restart (backing off) when the reload
            (60, "tree.reloading", {"file": "tree.toml"}),  # removes it: no child.terminated
            (60, "child.deleted", {"supervisor": "p", "child_id": "c"}),
            (
                60,
                "tree.reloaded",
                {
                    "file": "tree.toml",
                    "result": "ok",
                    "changes": [{"change": "removed", "path": "p/c"}],
                    "errors": [],
                },
            ),
            (100, "tree.reloading", {"file": "tree.toml"}),
            terminated(100, "p", "b", 3),
            (100, "child.deleted", {"supervisor": "p", "child_id": "b"}),
            (
                100,
                "tree.reloaded",
                {
                    "file": "tree.toml",
                    "result": "ok",
                    "changes": [{"change": "removed", "path": "p/b"}],
                    "errors": [],
                },
            ),
            exited(200, "p", "a", 2, restart=False),
            (200, "supervisor.gave_up", {"supervisor": "p", "child_id": "a"}),
            sup_stopped(200, "p"),
            # the next run, from the edited file: no b
            started(250, "p", "a", 2),
            sup_started(250, "p"),
        ],
    )
    doc = report(read_records(url), since=T0, until=T0 + 300)
    sub = _by_path(doc)[("n7", "subtree", "p")]
    assert sub["members"] == ["p/a", "p/b", "p/c"]
    assert sub["up_seconds"] == pytest.approx(240.0)  # [0, 50], [60, 200], [250, 300]
    # c backing off [50, 60], the root gave up [200, 250]
    assert sub["down_seconds"] == pytest.approx(60.0)
    assert sub["availability"] == pytest.approx(240 / 300)
    c = _by_path(doc)[("n7", "child", "p/c")]
    assert c["down_seconds"] == pytest.approx(10.0)  # not down for good
    b = _by_path(doc)[("n7", "child", "p/b")]
    assert b["up_seconds"] == pytest.approx(100.0)
    assert b["down_seconds"] == 0.0


def test_default_slo_footnote_only_when_a_row_has_the_star(tmp_path: Path) -> None:
    from rich.console import Console

    from trellis.sre import postmortem_markdown as postmortem
    from trellis.sre import rich_table

    url = f"sqlite:///{tmp_path}/j.db"
    write(url, "n1", N1)
    every = {
        p: {"slo": {"objective": 0.99, "window": 1000.0}}
        for p in ("app", "app/a", "app/b", "app/sub", "app/sub/c")
    }
    for sre, star in ((every, False), (TREE.sre, True)):
        tree = TreeInfo(root="app", permanent=TREE.permanent, sre=sre)
        doc = report(read_records(url), since=T0, until=T0 + 1000, tree=tree)
        console = Console(record=True, width=250)
        console.print(rich_table(doc))
        text = console.export_text()
        assert ("*" in text) is star, text
        assert ("default SLO" in text) is star, text
        assert "burn 1x spends the budget" in text
        assert ("default SLO" in html_page(doc)) is star
        assert ("default SLO" in postmortem(doc)) is star

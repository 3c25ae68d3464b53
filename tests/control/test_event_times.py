"""`trellis events` keeps each event's own time: the events of the tree's start, handed
to the control API once it listens (it is imported after the tree started), are not
stamped with the time they were handed over. With a real `trellis run`."""

from __future__ import annotations

import json
from datetime import datetime

from control.test_trees import Trees, trees  # noqa: F401  (the fixture)


def test_events_of_the_start_keep_their_own_time(trees: Trees) -> None:  # noqa: F811
    trees.run("early")
    r = trees.cli("restart", "os", "--tree", "early")  # a live event, after the listen
    assert r.returncode == 0, r.stderr
    r = trees.cli("events", "--tree", "early", "--history", "100", "--json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    # the first start (replayed) and the restart's start (live)
    first, live = (e for e in events if e["event"] == "child.started" and e["path"] == "early/os")

    def wall(e: dict[str, object]) -> float:
        return datetime.fromisoformat(str(e["utc"]).replace("Z", "+00:00")).timestamp()

    # `time` is the loop's monotonic clock at the event: the wall times must be as far
    # apart (ms rounding and the two clocks read a moment apart: 25 ms at most; the
    # replay stamp was off by the control API's import and bind, 0.2 s or more)
    assert abs((wall(live) - wall(first)) - (live["time"] - first["time"])) < 0.025, (first, live)

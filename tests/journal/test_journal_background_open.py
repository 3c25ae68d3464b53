"""Journal(open_in_background=True), as `trellis run` uses it: the tree need not wait
for the writer process, nothing emitted meanwhile is lost, and a failed open is raised
from tree_started."""

from __future__ import annotations

from pathlib import Path

import pytest

import trellis
from trellis.journal import Journal, JournalError, verify


class Steady(trellis.Server):
    async def init(self) -> None:
        pass


async def test_events_before_the_open_completes_are_journaled(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'j.db'}"
    journal = Journal(url, open_in_background=True)
    await journal.start()
    sup = await trellis.Supervisor.start_link([Steady.child_spec(id="a")], name="bg")
    await journal.tree_started(sup, lambda: None)
    await sup.stop()
    await journal.stop()
    result = verify(url)
    assert result.ok
    assert result.records == 4  # supervisor.started, child.started, child.terminated, stopped


async def test_a_failed_open_is_raised_from_tree_started(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    journal = Journal(f"sqlite:///{tmp_path / 'dir.db'}", open_in_background=True)
    await journal.start()
    sup = await trellis.Supervisor.start_link([], name="bg2")
    with pytest.raises(JournalError, match="cannot open journal"):
        await journal.tree_started(sup, lambda: None)
    await sup.stop()
    await journal.stop()  # returns: nothing to flush


async def test_a_tree_that_never_started_is_still_journaled(tmp_path: Path) -> None:
    """The root failed to start, so tree_started never came: stop() still opens the
    journal and commits what was emitted (the start failure is what an audit needs)."""

    class Broken(trellis.Server):
        async def init(self) -> None:
            raise RuntimeError("no config")

    url = f"sqlite:///{tmp_path / 'j.db'}"
    journal = Journal(url, open_in_background=True)
    await journal.start()
    with pytest.raises(trellis.FailedToStartChild):
        await trellis.Supervisor.start(([Broken.child_spec(id="b")]), name="never")
    await journal.stop()
    assert verify(url).ok
    from trellis.journal import tail

    kinds = [r["kind"] for r in tail(url, n=100)]
    assert kinds == ["child.start_failed"]

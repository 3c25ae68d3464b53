"""The reload diff, in process: a Reloader beside a tree started by trellis.run_async
(servers and workers; the OS-process cases are in test_reload.py)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import trellis
from trellis._reload import Reloader, read_tree

PARTS = """
import asyncio
import trellis

async def idle(label="x"):
    while True:
        await asyncio.sleep(3600)
"""

TREE = """
[supervisor]
name = "{name}"

[[supervisor.children]]
id = "w1"
worker = "{mod}:idle"

[[supervisor.children]]
id = "grp"
strategy = "one_for_one"

[[supervisor.children.children]]
id = "g1"
worker = "{mod}:idle"

[[supervisor.children.children]]
id = "g2"
worker = "{mod}:idle"
"""


class Started:
    def __init__(self) -> None:
        self.root: Any = None
        self.event = asyncio.Event()

    async def start(self) -> None:
        pass

    async def tree_started(self, root: trellis.Pid, request_stop: Callable[[], None]) -> None:
        self.root = root
        self.event.set()

    async def stop(self) -> None:
        pass


class Running:
    def __init__(self, path: Path, reloader: Reloader, root: Any, task: Any) -> None:
        self.path, self.reloader, self.root, self.task = path, reloader, root, task

    async def pids(self) -> dict[str, Any]:
        out: dict[str, Any] = {}

        async def walk(sup: Any, prefix: str) -> None:
            for info in await sup.which_children():
                out[f"{prefix}/{info.id}"] = info.pid
                if str(info.type) == "supervisor" and isinstance(info.pid, trellis.Pid):
                    await walk(info.pid, f"{prefix}/{info.id}")

        await walk(self.root, "t")
        return out


@pytest.fixture
async def running(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    mod = f"reload_parts_{request.node.name}"
    (tmp_path / f"{mod}.py").write_text(PARTS)
    path = tmp_path / "tree.toml"
    path.write_text(TREE.format(name="t", mod=mod))
    tree, raw = read_tree(path)
    reloader = Reloader(path, tree, raw)
    started = Started()
    task = asyncio.ensure_future(
        trellis.run_async(tree.child_spec(), extensions=[reloader, started])
    )
    await asyncio.wait_for(started.event.wait(), 10)
    try:
        yield Running(path, reloader, started.root, task)
    finally:
        await trellis.stop(started.root)
        assert await asyncio.wait_for(task, 10) == 0
        sys.modules.pop(mod, None)


async def _until(cond: Callable[[], Any], what: str) -> None:
    """Poll an async condition (a fail-instead-of-hang bound, no timing assumption)."""
    for _ in range(500):
        if await cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _edit(r: Running, old: str, new: str) -> None:
    text = r.path.read_text()
    assert old in text
    r.path.write_text(text.replace(old, new, 1))


async def test_nested_strategy_change_restarts_that_subtree_only(running: Running) -> None:
    before = await running.pids()
    _edit(running, 'strategy = "one_for_one"', 'strategy = "one_for_all"')
    result = await running.reloader.reload()
    assert result.ok, result.errors
    assert [c.text() for c in result.changes] == ["restarted t/grp (strategy)"]
    after = await running.pids()
    assert after["t/w1"] is before["t/w1"]
    for key in ("t/grp", "t/grp/g1", "t/grp/g2"):
        assert after[key] is not before[key]


async def test_restart_type_change_replaces_the_spec_without_a_restart(running: Running) -> None:
    before = await running.pids()
    _edit(running, 'id = "w1"\n', 'id = "w1"\nrestart = "temporary"\nowner = "team-a"\n')
    result = await running.reloader.reload()
    assert [c.text() for c in result.changes] == ["updated t/w1 (owner, restart)"]
    assert (await running.pids())["t/w1"] is before["t/w1"]
    spec = await running.root.get_childspec("w1")
    assert str(spec.restart) == "temporary"
    # temporary now: when it ends, it is not restarted and is forgotten
    trellis.exit(before["t/w1"], trellis.KILL)

    async def forgotten() -> bool:
        return "t/w1" not in await running.pids()

    await _until(forgotten, "w1 to be forgotten")


async def test_nested_intensity_changes_in_place(running: Running) -> None:
    before = await running.pids()
    _edit(running, 'strategy = "one_for_one"', 'strategy = "one_for_one"\nintensity = 0')
    result = await running.reloader.reload()
    assert [c.text() for c in result.changes] == ["updated t/grp (intensity)"]
    after = await running.pids()
    assert after == before
    # intensity 0: the first crash in grp makes it give up (and its parent restarts it)
    trellis.exit(after["t/grp/g1"], "boom")

    async def grp_restarted() -> bool:
        try:
            grp = (await running.pids()).get("t/grp")
        except trellis.TrellisError:  # asked while it was stopping
            return False
        return isinstance(grp, trellis.Pid) and grp is not before["t/grp"]

    await _until(grp_restarted, "grp to give up and be restarted")


async def test_root_strategy_change_is_refused_whole(running: Running) -> None:
    before = await running.pids()
    _edit(running, 'name = "t"', 'name = "t"\nstrategy = "rest_for_one"')
    _edit(running, 'id = "w1"', 'id = "w0"')
    result = await running.reloader.reload()
    assert result.result == "refused"  # as the docs say; "invalid" is a bad file
    assert result.bad_input
    # FILE:LINE: KEY: MESSAGE, as every error of a tree file
    assert result.errors[0].startswith(f"{result.file}:4: supervisor.strategy: ")
    assert await running.pids() == before


SUP_SERVER = """
import trellis

class Pool(trellis.Server):
    '''A supervisor made of a server (as trellis.cluster.DistributedSupervisor is).'''

    @classmethod
    def child_spec(cls, *, id=None, **_):
        return trellis.ChildSpec(
            id=id, start=cls.start_link, args=("pool", {"kind": None}), type="supervisor",
            shutdown="infinity",
        )

    async def init(self, name="pool", kinds=None):
        self.name = name
"""


def test_a_server_backed_supervisor_in_a_tree_file_can_be_reloaded(tmp_path: Path) -> None:
    mod = "reload_sup_server_parts"
    (tmp_path / f"{mod}.py").write_text(SUP_SERVER)
    path = tmp_path / "tree.toml"
    path.write_text(
        f'[supervisor]\nname = "s"\n\n[[supervisor.children]]\nid = "pool"\nserver = "{mod}:Pool"\n'
    )
    try:
        tree, raw = read_tree(path)
        assert tree.children[0].type.value == "supervisor"
        Reloader(path, tree, raw)  # pairs the file's children with the specs: no error
    finally:
        sys.modules.pop(mod, None)

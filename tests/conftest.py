"""Shared fixtures: a virtual clock, and a check that no test leaks processes or tasks.

Default journals and control sockets go to temporary directories for the whole session,
never to the user's ~/.local/state or runtime directory."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

import trellis
from trellis.testing import VirtualClock, live_processes, use_clock

_SESSION_DIR = tempfile.mkdtemp(prefix="trellis-t-", dir="/tmp")  # short: socket paths
atexit.register(shutil.rmtree, _SESSION_DIR, True)
os.environ["TRELLIS_STATE_DIR"] = os.path.join(_SESSION_DIR, "state")
os.environ["XDG_RUNTIME_DIR"] = _SESSION_DIR
os.environ.pop("TRELLIS_SOCKET", None)
os.environ.pop("TRELLIS_JOURNAL", None)

# TRELLIS_TEST_LOOP=uvloop runs every async test, and every `trellis run` a test starts,
# on uvloop (CI's second pass); tests that depend on the stdlib loop say so with
# `pytest.mark.stdlib_loop` and are skipped there.
TEST_LOOP = os.environ.get("TRELLIS_TEST_LOOP", "asyncio")
if TEST_LOOP == "uvloop":
    import uvloop

    os.environ["TRELLIS_LOOP"] = "uvloop"

    def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> object:
        return {"uvloop": uvloop.new_event_loop}

    def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
        skip = pytest.mark.skip(reason="depends on the standard library's event loop")
        for item in items:
            if item.get_closest_marker("stdlib_loop") is not None:
                item.add_marker(skip)
elif TEST_LOOP != "asyncio":
    raise pytest.UsageError(f"TRELLIS_TEST_LOOP must be asyncio or uvloop, not {TEST_LOOP!r}")
else:
    os.environ.pop("TRELLIS_LOOP", None)


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    """A virtual clock installed for every process the test spawns."""
    vc = VirtualClock()
    with use_clock(vc):
        yield vc


@pytest.fixture(autouse=True)
async def _no_leaks() -> AsyncIterator[None]:
    """Fail a test that leaves a Trellis process or an asyncio task running."""
    yield
    for _ in range(20):
        await asyncio.sleep(0)
    alive = live_processes()
    for pid in alive:
        trellis.exit(pid, trellis.KILL)
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for _ in range(20):
        await asyncio.sleep(0)
    assert not alive, f"test leaked processes: {alive}"
    assert not tasks, f"test leaked asyncio tasks: {tasks}"

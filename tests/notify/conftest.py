"""Fixtures for the notification service: the repository root on ``sys.path`` (for
``examples.notify``) and throwaway PostgreSQL clusters (primary + synchronous replica).

- ``pg_cluster``: one cluster for the whole session. Do not stop, promote or leave it
  paused; use keys of your own (``uuid``) so tests do not see each other's rows.
- ``new_pg_cluster``: a cluster of the test's own, to stop, promote or break.
- ``pg_store``: a :class:`examples.notify.store.Store` on ``pg_cluster`` (write DSN and
  replica), schema created, closed after the test.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.append(ROOT)

from examples.notify.pgcluster import PgCluster, skip_reason  # noqa: E402


def _cluster() -> Iterator[PgCluster]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    base = tempfile.mkdtemp(prefix="notify-pg-", dir="/tmp")  # reachable by the postgres user
    cluster = PgCluster(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL primary + synchronous streaming replica shared by the session."""
    yield from _cluster()


@pytest.fixture
def new_pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL primary + synchronous streaming replica for this test alone."""
    yield from _cluster()


@pytest.fixture
async def pg_store(pg_cluster: PgCluster) -> AsyncIterator[Any]:
    """A Store on the session cluster (writes via write_dsn, status via the replica)."""
    from examples.notify.store import Store

    store = await Store.open(pg_cluster.write_dsn, pg_cluster.replica_dsn)
    try:
        await store.init_schema()
        yield store
    finally:
        await store.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On CI's uvloop pass (TRELLIS_TEST_LOOP=uvloop, which also puts every node the
    tests start on uvloop), run the end-to-end service tests only: the rest exercise
    the example's own code (PostgreSQL, providers, HTTP, the demo's arithmetic), which
    does not depend on the loop and is covered by the asyncio pass."""
    if os.environ.get("TRELLIS_TEST_LOOP") != "uvloop":
        return
    skip = pytest.mark.skip(reason="loop-independent example code: the asyncio pass covers it")
    for item in items:
        if item.path.parent == Path(__file__).parent and item.path.name != "test_service.py":
            item.add_marker(skip)

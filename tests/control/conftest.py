"""Fixtures for the control API tests (helpers in _ctlenv.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from control._ctlenv import Env, FakeMetrics, start_env, stop_env


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory under /tmp for sockets."""
    d = Path(tempfile.mkdtemp(prefix="tc-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def env(short_dir: Path) -> AsyncIterator[Env]:
    """The tree ``shop`` with a ControlServer (Unix socket + TCP, token ``ops``) and
    FakeMetrics."""
    e = await start_env(short_dir, metrics=FakeMetrics())
    try:
        yield e
    finally:
        await stop_env(e)

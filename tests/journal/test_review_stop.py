"""A journal whose pump thread died of an internal error still stops (no hang)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from trellis.journal import Journal


async def test_stop_returns_when_the_pump_thread_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    died = threading.Event()
    monkeypatch.setattr(threading, "excepthook", lambda args: died.set())
    journal = Journal(f"sqlite:///{tmp_path / 'j.db'}")
    await journal.start()

    def broken(*_: Any) -> None:
        raise RuntimeError("internal error in the pump")

    monkeypatch.setattr(journal, "_send_batch", broken)
    journal._poke()
    # the next send (the flush of stop) kills the pump thread; stop must still return
    async with asyncio.timeout(30):
        await journal.stop()
    assert died.is_set()

"""A dead or unstartable guardian is loud: an error log, ``guardian.down`` telemetry and
``/readyz`` 503 "degraded" while OS-process children are unprotected; it is restarted
with every registered group (``guardian.restarted``) and readiness comes back."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import pytest

from control._ctlenv import Env
from trellis._children import _guardian
from trellis.testing import capture_telemetry


async def test_unstartable_guardian_makes_readyz_degraded(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    c = env.unix()
    assert (await c.get("/readyz")).status_code == 200
    _guardian.register(999_999_001)  # a group it must carry over (never a real one)
    try:
        before = _guardian.guardian_pid()
        assert before is not None
        monkeypatch.setattr(_guardian, "_executable", "/nonexistent/python")
        with capture_telemetry() as cap, caplog.at_level(logging.ERROR, "trellis"):
            os.kill(before, signal.SIGKILL)
            os.waitid(os.P_PID, before, os.WEXITED | os.WNOWAIT)  # noqa: ASYNC222 - it is dead
            status = _guardian.guardian_status()  # finds it dead, cannot restart it
            assert status["ok"] is False
            assert "NOT protected" in caplog.text
            down = cap.named("guardian.down")
            assert down, cap.events
            r = await c.get("/readyz")
            assert r.status_code == 503
            body: dict[str, Any] = r.json()
            assert body["ready"] is False
            assert body["reason"].startswith("degraded")
            assert body["guardian"]["ok"] is False
            monkeypatch.setattr(_guardian, "_executable", _guardian.sys.executable)
            status = _guardian.guardian_status()  # retried: running again
            assert status["ok"] is True
            assert status["pid"] not in (None, before)
            assert cap.named("guardian.restarted")
        assert 999_999_001 in _guardian._groups
        assert (await c.get("/readyz")).status_code == 200
    finally:
        _guardian.unregister(999_999_001)

"""A server for the standby tests: its ``init`` leaves a file named by its OS pid, so a
test can tell whether (and with which arguments) an interpreter ran it. Imported by
name (``isolated._standby_servers``) in the isolated interpreter: ``tests/`` is on the
import path."""

from __future__ import annotations

import ctypes
import json
import os
from typing import Any

import trellis


class InitLog(trellis.Server):
    async def init(self, log_dir: str, start: int = 0) -> None:
        with open(os.path.join(log_dir, str(os.getpid())), "w") as f:  # noqa: ASYNC230
            json.dump([log_dir, start], f)
        self.n = start

    async def handle_call(self, request: Any, caller: trellis.Caller) -> Any:
        match request:
            case "get":
                return self.n
            case ("add", n):
                self.n += n
                return self.n
            case "os_pid":
                return os.getpid()
            case "segfault":
                ctypes.string_at(0)
        return ("unknown", request)

"""A server whose module, when imported by an interpreter started with ``DIE_ONCE``
naming a file that exists, removes the file and SIGKILLs its interpreter: the first
interpreter that imports it after the file is made dies before READY, without a word
(as when the OOM killer takes it), and the next one runs normally."""

from __future__ import annotations

import os
import signal
from typing import Any

import trellis

_flag = os.environ.get("DIE_ONCE")
if _flag:
    try:
        os.unlink(_flag)
    except FileNotFoundError:
        pass
    else:
        os.kill(os.getpid(), signal.SIGKILL)


class Plain(trellis.Server):
    async def init(self, start: int = 0) -> None:
        self.n = start

    async def handle_call(self, request: Any, caller: trellis.Caller) -> Any:
        match request:
            case "get":
                return self.n
            case "os_pid":
                return os.getpid()
            case "crash":
                raise RuntimeError("boom")
        return ("unknown", request)

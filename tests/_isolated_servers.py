"""Servers that the isolated-server tests run in interpreters of their own (importable by
name from the new interpreter: `tests/` is on the import path)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from typing import Any

import msgspec

import trellis


@trellis.message_type
class Order(msgspec.Struct):
    symbol: str
    qty: int


class Plain:
    """Not a message type: only pickle can carry it."""

    def __init__(self, x: int) -> None:
        self.x = x


class Counter(trellis.Server):
    async def init(self, start: int = 0, *, step: int = 1) -> None:
        self.n = start
        self.step = step
        self.infos: list[Any] = []
        self.ticks = 0

    async def handle_call(self, request: Any, caller: trellis.Caller) -> Any:
        match request:
            case "get":
                return self.n
            case "os_pid":
                return os.getpid()
            case ("add", n):
                self.n += n
                return ("ok", self.n)
            case ("echo", value):
                return value
            case "infos":
                return self.infos
            case "ticks":
                return self.ticks
            case ("tick_every", seconds):  # its own timer, in its own interpreter
                loop = asyncio.get_running_loop()
                me = trellis.self()

                def tick() -> None:
                    me.send("tick")
                    loop.call_later(seconds, tick)

                loop.call_later(seconds, tick)
                return "ok"
            case "segfault":
                ctypes.string_at(0)
            case ("exit", code):
                os._exit(code)
            case ("sleep", seconds):
                await asyncio.sleep(seconds)
                return "slept"
            case "hang":
                time.sleep(3600)  # noqa: ASYNC251 - blocks the interpreter's event loop
            case ("alloc", mib):
                hog = bytearray(mib * 1024 * 1024)
                return len(hog)
            case "crash":
                raise RuntimeError("boom")
            case "unsendable_reply":
                return {1, 2, 3}
            case ("order", order):
                assert isinstance(order, Order)
                return Order(order.symbol, order.qty * 2)
            case ("plain", obj):
                return Plain(obj.x + 1)
        return ("unknown", request)

    async def handle_cast(self, msg: Any) -> None:
        if isinstance(msg, tuple) and msg[0] == "add":
            self.n += msg[1]

    async def handle_info(self, msg: Any) -> None:
        if msg == "tick":
            self.ticks += 1
        else:
            self.infos.append(msg)


class FailsInit(trellis.Server):
    async def init(self) -> None:
        raise ValueError("no config")

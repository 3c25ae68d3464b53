"""WASM plugins: what plugin_call costs over a raw wasmtime call, restart-to-first-answer,
and memory per idle instance.

- warm call rate, one caller awaiting each call, of a no-op export: ``plugin_call``
  (a hop to the plugin's thread and back) against a raw wasmtime-py call of the same
  export on the same module in the same process (on the loop's thread, blocking it),
  against the same raw call kept off the loop with ``asyncio.to_thread`` (what a user
  would write without Trellis), and the official ``extism`` SDK calling an Extism
  no-op of the same kind when it is installed;
- restart to first answer: a plugin traps, its supervisor restarts it from the cached
  compiled module, and a call answers again (median over rounds);
- memory per idle instance: RSS growth over ``instances=200`` of a small module.

    python bench/bench_plugins.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import wasmtime

import trellis
from trellis._plugins import _engine

ROOT = Path(__file__).resolve().parents[1]
WAT = ROOT / "tests" / "plugins" / "wat"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def raw_rate(n: int) -> float:
    eng = _engine.engine(False)
    module, _ = _engine.load_module(
        bytes(wasmtime.wat2wasm((WAT / "plain.wat").read_text())), False
    )
    store = wasmtime.Store(eng)
    store.set_epoch_deadline(1 << 40)
    inst = wasmtime.Instance(store, module, [])
    noop = inst.exports(store)["noop"]
    assert isinstance(noop, wasmtime.Func)
    for _ in range(1000):
        noop(store)
    t = time.perf_counter()
    for _ in range(n):
        noop(store)
    return n / (time.perf_counter() - t)


async def raw_thread_rate(n: int) -> float:
    """The same raw call, kept off the loop the plain asyncio way (``to_thread``)."""
    eng = _engine.engine(False)
    module, _ = _engine.load_module(
        bytes(wasmtime.wat2wasm((WAT / "plain.wat").read_text())), False
    )
    store = wasmtime.Store(eng)
    store.set_epoch_deadline(1 << 40)
    inst = wasmtime.Instance(store, module, [])
    noop = inst.exports(store)["noop"]
    assert isinstance(noop, wasmtime.Func)
    for _ in range(500):
        await asyncio.to_thread(noop, store)
    t = time.perf_counter()
    for _ in range(n):
        await asyncio.to_thread(noop, store)
    return n / (time.perf_counter() - t)


def extism_rate(n: int) -> float | None:
    try:
        import extism
    except ImportError:
        return None
    wasm = bytes(wasmtime.wat2wasm((WAT / "misbehave.wat").read_text()))
    p = extism.Plugin(wasm, wasi=False)
    for _ in range(200):
        p.call("noop", b"")
    t = time.perf_counter()
    for _ in range(n):
        p.call("noop", b"")
    return n / (time.perf_counter() - t)


async def plugin_rate(n: int, function: str, module: str) -> float:
    spec = trellis.Plugin(WAT / f"{module}.wat", id="p", name="p", memory="4MiB", timeout=5.0)
    sup = await trellis.Supervisor.start_link([spec])
    try:
        data: object = [] if module == "plain" else b""
        for _ in range(1000):
            await trellis.plugin_call("p", function, data)
        t = time.perf_counter()
        for _ in range(n):
            await trellis.plugin_call("p", function, data)
        return n / (time.perf_counter() - t)
    finally:
        await sup.stop()


async def restart_to_answer(rounds: int) -> list[float]:
    spec = trellis.Plugin(WAT / "misbehave.wat", id="m", name="m", memory="4MiB", timeout=5.0)
    sup = await trellis.Supervisor.start_link([spec], intensity=rounds + 5, period=60.0)
    out = []
    try:
        for _ in range(rounds):
            old = trellis.whereis("m")
            try:
                await trellis.plugin_call("m", "trap_on", b"boom")
            except trellis.PluginError:
                pass
            t = time.perf_counter()
            while True:
                pid = trellis.whereis("m")
                if pid is not None and pid is not old and getattr(pid._server, "pool", None):
                    try:
                        await trellis.plugin_call(pid, "echo", b"x")
                        break
                    except (trellis.PluginError, trellis.NoProc, trellis.Exited):
                        pass
                await asyncio.sleep(0)
            out.append(time.perf_counter() - t)
    finally:
        await sup.stop()
    return out


async def idle_memory(n: int) -> float:
    spec = trellis.Plugin(WAT / "plain.wat", id="i", name="i", memory="1MiB", timeout=1.0)
    warm = await trellis.Supervisor.start_link([spec])  # engine, module and threads warmed
    await warm.stop()
    before = rss()
    spec = trellis.Plugin(
        WAT / "plain.wat", id="i", name="i", memory="1MiB", timeout=1.0, instances=n
    )
    sup = await trellis.Supervisor.start_link([spec])
    after = rss()
    await sup.stop()
    return (after - before) / n


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, wasmtime-py {_engine._wasmtime_version()}")
    raw = raw_rate(args.calls)
    via = await plugin_rate(args.calls, "noop", "plain")
    ext_noop = await plugin_rate(args.calls, "noop", "misbehave")
    ex = extism_rate(args.calls)
    print(
        f"raw wasmtime call (plain noop, on the loop thread): {raw:10.0f} calls/s  {1e6 / raw:6.1f} us"
    )
    print(
        f"plugin_call       (plain noop, plugin thread)     : {via:10.0f} calls/s  {1e6 / via:6.1f} us"
    )
    print(f"  ratio {via / raw:.2f}x; overhead per call {1e6 / via - 1e6 / raw:.1f} us")
    off = await raw_thread_rate(args.calls)
    print(
        f"raw wasmtime call via asyncio.to_thread (off the loop): {off:10.0f} calls/s  {1e6 / off:6.1f} us"
    )
    print(f"  plugin_call vs that: {via / off:.2f}x")
    print(
        f"plugin_call       (Extism-ABI noop)                : {ext_noop:10.0f} calls/s  {1e6 / ext_noop:6.1f} us"
    )
    if ex is not None:
        print(
            f"extism SDK call   (Extism-ABI noop, same module)  : {ex:10.0f} calls/s  {1e6 / ex:6.1f} us"
        )
        print(f"  plugin_call vs extism SDK: {ext_noop / ex:.2f}x")
    rs = await restart_to_answer(args.rounds)
    q = statistics.quantiles(rs, n=20)
    print(
        f"restart to first answer (trap -> restarted -> answered, {len(rs)} rounds): "
        f"median {statistics.median(rs) * 1000:.2f} ms, p95 {q[18] * 1000:.2f} ms"
    )
    per = await idle_memory(200)
    print(f"memory per idle instance (200 instances of a small module): {per / 1024:.0f} KiB")


if __name__ == "__main__":
    asyncio.run(main())

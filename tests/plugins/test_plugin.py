"""``trellis.Plugin`` and ``plugin_call`` with real WASM modules (docs/api.md "WASM
plugins"): the call runs off the loop, each failure kind is contained and classified,
and nothing of the host is reachable unless granted."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import trellis
from trellis._plugins import _engine
from trellis._tree import classify

Wat = Callable[[str], Path]


@asynccontextmanager
async def tree(*specs: trellis.ChildSpec, **flags: Any) -> AsyncIterator[Any]:
    sup = await trellis.Supervisor.start_link(list(specs), intensity=50, period=5.0, **flags)
    try:
        yield sup
    finally:
        await sup.stop()


@asynccontextmanager
async def exits() -> AsyncIterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    hid = trellis.telemetry.attach(seen.append, ["child.exited"])
    try:
        yield seen
    finally:
        trellis.telemetry.detach(hid)


def spec(wat: Wat, name: str = "misbehave", **kw: Any) -> trellis.ChildSpec:
    opts: dict[str, Any] = {"id": name, "name": name, "memory": "16MiB", "timeout": 0.5}
    opts.update(kw)
    return trellis.Plugin(wat(name if name in ("plain", "wasi_read") else "misbehave"), **opts)


async def wait_for_restart(name: str, old: trellis.Pid) -> trellis.Pid:
    for _ in range(500):
        pid = trellis.whereis(name)
        ready = pid is not None and getattr(pid._server, "pool", None) is not None  # init done
        if ready and pid is not old and pid.alive:
            return pid
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} was not restarted")


async def test_extism_exports_and_plain_exports(wat: Wat) -> None:
    async with tree(spec(wat), spec(wat, "plain")):
        assert await trellis.plugin_call("misbehave", "echo", b"hello") == b"hello"
        assert await trellis.plugin_call("misbehave", "upper", "mixed Case") == b"MIXED CASE"
        assert await trellis.plugin_call("misbehave", "noop", b"") == b""
        assert await trellis.plugin_call("misbehave", "echo", b"") == b""
        big = os.urandom(300_000)
        assert await trellis.plugin_call("misbehave", "echo", big) == big
        # plain numeric exports: a sequence of numbers or a JSON array in, JSON out
        assert await trellis.plugin_call("plain", "add", [2, 40]) == b"42"
        assert await trellis.plugin_call("plain", "add", b"[1, 2]") == b"3"
        assert await trellis.plugin_call("plain", "mul64", [2**40, 3]) == str(3 * 2**40).encode()
        assert await trellis.plugin_call("plain", "half", [5]) == b"2.5"
        assert await trellis.plugin_call("plain", "fib", [50]) == b"12586269025"
        assert await trellis.plugin_call("plain", "noop", []) == b""
        # numeric exports beside Extism ones in the same module
        assert await trellis.plugin_call("misbehave", "add", [3, 4]) == b"7"


async def test_bad_calls_are_errors_and_the_plugin_stays_up(wat: Wat) -> None:
    async with tree(spec(wat, "plain")):
        pid = trellis.whereis("plain")
        for fn, data in (("nope", b""), ("add", [1]), ("add", b"not json"), ("add", [1.5, 2])):
            with pytest.raises(trellis.PluginError) as ei:
                await trellis.plugin_call("plain", fn, data)
            assert ei.value.kind == "error"
        assert trellis.whereis("plain") is pid
        assert pid.alive
    with pytest.raises(trellis.NoProc):
        await trellis.plugin_call("nobody", "add", [1, 2])


async def test_plugin_reported_error_keeps_the_plugin_up(wat: Wat) -> None:
    async with tree(spec(wat)):
        pid = trellis.whereis("misbehave")
        with pytest.raises(trellis.PluginError) as ei:
            await trellis.plugin_call("misbehave", "fail", b"")
        assert (ei.value.kind, ei.value.message) == ("error", "plugin said no")
        with pytest.raises(trellis.PluginError) as ei:
            await trellis.plugin_call("misbehave", "rc", b"")
        assert ei.value.kind == "error"
        assert "3" in ei.value.message
        assert await trellis.plugin_call("misbehave", "echo", b"still here") == b"still here"
        assert trellis.whereis("misbehave") is pid
        assert pid.alive


@pytest.mark.parametrize(
    ("function", "data", "kind", "exit_class", "extra"),
    [
        ("spin", b"", "timeout", "timeout", {}),
        ("bomb", b"", "oom", "oom", {}),
        ("trap_on", b"boom!", "trap", "crash", {}),
        ("spin", b"", "fuel", "timeout", {"fuel": 5_000_000, "timeout": 30.0}),
    ],
)
async def test_each_failure_is_contained_and_classified(
    wat: Wat, function: str, data: bytes, kind: str, exit_class: str, extra: dict[str, Any]
) -> None:
    async with exits() as seen, tree(spec(wat, **extra), spec(wat, "plain")):
        pid = trellis.whereis("misbehave")
        sibling = trellis.whereis("plain")
        with pytest.raises(trellis.PluginError) as ei:
            await trellis.plugin_call("misbehave", function, data)
        assert ei.value.kind == kind
        assert (ei.value.plugin, ei.value.function) == ("misbehave", function)
        assert "backtrace" not in ei.value.message  # the cause, not wasmtime's preamble
        new = await wait_for_restart("misbehave", pid)
        [ev] = [e for e in seen if e.get("child_id") == "misbehave"]
        assert classify(ev["reason"]) == exit_class
        assert ev["reason"].kind == kind
        # restarted from the cached module, answering again; the sibling never noticed
        assert await trellis.plugin_call(new, "trap_on", b"fine") == b"fine"
        assert trellis.whereis("plain") is sibling
        assert sibling.alive
        assert await trellis.plugin_call("plain", "add", [1, 1]) == b"2"


async def test_trap_only_on_bad_input(wat: Wat) -> None:
    async with tree(spec(wat)):
        pid = trellis.whereis("misbehave")
        assert await trellis.plugin_call("misbehave", "trap_on", b"ok input") == b"ok input"
        assert trellis.whereis("misbehave") is pid


async def test_slow_leak_ends_in_oom_then_a_fresh_instance(wat: Wat) -> None:
    async with exits() as seen, tree(spec(wat, memory="4MiB")):
        pid = trellis.whereis("misbehave")
        ok = 0
        failure: trellis.PluginError | None = None
        for _ in range(100):
            try:
                await trellis.plugin_call("misbehave", "leak", b"")
            except trellis.PluginError as e:
                failure = e
                break
            ok += 1
        assert failure is not None
        assert failure.kind == "oom"
        assert 5 <= ok <= 16  # 256 KiB a call under a 4 MiB cap (the module starts at 64 KiB)
        await wait_for_restart("misbehave", pid)
        assert await trellis.plugin_call("misbehave", "leak", b"") == b""
        assert [classify(e["reason"]) for e in seen] == ["oom"]


async def test_a_runaway_call_does_not_block_the_loop(wat: Wat) -> None:
    """The plugin spins to its deadline on its own thread; the loop keeps serving."""
    async with tree(spec(wat, timeout=0.6)):
        gaps: list[float] = []
        stop = asyncio.Event()

        async def beat() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.002)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        beater = asyncio.create_task(beat())
        t0 = time.perf_counter()
        with pytest.raises(trellis.PluginError) as ei:
            await trellis.plugin_call("misbehave", "spin", b"")
        took = time.perf_counter() - t0
        stop.set()
        await beater
        assert ei.value.kind == "timeout"
        assert 0.6 <= took < 5.0
        assert len(gaps) > 50
        assert max(gaps) < 0.050, f"the loop stalled {max(gaps) * 1000:.1f} ms"


async def test_sibling_latency_is_unchanged_while_another_plugin_spins(wat: Wat) -> None:
    """A sibling's calls with a plugin spinning beside it, against without: median within
    20% always, p99 within 20% where the machine has a core to spare (>= 4 cores)."""
    async with tree(spec(wat, "plain"), spec(wat, timeout=2.0, restart="temporary")):

        async def sample(n: int) -> list[float]:
            out = []
            for _ in range(n):
                t = time.perf_counter()
                await trellis.plugin_call("plain", "fib", [30])
                out.append(time.perf_counter() - t)
            return out

        await sample(200)  # warm up
        quiet: list[float] = []
        busy: list[float] = []
        spinner = asyncio.ensure_future(trellis.plugin_call("misbehave", "spin", b""))
        await asyncio.sleep(0.05)
        for _ in range(3):
            busy += await sample(300)
        assert not spinner.done()  # it was spinning all along
        with pytest.raises(trellis.PluginError):
            await spinner
        await asyncio.sleep(0.05)
        for _ in range(3):
            quiet += await sample(300)

        def p99(xs: list[float]) -> float:
            return statistics.quantiles(xs, n=100)[98]

        med_quiet, med_busy = statistics.median(quiet), statistics.median(busy)
        assert med_busy <= med_quiet * 1.2 + 0.0002, (med_quiet, med_busy)
        if (os.cpu_count() or 1) >= 4:
            # the spinning plugin holds a whole core: with two (a shared CI box) the tail
            # of anything else on the machine moves, plugin or not
            assert p99(busy) <= p99(quiet) * 1.2 + 0.0002, (p99(quiet), p99(busy))


async def test_caller_timeout_shorter_than_the_deadline(wat: Wat) -> None:
    async with tree(spec(wat, timeout=0.5, instances=1)):
        pid = trellis.whereis("misbehave")
        with pytest.raises(trellis.CallTimeout):
            await trellis.plugin_call("misbehave", "spin", b"", timeout=0.05)
        assert pid.alive  # the call still runs to its deadline, then the plugin restarts
        new = await wait_for_restart("misbehave", pid)
        assert await trellis.plugin_call(new, "echo", b"x", timeout=5.0) == b"x"


async def test_calls_to_one_instance_are_serialised_and_a_pool_runs_in_parallel(
    wat: Wat,
) -> None:
    async with tree(spec(wat, timeout=0.4, instances=1, restart="temporary")):
        spin = asyncio.ensure_future(trellis.plugin_call("misbehave", "spin", b""))
        await asyncio.sleep(0.01)
        echo = asyncio.ensure_future(trellis.plugin_call("misbehave", "echo", b"queued"))
        with pytest.raises(trellis.PluginError):
            await spin
        # queued behind the runaway call on the one instance: the plugin went down first
        with pytest.raises(trellis.Exited):
            await echo
    async with tree(spec(wat, timeout=0.4, instances=2, restart="temporary")):
        spin = asyncio.ensure_future(trellis.plugin_call("misbehave", "spin", b""))
        await asyncio.sleep(0.01)
        assert await trellis.plugin_call("misbehave", "echo", b"other") == b"other"
        assert not spin.done()  # the second instance answered while the first spins
        with pytest.raises(trellis.PluginError):
            await spin


async def test_config_and_vars(wat: Wat) -> None:
    async with tree(spec(wat, config={"region": "eu-west", "strict": "true"})):
        assert await trellis.plugin_call("misbehave", "config", b"region") == b"eu-west"
        assert await trellis.plugin_call("misbehave", "config", b"missing") == b""
        assert [await trellis.plugin_call("misbehave", "count", b"") for _ in range(3)] == [
            b"1",
            b"2",
            b"3",
        ]
        assert await trellis.plugin_call("misbehave", "log", b"") == b""


async def test_no_wasi_unless_granted(wat: Wat, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("patient 42")
    module = wat("wasi_read")
    with pytest.raises(trellis.StartError, match="WASI is not granted"):
        async with tree(trellis.Plugin(module, id="r", memory="1MiB", timeout=1.0)):
            pass
    # WASI without a directory: nothing to open
    async with tree(
        trellis.Plugin(module, id="r", name="r", memory="1MiB", timeout=1.0, wasi=True)
    ):
        assert int(await trellis.plugin_call("r", "read", [])) < 0
    # a granted directory, read-only
    async with tree(
        trellis.Plugin(
            module, id="r", name="r", memory="1MiB", timeout=1.0, allowed_paths=[str(tmp_path)]
        )
    ):
        assert await trellis.plugin_call("r", "read", []) == b"10"


async def test_unknown_imports_fail_the_start_with_their_name() -> None:
    wat = '(module (import "env" "system" (func (param i32))) (func (export "f")))'
    with pytest.raises(trellis.StartError, match="env::system"):
        async with tree(trellis.Plugin(wat, id="x", memory="1MiB", timeout=1.0)):
            pass


def test_bad_specs_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(trellis.InvalidChildSpec, match="no such module file"):
        trellis.Plugin(tmp_path / "missing.wasm", id="x", memory="1MiB", timeout=1.0)
    junk = tmp_path / "junk.wasm"
    junk.write_bytes(b"\0asm\x01\0\0\0garbage")
    with pytest.raises(trellis.InvalidChildSpec, match="not a valid wasm module"):
        trellis.Plugin(junk, id="x", memory="1MiB", timeout=1.0)
    ok = "(module)"
    for kw, field in (
        ({"memory": "lots"}, "memory"),
        ({"memory": 100}, "memory"),
        ({"timeout": 0}, "timeout"),
        ({"fuel": -1}, "fuel"),
        ({"instances": 0}, "instances"),
        ({"config": {"a": 1}}, "config"),
    ):
        args: dict[str, Any] = {"id": "x", "memory": "1MiB", "timeout": 1.0, **kw}
        with pytest.raises(trellis.InvalidChildSpec) as ei:
            trellis.Plugin(ok, **args)
        assert ei.value.field == field


async def test_compiled_modules_are_cached_in_memory_and_on_disk(wat: Wat) -> None:
    module = wat("plain")
    _engine.forget_modules()
    before = dict(_engine.stats)
    async with tree(trellis.Plugin(module, id="p", name="p", memory="1MiB", timeout=1.0)):
        pass
    cache = Path(os.environ["TRELLIS_PLUGIN_CACHE"])
    sha = trellis.Plugin(module, id="p", memory="1MiB", timeout=1.0).args[0].sha256
    assert [f for f in os.listdir(cache) if f.startswith(f"{sha}-plain-")]
    _engine.forget_modules()
    async with tree(trellis.Plugin(module, id="p", name="p", memory="1MiB", timeout=1.0)):
        assert await trellis.plugin_call("p", "add", [1, 2]) == b"3"
    assert _engine.stats["disk_hits"] > before["disk_hits"]
    hits = _engine.stats["memory_hits"]
    async with tree(trellis.Plugin(module, id="p", name="p", memory="1MiB", timeout=1.0)):
        pass
    assert _engine.stats["memory_hits"] > hits


async def test_the_deadline_watchdog_is_idle_without_calls(wat: Wat) -> None:
    async with tree(spec(wat, timeout=30.0)):
        for _ in range(500):  # calls of earlier tests may still run to their deadline
            if _engine.watchdog.armed == 0:
                break
            await asyncio.sleep(0.01)
        for _ in range(200):
            await trellis.plugin_call("misbehave", "echo", b"x")
        wakeups = _engine.watchdog.wakeups
        await asyncio.sleep(0.1)
        for _ in range(200):
            await trellis.plugin_call("misbehave", "echo", b"x")
        # no tick per call or per period: a wake-up only for a deadline that moved earlier
        assert _engine.watchdog.wakeups - wakeups <= 2


async def test_stopping_a_plugin_cuts_its_call_short(wat: Wat) -> None:
    async with tree(spec(wat, timeout=30.0, restart="temporary")):
        call = asyncio.ensure_future(trellis.plugin_call("misbehave", "spin", b""))
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await trellis.stop("misbehave")
        with pytest.raises(trellis.Exited):
            await call
        for _ in range(500):
            if _engine.watchdog.armed == 0:
                break
            await asyncio.sleep(0.01)
        assert _engine.watchdog.armed == 0
        assert time.perf_counter() - t0 < 5.0  # not the 30 s deadline


async def test_a_start_function_has_the_deadline_too() -> None:
    wat = "(module (func $spin (loop $l (br $l))) (start $spin))"
    t0 = time.perf_counter()
    with pytest.raises(trellis.StartError, match="ran past"):
        async with tree(trellis.Plugin(wat, id="s", memory="1MiB", timeout=0.2)):
            pass
    assert time.perf_counter() - t0 < 5.0


async def test_call_statistics_are_telemetry(wat: Wat) -> None:
    seen: list[dict[str, Any]] = []
    hid = trellis.telemetry.attach(
        seen.append, ["plugin.stats", "plugin.started", "plugin.stopped"]
    )
    try:
        async with tree(spec(wat, restart="temporary")):
            for _ in range(5):
                await trellis.plugin_call("misbehave", "echo", b"x")
            with pytest.raises(trellis.PluginError):
                await trellis.plugin_call("misbehave", "fail", b"")
            info = await trellis.plugin_info("misbehave")
            assert (info["calls"], info["errors"]) == (6, {"error": 1})
            assert info["memory_high"] >= 65536
    finally:
        trellis.telemetry.detach(hid)
    [started] = [e for e in seen if e["event"] == "plugin.started"]
    [stopped] = [e for e in seen if e["event"] == "plugin.stopped"]
    assert (stopped["sha256"], stopped["calls"]) == (started["sha256"], 6)
    assert stopped["reason"] == trellis.SHUTDOWN
    assert started["path"].endswith("/misbehave")
    assert len(started["sha256"]) == 64
    stats = [e for e in seen if e["event"] == "plugin.stats"]
    assert sum(e["calls"] for e in stats) == 6
    assert sum(e["errors"].get("error", 0) for e in stats) == 1
    assert sum(n for _, n in stats[0]["buckets"]) == stats[0]["calls"]
    assert all(e["path"] == started["path"] for e in stats)


async def test_no_network_unless_granted(wat: Wat) -> None:
    import http.server
    import threading

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello from the network")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    request = f'{{"url": "http://127.0.0.1:{server.server_address[1]}/"}}'.encode()
    try:
        async with tree(spec(wat, restart="temporary")):
            with pytest.raises(trellis.PluginError) as ei:
                await trellis.plugin_call("misbehave", "fetch", request)
            assert ei.value.kind == "trap"
            assert "not granted" in ei.value.message
        async with tree(spec(wat, allowed_hosts=["127.0.0.1"])):
            out = await trellis.plugin_call("misbehave", "fetch", request)
            assert out == b"hello from the network"
        async with tree(spec(wat, allowed_hosts=["example.org"])):
            with pytest.raises(trellis.PluginError, match="not granted"):
                await trellis.plugin_call("misbehave", "fetch", request)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

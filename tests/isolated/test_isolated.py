"""Isolated servers: a trellis.Server in an interpreter of its own, with call/cast/send,
its own timers, and crashes, segfaults, os._exit, rlimits and hangs arriving as exit
reasons of their class. Real interpreters, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import trellis
from _isolated_servers import Counter, FailsInit, Order, Plain
from trellis._tree import classify
from trellis.testing import capture_telemetry

pytestmark = pytest.mark.timeout(60)


async def _start(spec: trellis.ChildSpec, **flags: Any) -> trellis.SupervisorPid:
    flags.setdefault("intensity", 10)
    flags.setdefault("period", 5.0)
    return await trellis.Supervisor.start_link([spec], **flags)


async def _child_pid(sup: trellis.SupervisorPid) -> trellis.Pid:
    [info] = await sup.which_children()
    assert isinstance(info.pid, trellis.Pid)
    return info.pid


async def _restarted(sup: trellis.SupervisorPid, old: trellis.Pid) -> trellis.Pid:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        [info] = await sup.which_children()
        if isinstance(info.pid, trellis.Pid) and info.pid is not old:
            return info.pid
        await asyncio.sleep(0.02)
    raise AssertionError("the isolated server was not restarted")


def _alive(os_pid: int) -> bool:
    try:
        os.kill(os_pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie that nobody reaped yet is gone for our purpose
        with open(f"/proc/{os_pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_call_cast_info_and_its_own_timers() -> None:
    sup = await _start(trellis.Isolated(Counter, 10, step=2, id="counter", name="iso"))
    try:
        assert await trellis.call("iso", "get") == 10
        assert await trellis.call("iso", ("add", 5)) == ("ok", 15)  # a tuple stays a tuple
        trellis.cast("iso", ("add", 1))
        trellis.send("iso", {"hello": [1, 2.5, None, b"x"]})
        assert await trellis.call("iso", "get") == 16
        assert await trellis.call("iso", "infos") == [{"hello": [1, 2.5, None, b"x"]}]
        os_pid = await trellis.call("iso", "os_pid")
        assert os_pid != os.getpid()
        assert await trellis.call("iso", ("tick_every", 0.01)) == "ok"
        deadline = time.monotonic() + 10
        while await trellis.call("iso", "ticks") < 3:
            assert time.monotonic() < deadline, "its own timer never fired"
            await asyncio.sleep(0.02)
    finally:
        await sup.stop()
    assert not _alive(os_pid)


async def test_stop_runs_in_the_child_and_ends_the_interpreter() -> None:
    sup = await _start(trellis.Isolated(Counter, id="counter", name="iso"))
    os_pid = await trellis.call("iso", "os_pid")
    with capture_telemetry(["child.exited", "child.terminated"]):
        await sup.terminate_child("counter")
    assert not _alive(os_pid)
    assert trellis.whereis("iso") is None
    await sup.stop()


@pytest.mark.parametrize(
    ("request_", "cls", "why"),
    [
        ("segfault", "crash", "Signaled"),
        (("exit", 3), "crash", "ExitCode"),
        ("crash", "crash", "IsolatedExit"),
    ],
)
async def test_a_crash_arrives_as_exit_reason_and_is_restarted(
    request_: Any, cls: str, why: str
) -> None:
    sup = await _start(trellis.Isolated(Counter, 7, id="counter", name="iso"))
    try:
        old = await _child_pid(sup)
        os_pid = await trellis.call("iso", "os_pid")
        assert await trellis.call("iso", ("add", 1)) == ("ok", 8)
        with capture_telemetry(["child.exited"]) as cap:
            with pytest.raises(trellis.Exited) as e:
                await trellis.call("iso", request_, timeout=10)
            exited = await cap.wait_for("child.exited", timeout=10)
        assert type(e.value.reason).__name__ == why, e.value.reason
        assert classify(exited["reason"]) == cls
        new = await _restarted(sup, old)
        assert await trellis.call(new, "get") == 7  # restarted: its state is the start's
        assert await trellis.call("iso", "os_pid") != os_pid
        assert not _alive(os_pid)
    finally:
        await sup.stop()


async def test_segfault_reason_names_the_signal() -> None:
    sup = await _start(trellis.Isolated(Counter, id="counter", name="iso"))
    try:
        with pytest.raises(trellis.Exited) as e:
            await trellis.call("iso", "segfault", timeout=10)
        assert isinstance(e.value.reason, trellis.Signaled)
        assert e.value.reason.signal == "SIGSEGV"
    finally:
        await sup.stop()


async def test_os_exit_code_is_the_reason() -> None:
    sup = await _start(trellis.Isolated(Counter, id="counter", name="iso"))
    try:
        with pytest.raises(trellis.Exited) as e:
            await trellis.call("iso", ("exit", 3), timeout=10)
        assert e.value.reason == trellis.ExitCode(3)
    finally:
        await sup.stop()


async def test_memory_rlimit_is_oom() -> None:
    limits = trellis.Limits(memory=400 * 1024 * 1024)
    sup = await _start(trellis.Isolated(Counter, id="counter", name="iso", limits=limits))
    try:
        assert await trellis.call("iso", ("alloc", 1)) == 1024 * 1024
        with capture_telemetry(["child.exited"]) as cap:
            with pytest.raises(trellis.Exited) as e:
                await trellis.call("iso", ("alloc", 2048), timeout=10)
            exited = await cap.wait_for("child.exited", timeout=10)
        assert isinstance(e.value.reason, trellis.LimitExceeded), e.value.reason
        assert classify(exited["reason"]) == "oom"
    finally:
        await sup.stop()


async def test_a_hung_interpreter_is_killed_as_hung() -> None:
    spec = trellis.Isolated(Counter, id="counter", name="iso", heartbeat=0.5)
    sup = await _start(spec)
    try:
        os_pid = await trellis.call("iso", "os_pid")
        started = time.monotonic()
        with pytest.raises(trellis.Exited) as e:
            await trellis.call("iso", "hang", timeout=30)
        assert isinstance(e.value.reason, trellis.Hung), e.value.reason
        assert classify(e.value.reason) == "hung"
        assert time.monotonic() - started < 10
        assert not _alive(os_pid)
    finally:
        await sup.stop()


async def test_a_caller_mid_call_gets_exited_at_once() -> None:
    sup = await _start(trellis.Isolated(Counter, id="counter", name="iso"))
    try:
        os_pid = await trellis.call("iso", "os_pid")
        slow = asyncio.ensure_future(trellis.call("iso", ("sleep", 30), timeout=60))
        await asyncio.sleep(0.2)
        assert not slow.done()
        t0 = time.monotonic()
        os.kill(os_pid, signal.SIGKILL)
        with pytest.raises(trellis.Exited) as e:
            await slow
        assert time.monotonic() - t0 < 2.0
        assert classify(e.value.reason) == "killed"
    finally:
        await sup.stop()


async def test_unsupported_values_are_a_clear_error_at_the_caller() -> None:
    sup = await _start(trellis.Isolated(Counter, 1, id="counter", name="iso"))
    try:
        old = await _child_pid(sup)
        with pytest.raises(trellis.UnsupportedMessage, match="cannot send this request"):
            await trellis.call("iso", ("echo", object()))
        with pytest.raises(trellis.UnsupportedMessage, match="set"):
            await trellis.call("iso", ("echo", {1, 2}))
        with pytest.raises(trellis.UnsupportedMessage, match="reply"):
            await trellis.call("iso", "unsendable_reply")
        with pytest.raises(trellis.UnsupportedMessage, match="not registered"):
            await trellis.call("iso", ("echo", _Unregistered("x")))
        assert await trellis.call("iso", "get") == 1  # nothing crashed
        assert await _child_pid(sup) is old
    finally:
        await sup.stop()


async def test_registered_structs_cross_as_their_class() -> None:
    sup = await _start(trellis.Isolated(Counter, id="counter", name="iso"))
    try:
        assert await trellis.call("iso", ("order", Order("BTC", 2))) == Order("BTC", 4)
    finally:
        await sup.stop()


async def test_pickle_is_an_explicit_opt_in() -> None:
    spec = trellis.Isolated(Counter, id="counter", name="iso", serializer="pickle")
    sup = await _start(spec)
    try:
        got = await trellis.call("iso", ("plain", Plain(1)))
        assert isinstance(got, Plain)
        assert got.x == 2
    finally:
        await sup.stop()


async def test_init_failure_is_a_start_error() -> None:
    with pytest.raises(trellis.StartError) as e:
        await _start(trellis.Isolated(FailsInit, id="bad"), intensity=0)
    assert "no config" in str(e.value)


def test_spec_errors_name_what_is_wrong() -> None:
    class Local(trellis.Server):
        pass

    with pytest.raises(trellis.InvalidChildSpec, match="importable"):
        trellis.Isolated(Local, id="x")
    with pytest.raises(trellis.InvalidChildSpec, match="'/'"):
        trellis.Isolated(Counter, id="a/b")
    with pytest.raises(trellis.InvalidChildSpec, match="serializer"):
        trellis.Isolated(Counter, id="x", serializer="json")
    with pytest.raises(trellis.InvalidChildSpec, match="arguments cannot be sent"):
        trellis.Isolated(Counter, object(), id="x")
    with pytest.raises(trellis.InvalidChildSpec, match="module:Class"):
        trellis.Isolated("nocolon", id="x")


import msgspec  # noqa: E402


class _Unregistered(msgspec.Struct):
    name: str


def test_tree_file_isolated_child(tmp_path: Path) -> None:
    """``isolated = "module:Class"`` in a tree file: checked like a server child (import,
    subclass, init arguments), run in its own interpreter."""
    from trellis.config import ConfigError, loads

    good = loads(
        """
        [supervisor]
        name = "iso"
        [[supervisor.children]]
        id = "counter"
        isolated = "_isolated_servers:Counter"
        args = [5]
        name = "iso-counter"
        heartbeat = 2.0
        limits = { memory = "512MiB" }
        standby = false
        """
    )
    spec = good.child_spec()
    assert "isolated" in good.describe()
    assert good.children[0].args[0].standby is False

    async def run() -> None:
        sup = await trellis.Supervisor.start_link(*spec.args, **spec.kwargs)
        try:
            assert await trellis.call("iso-counter", "get") == 5
            assert await trellis.call("iso-counter", "os_pid") != os.getpid()
        finally:
            await sup.stop()

    asyncio.run(run())

    bad = """
        [supervisor]
        name = "iso"
        [[supervisor.children]]
        id = "a"
        isolated = "_isolated_servers:Plain"
        [[supervisor.children]]
        id = "b"
        isolated = "_isolated_servers:Counter"
        args = [1, 2, 3]
        [[supervisor.children]]
        id = "c"
        isolated = "_isolated_servers:Counter"
        serializer = "json"
        standby = "yes"
        [[supervisor.children]]
        id = "d"
        isolated = "no_such_module_xyz:Thing"
        """
    with pytest.raises(ConfigError) as e:
        loads(bad)
    text = str(e.value)
    assert ":6: supervisor.children[0].isolated: '_isolated_servers:Plain' is not a" in text
    assert "supervisor.children[1].args: arguments do not match Counter.init" in text
    assert "supervisor.children[2].serializer" in text
    assert "supervisor.children[2].standby" in text
    assert "supervisor.children[3].isolated: cannot import" in text


@pytest.mark.parametrize("when", ["as_it_is_accepted", "while_it_is_wrapped"])
async def test_a_holder_ending_as_its_interpreter_connects_leaves_no_open_socket(
    when: str, tmp_path: Path
) -> None:
    # The holder of an interpreter can end (a standby stopped, a kill) just as the
    # interpreter connects. asyncio's own unix server leaked such a connection: accepted,
    # then unable to attach to the closed server, its socket was never closed (seen as
    # "unclosed transport" at garbage collection). Here a connection arrives in the loop
    # iteration in which the holder is killed, or while it is being made a transport.
    import dataclasses
    import gc
    import socket
    import warnings

    from trellis._isolated._proxy import _Holder, _stop_holder

    stub = tmp_path / "python"  # an "interpreter" that never connects: we do, instead
    stub.write_text("#!/bin/sh\nexec sleep 60\n")
    stub.chmod(0o755)
    cfg = dataclasses.replace(
        trellis.Isolated(Counter, id="h", standby=False).args[0], python=str(stub)
    )
    hpid = await _Holder.start(cfg, None, None, None, False)
    holder = hpid._server
    assert holder.dir is not None
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(os.path.join(holder.dir, "s"))  # accepted in the next iteration
        if when == "while_it_is_wrapped":  # it ends between the accept and the wrap
            holder._accept()
            assert holder.accepting is not None
            holder._close_all()  # what the end of its task runs
        trellis.exit(hpid, trellis.KILL)
        await hpid.join(10)
        for _ in range(20):
            await asyncio.sleep(0)
        await _stop_holder(holder)  # reaps the stub it started
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", ResourceWarning)
            gc.collect()
        leaks = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
        assert leaks == []
        assert holder.accepting is None
        client.settimeout(5)
        try:  # the holder's end of it is closed, not left open
            assert client.recv(1) == b""
        except ConnectionResetError:
            pass
    finally:
        client.close()

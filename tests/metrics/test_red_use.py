"""RED per server (calls, errors, call duration), USE per OS child (CPU, RSS, open files,
threads) and event-loop lag: each scrape is parsed back with the Prometheus parser and
matched to what really happened (calls made, errors raised, memory allocated, files
opened, the loop blocked)."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import trellis
from trellis import _server
from trellis.metrics import Metrics
from trellis.sre._rules import CALL_ERRORS_TOTAL, CALLS_TOTAL
from trellis.testing import capture_telemetry, wait_restarted

Samples = Any  # conftest.Samples: one parsed scrape
Scrape = Callable[..., Awaitable[Samples]]


class Boom(Exception):
    """A handler's failure."""


class Echo(trellis.Server):
    """Answers calls: ``("sleep", s)`` after sleeping, ``"boom"`` raises (the server
    crashes), ``"defer"`` answers later on ``"answer"``, ``"stop"`` stops with a reply,
    ``"stop_silent"`` stops without one."""

    async def init(self) -> None:
        self.deferred: list[Any] = []

    async def handle_call(self, request: Any, caller: Any) -> Any:
        if request == "boom":
            raise Boom("boom")
        if type(request) is tuple and request[0] == "sleep":
            await asyncio.sleep(request[1])
            return "slept"
        if request == "defer":
            self.deferred.append(caller)
            return trellis.NoReply()
        if request == "answer":
            for c in self.deferred:
                c.reply("late answer")
            self.deferred.clear()
            return "answered"
        if request == "stop":
            return trellis.Stop(trellis.NORMAL, reply="bye")
        if request == "stop_silent":
            return trellis.Stop(trellis.NORMAL)
        return request


def red(s: Samples, child: str, sup: str = "red") -> tuple[float, float, float]:
    """calls, errors and the duration histogram's count of one child."""
    return (
        s.value("trellis_server_calls_total", supervisor=sup, child=child),
        s.value("trellis_server_call_errors_total", supervisor=sup, child=child),
        s.value("trellis_server_call_duration_seconds_count", supervisor=sup, child=child),
    )


async def test_red_counts_calls_errors_and_durations_across_restarts(
    metrics: Metrics, scrape: Scrape
) -> None:
    """N calls and K errors of every kind (a handler that raises, a caller that timed
    out before the reply, a server stopped without replying, a deferred call left
    unanswered, calls still queued when the server died) are counted per child across
    its restarts; the histogram counts every call and buckets a 30 ms call right."""
    sup = await trellis.Supervisor.start_link(
        [Echo.child_spec(id="echo", name="echo")], name="red", intensity=100, period=5.0
    )
    metrics.track(sup)
    try:
        calls = errors = 0
        for i in range(20):  # successes
            assert await trellis.call("echo", i) == i
        calls += 20
        for _ in range(3):  # the handler raises: the caller gets Exited, the server restarts
            old = trellis.whereis("echo")
            with pytest.raises(trellis.Exited):
                await trellis.call("echo", "boom")
            await wait_restarted(sup, "echo", old)
        calls += 3
        errors += 3
        assert await trellis.call("echo", ("sleep", 0.03)) == "slept"  # one 30 ms call
        calls += 1
        with pytest.raises(trellis.CallTimeout):  # the reply comes after the caller left
            await trellis.call("echo", ("sleep", 0.2), timeout=0.05)
        assert await trellis.call("echo", "after") == "after"  # queued behind it
        calls += 2
        errors += 1
        # a deferred call answered later: a success for both
        waiting = asyncio.ensure_future(trellis.call("echo", "defer"))
        await asyncio.sleep(0.01)
        assert await trellis.call("echo", "answer") == "answered"
        assert await waiting == "late answer"
        calls += 2
        # Stop with a reply is a success; the server restarts (permanent)
        old = trellis.whereis("echo")
        assert await trellis.call("echo", "stop") == "bye"
        await wait_restarted(sup, "echo", old)
        calls += 1
        # a deferred call and two queued calls die with the server: three errors,
        # and the crashing call itself is a fourth
        old = trellis.whereis("echo")
        pending = [asyncio.ensure_future(trellis.call("echo", "defer"))]
        await asyncio.sleep(0.01)
        pending += [asyncio.ensure_future(trellis.call("echo", r)) for r in ("boom", 1, 2)]
        done = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(r, trellis.Exited) for r in done), done
        await wait_restarted(sup, "echo", old)
        calls += 4
        errors += 4
        # killed mid-call (a stop request while the call sleeps): one more error
        old = trellis.whereis("echo")
        slow = asyncio.ensure_future(trellis.call("echo", ("sleep", 5.0)))
        await asyncio.sleep(0.01)
        trellis.exit(old, trellis.KILL)
        with pytest.raises(trellis.Exited):
            await slow
        await wait_restarted(sup, "echo", old)
        calls += 1
        errors += 1

        s = await scrape(metrics)
        assert red(s, "echo") == (calls, errors, calls)
        assert s.types["trellis_server_calls"] == "counter"
        assert s.types["trellis_server_call_duration_seconds"] == "histogram"
        bucket = "trellis_server_call_duration_seconds_bucket"
        lb = {"supervisor": "red", "child": "echo"}
        # at least 25 ms each, however loaded the machine: the 30 ms call, the late
        # 200 ms one and the call that waited behind it in the mailbox
        assert s.value(bucket, le="0.025", **lb) <= calls - 3
        assert s.value(bucket, le="+Inf", **lb) == calls
        assert s.value("trellis_server_call_duration_seconds_sum", **lb) >= 0.03 + 0.2
        # the supervisor's own calls (which_children) are not a child's
        assert s.select("trellis_server_calls_total", child="red") == []

        # counters never go back: a second scrape after more calls only adds
        for i in range(5):
            await trellis.call("echo", i)
        s2 = await scrape(metrics)
        assert red(s2, "echo") == (calls + 5, errors, calls + 5)
    finally:
        await trellis.stop(sup)


async def test_red_of_a_flapping_child_stays_small_between_scrapes(
    metrics: Metrics, scrape: Scrape
) -> None:
    """80 restarts with no scrape in between: the ended servers' counts are folded as
    the child restarts (the metrics keep a bounded list), and the totals are exact."""
    sup = await trellis.Supervisor.start_link(
        [Echo.child_spec(id="echo", name="echo")], name="red", intensity=1000, period=5.0
    )
    metrics.track(sup)
    try:
        for _ in range(80):
            old = trellis.whereis("echo")
            assert await trellis.call("echo", 1) == 1
            with pytest.raises(trellis.Exited):
                await trellis.call("echo", "boom")
            await wait_restarted(sup, "echo", old)
        red_of_child = metrics._children["red", "echo"].red
        assert red_of_child is not None
        assert len(red_of_child.live) <= 33
        s = await scrape(metrics)
        assert red(s, "echo") == (160, 80, 160)
    finally:
        await trellis.stop(sup)


async def test_red_sums_dynamic_children_sharing_an_id(metrics: Metrics, scrape: Scrape) -> None:
    """Children of a DynamicSupervisor started from one spec share one label set: their
    calls are summed (and a child that ended keeps its calls counted)."""
    dyn = await trellis.DynamicSupervisor.start_link(name="red")
    metrics.track(dyn)
    try:
        pids = [
            await dyn.start_child(Echo.child_spec(id="w", restart="temporary")) for _ in range(3)
        ]
        for n, pid in enumerate(pids, start=1):
            for i in range(n * 4):
                await trellis.call(pid, i)
        await trellis.stop(pids[0])  # ended: its 4 calls stay counted
        with pytest.raises(trellis.Exited):
            await trellis.call(pids[1], "boom")
        s = await scrape(metrics)
        assert red(s, "w") == (4 + 8 + 1 + 12, 1, 4 + 8 + 1 + 12)
    finally:
        await trellis.stop(dyn)


async def test_red_names_match_the_slo_rules(metrics: Metrics, scrape: Scrape) -> None:
    """The series a ``sli = "calls"`` SLO's rules read exist, with the labels the rules
    match on (supervisor, child)."""
    sup = await trellis.Supervisor.start_link([Echo.child_spec(id="api", name="api")], name="red")
    metrics.track(sup)
    try:
        await trellis.call("api", 1)
        s = await scrape(metrics)
        for name in (CALLS_TOTAL, CALL_ERRORS_TOTAL):
            rows = s.select(name, supervisor="red", child="api")
            assert len(rows) == 1, (name, s.text)
            assert set(rows[0][0]) == {"node", "supervisor", "child"}
        assert s.value(CALLS_TOTAL, supervisor="red", child="api") == 1
        assert s.value(CALL_ERRORS_TOTAL, supervisor="red", child="api") == 0
    finally:
        await trellis.stop(sup)


async def test_servers_count_nothing_without_an_observer() -> None:
    """With no metrics attached a server keeps no call counts (the call path pays one
    check); with one attached, servers started from then on count."""
    pid = await Echo.start()
    try:
        await trellis.call(pid, 1)
        assert _server.call_stats(pid) is None
    finally:
        await trellis.stop(pid)
    m = Metrics(node="x").attach()
    try:
        pid = await Echo.start()
        await trellis.call(pid, 1)
        st = _server.call_stats(pid)
        assert st is not None
        assert (st.calls, st.errors) == (1, 0)
        await trellis.stop(pid)
    finally:
        m.detach()
    pid = await Echo.start()
    assert _server.call_stats(pid) is None
    await trellis.stop(pid)


# ---------------------------------------------------------------------------
# USE per OS child
# ---------------------------------------------------------------------------

HOG = r"""
import os, sys, threading, time
out = sys.argv[1]
def rss():
    with open("/proc/self/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[21]) * os.sysconf("SC_PAGE_SIZE")
fds0 = len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor is not ours
rss0 = rss()
blob = bytes(range(256)) * (64 * 1024 * 1024 // 256)  # 64 MiB, every page written
files = [open(os.devnull, "rb") for _ in range(7)]
stop = threading.Event()
threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(3)]
for t in threads:
    t.start()
t0 = time.process_time()
while time.process_time() - t0 < 0.3:
    pass
with open(out + ".tmp", "w") as f:
    f.write(f"{fds0} {rss0}")
os.rename(out + ".tmp", out)
print("ready", flush=True)
time.sleep(60)
"""


async def test_use_of_an_os_child_matches_what_it_did(
    tmp_path: Any, metrics: Metrics, scrape: Scrape
) -> None:
    """A real OS child that allocates and touches 64 MiB, opens 7 files, starts 3
    threads and burns 0.3 s of CPU shows exactly that in the trellis_process_* series
    (RSS within its baseline + 64 MiB and a margin, open fds its baseline + 7, 4
    threads, at least 0.3 CPU seconds); an in-process child has none."""
    import sys

    baseline = tmp_path / "baseline"
    hog = trellis.Command(
        [sys.executable, "-c", HOG, str(baseline)], id="hog", ready=trellis.Ready.log("^ready$")
    )
    sup = await trellis.Supervisor.start_link([hog, Echo.child_spec(id="echo")], name="use")
    metrics.track(sup)
    try:
        fds0, rss0 = (int(x) for x in baseline.read_text().split())
        s = await scrape(metrics)
        lb = {"supervisor": "use", "child": "hog"}
        mib = 1024 * 1024
        rss = s.value("trellis_process_resident_memory_bytes", **lb)
        assert rss0 + 63 * mib <= rss <= rss0 + 96 * mib, (rss0, rss)
        assert s.value("trellis_process_open_fds", **lb) == fds0 + 7
        assert s.value("trellis_process_threads", **lb) == 4
        assert 0.3 <= s.value("trellis_process_cpu_seconds_total", **lb) < 30
        assert s.types["trellis_process_cpu_seconds"] == "counter"
        assert s.types["trellis_process_resident_memory_bytes"] == "gauge"
        for name in ("trellis_process_resident_memory_bytes", "trellis_process_open_fds"):
            assert s.select(name, child="echo") == []  # not an OS process
    finally:
        await trellis.stop(sup)
    s = await scrape(metrics)  # the child is gone: its gauges are gone
    assert s.select("trellis_process_resident_memory_bytes", child="hog") == []


async def test_process_usage_events_while_the_tree_runs(tmp_path: Any) -> None:
    """As a ``trellis.run`` extension, Metrics emits ``process.usage`` for each OS
    child every ``usage_interval`` seconds, with the same figures as /proc, and
    ``server.calls`` for each server that took calls since the last one (RED as
    journaled telemetry: totals and the interval's share)."""
    import sys

    baseline = tmp_path / "baseline"
    hog = trellis.Command(
        [sys.executable, "-c", HOG, str(baseline)], id="hog", ready=trellis.Ready.log("^ready$")
    )
    api = Echo.child_spec(id="api", name="api")
    m = Metrics(node="n", usage_interval=0.2)
    with capture_telemetry(["process.usage", "server.calls"]) as cap:
        await m.start()
        sup = await trellis.Supervisor.start_link([hog, api], name="use", intensity=10)
        try:
            await m.tree_started(sup, lambda: None)
            for i in range(7):
                await trellis.call("api", i)
            old = trellis.whereis("api")
            with pytest.raises(trellis.Exited):
                await trellis.call("api", "boom")
            await wait_restarted(sup, "api", old)
            red = await cap.wait_for("server.calls", timeout=5.0, calls=8)
            first = await cap.wait_for("process.usage", timeout=5.0)
            i = next(k for k, e in enumerate(cap.events) if e is first)
            second = await cap.wait_for("process.usage", timeout=5.0, after=i + 1)
            quiet = len(cap.named("server.calls"))
            await asyncio.sleep(0.5)  # no calls: no more server.calls
            assert len(cap.named("server.calls")) == quiet
            await trellis.call("api", "again")
            again = await cap.wait_for("server.calls", timeout=5.0, calls=9)
        finally:
            await trellis.stop(sup)
            await m.stop()
    fds0, rss0 = (int(x) for x in baseline.read_text().split())
    assert first["path"] == "use/hog"
    assert (first["supervisor"], first["child_id"]) == ("use", "hog")
    assert first["os_pid"] > 0
    assert first["open_fds"] == fds0 + 7
    assert first["threads"] == 4
    assert first["rss_bytes"] >= rss0 + 63 * 1024 * 1024
    assert second["cpu_seconds"] >= first["cpu_seconds"] >= 0.3
    assert red["path"] == "use/api"
    assert (red["supervisor"], red["child_id"]) == ("use", "api")
    assert red["errors"] == 1
    assert (again["interval_calls"], again["interval_errors"]) == (1, 0)
    assert again["interval_mean_duration"] is not None
    assert 0 <= again["interval_mean_duration"] < 1
    assert all(e["child_id"] == "api" for e in cap.named("server.calls"))  # hog: no server
    n = len(cap.events)
    await asyncio.sleep(0.5)  # stopped: no more samples
    assert len(cap.events) == n


def test_usage_interval_is_checked() -> None:
    with pytest.raises(ValueError, match="usage_interval"):
        Metrics(usage_interval=-1)
    with pytest.raises(ValueError, match="usage_interval"):
        Metrics(usage_interval="10")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Event-loop lag
# ---------------------------------------------------------------------------

LAG_PROGRAM = r"""
import asyncio, json, os, signal, sys, time
import trellis, trellis._run
from trellis.journal import Journal, tail
from trellis.metrics import Metrics
from trellis.testing import capture_telemetry

trellis._run.BLOCKED_PER_MINUTE = 3  # so that the test sees the rate limit at work
metrics = Metrics(node="test-node", usage_interval=0.2)
url = "sqlite:///" + sys.argv[2]
out = {}

def hold_the_loop(seconds):
    time.sleep(seconds)  # blocks the event loop on purpose

async def blocker():
    await asyncio.sleep(0.3)
    hold_the_loop(0.3)
    for _ in range(3):
        await asyncio.sleep(0.15)
        hold_the_loop(0.25)
    await asyncio.sleep(0.3)  # the last loop.blocked is emitted on the loop
    body, _ = await metrics.render()
    out["body"] = body.decode()
    os.kill(os.getpid(), signal.SIGTERM)

children = [
    trellis.worker("w", blocker, restart="temporary"),
    trellis.Command(["sleep", "30"], id="sleeper"),
]
with capture_telemetry(["loop.blocked"]) as cap:
    code = trellis.run(
        lambda: trellis.Supervisor.start_link(children, name="lag"),
        extensions=[metrics, Journal(url, node="test-node")],
        lag_threshold=0.1,
        loop=sys.argv[3],
    )
out["events"] = cap.named("loop.blocked")
out["code"] = code
out["journal"] = [r["kind"] for r in tail(url, n=10000)]
out["usage"] = [
    {**r["data"], "path": r["path"]} for r in tail(url, n=10000) if r["kind"] == "process.usage"
]
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""

LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None, reason="needs uvloop: pip install uvloop"
        ),
    ),
]


@pytest.mark.parametrize("loop", LOOPS)
def test_loop_lag_and_a_deliberate_block(tmp_path: Any, loop: str) -> None:
    """A task that blocks the loop for 300 ms under trellis.run yields a loop.blocked
    event with its duration and a stack naming the blocking function; three more blocks
    are counted by trellis_event_loop_blocked_total but rate-limited as events (here 3 a
    minute); the lag histogram has seen samples over the threshold. (A machine so
    loaded that the process itself stalls past the threshold adds blocks: the bounds
    allow for it.) loop.blocked and the OS child's process.usage events are in the
    journal. On both event loops."""
    import json
    import subprocess
    import sys

    prog = tmp_path / "lag.py"
    prog.write_text(LAG_PROGRAM)
    result = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(prog), str(result), str(tmp_path / "j.db"), loop],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(result.read_text())
    assert out["code"] == 0
    events = out["events"]
    assert len(events) == 3, events  # 4 blocks (or more), 3 a minute
    (first, *_) = [e for e in events if "in hold_the_loop" in e["stack"]]
    assert 0.1 <= first["duration"] < 10
    assert first["threshold"] == 0.1
    assert "in hold_the_loop" in first["stack"], first["stack"]
    assert "time.sleep(seconds)" in first["stack"]
    assert "in blocker" in first["stack"]
    assert events[0]["suppressed"] == 0
    assert "<Pid" in first["task"]  # the Trellis process that blocked it
    assert "event loop blocked for" in proc.stderr  # and logged with its stack
    types = {}
    values = {}
    for fam in text_string_to_metric_families(out["body"]):
        types[fam.name] = fam.type
        for x in fam.samples:
            if x.name.startswith("trellis_event_loop"):
                assert x.labels.pop("node") == "test-node"
                values[x.name, x.labels.get("le")] = x.value
    assert types["trellis_event_loop_lag_seconds"] == "histogram"
    assert values["trellis_event_loop_blocked_total", None] >= 4
    count = values["trellis_event_loop_lag_seconds_count", None]
    assert count >= 5  # sampled continuously, not only when blocked
    assert values["trellis_event_loop_lag_seconds_bucket", "0.1"] <= count - 4
    assert values["trellis_event_loop_lag_seconds_sum", None] >= 0.4
    assert out["journal"].count("loop.blocked") == 3
    usage = out["usage"]
    assert usage, out["journal"]
    assert all(u["path"] == "lag/sleeper" and u["threads"] == 1 for u in usage), usage
    assert all(u["rss_bytes"] > 0 and u["open_fds"] >= 3 for u in usage), usage


NO_LAG_PROGRAM = r"""
import asyncio, sys, time
import trellis
from trellis.testing import capture_telemetry

async def blocker():
    await asyncio.sleep(0.2)
    time.sleep(1.0)  # well past blocked_warning (0.3 s)
    await asyncio.sleep(0.1)

with capture_telemetry(["loop.blocked"]) as cap:
    code = trellis.run(
        trellis.worker("w", blocker, restart="temporary"), lag_threshold=None, blocked_warning=0.3
    )
print("events", len(cap.events), "code", code)
"""


IDLE_PROGRAM = r"""
import asyncio, socket, sys, threading, time
import trellis, trellis._run
from trellis.testing import capture_telemetry

def hold_the_loop(seconds):
    time.sleep(seconds)  # blocks the event loop on purpose

async def read_then_block(a, b):
    # no timer is due: only the I/O wakes the loop (and must wake the watchdog)
    threading.Timer(0.5, b.send, (b"x",)).start()
    await asyncio.get_running_loop().sock_recv(a, 1)
    hold_the_loop(float(sys.argv[3]))

async def idle():
    print("up", flush=True)
    await asyncio.sleep(float(sys.argv[2]))
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        await read_then_block(a, b)
    await asyncio.sleep(0)  # the ping that was late runs: loop.blocked
    lag = trellis._run.loop_lag(asyncio.get_running_loop())
    print("samples", sum(lag.counts), "blocked", lag.blocked, flush=True)

with capture_telemetry(["loop.blocked"]) as cap:
    code = trellis.run(trellis.worker("w", idle, restart="temporary"), loop=sys.argv[1])
for e in cap.named("loop.blocked"):
    print("stack", "in read_then_block" in e["stack"] and "in hold_the_loop" in e["stack"])
sys.exit(code)
"""


def _wakeups(pid: int) -> tuple[int, int]:
    """How many times the process's main thread and its other threads were scheduled."""
    import os

    main = others = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            count = int(f.read().split()[2])
        if int(tid) == pid:
            main += count
        else:
            others += count
    return main, others


@pytest.mark.parametrize("loop", LOOPS)
def test_the_lag_monitor_lets_an_idle_loop_sleep(tmp_path: Any, loop: str) -> None:
    """While the tree is idle the monitor does not wake the loop: over 2 s the loop's
    thread is scheduled a few times at most (a timer every 100 ms, as the monitor once
    had, makes it 20), and the lag histogram still counts samples (zero lag) for the time
    the loop waited. On asyncio the watchdog sleeps with the loop too (the loop wakes it);
    on uvloop it looks every 100 ms. When I/O then wakes the loop (no timer due) and a
    callback blocks it for 0.3 s, the block is reported with its stack."""
    import os
    import subprocess
    import sys
    import time

    block = 0.3
    if not os.path.exists(f"/proc/self/task/{os.getpid()}/schedstat"):
        pytest.skip("needs /proc/PID/task/TID/schedstat (Linux with schedstats)")
    prog = tmp_path / "idle.py"
    prog.write_text(IDLE_PROGRAM)
    proc = subprocess.Popen(
        [sys.executable, str(prog), loop, "4", str(block)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "up"
        time.sleep(1.0)  # the start is over, and the watchdog has seen the loop wait
        main0, others0 = _wakeups(proc.pid)
        time.sleep(2.0)
        main1, others1 = _wakeups(proc.pid)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    assert proc.returncode == 0, err
    assert main1 - main0 <= 4, (main1 - main0, others1 - others0)
    if loop == "asyncio":  # on uvloop the watchdog looks 10 times a second
        assert others1 - others0 <= 4, (main1 - main0, others1 - others0)
    words = out.split()
    samples, blocked = int(words[1]), int(words[3])
    assert samples >= 10, out  # about 40: one per 100 ms
    assert blocked == 1, err  # then woke with the loop, which I/O woke, and caught the block
    assert words[4:] == ["stack", "True"], err


def test_no_lag_monitor_keeps_the_blocked_warning(tmp_path: Any) -> None:
    """``lag_threshold=None``: no loop.blocked events (and the watchdog wakes rarely),
    but a block past ``blocked_warning`` is still logged with its stack."""
    import subprocess
    import sys

    prog = tmp_path / "nolag.py"
    prog.write_text(NO_LAG_PROGRAM)
    proc = subprocess.run([sys.executable, str(prog)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "events 0 code 0" in proc.stdout
    assert "event loop blocked for over 0.3s" in proc.stderr
    assert "time.sleep(1.0)" in proc.stderr


def test_lag_threshold_is_checked() -> None:
    with pytest.raises(ValueError, match="lag_threshold"):
        trellis.run(trellis.worker("w", asyncio.sleep, 0), lag_threshold=0)
    with pytest.raises(TypeError, match="lag_threshold"):
        trellis.run(trellis.worker("w", asyncio.sleep, 0), lag_threshold="1")  # type: ignore[arg-type]


C_BLOCK_PROGRAM = r"""
import asyncio, sys, time
import trellis
from trellis.testing import capture_telemetry

calls = 0

async def job():
    loop = asyncio.get_running_loop()
    if sys.argv[1] == "asyncio":  # another library's wrapper on the loop instance
        orig = loop._process_events
        def counting(event_list):
            global calls
            calls += 1
            return orig(event_list)
        loop._process_events = counting
    await asyncio.sleep(1.0)  # idle: the watchdog sleeps with the loop
    loop.call_later(0.2, time.sleep, 0.4)  # a blocking callback with no Python frame
    await asyncio.sleep(1.5)
    if sys.argv[1] == "asyncio":
        mid = calls
        await asyncio.sleep(0.5)
        kept = loop._process_events is counting and calls > mid
        print("wrapper", kept, flush=True)

with capture_telemetry(["loop.blocked"]) as cap:
    code = trellis.run(trellis.worker("w", job, restart="temporary"), loop=sys.argv[1])
print("blocked", len(cap.named("loop.blocked")), "code", code, flush=True)
"""


@pytest.mark.parametrize("loop", LOOPS)
def test_a_block_in_a_c_callback_is_reported_and_a_loop_wrapper_is_kept(
    tmp_path: Any, loop: str
) -> None:
    """A callback with no Python frame of its own (``call_later(0.2, time.sleep, 0.4)``)
    blocks the loop after it has been idle: it is reported on both loops (on uvloop the
    driver frame alone on top is not taken for a wait unless the thread is in epoll).
    On asyncio a wrapper another library put on the loop's ``_process_events`` keeps
    running after the watchdog has slept with the loop."""
    import subprocess
    import sys

    prog = tmp_path / "cblock.py"
    prog.write_text(C_BLOCK_PROGRAM)
    proc = subprocess.run(
        [sys.executable, str(prog), loop], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "blocked 1 code 0" in proc.stdout, proc.stdout + proc.stderr
    if loop == "asyncio":
        assert "wrapper True" in proc.stdout, proc.stdout

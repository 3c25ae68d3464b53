"""Cluster membership and fenced singletons: three ``trellis run`` nodes as separate OS
processes on a throwaway ``nats-server -js``, lease TTL 1 s.

The singleton is an OS child that appends ``start NODE TOKEN PID`` to a file and
sleeps; the tests read that file and /proc to see which copies run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("nats", reason="needs nats-py: pip install 'trellis-otp[cluster]'")

from _nats_nodes import (
    TTL,
    LoopThread,
    NatsServer,
    Node,
    alive,
    locals_,
    running,
    starts,
    tree_file,
    wait_for,
)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        node.stop()
    for _, _, pid in starts(tmp_path):
        assert not alive(pid), f"singleton copy {pid} outlived its node"


def _start(tmp: Path, url: str, names: str, nodes: list[Node], **kw: bool) -> list[Node]:
    tree = tree_file(tmp)
    new = [Node(tmp, tree, url, name, **kw) for name in names]
    nodes.extend(new)
    return new


def _holder(tmp: Path, timeout: float = 20.0) -> tuple[str, int, int]:
    [held] = wait_for(lambda: running(tmp), timeout, "the singleton to start")[:1]
    return held


def _cluster_nodes(url: str) -> list[dict[str, object]]:
    args = ["cluster", "nodes", "--url", url, "--name", "demo", "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "trellis", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def _watch_exactly_once(tmp: Path, seconds: float) -> None:
    """Sample which copies run for ``seconds``: never two at once."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        now = running(tmp)
        assert len(now) <= 1, f"two copies of the singleton run at once: {now}"
        time.sleep(0.02)


def test_membership_and_exactly_one_singleton(
    tmp_path: Path, nats_server: NatsServer, nodes: list[Node]
) -> None:
    a, _b, _c = _start(tmp_path, nats_server.url, "abc", nodes, control=False)
    # every node joins; trellis cluster nodes lists all three, alive
    listed = wait_for(
        lambda: (
            (rows := _cluster_nodes(nats_server.url))
            and len([r for r in rows if r["alive"]]) == 3
            and rows
        ),
        20.0,
        "three live nodes in trellis cluster nodes",
        step=0.3,
    )
    assert sorted(r["node"] for r in listed) == ["a", "b", "c"]
    node, token, _pid = _holder(tmp_path)
    _watch_exactly_once(tmp_path, 3 * TTL)
    assert len(running(tmp_path)) == 1
    assert [s[:2] for s in starts(tmp_path)] == [(node, token)], "it never moved while nodes live"
    # the holder says so in its heartbeat
    rows = wait_for(
        lambda: [r for r in _cluster_nodes(nats_server.url) if r["runs"]], 10.0, "runs", step=0.3
    )
    assert [(r["node"], r["runs"]) for r in rows] == [(node, ["demo.leader"])]
    # every node runs its node-scope child
    wait_for(lambda: len(locals_(tmp_path)) == 3, 10.0, "three node-scope children")
    assert a.proc.poll() is None


def test_control_api_shows_the_cluster(
    tmp_path: Path, nats_server: NatsServer, nodes: list[Node]
) -> None:
    [a] = _start(tmp_path, nats_server.url, "a", nodes, control=True)
    _start(tmp_path, nats_server.url, "b", nodes)
    assert a.sock is not None
    sock = a.sock

    def view() -> dict[str, object] | None:
        if not os.path.exists(sock):
            return None
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=sock)) as client:
                r = client.get("http://trellis/v1/cluster", timeout=2)
        except httpx.HTTPError:
            return None
        body = r.json() if r.status_code == 200 else None
        if body and len([n for n in body["nodes"] if n["alive"]]) == 2 and running(tmp_path):
            return dict(body)
        return None

    body = wait_for(view, 20.0, "GET /v1/cluster to list two live nodes", step=0.2)
    assert body["cluster"] == "demo"
    assert body["node"] == "a"
    assert body["connected"] is True
    assert sorted(n["node"] for n in body["nodes"]) == ["a", "b"]
    assert [lease["key"] for lease in body["leases"]] == ["demo.leader"]


def test_kill_9_of_the_holder_fails_over_within_ttl_plus_half_a_second(
    tmp_path: Path, nats_server: NatsServer, nodes: list[Node]
) -> None:
    by_name = {n.name: n for n in _start(tmp_path, nats_server.url, "abc", nodes)}
    old_node, old_token, old_pid = _holder(tmp_path)
    time.sleep(2 * TTL)  # every node has seen the holder renew
    killed_at = time.monotonic()
    by_name[old_node].signal(signal.SIGKILL)
    new = wait_for(
        lambda: [s for s in starts(tmp_path) if s[1] > old_token],
        10 * TTL,
        "another node to take the singleton over",
        step=0.005,
    )
    failover = time.monotonic() - killed_at
    new_node, new_token, _ = new[0]
    print(f"failover after kill -9: {failover:.3f}s (TTL {TTL}s)")
    assert new_node != old_node
    assert new_token > old_token
    assert failover <= TTL + 0.5, f"failover took {failover:.3f}s"
    assert not alive(old_pid), "the dead node's child outlived it"
    _watch_exactly_once(tmp_path, 1.0)
    assert len(running(tmp_path)) == 1


def test_a_frozen_holder_kills_its_child_as_soon_as_it_runs_again(
    tmp_path: Path, nats_server: NatsServer, nodes: list[Node]
) -> None:
    by_name = {n.name: n for n in _start(tmp_path, nats_server.url, "abc", nodes)}
    old_node, old_token, old_pid = _holder(tmp_path)
    time.sleep(TTL)
    holder = by_name[old_node]
    holder.signal(signal.SIGSTOP)
    try:
        time.sleep(3 * TTL)
        taken = [s for s in starts(tmp_path) if s[1] > old_token]
        assert taken, "nobody took over from the frozen holder"
        assert taken[0][0] != old_node
    finally:
        resumed_at = time.monotonic()
        holder.signal(signal.SIGCONT)
    wait_for(lambda: not alive(old_pid), 5.0, "the frozen holder's child to die", step=0.005)
    gone_after = time.monotonic() - resumed_at
    print(f"old child gone {gone_after:.3f}s after SIGCONT")
    assert gone_after <= 1.0
    _watch_exactly_once(tmp_path, 1.0)
    [(node, token, _)] = running(tmp_path)
    assert token > old_token
    assert node != old_node
    assert holder.proc.poll() is None, "the node itself keeps running"


def test_a_holder_cut_off_from_nats_stops_its_child_before_the_ttl(
    tmp_path: Path, nats_server: NatsServer, nodes: list[Node]
) -> None:
    from trellis.chaos import ChaosProxy

    lt = LoopThread()
    proxy = lt.run(ChaosProxy(("127.0.0.1", nats_server.port)).start())
    try:
        # a joins through the proxy and takes the lease first; b and c join directly
        _start(tmp_path, f"nats://127.0.0.1:{proxy.port}", "a", nodes)
        old_node, old_token, old_pid = _holder(tmp_path)
        assert old_node == "a"
        _start(tmp_path, nats_server.url, "bc", nodes)
        wait_for(lambda: len(locals_(tmp_path)) == 3, 20.0, "b and c to run")
        time.sleep(2 * TTL)
        cut_at = time.monotonic()
        lt.run(proxy.cut())
        stopped_after = started_after = None
        deadline = cut_at + 10.0
        while (stopped_after is None or started_after is None) and time.monotonic() < deadline:
            # the takeover is looked for first: one seen in the same poll as the death
            # counts as after it, one seen in an earlier poll as before it
            if started_after is None and [s for s in starts(tmp_path) if s[1] > old_token]:
                started_after = time.monotonic() - cut_at
            if stopped_after is None and not alive(old_pid):
                stopped_after = time.monotonic() - cut_at
            time.sleep(0.005)
        assert stopped_after is not None, "a's child never stopped"
        assert started_after is not None, "nobody took over"
        new = [s for s in starts(tmp_path) if s[1] > old_token]
        assert started_after >= stopped_after, (
            f"b or c started the singleton {started_after:.3f}s after the cut, "
            f"while a's child ran until {stopped_after:.3f}s"
        )
        print(f"cut: a's child stopped after {stopped_after:.3f}s, taken over {started_after:.3f}s")
        assert stopped_after < TTL, "the cut-off holder kept its child past the TTL"
        assert new[0][0] in ("b", "c")
        assert new[0][1] > old_token
        _watch_exactly_once(tmp_path, 1.0)
        assert alive(locals_(tmp_path)["a"]), "a's local child stays"
    finally:
        lt.run(proxy.close())
        lt.close()


def test_nats_down_leaves_node_scope_children_untouched(
    tmp_path: Path, nats_server: NatsServer, nodes: list[Node]
) -> None:
    _start(tmp_path, nats_server.url, "abc", nodes)
    _holder(tmp_path)
    local = wait_for(lambda: len(seen := locals_(tmp_path)) == 3 and seen, 20.0, "locals")
    time.sleep(TTL)
    nats_server.stop()
    down_until = time.monotonic() + 5.0
    while time.monotonic() < down_until:
        assert all(alive(pid) for pid in local.values()), "a node-scope child was touched"
        time.sleep(0.1)
    assert running(tmp_path) == [], "a singleton ran on past its lease while NATS was down"
    nats_server.start()
    _holder(tmp_path, timeout=10.0)
    _watch_exactly_once(tmp_path, 2 * TTL)
    assert len(running(tmp_path)) == 1, "the singleton resumes on exactly one node"
    assert locals_(tmp_path) == local
    assert all(alive(pid) for pid in local.values())


def _lease_events(tmp: Path, node: str) -> list[dict[str, object]]:
    from trellis.journal import tail

    url = f"sqlite:///{tmp}/journal-{node}.db"
    return [r["data"] for r in tail(url, n=0, since_seq=1) if r["kind"] == "cluster.lease"]


def test_a_stopped_holder_hands_over_at_once_and_the_journals_say_so(
    tmp_path: Path, nats_server: NatsServer, nodes: list[Node]
) -> None:
    by_name = {n.name: n for n in _start(tmp_path, nats_server.url, "ab", nodes)}
    old_node, old_token, old_pid = _holder(tmp_path)
    time.sleep(TTL)
    holder = by_name[old_node]
    holder.proc.terminate()  # trellis stop does the same
    wait_for(lambda: not alive(old_pid), 10.0, "the holder's child to stop", step=0.005)
    died_at = time.monotonic()
    new = wait_for(
        lambda: [s for s in starts(tmp_path) if s[1] > old_token], 10.0, "the handover", 0.005
    )
    handover = time.monotonic() - died_at
    print(f"graceful handover: {handover:.3f}s after the old child stopped")
    # without the release the other node would wait a whole TTL from the last renewal
    assert handover < 0.6 * TTL
    assert holder.proc.wait(15) == 0
    new_node, new_token, _ = new[0]
    assert new_node != old_node
    assert new_token > old_token
    old_events = _lease_events(tmp_path, old_node)
    assert [(e["action"], e["token"]) for e in old_events if e["action"] == "acquired"] == [
        ("acquired", old_token)
    ]
    released = [e for e in old_events if e["action"] == "released"]
    assert [(e["token"], e["handed_off"]) for e in released] == [(old_token, True)]
    wait_for(
        lambda: any(
            e["action"] == "acquired" and e["token"] == new_token
            for e in _lease_events(tmp_path, new_node)
        ),
        10.0,
        "the new holder's journal to record its acquire with the new token",
        step=0.2,
    )


def test_a_node_that_never_reaches_nats_runs_its_node_scope_children(
    tmp_path: Path, nodes: list[Node]
) -> None:
    from _nats_nodes import free_port

    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    [node] = _start(tmp_path, url, "a", nodes)
    wait_for(lambda: "a" in locals_(tmp_path), 20.0, "the node-scope child to start")
    time.sleep(3 * TTL)
    assert alive(locals_(tmp_path)["a"])
    assert starts(tmp_path) == [], "a singleton ran without a lease"
    assert node.proc.poll() is None, "the node gave up for want of NATS"

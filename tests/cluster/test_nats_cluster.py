"""On a three-server NATS cluster (buckets replicated 3 ways): the singleton survives
the loss of a NATS server without ever running twice, and still fails over when its
node dies."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _nats_nodes import (
    NATS,
    TTL,
    NatsCluster,
    Node,
    alive,
    running,
    starts,
    tree_file,
    wait_for,
)


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    if NATS is None:
        pytest.skip("needs nats-server with JetStream on PATH (apt install nats-server)")
    cluster = NatsCluster(tmp_path / "nats")
    cluster.start_all()
    try:
        yield cluster
    finally:
        cluster.stop()


def _fenced(tmp: Path, seconds: float) -> None:
    """Sample the copies for ``seconds``: never two at once. (Before new owners
    confirmed their compare-and-set, two contenders both won a takeover on this
    replicated stream now and then: see docs/design.md.)"""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        now = running(tmp)
        assert len(now) <= 1, f"two copies run at once: {now}"
        time.sleep(0.02)


def test_singleton_on_a_three_server_nats_cluster(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    tree = tree_file(tmp_path, extra="replicas = 3")
    nodes = {n: Node(tmp_path, tree, nats_cluster.url, n) for n in "abc"}
    try:
        # JetStream elects its meta leader first: the buckets appear once it has
        wait_for(lambda: running(tmp_path), 40.0, "the singleton to start", step=0.05)
        _fenced(tmp_path, 2 * TTL)
        # one NATS server dies: the replicated lease bucket keeps a quorum
        nats_cluster.kill(0)
        _fenced(tmp_path, 8.0)
        wait_for(lambda: len(running(tmp_path)) == 1, 20.0, "the singleton to run on")
        _fenced(tmp_path, 2 * TTL)
        # and its node dies: it fails over on the two remaining NATS servers
        holder, token, pid = running(tmp_path)[0]
        nodes[holder].signal(signal.SIGKILL)
        new = wait_for(
            lambda: [s for s in starts(tmp_path) if s[1] > token], 20.0, "a failover", 0.01
        )
        assert new[0][0] != holder
        assert not alive(pid)
        _fenced(tmp_path, TTL)
    finally:
        for node in nodes.values():
            node.stop()

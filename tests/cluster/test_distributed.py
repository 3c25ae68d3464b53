"""DistributedSupervisor: 30 children spread over three nodes (separate OS processes)
by rendezvous hashing, re-placed after a node is killed, never running twice."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _nats_nodes import NatsServer, alive

from trellis.cluster import Cluster, ClusterSettings, owner_of, start_child, which_children

NODE = Path(__file__).with_name("_dsup_node.py")


def _starts(tmp: Path) -> list[tuple[str, str, int, int]]:
    path = tmp / "dsup.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5:
            out.append((parts[1], parts[2], int(parts[3]), int(parts[4])))
    return out


def _running(tmp: Path) -> dict[str, list[tuple[str, int, int]]]:
    """id -> the copies running now: (node, token, pid)."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for node, cid, token, pid in _starts(tmp):
        if alive(pid):
            out.setdefault(cid, []).append((node, token, pid))
    return out


@pytest.fixture
async def three(
    nats_server: NatsServer, tmp_path: Path
) -> AsyncIterator[dict[str, subprocess.Popen[bytes]]]:
    procs = {}
    logs = []
    for name in "abc":
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115, ASYNC230
        logs.append(log)
        procs[name] = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, str(NODE), nats_server.url, name, str(tmp_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        try:
            for p in procs.values():
                try:
                    await asyncio.to_thread(p.wait, 20)
                except subprocess.TimeoutExpired:
                    p.kill()  # a node slow to stop must not outlive the test
                    await asyncio.to_thread(p.wait, 20)
                    raise
        finally:
            for log in logs:
                log.close()
        for _, _, _, pid in _starts(tmp_path):
            assert not alive(pid), "a child outlived its node"


async def _wait(check, timeout: float, what: str, step: float = 0.05):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(step)


async def test_thirty_children_spread_and_move_after_a_node_loss_without_duplicates(
    nats_server: NatsServer, tmp_path: Path, three: dict[str, subprocess.Popen[bytes]]
) -> None:
    cluster = Cluster(ClusterSettings(nats_server.url, node="client", name="d", lease_ttl=1.0))
    await cluster.start()
    try:
        # every node heartbeats and takes part before children are added
        await _wait(lambda: len(cluster.participants("workers")) == 3, 20.0, "three participants")
        ids = [f"job{i}" for i in range(30)]
        for cid in ids:
            await start_child("workers", "w", cid)

        expected = {cid: owner_of(cid, ["a", "b", "c"]) for cid in ids}

        def placed_once() -> bool:
            # a node whose view of the others is not complete yet may run an id that
            # is not its own for a moment: it hands it over, but never runs it twice
            now = _running(tmp_path)
            assert all(len(v) == 1 for v in now.values()), f"a child runs twice: {now}"
            return {cid: copies[0][0] for cid, copies in now.items()} == expected

        await _wait(placed_once, 20.0, "all 30 children to run once on their owners", 0.02)
        placed = {cid: copies[0][0] for cid, copies in _running(tmp_path).items()}
        spread = {n: sum(1 for v in placed.values() if v == n) for n in "abc"}
        print("spread:", spread)
        assert all(spread[n] >= 3 for n in "abc"), spread
        listed = await which_children("workers")
        assert listed == placed
        wanted = sorted(f"workers/{cid}" for cid in ids)

        def heartbeats_name_them() -> bool:  # heartbeats come every TTL/3
            return sorted(r for n in cluster.nodes() for r in n["runs"]) == wanted

        await _wait(heartbeats_name_them, 5.0, "each node's heartbeat to name what it runs")
        # kill -9 one node: its children move to the two others, the rest stay put
        before = {cid: copies[0][2] for cid, copies in _running(tmp_path).items()}
        three["b"].send_signal(signal.SIGKILL)
        lost = sorted(cid for cid, n in placed.items() if n == "b")

        def moved() -> bool:
            now = _running(tmp_path)
            assert all(len(v) == 1 for v in now.values()), f"a child runs twice: {now}"
            return sorted(now) == sorted(ids) and all(now[c][0][0] != "b" for c in lost)

        await _wait(moved, 20.0, "b's children to move", step=0.02)
        after = _running(tmp_path)
        for cid in ids:
            assert after[cid][0][0] == owner_of(cid, ["a", "c"])
            if placed[cid] != "b":
                assert after[cid][0][2] == before[cid], f"{cid} moved though its node lives"
    finally:
        await cluster.stop()

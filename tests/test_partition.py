"""PartitionSupervisor conformance (SPEC 89)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from typing import Any

import trellis


class Who(trellis.Server):
    """Replies to any call with its own pid."""

    async def handle_call(self, request: Any, caller: Any) -> Any:
        return self.pid


async def stop_quietly(*pids: Any) -> None:
    for pid in pids:
        if pid is None or not pid.alive:
            continue
        try:
            if hasattr(pid, "stop"):
                await pid.stop()
            else:
                await trellis.stop(pid)
        except trellis.NoProc:
            pass


async def partition_map(sup: Any) -> dict[Any, trellis.Pid]:
    return {i.id: i.pid for i in await sup.which_children()}


async def test_partitions_have_ids_0_to_n_minus_1() -> None:
    """SPEC 89: PartitionSupervisor starts `partitions` children with ids 0..n-1, each a
    distinct live process."""
    sup = await trellis.PartitionSupervisor.start_link(Who.child_spec(), partitions=5)
    try:
        parts = await partition_map(sup)
        assert sorted(parts) == [0, 1, 2, 3, 4]
        assert len(set(parts.values())) == 5
        assert all(isinstance(p, trellis.Pid) and p.alive for p in parts.values())
    finally:
        await stop_quietly(sup)


async def test_default_partitions_is_cpu_count() -> None:
    """SPEC 89: by default there is one partition per CPU (os.cpu_count())."""
    sup = await trellis.PartitionSupervisor.start_link(Who.child_spec())
    try:
        n = os.cpu_count() or 1
        assert sorted(await partition_map(sup)) == list(range(n))
    finally:
        await stop_quietly(sup)


async def test_int_keys_route_by_abs_mod_n() -> None:
    """SPEC 89: Via(name, key) with an int key reaches partition abs(key) % n (whereis and
    call agree)."""
    n = 4
    sup = await trellis.PartitionSupervisor.start_link(
        Who.child_spec(), partitions=n, name="test_partition_ints"
    )
    try:
        parts = await partition_map(sup)
        for key in (0, 1, 3, 4, 7, 10**12 + 2, -1, -6, -13):
            via = trellis.Via("test_partition_ints", key)
            expected = parts[abs(key) % n]
            assert trellis.whereis(via) == expected, key
            assert await trellis.call(via, "who") == expected, key
    finally:
        await stop_quietly(sup)


async def test_other_keys_route_deterministically_in_range() -> None:
    """SPEC 89: non-int keys are routed by a hash: always to the same existing partition, and
    spread over more than one partition."""
    n = 8
    sup = await trellis.PartitionSupervisor.start_link(
        Who.child_spec(), partitions=n, name="test_partition_terms"
    )
    try:
        parts = await partition_map(sup)
        by_pid = {pid: pid_id for pid_id, pid in parts.items()}
        hit: set[int] = set()
        for key in ["a", "b", "user:42", ("t", 1), "", 1.5, b"bytes"] + [
            f"k{i}" for i in range(40)
        ]:
            via = trellis.Via("test_partition_terms", key)
            pid = trellis.whereis(via)
            assert pid in by_pid, key
            assert trellis.whereis(via) == pid
            assert await trellis.call(via, "who") == pid
            hit.add(by_pid[pid])
        assert len(hit) > 1
    finally:
        await stop_quietly(sup)


_ROUTE_SCRIPT = textwrap.dedent(
    """
    import asyncio, trellis

    class Who(trellis.Server):
        async def handle_call(self, request, caller):
            return self.pid

    async def main():
        sup = await trellis.PartitionSupervisor.start_link(
            Who.child_spec(), partitions=16, name="parts")
        ids = {i.pid: i.id for i in await sup.which_children()}
        keys = ["alpha", "beta", "user:42", ("t", 1), "", "zeta", ("x", "y", 3)]
        print([ids[trellis.whereis(trellis.Via("parts", k))] for k in keys])
        await sup.stop()

    asyncio.run(main())
    """
)


def _route_in_subprocess(hash_seed: str) -> str:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    out = subprocess.run(
        [sys.executable, "-c", _ROUTE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


async def test_non_int_routing_is_stable_across_interpreters() -> None:
    """SPEC 89: the hash used for non-int keys is stable (like phash2): interpreters with
    different PYTHONHASHSEED route the same keys to the same partitions."""
    loop = asyncio.get_running_loop()
    first, second = await asyncio.gather(
        loop.run_in_executor(None, _route_in_subprocess, "1"),
        loop.run_in_executor(None, _route_in_subprocess, "2"),
    )
    assert first
    assert first == second

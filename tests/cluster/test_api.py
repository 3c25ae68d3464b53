"""The cluster's Python API and tree-file keys: ``singleton``, ``fencing_token``,
``[cluster]`` and ``scope``, in this process (the multi-node behaviour is in
test_singleton.py)."""

from __future__ import annotations

import asyncio
import os
import textwrap
from typing import Any

import pytest
from _nats_nodes import NatsServer

import trellis
from trellis.cluster import (
    Cluster,
    ClusterError,
    ClusterSettings,
    LeaseLost,
    fencing_token,
    singleton,
)
from trellis.config import ConfigError, loads


async def test_a_singleton_without_a_cluster_fails_to_start_naming_the_fix() -> None:
    async def body() -> None:
        await asyncio.sleep(3600)

    spec = singleton(trellis.worker("leader", body))
    with pytest.raises(trellis.StartError) as info:
        await trellis.Supervisor.start_link([spec])
    assert "--cluster" in str(info.value)


async def test_fencing_token_reaches_in_process_code_and_fails_once_the_lease_is_gone(
    nats_server: NatsServer,
) -> None:
    seen: asyncio.Queue[object] = asyncio.Queue()

    async def leader() -> None:
        await seen.put(fencing_token())
        while True:
            await asyncio.sleep(0.02)
            try:
                fencing_token()
            except LeaseLost as e:
                await seen.put(e)
                return

    cluster = Cluster(ClusterSettings(nats_server.url, node="solo", name="api", lease_ttl=0.5))
    await cluster.start()
    sup = None
    try:
        spec = singleton(trellis.worker("leader", leader, restart="temporary"), key="api.leader")
        sup = await trellis.Supervisor.start_link([spec])
        token = await asyncio.wait_for(seen.get(), 20)
        assert isinstance(token, int)
        assert token > 0
        [lease] = cluster.status()["leases"]
        assert lease == {"key": "api.leader", "held": True, "token": token}
        assert fencing_token() is None  # outside a singleton
        nats_server.stop()  # no renewal can succeed: the lease lapses on this node
        # the child is killed at the deadline; a check just before that may see LeaseLost
        try:
            lost = await asyncio.wait_for(seen.get(), 0.5 * 0.6 + 0.5)
            assert isinstance(lost, LeaseLost)
        except TimeoutError:
            pass
        await asyncio.sleep(0.2)
        assert cluster.status()["leases"][0]["held"] is False
        children = await sup.which_children()
        assert children[0].pid is not None  # the keeper stays, waiting for the lease
    finally:
        if sup is not None:
            await sup.stop()
        await cluster.stop()


def test_tree_file_cluster_table_and_scope_are_checked() -> None:
    bad = textwrap.dedent(
        """
        [cluster]
        url = "http://x"
        lease_ttl = 0

        [supervisor]
        name = "t"
        [[supervisor.children]]
        id = "w"
        command = ["sleep", "1"]
        scope = "everywhere"
        """
    ).lstrip()
    with pytest.raises(ConfigError) as info:
        loads(bad)
    where = {i.path: i.message for i in info.value.errors}
    assert "nats://" in where["cluster.url"]
    assert "cluster.lease_ttl" in where
    with pytest.raises(ConfigError) as info:
        loads(bad.replace('url = "http://x"\nlease_ttl = 0', ""))
    where = {i.path: i.message for i in info.value.errors}
    assert "'node'" in where["supervisor.children[0].scope"]


def test_scope_cluster_wraps_the_child_and_names_its_lease_after_the_tree() -> None:
    tree = loads(
        textwrap.dedent(
            """
            [cluster]
            url = "nats://127.0.0.1:4222"
            name = "shop"
            lease_ttl = 1

            [supervisor]
            name = "t"
            [[supervisor.children]]
            id = "w"
            command = ["sleep", "1"]
            scope = "cluster"
            [[supervisor.children]]
            id = "n"
            command = ["sleep", "1"]
            scope = "node"
            """
        ).lstrip()
    )
    w, n = tree.children
    assert w.id == "w"
    assert w.args[1] == "t.w"  # the lease key
    assert n.args[0].argv == ("sleep", "1")  # node scope: the child as it is
    settings = ClusterSettings.from_settings(dict(tree.settings["cluster"]), node="a")
    assert settings is not None
    assert (settings.name, settings.lease_ttl, settings.node) == ("shop", 1.0, "a")
    assert settings.bucket("leases") == "trellis_shop_leases"


def test_cluster_settings_refuse_bad_values_naming_them() -> None:
    with pytest.raises(ClusterError, match="lease_ttl"):
        ClusterSettings("nats://h:4222", node="a", lease_ttl=0.01)
    with pytest.raises(ClusterError, match="cluster name"):
        ClusterSettings("nats://h:4222", node="a", name="a b")
    with pytest.raises(ClusterError, match="user and password"):
        ClusterSettings("nats://h:4222", node="a", user="u")


def test_the_token_reaches_every_command_of_a_cluster_scoped_supervisor() -> None:
    from trellis.cluster._singleton import with_token

    inner = trellis.Supervisor.child_spec(
        [trellis.Command(["true"], id="one"), trellis.Command(["true"], id="two")],
        id="group",
    )
    outer = trellis.Supervisor.child_spec([inner], id="top")
    spec = with_token(outer, 42)
    [group] = spec.args[0]
    assert [c.args[0].env["TRELLIS_FENCING_TOKEN"] for c in group.args[0]] == ["42", "42"]
    assert outer.args[0][0].args[0][0].args[0].env == {}  # the original is untouched


TWIN = """
import asyncio, sys
from trellis.cluster import Cluster, ClusterSettings

async def main():
    settings = ClusterSettings(sys.argv[1], node="twin", name="api", lease_ttl=0.5)
    c = Cluster(settings, run_id="run-two")
    await c.start()
    print("up", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.skipif(
    os.environ.get("TRELLIS_TEST_LOOP") == "uvloop",
    reason="hung once on CI's uvloop pass, where pytest-timeout could not interrupt it "
    "(before Cluster.stop re-cancelled its loops; kept off there until understood); "
    "the asyncio pass runs it",
)
async def test_two_processes_with_one_node_name_are_reported(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    import subprocess
    import sys

    events: list[dict[str, Any]] = []

    def seen(event: dict[str, Any]) -> None:
        if event.get("action") == "duplicate_name":
            events.append(dict(event))

    settings = ClusterSettings(nats_server.url, node="twin", name="api", lease_ttl=0.5)
    one = Cluster(settings, run_id="run-one")
    handle = trellis.telemetry.attach(seen, ["cluster.node"])
    await one.start()
    twin = subprocess.Popen(  # noqa: ASYNC220 - started once; nothing waits on it here
        [sys.executable, "-c", TWIN, nats_server.url], stdout=subprocess.PIPE, text=True
    )
    try:
        for _ in range(400):
            if events:
                break
            await asyncio.sleep(0.05)
        assert [e.get("other_run") for e in events] == ["run-two"]  # once, not per beat
        assert "two nodes share a name" in caplog.text
    finally:
        twin.kill()
        twin.wait()
        assert twin.stdout is not None
        twin.stdout.close()
        trellis.telemetry.detach(handle)
        await one.stop()


def test_a_cluster_built_in_code_gets_a_run_id_of_its_own() -> None:
    """Two processes of one node name are told apart by their run ids (the pid alone
    does not do it: two containers both run trellis as pid 1)."""
    settings = ClusterSettings("nats://127.0.0.1:4222", node="n", name="api")
    a, b = Cluster(settings), Cluster(settings)
    assert a.run_id
    assert b.run_id
    assert a.run_id != b.run_id
    assert Cluster(settings, run_id="given").run_id == "given"

"""A Jepsen-style check of the fencing tokens: three ``trellis run`` nodes, each behind
its own cuttable TCP proxy to NATS, run a singleton that writes token-stamped records
to PostgreSQL through a fencing check (``UPDATE fence SET token = $t WHERE token <=
$t``), while a seeded random schedule kills (-9, then restarts), freezes (SIGSTOP for
1.5-3 TTLs) and cuts off the nodes. Afterwards: in commit order no accepted write
carries a token lower than an earlier accepted one, and each token was used by one
node only.

``TRELLIS_CLUSTER_SEED`` replays a schedule (the seed is printed);
``TRELLIS_CLUSTER_SOAK=60`` runs it for 60 s instead of the default 10 s."""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _nats_nodes import TTL, LoopThread, NatsServer, Node, free_port, wait_for

PG_BIN = Path("/usr/lib/postgresql/15/bin")

WRITER = """
import os, sys, time
import psycopg

token = int(os.environ["TRELLIS_FENCING_TOKEN"])
node = os.environ["TRELLIS_TEST_NODE"]
conn = psycopg.connect(os.environ["TRELLIS_TEST_DSN"])
seq = 0
while True:
    seq += 1
    with conn.transaction():
        cur = conn.execute(
            "UPDATE fence SET token = %s WHERE id = 1 AND token <= %s", (token, token)
        )
        table = "writes" if cur.rowcount == 1 else "rejected"
        conn.execute(
            f"INSERT INTO {table} (token, node, seq) VALUES (%s, %s, %s)", (token, node, seq)
        )
    time.sleep(0.01)
"""


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A throwaway PostgreSQL 15 (initdb in a temp dir, trust auth, loopback only)."""
    pg_ctl, initdb = PG_BIN / "pg_ctl", PG_BIN / "initdb"
    if not (pg_ctl.exists() and initdb.exists()):
        pytest.skip(f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql-15)")
    pytest.importorskip("psycopg", reason="psycopg 3 is needed: pip install 'psycopg[binary]'")
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no 'postgres' user to run the server as (initdb refuses root)")
    if shutil.which("runuser") is None:
        pytest.skip("runuser not found (util-linux): needed to run the server as postgres")
    base = tempfile.mkdtemp(prefix="trellis-cluster-pg-")
    os.chown(base, pw.pw_uid, pw.pw_gid)
    data = os.path.join(base, "data")
    as_pg = ["runuser", "-u", "postgres", "--"]
    init = [str(initdb), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"]
    subprocess.run([*as_pg, *init], check=True, capture_output=True, timeout=60)
    port = free_port()
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    log = os.path.join(base, "server.log")
    started = False
    try:
        subprocess.run(
            [*as_pg, str(pg_ctl), "-D", data, "-l", log, "-o", opts, "-w", "-t", "60", "start"],
            check=True,
            capture_output=True,
            timeout=90,
        )
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(
                [*as_pg, str(pg_ctl), "-D", data, "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


def _tree(tmp: Path, extra: str = "") -> Path:
    writer = tmp / "writer.py"
    writer.write_text(WRITER)
    path = tmp / "tree.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [cluster]
            name = "jepsen"
            lease_ttl = {TTL}
            {extra}

            [supervisor]
            name = "jepsen"
            intensity = 1000
            period = 1
            [[supervisor.children]]
            id = "writer"
            command = [{sys.executable!r}, {str(writer)!r}]
            inherit_env = ["PATH", "TRELLIS_TEST_NODE", "TRELLIS_TEST_DSN"]
            shutdown = 1
            scope = "cluster"
            """
        )
    )
    return path


def test_no_accepted_write_carries_a_token_lower_than_an_earlier_one(
    tmp_path: Path, nats_server: NatsServer, pg_dsn: str
) -> None:
    _jepsen(tmp_path, [nats_server.port] * 3, pg_dsn, "")


@pytest.mark.skipif(
    not os.environ.get("TRELLIS_CLUSTER_JEPSEN_NATS_CLUSTER"),
    reason="set TRELLIS_CLUSTER_JEPSEN_NATS_CLUSTER=1 to run the check on a three-server "
    "NATS cluster too (each node behind its own proxy to its own server; R3 buckets)",
)
def test_the_same_on_a_three_server_nats_cluster(tmp_path: Path, pg_dsn: str) -> None:
    from _nats_nodes import NatsCluster

    cluster = NatsCluster(tmp_path / "nats")
    cluster.start_all()
    try:
        _jepsen(tmp_path, cluster.ports, pg_dsn, "replicas = 3")
    finally:
        cluster.stop()


def _jepsen(tmp_path: Path, ports: list[int], pg_dsn: str, extra: str) -> None:
    import psycopg

    from trellis.chaos import ChaosProxy

    seed = int(os.environ.get("TRELLIS_CLUSTER_SEED") or random.randrange(1 << 32))
    duration = float(os.environ.get("TRELLIS_CLUSTER_SOAK") or 10.0)
    print(f"seed {seed} (TRELLIS_CLUSTER_SEED={seed} replays this schedule), {duration} s")
    rng = random.Random(seed)
    with psycopg.connect(pg_dsn, autocommit=True) as db:
        db.execute("CREATE TABLE fence (id int PRIMARY KEY, token bigint NOT NULL)")
        db.execute("INSERT INTO fence VALUES (1, 0)")
        for table in ("writes", "rejected"):
            db.execute(
                f"CREATE TABLE {table} (id bigserial PRIMARY KEY, token bigint, node text, "
                "seq int, at timestamptz DEFAULT clock_timestamp())"
            )
    tree = _tree(tmp_path, extra)
    lt = LoopThread()
    proxies: dict[str, Any] = {}
    nodes: dict[str, Node] = {}
    frozen: set[str] = set()
    ever_frozen: set[str] = set()
    env = {"TRELLIS_TEST_DSN": pg_dsn}
    actions: list[str] = []
    try:
        for name, port in zip("abc", ports, strict=True):
            proxies[name] = lt.run(ChaosProxy(("127.0.0.1", port)).start())
            url = f"nats://127.0.0.1:{proxies[name].port}"
            nodes[name] = Node(tmp_path, tree, url, name, env=env)

        def writes() -> int:
            with psycopg.connect(pg_dsn, autocommit=True) as db:
                return int(db.execute("SELECT count(*) FROM writes").fetchone()[0])  # type: ignore[index]

        def holder() -> str | None:
            with psycopg.connect(pg_dsn, autocommit=True) as db:
                row = db.execute("SELECT node FROM writes ORDER BY id DESC LIMIT 1").fetchone()
            return row[0] if row else None

        # The schedule is drawn from the seed alone: (pause, fault, target, how long),
        # where the target is "holder" (whoever wrote last, as Jepsen's nemesis picks the
        # primary) or a node name; who the holder is depends on the run.
        schedule = []
        at = 0.0
        while at < duration:
            pause = rng.uniform(0.5, 1.5) * TTL
            fault = rng.choice(["kill", "freeze", "cut"])
            target = "holder" if rng.random() < 0.7 else rng.choice("abc")
            length = {"kill": rng.uniform(0.2, 1.0), "freeze": rng.uniform(1.5, 3.0)}.get(
                fault, rng.uniform(1.0, 2.5)
            ) * TTL
            schedule.append((pause, fault, target, length))
            at += pause + length
        print("schedule:", ", ".join(f"{f} {t} {x:.2f}s" for _, f, t, x in schedule))
        wait_for(writes, 30.0, "the singleton's first write", step=0.1)
        for pause, fault, which, length in schedule:
            time.sleep(pause)
            target = holder() if which == "holder" else which
            if target is None:
                continue
            actions.append(f"{fault} {target}")
            if fault == "kill":
                nodes[target].signal(signal.SIGKILL)
                nodes[target].proc.wait(10)
                nodes[target].log.close()
                time.sleep(length)
                url = f"nats://127.0.0.1:{proxies[target].port}"
                nodes[target] = Node(tmp_path, tree, url, target, env=env)
            elif fault == "freeze":
                nodes[target].signal(signal.SIGSTOP)
                frozen.add(target)
                ever_frozen.add(target)
                time.sleep(length)
                nodes[target].signal(signal.SIGCONT)
                frozen.discard(target)
            else:
                lt.run(proxies[target].cut())
                time.sleep(length)
                lt.run(proxies[target].restore())
        print("done:", ", ".join(actions))
    finally:
        for name in frozen:
            with contextlib.suppress(ProcessLookupError):
                nodes[name].signal(signal.SIGCONT)
        for node in nodes.values():
            node.stop()
        for proxy in proxies.values():
            lt.run(proxy.close())
        lt.close()

    with psycopg.connect(pg_dsn, autocommit=True) as db:
        accepted = db.execute("SELECT id, token, node FROM writes ORDER BY id").fetchall()
        rejected = db.execute("SELECT count(*), count(DISTINCT token) FROM rejected").fetchone()
        refused_nodes = {r[0] for r in db.execute("SELECT DISTINCT node FROM rejected")}
    tokens = [t for _, t, _ in accepted]
    owners: dict[int, set[str]] = {}
    for _, t, n in accepted:
        owners.setdefault(t, set()).add(n)
    print(
        f"{len(accepted)} accepted writes under {len(owners)} tokens; "
        f"{rejected[0] if rejected else 0} stale writes refused by the fence"
    )
    for earlier, later in itertools.pairwise(accepted):
        assert later[1] >= earlier[1], f"write {later} came after {earlier} with a lower token"
    assert tokens == sorted(tokens)
    assert all(len(n) == 1 for n in owners.values()), f"a token used by two nodes: {owners}"
    assert len(owners) >= 2, "the schedule never moved the singleton"
    # The fence refuses what a paused old owner's child writes: its node was frozen (the
    # child was not), so it could not kill it in time. A node that was cut off or killed
    # must have stopped its child before anyone else started: it has no refused writes.
    assert refused_nodes <= ever_frozen, (
        f"stale writes from {refused_nodes - ever_frozen}, which were never frozen"
    )

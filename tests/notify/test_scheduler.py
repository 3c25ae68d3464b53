"""The campaign scheduler's fencing, with a real nats-server and PostgreSQL: a scheduler
whose token is older than the last one written can neither advance nor rewind a
campaign, and the notifications it published twice are stored once."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from examples.notify import common
from examples.notify.harness import NATS_BIN, NatsServer
from examples.notify.scheduler import CHUNK, StaleFence, expand_chunk

pytestmark = pytest.mark.skipif(
    NATS_BIN is None, reason="needs nats-server with JetStream (apt install nats-server)"
)


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[Any]:
    import nats

    nc = await nats.connect(nats_url)
    try:
        ctx = nc.jetstream(timeout=5.0)
        await common.ensure_stream(ctx, 2)
        yield ctx
    finally:
        await nc.close()


async def _campaign(store: Any, cid: str) -> dict[str, Any]:
    return next(c for c in await store.campaigns_open() if c["id"] == cid)


async def test_a_stale_scheduler_can_neither_advance_nor_rewind_a_campaign(
    pg_store: Any, js: Any
) -> None:
    cid = f"c-{uuid.uuid4().hex[:8]}"
    await pg_store.add_campaign(cid, 3 * CHUNK, "bulk", {"title": "sale"})

    # the owner with token 10 expands the first chunk
    assert await expand_chunk(js, pg_store, await _campaign(pg_store, cid), 10, 2) == CHUNK
    # a new owner (token 12) takes over and expands the second
    assert await expand_chunk(js, pg_store, await _campaign(pg_store, cid), 12, 2) == 2 * CHUNK
    # the old owner wakes up with its stale view of the campaign: refused, nothing moves
    stale = {**(await _campaign(pg_store, cid)), "next_index": 0}
    with pytest.raises(StaleFence):
        await expand_chunk(js, pg_store, stale, 10, 2)
    assert (await _campaign(pg_store, cid))["next_index"] == 2 * CHUNK

    # what the stale owner published again was stored once (JetStream duplicate window)
    info = await js.stream_info(common.STREAM)
    assert info.state.messages == 2 * CHUNK

    # the rightful owner finishes the campaign; it is no longer open
    assert await expand_chunk(js, pg_store, await _campaign(pg_store, cid), 12, 2) == 3 * CHUNK
    assert cid not in {c["id"] for c in await pg_store.campaigns_open()}


def test_the_committed_slo_rules_are_what_the_tree_file_generates() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "trellis", "slo", "rules", "examples/notify/node.toml"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    committed = (root / "examples/notify/slo-rules.yml").read_text()
    assert out == committed, "regenerate: trellis slo rules examples/notify/node.toml"
    assert 'slo_name: "delivery"' in out
    assert 'slo_name: "time-to-send"' in out


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="needs promtool (Debian: apt-get install prometheus)",
)
def test_the_committed_slo_rules_pass_promtool() -> None:
    import subprocess

    rules = Path(__file__).resolve().parents[2] / "examples/notify/slo-rules.yml"
    out = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout

"""Event history as operators use it: ``--history N`` counts events after the filter,
SSE ids and ``Last-Event-ID`` resume, child output with a budget of its own, the last
stderr lines of a crashed child in ``trellis status``, and control characters from
child output escaped before they reach a terminal."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import trellis
from control._ctlenv import idle
from trellis import telemetry
from trellis.control import ControlServer
from trellis.testing import capture_telemetry


def parse(body: bytes) -> list[tuple[int | None, str, dict[str, Any]]]:
    """``(id, name, data)`` of each event of an SSE body."""
    out = []
    for block in body.decode().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            fields[key] = value
        if "data" in fields:
            ident = int(fields["id"]) if "id" in fields else None
            out.append((ident, fields.get("event", "message"), json.loads(fields["data"])))
    return out


class Tree:
    def __init__(self, ctl: ControlServer, sup: Any, sock: Path) -> None:
        self.ctl, self.sup, self.sock = ctl, sup, sock
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(sock)), base_url="http://t", timeout=20
        )

    async def replay(self, query: str, **headers: str) -> list[tuple[int | None, str, Any]]:
        r = await self.client.get(f"/v1/events?follow=false&{query}", headers=headers)
        assert r.status_code == 200, r.text
        return parse(r.content)

    async def cli(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "trellis",
            *args,
            "--socket",
            str(self.sock),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        return out.decode()


@pytest.fixture
async def tree(short_dir: Path) -> AsyncIterator[Tree]:
    sock = short_dir / "c.sock"
    ctl = ControlServer(socket=sock, history=50, output_history=5)
    await ctl.start()
    sup = await trellis.Supervisor.start_link([trellis.worker("w", idle)], name="ev")
    await ctl.tree_started(sup, lambda: None)
    t = Tree(ctl, sup, sock)
    try:
        yield t
    finally:
        await t.client.aclose()
        if sup.alive:
            await sup.stop()
        await ctl.stop()


async def test_history_counts_events_after_the_filter(tree: Tree) -> None:
    """history=10 with a filter gives the last 10 matching events, however many
    others came between them (before: the last 10 events, then filtered)."""
    for i in range(20):
        telemetry.emit("test.wanted", n=i)
        telemetry.emit("test.other", n=i)
    got = await tree.replay("history=10&filter=test.wanted")
    assert [(name, d["n"]) for _, name, d in got] == [("test.wanted", i) for i in range(10, 20)]
    out = await tree.cli("events", "--history", "3", "--filter", "test.wanted")
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert all("test.wanted" in line for line in lines)
    assert "n=19" in lines[-1]


async def test_events_carry_ids_and_a_client_resumes_with_last_event_id(tree: Tree) -> None:
    for i in range(5):
        telemetry.emit("test.tick", n=i)
    first = await tree.replay("history=5&filter=test.tick")
    ids = [i for i, _, _ in first]
    assert all(i is not None for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    last = ids[-1]
    for i in range(5, 8):
        telemetry.emit("test.tick", n=i)
    resumed = await tree.replay("filter=test.tick", **{"Last-Event-ID": str(last)})
    assert [d["n"] for _, _, d in resumed] == [5, 6, 7]
    assert all(i is not None and i > last for i, _, _ in resumed)
    # the same through the query (for clients that cannot set headers)
    again = await tree.replay(f"filter=test.tick&last_event_id={last}")
    assert again == resumed
    r = await tree.client.get("/v1/events?follow=false", headers={"Last-Event-ID": "x"})
    assert r.status_code == 422
    assert "Last-Event-ID" in r.json()["error"]


async def test_a_resumed_client_is_told_what_it_missed(tree: Tree) -> None:
    """Events that fell out of the history since the client's last id are counted in a
    control.dropped event before the rest."""
    telemetry.emit("test.mark")
    (mark,) = await tree.replay("history=1&filter=test.mark")
    for i in range(60):  # the history keeps 50
        telemetry.emit("test.flood", n=i)
    resumed = await tree.replay(
        "filter=test.flood,control.dropped", **{"Last-Event-ID": str(mark[0])}
    )
    assert resumed[0][1] == "control.dropped"
    assert resumed[0][2]["dropped"] == 10
    assert [d["n"] for _, n, d in resumed[1:]] == list(range(10, 60))


async def test_child_output_cannot_push_supervision_events_out(tree: Tree) -> None:
    """With history=50 and output_history=5, 200 lines of child output leave the
    supervision events in the history (before: output filled it)."""
    old = (await tree.sup.which_child("w")).pid
    with capture_telemetry() as cap:
        trellis.exit(old, RuntimeError("crash"))
        await cap.wait_for("child.restarted", child_id="w")
    for i in range(200):
        telemetry.emit("process.output", path="ev/w", child_id="w", stream="stdout", line=f"{i}")
    got = await tree.replay("history=1000")
    names = [n for _, n, _ in got]
    assert "child.exited" in names
    assert "child.restarted" in names
    assert [d["line"] for _, n, d in got if n == "process.output"] == [
        str(i) for i in range(195, 200)
    ]
    ids = [i for i, _, _ in got]
    assert ids == sorted(ids)  # merged in order


# A child that prints a terminal title change (OSC), a few stderr lines and then much
# stdout, and fails.
CRASHER = r"""
import sys
print("\x1b]0;pwned\x07 hello", flush=True)
for i in range(8):
    print(f"error line {i} \x1b[2J", file=sys.stderr, flush=True)
for i in range(30):  # more stdout after: the stderr lines are kept apart
    print(f"progress {i}", flush=True)
sys.exit(3)
"""


async def test_status_shows_the_last_stderr_lines_of_a_crashed_child_escaped(
    short_dir: Path,
) -> None:
    """trellis status shows the last stderr lines of a child that exited abnormally;
    neither status nor events lets the child's escape sequences reach the terminal."""
    script = short_dir / "crasher.py"
    script.write_text(CRASHER)
    sock = short_dir / "c.sock"
    ctl = ControlServer(socket=sock)
    await ctl.start()
    spec = trellis.Command(
        [sys.executable, str(script)],
        id="bad",
        shutdown=1.0,
        backoff=trellis.Backoff(min=60, max=60),  # one crash, then a long wait
    )
    with capture_telemetry() as cap:
        sup = await trellis.Supervisor.start_link([spec], name="st")
        try:
            await ctl.tree_started(sup, lambda: None)
            await cap.wait_for("child.backoff", child_id="bad", timeout=20)
            t = Tree(ctl, sup, sock)
            try:
                status = await t.cli("status")
                events = await t.cli("events", "--history", "100")
                raw = await t.replay("history=100&filter=process.output")
            finally:
                await t.client.aclose()
        finally:
            await sup.stop()
            await ctl.stop()
    assert "\x1b" not in status
    assert "\x07" not in status
    assert "\x1b" not in events
    assert "\x07" not in events
    assert "restarting" in status
    assert "exit" in status  # the last exit, decoded
    shown = [line for line in status.splitlines() if "stderr|" in line]
    assert len(shown) == 5  # the last five
    assert "error line 7 \\x1b[2J" in shown[-1]
    assert "error line 2" not in status
    assert "\\x1b]0;pwned\\x07 hello" in events
    # the API itself still carries the line as the child wrote it (JSON escapes it)
    assert any(d["line"] == "\x1b]0;pwned\x07 hello" for _, _, d in raw)


async def test_output_at_start_does_not_push_the_start_out_under_trellis_run(
    short_dir: Path,
) -> None:
    """trellis run binds the control API once the tree runs and hands it the events of
    the start: child output then cannot push the start's supervision events out."""
    from trellis._operate import _ControlOnceStarted

    sock = short_dir / "c.sock"
    ext = _ControlOnceStarted({"socket": str(sock), "history": 50, "output_history": 5})
    await ext.start()
    sup = await trellis.Supervisor.start_link([trellis.worker("w", idle)], name="early")
    for i in range(500):  # a chatty child during the start
        telemetry.emit("process.output", path="early/w", child_id="w", stream="stdout", line=f"{i}")
    await ext.tree_started(sup, lambda: None)
    t = Tree(ext.server, sup, sock)
    try:
        got = await t.replay("history=1000")
    finally:
        await t.client.aclose()
        await sup.stop()
        await ext.stop()
    names = [n for _, n, _ in got]
    assert "child.started" in names
    assert "supervisor.started" in names
    assert names.count("process.output") == 5


async def test_an_id_from_before_the_server_started_replays_the_history(tree: Tree) -> None:
    """Ids start again at 1 when the tree (its control API) starts again: a client
    resuming with a larger id gets the history it asked for, not nothing."""
    telemetry.emit("test.fresh", n=1)
    got = await tree.replay("history=10&filter=test.fresh", **{"Last-Event-ID": "999999"})
    assert [(n, d["n"]) for _, n, d in got] == [("test.fresh", 1)]

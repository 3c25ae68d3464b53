"""The simulated exchange as a supervised OS process: readiness, the feed, the history
API (exact ranges, errors, the rate limit) and determinism."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from examples.market_data import exchange
from examples.market_data._common import HttpError, http_get, http_json
from examples.market_data.pipeline import free_port

import trellis

SCRIPT = str(Path(exchange.__file__).resolve())


class Running:
    def __init__(self, sup: Any, feed: int, http: int) -> None:
        self.sup = sup
        self.feed = feed
        self.url = f"http://127.0.0.1:{http}"


async def _start(*extra: str) -> Running:
    feed, http = free_port(), free_port()
    argv = [sys.executable, "-u", SCRIPT, "--port", str(feed), "--http-port", str(http)]
    spec = trellis.Command([*argv, *extra], id="exchange", ready=trellis.Ready.notify(timeout=10))
    sup = await trellis.Supervisor.start([spec])
    return Running(sup, feed, http)


@pytest.fixture
async def ex() -> AsyncIterator[Running]:
    epoch = time.time() - 2.0  # two seconds of history already
    running = await _start(
        "--seed", "4", "--symbols", "5", "--rate", "200", "--epoch", repr(epoch),
        "--history-rate", "5", "--history-burst", "3",
    )  # fmt: skip
    try:
        yield running
    finally:
        await running.sup.stop()


async def _subscribe(port: int, symbols: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(json.dumps({"op": "subscribe", "symbols": symbols}).encode() + b"\n")
        ack = json.loads(await reader.readline())
        msgs = []
        async with asyncio.timeout(10):
            while len([m for m in msgs if m["type"] == "tick"]) < 60:
                msgs.append(json.loads(await reader.readline()))
        return ack, msgs
    finally:
        writer.close()


async def test_feed_streams_what_history_serves(ex: Running) -> None:
    """A subscriber gets every tick from the announced seq on, in order per symbol, and
    the history API returns exactly the same ticks, by seq and by time range."""
    ack, msgs = await _subscribe(ex.feed, ["S00", "S01"])
    assert ack["type"] == "subscribed"
    assert set(ack["next"]) == {"S00", "S01"}
    assert ack["next"]["S00"] > 1  # two seconds of ticks came before
    ticks = [m for m in msgs if m["type"] == "tick"]
    assert {t["symbol"] for t in ticks} <= {"S00", "S01"}
    s00 = [t for t in ticks if t["symbol"] == "S00"]
    assert [t["seq"] for t in s00] == list(range(ack["next"]["S00"], ack["next"]["S00"] + len(s00)))
    for t in s00:
        del t["type"]
    a, b = s00[0]["seq"], s00[-1]["seq"]
    by_seq = await http_json(ex.url, f"/history?symbol=S00&from_seq={a}&to_seq={b}")
    assert by_seq["ticks"] == s00
    by_ts = await http_json(
        ex.url, f"/history?symbol=S00&from_ts={s00[0]['ts']}&to_ts={s00[-1]['ts']}"
    )
    assert by_ts["ticks"] == s00
    first = await http_json(ex.url, "/history?symbol=S00&to_seq=3")
    assert [t["seq"] for t in first["ticks"]] == [1, 2, 3]


async def test_history_rate_limit_answers_429_and_counts(ex: Running) -> None:
    """Past the burst, /history answers 429 with Retry-After; /stats counts them."""
    statuses = []
    for _ in range(6):
        status, headers, _body = await http_get(ex.url, "/history?symbol=S01&to_seq=1")
        statuses.append(status)
        if status == 429:
            assert float(headers["retry-after"]) > 0
    assert statuses[:3] == [200, 200, 200]
    assert 429 in statuses
    stats = await http_json(ex.url, "/stats")
    assert stats["rejected_429"] == statuses.count(429)
    assert stats["history_requests"] == 6
    assert set(stats["generated"]) == {"S00", "S01", "S02", "S03", "S04"}
    assert stats["generated"]["S00"] > stats["generated"]["S04"]  # skewed volumes


@pytest.mark.parametrize(
    ("target", "status", "message"),
    [
        ("/history?symbol=ZZZ", 404, "unknown symbol 'ZZZ'"),
        ("/history?from_seq=1", 400, "missing parameter 'symbol'"),
        ("/history?symbol=S00&from_seq=x", 400, "parameter 'from_seq' must be an integer"),
        ("/history?symbol=S00&from_seq=0", 400, "from_seq must be >= 1"),
        ("/history?symbol=S00&from_seq=1&to_ts=5", 400, "not both"),
        ("/history?symbol=S00&sym=1", 400, "unknown parameter 'sym'"),
        ("/nope", 404, "no such path '/nope'"),
    ],
)
async def test_bad_requests_get_clear_errors(
    ex: Running, target: str, status: int, message: str
) -> None:
    """A bad request gets a 4xx naming what is wrong."""
    with pytest.raises(HttpError) as info:
        await http_json(ex.url, target)
    assert info.value.status == status
    assert message in json.loads(info.value.body)["error"]


async def test_bad_subscription_gets_an_error_line(ex: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", ex.feed)
    try:
        writer.write(b'{"op": "subscribe", "symbols": ["S00", "NOPE"]}\n')
        answer = json.loads(await reader.readline())
    finally:
        writer.close()
    assert answer == {"type": "error", "error": "unknown symbols: NOPE"}


def test_ticks_are_a_function_of_seed_symbol_and_seq() -> None:
    """Two books with the same seed and epoch hold the same ticks; another seed differs."""
    epoch = 1_000_000.0
    a = exchange.Book("S03", 50.0, 7, epoch)
    b = exchange.Book("S03", 50.0, 7, epoch)
    c = exchange.Book("S03", 50.0, 8, epoch)
    for book in (a, b, c):
        book.advance(epoch + 10)
    assert len(a) == len(b) > 400
    assert [a.tick(i) for i in range(1, len(a) + 1)] == [b.tick(i) for i in range(1, len(b) + 1)]
    assert a.price != c.price
    assert a.ts == sorted(a.ts)
    assert len(set(a.ts)) == len(a.ts)


async def test_restart_with_the_same_epoch_keeps_the_sequence() -> None:
    """An exchange restarted with the same epoch serves the same ticks it served before."""
    epoch = repr(time.time() - 1.0)
    first = await _start("--seed", "2", "--symbols", "3", "--epoch", epoch)
    try:
        before = await http_json(first.url, "/history?symbol=S00&to_seq=100")
    finally:
        await first.sup.stop()
    second = await _start("--seed", "2", "--symbols", "3", "--epoch", epoch)
    try:
        after = await http_json(second.url, "/history?symbol=S00&to_seq=100")
    finally:
        await second.sup.stop()
    assert len(before["ticks"]) > 50
    assert after["ticks"][: len(before["ticks"])] == before["ticks"]


def test_bad_arguments_exit_2_naming_them(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        exchange.parse_args(["--symbols", "0"])
    assert info.value.code == 2
    assert "--symbols: must be > 0, got '0'" in capsys.readouterr().err

"""The simulated push providers as real OS processes: batch sends, invalid tokens,
repeat ids answered "duplicate" and never shown twice, 429 with Retry-After, the
5xx burst schedule and the fault hook, determinism for a seed, SIGTERM and --record."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.append(ROOT)

from examples.notify.providers import ProviderProcess, in_burst, token_invalid  # noqa: E402


def _msgs(key: str, tokens: list[str]) -> list[dict[str, Any]]:
    return [{"id": f"{key}:{t}", "token": t, "payload": {"title": key}} for t in tokens]


class Provider:
    def __init__(self, proc: ProviderProcess) -> None:
        self.proc = proc
        self.http = httpx.Client(base_url=proc.url, timeout=10)

    def send(self, messages: list[dict[str, Any]]) -> httpx.Response:
        return self.http.post("/v1/send", json={"messages": messages})

    def faults(self, mode: str, requests: int, **extra: Any) -> None:
        r = self.http.post("/v1/faults", json={"mode": mode, "requests": requests, **extra})
        assert r.status_code == 200, r.text

    def stats(self) -> dict[str, Any]:
        return dict(self.http.get("/v1/stats").json())

    def deliveries(self) -> dict[str, Any]:
        return dict(self.http.get("/v1/deliveries").json())

    def close(self) -> int | None:
        self.http.close()
        return self.proc.stop()


def _start(kind: str, seed: int, *args: str) -> Provider:
    return Provider(ProviderProcess(kind, seed, *args).start())


@pytest.fixture
def apns() -> Iterator[Provider]:
    p = _start("apns", 7, "--invalid-ratio", "0", "--latency-ms", "1")
    try:
        yield p
    finally:
        p.close()


def test_batch_send_all_ok(apns: Provider) -> None:
    tokens = [f"apns:dev{i}" for i in range(100)]
    r = apns.send(_msgs("k1", tokens))
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["id"] for x in results] == [f"k1:{t}" for t in tokens]
    assert {x["status"] for x in results} == {"ok"}
    stats = apns.stats()
    assert (stats["requests"], stats["messages"], stats["shown"]) == (1, 100, 100)
    assert (stats["repeats"], stats["invalid"], stats["5xx"], stats["429"]) == (0, 0, 0, 0)
    shown = apns.deliveries()["shown"]
    assert set(shown) == {f"k1:{t}" for t in tokens}
    assert {v["count"] for v in shown.values()} == {1}


def test_invalid_tokens_follow_the_seeded_rule() -> None:
    p = _start("fcm", 3, "--invalid-ratio", "0.3", "--latency-ms", "0")
    try:
        tokens = [f"fcm:t{i}" for i in range(200)] + ["fcm:invalid-abc", "apns:xyz"]
        results = p.send(_msgs("k", tokens)).json()["results"]
        invalid = {x["id"] for x in results if x["status"] == "invalid_token"}
        expected = {f"k:{t}" for t in tokens if token_invalid(3, t, 0.3, "fcm")}
        assert invalid == expected
        # the explicit ones: the "invalid-" prefix, and a token of the other provider
        assert {"k:fcm:invalid-abc", "k:apns:xyz"} <= invalid
        assert 20 < len(invalid) < 110  # about 30% of 200, plus the two
        stats = p.stats()
        assert stats["invalid"] == len(invalid)
        assert stats["shown"] == len(tokens) - len(invalid)
        assert not set(p.deliveries()["shown"]) & invalid  # an invalid token shows nothing
    finally:
        p.close()


def test_repeat_id_is_answered_duplicate_and_never_shown_twice(apns: Provider) -> None:
    first = _msgs("k1", ["apns:a", "apns:b"])
    assert [x["status"] for x in apns.send(first).json()["results"]] == ["ok", "ok"]
    # resent (a redelivery after a crash), plus a new id, plus a repeat inside one batch
    again = [*first, *_msgs("k2", ["apns:a"]), first[0]]
    statuses = [x["status"] for x in apns.send(again).json()["results"]]
    assert statuses == ["duplicate", "duplicate", "ok", "duplicate"]
    stats = apns.stats()
    assert (stats["shown"], stats["repeats"], stats["messages"]) == (3, 3, 6)
    d = apns.deliveries()
    assert set(d["shown"]) == {"k1:apns:a", "k1:apns:b", "k2:apns:a"}
    assert all(v["count"] == 1 for v in d["shown"].values())
    assert d["repeats"] == {"k1:apns:a": 2, "k1:apns:b": 1}


def test_over_the_rate_limit_answers_429_with_retry_after() -> None:
    # 2 requests banked, one more every 10 s: the third request in a row is refused
    p = _start("apns", 1, "--rate-limit", "0.1", "--rate-burst", "2", "--invalid-ratio", "0")
    try:
        assert p.send(_msgs("a", ["apns:1"])).status_code == 200
        assert p.send(_msgs("b", ["apns:1"])).status_code == 200
        r = p.send(_msgs("c", ["apns:1"]))
        assert r.status_code == 429
        retry_after = float(r.headers["Retry-After"])
        assert 0 < retry_after <= 10
        assert r.json()["retry_after"] == pytest.approx(retry_after, abs=0.001)
        stats = p.stats()
        assert (stats["429"], stats["shown"], stats["messages"]) == (1, 2, 2)
        assert "c:apns:1" not in p.deliveries()["shown"]  # a refused batch shows nothing
    finally:
        p.close()


def test_rate_limit_in_messages_counts_each_message() -> None:
    argv = ["--rate-limit", "0.1", "--rate-burst", "10", "--rate-unit", "messages"]
    p = _start("apns", 1, *argv, "--invalid-ratio", "0")
    try:
        tokens = [f"apns:{i}" for i in range(6)]
        assert p.send(_msgs("a", tokens)).status_code == 200  # 4 of 10 left
        assert p.send(_msgs("b", tokens)).status_code == 429  # 6 > 4
        assert p.send(_msgs("c", tokens[:4])).status_code == 200  # 4 fit
        assert p.stats()["shown"] == 10
    finally:
        p.close()


def test_fault_hook_forces_5xx_429_and_ok(apns: Provider) -> None:
    apns.faults("5xx", 2)
    assert apns.send(_msgs("a", ["apns:1"])).status_code >= 500
    assert apns.send(_msgs("a", ["apns:1"])).status_code >= 500
    r = apns.send(_msgs("a", ["apns:1"]))
    assert r.status_code == 200
    assert r.json()["results"][0]["status"] == "ok"  # the refused tries showed nothing
    apns.faults("429", 1, retry_after=0.25)
    r = apns.send(_msgs("b", ["apns:1"]))
    assert (r.status_code, r.headers["Retry-After"]) == (429, "0.250")
    assert apns.send(_msgs("b", ["apns:1"])).status_code == 200
    stats = apns.stats()
    assert (stats["requests"], stats["5xx"], stats["429"], stats["shown"]) == (5, 2, 1, 2)


def test_bad_requests_are_refused(apns: Provider) -> None:
    assert apns.http.post("/v1/send", content=b"{not json").status_code == 400
    assert apns.http.post("/v1/send", json={"messages": [{"id": 1}]}).status_code == 400
    assert apns.http.post("/v1/faults", json={"mode": "boom", "requests": 1}).status_code == 400
    assert apns.http.get("/v1/nothing").status_code == 404
    assert apns.http.get("/v1/send").status_code == 405
    assert apns.stats()["requests"] == 0


def _run_pattern(seed: int) -> list[tuple[int, list[str]]]:
    """21 sequential requests of 5 fresh tokens each: (status, per-message statuses)."""
    p = _start(
        "apns", seed, "--burst-every", "7", "--burst-len", "3",
        "--invalid-ratio", "0.2", "--latency-ms", "0",
    )  # fmt: skip
    try:
        out = []
        for i in range(21):
            r = p.send(_msgs(f"k{i}", [f"apns:d{i}-{j}" for j in range(5)]))
            statuses = [x["status"] for x in r.json()["results"]] if r.status_code == 200 else []
            out.append((r.status_code, statuses))
        assert p.close() == 0
        return out
    finally:
        p.close()


def test_faults_and_invalid_tokens_are_deterministic_for_a_seed() -> None:
    first, second = _run_pattern(11), _run_pattern(11)
    assert first == second
    # the bursts are where in_burst says: 3 of every 7 requests
    refused = [seq for seq, (code, _) in enumerate(first, start=1) if code >= 500]
    assert refused == [seq for seq in range(1, 22) if in_burst(11, seq, 7, 3)]
    assert len(refused) == 9
    assert any(s == "invalid_token" for _, st in first for s in st)
    # another seed gives another pattern
    assert _run_pattern(12) != first


def test_sigterm_exits_cleanly_and_writes_the_record(tmp_path: Path) -> None:
    record = tmp_path / "apns.json"
    p = _start("apns", 5, "--invalid-ratio", "0", "--record", str(record))
    p.send(_msgs("k1", ["apns:a", "apns:b"]))
    p.send(_msgs("k1", ["apns:a"]))
    assert p.close() == 0  # SIGTERM -> exit status 0
    doc = json.loads(record.read_text())
    assert set(doc["shown"]) == {"k1:apns:a", "k1:apns:b"}
    assert doc["repeats"] == {"k1:apns:a": 1}
    assert doc["stats"]["requests"] == 2

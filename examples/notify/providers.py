"""Simulated push providers (APNS or FCM) as OS processes: HTTP/1.1 on loopback.

Run one per provider::

    python -m examples.notify.providers --kind apns --port 0 --seed 1 \\
        [--latency-ms 3] [--invalid-ratio 0.01] [--burst-every N --burst-len M] \\
        [--rate-limit RPS [--rate-burst B]] [--record FILE]

It prints ``READY <port>`` on stdout once it listens (``--port 0`` picks a free
port), logs to stderr, and exits 0 on SIGTERM or SIGINT (writing ``--record``).

API (JSON bodies, keep-alive connections):

- ``POST /v1/send`` ``{"messages": [{"id", "token", "payload"}]}`` -> 200
  ``{"results": [{"id", "status": "ok" | "invalid_token" | "duplicate"}]}``.
  The whole batch is refused with a 5xx during a burst, or with 429 and
  ``Retry-After`` (seconds, a decimal) when over ``--rate-limit`` requests/s
  (messages/s with ``--rate-unit messages``; a batch bigger than the bucket
  passes when it is full and leaves it in debt).
- ``POST /v1/faults`` ``{"mode": "5xx" | "429" | "ok", "requests": N,
  "retry_after": 1.0}``: the next N send requests get that answer ("ok" means
  served, even during a burst or over the rate). Replaces earlier forced faults.
- ``GET /v1/stats``, ``GET /v1/deliveries``, ``GET /health``.

A provider id (``"<key>:<token>"``) is remembered: a repeat is answered
``"duplicate"``, counted in ``repeats`` and never shown again, so ``count`` in
``/v1/deliveries`` is 1 for every id shown.

Deterministic for a seed: send request number ``seq`` (1, 2, ...) gets its
latency, its burst membership and its 5xx code from ``(seed, seq)``; a token is
invalid iff it starts with ``invalid-`` or ``sha256(seed:token)`` falls under
``--invalid-ratio`` (an ``apns:``/``fcm:`` prefix is ignored; a token of the
other provider's kind is invalid). Only the rate limit depends on the clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "ProviderConfig",
    "ProviderProcess",
    "ProviderServer",
    "ProviderSim",
    "in_burst",
    "main",
    "token_invalid",
]

KINDS = ("apns", "fcm")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
_MAX_BODY = 16 * 1024 * 1024


# ---------------------------------------------------------------------------
# Pure functions of the seed
# ---------------------------------------------------------------------------


def _unit(seed: int, *parts: object) -> float:
    """A number in [0, 1) that is a pure function of ``seed`` and ``parts``."""
    text = ":".join([str(seed), *map(str, parts)])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _bare(token: str) -> tuple[str | None, str]:
    for kind in KINDS:
        if token.startswith(kind + ":"):
            return kind, token[len(kind) + 1 :]
    return None, token


def token_invalid(seed: int, token: str, invalid_ratio: float, kind: str | None = None) -> bool:
    """Whether a provider with this seed answers ``invalid_token`` for ``token``.

    An ``apns:``/``fcm:`` prefix is ignored, except that a token of another
    provider's kind than ``kind`` is invalid.
    """
    prefix, bare = _bare(token)
    if kind is not None and prefix is not None and prefix != kind:
        return True
    if bare.startswith("invalid-"):
        return True
    digest = hashlib.sha256(f"{seed}:{bare}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < invalid_ratio


def in_burst(seed: int, seq: int, burst_every: int, burst_len: int) -> bool:
    """Whether send request ``seq`` falls in a 5xx burst: the last ``burst_len`` of
    every ``burst_every`` requests, shifted by a phase drawn from the seed."""
    if burst_every <= 0 or burst_len <= 0:
        return False
    phase = int(_unit(seed, "phase") * burst_every)
    return (seq + phase) % burst_every >= burst_every - burst_len


# ---------------------------------------------------------------------------
# The simulated provider (state and rules, no I/O)
# ---------------------------------------------------------------------------


@dataclass
class ProviderConfig:
    kind: str = "apns"
    seed: int = 0
    latency_ms: float = 3.0
    invalid_ratio: float = 0.01
    burst_every: int = 0
    burst_len: int = 0
    rate_limit: float = 0.0  # send requests per second; 0 = unlimited
    rate_burst: float = 0.0  # bucket size; 0 = max(1, rate_limit)
    rate_unit: str = "requests"  # or "messages": what --rate-limit counts


class ProviderSim:
    """The provider's rules and memory; :meth:`send` is one ``POST /v1/send``."""

    def __init__(self, config: ProviderConfig, clock: Any = time.monotonic) -> None:
        if config.rate_unit not in ("requests", "messages"):
            raise ValueError(f"rate_unit must be requests or messages, got {config.rate_unit!r}")
        if config.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {config.kind!r}")
        self.config = config
        self.clock = clock
        self.seq = 0
        self.shown: dict[str, dict[str, float | int]] = {}
        self.repeats: dict[str, int] = {}
        self.stats = {
            "requests": 0,
            "messages": 0,
            "shown": 0,
            "repeats": 0,
            "invalid": 0,
            "5xx": 0,
            "429": 0,
        }
        self._forced_mode: str | None = None
        self._forced_left = 0
        self._forced_retry_after = 1.0
        self._capacity = config.rate_burst or max(1.0, config.rate_limit)
        self._tokens = self._capacity
        self._refilled = clock()

    # -- faults -------------------------------------------------------------

    def force(self, mode: str, requests: int, retry_after: float = 1.0) -> None:
        if mode not in ("5xx", "429", "ok"):
            raise ValueError(f"mode must be 5xx, 429 or ok, got {mode!r}")
        if requests < 0 or retry_after < 0:
            raise ValueError("requests and retry_after must be >= 0")
        self._forced_mode, self._forced_left = mode, requests
        self._forced_retry_after = retry_after

    def _over_rate(self, n_messages: int) -> float | None:
        """None when a send may pass now (taking its tokens), else seconds to wait."""
        rate = self.config.rate_limit
        if rate <= 0:
            return None
        cost = float(n_messages) if self.config.rate_unit == "messages" else 1.0
        now = self.clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        need = min(cost, self._capacity)
        if self._tokens >= need:
            self._tokens -= cost
            return None
        return (need - self._tokens) / rate

    def admit(self, n_messages: int = 1) -> tuple[int, int, float]:
        """Number the next send request (of ``n_messages``) and decide its fate:
        ``(seq, status, retry_after)``; status 200 means serve it."""
        self.seq += 1
        self.stats["requests"] += 1
        seq, cfg = self.seq, self.config
        mode = None
        if self._forced_left > 0:
            self._forced_left -= 1
            mode = self._forced_mode
        if mode == "429":
            self.stats["429"] += 1
            return seq, 429, self._forced_retry_after
        burst = mode is None and in_burst(cfg.seed, seq, cfg.burst_every, cfg.burst_len)
        if mode == "5xx" or burst:
            self.stats["5xx"] += 1
            return seq, (500, 502, 503)[int(_unit(cfg.seed, "code", seq) * 3)], 0.0
        if mode is None:
            wait = self._over_rate(n_messages)
            if wait is not None:
                self.stats["429"] += 1
                return seq, 429, wait
        return seq, 200, 0.0

    def latency(self, seq: int) -> float:
        """Seconds request ``seq`` takes: ``latency_ms`` on average, +-50% jitter."""
        return self.config.latency_ms / 1000.0 * (0.5 + _unit(self.config.seed, "lat", seq))

    def deliver(self, messages: list[dict[str, Any]]) -> list[dict[str, str]]:
        """Answer each message of an accepted batch (and remember what was shown)."""
        cfg, now = self.config, time.time()
        results = []
        for m in messages:
            mid, token = m["id"], m["token"]
            if token_invalid(cfg.seed, token, cfg.invalid_ratio, cfg.kind):
                status = "invalid_token"
                self.stats["invalid"] += 1
            elif mid in self.shown:
                status = "duplicate"
                self.repeats[mid] = self.repeats.get(mid, 0) + 1
                self.stats["repeats"] += 1
            else:
                status = "ok"
                self.shown[mid] = {"count": 1, "first": now}
                self.stats["shown"] += 1
            results.append({"id": mid, "status": status})
        self.stats["messages"] += len(messages)
        return results

    def deliveries(self) -> dict[str, Any]:
        return {"shown": self.shown, "repeats": self.repeats}

    def stats_doc(self) -> dict[str, Any]:
        return {**self.stats, "kind": self.config.kind, "seq": self.seq}


def _parse_messages(body: bytes) -> list[dict[str, Any]]:
    doc = json.loads(body)
    msgs = doc.get("messages") if isinstance(doc, dict) else None
    if not isinstance(msgs, list):
        raise ValueError('body must be {"messages": [...]}')
    for m in msgs:
        if not (isinstance(m, dict) and isinstance(m.get("id"), str)):
            raise ValueError("each message needs a string id")
        if not isinstance(m.get("token"), str):
            raise ValueError("each message needs a string token")
    return msgs


# ---------------------------------------------------------------------------
# HTTP/1.1 server (asyncio streams, keep-alive, Content-Length bodies only)
# ---------------------------------------------------------------------------


class ProviderServer:
    def __init__(self, sim: ProviderSim) -> None:
        self.sim = sim
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._connection, host, port, backlog=512)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    await self._write(writer, 431, {"error": "headers too large"}, close=True)
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, target, version = lines[0].split(" ", 2)
                except ValueError:
                    await self._write(writer, 400, {"error": "bad request line"}, close=True)
                    return
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    await self._write(writer, 501, {"error": "chunked bodies"}, close=True)
                    return
                try:
                    length = int(headers.get("content-length", "0"))
                    if not 0 <= length <= _MAX_BODY:
                        raise ValueError(length)
                except ValueError:
                    await self._write(writer, 413, {"error": "bad content-length"}, close=True)
                    return
                try:
                    body = await reader.readexactly(length) if length else b""
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                conn = headers.get("connection", "").lower()
                close = conn == "close" or (version != "HTTP/1.1" and conn != "keep-alive")
                status, doc, extra = await self._route(method, target.split("?", 1)[0], body)
                await self._write(writer, status, doc, close=close, extra=extra)
                if close:
                    return
        except ConnectionError:
            return
        except asyncio.CancelledError:
            # stop(): end normally, or asyncio's stream callback logs the cancelled task
            return
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _write(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        doc: Any,
        *,
        close: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        body = json.dumps(doc, separators=(",", ":")).encode()
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        if close:
            head.append("Connection: close")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _route(
        self, method: str, path: str, body: bytes
    ) -> tuple[int, Any, dict[str, str] | None]:
        sim = self.sim
        if path == "/v1/send":
            if method != "POST":
                return 405, {"error": "POST only"}, None
            try:
                messages = _parse_messages(body)
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                return 400, {"error": str(exc)}, None
            seq, status, retry_after = sim.admit(len(messages))
            if status == 429:
                return (
                    429,
                    {"reason": "TooManyRequests", "retry_after": retry_after},
                    {"Retry-After": f"{retry_after:.3f}"},
                )
            await asyncio.sleep(sim.latency(seq))
            if status != 200:
                return status, {"reason": "ServiceUnavailable", "seq": seq}, None
            return 200, {"results": sim.deliver(messages)}, None
        if path == "/v1/faults":
            if method != "POST":
                return 405, {"error": "POST only"}, None
            try:
                doc = json.loads(body)
                sim.force(
                    str(doc["mode"]), int(doc["requests"]), float(doc.get("retry_after", 1.0))
                )
            except (ValueError, KeyError, TypeError) as exc:
                return 400, {"error": f"bad faults body: {exc}"}, None
            return 200, {"ok": True}, None
        if method != "GET":
            return 405, {"error": "GET only"}, None
        if path == "/v1/stats":
            return 200, sim.stats_doc(), None
        if path == "/v1/deliveries":
            return 200, sim.deliveries(), None
        if path == "/health":
            return 200, {"ok": True, "kind": sim.config.kind}, None
        return 404, {"error": f"no route {path}"}, None


# ---------------------------------------------------------------------------
# Program
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.notify.providers", description=__doc__)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = a free port (printed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=3.0)
    p.add_argument("--invalid-ratio", type=float, default=0.01)
    p.add_argument("--burst-every", type=int, default=0, help="5xx burst period, in requests")
    p.add_argument("--burst-len", type=int, default=0, help="requests refused per period")
    p.add_argument("--rate-limit", type=float, default=0.0, help="send requests/s (0 = none)")
    p.add_argument("--rate-burst", type=float, default=0.0, help="bucket size (default: rate)")
    p.add_argument("--rate-unit", choices=("requests", "messages"), default="requests")
    p.add_argument("--record", type=Path, help="write the deliveries JSON here on exit")
    return p


async def _serve(args: argparse.Namespace) -> None:
    sim = ProviderSim(
        ProviderConfig(
            kind=args.kind,
            seed=args.seed,
            latency_ms=args.latency_ms,
            invalid_ratio=args.invalid_ratio,
            burst_every=args.burst_every,
            burst_len=args.burst_len,
            rate_limit=args.rate_limit,
            rate_burst=args.rate_burst,
            rate_unit=args.rate_unit,
        )
    )
    server = ProviderServer(sim)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await server.start(args.host, args.port)
    print(f"READY {port}", flush=True)
    print(f"{args.kind} provider listening on {args.host}:{port} seed={args.seed}", file=sys.stderr)
    await stop.wait()
    await server.stop()
    if args.record is not None:
        doc = {"kind": args.kind, "stats": sim.stats_doc(), **sim.deliveries()}
        tmp = args.record.with_name(args.record.name + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, args.record)
    print(f"{args.kind} provider stopped: {json.dumps(sim.stats_doc())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    asyncio.run(_serve(args))
    return 0


# ---------------------------------------------------------------------------
# Starting one from Python (tests, the demo)
# ---------------------------------------------------------------------------

_ROOT = Path(__file__).resolve().parents[2]


class ProviderProcess:
    """A provider OS process: ``start`` waits for ``READY <port>``; ``stop`` sends
    SIGTERM and waits (SIGKILL after ``timeout``). Also a context manager."""

    def __init__(self, kind: str, seed: int = 0, *args: str, stderr: Any = None) -> None:
        self.argv = [
            sys.executable, "-m", "examples.notify.providers",
            "--kind", kind, "--port", "0", "--seed", str(seed), *args,
        ]  # fmt: skip
        self.kind = kind
        self.stderr = stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> ProviderProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            self.argv, cwd=_ROOT, env=env, stdout=subprocess.PIPE, stderr=self.stderr
        )
        assert self.proc.stdout is not None
        fd, line = self.proc.stdout.fileno(), b""
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.stop()
                raise RuntimeError(f"provider gave no READY line within {timeout} s")
            chunk = os.read(fd, 1)
            if not chunk:
                code = self.proc.wait()
                self.stop()
                raise RuntimeError(f"provider exited with {code} before READY")
            line += chunk
        if not line.startswith(b"READY "):
            self.stop()
            raise RuntimeError(f"unexpected first line from the provider: {line!r}")
        self.port = int(line.split()[1])
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait; the exit code (None if it had to be killed)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        code: int | None
        try:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        if proc.stdout is not None:
            proc.stdout.close()
        return code

    def __enter__(self) -> ProviderProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())

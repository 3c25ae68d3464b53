"""A simulated exchange: a tick feed over TCP (JSON lines) and a rate-limited history API.

Run it as a program (standard library only)::

    python3 exchange.py --port 7461 --http-port 7462 --seed 1 --symbols 50

Symbols ``S00``..``S49`` tick at Zipf-like skewed rates (``S00`` the busiest).
Tick ``seq`` of a symbol (1, 2, 3, ...) is a pure function of the seed, the
symbol and ``seq``: its price, size and its timestamp ``epoch + offset``. Only
*when* a tick is published is driven by the wall clock, so an exchange
restarted with the same epoch (``--epoch`` or ``--state-file``) carries on
where time says it is and can serve every earlier tick from history.

Feed (``--port``): connect, send ``{"op": "subscribe", "symbols": [...]}``
(``"*"`` for all); the answer is ``{"type": "subscribed", "next": {symbol:
seq}, "session": ...}`` naming the first seq each symbol will carry, then one
``{"type": "tick", "symbol", "seq", "ts", "price", "size"}`` line per tick and
``{"type": "hb", "ts"}`` every ``--heartbeat`` seconds.

HTTP (``--http-port``, one request per connection):

- ``GET /history?symbol=S00&from_seq=1&to_seq=50`` (or ``from_ts``/``to_ts``,
  and ``limit``): exactly those ticks that exist so far, ``next_seq`` set when
  ``limit`` cut the answer short. A token bucket (``--history-rate`` requests/s,
  ``--history-burst``) answers ``429`` with ``Retry-After`` when exceeded.
- ``GET /stats``: ticks generated per symbol, history requests, 429 count.
- ``GET /health``.

Readiness: ``READY=1`` over ``NOTIFY_SOCKET`` (sd_notify) when both ports
listen, and a line ``exchange listening feed=P http=H`` on stdout. With
``WATCHDOG_USEC`` set (a supervisor's watchdog), ``WATCHDOG=1`` comes from the
publishing loop three times per period.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import signal
import socket
import sys
import time
from bisect import bisect_left, bisect_right
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "Book",
    "Exchange",
    "TokenBucket",
    "main",
    "symbol_names",
    "symbol_rates",
    "symbol_weights",
]


# ---------------------------------------------------------------------------
# Pure functions: symbols, volumes, ticks
# ---------------------------------------------------------------------------


def symbol_names(n: int) -> list[str]:
    """``n`` symbol names, busiest first: ``S00``, ``S01``, ... (wider for n > 100).

    Example::

        assert symbol_names(3) == ["S00", "S01", "S02"]
    """
    if n < 1:
        raise ValueError(f"symbols must be >= 1, got {n}")
    width = max(2, len(str(n - 1)))
    return [f"S{i:0{width}d}" for i in range(n)]


def symbol_weights(n: int, skew: float = 1.0) -> list[float]:
    """Zipf-like volume shares (sum 1): symbol ``i`` gets ``1/(i+1)**skew``, normalised."""
    raw = [1.0 / (i + 1) ** skew for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def symbol_rates(n: int, rate: float, skew: float = 1.0) -> list[float]:
    """Ticks per second of each of ``n`` symbols when all together tick ``rate`` per second."""
    return [rate * w for w in symbol_weights(n, skew)]


def _digest(seed: int, symbol: str, seq: int) -> bytes:
    return hashlib.blake2b(f"{seed}/{symbol}/{seq}".encode(), digest_size=16).digest()


def _unit(b: bytes) -> float:
    """A float in [0, 1) from 7 bytes."""
    return int.from_bytes(b[:7], "big") / 2**56


class Book:
    """One symbol's ticks so far: ``ts``, ``price`` and ``size`` lists (index ``seq - 1``).

    Tick ``n`` is due at ``epoch + (n - 1 + u_n) / rate`` with ``u_n`` in [0, 1)
    from the hash of (seed, symbol, n): increasing, irregular, deterministic.
    """

    __slots__ = ("epoch", "next_ts", "price", "rate", "seed", "size", "symbol", "ts")

    def __init__(self, symbol: str, rate: float, seed: int, epoch: float) -> None:
        self.symbol = symbol
        self.rate = rate
        self.seed = seed
        self.epoch = epoch
        self.ts: list[float] = []
        self.price: list[float] = []
        self.size: list[int] = []
        self.next_ts = self._ts_of(1, _digest(seed, symbol, 1))

    def __len__(self) -> int:
        return len(self.ts)

    def _ts_of(self, seq: int, d: bytes) -> float:
        return round(self.epoch + (seq - 1 + _unit(d)) / self.rate, 6)

    def advance(self, now: float) -> int:
        """Generate every tick due by ``now``; returns how many were new."""
        start = len(self.ts)
        while self.next_ts <= now:
            seq = len(self.ts) + 1
            d = _digest(self.seed, self.symbol, seq)
            if seq == 1:
                base = int.from_bytes(_digest(self.seed, self.symbol, 0)[:4], "big") % 49000
                price = round(10.0 + base / 100, 4)
            else:
                step = (_unit(d[7:14]) - 0.5) * 0.002
                price = max(0.01, round(self.price[-1] * (1.0 + step), 4))
            self.ts.append(self.next_ts)
            self.price.append(price)
            self.size.append(1 + d[14] % 100)
            nxt = seq + 1
            self.next_ts = self._ts_of(nxt, _digest(self.seed, self.symbol, nxt))
        return len(self.ts) - start

    def tick(self, seq: int) -> dict[str, Any]:
        """Tick ``seq`` (1-based) as a JSON-ready dict."""
        i = seq - 1
        return {
            "symbol": self.symbol,
            "seq": seq,
            "ts": self.ts[i],
            "price": self.price[i],
            "size": self.size[i],
        }

    def seq_range_for_ts(self, from_ts: float | None, to_ts: float | None) -> tuple[int, int]:
        """The seqs whose timestamps lie in ``[from_ts, to_ts]`` (an empty range is a > b)."""
        lo = 0 if from_ts is None else bisect_left(self.ts, from_ts)
        hi = len(self.ts) if to_ts is None else bisect_right(self.ts, to_ts)
        return lo + 1, hi


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full.

    Example::

        b = TokenBucket(10.0, 5.0)
        assert b.take(time.monotonic())
    """

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at: float | None = None

    def _refill(self, now: float) -> None:
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if there are enough."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def wait_time(self, now: float, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are there."""
        self._refill(now)
        return max(0.0, (n - self.tokens) / self.rate)


# ---------------------------------------------------------------------------
# The exchange
# ---------------------------------------------------------------------------


class _Subscriber:
    __slots__ = ("symbols", "writer")

    def __init__(self, writer: asyncio.StreamWriter, symbols: set[str]) -> None:
        self.writer = writer
        self.symbols = symbols


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Exchange:
    """The feed and the history API of ``symbols`` symbols; see the module docstring."""

    def __init__(
        self,
        *,
        seed: int = 1,
        symbols: int = 50,
        rate: float = 200.0,
        skew: float = 1.0,
        epoch: float | None = None,
        history_rate: float = 20.0,
        history_burst: float = 10.0,
        history_max: int = 5000,
        heartbeat: float = 0.25,
        tick_interval: float = 0.01,
        max_buffer: int = 8 * 2**20,
    ) -> None:
        self.seed = seed
        self.rate = rate
        self.epoch = time.time() if epoch is None else epoch
        names = symbol_names(symbols)
        rates = symbol_rates(symbols, rate, skew)
        self.books = {s: Book(s, r, seed, self.epoch) for s, r in zip(names, rates, strict=True)}
        self.session = f"{seed}:{symbols}:{rate:g}:{skew:g}:{self.epoch:.6f}"
        self.bucket = TokenBucket(history_rate, history_burst)
        self.history_max = history_max
        self.heartbeat = heartbeat
        self.tick_interval = tick_interval
        self.max_buffer = max_buffer
        self.subscribers: set[_Subscriber] = set()
        self.history_requests = 0
        self.rejected_429 = 0
        self.dropped_subscribers = 0
        self.advance(time.time())

    def advance(self, now: float) -> dict[str, tuple[int, int]]:
        """Generate every tick due by ``now``; ``{symbol: (first new seq, last seq)}``."""
        out = {}
        for s, book in self.books.items():
            before = len(book)
            if book.advance(now):
                out[s] = (before + 1, len(book))
        return out

    # -- feed -----------------------------------------------------------------------
    async def feed_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sub = None
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 10.0)
                symbols = self._subscription(line)
            except _BadRequest as e:
                writer.write(_line({"type": "error", "error": str(e)}))
                return
            except TimeoutError:
                return
            sub = _Subscriber(writer, symbols)
            nxt = {s: len(self.books[s]) + 1 for s in sorted(symbols)}
            writer.write(_line({"type": "subscribed", "next": nxt, "session": self.session}))
            self.subscribers.add(sub)
            while await reader.read(4096):  # nothing more is expected; wait for EOF
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            if sub is not None:
                self.subscribers.discard(sub)
            writer.close()

    def _subscription(self, line: bytes) -> set[str]:
        try:
            msg = json.loads(line)
        except ValueError:
            raise _BadRequest(400, "expected a JSON subscribe message") from None
        if not isinstance(msg, dict) or msg.get("op") != "subscribe":
            raise _BadRequest(400, 'expected {"op": "subscribe", "symbols": [...]}')
        symbols = msg.get("symbols")
        if symbols == "*":
            return set(self.books)
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise _BadRequest(400, 'symbols must be a list of names or "*"')
        unknown = sorted(set(symbols) - set(self.books))
        if unknown:
            raise _BadRequest(400, f"unknown symbols: {', '.join(unknown)}")
        return set(symbols)

    def publish(self, new: dict[str, tuple[int, int]], heartbeat: bool) -> None:
        """Send the new ticks (and a heartbeat) to every subscriber."""
        lines: dict[str, bytes] = {}
        for s, (a, b) in new.items():
            book = self.books[s]
            lines[s] = b"".join(_line({"type": "tick", **book.tick(q)}) for q in range(a, b + 1))
        hb = _line({"type": "hb", "ts": round(time.time(), 6)}) if heartbeat else b""
        for sub in list(self.subscribers):
            chunk = b"".join(lines[s] for s in lines if s in sub.symbols) + hb
            if not chunk:
                continue
            transport = sub.writer.transport
            if transport.is_closing():
                continue
            if transport.get_write_buffer_size() > self.max_buffer:
                self.dropped_subscribers += 1  # too slow: it reconnects and backfills
                self.subscribers.discard(sub)
                transport.abort()
                continue
            sub.writer.write(chunk)

    async def run(self, stop: asyncio.Event, watchdog: float | None = None) -> None:
        """Publish ticks as they come due until ``stop`` is set; with ``watchdog``
        seconds, send sd_notify ``WATCHDOG=1`` three times per period from this loop
        (a stopped or stuck exchange misses it and its supervisor calls it hung)."""
        last_hb = last_wd = 0.0
        while not stop.is_set():
            now = time.time()
            beat = now - last_hb >= self.heartbeat
            if beat:
                last_hb = now
            if watchdog is not None and now - last_wd >= watchdog / 3:
                last_wd = now
                sd_notify("WATCHDOG=1")
            self.publish(self.advance(now), beat)
            try:
                await asyncio.wait_for(stop.wait(), self.tick_interval)
            except TimeoutError:
                pass

    # -- HTTP -----------------------------------------------------------------------
    async def http_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            request = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request.split()
            extra: dict[str, str]
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                status, body, extra = 400, {"error": f"bad request line {request!r}"}, {}
            else:
                status, body, extra = self.route(parts[0], parts[1])
            payload = json.dumps(body, separators=(",", ":")).encode()
            reason = _REASONS.get(status, "Error")
            headers = [
                f"HTTP/1.1 {status} {reason}",
                "Content-Type: application/json",
                f"Content-Length: {len(payload)}",
                "Connection: close",
                *(f"{k}: {v}" for k, v in extra.items()),
            ]
            writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + payload)
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
            OSError,
        ):
            pass
        finally:
            writer.close()

    def route(self, method: str, target: str) -> tuple[int, Any, dict[str, str]]:
        """The status, JSON body and extra headers for one request."""
        url = urlsplit(target)
        if method != "GET":
            return 405, {"error": f"method {method} not allowed; use GET"}, {"Allow": "GET"}
        if url.path == "/health":
            return 200, {"ok": True}, {}
        if url.path == "/stats":
            return 200, self.stats(), {}
        if url.path != "/history":
            return 404, {"error": f"no such path {url.path!r}; try /history or /stats"}, {}
        self.history_requests += 1
        now = time.monotonic()
        if not self.bucket.take(now):
            self.rejected_429 += 1
            wait = self.bucket.wait_time(now)
            return 429, {"error": "rate limit exceeded"}, {"Retry-After": f"{wait:.3f}"}
        try:
            return 200, self.history(parse_qs(url.query, keep_blank_values=True)), {}
        except _BadRequest as e:
            return e.status, {"error": str(e)}, {}

    def history(self, q: dict[str, list[str]]) -> dict[str, Any]:
        """The answer to ``/history`` for query ``q``; raises ``_BadRequest``."""
        known = {"symbol", "from_seq", "to_seq", "from_ts", "to_ts", "limit"}
        unknown = sorted(set(q) - known)
        if unknown:
            raise _BadRequest(
                400, f"unknown parameter {unknown[0]!r}; use {', '.join(sorted(known))}"
            )
        symbol = _one(q, "symbol")
        if symbol is None:
            raise _BadRequest(400, "missing parameter 'symbol'")
        book = self.books.get(symbol)
        if book is None:
            raise _BadRequest(404, f"unknown symbol {symbol!r}")
        by_seq = "from_seq" in q or "to_seq" in q
        by_ts = "from_ts" in q or "to_ts" in q
        if by_seq and by_ts:
            raise _BadRequest(400, "give from_seq/to_seq or from_ts/to_ts, not both")
        last = len(book)
        if by_ts:
            a, b = book.seq_range_for_ts(_num(q, "from_ts", float), _num(q, "to_ts", float))
        else:
            a_given = _num(q, "from_seq", int)
            a = 1 if a_given is None else a_given
            b_given = _num(q, "to_seq", int)
            b = last if b_given is None else min(b_given, last)
            if a < 1:
                raise _BadRequest(400, f"from_seq must be >= 1, got {a}")
        limit_given = _num(q, "limit", int)
        limit = self.history_max if limit_given is None else limit_given
        if limit < 1:
            raise _BadRequest(400, f"limit must be >= 1, got {limit}")
        limit = min(limit, self.history_max)
        end = min(b, a + limit - 1)
        ticks = [book.tick(s) for s in range(a, end + 1)]
        return {
            "symbol": symbol,
            "from_seq": a,
            "to_seq": end if ticks else None,
            "last_seq": last,
            "next_seq": end + 1 if end < b else None,
            "ticks": ticks,
        }

    def stats(self) -> dict[str, Any]:
        """Counters for ``/stats``."""
        generated = {s: len(b) for s, b in self.books.items()}
        return {
            "session": self.session,
            "seed": self.seed,
            "epoch": self.epoch,
            "symbols": len(self.books),
            "rate": self.rate,
            "generated": generated,
            "ticks_total": sum(generated.values()),
            "history_requests": self.history_requests,
            "rejected_429": self.rejected_429,
            "subscribers": len(self.subscribers),
            "dropped_subscribers": self.dropped_subscribers,
        }


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
}


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _one(q: dict[str, list[str]], key: str) -> str | None:
    values = q.get(key)
    if not values:
        return None
    if len(values) > 1:
        raise _BadRequest(400, f"parameter {key!r} given {len(values)} times")
    return values[0]


def _num(q: dict[str, list[str]], key: str, kind: type[int] | type[float]) -> Any:
    text = _one(q, key)
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise _BadRequest(400, f"parameter {key!r} must be {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise _BadRequest(400, f"parameter {key!r} must be finite, got {text!r}")
    return value


# ---------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------


def _parent_start(ppid: int) -> str | None:
    try:
        with open(f"/proc/{ppid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def resolve_epoch(epoch: float | None, state_file: str | None) -> float:
    """``epoch`` if given; else the epoch kept in ``state_file`` for our parent process
    (so a restart under the same supervisor keeps the sequence); else now."""
    if epoch is not None:
        return epoch
    now = time.time()
    if state_file is None:
        return now
    ppid = os.getppid()
    state_file = state_file.replace("{ppid}", str(ppid))
    owner = {"ppid": ppid, "parent_start": _parent_start(ppid)}
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        if {k: state.get(k) for k in owner} == owner and isinstance(state.get("epoch"), float):
            return float(state["epoch"])
    except (OSError, ValueError):
        pass
    tmp = f"{state_file}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({**owner, "epoch": now}, f)
    os.replace(tmp, state_file)
    return now


def sd_notify(message: str) -> bool:
    """Send ``message`` to ``NOTIFY_SOCKET`` if set (systemd's readiness protocol)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)
    return True


def _positive(kind: type[int] | type[float]) -> Any:
    def check(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    return check


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"a port is 0-65535 (0: any free port), got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="exchange", description="A simulated market-data exchange.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=7461, help="feed port (0: any free port)")
    p.add_argument("--http-port", type=_port, default=7462, help="history API port (0: any)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--symbols", type=_positive(int), default=50)
    p.add_argument("--rate", type=_positive(float), default=200.0, help="ticks/s, all symbols")
    p.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of the volumes")
    p.add_argument("--epoch", type=float, default=None, help="wall time of seq 0 (default: now)")
    p.add_argument(
        "--state-file",
        default=None,
        help="keep the epoch in this file across restarts under the same parent process "
        "('{ppid}' is replaced by the parent's pid)",
    )
    p.add_argument("--history-rate", type=_positive(float), default=20.0, help="requests/s")
    p.add_argument("--history-burst", type=_positive(float), default=10.0)
    p.add_argument("--history-max", type=_positive(int), default=5000, help="ticks per answer")
    p.add_argument("--heartbeat", type=_positive(float), default=0.25)
    p.add_argument("--tick-interval", type=_positive(float), default=0.01)
    args = p.parse_args(argv)
    if args.history_burst < 1:
        p.error(f"--history-burst must be >= 1, got {args.history_burst}")
    return args


async def serve(args: argparse.Namespace) -> int:
    """Run the exchange until SIGTERM/SIGINT; returns the exit code."""
    ex = Exchange(
        seed=args.seed,
        symbols=args.symbols,
        rate=args.rate,
        skew=args.skew,
        epoch=resolve_epoch(args.epoch, args.state_file),
        history_rate=args.history_rate,
        history_burst=args.history_burst,
        history_max=args.history_max,
        heartbeat=args.heartbeat,
        tick_interval=args.tick_interval,
    )
    try:
        feed = await asyncio.start_server(ex.feed_client, args.host, args.port)
        http = await asyncio.start_server(ex.http_client, args.host, args.http_port)
    except OSError as e:
        print(f"exchange: cannot listen on {args.host}: {e}", file=sys.stderr, flush=True)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    feed_port = feed.sockets[0].getsockname()[1]
    http_port = http.sockets[0].getsockname()[1]
    print(f"exchange listening feed={feed_port} http={http_port}", flush=True)
    sd_notify("READY=1")
    usec = os.environ.get("WATCHDOG_USEC", "")
    try:
        await ex.run(stop, int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else None)
    finally:
        feed.close()
        http.close()
        for sub in list(ex.subscribers):
            sub.writer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and serve; the program's exit code."""
    return asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

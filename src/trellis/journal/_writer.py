"""The journal writer: telemetry in, hash-chained records out, on a thread of its own.

The telemetry handler runs in the emitter (the event loop) and only appends
``(time.time(), event)`` to a bounded deque; a writer thread turns events into records,
chains and hashes them, and commits them in groups (``batch_size`` events pending, or
``flush_interval`` seconds after the oldest pending one; whatever piled up during a
commit goes into the next transaction, up to ``max_batch``). A supervisor never waits
on the disk.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from trellis import Pid
from trellis._core import _telemetry

from ._errors import JournalError
from ._format import (
    Content,
    chain,
    checkpoint_mac,
    content_of,
    drop_content,
    failed_content,
    parse_key,
    utc_text,
)
from ._store import Target, WriteStore, open_writer, parse_url

__all__ = ["Journal", "JournalStatistics"]

_log = logging.getLogger("trellis.journal")
_NEVER = 1 << 62
_OWN_EVENTS = frozenset({"journal.batch", "journal.dropped", "journal.error"})
_CLOSE_ATTEMPTS = 5  # commits retried this often while closing, then counted as dropped


@dataclass(frozen=True, slots=True)
class JournalStatistics:
    """Counters of a :class:`Journal` (read with :meth:`Journal.statistics`)."""

    #: records committed (events plus ``journal.dropped`` records)
    written: int
    #: events that did not fit in the buffer (each counted in a ``journal.dropped`` record)
    dropped: int
    #: transactions committed
    batches: int
    #: events handed over and not yet committed: what a kill -9 now would lose
    uncommitted: int
    #: the last committed seq (0 before the first record)
    seq: int
    #: signed checkpoints written by this journal
    checkpoints: int
    #: commit latency, seconds: total, last batch, worst batch
    commit_seconds: float
    last_commit_seconds: float
    max_commit_seconds: float


class _Drops:
    """A marker in the buffer where events were dropped: the writer turns it into a
    ``journal.dropped`` record at that place in the chain."""

    __slots__ = ("count", "kinds", "mono", "wall")

    def __init__(self, wall: float, mono: float, kind: str) -> None:
        self.wall = wall
        self.mono = mono
        self.count = 1
        self.kinds = {kind: 1}


class _Flush:
    """A request in the buffer: commit everything before it, then call ``done``."""

    __slots__ = ("close", "done")

    def __init__(self, done: Callable[[], object], close: bool = False) -> None:
        self.done = done
        self.close = close


class Journal:
    """Append every telemetry event to a hash-chained, append-only journal.

    ``url`` chooses the backend: ``sqlite:///journal.db`` (relative path),
    ``sqlite:////var/lib/trellis/journal.db`` (absolute) or ``postgresql://...``. An
    existing journal is resumed: the chain continues from its last record.

    Args:
        node: the node name stored in every record (default: the host name).
        max_buffer: events held in memory while the writer is busy; beyond that an
            event is dropped, counted, and recorded as a ``journal.dropped`` record at
            that place in the chain (never silent).
        flush_interval: the longest an event waits before its batch is committed.
        batch_size: a batch is committed as soon as this many events are pending.
        max_batch: the most events one transaction takes when a backlog piled up.
        exclude: event names not journaled (the per-line ``process.output`` by
            default). The journal's own ``journal.*`` telemetry is never journaled.
        key: the checkpoint key (bytes, hex or text); default ``$TRELLIS_JOURNAL_KEY``.
            With a key, an HMAC-signed checkpoint of the chain head is written every
            ``checkpoint_every`` records and on close.
        checkpoint_every: records between signed checkpoints (only with a key).

    It is a :class:`trellis.Extension` (``await start()`` / ``await stop()``), and has
    sync ``open()`` / ``close()`` and context-manager forms. While it runs, the writer
    emits ``journal.batch`` (``events``, ``seconds``, ``seq``) after each commit and
    ``journal.dropped`` (``count``) when events were dropped, on the event loop it was
    started from (no loop: no telemetry, the counters still count).

    **What a kill -9 loses.** An event is durable once its batch has committed (one
    transaction; SQLite in WAL mode with ``synchronous=FULL`` fsyncs it). A crash
    loses exactly the events handed over and not yet committed, :attr:`uncommitted` at
    that instant: the batch being committed (at most ``max_batch`` events) plus the
    events handed over since that batch was taken. The writer takes the next batch as
    soon as ``batch_size`` events are pending or the oldest has waited
    ``flush_interval`` seconds, so while it keeps up that is at most
    ``flush_interval`` seconds' worth of events plus those arriving during one commit.
    A writer that has fallen behind can lose at most ``max_buffer`` + ``max_batch``.
    A batch is never half-written, so the chain stays valid and
    ``trellis journal verify`` passes after a crash. An orderly ``stop()``/``close()``
    commits everything.

    Example::

        journal = Journal("sqlite:///journal.db")
        sys.exit(trellis.run(root, extensions=[journal]))

        with Journal("sqlite:///journal.db") as journal:   # without an event loop
            trellis.telemetry.emit("deploy.done", version="1.2")
    """

    def __init__(
        self,
        url: str,
        *,
        node: str | None = None,
        max_buffer: int = 100_000,
        flush_interval: float = 0.010,
        batch_size: int = 100,
        max_batch: int = 10_000,
        exclude: Iterable[str] = ("process.output",),
        key: str | bytes | None = None,
        checkpoint_every: int = 1000,
    ) -> None:
        self.target: Target = parse_url(url)
        for name, value in (
            ("max_buffer", max_buffer),
            ("batch_size", batch_size),
            ("max_batch", max_batch),
            ("checkpoint_every", checkpoint_every),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Journal {name}: {value!r} is not an int >= 1")
        if not isinstance(flush_interval, int | float) or not flush_interval >= 0:
            raise ValueError(f"Journal flush_interval: {flush_interval!r} is not seconds >= 0")
        if isinstance(exclude, str):
            raise ValueError(f"Journal exclude: give a list of event names, not {exclude!r}")
        self.url = url
        self.node = node if node is not None else socket.gethostname()
        self.max_buffer = max_buffer
        self.flush_interval = float(flush_interval)
        self.batch_size = batch_size
        self.max_batch = max(max_batch, batch_size)
        self.exclude = frozenset(exclude)
        self.checkpoint_every = checkpoint_every
        self._key = parse_key(key)
        self._skip = self.exclude | _OWN_EVENTS

        self.written = 0
        self.dropped = 0
        self.batches = 0
        self.checkpoints = 0
        self.seq = 0
        self.commit_seconds = 0.0
        self.last_commit_seconds = 0.0
        self.max_commit_seconds = 0.0

        self._buf: deque[Any] = deque()
        self._lock = threading.Lock()  # buffer takes and the overflow path
        self._wake = threading.Event()
        self._wake_at = _NEVER  # the handler wakes the writer when the buffer reaches this
        self._urgent = 0  # flush requests in the buffer
        self._in_flight = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hid: object | None = None
        self._store: WriteStore | None = None
        self._cp_seq = 0
        self._open_error: BaseException | None = None
        self._closed = False
        self._stopping = False

    def __repr__(self) -> str:
        state = "open" if self.running else "closed"
        return f"<Journal {self.target.shown} {state} seq={self.seq}>"

    # ------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the writer is running (between open/start and close/stop)."""
        return self._thread is not None and self._thread.is_alive() and not self._closed

    async def start(self) -> None:
        """Open the store (on the writer thread), start the writer, attach the handler.
        Raises :class:`JournalError` if the journal cannot be opened."""
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()

        def ready(err: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, opened, err)

        self._loop = loop
        self._launch(ready)
        await opened
        self._hid = _telemetry.attach(self._on_event)

    async def tree_started(self, root: Pid, request_stop: Callable[[], None]) -> None:
        """Nothing to do: events flow from the start."""

    async def stop(self) -> None:
        """Detach, commit everything handed over, write the closing checkpoint, close."""
        if self._thread is None or self._closed:
            return
        self._detach()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._request(_Flush(lambda: loop.call_soon_threadsafe(_settle, done, None), close=True))
        await done
        self._join()

    def open(self) -> Journal:
        """The sync form of :meth:`start` (blocks until the store is open); returns self."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        opened = threading.Event()
        self._launch(lambda err: opened.set())
        opened.wait()
        if self._open_error is not None:
            raise self._open_error
        self._hid = _telemetry.attach(self._on_event)
        return self

    def close(self) -> None:
        """The sync form of :meth:`stop` (blocks until everything is committed)."""
        if self._thread is None or self._closed:
            return
        self._detach()
        done = threading.Event()
        self._request(_Flush(done.set, close=True))
        self._wait(done)
        self._join()

    def flush(self) -> None:
        """Block until every event handed over before the call is committed.

        Blocks the calling thread: inside the event loop use :meth:`wait_flushed`.
        """
        self._check_open()
        done = threading.Event()
        self._request(_Flush(done.set))
        self._wait(done)

    async def wait_flushed(self) -> None:
        """Wait (without blocking the loop) until every event handed over so far is
        committed."""
        self._check_open()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._request(_Flush(lambda: loop.call_soon_threadsafe(_settle, done, None)))
        await done

    def __enter__(self) -> Journal:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Journal:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------
    # Counters
    # ------------------------------------------------------------------

    @property
    def uncommitted(self) -> int:
        """Events handed over and not yet committed: what a kill -9 now would lose
        (see the class docstring for the bound)."""
        return max(0, len(self._buf) - self._urgent) + self._in_flight

    def statistics(self) -> JournalStatistics:
        """A snapshot of the counters.

        Example::

            s = journal.statistics()
            print(s.written, s.dropped, s.last_commit_seconds)
        """
        return JournalStatistics(
            written=self.written,
            dropped=self.dropped,
            batches=self.batches,
            uncommitted=self.uncommitted,
            seq=self.seq,
            checkpoints=self.checkpoints,
            commit_seconds=self.commit_seconds,
            last_commit_seconds=self.last_commit_seconds,
            max_commit_seconds=self.max_commit_seconds,
        )

    # ------------------------------------------------------------------
    # The loop side: the telemetry handler
    # ------------------------------------------------------------------

    def _on_event(self, event: dict[str, Any], _now: Callable[[], float] = time.time) -> None:
        if event["event"] in self._skip:
            return
        buf = self._buf
        if len(buf) < self.max_buffer:
            buf.append((_now(), event))
            if len(buf) >= self._wake_at:
                self._wake_at = _NEVER
                self._wake.set()
        else:
            self._overflow(event)

    def _overflow(self, event: dict[str, Any]) -> None:
        buf = self._buf
        with self._lock:  # the writer takes under this lock: a marker is never half-counted
            if len(buf) < self.max_buffer:  # drained meanwhile
                buf.append((time.time(), event))
            else:
                self.dropped += 1
                kind = str(event["event"])
                last = buf[-1] if buf else None
                if type(last) is _Drops:
                    last.count += 1
                    last.kinds[kind] = last.kinds.get(kind, 0) + 1
                else:
                    mono = event.get("time")
                    buf.append(
                        _Drops(
                            time.time(), float(mono) if isinstance(mono, int | float) else 0.0, kind
                        )
                    )
        if len(buf) >= self._wake_at:
            self._wake_at = _NEVER
            self._wake.set()

    # ------------------------------------------------------------------
    # Plumbing
    # ------------------------------------------------------------------

    def _launch(self, ready: Callable[[BaseException | None], None]) -> None:
        if self._thread is not None:
            raise JournalError(f"{self!r} was already started (a Journal runs once)")
        self._thread = threading.Thread(
            target=self._run,
            args=(ready,),
            name=f"trellis-journal {self.target.shown}",
            daemon=True,
        )
        self._thread.start()

    def _check_open(self) -> None:
        if not self.running:
            raise JournalError(f"{self!r} is not running")

    def _detach(self) -> None:
        if self._hid is not None:
            _telemetry.detach(self._hid)
            self._hid = None

    def _request(self, req: _Flush) -> None:
        if req.close:
            self._stopping = True  # a commit being retried now gives up after a few tries
        with self._lock:
            self._urgent += 1
            self._buf.append(req)
        self._wake_at = _NEVER
        self._wake.set()

    def _wait(self, done: threading.Event) -> None:
        while not done.wait(0.5):
            t = self._thread
            if t is None or not t.is_alive():
                raise JournalError(f"the writer of {self!r} has stopped")

    def _join(self) -> None:
        self._closed = True
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()

    def _emit(self, name: str, **fields: Any) -> None:
        """Emit telemetry on the owning event loop (handlers are not thread-safe)."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(functools.partial(_telemetry.emit, name, **fields))
        except RuntimeError:  # the loop is closed: nobody to tell
            pass

    # ------------------------------------------------------------------
    # The writer thread
    # ------------------------------------------------------------------

    def _run(self, ready: Callable[[BaseException | None], None]) -> None:
        try:
            store = self._store = open_writer(self.target)
            try:
                self.seq, _ = store.begin()
                self._cp_seq = store.last_checkpoint()[0]
            finally:
                store.rollback()
        except BaseException as e:
            self._open_error = e
            self._closed = True
            ready(e)
            return
        ready(None)
        try:
            self._loop_forever(store)
        except BaseException:
            _log.critical(
                "journal writer %r failed; events are no longer journaled", self, exc_info=True
            )
            self._fail_pending()
            raise
        finally:
            try:
                store.close()
            except Exception:
                _log.exception("closing %r", self)

    def _fail_pending(self) -> None:
        """The writer died: release anyone waiting on a flush."""
        with self._lock:
            items = list(self._buf)
            self._buf.clear()
        for it in items:
            if type(it) is _Flush:
                it.done()

    def _loop_forever(self, store: WriteStore) -> None:
        buf = self._buf
        wake = self._wake
        batch_size = self.batch_size
        interval = self.flush_interval
        node = self.node
        while True:
            if not buf:
                wake.clear()
                self._wake_at = 1
                if not buf:
                    wake.wait()
                self._wake_at = _NEVER
                continue
            if len(buf) < batch_size and not self._urgent:
                first = buf[0]
                if type(first) is tuple:
                    remaining = first[0] + interval - time.time()
                    if remaining > 0:
                        wake.clear()
                        self._wake_at = batch_size
                        if len(buf) < batch_size and not self._urgent:
                            wake.wait(min(remaining, interval))
                        self._wake_at = _NEVER
                        continue
            with self._lock:
                n = min(len(buf), self.max_batch)
                pop = buf.popleft
                items = [pop() for _ in range(n)]
                self._in_flight = n
            contents: list[Content] = []
            add = contents.append
            requests: list[_Flush] = []
            dropped = 0
            for it in items:
                if type(it) is tuple:
                    wall, event = it
                    try:
                        add(content_of(wall, event, node))
                    except Exception as e:  # a field whose repr raises, say
                        add(failed_content(wall, event, node, e))
                elif type(it) is _Drops:
                    add(drop_content(it.wall, it.mono, node, it.count, it.kinds))
                    dropped += it.count
                else:
                    requests.append(it)
            closing = any(r.close for r in requests)
            if contents or (closing and self._key is not None):
                self._commit(store, contents, closing)
            self._in_flight = 0
            if dropped:
                self._emit("journal.dropped", count=dropped)
            if requests:
                with self._lock:
                    self._urgent -= len(requests)
                for r in requests:
                    r.done()
            if closing:
                return

    def _commit(self, store: WriteStore, contents: list[Content], closing: bool) -> None:
        """Commit ``contents`` in one transaction, retrying on errors (a backlog builds
        meanwhile and overflows into counted drops). While closing, give up after a few
        attempts and count the events as dropped."""
        attempt = 0
        delay = 0.05
        last_hash: str | None = None  # of the previous attempt: did it commit after all?
        while True:
            t0 = time.perf_counter()
            checkpointed = False
            try:
                seq, prev = store.begin()
                if last_hash is not None and prev == last_hash:
                    store.rollback()  # the failed attempt committed (lost acknowledgement)
                    break
                rows = chain(seq, prev, contents)
                if rows:
                    store.insert(rows)
                    seq, prev = rows[-1][0], rows[-1][8]
                    last_hash = prev
                if self._key is not None and (
                    closing or seq - self._cp_seq >= self.checkpoint_every
                ):
                    checkpointed = self._checkpoint(store, self._key, seq, prev)
                store.commit()
                break
            except Exception as e:
                try:
                    store.rollback()
                except Exception:
                    pass
                attempt += 1
                _log.error(
                    "journal %s: commit of %d events failed (attempt %d): %s",
                    self.target.shown,
                    len(contents),
                    attempt,
                    e,
                )
                self._emit("journal.error", error=f"{type(e).__name__}: {e}", events=len(contents))
                if (closing or self._stopping) and attempt >= _CLOSE_ATTEMPTS:
                    self.dropped += len(contents)
                    _log.error(
                        "journal %s: %d events lost on close", self.target.shown, len(contents)
                    )
                    return
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                try:
                    store.reconnect()
                except Exception as e2:
                    _log.error("journal %s: reconnect failed: %s", self.target.shown, e2)
        dt = time.perf_counter() - t0
        self.seq = seq
        if checkpointed:
            self._cp_seq = seq
            self.checkpoints += 1
        if not contents:
            return
        self.written += len(contents)
        self.batches += 1
        self.commit_seconds += dt
        self.last_commit_seconds = dt
        if dt > self.max_commit_seconds:
            self.max_commit_seconds = dt
        self._emit("journal.batch", events=len(contents), seconds=dt, seq=seq)

    def _checkpoint(self, store: WriteStore, key: bytes, seq: int, hash: str) -> bool:
        """Sign the head ``(seq, hash)`` unless it is signed already; whether it wrote."""
        cp_seq, prev_mac = store.last_checkpoint()
        if cp_seq >= seq:
            return False
        utc = utc_text(time.time())
        store.insert_checkpoint((seq, hash, checkpoint_mac(key, seq, hash, utc, prev_mac), utc))
        return True


def _settle(fut: asyncio.Future[None], err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)

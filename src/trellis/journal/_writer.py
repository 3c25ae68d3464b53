"""The journal writer: telemetry in, hash-chained records out, in a process of its own.

The telemetry handler runs in the emitting thread (the event loop) and appends
``(time.time(), event)`` to a bounded deque; each time ``batch_size`` events are
pending it pickles them into a chunk right there (the events are still in that core's
cache; C code does it, calling back only for pids and exit reasons). A pump thread
hands the chunks, and on ``flush_interval`` whatever else is pending, to the writer
process (``_proc``) over a pipe, one batch at a time: the next once the last is
acknowledged. The writer process turns them into records, chains and hashes them and
commits each batch in one transaction. A supervisor never waits on the disk, and the
writing never holds this process's GIL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from trellis import Pid
from trellis._core import _telemetry

from . import _errors, _store
from ._anchor import default_anchor_path
from ._errors import JournalError
from ._format import drop_item, dump_wire, parse_key
from ._proc import CLOSE_ATTEMPTS, Reader, send
from ._store import Target, parse_url

__all__ = ["Journal", "JournalStatistics"]

_log = logging.getLogger("trellis.journal")
_NEVER = 1 << 62
_OWN_EVENTS = frozenset(
    {"journal.batch", "journal.dropped", "journal.error", "journal.foreign_head"}
)
_PROC_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_proc.py")
_OPEN_TIMEOUT = 120.0  # seconds for a writer process to open the store, or it is an error
_CLOSE_TIMEOUT = 60.0  # seconds stop()/close() waits for an unresponsive writer process


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


class _Chunk:
    """Events taken from the buffer and pickled for the writer process, in order."""

    __slots__ = ("dropped", "items", "requests", "wire")

    def __init__(self, items: list[Any], requests: list[_Flush], dropped: int) -> None:
        self.items = items  # (wall, event) pairs and journal.dropped items
        self.wire = dump_wire(items) if items else b""
        self.requests = requests
        self.dropped = dropped  # events counted in the journal.dropped items


class _Frame:
    """The batch handed to the writer process and not yet acknowledged."""

    __slots__ = ("close", "dropped", "failures", "items", "requests", "wire")

    def __init__(
        self, items: list[Any], wire: list[bytes], requests: list[_Flush], dropped: int, close: bool
    ) -> None:
        self.items = items  # (wall, event) pairs and journal.dropped items
        self.wire = wire  # the items as piped, chunk by chunk
        self.requests = requests
        self.dropped = dropped  # events counted in the journal.dropped items in it
        self.close = close
        self.failures = 0  # writer processes that died with this batch in hand


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
            With a key, an HMAC-signed checkpoint of the chain head is written at the
            journal's first commit, every ``checkpoint_every`` records and on close.
        checkpoint_every: records between signed checkpoints (only with a key).
        anchor_command: a command (argv list) each anchor is piped to as one JSON line
            on its stdin, e.g. ``["logger", "-t", "trellis-anchor"]`` or a copy to
            another host: a record of the anchors that an attacker on this machine
            cannot roll back (``verify --anchor`` reads a file of such lines, taking
            the last). It runs without the journal key in its environment and is
            killed if still running after 30 s.
        run_id: the id of this run of the tree (``trellis run`` makes one per run). With
            it, the journal opens the run with a ``run.started`` record (dated when
            :meth:`start` was called, before any event of the run; ``run_id``,
            ``previous_run_id``, ``os_pid`` of the process running the tree), preceded
            by ``run.unclean_end`` (``run_id`` of the previous run, its ``last_seq`` and
            ``last_utc``, ``detected_by``) when the previous run in the journal never
            recorded its end; every record of the run carries ``run_id`` in its data (so
            a pid, unique within a run, is unique across runs as ``(run_id, pid)``);
            an orderly stop ends it with ``run.stopped``.
        anchor: where the last signed checkpoint is mirrored, outside the database
            (see :mod:`trellis.journal._anchor`): a file path, ``False`` for none, or
            ``None``/``True`` for the default when a key is set: ``<database>.anchor``
            beside a SQLite journal, ``pg-<host>-<port>-<db>.anchor`` in the state
            directory for PostgreSQL.

    **Signing only its own head.** With a key, the writer process checks the journal
    before it signs anything on top of it: the checkpoints' HMAC chain, the records
    after the last checkpoint (chained from it, at most ``checkpoint_every +
    max_batch``), and the anchor. Afterwards it signs only on top of the head it
    committed itself. When either check fails it records a ``journal.foreign_head``
    record (``problem``, the head it expected and the one it found), logs an error,
    emits ``journal.foreign_head`` telemetry, sets :attr:`foreign_head` and signs
    nothing more; ``trellis journal verify`` then reports the journal as broken.

    It is a :class:`trellis.Extension` (``await start()`` / ``await stop()``), and has
    sync ``open()`` / ``close()`` and context-manager forms. While it runs, it emits
    ``journal.batch`` (``events``, ``seconds``, ``seq``) after each commit,
    ``journal.dropped`` (``count``) when events were dropped and ``journal.error``
    (``error``, ``events``) when a commit failed and is retried, on the event loop it
    was started from (no loop: no telemetry, the counters still count).

    **Where the work happens.** Serialising, hashing and committing run in a writer
    process of its own (``python .../trellis/journal/_proc.py``, pid in
    :attr:`writer_pid`), so they never compete with the tree for the GIL; this process
    only pickles each batch (about 1-2 µs an event, in the emitting thread, once per
    ``batch_size`` events) and pipes it over from a pump thread.
    The writer ignores SIGINT and SIGTERM (the tree's orderly stop closes it) and ends
    at end of input. If it dies, a new one is started and given the unacknowledged
    batch again; records of it that had committed are recognised and not written
    twice. Events that arrive meanwhile wait in the buffer (and overflow into counted
    drops as usual).

    **What a kill -9 loses.** An event is durable once its batch has committed (one
    transaction; SQLite in WAL mode with ``synchronous=FULL`` fsyncs it). A kill -9 of
    the process running the tree loses exactly the events still in its buffer,
    :attr:`unsent` at that instant: the batch already handed to the writer process is
    committed by it before it exits. The pump hands over the next batch as soon as the
    previous one is acknowledged and ``batch_size`` events are pending or the oldest
    has waited ``flush_interval`` seconds, so while the writer keeps up the loss is at
    most ``flush_interval`` seconds' worth of events plus those arriving during one
    commit; a writer that has fallen behind can lose at most ``max_buffer``. A kill -9
    of both processes (of the process group, say) or a power loss loses
    :attr:`uncommitted`: additionally the batch being committed (at most
    ``max_batch``). A batch is never half-written, so the chain stays valid and
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
        open_in_background: bool = False,
        anchor: str | os.PathLike[str] | bool | None = None,
        run_id: str | None = None,
        anchor_command: Sequence[str] | None = None,
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
        self.open_in_background = open_in_background
        self._open_future: asyncio.Future[None] | None = None
        self._key = parse_key(key)
        #: the most records the journal holds after its last checkpoint while this
        #: journal writes it (``checkpoint_every + max_batch``)
        self.max_unsigned = checkpoint_every + self.max_batch
        #: where the signed anchor is mirrored (None: nowhere); see ``anchor``
        self.anchor_path: str | None = None
        if anchor is not None and not isinstance(anchor, bool | str | os.PathLike):
            raise ValueError(f"Journal anchor: {anchor!r} is not a path, True, False or None")
        if anchor is None or anchor is True:
            if self._key is not None:
                self.anchor_path = default_anchor_path(
                    self.target.backend, self.target.path, self.target.conninfo
                )
            if anchor is True and self.anchor_path is None:
                raise ValueError(
                    "Journal anchor=True: needs a key (nothing is signed without one) and, "
                    "for PostgreSQL, a URL naming a host and a database (or give a path)"
                )
        elif anchor is not False:
            self.anchor_path = os.fspath(anchor)
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ValueError(f"Journal run_id: {run_id!r} is not a non-empty string")
        #: the run this journal records (``trellis run`` gives one; see ``run_id``)
        self.run_id = run_id
        self._run_opened = False  # run.started is written by the first writer process
        self._run_wall: float | None = None  # when start()/open() was called: run.started's utc
        if anchor_command is not None and (
            isinstance(anchor_command, str)
            or not anchor_command
            or not all(isinstance(a, str) and a for a in anchor_command)
        ):
            raise ValueError(
                f"Journal anchor_command: {anchor_command!r} is not a list of arguments "
                "(program first)"
            )
        #: a command every anchor is piped to (one JSON line on its stdin)
        self.anchor_command = list(anchor_command) if anchor_command is not None else None
        #: why this journal's writer does not sign (rows it had not written at the head,
        #: a checkpoint that does not verify, a truncated journal); None while it signs
        self.foreign_head: str | None = None
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
        self._wake_r, self._wake_w = -1, -1  # a pipe: the handler wakes the pump with it
        self._wake_at = _NEVER  # the handler wakes the pump when the buffer reaches this
        self._urgent = 0  # flush requests in the buffer
        self._in_flight = 0  # events in the batch the writer process holds
        self._chunks: deque[_Chunk] = deque()  # pickled, waiting for the writer process
        self._chunked = 0  # events in them
        self._frame: _Frame | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._status: Reader | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hid: object | None = None
        self._open_error: BaseException | None = None
        self._closed = False
        self._stopping = False
        self._stop_deadline = 0.0
        self._told_stopping = False
        self._finished = False

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
        """Start the writer process, wait until it has opened the store, attach the handler.
        Raises :class:`JournalError` if the journal cannot be opened.

        With ``open_in_background=True`` only the handler is attached here (events wait
        in the buffer); the writer process is started and the open awaited in
        :meth:`tree_started`, so a tree starts without waiting for (or sharing the CPU
        with) the writer's start."""
        if self._run_wall is None:
            self._run_wall = time.time()
        if self.open_in_background:
            self._hid = _telemetry.attach(self._on_event)
        else:
            await self._begin()
            await self._opened()

    async def _begin(self) -> None:
        loop = asyncio.get_running_loop()
        self._open_future = opened = loop.create_future()

        def ready(err: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, opened, err)

        self._loop = loop
        self._launch(ready)

    async def _opened(self) -> None:
        fut, self._open_future = self._open_future, None
        if fut is None:
            return
        try:
            await fut
        except BaseException:
            self._detach()
            raise
        if self._hid is None:
            self._hid = _telemetry.attach(self._on_event)

    async def tree_started(self, root: Pid, request_stop: Callable[[], None]) -> None:
        """With ``open_in_background``: start the writer and wait until the store is
        open (raises :class:`JournalError` if it cannot be); otherwise nothing to do."""
        if self.open_in_background and self._thread is None:
            await self._begin()
        await self._opened()

    async def stop(self) -> None:
        """Detach, commit everything handed over, write the closing checkpoint, close."""
        if self._thread is None and self._hid is not None and not self._closed:
            # open_in_background and the tree never got going (e.g. its start failed):
            # what it emitted is still journaled
            await self._begin()
            try:
                await self._opened()
            except JournalError:
                _log.exception("journal %s could not be opened", self.target.shown)
                self._closed = True
                return
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
        if self._run_wall is None:
            self._run_wall = time.time()
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
    def unsent(self) -> int:
        """Events in this process's buffer, not yet handed to the writer process: what
        a kill -9 of this process now would lose (see the class docstring)."""
        return max(0, len(self._buf) - self._urgent) + self._chunked

    @property
    def uncommitted(self) -> int:
        """Events handed over and not yet committed: what a kill -9 of both processes
        now would lose (see the class docstring for the bound)."""
        return self.unsent + self._in_flight

    @property
    def writer_pid(self) -> int | None:
        """The OS pid of the writer process (None when there is none)."""
        p = self._proc
        return p.pid if p is not None and p.returncode is None else None

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
        if len(buf) + self._chunked < self.max_buffer:
            buf.append((_now(), event))
            if len(buf) >= self._wake_at:
                self._ripe()
        else:
            self._overflow(event)

    def _ripe(self) -> None:
        """The buffer reached the pump's mark: pickle a full batch here, in the emitting
        thread (its events are in this core's cache; the pump's thread would pay more for
        them, and hold the GIL for it), and wake the pump if it can send."""
        if len(self._buf) >= self.batch_size:
            self._chunk(self.batch_size, False)
        if self._frame is None:
            self._wake_at = self.batch_size  # until the pump sets it again
            self._poke()

    def _chunk(self, limit: int, requests_too: bool) -> int:
        """Move up to ``limit`` events from the head of the buffer into a pickled chunk
        (with the flush requests among them if ``requests_too``, else only up to the
        first); how many events it took."""
        with self._lock:
            buf = self._buf
            items: list[Any] = []
            add = items.append
            requests: list[_Flush] = []
            taken: list[Any] = []
            dropped = 0
            while buf and len(items) < limit:
                it = buf[0]
                t = type(it)
                if t is tuple:
                    add(it)
                elif t is _Drops:
                    add(drop_item(it.wall, it.mono, it.count, it.kinds))
                    dropped += it.count
                elif requests_too:
                    requests.append(it)
                    self._urgent -= 1
                else:
                    break
                taken.append(buf.popleft())
            if items or requests:
                try:
                    chunk = _Chunk(items, requests, dropped)
                except BaseException:  # put everything back as it was
                    buf.extendleft(reversed(taken))
                    self._urgent += len(requests)
                    raise
                self._chunks.append(chunk)
                self._chunked += len(items)
            return len(items)

    def _overflow(self, event: dict[str, Any]) -> None:
        buf = self._buf
        with self._lock:  # the pump takes under this lock: a marker is never half-counted
            if len(buf) + self._chunked < self.max_buffer:  # drained meanwhile
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
        if len(buf) >= self._wake_at and self._frame is None:
            self._wake_at = self.batch_size
            self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # the pipe is full (the pump is awake already) or closed
            pass

    # ------------------------------------------------------------------
    # Plumbing
    # ------------------------------------------------------------------

    def _launch(self, ready: Callable[[BaseException | None], None]) -> None:
        if self._thread is not None:
            raise JournalError(f"{self!r} was already started (a Journal runs once)")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
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
        if req.close and not self._stopping:
            self._stop_deadline = time.monotonic() + _CLOSE_TIMEOUT
            self._stopping = True  # a commit being retried now gives up after a few tries
        with self._lock:
            self._urgent += 1
            self._buf.append(req)
        self._wake_at = _NEVER
        self._poke()

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
    # The pump thread
    # ------------------------------------------------------------------

    def _run(self, ready: Callable[[BaseException | None], None]) -> None:
        try:
            self.seq = self._spawn()
        except BaseException as e:
            self._open_error = e
            self._closed = True
            self._close_pipes()
            ready(e)
            return
        ready(None)
        try:
            self._pump()
        except BaseException:
            _log.critical(
                "journal pump %r failed; events are no longer journaled", self, exc_info=True
            )
            self._fail_pending()
            raise
        finally:
            self._end_writer()
            self._close_pipes()

    def _spawn(self) -> int:
        """Start a writer process and wait until it has opened the store; its head seq."""
        exe = sys.executable
        if not exe:
            raise JournalError(f"cannot start the writer of {self.target.shown}: no sys.executable")
        try:
            proc = subprocess.Popen(
                [exe, _PROC_FILE, str(os.getpid())],  # the run's pid, even if we die first
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
            )
        except OSError as e:
            raise JournalError(f"cannot start the writer of {self.target.shown}: {e}") from e
        assert proc.stdin is not None
        assert proc.stdout is not None
        self._proc = proc
        self._status = status = Reader(proc.stdout.fileno())
        try:
            send(
                proc.stdin.fileno(),
                (
                    "config",
                    self.url,
                    self.node,
                    self._key,
                    self.checkpoint_every,
                    _store.SQLITE_BUSY_TIMEOUT,
                    self.anchor_path,
                    self.max_unsigned,
                    self.run_id,
                    not self._run_opened,
                    self._run_wall,
                    self.anchor_command,
                ),
            )
            deadline = time.monotonic() + _OPEN_TIMEOUT
            msgs: list[Any] = []
            while not msgs and not status.eof:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([status.fd], [], [], left)[0]:
                    raise JournalError(
                        f"cannot open journal {self.target.shown}: the writer process did not "
                        f"answer within {_OPEN_TIMEOUT:g} s"
                    )
                msgs = status.read()
        except BaseException:
            self._end_writer(kill=True)
            raise
        if msgs and msgs[0][0] == "ready":
            _, seq, problem, tightened = msgs[0]
            for name in tightened:
                _log.warning(
                    "journal %s: %s was readable by others; its mode is now 0600",
                    self.target.shown,
                    name,
                )
            if problem is not None:
                self._foreign(problem)
            self._run_opened = True
            return int(seq)
        self._end_writer(kill=not status.eof)
        if msgs and msgs[0][0] == "open_error":
            cls = getattr(_errors, msgs[0][1], None)
            if not (isinstance(cls, type) and issubclass(cls, JournalError)):
                cls = JournalError
            raise cls(msgs[0][2])
        raise JournalError(
            f"cannot open journal {self.target.shown}: the writer process exited "
            f"(code {proc.returncode})"
        )

    def _end_writer(self, kill: bool = False) -> None:
        """Close the pipes to the writer process (it commits what it holds and exits
        at end of input) and reap it."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if kill:
            proc.kill()
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=_CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            _log.error("journal %s: the writer process does not exit; killed", self.target.shown)
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def _close_pipes(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _fail_pending(self) -> None:
        """The pump ended without a close: release anyone waiting on a flush."""
        with self._lock:
            items = list(self._buf)
            self._buf.clear()
            for c in self._chunks:
                items.extend(c.requests)
            self._chunks.clear()
        frame, self._frame = self._frame, None
        for it in (frame.requests if frame else []) + items:
            if type(it) is _Flush:
                it.done()

    def _pump(self) -> None:
        buf = self._buf
        batch_size = self.batch_size
        interval = self.flush_interval
        while not self._finished:
            timeout: float | None = None
            send_now = False
            if self._frame is None:
                self._wake_at = 1  # before looking at the buffer: no wake-up is missed
                try:
                    first = buf[0] if buf else None
                except IndexError:  # just taken by _ripe()
                    continue
                if self._chunks or self._urgent or len(buf) >= batch_size:
                    send_now = True
                elif first is not None:
                    if type(first) is not tuple:
                        send_now = True
                    else:
                        timeout = first[0] + interval - time.time()
                        if timeout <= 0:
                            send_now = True
                        else:
                            self._wake_at = batch_size
            else:
                self._wake_at = batch_size  # _ripe() pickles; the acknowledgement wakes us
                if self._stopping and not self._told_stopping:
                    self._told_stopping = True
                    self._tell(("stopping",))
            if send_now:
                self._wake_at = batch_size
                self._send_batch()
                continue
            if self._stopping:
                left = self._stop_deadline - time.monotonic()
                if left <= 0 and self._frame is not None:
                    self._abandon(
                        f"the writer process did not finish within {_CLOSE_TIMEOUT:g} s of stop"
                    )
                    return
                timeout = left if timeout is None else min(timeout, left)
            status = self._status
            assert status is not None
            ready = select.select([status.fd, self._wake_r], [], [], timeout)[0]
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            if status.fd in ready:
                for msg in status.read():
                    self._on_message(msg)
                if status.eof and not self._finished:
                    self._writer_lost()

    def _tell(self, msg: Any) -> None:
        proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        try:
            send(proc.stdin.fileno(), msg)
        except OSError:
            pass  # the writer died: its output ends, and _writer_lost() takes over

    def _send_batch(self) -> None:
        """Hand the writer process the pickled chunks and the rest of the buffer, up to
        ``max_batch`` events, as one batch."""
        chunks: list[_Chunk] = []
        events = 0
        for attempt in range(2):
            with self._lock:
                while self._chunks and (
                    not chunks or events + len(self._chunks[0].items) <= self.max_batch
                ):
                    c = self._chunks.popleft()
                    chunks.append(c)
                    events += len(c.items)
                    self._chunked -= len(c.items)
                self._in_flight = events
            if attempt or self._chunks or events >= self.max_batch:
                break
            self._chunk(self.max_batch - events, True)
        items = [it for c in chunks for it in c.items]
        requests = [r for c in chunks for r in c.requests]
        close = any(r.close for r in requests)
        frame = _Frame(
            items,
            [c.wire for c in chunks if c.items],
            requests,
            sum(c.dropped for c in chunks),
            close,
        )
        if not items and not (close and (self._key is not None or self.run_id is not None)):
            self._finish(frame)  # flush requests behind acknowledged batches only
            if close:
                self._tell(("batch", [], True, None))
            return
        self._frame = frame
        self._tell(("batch", frame.wire, close, None))

    def _on_message(self, msg: Any) -> None:
        kind = msg[0]
        if kind == "ack":
            _, records, seconds, seq, checkpointed, lost = msg
            self.seq = seq
            if records:
                self.written += records
                self.batches += 1
                self.commit_seconds += seconds
                self.last_commit_seconds = seconds
                if seconds > self.max_commit_seconds:
                    self.max_commit_seconds = seconds
                self._emit("journal.batch", events=records, seconds=seconds, seq=seq)
            if checkpointed:
                self.checkpoints += 1
            if lost:
                self.dropped += lost
                _log.error("journal %s: %d events lost on close", self.target.shown, lost)
            frame, self._frame = self._frame, None
            if frame is not None:
                self._finish(frame)
        elif kind == "foreign_head":
            self._foreign(msg[1])
        elif kind == "warn":
            _log.error("journal %s: %s", self.target.shown, msg[1])
        elif kind == "unclean_end":
            d = msg[1]
            _log.warning(
                "journal %s: the previous run %s ended without recording its end (killed, "
                "or the machine went down) after seq %s at %s; journaled as run.unclean_end",
                self.target.shown,
                d.get("run_id"),
                d.get("last_seq"),
                d.get("last_utc"),
            )
        elif kind == "error":
            _, text, events, attempt = msg
            _log.error(
                "journal %s: commit of %d events failed (attempt %d): %s",
                self.target.shown,
                events,
                attempt,
                text,
            )
            self._emit("journal.error", error=text, events=events)

    def _foreign(self, problem: str) -> None:
        """The writer will not sign: say so loudly (it journals it too)."""
        self.foreign_head = problem
        _log.error(
            "journal %s: not signing any more: %s (journal.foreign_head recorded; "
            "run `trellis journal verify`)",
            self.target.shown,
            problem,
        )
        self._emit("journal.foreign_head", problem=problem)

    def _finish(self, frame: _Frame) -> None:
        self._in_flight = 0
        if frame.dropped:
            self._emit("journal.dropped", count=frame.dropped)
        for r in frame.requests:
            r.done()
        if frame.close:
            self._finished = True

    def _writer_lost(self) -> None:
        """The writer process died: start another and give it the batch in hand."""
        proc = self._proc
        code = None
        if proc is not None:
            try:  # its output ended: it has exited or is about to; reap it for the code
                code = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                code = None
        self._end_writer()
        frame = self._frame
        events = len(frame.items) if frame else 0
        text = f"the writer process exited (code {code})"
        _log.error("journal %s: %s; starting another", self.target.shown, text)
        self._emit("journal.error", error=text, events=events)
        if frame is not None:
            frame.failures += 1
            if frame.failures > CLOSE_ATTEMPTS:  # this batch kills writers: give it up
                self._frame = None
                self._give_up(
                    frame,
                    f"{events} events given up after "
                    f"{frame.failures} writer processes died with them",
                )
        attempt = 0
        delay = 0.05
        while True:
            try:
                self._spawn()
                break
            except Exception as e:
                attempt += 1
                _log.error(
                    "journal %s: cannot restart the writer (attempt %d): %s",
                    self.target.shown,
                    attempt,
                    e,
                )
                self._emit("journal.error", error=f"{type(e).__name__}: {e}", events=events)
                if self._stopping and attempt >= CLOSE_ATTEMPTS:
                    self._abandon(f"cannot restart the writer: {e}")
                    return
                select.select([self._wake_r], [], [], delay)  # stop() interrupts the wait
                delay = min(delay * 2, 2.0)
        self._told_stopping = False
        if self._frame is not None:
            f = self._frame
            self._tell(("batch", f.wire, f.close, self.seq))

    def _give_up(self, frame: _Frame, why: str) -> None:
        """Count a batch as dropped, and journal that in its place when possible."""
        lost = [it for it in frame.items if len(it) == 2]
        self.dropped += len(lost)
        _log.error("journal %s: %s", self.target.shown, why)
        if lost and not frame.close:
            wall, first = lost[0]
            mono = first.get("time")
            marker = _Drops(wall, float(mono) if isinstance(mono, int | float) else 0.0, "")
            marker.count = len(lost)
            marker.kinds = dict(Counter(str(ev["event"]) for _, ev in lost))
            with self._lock:
                self._buf.appendleft(marker)
            self._emit("journal.dropped", count=len(lost))
        frame.dropped = 0
        frame.close = False
        self._finish(frame)

    def _abandon(self, why: str) -> None:
        """Stopping, and the writer cannot finish: count everything left as dropped."""
        frame, self._frame = self._frame, None
        if frame is not None:
            self.dropped += sum(1 for it in frame.items if len(it) == 2)
        with self._lock:
            rest = list(self._buf)
            self._buf.clear()
            self._urgent = 0
            for c in self._chunks:
                self.dropped += sum(1 for it in c.items if len(it) == 2)
                rest.extend(c.requests)
            self._chunks.clear()
            self._chunked = 0
        self.dropped += sum(1 for it in rest if type(it) is tuple)
        _log.error("journal %s: %s; %d events dropped", self.target.shown, why, self.dropped)
        if self._proc is not None:
            self._end_writer(kill=True)
        for it in (frame.requests if frame else []) + rest:
            if type(it) is _Flush:
                it.done()
        self._in_flight = 0
        self._finished = True


def _settle(fut: asyncio.Future[None], err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)

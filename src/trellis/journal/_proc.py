"""The journal's writer process: reduced events in on stdin, committed batches out.

:class:`trellis.journal.Journal` runs this file as ``python _proc.py`` so that
serialising, hashing and committing never hold the GIL of the process running the
tree. It loads only the standard library and the journal's ``_chain``, ``_store`` and
``_errors`` modules (under stand-in ``trellis`` packages), which keeps start-up short.

Protocol: length-prefixed pickles (:func:`send`, :class:`Reader`) of tuples of
primitives. Parent to child: ``("config", url, node, key, checkpoint_every,
busy_timeout, anchor_path, max_unsigned, run_id, run_start, run_wall, anchor_command)``
first, then ``("batch", chunks, close, resend_after)`` (one at a time: the next only
after the ack; ``chunks`` are pickled lists of wire tuples, see ``_chain.item_of_wire``; with
``resend_after``, records already committed after that seq are recognised and
skipped) and ``("stopping",)``.
Child to parent: ``("ready", seq, problem, tightened)`` (``problem``: why it will
not sign on top of this journal, or None; ``tightened``: files whose mode it made
0600) or ``("open_error", class name, message)``; per batch ``("ack", records,
seconds, seq, checkpointed, lost)``; ``("error", text, events)`` when a commit
attempt failed (it is retried); ``("foreign_head", problem)`` when it found rows at
the head it had not written; ``("unclean_end", data)`` when it journaled that the
previous run never recorded its end; ``("warn", text)`` when the anchor could not be
written or exported.

The child never stops on a signal meant for the tree (SIGINT, SIGTERM): it ends when
told to close, or at end of input after committing everything it has received, so
a kill -9 of the parent loses nothing that was already handed to the child.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess

_LEN = struct.Struct("!I")
CLOSE_ATTEMPTS = 5  # commits retried this often while stopping, then counted as lost
#: seconds an anchor command may run before it is killed
EXPORT_TIMEOUT = 30.0
#: seconds a signing writer waits for the previous one (say, of a run just killed with
#: -9, committing the batch it held) to finish before it checks the journal's head
WRITER_LOCK_TIMEOUT = 30.0


def send(fd: int, msg: Any) -> None:
    """Write one message to ``fd`` (blocking until all of it is written)."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LEN.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Reader:
    """Split the bytes read from a pipe into messages."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.eof = False

    def read(self) -> list[Any]:
        """Read what is available now (blocks if nothing is); the whole messages in it.
        Sets :attr:`eof` at end of input."""
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            self.eof = True
            return []
        buf = self.buf
        buf += chunk
        out = []
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            out.append(pickle.loads(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        return out


class _Inbox:
    """The child's input, read by a thread so that ``stopping`` is seen during retries."""

    def __init__(self, reader: Reader, pending: list[Any]) -> None:
        self.reader = reader
        self.items: deque[Any] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.eof = False
        for msg in pending:
            self._take(msg)
        threading.Thread(target=self._run, daemon=True, name="journal-inbox").start()

    def _run(self) -> None:
        try:
            while not self.reader.eof:
                for msg in self.reader.read():
                    with self.cond:
                        self._take(msg)
                        self.cond.notify()
        except OSError:
            pass
        except BaseException:  # undecodable input: die, so that the parent notices
            import traceback

            traceback.print_exc()
            os._exit(3)
        with self.cond:
            self.eof = self.stopping = True
            self.cond.notify()

    def _take(self, msg: Any) -> None:
        if msg[0] == "stopping":
            self.stopping = True
        else:
            self.items.append(msg)

    def get(self) -> Any:
        """The next batch, or None at end of input."""
        with self.cond:
            while not self.items and not self.eof:
                self.cond.wait()
            return self.items.popleft() if self.items else None


class _Writer:
    def __init__(self, out: int, config: tuple[Any, ...]) -> None:
        from trellis.journal import _store

        _, url, self.node, self.key, self.checkpoint_every, busy, *rest = config
        self.anchor_path: str | None = rest[0] if rest else None
        self.max_unsigned: int = rest[1] if len(rest) > 1 else self.checkpoint_every
        #: the run every record belongs to (``trellis run``), and whether this writer
        #: process opens it (the first of the run) with ``run.started``
        self.run_id: str | None = rest[2] if len(rest) > 2 else None
        run_start = bool(rest[3]) if len(rest) > 3 else False
        self.run_wall: float | None = rest[4] if len(rest) > 4 else None
        #: a command each anchor is piped to, one JSON line on stdin (a sink off the host)
        self.anchor_command: list[str] | None = rest[5] if len(rest) > 5 else None
        self.exports: list[tuple[float, subprocess.Popen[bytes]]] = []
        self.run_records: list[Any] = []  # run.unclean_end, run.started: the first commit
        _store.SQLITE_BUSY_TIMEOUT = busy
        self.out = out
        self.store = _store.open_writer(_store.parse_url(url))
        self.tightened: list[str] = list(getattr(self.store, "tightened", []))
        # one signing writer at a time: a writer of a run killed a moment ago may still
        # be committing the batch it held; its rows must not look foreign at our head
        locked = self.key is None or self.store.lock_writer(WRITER_LOCK_TIMEOUT)
        #: the last checkpoint (seq, hash, hmac, utc) and the HMAC before it
        self.cp: tuple[int, str, str, str] | None = None
        self.cp_prev_mac = ""
        self.problem: str | None = None
        try:
            self.seq, self.hash = self.store.begin()
            self.cp_seq = self.store.last_checkpoint()[0]
            if not locked:
                self.problem = (
                    f"another writer has been signing this journal for {WRITER_LOCK_TIMEOUT:g} s "
                    "(one signing writer per journal)"
                )
            elif self.key is not None:
                self.problem = self.check_head()
        finally:
            self.store.rollback()
        #: whether this writer signs: a key, and a head it could check (see check_head)
        self.signing = self.key is not None and self.problem is None
        self.pending_problem = self.problem  # journaled with the first commit
        self.shown = _store.Target(url, "").shown
        self.inbox: _Inbox | None = None
        if self.run_id is not None and run_start:
            self.run_records = self.run_boundary()
        if self.signing and self.cp is not None:
            self.write_anchor(closed=False)

    def check_head(self) -> str | None:
        """Before signing on top of the journal: its checkpoints' HMAC chain verifies,
        the last one matches its record, the records after it chain from it (at most
        ``max_unsigned`` of them, none of them a ``journal.foreign_head``), and the
        anchor file (if any) names a checkpoint the journal still holds. The problem
        found, or None."""
        import hmac

        from trellis.journal._anchor import anchor_problem, read_anchor
        from trellis.journal._chain import GENESIS, checkpoint_mac, record_hash

        key = self.key
        assert key is not None
        store = self.store
        cps = store.checkpoints()
        prev_mac = ""
        for seq, h, mac, utc in cps:
            if not hmac.compare_digest(str(mac), checkpoint_mac(key, seq, h, utc, prev_mac)):
                return (
                    f"the checkpoint at seq {seq} has a bad HMAC (forged or edited, one "
                    "before it removed, or another key)"
                )
            self.cp_prev_mac = prev_mac
            prev_mac = mac
        head = self.seq
        if cps:
            self.cp = cps[-1]
            cp_seq, cp_hash = cps[-1][0], cps[-1][1]
            if cp_seq > head:
                return (
                    f"the journal ends at seq {head} but a checkpoint covers seq {cp_seq}: "
                    "records deleted"
                )
            if head - cp_seq > self.max_unsigned:
                return (
                    f"{head - cp_seq} records after the last checkpoint (seq {cp_seq}); a "
                    f"writer leaves at most {self.max_unsigned}"
                )
            tail = store.rows_from(cp_seq)
            if not tail or tail[0][0] != cp_seq or tail[0][8] != cp_hash:
                return f"the record at seq {cp_seq} does not match its checkpoint"
            prev, expected = cp_hash, cp_seq + 1
            tail = tail[1:]
        else:
            if head > self.max_unsigned:
                return (
                    f"{head} records and no signed checkpoint; a writer leaves at most "
                    f"{self.max_unsigned} unsigned"
                )
            tail = store.rows_from(1) if head else []
            prev, expected = GENESIS, 1
        for seq, utc, mono, node, path, kind, data, row_prev, row_hash in tail:
            if seq != expected or row_prev != prev:
                return f"the records after the last checkpoint do not chain (seq {seq})"
            if record_hash(row_prev, seq, utc, mono, node, path, kind, data) != row_hash:
                return f"the record at seq {seq} does not match its hash (edited)"
            if kind == "journal.foreign_head":
                return (
                    f"seq {seq} records that a writer found rows it had not written; "
                    "not signed since"
                )
            prev, expected = row_hash, seq + 1
        path_ = self.anchor_path
        if path_ is None or not os.path.exists(path_):
            return None
        try:
            anchor = read_anchor(path_)
        except (OSError, ValueError) as e:
            return f"anchor {path_}: {e}"
        why = anchor_problem(anchor, key)
        if why is not None:
            return f"anchor {path_}: {why}"
        a_seq = anchor["seq"]
        if a_seq > head:
            return (
                f"the anchor {path_} covers seq {a_seq} but the journal ends at seq {head}: "
                "truncated"
            )
        if not any(c[0] == a_seq and c[2] == anchor["hmac"] for c in cps):
            return f"the anchor's checkpoint at seq {a_seq} is not in the journal: rewritten"
        if anchor["closed"] and head > a_seq:
            return (
                f"seq {a_seq + 1}..{head} were added after the writer closed at seq {a_seq} "
                "(rows it did not write)"
            )
        return None

    def run_boundary(self) -> list[Any]:
        """The records that open this run: ``run.unclean_end`` when the last run in the
        journal has no ``run.stopped`` (it was killed, or the machine went down), then
        ``run.started``."""
        from trellis.journal._chain import data_text, utc_text

        now = utc_text(self.run_wall if self.run_wall is not None else time.time())
        out = []
        try:
            self.store.begin()
            last = self.store.last_run()
            head = self.store.last_rows(1)
        finally:
            self.store.rollback()
        previous = None
        if last is not None:
            try:
                previous = json.loads(last[2]).get("run_id")
            except (ValueError, AttributeError):
                previous = None
            if last[1] == "run.started":
                data = {
                    "run_id": previous,
                    "last_seq": head[0][0] if head else 0,
                    "last_utc": head[0][1] if head else None,
                    "detected_by": self.run_id,
                }
                out.append((now, 0.0, self.node, None, "run.unclean_end", data_text(data)))
        data = {
            "run_id": self.run_id,
            "previous_run_id": previous,
            "os_pid": _owner_pid(),
        }
        out.append((now, 0.0, self.node, None, "run.started", data_text(data)))
        return out

    def write_anchor(self, closed: bool) -> None:
        from trellis.journal._anchor import make_anchor, write_anchor

        if self.cp is None or self.key is None:
            return
        if self.anchor_path is None and not self.anchor_command:
            return
        anchor = make_anchor(self.key, self.cp, self.cp_prev_mac, self.max_unsigned, closed)
        if self.anchor_path is not None:
            try:
                write_anchor(self.anchor_path, anchor)
            except OSError as e:
                self.tell(("warn", f"cannot write the anchor {self.anchor_path}: {e}"))
        if self.anchor_command:
            self.export_anchor(anchor)

    def export_anchor(self, anchor: dict[str, Any]) -> None:
        """Pipe ``anchor`` as one JSON line to a new ``anchor_command`` process (not
        waited for; one still running after ``EXPORT_TIMEOUT`` s is killed). It gets
        the environment without the journal key."""
        import signal
        import subprocess

        now = time.monotonic()
        running = []
        for started, proc in self.exports:
            if proc.poll() is None and now - started > EXPORT_TIMEOUT:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                self.tell(("warn", f"anchor command {self.anchor_command} killed: hung"))
            elif proc.poll() is None:
                running.append((started, proc))
            elif proc.returncode:
                why = f"anchor command {self.anchor_command} exited {proc.returncode}"
                self.tell(("warn", why))
        self.exports = running
        env = {k: v for k, v in os.environ.items() if k != "TRELLIS_JOURNAL_KEY"}
        line = (json.dumps(anchor, sort_keys=True, separators=(",", ":")) + "\n").encode()
        try:
            proc = subprocess.Popen(
                self.anchor_command or [],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                env=env,
                close_fds=True,
                start_new_session=True,
            )
            assert proc.stdin is not None
            proc.stdin.write(line)  # far below a pipe's buffer: never blocks
            proc.stdin.close()
        except OSError as e:
            self.tell(("warn", f"cannot run the anchor command {self.anchor_command}: {e}"))
            return
        self.exports.append((now, proc))

    def finish_exports(self) -> None:
        """Give the anchor commands still running (the closing anchor's) a moment."""
        if not self.exports:
            return
        import subprocess

        deadline = time.monotonic() + EXPORT_TIMEOUT
        for _, proc in self.exports:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.exports = []

    def tell(self, msg: Any) -> None:
        try:
            send(self.out, msg)
        except OSError:  # the parent is gone: keep committing what we have
            pass

    def serve(self, inbox: _Inbox) -> None:
        self.inbox = inbox
        if self.run_records:  # the run's boundary is durable before any of its events
            unclean = [r for r in self.run_records if r[4] == "run.unclean_end"]
            self.commit([], False)
            if unclean:
                self.tell(("unclean_end", json.loads(unclean[0][5])))
        while True:
            msg = inbox.get()
            if msg is None:
                return
            _, items, close, resend_after = msg
            self.batch(items, close, resend_after)
            if close:
                return

    def batch(self, wire: list[bytes], close: bool, resend_after: int | None) -> None:
        from trellis.journal._chain import content_of_item, item_of_wire, utc_text

        node = self.node
        items = []
        for w in (w for chunk in wire for w in pickle.loads(chunk)):
            try:
                items.append(item_of_wire(w))
            except Exception as e:  # pragma: no cover - a malformed event
                items.append(
                    (
                        w[0],
                        0.0,
                        None,
                        "journal.error",
                        {"unserialisable": f"{type(e).__name__}: {e}"},
                    )
                )
        todo = items
        if resend_after is not None and items:  # a batch the previous child may have committed
            try:
                self.store.begin()
                done = self.store.keys_after(resend_after, node)
            finally:
                self.store.rollback()
            todo = [it for it in items if (utc_text(it[0]), it[1], it[3]) not in done]
        run_id = self.run_id
        if run_id is not None:
            for it in todo:
                it[4]["run_id"] = run_id
        contents = []
        for it in todo:
            try:
                contents.append(content_of_item(it, node))
            except Exception as e:  # pragma: no cover - data not JSON serialisable
                contents.append(
                    content_of_item(
                        (it[0], it[1], None, it[3], {"unserialisable": f"{type(e).__name__}: {e}"}),
                        node,
                    )
                )
        lost = 0
        seconds = 0.0
        checkpointed = False
        if contents or (close and (self.key or self.run_id)) or self.pending_problem:
            seconds, checkpointed, lost = self.commit(contents, close)
        self.tell(("ack", len(items) - lost, seconds, self.seq, checkpointed, lost))

    def foreign_record(self, problem: str, seq: int, prev: str) -> Any:
        """The ``journal.foreign_head`` record: this writer found a head it cannot sign
        on top of (``problem``); it says so in the chain and signs nothing from then on."""
        from trellis.journal._chain import data_text, utc_text

        data = {
            "problem": problem,
            "expected_seq": self.seq,
            "expected_hash": self.hash,
            "found_seq": seq,
            "found_hash": prev,
        }
        return (
            utc_text(time.time()),
            0.0,
            self.node,
            None,
            "journal.foreign_head",
            data_text(data),
        )

    def run_stopped(self) -> Any:
        """The record of a clean end of the run."""
        from trellis.journal._chain import data_text, utc_text

        data = {"run_id": self.run_id}
        return (utc_text(time.time()), 0.0, self.node, None, "run.stopped", data_text(data))

    def commit(self, contents: list[Any], closing: bool) -> tuple[float, bool, int]:
        """Commit ``contents`` in one transaction, retrying on errors; while stopping,
        give up after a few attempts. (seconds, checkpointed, events lost)."""
        from trellis.journal._chain import chain, checkpoint_mac, utc_text

        store = self.store
        attempt = 0
        delay = 0.05
        last_hash: str | None = None  # of the previous attempt: did it commit after all?
        cp: tuple[int, str, str, str] | None = None
        cp_prev = ""
        problem = self.pending_problem
        while True:
            t0 = time.perf_counter()
            checkpointed = False
            try:
                seq, prev = store.begin()
                if last_hash is not None and prev == last_hash:
                    store.rollback()  # the failed attempt committed (lost acknowledgement)
                    break
                if problem is None and self.signing and (seq, prev) != (self.seq, self.hash):
                    problem = (
                        f"the head is seq {seq}, not seq {self.seq} that this writer "
                        "committed last: rows it did not write"
                        if seq != self.seq
                        else f"the record at seq {seq} is not the one this writer committed"
                    )
                todo = [*self.run_records, *contents]
                if problem is not None:
                    todo = [self.foreign_record(problem, seq, prev), *todo]
                if closing and self.run_id is not None:
                    todo.append(self.run_stopped())
                rows = chain(seq, prev, todo)
                if rows:
                    store.insert(rows)
                    seq, prev = rows[-1][0], rows[-1][8]
                    last_hash = prev
                key = self.key
                if (
                    key is not None
                    and self.signing
                    and problem is None
                    and (
                        closing
                        or self.cp is None  # a journal is signed from its first commit
                        or seq - self.cp_seq >= self.checkpoint_every
                    )
                ):
                    cp_seq, prev_mac = store.last_checkpoint()
                    if cp_seq < seq:
                        utc = utc_text(time.time())
                        mac = checkpoint_mac(key, seq, prev, utc, prev_mac)
                        cp = (seq, prev, mac, utc)
                        cp_prev = prev_mac
                        store.insert_checkpoint(cp)
                        checkpointed = True
                store.commit()
                break
            except Exception as e:
                try:
                    store.rollback()
                except Exception:
                    pass
                attempt += 1
                self.tell(("error", f"{type(e).__name__}: {e}", len(contents), attempt))
                stopping = closing or (self.inbox is not None and self.inbox.stopping)
                if stopping and attempt >= CLOSE_ATTEMPTS:
                    return 0.0, False, len(contents)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                try:
                    store.reconnect()
                except Exception as e2:
                    self.tell(("error", f"reconnect failed: {type(e2).__name__}: {e2}", 0, 0))
        if problem is not None and self.key is not None:
            if self.signing and self.pending_problem is None:  # found now, not at open
                self.tell(("foreign_head", problem))
            self.signing = False
        self.pending_problem = None
        self.run_records = []
        self.seq, self.hash = seq, prev
        if checkpointed and cp is not None:
            self.cp_seq = seq
            self.cp, self.cp_prev_mac = cp, cp_prev
            self.write_anchor(closed=closing)
        elif closing and self.signing and self.cp is not None and self.cp[0] == seq:
            self.write_anchor(closed=True)  # nothing new since the last checkpoint
        return time.perf_counter() - t0, checkpointed, 0


def _stand_in_packages() -> None:
    """Make ``trellis.journal._store`` importable without running ``trellis/__init__``."""
    import types

    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        del sys.path[0]  # never shadow the standard library with our module names

    class TrellisError(Exception):
        pass

    top = types.ModuleType("trellis")
    top.__path__ = [os.path.dirname(here)]
    top.TrellisError = TrellisError  # type: ignore[attr-defined]
    sub = types.ModuleType("trellis.journal")
    sub.__path__ = [here]
    sys.modules["trellis"] = top
    sys.modules["trellis.journal"] = sub


def _owner_pid() -> int:
    """The pid of the process that journals (given on our command line: by the time the
    store is open, a parent killed with -9 has been replaced by init as our parent)."""
    if len(sys.argv) > 1 and sys.argv[1].isdigit():
        return int(sys.argv[1])
    return os.getppid()


def main() -> int:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    inp, out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    reader = Reader(inp)
    msgs: list[Any] = []
    while not msgs and not reader.eof:
        msgs = reader.read()
    if not msgs or msgs[0][0] != "config":
        return 2
    try:
        writer = _Writer(out, msgs[0])
    except BaseException as e:
        send(out, ("open_error", type(e).__name__, str(e)))
        return 1
    writer.tell(("ready", writer.seq, writer.problem, writer.tightened))
    inbox = _Inbox(reader, msgs[1:])
    try:
        writer.serve(inbox)
    finally:
        writer.store.close()
        writer.finish_exports()
    return 0


if __name__ == "__main__":
    _stand_in_packages()
    sys.exit(main())

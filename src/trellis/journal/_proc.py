"""The journal's writer process: reduced events in on stdin, committed batches out.

:class:`trellis.journal.Journal` runs this file as ``python _proc.py`` so that
serialising, hashing and committing never hold the GIL of the process running the
tree. It loads only the standard library and the journal's ``_chain``, ``_store`` and
``_errors`` modules (under stand-in ``trellis`` packages), which keeps start-up short.

Protocol: length-prefixed pickles (:func:`send`, :class:`Reader`) of tuples of
primitives. Parent to child: ``("config", url, node, key, checkpoint_every,
busy_timeout)`` first, then ``("batch", chunks, close, resend_after)`` (one at a time:
the next only after the ack; ``chunks`` are pickled lists of wire tuples, see
``_chain.item_of_wire``; with ``resend_after``, records already committed after that
seq are recognised and skipped) and ``("stopping",)``. Child to parent: ``("ready",
seq)`` or ``("open_error", class name, message)``; per batch ``("ack", records,
seconds, seq, checkpointed, lost)``; ``("error", text, events)`` when a commit
attempt failed (it is retried).

The child never stops on a signal meant for the tree (SIGINT, SIGTERM): it ends when
told to close, or at end of input after committing everything it has received, so
a kill -9 of the parent loses nothing that was already handed to the child.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import threading
import time
from collections import deque
from typing import Any

_LEN = struct.Struct("!I")
CLOSE_ATTEMPTS = 5  # commits retried this often while stopping, then counted as lost


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

        _, url, self.node, self.key, self.checkpoint_every, busy = config
        _store.SQLITE_BUSY_TIMEOUT = busy
        self.out = out
        self.store = _store.open_writer(_store.parse_url(url))
        try:
            self.seq, _ = self.store.begin()
            self.cp_seq = self.store.last_checkpoint()[0]
        finally:
            self.store.rollback()
        self.shown = _store.Target(url, "").shown
        self.inbox: _Inbox | None = None

    def tell(self, msg: Any) -> None:
        try:
            send(self.out, msg)
        except OSError:  # the parent is gone: keep committing what we have
            pass

    def serve(self, inbox: _Inbox) -> None:
        self.inbox = inbox
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
        if contents or (close and self.key is not None):
            seconds, checkpointed, lost = self.commit(contents, close)
        self.tell(("ack", len(items) - lost, seconds, self.seq, checkpointed, lost))

    def commit(self, contents: list[Any], closing: bool) -> tuple[float, bool, int]:
        """Commit ``contents`` in one transaction, retrying on errors; while stopping,
        give up after a few attempts. (seconds, checkpointed, events lost)."""
        from trellis.journal._chain import chain, checkpoint_mac, utc_text

        store = self.store
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
                key = self.key
                if key is not None and (closing or seq - self.cp_seq >= self.checkpoint_every):
                    cp_seq, prev_mac = store.last_checkpoint()
                    if cp_seq < seq:
                        utc = utc_text(time.time())
                        mac = checkpoint_mac(key, seq, prev, utc, prev_mac)
                        store.insert_checkpoint((seq, prev, mac, utc))
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
        self.seq = seq
        if checkpointed:
            self.cp_seq = seq
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
    writer.tell(("ready", writer.seq))
    inbox = _Inbox(reader, msgs[1:])
    try:
        writer.serve(inbox)
    finally:
        writer.store.close()
    return 0


if __name__ == "__main__":
    _stand_in_packages()
    sys.exit(main())

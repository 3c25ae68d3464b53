"""The record format: how an event becomes a journal row, and how rows are chained.

A record is ``(seq, utc, mono, node, path, kind, data, prev_hash, hash)``.
``hash = sha256(prev_hash + canonical)`` in hex, where ``canonical`` is the compact,
ASCII-only JSON array ``[seq, utc, mono, node, path, kind, data]`` (``data`` is the
stored JSON text, embedded as a string; ``mono`` is a float written as Python's
shortest round-trip ``repr``). The first record's ``prev_hash`` is 64 zeros.

A checkpoint is ``(seq, hash, hmac, utc)`` with ``hmac = HMAC-SHA256(key,
"seq:hash:utc:previous checkpoint's hmac")`` in hex (the first one chains from ``""``),
so removing or reordering a checkpoint breaks the next one too.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import string
from typing import Any

from trellis import Pid
from trellis._tree import classify, event_path, jsonable, reason_text

from ._chain import (
    GENESIS,
    OBJ_MARK,
    PID_MARK,
    Content,
    Item,
    Row,
    chain,
    checkpoint_mac,
    data_text,
    item_of_wire,
    record_hash,
)
from ._chain import content_of_item as content_of_item
from ._chain import utc_text as utc_text

__all__ = [
    "GENESIS",
    "KEY_ENV",
    "Content",
    "Item",
    "Row",
    "chain",
    "checkpoint_mac",
    "content_of",
    "content_of_item",
    "drop_item",
    "dump_wire",
    "failed_item",
    "parse_key",
    "record_hash",
    "reduce_event",
    "utc_text",
]

#: Environment variable holding the checkpoint key (hex, or raw text).
KEY_ENV = "TRELLIS_JOURNAL_KEY"

_COLUMNS = frozenset({"event", "time", "path"})  # event keys with a column of their own

_pid_texts: dict[int, str] = {}


def _pid_text(pid: Pid) -> str:
    """A pid's text as first seen, without its liveness: ``<Pid 12 'name'>`` in every
    record about it (the writer serialises later, when the process may have died)."""
    text = _pid_texts.get(pid.id)
    if text is None:
        text = repr(pid)
        if text.endswith(" dead>"):
            text = text[:-6] + ">"
        if len(_pid_texts) >= 10_000:
            _pid_texts.clear()
        _pid_texts[pid.id] = text
    return text


_PLAIN: frozenset[type] = frozenset({str, int, float, bool, type(None)})


def reduce_event(
    wall: float,
    event: dict[str, Any],
    *,
    _columns: frozenset[str] = _COLUMNS,
    _plain: frozenset[type] = _PLAIN,
    _pids: dict[int, str] = _pid_texts,
) -> Item:
    """``event``, handed over at ``wall`` time, reduced to primitives: ``(wall, mono,
    path, kind, data)`` where ``data`` is :func:`trellis._tree.jsonable` of the event
    minus ``event``, ``time`` and ``path`` (computed here without the intermediate copy
    for the common field types), except that a pid is written as first seen, without
    its liveness marker."""
    data: dict[str, Any] = {}
    for k, v in event.items():
        if k in _columns:
            continue
        if k == "reason":
            data["reason"] = reason_text(v)
            data["reason_class"] = classify(v)
        elif type(v) in _plain:
            data[k] = v
        elif isinstance(v, Pid):
            data[k] = _pids.get(v.id) or _pid_text(v)
            if "os_pid" not in event:
                os_pid = getattr(v, "os_pid", None)
                if os_pid is not None:
                    data["os_pid"] = os_pid
        else:  # as JSON would hold it: plain types only (no enums, no tuples)
            data[k] = json.loads(data_text(jsonable({k: v})[k]))
    path = event.get("path")
    if not isinstance(path, str):
        path = event_path(event)
    mono = event.get("time")
    return (
        wall,
        mono if type(mono) is float else float(mono) if isinstance(mono, int) else 0.0,
        path,
        event["event"],
        data,
    )


def content_of(wall: float, event: dict[str, Any], node: str) -> Content:
    """The columns of the record for ``event``, handed over at ``wall`` time, as the
    writer process makes them (:func:`dump_wire`, then
    :func:`~trellis.journal._chain.item_of_wire`); ``data`` is canonical JSON (sorted
    keys, compact, ASCII)."""
    (wire,) = pickle.loads(dump_wire([(wall, event)]))
    return content_of_item(item_of_wire(wire), node)


# Reasons the pickler does not see (it is called for objects of other types only).
_NATIVE = frozenset({str, int, float, bool, type(None), list, tuple, dict, set, frozenset, bytes})


class _WirePickler(pickle.Pickler):
    """Pickles events as C code does, calling back only for objects that are not plain
    data: a pid becomes ``(PID_MARK, text as first seen, os_pid)``, anything else
    ``(OBJ_MARK, as jsonable writes it, reason text, reason class, str())``, so that the
    writer process unpickles nothing but builtins."""

    def reducer_override(self, o: Any, _pids: dict[int, str] = _pid_texts) -> Any:
        if o is tuple:  # the constructor in the reductions below
            return NotImplemented
        if isinstance(o, Pid):
            return (
                tuple,
                ((PID_MARK, _pids.get(o.id) or _pid_text(o), getattr(o, "os_pid", None)),),
            )
        text = reason_text(o)
        if isinstance(o, BaseException):
            plain: Any = text
        else:
            plain = jsonable({"v": o})["v"]
            t = type(plain)
            if t is not str and t is not int and t is not float and t is not bool:
                plain = json.loads(data_text(plain))  # an int or str enum, say
        return (tuple, ((OBJ_MARK, plain, text, classify(o), str(o)),))


def dump_wire(batch: list[Any]) -> bytes:
    """Pickle ``batch``, a list of ``(wall, event)`` pairs and of reduced
    :data:`Item` tuples, as wire tuples for :func:`~trellis.journal._chain.item_of_wire`.

    An event that cannot be pickled becomes a ``failed_item``."""
    wire: list[Any] = []
    add = wire.append
    native = _NATIVE
    for it in batch:
        if len(it) == 2:
            wall, event = it
            r = event.get("reason", wire)
            if r is wire or type(r) not in native:
                add((wall, event, None))
            else:  # a plain reason: classify it here
                add((wall, event, (reason_text(r), classify(r))))
        else:
            add((0.0, None, it))
    f = io.BytesIO()
    try:
        _WirePickler(f, pickle.HIGHEST_PROTOCOL).dump(wire)
    except Exception:  # find the events that fail, one by one
        ok: list[Any] = []
        for w in wire:
            try:
                _WirePickler(io.BytesIO(), pickle.HIGHEST_PROTOCOL).dump(w)
                ok.append(w)
            except Exception as e:
                ok.append((0.0, None, failed_item(w[0], w[1], e)))
        f = io.BytesIO()
        _WirePickler(f, pickle.HIGHEST_PROTOCOL).dump(ok)
    return f.getvalue()


def failed_item(wall: float, event: dict[str, Any], error: BaseException) -> Item:
    """The record for an event that could not be reduced: its name and the error."""
    mono = event.get("time")
    return (
        wall,
        float(mono) if isinstance(mono, int | float) else 0.0,
        None,
        str(event.get("event")),
        {"unserialisable": f"{type(error).__name__}: {error}"},
    )


def drop_item(wall: float, mono: float, count: int, kinds: dict[str, int]) -> Item:
    """The ``journal.dropped`` record: ``count`` events (by name in ``kinds``) that did
    not fit in the buffer, the first of them handed over at ``wall``/``mono``."""
    return (wall, mono, None, "journal.dropped", {"count": count, "kinds": dict(kinds)})


# ---------------------------------------------------------------------------
# Checkpoint keys
# ---------------------------------------------------------------------------

_HEX = frozenset(string.hexdigits)


def parse_key(key: str | bytes | None, *, env: bool = True) -> bytes | None:
    """The checkpoint key: ``key`` if given, else ``$TRELLIS_JOURNAL_KEY`` (when ``env``).

    Text made only of an even number (at least 32) of hex digits is decoded as hex;
    any other text is used as its UTF-8 bytes. An empty key is no key.

    Example::

        parse_key("00112233445566778899aabbccddeeff")  # 16 bytes
    """
    if key is None and env:
        key = os.environ.get(KEY_ENV)
    if key is None or len(key) == 0:
        return None
    if isinstance(key, bytes):
        return key
    k = key.strip()
    if len(k) >= 32 and len(k) % 2 == 0 and all(c in _HEX for c in k):
        return bytes.fromhex(k)
    return key.encode("utf-8")

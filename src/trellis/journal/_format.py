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

import hashlib
import hmac as _hmac
import json
import os
import string
import time
from collections.abc import Callable, Iterable
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from trellis import Pid
from trellis._tree import classify, event_path, jsonable, reason_text

__all__ = [
    "GENESIS",
    "KEY_ENV",
    "Content",
    "Row",
    "chain",
    "checkpoint_mac",
    "content_of",
    "drop_content",
    "failed_content",
    "parse_key",
    "record_hash",
    "utc_text",
]

#: ``prev_hash`` of the first record.
GENESIS = "0" * 64
#: Environment variable holding the checkpoint key (hex, or raw text).
KEY_ENV = "TRELLIS_JOURNAL_KEY"

#: What the writer derives from one event before chaining: (utc, mono, node, path, kind, data).
Content = tuple[str, float, str, str | None, str, str]
#: A full record as stored: (seq, utc, mono, node, path, kind, data, prev_hash, hash).
Row = tuple[int, str, float, str, str | None, str, str, str, str]


def _encoder(sort_keys: bool) -> Callable[[Any], str]:
    """A compact, ASCII-only JSON encoder (the C one, built once, when available)."""
    if c_make_encoder is None:  # pragma: no cover - not CPython
        return json.JSONEncoder(
            ensure_ascii=True, separators=(",", ":"), sort_keys=sort_keys
        ).encode

    def no_default(o: object) -> object:
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    make: Any = c_make_encoder
    enc = make(None, no_default, encode_basestring_ascii, None, ":", ",", sort_keys, False, True)

    def encode(o: Any) -> str:
        return "".join(enc(o, 0))

    return encode


_canonical = _encoder(False)
_data_text = _encoder(True)
_sha256 = hashlib.sha256
_COLUMNS = frozenset({"event", "time", "path"})  # event keys with a column of their own


def record_hash(
    prev_hash: str,
    seq: int,
    utc: str,
    mono: float,
    node: str,
    path: str | None,
    kind: str,
    data: str,
) -> str:
    """The hash of one record (see the module docstring).

    Example::

        h = record_hash(GENESIS, 1, "2025-01-01T00:00:00.000000Z", 0.5, "n", None, "x", "{}")
    """
    text = prev_hash + _canonical([seq, utc, mono, node, path, kind, data])
    return _sha256(text.encode("ascii")).hexdigest()


def chain(seq: int, prev_hash: str, contents: Iterable[Content]) -> list[Row]:
    """Number and hash ``contents`` after the record ``(seq, prev_hash)``.

    Builds the canonical text directly (the same text :func:`record_hash` builds).
    """
    rows: list[Row] = []
    append = rows.append
    q = encode_basestring_ascii
    sha = _sha256
    for utc, mono, node, path, kind, data in contents:
        seq += 1
        if mono - mono == 0.0 and type(mono) is float:  # finite: JSON writes repr()
            text = (
                f"{prev_hash}[{seq},{q(utc)},{mono!r},{q(node)},"
                f"{'null' if path is None else q(path)},{q(kind)},{q(data)}]"
            )
        else:  # pragma: no cover - the clock never gives NaN or infinity
            text = prev_hash + _canonical([seq, utc, mono, node, path, kind, data])
        h = sha(text.encode("ascii")).hexdigest()
        append((seq, utc, mono, node, path, kind, data, prev_hash, h))
        prev_hash = h
    return rows


# ---------------------------------------------------------------------------
# Events to contents
# ---------------------------------------------------------------------------

_utc_cache: tuple[int, str] = (-1, "")  # replaced whole, so threads never see half of it


def utc_text(wall: float) -> str:
    """``wall`` (``time.time()``) as ISO-8601 UTC with microseconds:
    ``2025-01-02T03:04:05.123456Z``."""
    global _utc_cache
    sec = int(wall)
    us = int((wall - sec) * 1_000_000)
    cached_sec, prefix = _utc_cache
    if cached_sec != sec:  # one strftime per second, not per event
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _utc_cache = (sec, prefix)
    return f"{prefix}.{us:06d}Z"


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


def content_of(
    wall: float,
    event: dict[str, Any],
    node: str,
    *,
    _columns: frozenset[str] = _COLUMNS,
    _plain: frozenset[type] = _PLAIN,
    _pids: dict[int, str] = _pid_texts,
) -> Content:
    """The columns of the record for ``event``, handed over at ``wall`` time.

    ``data`` is the canonical JSON (sorted keys, compact, ASCII) of
    :func:`trellis._tree.jsonable` of the event minus ``event``, ``time`` and ``path``
    (computed here without the intermediate copy for the common field types), except
    that a pid is written as first seen, without its liveness marker.
    """
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
        else:
            data[k] = jsonable({k: v})[k]
    path = event.get("path")
    if not isinstance(path, str):
        path = event_path(event)
    mono = event.get("time")
    return (
        utc_text(wall),
        mono if type(mono) is float else float(mono) if isinstance(mono, int) else 0.0,
        node,
        path,
        event["event"],
        _data_text(data),
    )


def failed_content(wall: float, event: dict[str, Any], node: str, error: BaseException) -> Content:
    """The record for an event that could not be serialised: its name and the error."""
    mono = event.get("time")
    data = {"unserialisable": f"{type(error).__name__}: {error}"}
    return (
        utc_text(wall),
        float(mono) if isinstance(mono, int | float) else 0.0,
        node,
        None,
        str(event.get("event")),
        _data_text(data),
    )


def drop_content(wall: float, mono: float, node: str, count: int, kinds: dict[str, int]) -> Content:
    """The ``journal.dropped`` record: ``count`` events (by name in ``kinds``) that did
    not fit in the buffer, the first of them handed over at ``wall``/``mono``."""
    return (
        utc_text(wall),
        mono,
        node,
        None,
        "journal.dropped",
        _data_text({"count": count, "kinds": kinds}),
    )


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


def checkpoint_mac(key: bytes, seq: int, hash: str, utc: str, prev_mac: str) -> str:
    """The HMAC-SHA256 (hex) of a checkpoint, chained to the previous checkpoint's."""
    msg = f"{seq}:{hash}:{utc}:{prev_mac}".encode("ascii")
    return _hmac.new(key, msg, hashlib.sha256).hexdigest()

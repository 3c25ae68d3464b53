"""The record chain: canonical text, SHA-256 chaining, UTC text, checkpoint MACs.

Standard library only, so the writer process can load it without importing Trellis
(see ``_proc``). The format itself is described in ``_format``.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import json
import time
from collections.abc import Callable, Iterable
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

__all__ = [
    "GENESIS",
    "Content",
    "Item",
    "Row",
    "canonical",
    "chain",
    "checkpoint_mac",
    "content_of_item",
    "data_text",
    "item_of_wire",
    "record_hash",
    "utc_text",
]

#: ``prev_hash`` of the first record.
GENESIS = "0" * 64

#: What the writer derives from one event before chaining: (utc, mono, node, path, kind, data).
Content = tuple[str, float, str, str | None, str, str]
#: A full record as stored: (seq, utc, mono, node, path, kind, data, prev_hash, hash).
Row = tuple[int, str, float, str, str | None, str, str, str, str]
#: An event reduced to primitives, as handed to the writer process:
#: (wall time, mono, path, kind, data as a dict of JSON values).
Item = tuple[float, float, str | None, str, dict[str, Any]]


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


#: Compact ASCII JSON in the given key order (the canonical record array).
canonical = _encoder(False)
#: Compact ASCII JSON with sorted keys (the ``data`` column).
data_text = _encoder(True)
_sha256 = hashlib.sha256


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
    """The hash of one record (see the ``trellis.journal`` docs for the format).

    Example::

        h = record_hash(GENESIS, 1, "2025-01-01T00:00:00.000000Z", 0.5, "n", None, "x", "{}")
    """
    text = prev_hash + canonical([seq, utc, mono, node, path, kind, data])
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
            text = prev_hash + canonical([seq, utc, mono, node, path, kind, data])
        h = sha(text.encode("ascii")).hexdigest()
        append((seq, utc, mono, node, path, kind, data, prev_hash, h))
        prev_hash = h
    return rows


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


def content_of_item(item: Item, node: str) -> Content:
    """The record columns of a reduced event (``data`` becomes canonical JSON)."""
    wall, mono, path, kind, data = item
    return (utc_text(wall), mono, node, path, kind, data_text(data))


# ---------------------------------------------------------------------------
# Events as the writer process receives them
# ---------------------------------------------------------------------------

#: Marks a tuple standing for a pid on the wire: (PID_MARK, text, os_pid or None).
PID_MARK = "\x00trellis-pid"
#: Marks a tuple standing for any other object: (OBJ_MARK, plain, reason text, reason
#: class, str()) -- ``plain`` as :func:`trellis._tree.jsonable` writes the object.
OBJ_MARK = "\x00trellis-obj"
_SKIP = frozenset({"event", "time", "path"})


def _plain(v: Any, depth: int = 0) -> Any:
    """A wire value as ``trellis._tree.jsonable`` writes the original value."""
    t = type(v)
    if v is None or t is str or t is int or t is float or t is bool:
        return v
    if t is tuple and v and v[0] in (PID_MARK, OBJ_MARK) and type(v[0]) is str:
        return v[1]
    if depth < 4 and (t is list or t is tuple):
        return [_plain(x, depth + 1) for x in v]
    if depth < 4 and t is dict:
        return {_text(k): _plain(x, depth + 1) for k, x in v.items()}
    return repr(v)


def _text(v: Any) -> str:
    """``str()`` of the original value."""
    if type(v) is tuple and v and type(v[0]) is str:
        if v[0] == OBJ_MARK:
            return str(v[4])
        if v[0] == PID_MARK:
            return str(v[1])
    return str(v)


def item_of_wire(wire: tuple[Any, ...]) -> Item:
    """The :data:`Item` of an event as piped to the writer process.

    ``wire`` is ``(wall, event, reason)``: the event dict with its pids and other
    objects replaced by marker tuples (see ``_format.WirePickler``), and the reason's
    ``(text, class)`` when the pump worked them out itself; or ``(wall, None, item)``
    for an item reduced already.
    """
    wall, ev, pre = wire
    if ev is None:
        return pre  # type: ignore[no-any-return]
    kind = ev["event"]
    data: dict[str, Any] = {}
    has_os_pid = "os_pid" in ev
    for k, v in ev.items():
        if k in _SKIP:
            continue
        t = type(v)
        if k == "reason":
            if pre is not None:
                data["reason"], data["reason_class"] = pre
            elif t is tuple and v[0] == OBJ_MARK:
                data["reason"], data["reason_class"] = v[2], v[3]
            else:  # a pid as the reason, say
                data["reason"], data["reason_class"] = _text(v), "crash"
        elif v is None or t is str or t is int or t is float or t is bool:
            data[k] = v
        elif t is tuple and v and v[0] == PID_MARK:
            data[k] = v[1]
            if not has_os_pid and v[2] is not None:
                data["os_pid"] = v[2]
        else:
            data[k] = _plain(v)
    path = ev.get("path")
    if type(path) is not str:
        if kind == "operator.action":
            target = ev.get("target")
            path = target if type(target) is str else None
        else:
            sup = ev.get("supervisor")
            if sup is None:
                path = None
            elif "child_id" in ev and not kind.startswith("supervisor."):
                path = f"{_text(sup)}/{_text(ev['child_id'])}"
            else:
                path = _text(sup)
    mono = ev.get("time")
    return (
        wall,
        mono if type(mono) is float else float(mono) if type(mono) is int else 0.0,
        path,
        kind,
        data,
    )


def checkpoint_mac(key: bytes, seq: int, hash: str, utc: str, prev_mac: str) -> str:
    """The HMAC-SHA256 (hex) of a checkpoint, chained to the previous checkpoint's."""
    msg = f"{seq}:{hash}:{utc}:{prev_mac}".encode("ascii")
    return _hmac.new(key, msg, hashlib.sha256).hexdigest()

"""The anchor: the journal's last signed checkpoint, mirrored to a file outside the
database, so that truncating the journal back to an earlier checkpoint (or deleting
everything) is caught by ``verify(..., anchor=FILE)``.

An anchor is one JSON object::

    {"format": "trellis-journal-anchor/1", "seq": 2000, "hash": "...",
     "hmac": "...", "prev_hmac": "...", "utc": "...", "key_id": "...",
     "max_unsigned": 11000, "closed": false, "mac": "..."}

``seq``/``hash``/``hmac``/``utc`` are the checkpoint's columns and ``prev_hmac`` the
previous checkpoint's HMAC (so the checkpoint's own HMAC can be checked from the file
alone); ``key_id`` names the key (an HMAC of a fixed text, never the key);
``max_unsigned`` is the writer's ``checkpoint_every + max_batch`` (the most records a
signed journal may hold after its last checkpoint); ``closed`` is true when the writer
closed cleanly at that checkpoint (then no record may follow it until the next writer
opens); ``mac`` is HMAC-SHA256 with the key over the other fields as sorted compact
JSON. The file is replaced atomically (write a temporary file, fsync, rename) with mode
0600.

Standard library only: the writer process loads it (see ``_proc``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac as _hmac
import json
import os
from typing import Any

from ._chain import checkpoint_mac

__all__ = [
    "ANCHOR_FORMAT",
    "ANCHOR_SUFFIX",
    "anchor_problem",
    "default_anchor_path",
    "key_id",
    "make_anchor",
    "read_anchor",
    "write_anchor",
]

ANCHOR_FORMAT = "trellis-journal-anchor/1"
#: The default anchor of a SQLite journal is the database path plus this suffix.
ANCHOR_SUFFIX = ".anchor"
_FIELDS = {
    "format": str,
    "seq": int,
    "hash": str,
    "hmac": str,
    "prev_hmac": str,
    "utc": str,
    "key_id": str,
    "max_unsigned": int,
    "closed": bool,
    "mac": str,
}


def key_id(key: bytes) -> str:
    """A short, non-secret name of ``key`` (16 hex digits): tells keys apart, reveals
    nothing of them."""
    return _hmac.new(key, b"trellis-journal-key-id", hashlib.sha256).hexdigest()[:16]


def default_anchor_path(backend: str, path: str, conninfo: str = "") -> str | None:
    """Where a journal's anchor goes unless told otherwise: ``<database path>.anchor``
    beside a SQLite journal; for PostgreSQL, ``pg-<host>-<port>-<database>.anchor`` in
    the state directory (``$TRELLIS_STATE_DIR``, ``$XDG_STATE_HOME/trellis`` or
    ``~/.local/state/trellis``) of the machine running the writer. None when the URL
    names no host and database."""
    if backend == "sqlite":
        return path + ANCHOR_SUFFIX
    from urllib.parse import urlsplit

    from ._paths import journal_dir

    try:
        parts = urlsplit(conninfo)
        host, port, db = parts.hostname or "", parts.port or 5432, parts.path.lstrip("/")
    except ValueError:
        return None
    if not host or not db:
        return None
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"pg-{host}-{port}-{db}")
    return str(journal_dir() / f"{name}{ANCHOR_SUFFIX}")


def _mac(key: bytes, fields: dict[str, Any]) -> str:
    body = {k: v for k, v in fields.items() if k != "mac"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return _hmac.new(key, text.encode("ascii"), hashlib.sha256).hexdigest()


def make_anchor(
    key: bytes,
    checkpoint: tuple[int, str, str, str],
    prev_hmac: str,
    max_unsigned: int,
    closed: bool,
) -> dict[str, Any]:
    """The signed anchor of ``checkpoint`` ``(seq, hash, hmac, utc)``."""
    seq, h, mac, utc = checkpoint
    fields: dict[str, Any] = {
        "format": ANCHOR_FORMAT,
        "seq": int(seq),
        "hash": h,
        "hmac": mac,
        "prev_hmac": prev_hmac,
        "utc": utc,
        "key_id": key_id(key),
        "max_unsigned": int(max_unsigned),
        "closed": bool(closed),
    }
    fields["mac"] = _mac(key, fields)
    return fields


def write_anchor(path: str, anchor: dict[str, Any]) -> None:
    """Replace the file at ``path`` with ``anchor``, atomically, mode 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    data = (json.dumps(anchor, sort_keys=True, separators=(",", ":")) + "\n").encode("ascii")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_anchor(path: str) -> dict[str, Any]:
    """The anchor in the file at ``path`` (one JSON object; or, as a sink collects them,
    one a line, possibly after a log prefix: the last one); raises ``ValueError``
    naming the file and the problem (``OSError`` when it cannot be read)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        anchor = json.loads(raw)
    except ValueError:  # a sink's file: one anchor a line, the newest last
        anchor = None
        for line in reversed(raw.splitlines()):
            try:
                anchor = json.loads(line[line.find(b"{") :]) if b"{" in line else None
            except ValueError:
                continue
            if isinstance(anchor, dict) and anchor.get("format") == ANCHOR_FORMAT:
                break
        if anchor is None:
            raise ValueError(f"anchor {path!r} is not JSON (nor lines of it)") from None
    if not isinstance(anchor, dict):
        raise ValueError(f"anchor {path!r} is not a JSON object")
    for name, t in _FIELDS.items():
        v = anchor.get(name)
        if type(v) is not t:
            raise ValueError(f"anchor {path!r}: field {name!r} missing or not a {t.__name__}")
    if anchor["format"] != ANCHOR_FORMAT:
        raise ValueError(f"anchor {path!r}: unknown format {anchor['format']!r}")
    return anchor


def anchor_problem(anchor: dict[str, Any], key: bytes | None) -> str | None:
    """Why ``anchor`` cannot be trusted with ``key`` (None: it can; without a key
    nothing is checked)."""
    if key is None:
        return None
    if anchor["key_id"] != key_id(key):
        return "the anchor was signed with another key (key ids differ)"
    if not _hmac.compare_digest(anchor["mac"], _mac(key, anchor)):
        return "the anchor's signature does not verify (the file was edited)"
    try:
        want = checkpoint_mac(
            key, anchor["seq"], anchor["hash"], anchor["utc"], anchor["prev_hmac"]
        )
    except (UnicodeEncodeError, TypeError):
        return "the anchor's checkpoint is malformed"
    if not _hmac.compare_digest(anchor["hmac"], want):
        return "the anchor's checkpoint HMAC does not verify"
    return None

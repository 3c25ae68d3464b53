"""Reading a journal: ``verify`` the chain and checkpoints, ``tail`` it, ``export`` it.
Readers open the store read-only and never create a journal."""

from __future__ import annotations

import dataclasses
import hmac as _hmac
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from ._anchor import anchor_problem, default_anchor_path, read_anchor
from ._errors import JournalError
from ._format import GENESIS, Row, checkpoint_mac, parse_key, record_hash
from ._store import COLUMNS, Checkpoint, ReadStore, open_reader, parse_url

__all__ = ["DEFAULT_MAX_UNSIGNED", "VerifyResult", "export", "record_dict", "tail", "verify"]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What :func:`verify` found.

    ``ok`` is true when every record is intact and every checkpoint matches. Otherwise
    ``first_bad_seq`` is the first seq that can no longer be trusted and ``problem``
    says why, e.g. ``"hash mismatch at seq 17 (record edited)"``. ``records`` counts
    the records found intact before the problem (all of them when ``ok``).
    ``checkpoints`` counts the checkpoints that matched the chain, ``signed`` says
    whether their HMACs were checked (a key was available), and
    ``last_checkpoint_seq`` is the last record they cover: records after it rest on
    the hash chain alone. ``anchor``/``anchor_seq`` name the anchor file compared with
    the journal and the checkpoint it holds.
    """

    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str = ""
    checkpoints: int = 0
    signed: bool = False
    last_checkpoint_seq: int = 0
    last_seq: int = 0
    #: the anchor file compared with the journal ("" when none was used)
    anchor: str = ""
    #: the seq of the anchor's checkpoint (0 when no anchor was used)
    anchor_seq: int = 0


#: ``max_unsigned`` when neither the caller nor an anchor gives it: the default
#: ``checkpoint_every + max_batch`` of :class:`~trellis.journal.Journal`.
DEFAULT_MAX_UNSIGNED = 1000 + 10_000


def verify(
    url: str,
    key: str | bytes | None = None,
    *,
    anchor: str | os.PathLike[str] | bool | None = None,
    max_unsigned: int | None = None,
) -> VerifyResult:
    """Check the journal at ``url``: seqs gapless from 1, every hash recomputed, every
    ``prev_hash`` linking to the record before, and every checkpoint matching the chain
    (its HMAC too, with ``key`` or ``$TRELLIS_JOURNAL_KEY``). A ``journal.foreign_head``
    record (a writer found rows at the head it had not written) is a failure.

    With a key, a signed journal must also *end* signed: no records at all, no
    checkpoint at all, or more than ``max_unsigned`` records after the last checkpoint
    (the writer checkpoints every ``checkpoint_every`` records and when it closes, so
    even a writer killed with -9 leaves at most ``checkpoint_every + max_batch``) are
    failures. ``max_unsigned`` defaults to the anchor's, else
    :data:`DEFAULT_MAX_UNSIGNED`.

    ``anchor`` is the file the writer mirrors its last checkpoint to (``Journal(...,
    anchor=)``): the journal must still hold that checkpoint, so truncating it back
    to an earlier checkpoint, or emptying it, is caught. ``None`` uses the default
    anchor (beside a SQLite journal; in the state directory for PostgreSQL) when a key
    is given and the file exists; ``False`` uses none; a path must exist.

    Raises :class:`JournalURLError`, :class:`JournalNotFound` or :class:`NotAJournal`
    when there is nothing to verify, :class:`JournalError` when the anchor file cannot
    be read; a broken journal is a result, not an error.

    Example::

        result = verify("sqlite:///journal.db", anchor="/backup/journal.db.anchor")
        if not result.ok:
            print(f"broken at seq {result.first_bad_seq}: {result.problem}")
    """
    target = parse_url(url)
    secret = parse_key(key)
    if max_unsigned is not None and (
        not isinstance(max_unsigned, int) or isinstance(max_unsigned, bool) or max_unsigned < 0
    ):
        raise ValueError(f"verify max_unsigned: {max_unsigned!r} is not an int >= 0")
    anchor_path: str | None = None
    if anchor is None or anchor is True:
        default = default_anchor_path(target.backend, target.path, target.conninfo)
        if default is not None and (anchor is True or (secret and os.path.exists(default))):
            anchor_path = default
    elif anchor is not False:
        anchor_path = os.fspath(anchor)
    found: dict[str, Any] | None = None
    if anchor_path is not None:
        try:
            found = read_anchor(anchor_path)
        except FileNotFoundError:
            raise JournalError(f"anchor {anchor_path!r} does not exist") from None
        except OSError as e:
            raise JournalError(f"cannot read anchor {anchor_path!r}: {e.strerror or e}") from None
        except ValueError as e:
            found = {"unreadable": str(e)}
    reader = open_reader(target)
    try:
        reader.snapshot()
        try:
            result = _verify(reader, secret)
            cps = reader.checkpoints() if found is not None else []
        finally:
            reader.end()
    finally:
        reader.close()
    if found is not None:
        result = _check_anchor(result, found, anchor_path or "", secret, cps)
    if result.ok and secret is not None:
        bound = max_unsigned
        if bound is None:
            bound = DEFAULT_MAX_UNSIGNED
            if found is not None:
                bound = int(found["max_unsigned"])
        result = _signed_to_the_end(result, bound)
    return result


def _fail(r: VerifyResult, seq: int, problem: str) -> VerifyResult:
    return dataclasses.replace(
        r, ok=False, first_bad_seq=seq, problem=problem, records=min(r.records, seq - 1)
    )


def _signed_to_the_end(r: VerifyResult, bound: int) -> VerifyResult:
    """With a key: the journal holds signed records, and few unsigned ones after them."""
    if r.last_seq == 0:
        return _fail(
            r,
            1,
            "the journal is empty, but a key was given: a signed journal holds at least one "
            "signed checkpoint (every record and checkpoint deleted?)",
        )
    if r.checkpoints == 0:
        return _fail(
            r,
            1,
            f"no signed checkpoint covers seq 1..{r.last_seq} (every checkpoint deleted, "
            "written without the key, or its only writer was killed before its first "
            "checkpoint)",
        )
    unsigned = r.last_seq - r.last_checkpoint_seq
    if unsigned > bound:
        return _fail(
            r,
            r.last_checkpoint_seq + 1,
            f"{unsigned} records after the last checkpoint (seq {r.last_checkpoint_seq}); a "
            f"writer leaves at most {bound} unsigned: checkpoints deleted, or the records "
            "added by someone without the key",
        )
    return r


def _check_anchor(
    r: VerifyResult, anchor: dict[str, Any], path: str, key: bytes | None, cps: list[Checkpoint]
) -> VerifyResult:
    """Compare the journal with its anchor (after the chain was checked)."""
    if "unreadable" in anchor:
        return _fail(r, 1, f"{anchor['unreadable']}")
    a_seq = int(anchor["seq"])
    r = dataclasses.replace(r, anchor=path, anchor_seq=a_seq)
    if not r.ok:
        return r
    why = anchor_problem(anchor, key)
    if why is not None:
        return _fail(r, 1, f"anchor {path}: {why}")
    if a_seq > r.last_seq:
        first = r.last_seq + 1
        what = "every record deleted" if r.last_seq == 0 else f"seq {first}..{a_seq} deleted"
        return _fail(
            r,
            first,
            f"the journal ends at seq {r.last_seq} but the anchor covers seq {a_seq}: "
            f"truncated ({what})",
        )
    match = [c for c in cps if c[0] == a_seq]
    if not match or match[0][1] != anchor["hash"] or match[0][2] != anchor["hmac"]:
        return _fail(
            r,
            min(a_seq, r.last_checkpoint_seq + 1),
            f"the anchor's checkpoint at seq {a_seq} is not in the journal (its records "
            "rewritten and the checkpoints after the edit deleted?)",
        )
    if anchor["closed"] and r.last_seq > a_seq and r.last_checkpoint_seq <= a_seq:
        return _fail(
            r,
            a_seq + 1,
            f"seq {a_seq + 1}..{r.last_seq} follow the checkpoint the writer closed with "
            f"(seq {a_seq}) and no writer signed them: added by someone else",
        )
    return r


_LOWEST_SEQ = -(2**63)  # the smallest integer SQLite and PostgreSQL (bigint) store


def _verify(reader: ReadStore, key: bytes | None) -> VerifyResult:
    cps = reader.checkpoints()
    bad_mac = _first_bad_mac(cps, key) if key is not None else None
    signed = key is not None
    foreign: tuple[int, str] | None = None  # the first journal.foreign_head record
    good_cp = 0  # seq of the last checkpoint that matched
    n_cp = 0
    j = 0
    expected = 1
    prev = GENESIS

    def broken(seq: int, problem: str) -> VerifyResult:
        return VerifyResult(
            ok=False,
            records=seq - 1,
            first_bad_seq=seq,
            problem=problem,
            checkpoints=n_cp,
            signed=signed,
            last_checkpoint_seq=good_cp,
            last_seq=expected - 1,
        )

    for row in reader.rows(since_seq=_LOWEST_SEQ):  # rows numbered below 1 too: see below
        seq, utc, mono, node, path, kind, data, row_prev, row_hash = row
        if seq < 1:
            return broken(
                1,
                f"a record numbered {seq} lies outside the chain (the writer numbers records "
                "from 1: inserted by hand)",
            )
        if seq != expected:
            return broken(expected, f"seq {expected} missing (expected {expected}, found {seq})")
        h = record_hash(row_prev, seq, utc, mono, node, path, kind, data)
        if row_prev != prev:
            other = reader.seq_of_hash(row_prev)
            if other is not None and other != seq - 1:
                return broken(
                    seq, f"record out of order at seq {seq}: it follows seq {other}, not {seq - 1}"
                )
            if h != row_hash:
                return broken(seq, f"hash mismatch at seq {seq} (record edited)")
            if seq == 1:
                return broken(
                    1,
                    "seq 1 does not start from the genesis hash (records before it deleted "
                    "and the rest renumbered?)",
                )
            return broken(
                seq - 1,
                f"seq {seq - 1} rewritten: its hash was recomputed but seq {seq} still links "
                "to the original",
            )
        if h != row_hash:
            return broken(seq, f"hash mismatch at seq {seq} (record edited)")
        if kind == "journal.foreign_head" and foreign is None:
            foreign = (seq, data)
        while j < len(cps) and cps[j][0] <= seq:
            cp_seq, cp_hash = cps[j][0], cps[j][1]
            if cp_seq < seq or cp_seq < 1:
                return broken(good_cp + 1, f"checkpoint at seq {cp_seq} names no record")
            if bad_mac == j:
                return broken(
                    good_cp + 1,
                    f"checkpoint at seq {cp_seq} has a bad HMAC (forged or edited, an earlier "
                    "checkpoint removed, or the wrong key)",
                )
            if cp_hash != row_hash:
                return broken(
                    good_cp + 1,
                    f"checkpoint at seq {cp_seq} does not match the chain: a record in seq "
                    f"{good_cp + 1}..{cp_seq} was rewritten and the chain recomputed",
                )
            good_cp = cp_seq
            n_cp += 1
            j += 1
        prev = row_hash
        expected += 1
    last = expected - 1
    if j < len(cps):
        cp_seq = cps[j][0]
        if bad_mac is not None and bad_mac <= j:
            return broken(
                last + 1,
                f"checkpoint at seq {cp_seq} has a bad HMAC (forged or edited, an earlier "
                "checkpoint removed, or the wrong key)",
            )
        return broken(
            last + 1,
            f"the journal ends at seq {last} but a checkpoint covers seq {cp_seq}: "
            f"seq {last + 1}..{cp_seq} deleted",
        )
    if foreign is not None:
        at, text = foreign
        try:
            found = json.loads(text)
            problem = str(found["problem"])
            bad = min(int(found["expected_seq"]) + 1, at)
        except (ValueError, KeyError, TypeError):
            problem, bad = text, at
        return broken(
            bad,
            f"a writer found rows at the head it had not written and stopped signing "
            f"(journal.foreign_head at seq {at}: {problem})",
        )
    return VerifyResult(
        ok=True,
        records=last,
        checkpoints=n_cp,
        signed=signed,
        last_checkpoint_seq=good_cp,
        last_seq=last,
    )


def _first_bad_mac(cps: list[Checkpoint], key: bytes) -> int | None:
    """The index of the first checkpoint whose HMAC does not verify."""
    prev_mac = ""
    for i, (seq, h, mac, utc) in enumerate(cps):
        try:
            want = checkpoint_mac(key, seq, h, utc, prev_mac)
        except (UnicodeEncodeError, TypeError):
            return i
        if not _hmac.compare_digest(str(mac), want):
            return i
        prev_mac = mac
    return None


def record_dict(row: Row) -> dict[str, Any]:
    """A record as a dict (``data`` parsed back from its JSON text)."""
    out = dict(zip(COLUMNS, row, strict=True))
    try:
        out["data"] = json.loads(row[6])
    except ValueError:
        pass  # an edited record: keep the text as it is
    return out


def tail(
    url: str,
    n: int = 20,
    follow: bool = False,
    since_seq: int | None = None,
    *,
    poll: float = 0.25,
) -> Iterator[dict[str, Any]]:
    """The last ``n`` records (or every record from ``since_seq`` on), oldest first, as
    dicts; with ``follow``, keeps yielding new records as they are committed (checking
    every ``poll`` seconds) until the iterator is closed.

    Example::

        for record in tail("sqlite:///journal.db", n=5):
            print(record["seq"], record["kind"], record["path"])
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"tail n: {n!r} is not an int >= 0")
    if since_seq is not None and (not isinstance(since_seq, int) or since_seq < 1):
        raise ValueError(f"tail since_seq: {since_seq!r} is not an int >= 1")
    reader = open_reader(parse_url(url))
    return _tail(reader, n, follow, since_seq, poll)


def _tail(
    reader: ReadStore, n: int, follow: bool, since_seq: int | None, poll: float
) -> Iterator[dict[str, Any]]:
    try:
        last = 0
        if since_seq is not None:
            last = since_seq - 1
            for row in reader.rows(since_seq):
                yield record_dict(row)
                last = row[0]
        else:
            rows = reader.last_rows(n) if n else []
            for row in rows:
                yield record_dict(row)
            head = rows or reader.last_rows(1)
            last = head[-1][0] if head else 0
        while follow:
            time.sleep(poll)
            for row in reader.rows(last + 1):
                yield record_dict(row)
                last = row[0]
    finally:
        reader.close()


def export(url: str, out: str | os.PathLike[str] | IO[str], format: str = "jsonl") -> int:
    """Write every record of the journal to ``out`` (a path or a text stream), one JSON
    object per line, oldest first; returns the number of records.

    Example::

        export("sqlite:///journal.db", "journal.jsonl")
    """
    if format != "jsonl":
        raise ValueError(f"export format: {format!r} is not supported (expected 'jsonl')")
    reader = open_reader(parse_url(url))
    try:
        if isinstance(out, str | os.PathLike):
            with open(out, "w", encoding="utf-8") as f:
                return _export(reader, f)
        return _export(reader, out)
    finally:
        reader.close()


def _export(reader: ReadStore, f: IO[str]) -> int:
    count = 0
    reader.snapshot()
    try:
        for row in reader.rows():
            f.write(json.dumps(record_dict(row), separators=(",", ":")))
            f.write("\n")
            count += 1
    finally:
        reader.end()
    return count

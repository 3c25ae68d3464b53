"""A durable, tamper-evident journal of every supervision event.

Example::

    import sys, trellis
    from trellis.journal import Journal, verify

    journal = Journal("sqlite:///journal.db")          # or "postgresql://..."
    sys.exit(trellis.run(root, extensions=[journal]))  # every event, hash-chained
    ...
    assert verify("sqlite:///journal.db").ok

Each telemetry event (except the per-line ``process.output``) becomes a record
``(seq, utc, mono, node, path, kind, data, prev_hash, hash)``: ``seq`` counts 1, 2, 3…
without gaps, ``utc`` is the wall time the event was handed over, ``mono`` the
event's Trellis clock ``time``, ``path`` its tree path, ``kind`` its name, ``data``
the rest of the event as canonical JSON (exit reasons as ``reason`` text plus
``reason_class``; child pids with their ``os_pid``). ``hash`` is SHA-256 over
``prev_hash`` and the record, so editing, deleting or reordering any record breaks
the chain at that seq (``verify``, ``trellis journal verify``). Triggers refuse
UPDATE and DELETE; with a key (``$TRELLIS_JOURNAL_KEY``, hex or text) the chain head
is signed with HMAC-SHA256 every ``checkpoint_every`` records and on close, so even
a chain recomputed after an edit is caught; the writer signs only on top of the head
it committed itself (anything else becomes a ``journal.foreign_head`` record), a
signed journal must end signed, and the last checkpoint is mirrored to an anchor file
outside the database, so truncating or emptying the journal is caught too
(``verify(url, anchor=...)``; docs/design.md has the table of what is and is not).
Under ``trellis run`` each run is bounded by ``run.started`` and ``run.stopped``
records, a run that died is journaled as ``run.unclean_end`` at the next start, and
every record carries its ``run_id``.

The supervisor never waits on the disk: events go to a bounded in-memory buffer, are
pickled a batch at a time, and a writer process of the journal's own serialises,
chains and commits them in groups (every 10 ms or 100 events by default), so that
work never holds the tree's GIL. A full buffer drops events, counts them and
journals a ``journal.dropped`` record in their place. What a kill -9 can lose is
documented on :class:`Journal`.

When not to use it: for logs of child output (``process.output``; use log files) or
for metrics (use the Prometheus exporter). It records what happened, for audits and SRE
reports, not how a service is doing right now.
"""

from ._errors import JournalError as JournalError
from ._errors import JournalNotFound as JournalNotFound
from ._errors import JournalURLError as JournalURLError
from ._errors import NotAJournal as NotAJournal
from ._format import GENESIS as GENESIS
from ._format import KEY_ENV as KEY_ENV
from ._format import record_hash as record_hash
from ._read import DEFAULT_MAX_UNSIGNED as DEFAULT_MAX_UNSIGNED
from ._read import VerifyResult as VerifyResult
from ._read import export as export
from ._read import tail as tail
from ._read import verify as verify
from ._store import parse_url as parse_url
from ._writer import Journal as Journal
from ._writer import JournalStatistics as JournalStatistics

__all__ = [
    "DEFAULT_MAX_UNSIGNED",
    "GENESIS",
    "KEY_ENV",
    "Journal",
    "JournalError",
    "JournalNotFound",
    "JournalStatistics",
    "JournalURLError",
    "NotAJournal",
    "VerifyResult",
    "export",
    "parse_url",
    "record_hash",
    "tail",
    "verify",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("trellis.journal._"):
        try:
            _obj.__module__ = "trellis.journal"
        except (AttributeError, TypeError):
            pass
del _name, _obj

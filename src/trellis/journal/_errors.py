"""Journal errors::

TrellisError
└── JournalError             the journal cannot be opened, read or written
    ├── JournalURLError      (also ValueError) the URL is malformed or unsupported
    ├── JournalNotFound      nothing at that URL (readers never create a journal)
    └── NotAJournal          the database holds no Trellis journal
"""

from __future__ import annotations

from trellis import TrellisError

__all__ = ["JournalError", "JournalNotFound", "JournalURLError", "NotAJournal"]


class JournalError(TrellisError):
    """The journal cannot be opened, read or written."""


class JournalURLError(JournalError, ValueError):
    """A journal URL that is malformed or names an unsupported backend."""


class JournalNotFound(JournalError):
    """There is no journal at the URL (reading never creates one)."""


class NotAJournal(JournalError):
    """The database exists but holds no Trellis journal (or a different schema)."""

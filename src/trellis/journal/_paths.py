"""Where journals live by default, and how their directory is made private."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from ._errors import JournalError

__all__ = ["default_journal_url", "journal_dir", "private_dir"]

_log = logging.getLogger("trellis.journal")


def journal_dir() -> Path:
    """``$TRELLIS_STATE_DIR``, else ``$XDG_STATE_HOME/trellis``, else
    ``~/.local/state/trellis``."""
    env = os.environ.get("TRELLIS_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "trellis"


def default_journal_url(name: str) -> str:
    """The journal of the tree named ``name`` when none is configured:
    ``sqlite:///<journal_dir>/<name>.journal.db``.

    Example::

        default_journal_url("shop")  # sqlite:////home/me/.local/state/trellis/shop.journal.db
    """
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return f"sqlite:///{journal_dir() / f'{safe}.journal.db'}"


def private_dir(directory: Path, *, check_existing: bool = True) -> None:
    """Make ``directory`` (where a journal's files go) ready and private.

    Missing: created with mode 0700 from the start (``mkdir(mode=0o700)``; missing
    parents get the usual mode). Existing, with ``check_existing`` (the state
    directory Trellis chose itself): it must be a real directory (not a symlink) owned
    by us (or root); one we own that others can read or write is made 0700, with a
    warning. Anything else raises :class:`JournalError` naming the directory, its
    owner and mode -- someone else's directory could swap the journal under us. A
    directory the user named (the parent of ``sqlite:///some/where.db``) is left as
    it is: the journal's own files are 0600 whatever the directory.

    Example::

        private_dir(journal_dir())
    """
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JournalError(
            f"journal: cannot create {directory.parent}: {e.strerror or e}"
        ) from None
    try:
        os.mkdir(directory, 0o700)
        return
    except FileExistsError:
        if not check_existing:
            if not directory.is_dir():
                raise JournalError(
                    f"journal: cannot create {directory}: it exists and is not a directory"
                ) from None
            return
    except OSError as e:
        raise JournalError(f"journal: cannot create {directory}: {e.strerror or e}") from None
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise JournalError(
            f"journal: {directory} is not a directory"
            + (" (a symlink)" if stat.S_ISLNK(st.st_mode) else "")
        )
    me = os.getuid()
    if st.st_uid not in (me, 0):
        raise JournalError(
            f"journal: {directory} must be owned by uid {me} with mode 0700 (it is uid "
            f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); fix or remove it"
        )
    if st.st_mode & 0o077:
        if st.st_uid != me:
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                raise JournalError(
                    f"journal: {directory} is writable by others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}); fix it or choose another directory"
                )
            return  # root's shared directory: the journal's own files are 0600
        try:
            os.chmod(directory, 0o700)
        except OSError as e:
            raise JournalError(f"journal: cannot make {directory} private: {e}") from None
        _log.warning(
            "journal: %s was open to others (mode %04o); its mode is now 0700",
            directory,
            stat.S_IMODE(st.st_mode),
        )

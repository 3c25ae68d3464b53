"""Where journals live by default."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_journal_url", "journal_dir"]


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

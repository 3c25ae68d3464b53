"""Loading a tree file for a command: errors printed as FILE:LINE: KEY: MESSAGE."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..config import ConfigError, TreeSpec

__all__ = ["load_tree", "load_tree_file"]


def load_tree(path: str) -> TreeSpec | None:
    """Load a tree file, printing every error to stderr; None if it is invalid.

    The current directory is importable, as with ``python -m``.

    Example::

        tree = load_tree("tree.toml")
    """
    loaded = load_tree_file(path)
    return loaded[0] if loaded is not None else None


def load_tree_file(path: str) -> tuple[TreeSpec, dict[str, Any]] | None:
    """Like :func:`load_tree`, with the parsed TOML too (what ``trellis reload`` diffs)."""
    from .._reload import read_tree

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return read_tree(path)
    except ConfigError as e:
        for issue in e.errors:
            click.echo(issue.format(e.source), err=True)
        n = len(e.errors)
        click.echo(f"{e.source}: {n} error{'s' if n != 1 else ''}", err=True)
        return None

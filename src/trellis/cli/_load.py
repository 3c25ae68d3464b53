"""Loading a tree file for a command: errors printed as FILE:LINE: KEY: MESSAGE."""

from __future__ import annotations

import os
import sys

import click

from ..config import ConfigError, TreeSpec, load

__all__ = ["load_tree"]


def load_tree(path: str) -> TreeSpec | None:
    """Load a tree file, printing every error to stderr; None if it is invalid.

    The current directory is importable, as with ``python -m``.

    Example::

        tree = load_tree("tree.toml")
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return load(path)
    except ConfigError as e:
        for issue in e.errors:
            click.echo(issue.format(e.source), err=True)
        n = len(e.errors)
        click.echo(f"{e.source}: {n} error{'s' if n != 1 else ''}", err=True)
        return None

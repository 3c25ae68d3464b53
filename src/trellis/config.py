"""Tree files: a supervision tree declared in TOML.

Example::

    from trellis.config import load

    tree = load("tree.toml")          # raises ConfigError listing every problem
    sys.exit(trellis.run(tree.child_spec()))

The root is the ``[supervisor]`` table (``name``, ``strategy``, ``intensity``,
``period``, ``auto_shutdown``); each ``[[supervisor.children]]`` is one child,
started in file order. A child is exactly one of: ``command = [...]`` (an OS
process, :func:`trellis.Command`), ``server = "pkg.mod:Class"`` (a
:class:`trellis.Server` subclass, with ``args``/``kwargs``), ``worker =
"pkg.mod:coroutine"`` (:func:`trellis.worker`) or a supervisor (a table with
``children`` or supervisor flags). Every child takes ``id``, ``restart``,
``shutdown``, ``significant`` and ``backoff``. Relative ``cwd`` and
``logs.dir`` are taken from the tree file's directory.

Every error names its key path and line; all of them are reported at once.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._childspec import ChildSpec
from ._config._locate import KeyPath, Locator, format_path
from ._config._tree import Node, walk
from ._core._exceptions import TrellisError
from ._supervisor import Supervisor

__all__ = ["ConfigError", "ConfigIssue", "TreeSpec", "load", "loads"]


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a tree file: the key ``path`` (``supervisor.children[1].restart``),
    its 1-based ``line`` (None when the file could not be read) and a ``message``.

    Example::

        issue = ConfigIssue("supervisor.intensity", 3, "must be >= 0")
        assert issue.format("tree.toml") == "tree.toml:3: supervisor.intensity: must be >= 0"
    """

    path: str
    line: int | None
    message: str

    def format(self, source: str) -> str:
        """``source:line: path: message``, as ``trellis check`` prints it."""
        where = f"{source}:{self.line}" if self.line is not None else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def __str__(self) -> str:
        if self.path and self.line is not None:
            return f"{self.message} ({self.path}, line {self.line})"
        if self.line is not None:
            return f"{self.message} (line {self.line})"
        return self.message


class ConfigError(TrellisError, ValueError):
    """A tree file is invalid; ``errors`` lists every problem, in file order.

    Example::

        try:
            load("tree.toml")
        except ConfigError as e:
            for issue in e.errors:
                print(issue.format(e.source))
    """

    def __init__(self, errors: Sequence[ConfigIssue], source: str = "<string>") -> None:
        self.errors = list(errors)
        self.source = source
        lines = "\n".join(issue.format(source) for issue in self.errors)
        count = len(self.errors)
        super().__init__(f"{count} error{'s' if count != 1 else ''} in {source}:\n{lines}")


@dataclass(frozen=True, slots=True)
class TreeSpec:
    """A valid tree file: the root supervisor's ``name``, ``flags`` and child specs.

    Example::

        tree = loads(text)
        sup = await tree.start()           # or trellis.run(tree.child_spec())
    """

    name: str
    flags: Mapping[str, Any]
    children: tuple[ChildSpec, ...]
    source: str = "<string>"
    outline: tuple[Node, ...] = field(default=(), repr=False)
    settings: Mapping[str, Any] = field(default_factory=dict)
    """How to operate it: the file's ``node``, ``[journal]``, ``[control]``, ``[metrics]``
    and ``[[chaos]]`` tables as given (validated; relative paths made absolute)."""

    def child_spec(self) -> ChildSpec:
        """A ``ChildSpec`` (type ``supervisor``) that starts the root, registered as ``name``.

        Example::

            sys.exit(trellis.run(load("tree.toml").child_spec()))
        """
        return Supervisor.child_spec(
            list(self.children), id=self.name, name=self.name, **self.flags
        )

    async def start(self) -> Any:
        """Start the root supervisor linked to the caller; returns its ``SupervisorPid``.

        Example::

            sup = await load("tree.toml").start()
            await sup.stop()
        """
        return await Supervisor.start_link(list(self.children), name=self.name, **self.flags)

    def describe(self) -> str:
        """An indented outline of the tree: one line per child, in start order.

        Example::

            print(load("tree.toml").describe())
        """
        strategy = self.flags.get("strategy", "one_for_one")
        out = [f"{self.name}: supervisor {strategy}"]

        def add(nodes: tuple[Node, ...], indent: str) -> None:
            for node in nodes:
                out.append(f"{indent}{node.id}: {node.kind} {node.detail}")
                add(node.children, indent + "  ")

        add(self.outline, "  ")
        return "\n".join(out)


def load(path: str | os.PathLike[str]) -> TreeSpec:
    """Read and validate the tree file at ``path``; raises :class:`ConfigError`.

    The file's directory is put on ``sys.path`` (for ``server``/``worker``
    imports) and is the base of relative ``cwd`` and ``logs.dir``.

    Example::

        tree = load("examples/trees/services.toml")
        print(tree.describe())
    """
    p = Path(path)
    source = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([ConfigIssue("", None, f"cannot read: {e.strerror or e}")], source) from e
    except UnicodeDecodeError as e:
        raise ConfigError([ConfigIssue("", None, f"not UTF-8 text: {e}")], source) from e
    base = p.resolve().parent
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))
    return _loads(text, source, base)


def loads(text: str, source: str = "<string>") -> TreeSpec:
    """Validate a tree file given as text; raises :class:`ConfigError`.

    Relative ``cwd`` and ``logs.dir`` are taken from the current directory.

    Example::

        tree = loads('''
        [supervisor]
        [[supervisor.children]]
        id = "ticker"
        worker = "myapp.jobs:tick"
        ''')
    """
    return _loads(text, source, Path.cwd())


MAX_NESTING = 64
"""How deeply arrays and inline tables may nest in a tree file."""


def _loads(text: str, source: str, base_dir: Path) -> TreeSpec:
    deep = _too_deep(text, MAX_NESTING)
    if deep is not None:
        message = (
            f"arrays and inline tables nested more than {MAX_NESTING} levels deep "
            "(a tree file never needs that many)"
        )
        raise ConfigError([ConfigIssue("", deep, message)], source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_syntax_issue(e, text)], source) from None
    except RecursionError:  # pragma: no cover - _too_deep catches what tomllib cannot parse
        raise ConfigError([ConfigIssue("", 1, "nested too deeply to parse")], source) from None
    locator = Locator(text)
    issues: list[ConfigIssue] = []

    def issue(path: KeyPath, message: str) -> None:
        line = locator.line(path)
        issues.append(ConfigIssue(format_path(path), line if line is not None else 1, message))

    try:
        tree = walk(data, base_dir, issue)
    except RecursionError:  # pragma: no cover - a value nested within MAX_NESTING is fine
        raise ConfigError([ConfigIssue("", 1, "nested too deeply to check")], source) from None
    if issues or tree is None:
        issues.sort(key=lambda i: i.line or 0)
        raise ConfigError(issues or [ConfigIssue("", 1, "invalid tree file")], source)
    return TreeSpec(tree.name, tree.flags, tree.children, source, tree.outline, tree.settings)


def _too_deep(text: str, limit: int) -> int | None:
    """The line where arrays/inline tables first nest deeper than ``limit``, else None
    (``tomllib`` recurses once per level and fails with a RecursionError near 500).
    Strings and comments are skipped; invalid TOML is left to ``tomllib``."""
    depth = 0
    line = 1
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c in "\"'":
            triple = text.startswith(c * 3, i)
            quote = c * 3 if triple else c
            j = i + len(quote)
            while j < n and not text.startswith(quote, j):
                if text[j] == "\\" and c == '"':
                    j += 1
                elif text[j] == "\n":
                    if not triple:
                        break
                    line += 1
                j += 1
            i = j + len(quote) if text.startswith(quote, j) else j
            continue
        elif c in "[{":
            depth += 1
            if depth > limit:
                return line
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return None


def _syntax_issue(e: tomllib.TOMLDecodeError, text: str) -> ConfigIssue:
    msg = str(e)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
    if m is not None:
        line, column = int(m.group(1)), m.group(2)
        return ConfigIssue("", line, f"invalid TOML: {msg[: m.start()]} (column {column})")
    end = re.search(r"\s*\(at end of document\)$", msg)
    last = max(1, len(text.splitlines()))
    return ConfigIssue("", last, f"invalid TOML: {msg[: end.start()] if end else msg} (at the end)")

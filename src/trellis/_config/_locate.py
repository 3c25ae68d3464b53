"""Line numbers for TOML key paths (``tomllib`` gives none).

A small scanner over the TOML text, run after ``tomllib`` accepted it, that
records the line where every table header, array-of-tables element, ``key =``
and array element starts. Paths are tuples such as
``("supervisor", "children", 1, "restart")``.
"""

from __future__ import annotations

import bisect
import json
import tomllib

__all__ = ["KeyPath", "Locator", "format_path"]

KeyPath = tuple[str | int, ...]

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SCALAR_END = frozenset(",]}#\n\r")


def format_path(path: KeyPath) -> str:
    """``("a", "b", 2, "c d")`` -> ``a.b[2]."c d"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if part and all(c in _BARE for c in part) else _quoted(part)
            out += f".{key}" if out else key
    return out


def _quoted(key: str) -> str:
    """``key`` as a TOML basic string (control characters escaped, never raw)."""
    return json.dumps(key, ensure_ascii=False)


class Locator:
    """Maps key paths of one TOML document to 1-based line numbers.

    Example::

        loc = Locator('[a]\\nb = 1\\n')
        assert loc.line(("a", "b")) == 2
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        self._lines: dict[KeyPath, int] = {}
        self._aot: dict[KeyPath, int] = {}
        self._i = 0
        try:
            self._document()
        except (IndexError, ValueError, tomllib.TOMLDecodeError):  # pragma: no cover - defensive
            pass  # invalid TOML: keep what was found so far

    def exact(self, path: KeyPath) -> int | None:
        """The line where ``path`` itself is written, or None."""
        return self._lines.get(path)

    def line(self, path: KeyPath) -> int | None:
        """The line of ``path``, else of its nearest written ancestor; None if neither."""
        p = tuple(path)
        while p:
            found = self._lines.get(p)
            if found is not None:
                return found
            p = p[:-1]
        return None

    # -- scanning -------------------------------------------------------------------
    def _lineno(self, index: int) -> int:
        return bisect.bisect_right(self._starts, index)

    def _record(self, path: KeyPath, index: int) -> None:
        self._lines.setdefault(path, self._lineno(index))

    def _peek(self, n: int = 1) -> str:
        return self._text[self._i : self._i + n]

    def _skip_ws(self, newlines: bool) -> None:
        text = self._text
        while self._i < len(text):
            c = text[self._i]
            if c in " \t" or (newlines and c in "\r\n"):
                self._i += 1
            elif c == "#" and newlines:
                while self._i < len(text) and text[self._i] != "\n":
                    self._i += 1
            else:
                return

    def _document(self) -> None:
        table: KeyPath = ()
        text = self._text
        while True:
            self._skip_ws(newlines=True)
            if self._i >= len(text):
                return
            start = self._i
            if text.startswith("[[", self._i):
                self._i += 2
                keys = self._key()
                self._skip_ws(newlines=False)
                self._i += 2  # ]]
                parent = self._resolve(keys[:-1])
                array = (*parent, keys[-1])
                index = self._aot.get(array, 0)
                self._aot[array] = index + 1
                table = (*array, index)
                self._record(array, start)
                self._record(table, start)
            elif text.startswith("[", self._i):
                self._i += 1
                keys = self._key()
                self._skip_ws(newlines=False)
                self._i += 1  # ]
                table = (*self._resolve(keys[:-1]), keys[-1])
                self._record(table, start)
            else:
                keys = self._key()
                self._skip_ws(newlines=False)
                self._i += 1  # =
                for n in range(1, len(keys) + 1):  # a.b.c = 1 also writes a and a.b
                    self._record((*table, *keys[:n]), start)
                path = (*table, *keys)
                self._value(path)

    def _resolve(self, keys: tuple[str, ...]) -> KeyPath:
        """A header's parent path: arrays of tables stand for their last element."""
        path: KeyPath = ()
        for key in keys:
            path = (*path, key)
            count = self._aot.get(path)
            if count:
                path = (*path, count - 1)
        return path

    def _key(self) -> tuple[str, ...]:
        parts: list[str] = []
        text = self._text
        while True:
            self._skip_ws(newlines=False)
            c = text[self._i]
            if c in "\"'":
                start = self._i
                self._string()
                raw = text[start : self._i]
                parts.append(str(tomllib.loads(f"k = {raw}")["k"]))
            else:
                start = self._i
                while self._i < len(text) and text[self._i] in _BARE:
                    self._i += 1
                parts.append(text[start : self._i])
            self._skip_ws(newlines=False)
            if self._peek() == ".":
                self._i += 1
                continue
            return tuple(parts)

    def _string(self) -> None:
        text = self._text
        quote = text[self._i]
        escapes = quote == '"'
        if text.startswith(quote * 3, self._i):
            self._i += 3
            while not text.startswith(quote * 3, self._i):
                self._i += 2 if escapes and text[self._i] == "\\" else 1
            end = self._i + 3
            while end - self._i < 5 and text.startswith(quote, end):  # """a""""" is legal
                end += 1
            self._i = end
            return
        self._i += 1
        while text[self._i] != quote:
            self._i += 2 if escapes and text[self._i] == "\\" else 1
        self._i += 1

    def _value(self, path: KeyPath) -> None:
        self._skip_ws(newlines=False)
        c = self._peek()
        if c in ("'", '"'):
            self._string()
        elif c == "[":
            self._array(path)
        elif c == "{":
            self._inline_table(path)
        else:
            text = self._text
            while self._i < len(text) and text[self._i] not in _SCALAR_END:
                self._i += 1

    def _array(self, path: KeyPath) -> None:
        self._i += 1
        index = 0
        while True:
            self._skip_ws(newlines=True)
            if self._peek() == "]":
                self._i += 1
                return
            self._record((*path, index), self._i)
            self._value((*path, index))
            index += 1
            self._skip_ws(newlines=True)
            if self._peek() == ",":
                self._i += 1

    def _inline_table(self, path: KeyPath) -> None:
        self._i += 1
        while True:
            self._skip_ws(newlines=True)
            if self._peek() == "}":
                self._i += 1
                return
            start = self._i
            keys = self._key()
            self._skip_ws(newlines=False)
            self._i += 1  # =
            for n in range(1, len(keys) + 1):
                self._record((*path, *keys[:n]), start)
            sub = (*path, *keys)
            self._value(sub)
            self._skip_ws(newlines=True)
            if self._peek() == ",":
                self._i += 1

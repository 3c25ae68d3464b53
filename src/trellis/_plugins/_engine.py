"""Engines, call deadlines and the compiled-module cache.

Every plugin instance has an engine of its own (creating one costs microseconds), so its
epoch is its own: a deadline is "the store traps at the next epoch", and the
:data:`watchdog` thread advances that engine's epoch exactly when the call's time is up,
or at once to cut a stopped plugin's call short. The watchdog sleeps until the earliest
deadline of a call in flight (re-checked when one ends, never on a period), and on a
condition when no call runs: a busy process pays about one wake-up per ``timeout``, an
idle one none.

Modules are compiled once on a shared engine and kept serialized (``Module.serialize``)
in memory and on disk, keyed by sha256, fuel setting and wasmtime version; an instance's
engine loads them with ``Module.deserialize`` (tens of microseconds), so a restart costs
an instantiation, not a compile. The disk cache is used only when its directory is ours
and not writable by anyone else (a serialized module is native code).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import wasmtime

__all__ = [
    "cache_dir",
    "engine",
    "load_module",
    "module_for",
    "new_engine",
    "serialized",
    "to_wasm",
    "watchdog",
]

_log = logging.getLogger("trellis.plugins")

_engines: dict[bool, wasmtime.Engine] = {}
_engines_lock = threading.Lock()


def _config(fuel: bool) -> wasmtime.Config:
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    cfg.consume_fuel = fuel
    return cfg


def engine(fuel: bool = False) -> wasmtime.Engine:
    """The shared engine modules are compiled (and validated) on."""
    e = _engines.get(fuel)
    if e is not None:
        return e
    with _engines_lock:
        e = _engines.get(fuel)
        if e is None:
            e = _engines[fuel] = wasmtime.Engine(_config(fuel))
        return e


def new_engine(fuel: bool = False) -> wasmtime.Engine:
    """An engine for one instance: its epoch is that instance's alone."""
    return wasmtime.Engine(_config(fuel))


class _Watchdog:
    """Advances an instance's epoch when its call's deadline passes (see the module
    docs). ``arm``/``disarm`` bracket every call; ``wakeups`` counts the thread's turns."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, wasmtime.Engine]] = {}
        self._target: float | None = None
        self._thread: threading.Thread | None = None
        self.wakeups = 0

    def arm(self, key: int, eng: wasmtime.Engine, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._armed[key] = (deadline, eng)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="trellis-plugin-deadlines", daemon=True
                )
                self._thread.start()
            elif self._target is None or deadline < self._target:
                self._cond.notify()

    def disarm(self, key: int) -> None:
        with self._cond:
            self._armed.pop(key, None)

    @property
    def armed(self) -> int:
        return len(self._armed)

    def _run(self) -> None:
        cond = self._cond
        with cond:
            while True:
                self.wakeups += 1
                now = time.monotonic()
                nxt: float | None = None
                for key, (deadline, eng) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[key]
                        eng.increment_epoch()  # the call traps at its next epoch check
                    elif nxt is None or deadline < nxt:
                        nxt = deadline
                self._target = nxt
                cond.wait(None if nxt is None else nxt - now)


watchdog = _Watchdog()


# ---------------------------------------------------------------------------
# Sources and the module cache
# ---------------------------------------------------------------------------


def to_wasm(source: Any) -> tuple[bytes, str]:
    """The wasm bytes of ``source`` and a label for messages.

    ``source`` is a path to a ``.wasm`` (or ``.wat``, compiled with ``wat2wasm``) file,
    wasm bytes, or WAT text (str or bytes). Raises ``ValueError`` naming the problem.
    """
    if isinstance(source, str | os.PathLike) and not (
        isinstance(source, str) and source.lstrip().startswith("(")
    ):
        path = Path(os.fspath(source))
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ValueError(f"no such module file: {path}") from None
        except OSError as e:
            raise ValueError(f"cannot read module {path}: {e.strerror or e}") from None
        label = str(path)
    elif isinstance(source, bytes | bytearray | memoryview | str):
        raw = source.encode() if isinstance(source, str) else bytes(source)
        label = "<bytes>" if raw[:4] == b"\0asm" else "<wat>"
    else:
        raise ValueError(f"a plugin source is a path, wasm bytes or WAT text, not {source!r}")
    if raw[:4] != b"\0asm":
        try:
            raw = bytes(wasmtime.wat2wasm(raw.decode("utf-8", "replace")))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{label} is not a wasm module (nor valid WAT): {first}") from None
    try:
        wasmtime.Module.validate(engine(False), raw)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{label} is not a valid wasm module: {first}") from None
    return raw, label


_VERSION = ""


def _wasmtime_version() -> str:
    global _VERSION
    if not _VERSION:
        try:
            _VERSION = metadata.version("wasmtime")
        except metadata.PackageNotFoundError:
            _VERSION = "unknown"
    return _VERSION


_serialized: dict[tuple[str, bool], bytes] = {}
_by_bytes: dict[tuple[bytes, bool], tuple[bytes, str]] = {}
_module_locks: dict[tuple[str, bool], threading.Lock] = {}
_modules_lock = threading.Lock()
stats = {"compiled": 0, "disk_hits": 0, "memory_hits": 0}


def cache_dir() -> Path | None:
    """The disk cache directory (``TRELLIS_PLUGIN_CACHE``; ``off`` disables it), or None
    when it cannot be used safely."""
    env = os.environ.get("TRELLIS_PLUGIN_CACHE")
    if env is not None and env.strip().lower() in ("", "off", "0", "none"):
        return None
    if env:
        d = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        d = Path(base) / "trellis" / "plugins"
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = d.stat()
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        _log.warning("plugin cache %s is not private to this user: not used", d)
        return None
    return d


def serialized(wasm: bytes, fuel: bool) -> tuple[bytes, str]:
    """``wasm`` compiled (from memory, disk, or compiled now) and serialized, and its
    sha256. Thread-safe; two threads asking for the same module compile it once."""
    known = _by_bytes.get((wasm, fuel))  # bytes cache their hash: no sha256 per restart
    if known is not None:
        stats["memory_hits"] += 1
        return known
    sha = hashlib.sha256(wasm).hexdigest()
    key = (sha, fuel)
    ser = _serialized.get(key)
    if ser is not None:
        stats["memory_hits"] += 1
        _by_bytes[(wasm, fuel)] = (ser, sha)
        return ser, sha
    with _modules_lock:
        lock = _module_locks.setdefault(key, threading.Lock())
    with lock:
        ser = _serialized.get(key)
        if ser is not None:
            stats["memory_hits"] += 1
            return ser, sha
        d = cache_dir()
        path = (
            d / f"{sha}-{'fuel' if fuel else 'plain'}-{_wasmtime_version()}.cwasm"
            if d is not None
            else None
        )
        if path is not None and path.exists():
            try:
                data = path.read_bytes()
                wasmtime.Module.deserialize(engine(fuel), data)  # usable by this wasmtime?
                ser = data
                stats["disk_hits"] += 1
            except Exception as e:  # stale or damaged: compile again
                _log.warning("plugin cache entry %s unusable (%s): recompiling", path, e)
                ser = None
        if ser is None:
            ser = bytes(wasmtime.Module(engine(fuel), wasm).serialize())
            stats["compiled"] += 1
            if path is not None:
                _store(path, ser)
        _serialized[key] = ser
        _by_bytes[(wasm, fuel)] = (ser, sha)
        return ser, sha


def module_for(eng: wasmtime.Engine, ser: bytes) -> wasmtime.Module:
    """A serialized module (from :func:`serialized`) loaded into ``eng``."""
    return wasmtime.Module.deserialize(eng, ser)


def load_module(wasm: bytes, fuel: bool) -> tuple[wasmtime.Module, str]:
    """``wasm`` as a module on the shared engine (benchmarks), and its sha256."""
    ser, sha = serialized(wasm, fuel)
    return module_for(engine(fuel), ser), sha


def _store(path: Path, data: bytes) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".cwasm")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        _log.warning("cannot write plugin cache %s: %s", path, e)
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


def forget_modules() -> None:
    """Drop the in-memory cache (tests and benchmarks: measure a disk or cold load)."""
    with _modules_lock:
        _serialized.clear()
        _by_bytes.clear()

"""The shared wasmtime engines, the epoch ticker and the compiled-module cache.

One engine per fuel setting (a module compiled for one engine cannot run on another),
so every plugin of a process shares compiled code. Deadlines are epoch interruption:
before each call the store's deadline is set to ``ceil(timeout / TICK)`` ticks after
the current epoch, and one ticker thread advances the epoch every ``TICK`` seconds
while at least one call is running; with no call in flight it sleeps on a condition
(no wake-ups at all).

Compiled modules are cached in memory and on disk (``Module.serialize``), keyed by
the module's sha256, the fuel setting and the wasmtime version, so a restart costs an
instantiation, not a compile. The disk cache is used only when its directory is ours
and not writable by anyone else (a serialized module is native code).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import stat
import tempfile
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import wasmtime

__all__ = ["TICK", "cache_dir", "deadline_ticks", "engine", "load_module", "ticker", "to_wasm"]

_log = logging.getLogger("trellis.plugins")

#: The epoch tick: a deadline fires between ``timeout`` and ``timeout + TICK`` late.
TICK = 0.005

_engines: dict[bool, wasmtime.Engine] = {}
_engines_lock = threading.Lock()


def engine(fuel: bool = False) -> wasmtime.Engine:
    """The process-wide engine (epoch interruption on; fuel metering when ``fuel``)."""
    e = _engines.get(fuel)
    if e is not None:
        return e
    with _engines_lock:
        e = _engines.get(fuel)
        if e is None:
            cfg = wasmtime.Config()
            cfg.epoch_interruption = True
            cfg.consume_fuel = fuel
            e = _engines[fuel] = wasmtime.Engine(cfg)
        return e


def deadline_ticks(timeout: float) -> int:
    """Epoch ticks for a deadline of ``timeout`` seconds (at least one)."""
    return max(1, math.ceil(timeout / TICK))


class _Ticker:
    """Advances every engine's epoch every ``TICK`` while calls run; idle otherwise."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._thread: threading.Thread | None = None
        self.ticks = 0  # how many times it ticked (tests: it costs nothing when idle)

    def enter(self) -> None:
        with self._cond:
            self._active += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="trellis-plugin-epoch", daemon=True
                )
                self._thread.start()
            elif self._active == 1:
                self._cond.notify()

    def leave(self) -> None:
        with self._cond:
            self._active -= 1

    @property
    def active(self) -> int:
        return self._active

    def _run(self) -> None:
        wait = threading.Event().wait
        while True:
            with self._cond:
                while self._active == 0:
                    self._cond.wait()
            wait(TICK)
            for e in list(_engines.values()):
                e.increment_epoch()
            self.ticks += 1


ticker = _Ticker()


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


_modules: dict[tuple[str, bool], wasmtime.Module] = {}
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


def load_module(wasm: bytes, fuel: bool) -> tuple[wasmtime.Module, str]:
    """The compiled module for ``wasm`` (from memory, disk, or compiled now) and its sha256.

    Thread-safe; two threads asking for the same module compile it once.
    """
    sha = hashlib.sha256(wasm).hexdigest()
    key = (sha, fuel)
    mod = _modules.get(key)
    if mod is not None:
        stats["memory_hits"] += 1
        return mod, sha
    with _modules_lock:
        lock = _module_locks.setdefault(key, threading.Lock())
    with lock:
        mod = _modules.get(key)
        if mod is not None:
            stats["memory_hits"] += 1
            return mod, sha
        eng = engine(fuel)
        d = cache_dir()
        path = (
            d / f"{sha}-{'fuel' if fuel else 'plain'}-{_wasmtime_version()}.cwasm"
            if d is not None
            else None
        )
        if path is not None and path.exists():
            try:
                mod = wasmtime.Module.deserialize_file(eng, str(path))
                stats["disk_hits"] += 1
            except Exception as e:  # stale or damaged: compile again
                _log.warning("plugin cache entry %s unusable (%s): recompiling", path, e)
                mod = None
        if mod is None:
            mod = wasmtime.Module(eng, wasm)
            stats["compiled"] += 1
            if path is not None:
                _store(path, bytes(mod.serialize()))
        _modules[key] = mod
        return mod, sha


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
        _modules.clear()

"""One instance of a plugin module in its own wasmtime store, driven by one thread.

An ``_Instance`` is created, called and dropped only by its worker thread. It links
the module against what the spec grants and nothing else: the Extism ABI
(``extism:host/env``: Trellis's kernel for memory, input and output, plus config,
vars, log and, only with ``allowed_hosts``, HTTP), and WASI only with ``wasi=True``
(preopened ``allowed_paths`` and nothing else: no environment, no arguments, no
inherited stdio). Any other import makes the start fail with a message naming it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import wasmtime
from wasmtime import FuncType, ValType
from wasmtime import _bindings as _b
from wasmtime import _func as _wfunc

from . import _engine
from ._errors import PluginError

__all__ = ["EXTISM_ENV", "Grants", "Instance"]

EXTISM_ENV = "extism:host/env"
_WASI = "wasi_snapshot_preview1"
_log = logging.getLogger("trellis.plugins")

_kernel_wasm: bytes | None = None
_kernel_lock = threading.Lock()

# The Extism ABI functions the host (not the kernel) provides, with their types.
_I64, _I32 = ValType.i64(), ValType.i32()
_HOST_FUNCS: dict[str, tuple[list[ValType], list[ValType]]] = {
    "config_get": ([_I64], [_I64]),
    "var_get": ([_I64], [_I64]),
    "var_set": ([_I64, _I64], []),
    "http_request": ([_I64, _I64], [_I64]),
    "http_status_code": ([], [_I32]),
    "http_headers": ([], [_I64]),
    "log_trace": ([_I64], []),
    "log_debug": ([_I64], []),
    "log_info": ([_I64], []),
    "log_warn": ([_I64], []),
    "log_error": ([_I64], []),
    "get_log_level": ([], [_I32]),
}
_LEVELS = {
    "log_trace": 5,
    "log_debug": logging.DEBUG,
    "log_info": logging.INFO,
    "log_warn": logging.WARNING,
    "log_error": logging.ERROR,
}
MAX_VAR_BYTES = 1 << 20


def kernel_module(eng: wasmtime.Engine, fuel: bool) -> wasmtime.Module:
    """The compiled Extism kernel, loaded into ``eng``."""
    global _kernel_wasm
    with _kernel_lock:
        if _kernel_wasm is None:
            text = resources.files(__package__).joinpath("_kernel.wat").read_text("utf-8")
            _kernel_wasm = bytes(wasmtime.wat2wasm(text))
    ser, _ = _engine.serialized(_kernel_wasm, fuel)
    return _engine.module_for(eng, ser)


@dataclass(frozen=True)
class Grants:
    """What of the host a plugin may reach (nothing by default)."""

    wasi: bool = False
    allowed_paths: Mapping[str, str] = field(default_factory=dict)  # host dir -> guest dir
    allowed_hosts: tuple[str, ...] = ()


class _HostFault(Exception):
    """Raised inside a host function to trap the call; carries the real error."""

    def __init__(self, owner: Instance, error: PluginError) -> None:
        super().__init__(error.message)
        self.owner = owner
        self.error = error


_FIELD = {"i32": "i32", "i64": "i64", "f32": "f32", "f64": "f64"}
_KIND = {"i32": 0, "i64": 1, "f32": 2, "f64": 3}
_OUTCOME = struct.Struct("<qqqq")


class _Fast:
    """A numeric export called straight through ``wasmtime_func_call`` with its types
    and argument arrays prepared once (``Func.__call__`` looks the type up and builds
    the arrays on every call). Only for i32/i64/f32/f64 parameters and results."""

    __slots__ = ("args", "call", "ctx", "fref", "np", "nr", "pf", "res", "rf", "trap", "tref")

    @staticmethod
    def usable(params: list[ValType], results: list[ValType]) -> bool:
        return all(str(t) in _KIND for t in (*params, *results))

    def __init__(
        self, store: wasmtime.Store, func: wasmtime.Func, params: list[ValType],
        results: list[ValType],
    ) -> None:  # fmt: skip
        self.ctx = store._context()
        self.fref = ctypes.byref(func._func)
        self.np, self.nr = len(params), len(results)
        self.args = (_b.wasmtime_val_t * max(1, self.np))()
        self.res = (_b.wasmtime_val_t * max(1, self.nr))()
        for i, t in enumerate(params):
            self.args[i].kind = _KIND[str(t)]  # type: ignore[assignment]
        self.pf = [_FIELD[str(t)] for t in params]
        self.rf = [_FIELD[str(t)] for t in results]
        self.trap = ctypes.POINTER(_b.wasm_trap_t)()
        self.tref = ctypes.byref(self.trap)
        self.call = _b._wasmtime_func_call

    def __call__(self, *values: Any) -> Any:
        args = self.args
        for i, v in enumerate(values):
            setattr(args[i].of, self.pf[i], v)
        err = self.call(self.ctx, self.fref, args, self.np, self.res, self.nr, self.tref)
        if err or self.trap:
            self._raise(err)
        if self.nr == 1:
            return getattr(self.res[0].of, self.rf[0])
        if self.nr == 0:
            return None
        return [getattr(self.res[i].of, f) for i, f in enumerate(self.rf)]

    def _raise(self, err: Any) -> None:
        trap = self.trap
        self.trap = ctypes.POINTER(_b.wasm_trap_t)()
        self.tref = ctypes.byref(self.trap)
        try:
            _wfunc.maybe_raise_last_exn()  # a host function's exception (ours are recorded)
        except Exception:
            pass
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)
        raise wasmtime.Trap._from_ptr(trap)


class Instance:
    """A live instance: ``call(function, data) -> bytes`` or raise ``PluginError``."""

    def __init__(
        self,
        compiled: bytes,
        *,
        plugin: str,
        memory: int,
        timeout: float,
        fuel: int | None,
        config: Mapping[str, str],
        grants: Grants,
    ) -> None:
        self.plugin = plugin
        self.memory_cap = memory
        self.timeout = timeout
        self.fuel = fuel
        self.config = dict(config)
        self.grants = grants
        self.vars: dict[str, bytes] = {}
        self.fuel_used = 0
        self.memory_high = 0
        self._fault: PluginError | None = None
        self._http_status = 0
        # an engine of its own: its epoch (the deadline) is this instance's alone
        eng = self.engine = _engine.new_engine(fuel is not None)
        module = _engine.module_for(eng, compiled)
        store = self.store = wasmtime.Store(eng)
        store.set_limits(memory_size=memory)
        linker = wasmtime.Linker(eng)
        imports = _imports(compiled, module)
        self.extism = any(m == EXTISM_ENV for m, _ in imports)
        for mod_name, name in sorted(imports):
            if mod_name == EXTISM_ENV:
                continue
            if mod_name == _WASI:
                if not grants.wasi:
                    raise PluginError(
                        "error",
                        f"the module imports {mod_name}::{name}: WASI is not granted "
                        "(wasi=True grants it)",
                        plugin=plugin,
                    )
                continue
            raise PluginError(
                "error",
                f"the module imports {mod_name}::{name}, which this host does not provide",
                plugin=plugin,
            )
        if grants.wasi:
            wasi = wasmtime.WasiConfig()
            for host_dir, guest_dir in grants.allowed_paths.items():
                wasi.preopen_dir(host_dir, guest_dir, False)
            store.set_wasi(wasi)
            linker.define_wasi()
        self.kernel: Any = None
        if self.extism:
            kinst = wasmtime.Instance(store, kernel_module(eng, fuel is not None), [])
            # exports looked up one by one: Instance.exports() would wrap all thirty
            linker.define_instance(store, EXTISM_ENV, kinst)

            def kx(name: str) -> Any:
                return linker.get(store, EXTISM_ENV, name)

            self.kernel = kx
            kmem = kx("memory")
            assert isinstance(kmem, wasmtime.Memory)
            self.kmem: wasmtime.Memory = kmem
            self.k_alloc: Any = kx("alloc")
            self.k_length: Any = kx("length")
            self.k_oom: Any = kx("oom")
            prepare, finish = kx("prepare"), kx("finish")
            assert isinstance(prepare, wasmtime.Func)
            assert isinstance(finish, wasmtime.Func)
            self.k_prepare = _Fast(store, prepare, [_I64], [_I64])
            self.k_finish = _Fast(store, finish, [], [])
            for fname in _HOST_FUNCS:
                if (EXTISM_ENV, fname) not in imports:
                    continue  # only what the module imports
                linker.define_func(
                    EXTISM_ENV,
                    fname,
                    FuncType(*_HOST_FUNCS[fname]),  # types belong to an engine: new each time
                    self._host_func(fname),
                    access_caller=True,
                )
        if fuel is not None:
            store.set_fuel(fuel)
        store.set_epoch_deadline(1)
        _engine.watchdog.arm(id(self), eng, timeout)  # a start function has the deadline too
        try:
            self.instance = linker.instantiate(store, module)
        except wasmtime.Trap as e:
            if e.trap_code == wasmtime.TrapCode.INTERRUPT:
                raise PluginError(
                    "timeout", f"start function ran past {timeout}s", plugin=plugin
                ) from None
            raise PluginError(
                "trap", f"start function trapped: {_first_line(e)}", plugin=plugin
            ) from None
        except wasmtime.WasmtimeError as e:
            raise PluginError(
                "error", f"cannot instantiate: {_first_line(e)}", plugin=plugin
            ) from None
        finally:
            _engine.watchdog.disarm(id(self))
        linker.define_instance(store, _SELF, self.instance)
        self._linker = linker
        exports = self.exports = _Exports(linker, store)
        mem = exports.get("memory") if hasattr(exports, "get") else None
        self.memory: wasmtime.Memory | None = mem if isinstance(mem, wasmtime.Memory) else None
        self._funcs: dict[str, tuple[Any, bool, list[ValType], list[ValType]]] = {}
        for init in ("_initialize", "__wasm_call_ctors"):
            f = _get(exports, init)
            if isinstance(f, wasmtime.Func):
                self._run(lambda f=f: f(store), init)  # type: ignore[misc]
                break
        self._measure()

    # -- calling ------------------------------------------------------------------
    def function(self, name: str) -> tuple[Any, bool, list[ValType], list[ValType]]:
        entry = self._funcs.get(name)
        if entry is None:
            f = _get(self.exports, name)
            if not isinstance(f, wasmtime.Func):
                raise PluginError(
                    "error", f"no exported function {name!r}", plugin=self.plugin, function=name
                )
            ty = f.type(self.store)
            params, results = list(ty.params), list(ty.results)
            extism_style = (
                self.extism
                and not params
                and (not results or (len(results) == 1 and results[0] == _I32))
            )
            usable = _Fast.usable(params, results)
            fast: Any = _Fast(self.store, f, params, results) if usable else f
            entry = self._funcs[name] = (fast, extism_style, params, results)
        return entry

    def call(self, name: str, data: Any) -> bytes:
        """Run export ``name`` on ``data``; raises ``PluginError``."""
        f, extism_style, params, results = self.function(name)
        out: bytes = self._run(
            lambda: self._invoke(f, extism_style, params, results, name, data), name
        )
        return out

    def _invoke(
        self,
        f: Any,
        extism_style: bool,
        params: list[ValType],
        results: list[ValType],
        name: str,
        data: Any,
    ) -> bytes:
        if extism_style:
            raw = bytes(data) if not isinstance(data, str) else data.encode()
            n = len(raw)
            off = self.k_prepare(n)
            if n:
                ctypes.memmove(self._kbase() + off, raw, n)
            rc = f()
            self.k_finish()
            base = self._kbase()
            out_off, out_len, err, err_len = _OUTCOME.unpack(ctypes.string_at(base, 32))
            if err and err_len:
                raise PluginError(
                    "error",
                    ctypes.string_at(base + err, err_len).decode("utf-8", "replace"),
                    plugin=self.plugin,
                    function=name,
                )
            if rc:
                raise PluginError(
                    "error", f"returned non-zero exit code: {rc}", plugin=self.plugin, function=name
                )
            return ctypes.string_at(base + out_off, out_len) if out_len else b""
        args = _numeric_args(data, params, self.plugin, name)
        r = f(*args) if isinstance(f, _Fast) else f(self.store, *args)
        if not results:
            return b""
        if len(results) == 1 and str(results[0]) in ("i32", "i64"):
            return str(r).encode()
        return json.dumps(r, separators=(",", ":")).encode()

    def _kbase(self) -> int:
        """The kernel memory's address now (it may move when it grows)."""
        return ctypes.addressof(self.kmem.data_ptr(self.store).contents)

    def interrupt(self) -> None:
        """Cut the call in flight short (any thread): it traps at its next epoch check."""
        self.engine.increment_epoch()

    def _run(self, fn: Callable[[], Any], name: str) -> Any:
        store = self.store
        store.set_epoch_deadline(1)  # trap at the next epoch: the watchdog's, at the deadline
        if self.fuel is not None:
            store.set_fuel(self.fuel)
        self._fault = None
        key = id(self)
        _engine.watchdog.arm(key, self.engine, self.timeout)
        try:
            return fn()
        except (wasmtime.Trap, wasmtime.WasmtimeError, _HostFault) as e:
            raise self._classify(e, name) from None
        finally:
            _engine.watchdog.disarm(key)
            if self.fuel is not None:
                try:
                    self.fuel_used = self.fuel - store.get_fuel()
                except wasmtime.WasmtimeError:
                    self.fuel_used = self.fuel
            self._measure()

    def _classify(self, e: BaseException, name: str) -> PluginError:
        if self._fault is not None:
            fault, self._fault = self._fault, None
            fault.function = name
            return fault
        if isinstance(e, _HostFault):  # another instance's fault seen by this thread
            return PluginError("trap", "host function failed", plugin=self.plugin, function=name)
        code = e.trap_code if isinstance(e, wasmtime.Trap) else None
        msg = _first_line(e)
        if code == wasmtime.TrapCode.INTERRUPT:
            return PluginError(
                "timeout",
                f"deadline of {self.timeout}s exceeded",
                plugin=self.plugin,
                function=name,
            )
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return PluginError(
                "fuel", f"fuel of {self.fuel} used up", plugin=self.plugin, function=name
            )
        if self._out_of_memory():
            return PluginError(
                "oom",
                f"memory cap of {self.memory_cap} bytes reached ({msg})",
                plugin=self.plugin,
                function=name,
            )
        return PluginError("trap", msg, plugin=self.plugin, function=name)

    def _out_of_memory(self) -> bool:
        """Did the store refuse to grow a memory? The kernel flags its own refusals; for
        the module's memory, a trap with under 1/16 of the cap (at least 1 MiB) left
        counts as one (wasmtime-py does not report a refused ``memory.grow``)."""
        try:
            if self.kernel is not None and self.k_oom(self.store):
                return True
        except Exception:
            pass
        used = self._measure()
        return self.memory_cap - used < max(self.memory_cap // 16, 1 << 20)

    def _measure(self) -> int:
        store = self.store
        used = self.memory.data_len(store) if self.memory is not None else 0
        if self.kernel is not None:
            used += self.kmem.data_len(store)
        if used > self.memory_high:
            self.memory_high = used
        return used

    # -- the Extism host functions -------------------------------------------------
    def _read(self, store: Any, handle: int) -> bytes:
        n = self.k_length(store, handle)
        return bytes(self.kmem.read(store, handle, handle + n)) if n else b""

    def _new(self, store: Any, value: bytes) -> int:
        off: int = self.k_alloc(store, len(value))
        if value:
            self.kmem.write(store, value, off)
        return off

    def _trap(self, kind: str, message: str) -> _HostFault:
        self._fault = PluginError(kind, message, plugin=self.plugin)
        return _HostFault(self, self._fault)

    def _host_func(self, name: str) -> Callable[..., Any]:
        if name == "config_get":

            def config_get(caller: Any, key: int) -> int:
                v = self.config.get(self._read(caller, key).decode("utf-8", "replace"))
                return 0 if v is None else self._new(caller, v.encode())

            return config_get
        if name == "var_get":

            def var_get(caller: Any, key: int) -> int:
                v = self.vars.get(self._read(caller, key).decode("utf-8", "replace"))
                return 0 if v is None else self._new(caller, v)

            return var_get
        if name == "var_set":

            def var_set(caller: Any, key: int, value: int) -> None:
                k = self._read(caller, key).decode("utf-8", "replace")
                if value == 0:
                    self.vars.pop(k, None)
                    return
                v = self._read(caller, value)
                size = (
                    len(k) + len(v) + sum(len(a) + len(b) for a, b in self.vars.items() if a != k)
                )
                if size > MAX_VAR_BYTES:
                    raise self._trap("error", f"variable store is full ({MAX_VAR_BYTES} bytes)")
                self.vars[k] = v

            return var_set
        if name == "http_request":

            def http_request(caller: Any, req: int, body: int) -> int:
                return self._http(caller, req, body)

            return http_request
        if name == "http_status_code":
            return lambda caller: self._http_status
        if name == "http_headers":
            return lambda caller: 0
        if name == "get_log_level":

            def get_log_level(caller: Any) -> int:
                level = _log.getEffectiveLevel()
                return (
                    0
                    if level <= 5
                    else 1
                    if level <= 10
                    else 2
                    if level <= 20
                    else 3
                    if level <= 30
                    else 4
                )

            return get_log_level
        level = _LEVELS[name]

        def log(caller: Any, handle: int) -> None:
            if _log.isEnabledFor(level):
                text = self._read(caller, handle).decode("utf-8", "replace")
                _log.log(level, "%s", text, extra={"plugin": self.plugin})

        return log

    def _http(self, caller: Any, req: int, body: int) -> int:
        try:
            spec = json.loads(self._read(caller, req))
            url = str(spec["url"])
        except (ValueError, KeyError, TypeError):
            raise self._trap("error", "http_request: malformed request") from None
        host = urlsplit(url).hostname or ""
        if host not in self.grants.allowed_hosts and "*" not in self.grants.allowed_hosts:
            raise self._trap("trap", f"http_request to {host!r} is not granted (allowed_hosts)")
        import urllib.error
        import urllib.request

        data = self._read(caller, body) if body else None
        request = urllib.request.Request(
            url,
            data=data,
            method=str(spec.get("method", "GET")).upper(),
            headers={str(k): str(v) for k, v in (spec.get("headers") or {}).items()},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                self._http_status = resp.status
                payload = resp.read(self.memory_cap)
        except urllib.error.HTTPError as e:
            self._http_status = e.code
            payload = e.read(self.memory_cap)
        except OSError as e:
            raise self._trap("error", f"http_request to {host!r} failed: {e}") from None
        return self._new(caller, payload)


_SELF = "trellis:plugin"
_imports_of: dict[bytes, frozenset[tuple[str, str]]] = {}


def _imports(compiled: bytes, module: wasmtime.Module) -> frozenset[tuple[str, str]]:
    """A module's imports, read once per compiled module."""
    found = _imports_of.get(compiled)
    if found is None:
        found = _imports_of[compiled] = frozenset((i.module, i.name or "") for i in module.imports)
    return found


class _Exports:
    """An instance's exports by name, looked up when asked for (through the linker)."""

    def __init__(self, linker: wasmtime.Linker, store: wasmtime.Store) -> None:
        self._linker = linker
        self._store = store

    def __getitem__(self, name: str) -> Any:
        try:
            return self._linker.get(self._store, _SELF, name)
        except wasmtime.WasmtimeError:
            raise KeyError(name) from None

    def get(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            return None


def _get(exports: Any, name: str) -> Any:
    try:
        return exports[name]
    except (KeyError, IndexError):
        return None


def _first_line(e: BaseException) -> str:
    """The gist of a wasmtime error: the cause wasmtime gives after its backtrace
    ("wasm trap: wasm `unreachable` instruction executed"), else the first line."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    lines = [line.strip() for line in text.splitlines()]
    if "Caused by:" in lines:
        rest = [line for line in lines[lines.index("Caused by:") + 1 :] if line]
        if rest:
            return rest[0]
    return lines[0]


def _numeric_args(data: Any, params: list[ValType], plugin: str, name: str) -> list[Any]:
    """Arguments of a plain export: a sequence of numbers, or JSON array bytes."""
    if isinstance(data, bytes | bytearray | memoryview | str):
        text = bytes(data).decode() if not isinstance(data, str) else data
        try:
            values = json.loads(text) if text.strip() else []
        except ValueError:
            raise PluginError(
                "error",
                "arguments of a plain export are a JSON array of numbers",
                plugin=plugin,
                function=name,
            ) from None
    else:
        values = data
    if not isinstance(values, list | tuple):
        values = [values]
    if len(values) != len(params) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise PluginError(
            "error",
            f"{name} takes {len(params)} number(s), got {values!r}",
            plugin=plugin,
            function=name,
        )
    out: list[Any] = []
    for v, t in zip(values, params, strict=True):
        if t in (ValType.f32(), ValType.f64()):
            out.append(float(v))
        elif isinstance(v, float):
            raise PluginError("error", f"{name} takes integers", plugin=plugin, function=name)
        else:
            out.append(v)
    return out

"""Registry: a local key-value process registry with unique or duplicate keys.

Example::

    reg = await trellis.Registry.start_link(keys="unique", name="sessions")
    pid = await Session.start_link(name=trellis.Via("sessions", "alice"))
    await trellis.call(trellis.Via("sessions", "alice"), "ping")
    reg.lookup("alice")   # [(pid, None)]

Entries belong to the process that registered them and vanish when it exits.
Reads and writes are plain function calls (like Elixir's ETS-backed registry);
the registry process only cleans up after owners that die.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from ._core._exceptions import AlreadyRegistered, NoProc, NotFound
from ._core._process import Pid, _current, _link_pair, resolve
from ._core._reasons import Exit
from ._server import Server, _start

__all__ = ["Registry", "RegistryPid"]


class Keys(enum.StrEnum):
    UNIQUE = "unique"
    DUPLICATE = "duplicate"


class RegistryPid(Pid):
    """The pid of a registry, with its (synchronous) API."""

    __slots__ = ("_entries", "_linked", "_owned", "_unique")

    def __init__(self) -> None:
        super().__init__()
        self._unique = True
        self._entries: dict[Any, list[tuple[Pid, Any]]] = {}
        self._owned: dict[Pid, list[Any]] = {}
        self._linked: set[Pid] = set()  # owners we linked ourselves (only these we unlink)

    def register(self, key: Any, value: Any = None) -> Pid:
        """Register the calling process under ``key``; returns the registry's pid, the
        owner of the table (Elixir's ``{:ok, owner}``).

        Unique keys raise ``AlreadyRegistered(pid)`` if a live process holds the key.
        """
        me = _current.get()
        if me is None:
            from ._core._exceptions import NotAProcess

            raise NotAProcess("Registry.register must be called from a Trellis process")
        self._put(key, me, value)
        return self

    def _put(self, key: Any, owner: Pid, value: Any) -> None:
        if self._dead:
            raise NoProc(self)
        entries = self._entries.get(key)
        if self._unique and entries:
            holder = entries[0][0]
            if not holder._dead:
                raise AlreadyRegistered(holder, key)
            self._drop(holder, key)
            entries = self._entries.get(key)
        if entries is None:
            entries = self._entries[key] = []
        entries.append((owner, value))
        self._owned.setdefault(owner, []).append(key)
        if self._links is None or owner not in self._links:
            _link_pair(self, owner)
            self._linked.add(owner)

    def unregister(self, key: Any) -> None:
        """Remove the calling process's entries for ``key``."""
        me = _current.get()
        if me is not None:
            self._drop(me, key)

    def _drop(self, owner: Pid, key: Any) -> None:
        entries = self._entries.get(key)
        if entries:
            entries[:] = [e for e in entries if e[0] is not owner]
            if not entries:
                del self._entries[key]
        keys = self._owned.get(owner)
        if keys is not None:
            keys[:] = [k for k in keys if k != key]
            if not keys:
                del self._owned[owner]
                if owner in self._linked:
                    self._linked.discard(owner)
                    if self._links is not None:
                        self._links.discard(owner)
                    if owner._links is not None:
                        owner._links.discard(self)

    def _owner_died(self, owner: Pid) -> None:
        self._linked.discard(owner)
        for key in self._owned.pop(owner, []):
            entries = self._entries.get(key)
            if entries:
                entries[:] = [e for e in entries if e[0] is not owner]
                if not entries:
                    del self._entries[key]

    def lookup(self, key: Any) -> list[tuple[Pid, Any]]:
        """``[(pid, value)]`` of the live processes registered under ``key``."""
        return [e for e in self._entries.get(key, ()) if not e[0]._dead]

    def dispatch(self, key: Any, fn: Callable[[list[tuple[Pid, Any]]], object]) -> None:
        """Call ``fn(entries)`` with the entries under ``key`` (not called if there are none)."""
        entries = self.lookup(key)
        if entries:
            fn(entries)

    def keys(self, pid: Pid) -> list[Any]:
        """The keys ``pid`` is registered under."""
        return list(self._owned.get(pid, ())) if not pid._dead else []

    def count(self) -> int:
        """The number of live entries."""
        return sum(1 for es in self._entries.values() for e in es if not e[0]._dead)

    def _via_whereis(self, key: Any) -> Pid | None:
        entries = self.lookup(key)
        return entries[0][0] if entries else None

    def _via_register(self, key: Any, pid: Pid) -> None:
        if not self._unique:
            raise TypeError("Via names need a registry with unique keys")
        self._put(key, pid, None)


class _RegistryServer(Server):
    trap_exits = True
    _pid_class = RegistryPid

    async def init(self, keys: Any) -> None:
        pid = self.pid
        assert isinstance(pid, RegistryPid)
        pid._unique = Keys(keys) is Keys.UNIQUE

    async def handle_info(self, msg: Any) -> Any:
        if type(msg) is Exit and msg.pid is not None:
            pid = self.pid
            assert isinstance(pid, RegistryPid)
            pid._owner_died(msg.pid)
        return None


def _reg(registry: object) -> RegistryPid:
    pid = resolve(registry)
    if not isinstance(pid, RegistryPid):
        raise NoProc(registry) if pid is None else NotFound(f"{registry!r} is not a registry")
    return pid


class Registry:
    """Start a registry with ``Registry.start_link(keys="unique" | "duplicate", name=...)``;
    the functions below also take the registry's name or pid first, as in Elixir."""

    @staticmethod
    async def start_link(keys: str = "unique", *, name: object = None) -> Any:
        """Start a registry linked to the caller; returns a ``RegistryPid``."""
        Keys(keys)
        return await _start(_RegistryServer, (keys,), {}, name, link=True)

    @staticmethod
    def child_spec(keys: str = "unique", *, name: object = None, id: Any = None) -> Any:
        from ._childspec import ChildSpec

        return ChildSpec(
            id="Registry" if id is None else id,
            start=Registry.start_link,
            args=(keys,),
            kwargs={"name": name},
            type="worker",
        )

    @staticmethod
    def register(registry: object, key: Any, value: Any = None) -> Pid:
        return _reg(registry).register(key, value)

    @staticmethod
    def unregister(registry: object, key: Any) -> None:
        _reg(registry).unregister(key)

    @staticmethod
    def lookup(registry: object, key: Any) -> list[tuple[Pid, Any]]:
        return _reg(registry).lookup(key)

    @staticmethod
    def dispatch(registry: object, key: Any, fn: Callable[[list[tuple[Pid, Any]]], object]) -> None:
        _reg(registry).dispatch(key, fn)

    @staticmethod
    def keys(registry: object, pid: Pid) -> list[Any]:
        return _reg(registry).keys(pid)

    @staticmethod
    def count(registry: object) -> int:
        return _reg(registry).count()

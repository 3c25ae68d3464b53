"""``PluginError``: why a plugin call failed, and (for the fatal kinds) why the plugin
child exited."""

from __future__ import annotations

from typing import Any

from .._core._exceptions import TrellisError

__all__ = ["FATAL_KINDS", "KINDS", "PluginError", "PluginRejected"]

#: Every kind a plugin call can fail with (a closed set: safe as a metric label).
KINDS = ("oom", "timeout", "fuel", "trap", "error", "unavailable")
#: The kinds after which the instance is in an unknown state: the plugin child exits.
FATAL_KINDS = frozenset({"oom", "timeout", "fuel", "trap"})


class PluginError(TrellisError):
    """A plugin call failed; ``kind`` says how.

    - ``"oom"``: the plugin hit its memory cap (the child exits, class ``oom``);
    - ``"timeout"``: the call ran past the plugin's deadline (class ``timeout``);
    - ``"fuel"``: the call used up its fuel (class ``timeout``);
    - ``"trap"``: the module trapped (``unreachable``, out-of-bounds access, a denied
      host capability; class ``crash``);
    - ``"error"``: the plugin reported an error itself (Extism ``error_set`` or a
      non-zero return code) or the call was malformed; the plugin stays up;
    - ``"unavailable"``: (``PluginHost``) the plugin is quarantined or restarting.

    As an exit reason it is abnormal, and ``exit_class`` is what ``classify`` reports.

    Example::

        try:
            out = await trellis.plugin_call("validator", "validate", record)
        except trellis.PluginError as e:
            print(e.kind, e.message)
    """

    #: the exit class of a plugin child that ended with this reason (see ``classify``)
    exit_class = "crash"

    def __new__(
        cls, kind: str = "error", message: str = "", *, plugin: Any = None,
        function: str | None = None,
    ) -> PluginError:  # fmt: skip
        # One subclass per kind, so the class of a reason follows from its type alone
        # (observers cache classify() by type).
        sub = _BY_KIND.get(kind, cls) if cls is PluginError else cls
        return super().__new__(sub)

    def __init__(
        self, kind: str, message: str = "", *, plugin: Any = None, function: str | None = None
    ) -> None:
        super().__init__(kind, message, plugin, function)
        self.kind = kind
        self.message = message
        self.plugin = plugin
        self.function = function

    @property
    def fatal(self) -> bool:
        """True when the plugin child exits because of it."""
        return self.kind in FATAL_KINDS

    def __str__(self) -> str:
        where = ""
        if self.plugin is not None:
            where = f" in plugin {self.plugin!r}" + (f" ({self.function})" if self.function else "")
        return f"plugin {self.kind}{where}" + (f": {self.message}" if self.message else "")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.args == self.args

    def __hash__(self) -> int:
        return hash((type(self), self.args))


class PluginOutOfMemory(PluginError):
    """``PluginError`` of kind ``oom``."""

    exit_class = "oom"


class PluginTimeout(PluginError):
    """``PluginError`` of kind ``timeout``."""

    exit_class = "timeout"


class PluginOutOfFuel(PluginError):
    """``PluginError`` of kind ``fuel``."""

    exit_class = "timeout"


class PluginTrap(PluginError):
    """``PluginError`` of kind ``trap``."""


_BY_KIND: dict[str, type[PluginError]] = {
    "oom": PluginOutOfMemory,
    "timeout": PluginTimeout,
    "fuel": PluginOutOfFuel,
    "trap": PluginTrap,
}


class PluginRejected(TrellisError, PermissionError):
    """``PluginHost`` refused a module: its sha256 is not on the host's allow-list."""

    def __init__(self, sha256: str, source: str) -> None:
        super().__init__(f"module {source} (sha256 {sha256}) is not on the allow-list")
        self.sha256 = sha256
        self.source = source

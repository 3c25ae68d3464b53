"""Every error Trellis raises, one class per OTP error term.

::

    TrellisError
    ├── NotAProcess            called outside a Trellis process
    ├── NoProc                 target is dead or not registered
    ├── CallingSelf            a process called or stopped itself
    ├── CallTimeout            no reply in time (the server keeps running)
    ├── Exited                 the server died during the call (.reason)
    ├── ReceiveTimeout         receive() timed out
    ├── MailboxFull            a bounded mailbox with policy "reject" is full
    ├── StartError             a start failed (.reason)
    │   ├── FailedToStartChild a supervisor's init could not start a child (.id, .reason)
    │   ├── AlreadyStarted     the name or child id is taken by a live process (.pid)
    │   └── BadReturnValue     a callback returned something it may not (.value)
    ├── AlreadyPresent, NotFound, Running, Restarting, SimpleOneForOne, MaxChildren
    ├── AlreadyRegistered      the key or name is held by a live process (.pid)
    ├── ChildSpecError         (also ValueError) a bad child spec (.field, .value)
    └── SupervisorFlagsError   (also ValueError) bad supervisor flags (.field, .value)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AlreadyPresent",
    "AlreadyRegistered",
    "AlreadyStarted",
    "BadCombination",
    "BadFlagCombination",
    "BadReturnValue",
    "BadStartSpec",
    "CallTimeout",
    "CallingSelf",
    "ChildSpecError",
    "DuplicateChildName",
    "Exited",
    "FailedToStartChild",
    "InvalidAutoShutdown",
    "InvalidChildSpec",
    "InvalidChildType",
    "InvalidExtraArguments",
    "InvalidFlags",
    "InvalidIntensity",
    "InvalidMaxChildren",
    "InvalidModule",
    "InvalidModules",
    "InvalidPeriod",
    "InvalidRestartType",
    "InvalidShutdown",
    "InvalidSignificant",
    "InvalidStart",
    "InvalidStrategy",
    "MailboxFull",
    "MaxChildren",
    "MissingId",
    "MissingStart",
    "NoProc",
    "NotAProcess",
    "NotFound",
    "ReceiveTimeout",
    "Restarting",
    "Running",
    "SimpleOneForOne",
    "StartError",
    "SupervisorFlagsError",
    "TrellisError",
]


class TrellisError(Exception):
    """Base class of every error Trellis raises."""


class NotAProcess(TrellisError, RuntimeError):
    """The operation needs a Trellis process, but the caller is a plain task."""


class NoProc(TrellisError):
    """The target process is dead or the name is not registered."""

    def __init__(self, target: Any = None) -> None:
        super().__init__(f"no process: {target!r}")
        self.target = target


class CallingSelf(TrellisError):
    """A process tried to call or stop itself, which would deadlock."""


class CallTimeout(TrellisError, TimeoutError):
    """No reply within the timeout; the server keeps running and a late reply is dropped."""

    def __init__(self, target: Any = None, request: Any = None, timeout: float | None = None):
        super().__init__(f"call to {target!r} timed out after {timeout}s (request {request!r})")
        self.target = target
        self.request = request
        self.timeout = timeout


class Exited(TrellisError):
    """The server (or task) ended before replying; ``reason`` is its exit reason."""

    def __init__(self, reason: Any, target: Any = None) -> None:
        super().__init__(f"{target!r} exited: {reason!r}" if target is not None else repr(reason))
        self.reason = reason
        self.target = target


class ReceiveTimeout(TrellisError, TimeoutError):
    """``receive(timeout=...)`` found no matching message in time."""


class MailboxFull(TrellisError):
    """A bounded mailbox with policy ``reject`` refused a message."""

    def __init__(self, pid: Any = None) -> None:
        super().__init__(f"mailbox of {pid!r} is full")
        self.pid = pid


class StartError(TrellisError):
    """A start function, ``init`` or ``start_child`` failed; ``reason`` says why."""

    def __init__(self, reason: Any, message: str | None = None) -> None:
        super().__init__(message or f"start failed: {reason!r}")
        self.reason = reason


class FailedToStartChild(StartError):
    """A supervisor could not start child ``id`` during its init (OTP ``failed_to_start_child``)."""

    def __init__(self, id: Any, reason: Any) -> None:
        super().__init__(reason, f"failed to start child {id!r}: {reason!r}")
        self.id = id


class AlreadyStarted(StartError):
    """The name or child id is held by the live process ``pid``."""

    def __init__(self, pid: Any) -> None:
        super().__init__(("already_started", pid), f"already started: {pid!r}")
        self.pid = pid


class BadReturnValue(StartError):
    """A callback returned ``value``, which is not one of its legal returns."""

    def __init__(self, value: Any, where: str = "") -> None:
        super().__init__(("bad_return_value", value), f"bad return value{where}: {value!r}")
        self.value = value


class AlreadyPresent(TrellisError):
    """A child spec with this id exists but is not running."""


class NotFound(TrellisError):
    """No child (or key) with this id or pid."""


class Running(TrellisError):
    """The child is running, so it cannot be restarted or deleted."""


class Restarting(TrellisError):
    """The child's restart is pending, so it cannot be restarted or deleted."""


class SimpleOneForOne(TrellisError):
    """The operation does not apply to a ``simple_one_for_one`` supervisor."""


class MaxChildren(TrellisError):
    """The supervisor already has ``max_children`` children."""


class AlreadyRegistered(TrellisError):
    """The name or unique key is held by the live process ``pid``."""

    def __init__(self, pid: Any, key: Any = None) -> None:
        super().__init__(f"{key!r} is already registered to {pid!r}")
        self.pid = pid
        self.key = key


class _FieldError(TrellisError, ValueError):
    field: str = ""

    def __init__(self, value: Any = None, detail: str = "", *, field: str | None = None) -> None:
        if field is not None:
            self.field = field
        self.value = value
        msg = f"invalid {self.field}: {value!r}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class ChildSpecError(_FieldError):
    """A child spec field is missing or invalid; ``field`` and ``value`` say which."""


class MissingId(ChildSpecError):
    field = "id"

    def __init__(self, value: Any = None) -> None:
        super().__init__(value, "a child spec needs an id")


class MissingStart(ChildSpecError):
    field = "start"

    def __init__(self, value: Any = None) -> None:
        super().__init__(value, "a child spec needs a start function")


class InvalidStart(ChildSpecError):
    field = "start"


class InvalidRestartType(ChildSpecError):
    field = "restart"


class InvalidSignificant(ChildSpecError):
    field = "significant"


class InvalidChildType(ChildSpecError):
    field = "type"


class InvalidShutdown(ChildSpecError):
    field = "shutdown"


class InvalidModules(ChildSpecError):
    field = "modules"


class InvalidModule(ChildSpecError):
    field = "modules"


class InvalidChildSpec(ChildSpecError):
    field = "child spec"


class DuplicateChildName(ChildSpecError):
    field = "id"

    def __init__(self, value: Any = None) -> None:
        super().__init__(value, "duplicate child id")


class BadCombination(ChildSpecError):
    """E.g. ``significant=True`` with ``restart="permanent"`` or ``auto_shutdown="never"``."""

    field = "significant"


class SupervisorFlagsError(_FieldError):
    """A supervisor flag is invalid; ``field`` and ``value`` say which."""


class InvalidStrategy(SupervisorFlagsError):
    field = "strategy"


class InvalidIntensity(SupervisorFlagsError):
    field = "intensity"


class InvalidPeriod(SupervisorFlagsError):
    field = "period"


class InvalidAutoShutdown(SupervisorFlagsError):
    field = "auto_shutdown"


class InvalidFlags(SupervisorFlagsError):
    field = "flags"


class InvalidMaxChildren(SupervisorFlagsError):
    field = "max_children"


class InvalidExtraArguments(SupervisorFlagsError):
    field = "extra_args"


class BadStartSpec(SupervisorFlagsError):
    field = "children"


class BadFlagCombination(SupervisorFlagsError):
    field = "auto_shutdown"

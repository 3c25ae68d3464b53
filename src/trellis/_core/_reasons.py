"""Exit reasons, system messages and the sentinels the behaviours return."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeAlias

if TYPE_CHECKING:
    from ._process import Pid, Ref

__all__ = [
    "IGNORE",
    "KILL",
    "KILLED",
    "NOPROC",
    "NORMAL",
    "RESTARTING",
    "SHUTDOWN",
    "Down",
    "Exit",
    "ExitReason",
    "Ignore",
    "Reason",
    "Restarting",
    "Shutdown",
    "is_clean",
]


class ExitReason(enum.Enum):
    """The atom-like exit reasons of OTP.

    ``NORMAL``, ``SHUTDOWN`` and ``Shutdown(detail)`` are *clean*; everything
    else (``KILLED``, ``NOPROC``, an exception) is abnormal. ``KILL`` is only a
    signal: a process killed with it ends with ``KILLED``.
    """

    NORMAL = "normal"
    SHUTDOWN = "shutdown"
    KILLED = "killed"
    KILL = "kill"
    NOPROC = "noproc"

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


NORMAL: Final = ExitReason.NORMAL
SHUTDOWN: Final = ExitReason.SHUTDOWN
KILLED: Final = ExitReason.KILLED
KILL: Final = ExitReason.KILL
NOPROC: Final = ExitReason.NOPROC


@dataclass(frozen=True, slots=True)
class Shutdown:
    """A clean shutdown that carries a detail, OTP's ``{shutdown, Detail}``."""

    detail: Any = None


Reason: TypeAlias = "ExitReason | Shutdown | BaseException | Any"


def coerce_reason(reason: object) -> object:
    """Accept the string form of an atom reason (``"kill"`` -> ``KILL``)."""
    if isinstance(reason, str):
        try:
            return ExitReason(reason)
        except ValueError:
            return reason
    return reason


def is_clean(reason: object) -> bool:
    """True for ``NORMAL``, ``SHUTDOWN`` and ``Shutdown(_)``: exits a transient child keeps."""
    return reason is NORMAL or reason is SHUTDOWN or type(reason) is Shutdown


class Exit(NamedTuple):
    """Message a trapping process receives for an exit signal from ``pid``."""

    pid: Pid | None
    reason: Any


class Down(NamedTuple):
    """Message a monitoring process receives once the monitored ``pid`` ends."""

    ref: Ref
    pid: Pid
    reason: Any


class Ignore(enum.Enum):
    """Type of :data:`IGNORE`, returned by an ``init`` or start that declines to start."""

    IGNORE = "ignore"

    def __repr__(self) -> str:
        return "IGNORE"


class Restarting(enum.Enum):
    """Type of :data:`RESTARTING`, the pid of a child whose restart is pending."""

    RESTARTING = "restarting"

    def __repr__(self) -> str:
        return "RESTARTING"


IGNORE: Final = Ignore.IGNORE
RESTARTING: Final = Restarting.RESTARTING

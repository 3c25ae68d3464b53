"""Children that are not coroutines: OS processes (``Command``)."""

from ._command import Command, CommandPid
from ._guardian import guardian_status
from ._output import recent_output
from ._types import (
    ExitCode,
    Health,
    Hung,
    LimitExceeded,
    Limits,
    Logs,
    ProcessExitReason,
    Ready,
    ReadyTimeout,
    Signaled,
)

__all__ = [
    "Command",
    "CommandPid",
    "ExitCode",
    "Health",
    "Hung",
    "LimitExceeded",
    "Limits",
    "Logs",
    "ProcessExitReason",
    "Ready",
    "ReadyTimeout",
    "Signaled",
    "guardian_status",
    "recent_output",
]

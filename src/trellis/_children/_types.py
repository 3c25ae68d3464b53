"""Configuration and exit reasons of OS-process children."""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._core._exceptions import InvalidChildSpec, TrellisError

__all__ = [
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
    "signal_number",
]


# ---------------------------------------------------------------------------
# Exit reasons (all abnormal: a supervisor restarts a transient child for them)
# ---------------------------------------------------------------------------


class ProcessExitReason(TrellisError):
    """Why an OS-process child ended abnormally; ``kind`` classifies it for metrics."""

    kind = "crash"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.args == self.args

    def __hash__(self) -> int:
        return hash((type(self), self.args))


class ExitCode(ProcessExitReason):
    """The process exited with a non-zero ``code``."""

    kind = "crash"

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code

    def __str__(self) -> str:
        return f"exit code {self.code}"


class Signaled(ProcessExitReason):
    """The process was killed by a signal (``signal`` is its name, e.g. ``"SIGKILL"``)."""

    kind = "killed"

    def __init__(self, signal: str) -> None:
        super().__init__(signal)
        self.signal = signal

    def __str__(self) -> str:
        return f"killed by {self.signal}"


class Hung(ProcessExitReason):
    """The process stopped heartbeating or failed its health check and was killed."""

    kind = "hung"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return f"hung: {self.detail}"


class LimitExceeded(ProcessExitReason):
    """The process hit a resource limit (``"cpu"``, ``"memory"``, ``"open_files"``, ...)."""

    kind = "limit"

    def __init__(self, limit: str, detail: str = "") -> None:
        super().__init__(limit, detail)
        self.limit = limit
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.limit} limit exceeded" + (f" ({self.detail})" if self.detail else "")


class ReadyTimeout(ProcessExitReason):
    """The process did not become ready within its readiness timeout."""

    kind = "timeout"

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(what, timeout)
        self.what = what
        self.timeout = timeout

    def __str__(self) -> str:
        return f"not ready ({self.what}) within {self.timeout}s"


def signal_number(sig: int | str | signal.Signals) -> int:
    """``"SIGTERM"``, ``"TERM"``, ``15`` or ``signal.SIGTERM`` -> 15."""
    if isinstance(sig, signal.Signals):
        return int(sig)
    if isinstance(sig, int) and not isinstance(sig, bool):
        return int(signal.Signals(sig))
    if isinstance(sig, str):
        name = sig.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            pass
    raise InvalidChildSpec(sig, "not a signal name or number", field="stop_signal")


# ---------------------------------------------------------------------------
# Readiness, health, limits, logs
# ---------------------------------------------------------------------------


def _positive(value: Any, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise InvalidChildSpec(value, "must be a number > 0", field=name)
    return float(value)


@dataclass(frozen=True, slots=True)
class Ready:
    """When an OS-process child counts as started (so the next sibling may start).

    Example::

        trellis.Command(["redis-server", "--port", "6380"], ready=trellis.Ready.tcp(6380))
    """

    kind: str = "started"
    target: Any = None
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.kind not in ("started", "notify", "tcp", "http", "log"):
            raise InvalidChildSpec(self.kind, "unknown readiness kind", field="ready")
        _positive(self.timeout, "ready.timeout")
        if self.kind == "log":
            try:
                re.compile(self.target)
            except (re.error, TypeError) as e:
                raise InvalidChildSpec(self.target, f"bad regex: {e}", field="ready.log") from None

    @classmethod
    def started(cls) -> Ready:
        """Ready as soon as the process is spawned (the default)."""
        return cls("started")

    @classmethod
    def notify(cls, timeout: float = 30.0) -> Ready:
        """Ready when it sends ``READY=1`` over ``NOTIFY_SOCKET`` (systemd ``Type=notify``)."""
        return cls("notify", None, timeout)

    @classmethod
    def tcp(cls, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> Ready:
        """Ready when ``host:port`` accepts a TCP connection."""
        if not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidChildSpec(port, "must be a TCP port", field="ready.tcp")
        return cls("tcp", (host, port), timeout)

    @classmethod
    def http(cls, url: str, timeout: float = 30.0) -> Ready:
        """Ready when ``GET url`` answers with a 2xx status."""
        if not isinstance(url, str) or not url.startswith("http://"):
            raise InvalidChildSpec(url, "must be an http:// URL", field="ready.http")
        return cls("http", url, timeout)

    @classmethod
    def log(cls, pattern: str, timeout: float = 30.0) -> Ready:
        """Ready when a stdout or stderr line matches the regex ``pattern``."""
        return cls("log", pattern, timeout)


@dataclass(frozen=True, slots=True)
class Health:
    """A periodic check; ``failures`` consecutive failures kill the child as ``Hung``.

    Example::

        health=trellis.Health.http("http://127.0.0.1:8080/health", interval=5, failures=3)
    """

    kind: str
    target: Any
    interval: float = 5.0
    timeout: float = 1.0
    failures: int = 3

    def __post_init__(self) -> None:
        if self.kind not in ("command", "tcp", "http"):
            raise InvalidChildSpec(self.kind, "unknown health check kind", field="health")
        _positive(self.interval, "health.interval")
        _positive(self.timeout, "health.timeout")
        if not isinstance(self.failures, int) or self.failures < 1:
            raise InvalidChildSpec(self.failures, "must be an int >= 1", field="health.failures")

    @classmethod
    def command(
        cls, argv: Sequence[str], interval: float = 5.0, timeout: float = 1.0, failures: int = 3
    ) -> Health:
        """Healthy while ``argv`` exits 0 within ``timeout``."""
        return cls("command", tuple(argv), interval, timeout, failures)

    @classmethod
    def tcp(
        cls,
        port: int,
        host: str = "127.0.0.1",
        interval: float = 5.0,
        timeout: float = 1.0,
        failures: int = 3,
    ) -> Health:
        """Healthy while ``host:port`` accepts connections."""
        return cls("tcp", (host, port), interval, timeout, failures)

    @classmethod
    def http(
        cls, url: str, interval: float = 5.0, timeout: float = 1.0, failures: int = 3
    ) -> Health:
        """Healthy while ``GET url`` answers 2xx."""
        return cls("http", url, interval, timeout, failures)


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits (rlimits) of the child: ``memory`` bytes of address space,
    ``open_files`` descriptors, ``cpu`` seconds."""

    memory: int | None = None
    open_files: int | None = None
    cpu: int | None = None

    def __post_init__(self) -> None:
        for name in ("memory", "open_files", "cpu"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise InvalidChildSpec(v, "must be an int > 0", field=f"limits.{name}")
        if self.memory is not None and not 2**20 <= self.memory <= 2**50:
            raise InvalidChildSpec(
                self.memory, "must be from 1 MiB to 1 PiB (bytes)", field="limits.memory"
            )
        for name in ("open_files", "cpu"):
            v = getattr(self, name)
            if v is not None and v >= 2**62:
                raise InvalidChildSpec(v, "is too large for an rlimit", field=f"limits.{name}")

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.memory, self.open_files, self.cpu))


MAX_BACKUPS = 1000
"""The most rotated files :class:`Logs` keeps (each rotation renames every one)."""


def check_argv_env(argv: Sequence[str], env: Any) -> None:
    """What ``execve`` cannot take: a NUL byte in an argument, an environment name or
    value; ``=`` in a name or an empty name."""
    for arg in argv:
        if "\x00" in arg:
            raise InvalidChildSpec(arg, "an argument cannot contain a NUL byte", field="argv")
    for name, value in (env or {}).items():
        if not name or "=" in name or "\x00" in name:
            raise InvalidChildSpec(
                name, "an environment name must be non-empty, without '=' or NUL", field="env"
            )
        if "\x00" in value:
            raise InvalidChildSpec(value, "an environment value cannot contain NUL", field="env")


@dataclass(frozen=True, slots=True)
class Logs:
    """Write the child's stdout/stderr to ``<dir>/<name>.out.log`` / ``<name>.err.log``
    (``<name>``: the child's path with ``/`` as ``.``, e.g. ``shop.payments.web``),
    rotated at ``max_bytes`` keeping ``backups`` old files. ``dir`` must belong to the
    uid Trellis runs as and be writable by nobody else."""

    dir: str
    max_bytes: int = 10 * 2**20
    backups: int = 5
    telemetry: bool = field(default=True)

    def __post_init__(self) -> None:
        if not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise InvalidChildSpec(self.max_bytes, "must be an int > 0", field="logs.max_bytes")
        if not isinstance(self.backups, int) or self.backups < 0:
            raise InvalidChildSpec(self.backups, "must be an int >= 0", field="logs.backups")
        if self.backups > MAX_BACKUPS:
            raise InvalidChildSpec(
                self.backups, f"must be at most {MAX_BACKUPS}", field="logs.backups"
            )

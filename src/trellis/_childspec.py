"""Child specs, supervisor flags and restart backoff, validated in OTP's order.

Every field error raises the specific ``ChildSpecError`` / ``SupervisorFlagsError``
subclass naming the field and the value.
"""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import random

from ._core._exceptions import (
    BadCombination,
    BadFlagCombination,
    BadReturnValue,
    BadStartSpec,
    InvalidAutoShutdown,
    InvalidChildSpec,
    InvalidChildType,
    InvalidFlags,
    InvalidIntensity,
    InvalidModule,
    InvalidModules,
    InvalidPeriod,
    InvalidRestartType,
    InvalidShutdown,
    InvalidSignificant,
    InvalidStart,
    InvalidStrategy,
    MissingId,
    MissingStart,
)

__all__ = [
    "AutoShutdown",
    "Backoff",
    "ChildSpec",
    "ChildType",
    "RestartType",
    "ShutdownMode",
    "Strategy",
    "SupervisorSpec",
]


class Strategy(enum.StrEnum):
    """Which children a supervisor restarts when one fails."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"
    SIMPLE_ONE_FOR_ONE = "simple_one_for_one"


class RestartType(enum.StrEnum):
    """``permanent``: always restarted; ``transient``: only after an abnormal exit;
    ``temporary``: never (and forgotten when it exits)."""

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class ChildType(enum.StrEnum):
    WORKER = "worker"
    SUPERVISOR = "supervisor"


class AutoShutdown(enum.StrEnum):
    """Whether a supervisor stops itself when significant children exit."""

    NEVER = "never"
    ANY_SIGNIFICANT = "any_significant"
    ALL_SIGNIFICANT = "all_significant"


class ShutdownMode(enum.StrEnum):
    BRUTAL_KILL = "brutal_kill"
    INFINITY = "infinity"


Shutdown: TypeAlias = "float | ShutdownMode"


def _enum(cls: type[enum.Enum], value: object, err: type[Exception]) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except (ValueError, TypeError):
        raise err(value) from None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay between restarts of one child: restart ``n`` waits ``min * factor**(n-1)``
    (at most ``max``), scaled by a random factor in ``[1-jitter, 1+jitter]``.

    The first start is never delayed. After ``reset_after`` seconds of uptime the
    count starts again. ``seed`` makes the jitter reproducible. Restarts still
    count toward the supervisor's intensity.

    Example::

        spec = worker("poller", poll, backoff=Backoff(min=0.5, max=30.0, jitter=0.2))
    """

    min: float = 0.1
    max: float = 30.0
    factor: float = 2.0
    jitter: float = 0.0
    reset_after: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("min", "max", "factor", "jitter", "reset_after"):
            value = getattr(self, name)
            if _is_number(value) and not math.isfinite(value):
                raise InvalidChildSpec(
                    value, f"Backoff.{name} must be a finite number", field=f"backoff.{name}"
                )
        if not _is_number(self.min) or self.min < 0:
            raise InvalidChildSpec(self.min, "Backoff.min must be >= 0", field="backoff.min")
        if not _is_number(self.max) or self.max < self.min:
            raise InvalidChildSpec(self.max, "Backoff.max must be >= min", field="backoff.max")
        if not _is_number(self.factor) or self.factor < 1:
            raise InvalidChildSpec(
                self.factor, "Backoff.factor must be >= 1", field="backoff.factor"
            )
        if not _is_number(self.jitter) or not 0 <= self.jitter <= 1:
            raise InvalidChildSpec(
                self.jitter, "Backoff.jitter must be in [0, 1]", field="backoff.jitter"
            )
        if self.reset_after is not None and (
            not _is_number(self.reset_after) or self.reset_after <= 0
        ):
            raise InvalidChildSpec(self.reset_after, "must be > 0", field="backoff.reset_after")

    def delay(self, n: int, rng: random.Random | None = None) -> float:
        """The wait before restart number ``n`` (1-based); from the restart where the
        delay reaches ``max`` on, every restart waits ``max`` (however large ``n`` grows)."""
        k = n - 1
        base: float = self.min
        if k > 0 and self.factor > 1 and self.min < self.max:
            if self.min <= 0:
                base = 0.0
            elif k >= math.log(self.max / self.min) / math.log(self.factor):
                base = self.max  # the exponent is capped: factor**k would overflow a float
            else:
                base = min(self.max, self.min * self.factor**k)
        if self.jitter:
            import random  # not at import time: trellis run starts faster without it

            r = rng if rng is not None else random
            base *= 1.0 + self.jitter * (2.0 * r.random() - 1.0)
        return max(0.0, base)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_finite(x: object) -> bool:
    """A number that is neither infinite nor NaN."""
    return _is_number(x) and math.isfinite(x)  # type: ignore[arg-type]


_NO_DEFAULT: Any = object()


MAX_ID_BYTES = 200
"""The longest child id (UTF-8 bytes): it names log files (``<path>.err.log.N``), and a
file name holds at most 255 bytes."""


def segment_problem(text: str) -> str | None:
    """Why ``text`` cannot be one segment of a child's path (``root/parent/child``, which
    the control API resolves and log files are named after), or None if it can."""
    if "/" in text:
        return "contains '/'"
    if "\x00" in text:
        return "contains a NUL byte"
    if text in (".", ".."):
        return f"is {text!r}, which a path resolves to the parent or itself"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return "contains a control character (a newline, tab or escape sequence)"
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes"
    return None


def _check_id(id: object) -> None:
    """A child id is one segment of the child's path (``root/parent/child``, which the
    control API resolves) and of its log file names: see :func:`segment_problem`."""
    if isinstance(id, int):
        return
    if isinstance(id, str):
        why = segment_problem(id)
    else:
        text = str(id)
        why = "contains '/'" if "/" in text else "contains a NUL byte" if "\x00" in text else None
    if why is not None:
        raise InvalidChildSpec(
            id,
            f"a child id {why.replace('contains', 'cannot contain', 1)}: it is one segment "
            "of the child's path (root/parent/child) and of its log file names",
            field="id",
        )


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How a supervisor starts, restarts and stops one child.

    ``start(*args, **kwargs)`` (sync or async) must start the child linked to the
    calling supervisor and return its ``Pid``, ``(Pid, info)`` or ``IGNORE``.

    Fields and defaults: ``restart="permanent"``; ``shutdown`` seconds (float
    ``>= 0``), ``"brutal_kill"`` or ``"infinity"``, by default 5.0 for a worker and
    ``"infinity"`` for a supervisor; ``type="worker"``; ``significant=False``;
    ``modules`` defaults to the start function's module; ``backoff=None``.

    Example::

        ChildSpec("cache", Cache.start_link, args=(1024,), restart="transient", shutdown=2.0)
    """

    id: Any
    start: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    restart: RestartType | str = RestartType.PERMANENT
    shutdown: Any = None
    type: ChildType | str = ChildType.WORKER
    significant: bool = False
    modules: Any = None
    backoff: Backoff | None = None

    def __post_init__(self) -> None:
        # OTP's check order: id, start, restart, significant, type, shutdown, modules.
        if self.id is None:
            raise MissingId()
        _check_id(self.id)
        if self.start is None:
            raise MissingStart()
        if not callable(self.start):
            raise InvalidStart(self.start, "start must be callable")
        if isinstance(self.args, str | bytes) or not isinstance(self.args, Sequence):
            raise InvalidStart(self.args, "args must be a tuple or list", field="args")
        if not isinstance(self.kwargs, Mapping):
            raise InvalidStart(self.kwargs, "kwargs must be a mapping", field="kwargs")
        restart = _enum(RestartType, self.restart, InvalidRestartType)
        if not isinstance(self.significant, bool):
            raise InvalidSignificant(self.significant, "must be True or False")
        ctype = _enum(ChildType, self.type, InvalidChildType)
        shutdown = self._check_shutdown(self.shutdown, ctype)
        modules = self._check_modules(self.modules)
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise InvalidChildSpec(self.backoff, "must be a Backoff", field="backoff")
        if self.significant and restart is RestartType.PERMANENT:
            raise BadCombination(
                {"restart": "permanent", "significant": True},
                "a permanent child cannot be significant",
            )
        set_ = object.__setattr__
        set_(self, "args", tuple(self.args))
        set_(self, "restart", restart)
        set_(self, "type", ctype)
        set_(self, "shutdown", shutdown)
        set_(self, "modules", modules)

    @staticmethod
    def _check_shutdown(value: object, ctype: ChildType) -> Shutdown:
        if value is None:
            return ShutdownMode.INFINITY if ctype is ChildType.SUPERVISOR else 5.0
        if isinstance(value, ShutdownMode):
            return value
        if isinstance(value, str):
            try:
                return ShutdownMode(value)
            except ValueError:
                raise InvalidShutdown(value, "use seconds, 'brutal_kill' or 'infinity'") from None
        if _is_number(value) and value >= 0:  # type: ignore[operator]
            if math.isinf(value):  # type: ignore[arg-type]
                raise InvalidShutdown(value, "use 'infinity' to wait without a limit")
            return float(value)  # type: ignore[arg-type]
        raise InvalidShutdown(value, "use seconds >= 0, 'brutal_kill' or 'infinity'")

    def _check_modules(self, value: object) -> Any:
        if value is None:
            mod = getattr(self.start, "__module__", None)
            return (mod,) if mod else ()
        if value == "dynamic":
            return "dynamic"
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise InvalidModules(value, "must be 'dynamic' or a list of module names")
        for m in value:
            if not isinstance(m, str):
                raise InvalidModule(m, "module names must be str")
        return tuple(value)

    # -- coercion ------------------------------------------------------------------
    @classmethod
    def coerce(cls, value: object) -> ChildSpec:
        """Accept a ``ChildSpec``, a mapping with the same keys (unknown keys ignored),
        a ``Server``/``Supervisor`` class, or ``(class, arg)``."""
        if isinstance(value, ChildSpec):
            return value
        if isinstance(value, Mapping):
            if "id" not in value:
                raise MissingId()
            if "start" not in value:
                raise MissingStart()
            known = {k: value[k] for k in _FIELDS if k in value}
            return cls(**known)
        if inspect.isclass(value) and hasattr(value, "child_spec"):
            spec = value.child_spec()
            assert isinstance(spec, ChildSpec)
            return spec
        if (
            isinstance(value, tuple)
            and len(value) == 2
            and inspect.isclass(value[0])
            and hasattr(value[0], "child_spec")
        ):
            spec = value[0].child_spec(value[1])
            assert isinstance(spec, ChildSpec)
            return spec
        raise InvalidChildSpec(value, "expected a ChildSpec or a mapping with id and start")


_FIELDS = (
    "id",
    "start",
    "args",
    "kwargs",
    "restart",
    "shutdown",
    "type",
    "significant",
    "modules",
    "backoff",
)


@dataclass(frozen=True, slots=True)
class SupervisorSpec:
    """What a ``Supervisor.init`` returns: the children and the flags.

    Defaults: ``strategy="one_for_one"``, ``intensity=3``, ``period=5.0``,
    ``auto_shutdown="never"`` (Elixir's defaults; OTP's are intensity 1, period 5).
    """

    children: Sequence[Any] = ()
    strategy: Strategy | str = Strategy.ONE_FOR_ONE
    intensity: int = 3
    period: float = 5.0
    auto_shutdown: AutoShutdown | str = AutoShutdown.NEVER

    def __post_init__(self) -> None:
        strategy = _enum(Strategy, self.strategy, InvalidStrategy)
        check_intensity(self.intensity)
        check_period(self.period)
        auto = _enum(AutoShutdown, self.auto_shutdown, InvalidAutoShutdown)
        if isinstance(self.children, str | bytes) or not isinstance(self.children, Sequence):
            raise BadStartSpec(self.children, "children must be a list of child specs")
        if strategy is Strategy.SIMPLE_ONE_FOR_ONE:
            if len(self.children) != 1:
                raise BadStartSpec(self.children, "simple_one_for_one needs exactly one child spec")
            if auto is not AutoShutdown.NEVER:
                raise BadFlagCombination(
                    auto.value, "simple_one_for_one requires auto_shutdown='never'"
                )
        object.__setattr__(self, "strategy", strategy)
        object.__setattr__(self, "auto_shutdown", auto)
        object.__setattr__(self, "period", float(self.period))

    @classmethod
    def coerce(cls, value: object) -> SupervisorSpec:
        """Accept a ``SupervisorSpec`` or ``(flags_mapping, children)`` like OTP's init return."""
        if isinstance(value, SupervisorSpec):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            flags, children = value
            if not isinstance(flags, Mapping):
                raise InvalidFlags(flags, "flags must be a mapping")
            known = {
                k: flags[k]
                for k in ("strategy", "intensity", "period", "auto_shutdown")
                if k in flags
            }
            return cls(children, **known)
        raise BadReturnValue(value, " from Supervisor.init (expected a SupervisorSpec or IGNORE)")


def check_intensity(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidIntensity(value, "must be an int >= 0")
    return value


def check_period(value: object) -> float:
    if not _is_number(value) or value <= 0:  # type: ignore[operator]
        raise InvalidPeriod(value, "must be a number of seconds > 0")
    if not math.isfinite(value):  # type: ignore[arg-type]
        raise InvalidPeriod(value, "must be a finite number of seconds")
    return float(value)  # type: ignore[arg-type]

"""Pydantic models of one tree-file table each, with the core's own field rules.

The tree walker (``_tree.py``) validates each table separately, so every child
is checked even when a sibling is broken. Fields hold what the TOML gave after
checking; a field left out stays ``None`` so the core's defaults apply.
"""

from __future__ import annotations

import difflib
import enum
import math
import os
import re
import resource
import signal
import urllib.parse
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, NoReturn

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .._childspec import (
    AutoShutdown,
    ChildSpec,
    ChildType,
    RestartType,
    Strategy,
    _enum,
    check_intensity,
    check_period,
    segment_problem,
)
from .._core._exceptions import (
    ChildSpecError,
    InvalidAutoShutdown,
    InvalidRestartType,
    InvalidStrategy,
    SupervisorFlagsError,
)

__all__ = [
    "CHILD_KINDS",
    "SLI_KEYS",
    "SLI_KINDS",
    "BackoffModel",
    "ClusterModel",
    "CommandChild",
    "ControlModel",
    "Document",
    "HealthModel",
    "JournalModel",
    "LimitsModel",
    "LogsModel",
    "MetricsModel",
    "OneSlo",
    "ReadyModel",
    "RootSupervisor",
    "ServerChild",
    "SloArray",
    "SloModel",
    "SupervisorChild",
    "WorkerChild",
    "fail",
    "parse_duration",
    "parse_size",
    "suggest",
]


def fail(message: str) -> NoReturn:
    """Raise a validation error whose text is exactly ``message``."""
    raise PydanticCustomError("trellis", "{message}", {"message": message})


def suggest(word: str, choices: Any) -> str:
    """``" (did you mean 'x'?)"`` when ``word`` is close to one of ``choices``, else ``""``."""
    match = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


# ---------------------------------------------------------------------------
# Field checks
# ---------------------------------------------------------------------------


def _core_enum(cls: type[enum.Enum], err: type[Exception]) -> Callable[[object], str]:
    values = [str(m.value) for m in cls]

    def check(value: object) -> str:
        try:
            return str(_enum(cls, value, err).value)
        except (ChildSpecError, SupervisorFlagsError) as e:
            hint = suggest(value, values) if isinstance(value, str) else ""
            hint = f"; did you mean {hint[15:-2]}?" if hint else ""
            fail(f"{e} (expected one of {', '.join(values)}{hint})")

    return check


def _core_check(check: Callable[[object], Any]) -> Callable[[object], Any]:
    def run(value: object) -> Any:
        try:
            return check(value)
        except (ChildSpecError, SupervisorFlagsError) as e:
            fail(str(e))

    return run


def _check_shutdown(value: object) -> float | str:
    try:
        result = ChildSpec._check_shutdown(value, ChildType.WORKER)
    except ChildSpecError as e:
        fail(str(e))
    if isinstance(result, float):
        return _max_seconds(result)
    return str(result.value)


def _max_seconds(value: float) -> float:
    if value > MAX_SECONDS:
        fail(f"{value!r} seconds is more than a year ({MAX_SECONDS}): use a shorter time")
    return value


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 10**3,
    "kib": 2**10,
    "m": 2**20,
    "mb": 10**6,
    "mib": 2**20,
    "g": 2**30,
    "gb": 10**9,
    "gib": 2**30,
    "t": 2**40,
    "tb": 10**12,
    "tib": 2**40,
}


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as ``"512MiB"`` (binary) or ``"10MB"`` (decimal).

    Example::

        assert parse_size("1KiB") == 1024 and parse_size("10MB") == 10_000_000
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _UNITS:
            size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
            if size > 0:
                return size
    fail(
        f"invalid size {value!r}: use a number of bytes > 0 or a string such as '512MiB' or '10MB'"
    )


def _check_signal(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value).name
        except ValueError:
            fail(f"unknown signal number {value}")
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in signal.Signals.__members__:
            return name
        fail(f"unknown signal {value!r}{suggest(name, signal.Signals.__members__)}")
    fail(f"a signal is a name such as 'SIGTERM' or a number, got {value!r}")


def _check_port(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    fail(f"invalid port {value!r}: use 1-65535")


MAX_SECONDS = 365 * 86400
"""The longest duration a tree file takes anywhere (timeouts, periods, backoff): a year."""
MIN_MEMORY = 2**20
"""The smallest ``limits.memory`` (1 MiB): below it no program can even be executed."""
MAX_MEMORY = 2**50
"""The largest ``limits.memory`` (1 PiB), far above any machine's address space."""
MAX_BACKUPS = 1000
"""The most rotated log files ``logs.backups`` keeps (each rotation renames them all)."""


def _no_nul(value: str) -> str:
    if "\x00" in value:
        fail(f"{_short(value)} contains a NUL byte (\\u0000): no path or name can hold one")
    return value


def _short(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _check_child_id(value: object) -> str:
    if not isinstance(value, str) or not value:
        fail(f"id is a non-empty string, got {value!r}")
    _no_nul(value)
    why = segment_problem(value)
    if why is not None:
        fail(
            f"child id {_short(value)} {why}: an id is one segment of a child's path "
            "(root/parent/child) and of its log file names; use '-', '_' or '.' instead"
        )
    return value


def _check_env_var(value: object) -> str:
    """An environment variable name a process can be given: not empty, no '=' or NUL."""
    if not isinstance(value, str) or not value:
        fail(f"an environment variable name is a non-empty string, got {value!r}")
    _no_nul(value)
    if "=" in value:
        fail(f"invalid environment variable name {value!r}: a name cannot contain '='")
    return value


def _rlimit_check(res: int, what: str, extra: int = 0) -> Callable[[int], int]:
    """``value`` must fit under our hard limit ``res``: a child cannot raise it (only
    root can), so the start would fail at run time."""

    def check(value: int) -> int:
        if os.geteuid() == 0:
            return value
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY and value + extra > hard:
            fail(
                f"{what} {value} is above this process's hard limit ({hard}); "
                "only root can raise it"
            )
        return value

    return check


def _check_open_files(value: int) -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
    except (OSError, ValueError):
        nr_open = 2**20
    if value > nr_open:
        fail(f"open_files {value} is above the kernel's maximum (fs.nr_open = {nr_open})")
    return _rlimit_check(resource.RLIMIT_NOFILE, "open_files")(value)


def _check_memory(value: int) -> int:
    if not MIN_MEMORY <= value <= MAX_MEMORY:
        fail(
            f"limits.memory {value} is out of range: use 1MiB to 1PiB "
            "(it limits the child's address space)"
        )
    return _rlimit_check(resource.RLIMIT_AS, "memory")(value)


def _check_tcp(value: object) -> tuple[str, int]:
    """``9000`` -> ``("127.0.0.1", 9000)``; ``"host:9000"`` -> ``("host", 9000)``."""
    if isinstance(value, str):
        _no_nul(value)
        host, sep, port = value.rpartition(":")
        if sep and host and port.isdigit():
            return host.strip("[]"), _check_port(int(port))
        fail(f"invalid address {value!r}: use a port number or 'host:port'")
    return "127.0.0.1", _check_port(value)


def _check_url(value: object) -> str:
    if isinstance(value, str):
        _no_nul(value)
        parts = urllib.parse.urlsplit(value)
        if parts.scheme in ("http", "https") and parts.netloc:
            return value
    fail(f"invalid URL {value!r}: use http://host[:port]/path or https://...")


def _check_regex(value: object) -> str:
    if not isinstance(value, str):
        fail(f"a regular expression is a string, got {value!r}")
    try:
        re.compile(value)
    except re.error as e:
        fail(f"invalid regular expression {value!r}: {e}")
    return value


def _check_ref(value: object) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*:[A-Za-z_]\w*(\.\w+)*", value):
        return value
    fail(f"expected 'package.module:Name', got {value!r}")


def _check_argv(value: object) -> list[str] | str:
    for arg in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(arg, str) and "\x00" in arg:
            fail(f"command argument {_short(arg)} contains a NUL byte (\\u0000)")
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value) and value[0]:
        return value
    fail(f"command is a non-empty list of strings, such as ['python3', '-m', 'app'], got {value!r}")


def _check_env_value(value: object) -> str:
    if isinstance(value, str):
        if "\x00" in value:
            fail(f"environment value {_short(value)} contains a NUL byte (\\u0000)")
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    fail(f"an environment value is a string or a number, got {value!r}")


def _check_inherit_env(value: object) -> bool | list[str]:
    if isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        for name in value:
            _check_env_var(name)
        return value
    fail(f"inherit_env is true, false or a list of variable names, got {value!r}")


def _check_user(value: object) -> str | int:
    if isinstance(value, str) and value:
        return _no_nul(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    fail(f"user is a user name or a uid, got {value!r}")


Restart = Annotated[str, PlainValidator(_core_enum(RestartType, InvalidRestartType))]
StrategyName = Annotated[str, PlainValidator(_core_enum(Strategy, InvalidStrategy))]
AutoShutdownName = Annotated[str, PlainValidator(_core_enum(AutoShutdown, InvalidAutoShutdown))]
Intensity = Annotated[int, PlainValidator(_core_check(check_intensity))]
Period = Annotated[float, PlainValidator(_core_check(check_period)), AfterValidator(_max_seconds)]
Shutdown = Annotated[float | str, PlainValidator(_check_shutdown)]
Size = Annotated[int, PlainValidator(parse_size)]
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
Tcp = Annotated[tuple[str, int], PlainValidator(_check_tcp)]
Url = Annotated[str, PlainValidator(_check_url)]
Ref = Annotated[str, PlainValidator(_check_ref)]
NonEmpty = Annotated[str, Field(min_length=1), AfterValidator(_no_nul)]
ChildId = Annotated[str, PlainValidator(_check_child_id)]
EnvVarName = Annotated[str, PlainValidator(_check_env_var)]
EnvValue = Annotated[str, PlainValidator(_check_env_value)]
Bounded = Annotated[float, Field(le=MAX_SECONDS, allow_inf_nan=False)]


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class _Model(BaseModel):
    # defer_build: each model's validator is built when a file first uses it, so a tree
    # of command children does not build the plugin, isolated, SLO, ... validators
    # before its root starts (the checks themselves are the same)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)

    what: ClassVar[str] = "table"

    def given(self, *exclude: str) -> dict[str, Any]:
        """The fields the file set, minus ``exclude``."""
        given = self.model_fields_set
        return {
            k: getattr(self, k) for k in type(self).model_fields if k in given and k not in exclude
        }


class BackoffModel(_Model):
    what = "backoff"
    min: Bounded | None = None
    max: Bounded | None = None
    factor: float | None = None
    jitter: float | None = None
    reset_after: Bounded | None = None
    seed: int | None = None


def _exactly_one(model: _Model, kinds: tuple[str, ...], what: str, shorthand: str = "") -> None:
    found = [k for k in kinds if getattr(model, k) is not None]
    if len(found) != 1:
        choices = ", ".join(kinds)
        got = f"; got {', '.join(found)}" if found else ""
        fail(f"{what} needs exactly one of {choices}{shorthand}{got}")


def _ready_shorthand(value: object) -> object:
    if value == "started":
        return {"started": True}
    if isinstance(value, str):
        fail(f"unknown readiness {value!r}: use 'started' or a table such as {{ tcp = 9000 }}")
    return value


class ReadyModel(_Model):
    what = "ready"
    started: Literal[True] | None = None
    notify: Literal[True] | None = None
    tcp: Tcp | None = None
    http: Url | None = None
    log: Annotated[str, PlainValidator(_check_regex)] | None = None
    timeout: Seconds | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ReadyModel:
        if self.started and self.model_fields_set != {"started"}:
            fail("ready = 'started' takes no other keys")
        if not self.started:
            kinds = ("notify", "tcp", "http", "log")
            _exactly_one(self, kinds, "ready", " (or the string 'started')")
        return self


class HealthModel(_Model):
    what = "health"
    command: Annotated[list[str] | str, PlainValidator(_check_argv)] | None = None
    tcp: Tcp | None = None
    http: Url | None = None
    interval: Seconds | None = None
    timeout: Seconds | None = None
    failures: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> HealthModel:
        _exactly_one(self, ("command", "tcp", "http"), "health")
        return self


class LimitsModel(_Model):
    what = "limits"
    memory: Annotated[int, PlainValidator(parse_size), AfterValidator(_check_memory)] | None = None
    open_files: Annotated[int, Field(gt=0), AfterValidator(_check_open_files)] | None = None
    cpu: (
        Annotated[
            int,
            Field(gt=0, le=MAX_SECONDS),
            AfterValidator(_rlimit_check(resource.RLIMIT_CPU, "cpu", extra=1)),
        ]
        | None
    ) = None


class LogsModel(_Model):
    what = "logs"
    dir: NonEmpty | None = None
    max_bytes: Size | None = None
    backups: Annotated[int, Field(ge=0, le=MAX_BACKUPS)] | None = None
    telemetry: bool | None = None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string such as ``"30d"``, ``"4w"``,
    ``"6h"``, ``"90m"`` or ``"45s"``.

    Example::

        assert parse_duration("30d") == 30 * 86400 and parse_duration(60) == 60.0
    """
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m and float(m.group(1)) > 0:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    fail(f"invalid duration {value!r}: use seconds > 0 or a string such as '30d', '6h', '90m'")


def _check_objective(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1:
        return float(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and 1 < value < 100:
        pct = round(value / 100, 10)
        fail(f"objective {value!r} is a fraction in (0, 1): write {pct!r} for {value}%")
    fail(f"objective is a fraction in (0, 1) such as 0.999, got {value!r}")


SLI_KINDS = ("up", "calls", "ratio", "latency")
#: The keys each SLI kind takes besides ``objective``, ``window``, ``sli`` and ``name``.
SLI_KEYS: dict[str, tuple[str, ...]] = {
    "up": (),
    "calls": (),
    "ratio": ("good", "total"),
    "latency": ("metric", "threshold"),
}


def _check_sli(value: object) -> str:
    if isinstance(value, str) and value in SLI_KINDS:
        return value
    hint = suggest(value, SLI_KINDS) if isinstance(value, str) else ""
    fail(
        f"unknown sli {value!r}: use 'up' (the fraction of time up), 'calls' (a server's "
        f"calls), 'ratio' (good/total counters) or 'latency' (a histogram){hint}"
    )


_METRIC_NAME = r"[A-Za-z_:][A-Za-z0-9_:]*"
_MATCHER = r'\s*[A-Za-z_][A-Za-z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*'
_MATCHERS = rf"(?:{_MATCHER}(?:,{_MATCHER})*,?\s*)?"
_SELECTOR = re.compile(rf"^\s*({_METRIC_NAME})?\s*(?:\{{({_MATCHERS})\}})?\s*$")


def _selector_parts(value: str) -> tuple[str | None, str] | None:
    """``'x_total{a="b"}'`` -> ``("x_total", 'a="b"')``; None if it is not a selector."""
    m = _SELECTOR.match(value)
    if m is None or (m.group(1) is None and not (m.group(2) or "").strip()):
        return None
    return m.group(1), (m.group(2) or "").strip().rstrip(",").strip()


def _check_counter(value: object) -> str:
    if isinstance(value, str) and _selector_parts(value) is not None:
        return value.strip()
    fail(
        f"expected the selector of a counter such as 'app_requests_total{{code!~\"5..\"}}' "
        f"(trellis takes its rate itself), got {value!r}"
    )


def _check_histogram(value: object) -> str:
    parts = _selector_parts(value) if isinstance(value, str) else None
    if parts is None or parts[0] is None:
        fail(
            "metric is a histogram's base name, optionally with labels, such as "
            f"'app_request_seconds' or 'app_request_seconds{{route=\"/send\"}}', got {value!r}"
        )
    for suffix in ("_bucket", "_count", "_sum"):
        if parts[0].endswith(suffix):
            base = parts[0].removesuffix(suffix)
            fail(
                f"metric is the histogram's base name: write {base!r}, not {parts[0]!r} "
                "(trellis reads its _bucket and _count series)"
            )
    assert isinstance(value, str)
    return value.strip()


def _check_threshold(value: object) -> float:
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0 < value < math.inf
        and value <= MAX_SECONDS
    ):
        return float(value)
    fail(
        f"threshold is a number of seconds > 0, one of the histogram's bucket bounds "
        f"(le), such as 0.5, got {value!r}"
    )


def _check_slo_name(value: object) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        return value
    fail(
        f"an slo name is letters, digits, '-', '_' or '.' (such as 'delivery' or "
        f"'time-to-send'), got {value!r}"
    )


class SloModel(_Model):
    """``slo = { objective = 0.999, window = "30d", sli = "up" }`` on a child or
    supervisor; ``sli = "ratio"`` takes ``good`` and ``total`` (counter selectors),
    ``sli = "latency"`` takes ``metric`` (a histogram) and ``threshold`` (seconds).
    Which keys go with which kind is checked by the tree walker (it names the key)."""

    what = "slo"
    objective: Annotated[float, PlainValidator(_check_objective)]
    window: Annotated[float, PlainValidator(parse_duration)] | None = None
    sli: Annotated[str, PlainValidator(_check_sli)] | None = None
    name: Annotated[str, PlainValidator(_check_slo_name)] | None = None
    good: Annotated[str, PlainValidator(_check_counter)] | None = None
    total: Annotated[str, PlainValidator(_check_counter)] | None = None
    metric: Annotated[str, PlainValidator(_check_histogram)] | None = None
    threshold: Annotated[float, PlainValidator(_check_threshold)] | None = None


class OneSlo(_Model):
    """``slo = { ... }`` (validated on its own by the tree walker)."""

    slo: SloModel


class SloArray(_Model):
    """``slo = [{ ... }, { ... }]`` or ``[[...slo]]`` (validated by the tree walker)."""

    slo: list[SloModel]


def _check_slo_shape(value: object) -> dict[str, Any] | list[dict[str, Any]]:
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return value
    fail(
        'slo is a table such as { objective = 0.999, window = "30d" } or a non-empty '
        f"array of them (several SLOs), got {value!r}"
    )


class _Sre(_Model):
    """The SRE keys every child and supervisor takes (read by ``trellis slo``). ``slo``
    is kept as the file gave it (a table or an array of tables); the tree walker
    validates each with :class:`SloModel`, so errors name the table's own keys."""

    slo: Annotated[Any, PlainValidator(_check_slo_shape)] | None = None
    runbook: Url | None = None
    owner: NonEmpty | None = None


_SRE_KEYS = ("slo", "runbook", "owner", "scope")  # keys no child builder takes


class _Child(_Sre):
    id: ChildId | None = None
    scope: Literal["node", "cluster"] | None = None  # cluster: a singleton (trellis.cluster)
    restart: Restart | None = None
    shutdown: Shutdown | None = None
    significant: bool | None = None
    backoff: BackoffModel | None = None


class CommandChild(_Child):
    what = "a command child"
    command: Annotated[list[str] | str, PlainValidator(_check_argv)]
    env: dict[EnvVarName, EnvValue] | None = None
    inherit_env: Annotated[bool | list[str], PlainValidator(_check_inherit_env)] | None = None
    cwd: NonEmpty | None = None
    user: Annotated[str | int, PlainValidator(_check_user)] | None = None
    shell: bool | None = None
    stop_signal: Annotated[str, PlainValidator(_check_signal)] | None = None
    ready: Annotated[ReadyModel, BeforeValidator(_ready_shorthand)] | None = None
    watchdog: Seconds | None = None
    health: HealthModel | None = None
    limits: LimitsModel | None = None
    logs: LogsModel | None = None
    pidfile: NonEmpty | None = None
    notify_access: Literal["main", "all"] | None = None


class ServerChild(_Child):
    what = "a server child"
    server: Ref
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    name: NonEmpty | None = None


class IsolatedChild(_Child):
    what = "an isolated server child"
    isolated: Ref
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    name: NonEmpty | None = None
    limits: LimitsModel | None = None
    python: NonEmpty | None = None
    serializer: Literal["msgpack", "pickle"] | None = None
    heartbeat: Seconds | None = None
    env: dict[EnvVarName, EnvValue] | None = None
    cwd: NonEmpty | None = None
    standby: bool | None = None


class WorkerChild(_Child):
    what = "a worker child"
    worker: Ref
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    name: NonEmpty | None = None
    trap_exits: bool | None = None


class PluginChild(_Child):
    what = "a plugin child"
    plugin: NonEmpty  # a .wasm or .wat path, relative to the tree file
    name: NonEmpty | None = None
    memory: str | int
    timeout: Seconds
    fuel: Annotated[int, Field(gt=0)] | None = None
    config: dict[str, str] | None = None
    instances: Annotated[int, Field(ge=1, le=256)] | None = None
    wasi: bool | None = None
    allowed_paths: list[NonEmpty] | None = None
    allowed_hosts: list[NonEmpty] | None = None
    version: NonEmpty | None = None


class _Flags(_Model):
    name: NonEmpty | None = None
    strategy: StrategyName | None = None
    intensity: Intensity | None = None
    period: Period | None = None
    auto_shutdown: AutoShutdownName | None = None
    children: list[Any] | None = None  # each child is validated by the walker

    def flags(self) -> dict[str, Any]:
        """The supervisor flags the file set."""
        return self.given(
            "name", "children", "id", "restart", "shutdown", "significant", "backoff", *_SRE_KEYS
        )


class SupervisorChild(_Child, _Flags):
    what = "a supervisor child"


def _check_tree_name(value: object) -> str:
    if not isinstance(value, str) or not value:
        fail(f"name is a non-empty string, got {value!r}")
    _no_nul(value)
    why = segment_problem(value)
    if why is not None:
        fail(
            f"tree name {_short(value)} {why}: it is the first segment of every child's "
            "path (root/parent/child) and names the socket and journal; use '-', '_' or "
            "'.' instead"
        )
    return value


class RootSupervisor(_Flags, _Sre):
    what = "the root supervisor"
    name: Annotated[str, PlainValidator(_check_tree_name)] | None = None


def _check_journal_url(value: object) -> str:
    if isinstance(value, str):
        _no_nul(value)
        scheme = value.partition("://")[0]
        if scheme == "sqlite" and value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            return value
        if scheme in ("postgresql", "postgres") and len(value) > len(scheme) + 3:
            return value
    fail(
        f"invalid journal URL {value!r}: use sqlite:///relative/path.db, "
        "sqlite:////absolute/path.db or postgresql://user@host/db"
    )


def _check_env_name(value: object) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        return value
    fail(f"invalid environment variable name {value!r}")


MAX_SOCKET_PATH = 107
"""The longest Unix socket path Linux takes (``sun_path`` is 108 bytes with the NUL)."""


def _check_anchor(value: object) -> str | bool:
    if isinstance(value, bool) or (isinstance(value, str) and value and "\0" not in value):
        return value
    fail(f"anchor is a file path or true/false, got {value!r}")


def _check_socket(value: object) -> str | bool:
    if isinstance(value, str) and value:
        _no_nul(value)
        if len(value.encode()) > MAX_SOCKET_PATH:
            fail(
                f"socket path {_short(value)} is {len(value.encode())} bytes: a Unix socket "
                f"path has at most {MAX_SOCKET_PATH}; choose a shorter one"
            )
    if isinstance(value, bool) or (isinstance(value, str) and value):
        return value
    fail(f"socket is a path or true/false, got {value!r}")


EnvName = Annotated[str, PlainValidator(_check_env_name)]


class JournalModel(_Model):
    what = "journal"
    enabled: bool | None = None
    url: Annotated[str, PlainValidator(_check_journal_url)] | None = None
    key_env: EnvName | None = None
    max_buffer: Annotated[int, Field(gt=0)] | None = None
    batch_size: Annotated[int, Field(gt=0)] | None = None
    max_batch: Annotated[int, Field(gt=0)] | None = None
    flush_interval: Seconds | None = None
    checkpoint_every: Annotated[int, Field(gt=0)] | None = None
    anchor: Annotated[str | bool, PlainValidator(_check_anchor)] | None = None
    anchor_command: Annotated[list[NonEmpty], Field(min_length=1)] | None = None


class ControlModel(_Model):
    what = "control"
    enabled: bool | None = None
    socket: Annotated[str | bool, PlainValidator(_check_socket)] | None = None
    tcp: Tcp | None = None
    token_env: EnvName | None = None
    idle_timeout: Seconds | None = None
    max_connections: Annotated[int, Field(gt=0)] | None = None
    read_uids: list[Annotated[int, Field(ge=0)]] | None = None


class MetricsModel(_Model):
    what = "metrics"
    enabled: bool | None = None


class RunModel(_Model):
    what = "run"
    loop: Literal["asyncio", "uvloop"] | None = None


def _check_nats_url(value: object) -> str:
    if isinstance(value, str) and value.strip():
        _no_nul(value)
        parts = [p.strip() for p in value.split(",")]
        if all(p.partition("://")[0] in ("nats", "tls", "ws", "wss") and "://" in p for p in parts):
            return value
    fail(f"invalid cluster URL {value!r}: use nats://HOST:PORT (several: comma-separated)")


def _check_cluster_name(value: object) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        return value
    fail(f"cluster name {value!r}: use 1-64 letters, digits, '-' or '_'")


class ClusterModel(_Model):
    """``[cluster]``: join a cluster on NATS (see trellis.cluster)."""

    what = "cluster"
    url: Annotated[str, PlainValidator(_check_nats_url)] | None = None
    node: Annotated[str, Field(pattern=r"^[A-Za-z0-9_=.-]{1,128}$")] | None = None
    name: Annotated[str, PlainValidator(_check_cluster_name)] | None = None
    lease_ttl: Annotated[float, Field(ge=0.2, le=3600, allow_inf_nan=False)] | None = None
    user: NonEmpty | None = None
    password: NonEmpty | None = None
    token: NonEmpty | None = None
    creds: NonEmpty | None = None
    nkey: NonEmpty | None = None
    tls_ca: NonEmpty | None = None
    tls_cert: NonEmpty | None = None
    tls_key: NonEmpty | None = None
    replicas: Annotated[int, Field(ge=1, le=5)] | None = None


class Document(_Model):
    what = "the tree file"
    supervisor: dict[str, Any]
    node: NonEmpty | None = None
    run: RunModel | None = None
    journal: JournalModel | None = None
    control: ControlModel | None = None
    metrics: MetricsModel | None = None
    cluster: ClusterModel | None = None
    chaos: list[dict[str, Any]] | None = None


CHILD_KINDS: dict[str, type[_Child]] = {
    "command": CommandChild,
    "server": ServerChild,
    "isolated": IsolatedChild,
    "worker": WorkerChild,
    "plugin": PluginChild,
    "supervisor": SupervisorChild,
}
"""The model of each kind of child."""

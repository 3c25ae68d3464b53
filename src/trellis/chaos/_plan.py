"""Fault specs and the seeded plan computed from them before a chaos run starts."""

from __future__ import annotations

import fnmatch
import json
import math
import random
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .._core._exceptions import TrellisError

__all__ = [
    "FAULTS",
    "KINDS",
    "ChaosSpecError",
    "Plan",
    "Step",
    "parse_fault",
]

#: The faults the engine can inject.
FAULTS = ("kill", "raise", "exit", "hang", "slow", "outage")
#: The kinds of child a target can be narrowed to (the kinds of a tree file's children).
KINDS = ("worker", "supervisor", "command", "server")

_TIMED = frozenset({"hang", "slow", "outage"})  # faults that last `duration` and are healed
_KEYS = (
    "fault",
    "target",
    "kind",
    "percent",
    "count",
    "proxy",
    "at",
    "every",
    "jitter",
    "poisson",
    "start",
    "until",
    "duration",
    "delay",
)
MAX_STEPS = 100_000


class ChaosSpecError(TrellisError, ValueError):
    """Fault specs that cannot be used; ``errors`` lists every problem as
    ``(where, message)`` with ``where`` like ``chaos[2].every``.

    Example::

        try:
            Plan.from_spec([{"fault": "kill", "target": "root/*", "every": 0}], duration=10)
        except ChaosSpecError as e:
            print(e)    # chaos[0].every: must be > 0
    """

    def __init__(self, errors: Sequence[tuple[str, str]]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(f"{w}: {m}" for w, m in self.errors))


@dataclass(frozen=True, slots=True)
class Step:
    """One planned fault: when (``offset`` seconds after the run starts), what, and where.

    ``target``/``kind``/``percent``/``count`` select tree nodes when the step runs
    (``proxy`` names the proxy of an ``outage``); ``pick`` seeds that choice, so the
    same tree gives the same targets. ``spec`` is the index of the spec it came from.
    """

    n: int
    offset: float
    fault: str
    spec: int
    target: str | None = None
    kind: tuple[str, ...] = ()
    percent: float | None = None
    count: int | None = None
    proxy: str | None = None
    duration: float | None = None
    delay: float | None = None
    pick: int = 0

    def matches(self, path: str, kind: str, root: str | None = None) -> bool:
        """Whether a node (``path`` of ``kind``) is a candidate for this step."""
        if self.kind and kind not in self.kind:
            return False
        if self.target is None:
            return True
        pattern = self.target.strip("/")
        return fnmatch.fnmatchcase(path, pattern) or (
            root is not None and fnmatch.fnmatchcase(path, f"{root}/{pattern}")
        )

    def choose(self, nodes: Iterable[tuple[str, str]], root: str | None = None) -> list[str]:
        """The paths this step hits among ``nodes`` (``(path, kind)`` pairs): every match,
        or ``percent``/``count`` of them chosen by the step's seeded RNG from the matches
        sorted by path. The result is sorted by path.

        Example::

            step.choose([("root/a", "server"), ("root/b", "worker")], root="root")
        """
        matching = sorted({p for p, k in nodes if self.matches(p, k, root)})
        if not matching:
            return []
        if self.percent is not None:
            k = max(1, math.ceil(len(matching) * self.percent / 100.0))
        elif self.count is not None:
            k = self.count
        else:
            return matching
        k = min(k, len(matching))
        return sorted(random.Random(self.pick).sample(matching, k))

    def describe(self) -> str:
        """One line: ``#3  +12.500s  hang   root/collectors/c1 for 4s``."""
        if self.fault == "outage":
            what = f"proxy {self.proxy}"
        else:
            what = self.target if self.target is not None else "*"
            if self.kind:
                what += f" [{'|'.join(self.kind)}]"
            if self.percent is not None:
                what += f" ({_num(self.percent)}% of matches)"
            elif self.count is not None:
                what += f" ({self.count} of matches)"
        if self.delay is not None:
            what += f" +{_num(self.delay)}s per message"
        if self.duration is not None:
            what += f" for {_num(self.duration)}s"
        return f"#{self.n:<4} +{self.offset:9.3f}s  {self.fault:<7} {what}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = list(self.kind)
        return d


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True, slots=True)
class Plan:
    """Every fault of a chaos run, computed up front from the specs and one seed.

    The same specs, seed and duration always give the same steps (and, against the
    same tree, the same targets): print it before the run, rerun it from the seed.

    Example::

        plan = Plan.from_spec(
            [{"fault": "kill", "target": "root/collectors/*", "every": 5, "jitter": 1,
              "percent": 50},
             {"fault": "hang", "target": "root/collectors/c1", "at": 10, "duration": 4}],
            seed=7, duration=60)
        print(plan.describe())
    """

    seed: int
    duration: float
    specs: tuple[Mapping[str, Any], ...]
    steps: tuple[Step, ...]
    where: str = field(default="chaos", compare=False)
    """How errors name the specs (``chaos`` gives ``chaos[2].every``)."""

    @classmethod
    def from_spec(
        cls,
        spec: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        seed: int | None = None,
        duration: float,
        where: str = "chaos",
    ) -> Plan:
        """Validate fault specs (one dict or a list) and compute the plan.

        ``seed=None`` draws a fresh seed (``plan.seed`` tells which). Errors name the
        spec and key (``chaos[2].every: must be > 0``), all at once.

        Spec keys: ``fault`` (kill, raise, exit, hang, slow, outage); ``target`` (a
        path glob) and/or ``kind`` (worker, supervisor, command, server, or a list),
        optionally ``percent`` or ``count`` of the matches; ``proxy`` (outage only);
        one schedule: ``at``, ``every`` (+ ``jitter``) or ``poisson`` (a rate per
        second), with ``start``/``until`` for the repeating ones; ``duration`` for
        hang, slow and outage; ``delay`` (seconds added per message) for slow.
        """
        errors: list[tuple[str, str]] = []
        if isinstance(duration, bool) or not isinstance(duration, int | float):
            errors.append(("duration", f"must be a number of seconds, got {duration!r}"))
            raise ChaosSpecError(errors)
        if not duration > 0 or math.isinf(duration):
            raise ChaosSpecError([("duration", f"must be > 0 and finite, got {duration!r}")])
        if seed is None:
            seed = secrets.randbits(32)
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise ChaosSpecError([("seed", f"must be an int, got {seed!r}")])
        specs: list[Mapping[str, Any]]
        if isinstance(spec, Mapping):
            specs = [spec]
        elif isinstance(spec, Sequence) and not isinstance(spec, str | bytes):
            specs = list(spec)
        else:
            raise ChaosSpecError([(where, f"expected a table or a list of tables, got {spec!r}")])
        master = random.Random(seed)
        raw: list[tuple[float, int, Step]] = []
        for i, s in enumerate(specs):
            rng = random.Random(master.getrandbits(64))  # one stream per spec
            here = f"{where}[{i}]"
            if not isinstance(s, Mapping):
                errors.append((here, f"expected a table, got {s!r}"))
                continue
            checked = _check(s, here, float(duration), errors)
            if checked is None:
                continue
            for t in _times(checked, float(duration), rng):
                raw.append((t, i, _step(checked, i, t, rng.getrandbits(64))))
                if len(raw) > MAX_STEPS:
                    errors.append((here, f"schedules more than {MAX_STEPS} faults"))
                    raise ChaosSpecError(errors)
        if errors:
            raise ChaosSpecError(errors)
        raw.sort(key=lambda r: (r[0], r[1]))
        steps = tuple(_renumber(st, n) for n, (_, _, st) in enumerate(raw, 1))
        return cls(seed, float(duration), tuple(dict(s) for s in specs), steps, where)

    def describe(self) -> str:
        """The plan as text: a header with the seed, then one line per step."""
        n = len(self.steps)
        head = (
            f"chaos plan: seed {self.seed}, duration {_num(self.duration)}s, "
            f"{n} fault{'s' if n != 1 else ''}"
        )
        return "\n".join([head, *(f"  {s.describe()}" for s in self.steps)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "duration": self.duration,
            "specs": [dict(s) for s in self.specs],
            "steps": [s.to_dict() for s in self.steps],
        }

    def to_json(self) -> str:
        """The plan as JSON (seed, duration, specs, steps)."""
        return json.dumps(self.to_dict(), indent=2, default=str)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Checked:
    fault: str
    target: str | None
    kind: tuple[str, ...]
    percent: float | None
    count: int | None
    proxy: str | None
    at: float | None
    every: float | None
    jitter: float
    poisson: float | None
    start: float | None
    until: float | None
    duration: float | None
    delay: float | None


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check(
    s: Mapping[str, Any], here: str, run: float, errors: list[tuple[str, str]]
) -> _Checked | None:
    before = len(errors)

    def err(key: str | None, msg: str) -> None:
        errors.append((f"{here}.{key}" if key else here, msg))

    for key in s:
        if key not in _KEYS:
            err(str(key), f"unknown key (expected one of {', '.join(_KEYS)})")

    def num(key: str, *, gt: float | None = None, ge: float | None = None) -> float | None:
        v = s.get(key)
        if v is None:
            return None
        if not _is_num(v):
            err(key, f"must be a number, got {v!r}")
            return None
        f = float(v)
        if gt is not None and not f > gt:
            err(key, f"must be > {_num(gt)}")
            return None
        if ge is not None and not f >= ge:
            err(key, f"must be >= {_num(ge)}")
            return None
        return f

    fault = s.get("fault")
    if fault is None:
        err("fault", f"required (one of {', '.join(FAULTS)})")
    elif fault not in FAULTS:
        err("fault", f"unknown fault {fault!r} (expected one of {', '.join(FAULTS)})")
        fault = None

    target = s.get("target")
    if target is not None and (not isinstance(target, str) or not target.strip("/")):
        err("target", f"must be a path glob such as 'root/workers/*', got {target!r}")
        target = None
    kinds: tuple[str, ...] = ()
    kv = s.get("kind")
    if kv is not None:
        items = [kv] if isinstance(kv, str) else kv if isinstance(kv, list | tuple) else None
        if not items or not all(isinstance(k, str) and k in KINDS for k in items):
            err("kind", f"must be one of {', '.join(KINDS)} (or a list of them), got {kv!r}")
        else:
            kinds = tuple(dict.fromkeys(items))
    percent = num("percent", gt=0)
    if percent is not None and percent > 100:
        err("percent", "must be <= 100")
        percent = None
    count = s.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        err("count", f"must be an int >= 1, got {count!r}")
        count = None
    if s.get("percent") is not None and s.get("count") is not None:
        err("count", "give percent or count, not both")
    proxy = s.get("proxy")
    if proxy is not None and (not isinstance(proxy, str) or not proxy):
        err("proxy", f"must be a proxy name, got {proxy!r}")
        proxy = None

    if fault == "outage":
        if s.get("proxy") is None:
            err("proxy", "required for an outage (the name of a ChaosProxy)")
        for key in ("target", "kind", "percent", "count"):
            if key in s:
                err(key, "an outage targets a proxy, not tree nodes")
    elif fault is not None:
        if "proxy" in s:
            err("proxy", f"only an outage takes a proxy ({fault} targets tree nodes)")
        if s.get("target") is None and s.get("kind") is None:
            err("target", "required: a path glob (or give kind)")

    scheds = [k for k in ("at", "every", "poisson") if s.get(k) is not None]
    if not scheds:
        err(None, "give a schedule: at, every or poisson")
    elif len(scheds) > 1:
        err(scheds[1], f"give only one schedule (also got {scheds[0]})")
    at = num("at", ge=0)
    if at is not None and at >= run:
        err("at", f"{_num(at)} is not before the end of the run ({_num(run)}s)")
        at = None
    every = num("every", gt=0)
    jitter = num("jitter", ge=0)
    if jitter is not None:
        if s.get("every") is None:
            err("jitter", "only with every")
        elif every is not None and jitter >= every:
            err("jitter", f"must be < every ({_num(every)})")
    poisson = num("poisson", gt=0)
    start = num("start", ge=0)
    until = num("until", gt=0)
    for key in ("start", "until"):
        if s.get(key) is not None and s.get("every") is None and s.get("poisson") is None:
            err(key, "only with every or poisson")
    if start is not None and until is not None and until <= start:
        err("until", f"must be > start ({_num(start)})")

    duration = num("duration", gt=0)
    delay = num("delay", gt=0)
    if fault in _TIMED and s.get("duration") is None:
        err("duration", f"required for {fault} (seconds until it is healed)")
    if fault is not None and fault not in _TIMED and "duration" in s:
        err("duration", f"{fault} is instantaneous; duration is for hang, slow and outage")
    if fault == "slow" and s.get("delay") is None:
        err("delay", "required for slow (seconds added to each message)")
    if fault is not None and fault != "slow" and "delay" in s:
        err("delay", "only slow takes a delay")

    if len(errors) > before or fault is None:
        return None
    return _Checked(
        fault,
        target,
        kinds,
        percent,
        count,
        proxy,
        at,
        every,
        jitter or 0.0,
        poisson,
        start,
        until,
        duration,
        delay,
    )


# ---------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------


def _times(c: _Checked, run: float, rng: random.Random) -> list[float]:
    """The offsets of one spec's faults in ``[0, run)``."""
    if c.at is not None:
        return [c.at]
    end = min(run, c.until) if c.until is not None else run
    out: list[float] = []
    if c.every is not None:
        t0 = c.start if c.start is not None else c.every
        k = 0
        while True:
            nominal = t0 + k * c.every
            if nominal >= end or k > MAX_STEPS:
                break
            t = nominal + (rng.uniform(-c.jitter, c.jitter) if c.jitter else 0.0)
            if 0.0 <= t < end:
                out.append(t)
            k += 1
        return out
    assert c.poisson is not None
    t = c.start if c.start is not None else 0.0
    while len(out) <= MAX_STEPS:
        t += rng.expovariate(c.poisson)
        if t >= end:
            break
        out.append(t)
    return out


def _step(c: _Checked, spec: int, offset: float, pick: int) -> Step:
    return Step(
        n=0,
        offset=offset,
        fault=c.fault,
        spec=spec,
        target=c.target,
        kind=c.kind,
        percent=c.percent,
        count=c.count,
        proxy=c.proxy,
        duration=c.duration,
        delay=c.delay,
        pick=pick,
    )


def _renumber(step: Step, n: int) -> Step:
    return Step(
        n,
        step.offset,
        step.fault,
        step.spec,
        step.target,
        step.kind,
        step.percent,
        step.count,
        step.proxy,
        step.duration,
        step.delay,
        step.pick,
    )


# ---------------------------------------------------------------------------
# The command-line form
# ---------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def parse_fault(text: str) -> dict[str, Any]:
    """A fault spec from its one-line form ``FAULT:TARGET[:KEY=VALUE[,KEY=VALUE...]]``
    (for an outage, ``outage:PROXY:...``). Raises ``ChaosSpecError`` naming the text.

    Example::

        assert parse_fault("kill:root/workers/*:every=5,jitter=1,percent=50") == {
            "fault": "kill", "target": "root/workers/*", "every": 5, "jitter": 1,
            "percent": 50}
    """
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        usage = "expected FAULT:TARGET[:KEY=VALUE,...] (e.g. kill:root/workers/*:every=5)"
        raise ChaosSpecError([(repr(text), usage)])
    fault, where = parts[0].strip(), parts[1].strip()
    out: dict[str, Any] = {"fault": fault}
    out["proxy" if fault == "outage" else "target"] = where
    if len(parts) == 3 and parts[2].strip():
        for item in re.split(r"[,:]", parts[2]):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ChaosSpecError([(repr(text), f"{item!r} is not KEY=VALUE")])
            out[key.strip()] = _value(value.strip())
    return out


def _value(v: str) -> Any:
    if _NUMBER.fullmatch(v):
        f = float(v)
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    if "|" in v:
        return v.split("|")
    return v

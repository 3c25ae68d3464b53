"""What a chaos run did and how the tree took it: per fault, time to detect and to
recover, restarts and escalations; p50/p95 over all faults; the caller's integrity check."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ._plan import Plan

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, Group, RenderResult
    from rich.table import Table

__all__ = ["FaultResult", "Report", "percentile"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation; None for no values.

    Example::

        assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    """
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class FaultResult:
    """One fault of a run. Times are seconds: ``at`` after the run started, ``detect``,
    ``recover`` and ``healed`` after the injection (None: it did not happen).

    ``result`` is ``ok``, ``skipped: <why>`` or ``error: <why>``. ``detect`` is the
    target's DOWN (``child.exited`` of its path); ``recover`` its next start after that
    (and the health check passing, when one was given), or for a fault that caused no
    exit, the health check passing after the heal. ``restarts`` counts restarts of the
    target, its subtree, its ancestors, and its siblings under a ``rest_for_one`` or
    ``one_for_all`` supervisor, while the fault was open (an outage: every restart);
    ``escalations`` counts ``supervisor.gave_up`` of its ancestors.
    """

    id: str
    step: int
    fault: str
    target: str
    planned: float
    at: float | None
    result: str
    detect: float | None = None
    recover: float | None = None
    healed: float | None = None
    restarts: int = 0
    escalations: int = 0
    exit_reason: str | None = None
    exit_class: str | None = None
    os_pid: int | None = None

    @property
    def injected(self) -> bool:
        return self.result == "ok"


@dataclass(frozen=True, slots=True)
class Report:
    """The outcome of a chaos run; ``to_json()`` for machines, ``render()`` for people.

    Example::

        report = await engine.run()
        report.render()
        Path("report.json").write_text(report.to_json())
    """

    seed: int
    duration: float
    elapsed: float
    faults: tuple[FaultResult, ...]
    plan: Plan
    max_concurrent: int | None = None
    integrity: Mapping[str, Any] | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def injected(self) -> list[FaultResult]:
        """The faults that were done (result ``ok``)."""
        return [f for f in self.faults if f.injected]

    @property
    def skipped(self) -> list[FaultResult]:
        """The faults that were not done (cap, no target, unsupported, error)."""
        return [f for f in self.faults if not f.injected]

    def summary(self) -> dict[str, Any]:
        """Counts, and p50/p95 of detect and recover times over the injected faults."""
        done = self.injected
        detect = [f.detect for f in done if f.detect is not None]
        recover = [f.recover for f in done if f.recover is not None]
        return {
            "planned_steps": len(self.plan.steps),
            "injected": len(done),
            "skipped": len(self.faults) - len(done),
            "detected": len(detect),
            "recovered": len(recover),
            "detect_p50": percentile(detect, 50),
            "detect_p95": percentile(detect, 95),
            "recover_p50": percentile(recover, 50),
            "recover_p95": percentile(recover, 95),
            "restarts": sum(f.restarts for f in done),
            "escalations": sum(f.escalations for f in done),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "duration": self.duration,
            "elapsed": self.elapsed,
            "max_concurrent": self.max_concurrent,
            "summary": self.summary(),
            "faults": [asdict(f) for f in self.faults],
            "integrity": dict(self.integrity) if self.integrity is not None else None,
            "notes": list(self.notes),
            "plan": [s.to_dict() for s in self.plan.steps],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON: seed, summary (with p50/p95), faults, integrity, plan."""
        return json.dumps(self.to_dict(), indent=indent, default=str)

    # -- rendering --------------------------------------------------------------
    def table(self, width: int | None = None) -> Table:
        """The faults as a rich table. Below 120 columns (``width``) the times and the
        counts share a column each, so ``target`` and ``result`` keep room to wrap."""
        from rich import box
        from rich.table import Table

        t = Table(title=f"chaos report: seed {self.seed}", title_justify="left", box=box.SIMPLE)
        t.add_column("id", no_wrap=True)
        t.add_column("fault", no_wrap=True)
        t.add_column("target", overflow="fold", min_width=12, ratio=3)
        if width is not None and width < _WIDE:
            t.add_column("result", overflow="fold", min_width=8, ratio=2)
            t.add_column("times", no_wrap=True)
            t.add_column("outcome", no_wrap=True)
            for f in self.faults:
                times = (
                    f"at {_secs(f.at)}\ndet {_secs(f.detect)}\n"
                    f"rec {_secs(f.recover)}\nheal {_secs(f.healed)}"
                )
                counts = f"{f.restarts} rest.\n{f.escalations} esc.\nexit {f.exit_class or '-'}"
                t.add_row(
                    f.id, f.fault, f.target, f.result, times, counts,
                    style=None if f.injected else "dim",
                )  # fmt: skip
            return t
        t.add_column("at", justify="right", no_wrap=True)
        t.add_column("result", overflow="fold", min_width=6, ratio=2)
        for name in ("detect", "recover", "healed", "rest.", "esc."):
            t.add_column(name, justify="right", no_wrap=True)
        t.add_column("exit", no_wrap=True)
        for f in self.faults:
            style = None if f.injected else "dim"
            t.add_row(
                f.id,
                f.fault,
                f.target,
                _secs(f.at),
                f.result,
                _secs(f.detect),
                _secs(f.recover),
                _secs(f.healed),
                str(f.restarts),
                str(f.escalations),
                f.exit_class or "",
                style=style,
            )
        return t

    def renderable(self) -> Group:
        """The table, the summary lines and the integrity check, as one rich renderable."""
        from rich.console import Group
        from rich.text import Text

        s = self.summary()
        lines = [
            f"faults: {s['injected']} injected, {s['skipped']} skipped "
            f"({s['planned_steps']} planned steps); "
            f"restarts {s['restarts']}, escalations {s['escalations']}",
            f"time to detect: p50 {_secs(s['detect_p50'])}  p95 {_secs(s['detect_p95'])}  "
            f"({s['detected']} detected)",
            f"time to recover: p50 {_secs(s['recover_p50'])}  p95 {_secs(s['recover_p95'])}  "
            f"({s['recovered']} recovered)",
        ]
        if self.integrity is not None:
            lines.append("integrity: " + ", ".join(f"{k}={v}" for k, v in self.integrity.items()))
        lines.extend(self.notes)
        return Group(_FaultTable(self), *(Text(line) for line in lines))

    def render(self, console: Console | None = None) -> None:
        """Print the report (to ``console``, default stdout)."""
        from rich.console import Console

        (console or Console()).print(self.renderable())

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, file=io.StringIO(), color_system=None)
        console.print(self.renderable())
        out = console.file
        assert isinstance(out, io.StringIO)
        return out.getvalue()


_WIDE = 120  # columns from which every figure gets a column of its own


class _FaultTable:
    """The fault table laid out for the width it is printed at."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.report.table(options.max_width)


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}s"

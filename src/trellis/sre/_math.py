"""Error-budget arithmetic, as the Google SRE workbook writes it ("Alerting on SLOs").

Example (the workbook's 99.9% over 30 days)::

    assert round(budget_seconds(0.999, 30 * 86400) / 60, 1) == 43.2
    assert budget_spent(14.4, 3600, 30 * 86400) == 0.02    # 2% of the budget in 1 h
    assert exhaustion_seconds(1.0, 10, 30 * 86400) == 3 * 86400
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "BURN_WINDOWS",
    "budget_seconds",
    "budget_spent",
    "burn_rate",
    "exhaustion_seconds",
    "percentile",
    "window_text",
]

#: The burn-rate windows of the report, as (label, seconds).
BURN_WINDOWS: tuple[tuple[str, float], ...] = (
    ("5m", 300.0),
    ("30m", 1800.0),
    ("1h", 3600.0),
    ("6h", 6 * 3600.0),
    ("1d", 86400.0),
    ("3d", 3 * 86400.0),
)


def budget_seconds(objective: float, window: float) -> float:
    """The error budget as seconds of downtime allowed in ``window`` seconds."""
    return (1.0 - objective) * window


def burn_rate(error_ratio: float, objective: float) -> float:
    """How fast the budget burns: 1.0 spends exactly the budget over the SLO window."""
    return error_ratio / (1.0 - objective)


def budget_spent(burn: float, duration: float, window: float) -> float:
    """The fraction of the whole window's budget that ``duration`` seconds at ``burn``
    spend (the workbook: 14.4x for 1 h of a 30-day window is 2%)."""
    return round(burn * duration / window, 12)


def exhaustion_seconds(remaining: float, burn: float, window: float) -> float | None:
    """Seconds until a ``remaining`` fraction of the budget is gone at ``burn``; None when
    nothing burns (the workbook: at 10x a full budget lasts 3 days of 30)."""
    if remaining <= 0:
        return 0.0
    if burn <= 0:
        return None
    return round(remaining * window / burn, 9)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by linear interpolation between closest ranks."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def window_text(seconds: float) -> str:
    """``2592000`` -> ``"30d"``; the largest unit that divides it."""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            if unit == "w":
                return f"{int(seconds // 86400)}d"
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"

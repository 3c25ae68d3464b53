"""Error budget and burn-rate arithmetic against the Google SRE workbook's examples
("Alerting on SLOs": a 99.9% SLO over 30 days)."""

from __future__ import annotations

import pytest

from trellis.sre import (
    BURN_WINDOWS,
    budget_seconds,
    budget_spent,
    burn_rate,
    exhaustion_seconds,
    percentile,
)

DAY = 86400.0
WINDOW = 30 * DAY


def test_budget_of_999_over_30_days_is_43_minutes() -> None:
    assert budget_seconds(0.999, WINDOW) == pytest.approx(43.2 * 60)


@pytest.mark.parametrize(
    ("burn", "duration", "spent"),
    [
        (14.4, 3600.0, 0.02),  # page: 2% of the budget in 1 hour
        (6.0, 6 * 3600.0, 0.05),  # page: 5% in 6 hours
        (3.0, DAY, 0.10),  # ticket: 10% in 1 day
        (1.0, 3 * DAY, 0.10),  # ticket: 10% in 3 days
    ],
)
def test_workbook_alert_table(burn: float, duration: float, spent: float) -> None:
    assert budget_spent(burn, duration, WINDOW) == pytest.approx(spent)


@pytest.mark.parametrize(
    ("error_ratio", "burn"),
    [(0.001, 1.0), (0.002, 2.0), (0.01, 10.0), (0.0144, 14.4), (1.0, 1000.0)],
)
def test_burn_rate_of_an_error_ratio(error_ratio: float, burn: float) -> None:
    assert burn_rate(error_ratio, 0.999) == pytest.approx(burn)


@pytest.mark.parametrize(
    ("burn", "exhausted_in"),
    [
        (1.0, 30 * DAY),  # the workbook's "time to exhaust the budget" table
        (2.0, 15 * DAY),
        (10.0, 3 * DAY),
        (1000.0, 43.2 * 60),
    ],
)
def test_time_to_exhaust_a_full_budget(burn: float, exhausted_in: float) -> None:
    assert exhaustion_seconds(1.0, burn, WINDOW) == pytest.approx(exhausted_in)


def test_exhaustion_edges() -> None:
    assert exhaustion_seconds(0.0, 5.0, WINDOW) == 0.0
    assert exhaustion_seconds(-0.5, 5.0, WINDOW) == 0.0
    assert exhaustion_seconds(0.5, 0.0, WINDOW) is None
    assert exhaustion_seconds(0.5, 10.0, WINDOW) == pytest.approx(1.5 * DAY)


def test_burn_windows_are_the_reports() -> None:
    assert [w for w, _ in BURN_WINDOWS] == ["5m", "30m", "1h", "6h", "1d", "3d"]


def test_percentile_interpolates() -> None:
    assert percentile([], 0.5) is None
    assert percentile([4.0], 0.95) == 4.0
    assert percentile([10.0, 2.0, 3.0], 0.5) == 3.0
    assert percentile([10.0, 2.0, 3.0], 0.95) == pytest.approx(9.3)

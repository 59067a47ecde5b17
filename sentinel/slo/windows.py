"""Multi-window, multi-burn-rate alert windows, derived from the SLO period.

The Google SRE Workbook ("Alerting on SLOs") recommends four window pairs for a
30-day SLO. A burn rate of 1 spends exactly the budget over the period; a pair fires
when both its long and its short window burn faster than its factor:

    severity  long  short  factor  budget spent when the long window fires
    page      1h    5m     14.4    2%
    page      6h    30m    6       5%
    ticket    1d    2h     3       10%
    ticket    3d    6h     1       10%

Other periods scale every window by period/30d and keep the factors, so each pair still
fires after spending the same fraction of the budget (a 7-day SLO pages on 14m/1m10s).
No window is shorter than `MIN_SCRAPES_PER_WINDOW` scrape intervals: `rate()` needs
several samples to mean anything. A clamped window spends a little more budget before
it fires; `BurnWindow.budget_fraction` reports the real figure.

A low objective leaves a budget so large that a factor times it exceeds 1: the pair would
need more than every event to be bad and could never fire (14.4x of a 90% objective's 10%
budget is 144%), and one that needs nearly every event bad fires late even in a full outage.
Where the factor's error ratio would exceed the midpoint between the budget and 1, the
pair fires at that midpoint instead (`BurnWindow.factor_for`: 55% bad for a 90% objective,
still above anything the budget allows). Objectives of 0.93 and up (page pairs) or 0.8 and
up (ticket pairs) keep the Workbook's factors; lower ones page on 55% errors within about
half the fast pair's long window (a 30-day period: some 30 minutes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sentinel.slo.durations import format_duration

Severity = Literal["page", "ticket"]

THIRTY_DAYS = 30 * 86400
MIN_SCRAPES_PER_WINDOW = 4

# (severity, long window s, short window s, burn-rate factor) for a 30-day period.
WORKBOOK_30D: tuple[tuple[Severity, int, int, float], ...] = (
    ("page", 3600, 300, 14.4),
    ("page", 6 * 3600, 1800, 6.0),
    ("ticket", 86400, 2 * 3600, 3.0),
    ("ticket", 3 * 86400, 6 * 3600, 1.0),
)


@dataclass(frozen=True)
class BurnWindow:
    """One long/short window pair and the burn rate above which it fires."""

    severity: Severity
    long_s: int
    short_s: int
    factor: float
    period_s: int

    @property
    def long(self) -> str:
        return format_duration(self.long_s)

    @property
    def short(self) -> str:
        return format_duration(self.short_s)

    @property
    def budget_fraction(self) -> float:
        """Fraction of the period's budget spent when the long window reaches the factor."""
        return self.factor * self.long_s / self.period_s

    def factor_for(self, budget: float) -> float:
        """The burn rate this pair fires above for an SLO with `budget`: the factor, lowered for a
        large budget to fire at the error ratio midway between the budget and 1 (see the module)."""
        midpoint = (1.0 + budget) / 2
        if self.factor * budget <= midpoint:
            return self.factor
        return round(midpoint / budget, 6)

    def detection_s(self, error_ratio: float, budget: float) -> float:
        """Seconds from the start of a constant error ratio until both windows exceed the factor.

        Assumes error-free traffic before the start and a history longer than the long
        window; `math.inf` when the ratio never reaches the factor.
        """
        threshold = self.factor_for(budget) * budget
        if error_ratio <= threshold:
            return math.inf
        return threshold / error_ratio * self.long_s

    def reset_s(self, budget: float) -> float:
        """Seconds after a full outage (at least a short window long) ends until the short window clears."""
        return self.short_s * (1.0 - min(1.0, self.factor_for(budget) * budget))


@dataclass(frozen=True)
class WindowPlan:
    """Every window pair for one period, and every range the recording rules need."""

    period_s: int
    scrape_interval_s: int
    pairs: tuple[BurnWindow, ...]

    @property
    def ranges_s(self) -> tuple[int, ...]:
        """Distinct ranges to record, shortest first, ending with the whole period."""
        spans = {w.long_s for w in self.pairs} | {w.short_s for w in self.pairs} | {self.period_s}
        return tuple(sorted(spans))

    def by_severity(self, severity: Severity) -> tuple[BurnWindow, ...]:
        return tuple(w for w in self.pairs if w.severity == severity)


def plan_windows(period_s: int, scrape_interval_s: int) -> WindowPlan:
    """Scale the Workbook's 30-day windows to `period_s`, none shorter than 4 scrapes."""
    floor = MIN_SCRAPES_PER_WINDOW * scrape_interval_s
    scale = period_s / THIRTY_DAYS

    def scaled(seconds: int) -> int:
        return max(floor, int(round(seconds * scale)))

    pairs = tuple(
        BurnWindow(severity, scaled(long_s), scaled(short_s), factor, period_s)
        for severity, long_s, short_s, factor in WORKBOOK_30D
    )
    return WindowPlan(period_s, scrape_interval_s, pairs)

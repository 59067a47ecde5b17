"""The value every detector returns: a frozen result with its statistic, p-value and alarm."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DetectorResult:
    """Outcome of one two-sample test on one window.

    `p_value` is already corrected for the detector's own multiple tests (e.g. Bonferroni over
    the classes of BBSD); `alarm` is `p_value < threshold`. An abstaining detector has NaN
    statistic and p-value, no alarm, and says why in `reason`.
    """

    name: str
    statistic: float
    p_value: float
    threshold: float
    alarm: bool
    n_reference: int
    n_window: int
    abstained: bool = False
    reason: str = ""
    feature: str = ""        # the feature (class, component, statistic) with the smallest p-value

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping (NaN becomes None)."""
        d = asdict(self)
        for k in ("statistic", "p_value"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = None
        return d


def abstain(name: str, threshold: float, n_reference: int, n_window: int, reason: str) -> DetectorResult:
    """A result that raises no alarm because the test cannot be run validly."""
    return DetectorResult(name, math.nan, math.nan, threshold, False, n_reference, n_window, True, reason)


def decide(name: str, statistic: float, p_value: float, threshold: float, n_reference: int, n_window: int,
           feature: str = "") -> DetectorResult:
    """A result whose alarm is `p_value < threshold`."""
    p = float(min(1.0, max(0.0, p_value)))
    return DetectorResult(name, float(statistic), p, threshold, bool(p < threshold), n_reference, n_window,
                          feature=feature)

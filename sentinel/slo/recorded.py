"""Names of the series sentinel's recording rules write (the SLO-level companions of metricnames).

They follow the Prometheus `level:metric:operations` convention; the level `slo` means
one series per (slo, model). Dashboards and tests read these names from here.
"""

from __future__ import annotations

from sentinel.slo.durations import format_duration

# Fraction of bad events over a range, e.g. slo:sentinel_sli_error:ratio_rate5m.
ERROR_RATIO_PREFIX = "slo:sentinel_sli_error:ratio_rate"
# The objective as a constant series, so dashboards need not repeat it.
OBJECTIVE = "slo:sentinel_objective:ratio"
# Error budget left over the whole period (1 = untouched, 0 = spent, negative = overspent).
BUDGET_REMAINING = "slo:sentinel_error_budget:remaining_ratio"
# NaN-free, replica-averaged label-free accuracy estimate, one sample per evaluation.
ESTIMATED_ACCURACY = "slo:sentinel_estimated_accuracy:ratio"
# Share of the replicas reporting an accuracy estimate whose estimate the SLO counts now
# (enough samples, not flagged unreliable); 0 means the estimated-accuracy SLO is silent.
ESTIMATE_USABLE = "slo:sentinel_estimated_accuracy_usable:ratio"


def error_ratio_name(window_s: int) -> str:
    """Recorded error-ratio series for a range given in seconds."""
    return ERROR_RATIO_PREFIX + format_duration(window_s)

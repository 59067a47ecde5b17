"""Settings of the rollout gate (`gate:` in slo.yaml) and of the cost panels (`cost:`).

```yaml
gate:
  alpha: 0.05                  # family-wise false-fail level, split over the criteria (Bonferroni)
  min_requests: 200            # per version, for the error-ratio and latency criteria
  min_predictions: 200         # per version, for the predicted-class criterion
  min_compared: 100            # per version, for agreement and accuracy
  latency_tolerance: 1.25      # canary P95 or P99 may be at most this times the baseline's...
  latency_min_diff_s: 0.01     # ...and must also be slower by at least this much to fail (seconds, at most 5)
  max_cramers_v: 0.1           # predicted-class shift below this effect size is not a failure (V at an equal split)
  max_agreement_drop: 0.02     # agreement with the reference may drop by at most 2 points
  max_accuracy_drop: 0.02      # accuracy lower bound (or ATC estimate) may drop by at most 2 points
  max_contract_violation_ratio: 0.01  # canary's share of inputs violating the input contract
  max_client_error_increase: 0.01  # canary's 4xx ratio may exceed the baseline's by at most 1 point
  max_drift_alarm_share: 0.5   # canary's combined drift alarm may be up at most half the window
cost:
  replica_hour: 0.0            # cost of one model-server replica for an hour (any currency)
  gpu_hour: 0.0                # cost of one GPU for an hour
  currency: USD
```
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

# An online classifier slower by seconds is slower by any standard; a larger `latency_min_diff_s`
# is a unit mistake (milliseconds written as seconds).
MAX_LATENCY_MIN_DIFF_S = 5.0


@dataclass(frozen=True)
class GateSettings:
    """Statistical settings of `sentinel gate` (see the module docstring)."""

    alpha: float = 0.05
    min_requests: int = 200
    min_predictions: int = 200
    min_compared: int = 100
    latency_tolerance: float = 1.25
    latency_min_diff_s: float = 0.01
    max_cramers_v: float = 0.1
    max_agreement_drop: float = 0.02
    max_accuracy_drop: float = 0.02
    max_contract_violation_ratio: float = 0.01
    max_drift_alarm_share: float = 0.5
    max_client_error_increase: float = 0.01

    def validate(self) -> Iterator[tuple[str, str]]:
        if not 0 < self.alpha < 1:
            yield "alpha", f"must be between 0 and 1, got {self.alpha}"
        for name in ("min_requests", "min_predictions", "min_compared"):
            if getattr(self, name) < 1:
                yield name, f"must be at least 1, got {getattr(self, name)}"
        if self.latency_tolerance < 1:
            yield "latency_tolerance", f"must be at least 1 (a ratio of quantiles), got {self.latency_tolerance}"
        if self.latency_min_diff_s < 0:
            yield "latency_min_diff_s", f"must not be negative, got {self.latency_min_diff_s}"
        elif self.latency_min_diff_s > MAX_LATENCY_MIN_DIFF_S:
            # `10` meant as milliseconds is 10 s: latency could then never fail
            yield "latency_min_diff_s", (f"is in seconds (0.01 is 10 ms) and at most {MAX_LATENCY_MIN_DIFF_S:g}, "
                                         f"got {self.latency_min_diff_s}")
        for name in ("max_cramers_v", "max_agreement_drop", "max_accuracy_drop",
                     "max_contract_violation_ratio", "max_drift_alarm_share", "max_client_error_increase"):
            if not 0 <= getattr(self, name) <= 1:
                yield name, f"must be between 0 and 1, got {getattr(self, name)}"


@dataclass(frozen=True)
class CostSettings:
    """What serving costs, for the executive dashboard's cost per 1,000 inferences."""

    replica_hour: float = 0.0
    gpu_hour: float = 0.0
    currency: str = "USD"

    def validate(self) -> Iterator[tuple[str, str]]:
        if self.replica_hour < 0:
            yield "replica_hour", f"must not be negative, got {self.replica_hour}"
        if self.gpu_hour < 0:
            yield "gpu_hour", f"must not be negative, got {self.gpu_hour}"
        if not (self.currency and self.currency.isalnum() and len(self.currency) <= 8):
            yield "currency", f"must be a short code such as USD or EUR, got {self.currency!r}"

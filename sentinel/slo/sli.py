"""PromQL for each SLI: the ratio of bad events over a range, per model.

Every expression here is built from the names in `sentinel.metricnames`, aggregates
away replicas (`sum by (model)`), and is safe when there is no traffic:

* the bad-event count falls back to `0 * total` when no bad series exists yet (a model
  that never returned a 5xx has no `code="500"` series), so the ratio is 0, not empty;
* the denominator goes through `clamp_min(..., 1e-12)`: with no requests in the range
  both rates are 0 and the ratio is 0/1e-12 = 0, where a plain division would give NaN
  and poison every `sum_over_time`/`avg_over_time` built on it. Any real rate is far
  above 1e-12/s, so the clamp never changes a ratio with traffic;
* when the series vanish altogether the ratio is empty (no alert) and
  `SentinelMetricsAbsent` says so instead.
"""

from __future__ import annotations

import re
from decimal import Decimal

from sentinel import metricnames as mn
from sentinel.slo import recorded
from sentinel.slo.spec import SloSpec

# Smallest denominator: far below any real per-second rate, keeps 0/0 from becoming NaN.
RATE_FLOOR = "1e-12"
# Recorded ratios are rounded to this, and budgets written to 12 decimals: rates carry
# float rounding (1 - 0.99 is 0.010000000000000009, a sum of rates is off in its last
# bits), and without rounding an error ratio of exactly the budget could compare as a
# burn rate of 1.0000000000000002 and open a ticket. 1e-12 is a millionth of the
# smallest budget an SLO file accepts (objective <= 0.99999).
RATIO_PRECISION = "1e-12"
RATIO_DECIMALS = 12

# Metric series whose absence means an SLI cannot be computed, per SLI kind.
_AGREEMENT_SOURCES = ("shadow", "replay")
# The `code` values of `sentinel_requests_total` that spend the availability budget (an
# RE2 pattern, fully anchored as Prometheus anchors label regexes). The rule generator and
# `sentinel gate` both read it from here, so they count the same requests as errors.
BAD_CODE_REGEX = f"5..|{mn.CODE_INCOMPLETE}"  # 5xx, and bodies cut after a 2xx head (proxy: code="incomplete")


def le_regex(threshold: float) -> str:
    """An RE2 pattern matching every common spelling of a histogram bound.

    Prometheus 2 stores `le` as the exporter wrote it (`0.15`, `0.150`, `1`, `1.0`);
    Prometheus 3 normalises it to a float spelling (`1.0`, `1e-05`). The pattern accepts
    the plain decimal with any number of trailing zeros and the exponent form with any
    mantissa padding, exponent sign or leading zeros, and nothing else (`0.1`, `0.151`
    and `10.15` do not match `0.15`).
    """
    dec = Decimal(repr(float(threshold)))
    if not dec.is_finite() or dec <= 0:
        raise ValueError(f"threshold must be a positive finite number, got {threshold}")
    plain = format(dec.normalize(), "f")
    if "." in plain:
        fixed = re.escape(plain.rstrip("0")) + "0*"
    else:
        fixed = re.escape(plain) + r"(\.0*)?"
    sign, digits, exponent = dec.normalize().as_tuple()
    digit_str = "".join(str(d) for d in digits).rstrip("0") or "0"
    exp10 = int(exponent) + len(digits) - 1  # exponent of the leading digit
    mantissa = digit_str[0] + (r"\." + digit_str[1:] + "0*" if len(digit_str) > 1 else r"(\.0*)?")
    if exp10 > 0:
        exp_pat = rf"[eE]\+?0*{exp10}"
    elif exp10 < 0:
        exp_pat = rf"[eE]-0*{-exp10}"
    else:
        exp_pat = r"[eE][+-]?0+"
    return f"{fixed}|{mantissa}{exp_pat}"


def _sel(metric: str, **matchers: str) -> str:
    """`metric{a="x",b=~"y"}`; a value starting with `~` or `!` becomes a regex or negative matcher."""
    parts = []
    for label, value in matchers.items():
        op = "="
        if value.startswith("~"):
            op, value = "=~", value[1:]
        elif value.startswith("!~"):
            op, value = "!~", value[2:]
        elif value.startswith("!"):
            op, value = "!=", value[1:]
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        parts.append(f'{label}{op}"{escaped}"')
    return f"{metric}{{{','.join(parts)}}}"


def _sum_rate(selector: str, window: str) -> str:
    return f"sum by (model) (rate({selector}[{window}]))"


def _ratio(bad: str, total: str) -> str:
    return f"({bad} or 0 * {total})\n/\nclamp_min({total}, {RATE_FLOOR})"


def total_selector(slo: SloSpec) -> str:
    """The series counting every event of the SLI (for absence checks and dashboards)."""
    if slo.sli == "availability":
        return _sel(mn.REQUESTS.sample_name, model=slo.model)
    if slo.sli == "latency":
        return _sel(mn.REQUEST_DURATION.name + "_count", model=slo.model)
    if slo.sli == "agreement":
        return _sel(mn.REFERENCE_AGREEMENT.sample_name, model=slo.model,
                    source="~" + "|".join(_AGREEMENT_SOURCES))
    return _sel(mn.ESTIMATED_ACCURACY.name, model=slo.model, method="atc_lower")


def threshold_bucket(slo: SloSpec) -> str:
    """The selector of a latency SLO's histogram bucket at its threshold (any spelling of `le`)."""
    assert slo.threshold is not None
    return _sel(mn.REQUEST_DURATION.sample_name, model=slo.model, le="~" + le_regex(slo.threshold))


def missing_bucket(slo: SloSpec) -> str:
    """PromQL: per model and replica, the latency histograms without a bucket at the SLO's threshold."""
    count = _sel(mn.REQUEST_DURATION.name + "_count", model=slo.model)
    return (f"count by (model, instance) ({count})\nunless on (model, instance)\n"
            f"count by (model, instance) ({threshold_bucket(slo)})")


def required_selectors(slo: SloSpec) -> tuple[str, ...]:
    """Selectors that must match some series for the SLI to be computable."""
    if slo.sli == "latency":
        assert slo.threshold is not None
        return (total_selector(slo), threshold_bucket(slo))
    if slo.sli == "estimated_accuracy":
        # Without these an estimate can never count (see `usable_estimates`): say so, do not go silent.
        return (total_selector(slo), _sel(mn.ACCURACY_ESTIMATE_SAMPLES.name, model=slo.model),
                _sel(mn.ACCURACY_ESTIMATE_RELIABLE.name, model=slo.model))
    return (total_selector(slo),)


def error_ratio(slo: SloSpec, window: str) -> str:
    """PromQL for the fraction of bad events over `window`, one series per model, rounded."""
    return f"round(\n{_raw_error_ratio(slo, window)}\n, {RATIO_PRECISION})"


def _raw_error_ratio(slo: SloSpec, window: str) -> str:
    model = slo.model
    if slo.sli == "availability":
        total = _sum_rate(_sel(mn.REQUESTS.sample_name, model=model), window)
        # 5xx, and responses whose body was cut after a 2xx head went out (not a success).
        bad = _sum_rate(_sel(mn.REQUESTS.sample_name, model=model, code="~" + BAD_CODE_REGEX), window)
        return _ratio(bad, total)
    if slo.sli == "latency":
        assert slo.threshold is not None
        bucket = threshold_bucket(slo)
        # Only histograms that have a bucket at the threshold count: a replica whose buckets miss
        # it (an older SLO file, another bucket layout) cannot say which requests were fast, and
        # counting its _count without a bucket would score every one of its requests slow.
        # SentinelMetricsAbsent{scope="replica"} names such replicas. Both sides are ranges, so a replica
        # gone since (a rescheduled pod) still counts for the part of the window it served.
        total = (f"sum by (model) (rate({_sel(mn.REQUEST_DURATION.name + '_count', model=model)}[{window}])"
                 f" and ignoring (le) rate({bucket}[{window}]))")
        good = _sum_rate(bucket, window)
        # total - good: requests slower than the threshold. clamp_min guards against a
        # bucket that momentarily runs ahead of _count between two scrapes.
        return f"clamp_min({total} - {good}, 0)\n/\nclamp_min({total}, {RATE_FLOOR})"
    if slo.sli == "agreement":
        sources = "~" + "|".join(_AGREEMENT_SOURCES)
        total = _sum_rate(_sel(mn.REFERENCE_AGREEMENT.sample_name, model=model, source=sources), window)
        bad = _sum_rate(_sel(mn.REFERENCE_AGREEMENT.sample_name, model=model, source=sources,
                             result="disagree"), window)
        return _ratio(bad, total)
    # estimated_accuracy: the estimate is a gauge, so its "bad events" are the predictions
    # it estimates to be wrong: 1 - accuracy, averaged over time (each evaluation weighs
    # the same, whatever the traffic). The averaged series is recorded first, per
    # evaluation, by `accuracy_sample` (NaN dropped, replicas averaged).
    clean = _sel(recorded.ESTIMATED_ACCURACY, slo=slo.name, model=model)
    return f"clamp(1 - avg_over_time({clean}[{window}]), 0, 1)"


def accuracy_sample(slo: SloSpec) -> str:
    """PromQL for one NaN-free sample of the accuracy estimate, averaged over the replicas whose estimate counts.

    `>= 0` drops NaN (an estimator that has not completed a window yet), so NaN never
    reaches the averages over time built on this series. Empty when no replica's estimate
    counts (see `usable_estimates`): such an evaluation adds nothing to any window.
    """
    return f"avg by (model) (\n  {usable_estimates(slo)}\n)"


def estimates(slo: SloSpec) -> str:
    """Every replica's NaN-free accuracy estimate (`atc_lower`), usable or not."""
    return f"{_sel(mn.ESTIMATED_ACCURACY.name, model=slo.model, method='atc_lower')} >= 0"


def usable_estimates(slo: SloSpec) -> str:
    """Per replica, the estimate only where it rests on at least `min_samples` samples and
    the estimator does not flag it unreliable.

    A young window (a sidecar just started or restarted) holds a few dozen verdicts, and a
    lower bound over 25 of them moves in steps of 0.04: it burns a 3% budget on noise. The
    estimator's own `reliable` gauge is 0 when over 10% of the window lies outside the golden
    support or the window is diagnosed a preprocessing mismatch or contract breach: then
    the estimate says itself it is not to be trusted, and the drift and input-contract
    alerts speak for that window instead. The three series come from the same scrape
    target, so they match on every label but `method`.
    """
    samples = _sel(mn.ACCURACY_ESTIMATE_SAMPLES.name, model=slo.model)
    reliable = _sel(mn.ACCURACY_ESTIMATE_RELIABLE.name, model=slo.model)
    return (f"({estimates(slo)})\n  and ignoring (method) ({samples} >= {slo.sample_floor})"
            f"\n  and ignoring (method) ({reliable} == 1)")


def unusable_estimates(slo: SloSpec, reason: str) -> str:
    """Per model, how many replicas' estimates do not count for `reason`, while none counts.

    reason `insufficient_samples`: the estimate rests on fewer than `min_samples`;
    `flagged_unreliable`: the estimator's reliable gauge is 0.
    """
    if reason == "insufficient_samples":
        cond = f"{_sel(mn.ACCURACY_ESTIMATE_SAMPLES.name, model=slo.model)} < {slo.sample_floor}"
    elif reason == "flagged_unreliable":
        cond = f"{_sel(mn.ACCURACY_ESTIMATE_RELIABLE.name, model=slo.model)} == 0"
    else:
        raise ValueError(f"unknown reason {reason!r}")
    return (f"count by (model) ({cond})\nunless on (model)\n"
            f"count by (model) (\n  {usable_estimates(slo)}\n)")


def usable_share(slo: SloSpec) -> str:
    """Share of the replicas reporting an estimate whose estimate counts now (0: the SLO is silent)."""
    every = f"count by (model) ({estimates(slo)})"
    return (f"(\n  count by (model) (\n  {usable_estimates(slo)}\n  )\n  or 0 * {every}\n)"
            f"\n/\n{every}")

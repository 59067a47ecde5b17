"""PromQL of the rollout gate: every series a criterion needs, for one model version.

The version reaches the series as a scrape-time target label (`version`, set by the
PodMonitor/ServiceMonitor relabelling from the pod label `app.kubernetes.io/version`, or
by `labels: {version: v3}` in a static scrape config), not from the proxy: the hot path
stays label-for-label what it was, and cardinality grows only with the versions serving.

Every function takes the model, the version and the window as strings, so the Argo
Rollouts and Flagger templates can pass placeholders (`{{args.canary}}`, `{{ interval }}`)
through the same code that `sentinel gate` runs.
"""

from __future__ import annotations

from sentinel import metricnames as mn
from sentinel.slo.sli import BAD_CODE_REGEX, _sel

VERSION_LABEL = "version"
AGREEMENT_SOURCES = "shadow|replay"
CLIENT_CODE_REGEX = "4.."        # refused requests (sentinel.gate.criteria.CLIENT_CODE)
COMBINED_DETECTOR = "combined"   # the drift suite's combined verdict (sentinel.drift.combine)


def _v(metric: str, model: str, version: str, **extra: str) -> str:
    """`metric{model=..., version=...}`; a version `pod=~REGEX` selects on another label instead (Flagger)."""
    label, value = VERSION_LABEL, version
    if "=~" in version:
        label, value = version.split("=~", 1)
        value = "~" + value
    return _sel(metric, model=model, **{label: value}, **extra)


def window_start(window: str) -> str:
    """The first whole second of the window, from its duration alone (a placeholder in the templates).

    `time() - <seconds>` needs a number; `{{args.window}}` and `{{ interval }}` are durations
    PromQL takes only in a range. A subquery's steps lie on whole multiples of its resolution
    within the range, so its earliest one is the window's start rounded up to the second.
    """
    return f"scalar(min_over_time(timestamp(vector(0))[{window}:1s]))"


def _inc(selector: str, window: str, by: str = "") -> str:
    """`sum [by (by)] (increase(selector[window]))`, with a series created within the window counted from 0.

    The controller templates' counts (`sentinel.gate.templates`), as `_counted` is the gate's: a
    series whose `_created` lies in the window counts its last value, or its increase where
    larger (a reset after it began); every other series its increase. A template's window is a
    placeholder (`{{args.window}}`, `{{ interval }}`) PromQL cannot turn into seconds, so its
    start is `window_start` less a second (a series created within a second before it counts
    whole: at most a second of events too many, where counting it from its first sample loses
    all it held by then).
    """
    return _born_sum(selector, window, f"{window_start(window)} - 1", by)


def _born_sum(selector: str, window: str, start: str, by: str = "") -> str:
    """`sum [by (by)] (increase(selector[window]))`, a series whose `_created` is after `start`
    counted from 0: its last value, or its increase where larger (a reset after it began).
    `last_over_time` of `_created`: a canary pod gone before the query (past the 5-minute
    staleness delta) still counts whole."""
    metric, brace, matchers = selector.partition("{")
    created = metric.removesuffix("_total").removesuffix("_bucket") + "_created" + brace + matchers
    born = f"(last_over_time({created}[{window}]) > {start})"
    inc, last = f"increase({selector}[{window}])", f"last_over_time({selector}[{window}])"
    grouping = f" by ({by})" if by else ""
    return (f"sum{grouping} (\n  ({inc} unless ignoring (le) {born})\n"
            f"  or ((({inc} >= {last}) or {last}) and ignoring (le) {born})\n)")


def _counted(metric: str, model: str, version: str, window: str, by: str = "", **extra: str) -> str:
    """Events counted in the window, `_inc` but for series created within it too (the gate's counts).

    A sidecar creates a labelled series at its first event (the first 503, the first `disagree`,
    every series of a canary pod that just started), and `increase()` starts counting at the
    series' first *sample*: what that sample already holds is lost. A canary whose 20 errors all
    came between two scrapes showed `increase()` 0 errors of 420 and passed. A series whose
    `_created` timestamp (prometheus_client exports one per counter and histogram child) lies in
    the window counted from 0 within it: its events are its last value (or its increase where
    larger: a reset after it began). Decided by `_created`, not by a sample missing at the
    window's start, which a failed scrape or a Prometheus younger than the window also gives.
    Without `_created` series: `increase()` alone, as before. `window` must be a duration.
    """
    from sentinel.slo.durations import parse_duration

    return _born_sum(_v(metric, model, version, **extra), window, f"time() - {parse_duration(window):g}", by)


def presence(model: str, versions: str, window: str) -> dict[str, str]:
    """Which versions have series at all: model info and request counters, by version."""
    return {
        "model_info": f"count by ({VERSION_LABEL}) (last_over_time("
                      f"{_sel(mn.MODEL_INFO.sample_name, model=model, **{VERSION_LABEL: '~' + versions})}[{window}]))",
        "requests": f"count by ({VERSION_LABEL}) (last_over_time("
                    f"{_sel(mn.REQUESTS.sample_name, model=model, **{VERSION_LABEL: '~' + versions})}[{window}]))",
        # samples per series in the window: increase() needs two, so a window shorter than two scrapes has no data
        "scrapes": f"max by ({VERSION_LABEL}) (count_over_time("
                   f"{_sel(mn.REQUESTS.sample_name, model=model, **{VERSION_LABEL: '~' + versions})}[{window}]))",
        # `version=""` matches series without the label: sidecars scraped without a version target label
        "unlabelled_requests": f"count(last_over_time("
                               f"{_sel(mn.REQUESTS.sample_name, model=model, **{VERSION_LABEL: ''})}[{window}]))",
    }


# The gate's counts (`judge.fetch`) use `_counted`; the controller templates use `_inc`
# (`counted=False` where they share a function with the gate). Both count series created in the
# window from 0; `_counted` knows the window in seconds, `_inc` reads its start from the window.

def requests_by_code(model: str, version: str, window: str) -> str:
    return _counted(mn.REQUESTS.sample_name, model, version, window, "code")


def latency_buckets(model: str, version: str, window: str, counted: bool = False) -> str:
    if counted:
        return _counted(mn.REQUEST_DURATION.sample_name, model, version, window, "le")
    return _inc(_v(mn.REQUEST_DURATION.sample_name, model, version), window, "le")


def latency_bucket_series(model: str, version: str, window: str) -> str:
    """How many series (replica x protocol x code) of the version carry each bucket bound."""
    return f"count by (le) (increase({_v(mn.REQUEST_DURATION.sample_name, model, version)}[{window}]))"


def predictions_by_class(model: str, version: str, window: str, counted: bool = True) -> str:
    if counted:
        return _counted(mn.PREDICTIONS.sample_name, model, version, window, "class")
    return _inc(_v(mn.PREDICTIONS.sample_name, model, version), window, "class")


def agreement_by_result(model: str, version: str, window: str) -> str:
    return _counted(mn.REFERENCE_AGREEMENT.sample_name, model, version, window, "result",
                    source="~" + AGREEMENT_SOURCES)


def verdicts(model: str, version: str, window: str) -> str:
    return _counted(mn.ACCURACY_VERDICTS.sample_name, model, version, window, "verdict")


def estimate_reliable(model: str, version: str, window: str) -> str:
    """The smallest reliability flag any replica of the version reported in the window."""
    return f"min(min_over_time({_v(mn.ACCURACY_ESTIMATE_RELIABLE.name, model, version)}[{window}]))"


def atc_estimate(model: str, version: str, window: str) -> str:
    """The ATC accuracy estimate averaged over the window and the version's replicas (NaN dropped)."""
    return f"avg(avg_over_time(({_v(mn.ESTIMATED_ACCURACY.name, model, version, method='atc')} >= 0)[{window}:]))"


def drift_alarm_share(model: str, version: str, window: str) -> str:
    """Per detector, the largest share of the window any replica of the version spent alarming."""
    return f"max by (detector) (avg_over_time({_v(mn.DRIFT_ALARM.name, model, version)}[{window}]))"


def contract_checked(model: str, version: str, window: str, counted: bool = False) -> str:
    if counted:
        return _counted(mn.INPUT_CONTRACT_CHECKED.sample_name, model, version, window)
    return _inc(_v(mn.INPUT_CONTRACT_CHECKED.sample_name, model, version), window)


def contract_violating(model: str, version: str, window: str, counted: bool = False) -> str:
    if counted:
        return _counted(mn.INPUT_CONTRACT_VIOLATING.sample_name, model, version, window)
    return _inc(_v(mn.INPUT_CONTRACT_VIOLATING.sample_name, model, version), window)


def contract_by_check(model: str, version: str, window: str) -> str:
    return _counted(mn.INPUT_CONTRACT_VIOLATIONS.sample_name, model, version, window, "check")


def diagnosis(model: str, version: str) -> dict[str, str]:
    """The drift diagnosis the canary's replicas report now (kind and transform at value 1)."""
    return {"kind": f"max by (kind) ({_v(mn.DRIFT_DIAGNOSIS.name, model, version)}) == 1",
            "transform": f"max by (transform) ({_v(mn.DRIFT_DIAGNOSIS_TRANSFORM.name, model, version)}) == 1"}


# --- ratios, for controllers that judge one number per query (Argo, Flagger) -------------

def error_ratio(model: str, version: str, window: str) -> str:
    """Share of the version's requests whose code spends the availability budget (0 without errors)."""
    total = _inc(_v(mn.REQUESTS.sample_name, model, version), window)
    bad = _inc(_v(mn.REQUESTS.sample_name, model, version, code="~" + BAD_CODE_REGEX), window)
    return f"({bad} or 0 * {total}) / clamp_min({total}, 1)"


def client_error_ratio(model: str, version: str, window: str) -> str:
    """Share of the version's requests answered 4xx (no SLO budget spent, still compared between versions)."""
    total = _inc(_v(mn.REQUESTS.sample_name, model, version), window)
    refused = _inc(_v(mn.REQUESTS.sample_name, model, version, code="~" + CLIENT_CODE_REGEX), window)
    return f"({refused} or 0 * {total}) / clamp_min({total}, 1)"


def whole_latency_buckets(model: str, version: str, window: str) -> str:
    """The version's buckets summed over its replicas, at the bounds every one of its series has.

    Replicas may have different layouts (each sidecar adds its SLO file's latency thresholds as
    bounds); a bound only some export holds only their counts, so the plain sum is no histogram
    (`histogram_quantile` then "fixes" it into a wrong one). As `judge.fetch`.
    """
    carriers = latency_bucket_series(model, version, window)
    return f"(\n{latency_buckets(model, version, window)}\nand on (le) ({carriers} == scalar(max({carriers})))\n)"


def latency_quantile(q: float, model: str, version: str, window: str, other: str | None = None) -> str:
    """The version's latency quantile; with `other`, at only the bounds both versions have (as the gate)."""
    buckets = whole_latency_buckets(model, version, window)
    if other is not None:
        buckets = f"(\n{buckets}\nand on (le)\n{whole_latency_buckets(model, other, window)}\n)"
    return f"histogram_quantile({q}, {buckets})"


def latency_quantile_ratio(q: float, model: str, baseline: str, canary: str, window: str,
                           min_diff_s: float = 0.0) -> str:
    """Canary's latency quantile over the baseline's; 1 when the canary is slower by `min_diff_s` or less.

    The gate fails latency only when the ratio exceeds its tolerance *and* the canary is
    slower by more than `latency_min_diff_s`; a controller comparing the ratio alone would
    roll back a 1 ms model that became 2 ms.
    """
    qc = latency_quantile(q, model, canary, window, other=baseline)
    qb = latency_quantile(q, model, baseline, window, other=canary)
    ratio = f"{qc}\n/\nclamp_min({qb}, 1e-6)"
    if min_diff_s <= 0:
        return ratio
    return (f"(\n{ratio}\n)\nand on () (({qc}) - ({qb}) > {min_diff_s!r})\n"
            f"or on () (0 * (\n{ratio}\n) + 1)")


def agreement_ratio(model: str, version: str, window: str) -> str:
    total = _inc(_v(mn.REFERENCE_AGREEMENT.sample_name, model, version, source="~" + AGREEMENT_SOURCES), window)
    agree = _inc(_v(mn.REFERENCE_AGREEMENT.sample_name, model, version, source="~" + AGREEMENT_SOURCES,
                    result="agree"), window)
    return f"({agree} or 0 * {total}) / clamp_min({total}, 1)"


def accuracy_lower_bound(model: str, version: str, window: str) -> str:
    total = _inc(_v(mn.ACCURACY_VERDICTS.sample_name, model, version), window)
    good = _inc(_v(mn.ACCURACY_VERDICTS.sample_name, model, version, verdict="likely_correct"), window)
    return f"({good} or 0 * {total}) / clamp_min({total}, 1)"


def request_count(model: str, version: str, window: str) -> str:
    return _inc(_v(mn.REQUESTS.sample_name, model, version), window)


# --- canary against baseline, one number each (the controller templates) ----------------

def error_ratio_increase(model: str, baseline: str, canary: str, window: str) -> str:
    """Canary's error ratio minus the baseline's (negative when the canary errs less)."""
    return f"(\n{error_ratio(model, canary, window)}\n)\n-\n(\n{error_ratio(model, baseline, window)}\n)"


def client_error_increase(model: str, baseline: str, canary: str, window: str) -> str:
    """Canary's 4xx ratio minus the baseline's."""
    return (f"(\n{client_error_ratio(model, canary, window)}\n)\n-\n"
            f"(\n{client_error_ratio(model, baseline, window)}\n)")


def agreement_drop(model: str, baseline: str, canary: str, window: str) -> str:
    """Baseline's agreement with the reference minus the canary's."""
    return f"(\n{agreement_ratio(model, baseline, window)}\n)\n-\n(\n{agreement_ratio(model, canary, window)}\n)"


def accuracy_drop(model: str, baseline: str, canary: str, window: str) -> str:
    """Baseline's accuracy lower bound minus the canary's (verdicts of issue 11)."""
    return (f"(\n{accuracy_lower_bound(model, baseline, window)}\n)\n-\n"
            f"(\n{accuracy_lower_bound(model, canary, window)}\n)")


def atc_drop(model: str, baseline: str, canary: str, window: str) -> str:
    """Baseline's ATC accuracy estimate minus the canary's."""
    return f"{atc_estimate(model, baseline, window)}\n-\n{atc_estimate(model, canary, window)}"


def _class_shares(model: str, version: str, window: str) -> str:
    return (f"{predictions_by_class(model, version, window, counted=False)}\n/ scalar(clamp_min("
            f"{_inc(_v(mn.PREDICTIONS.sample_name, model, version), window)}, 1))")


def prediction_shift(model: str, baseline: str, canary: str, window: str) -> str:
    """Cramér's V between the versions' predicted classes at an equal split, less what chance alone gives.

    The gate's effect size (`stats.homogeneity(...).balanced_v`): with class shares b_i and
    c_i, V^2 = 1/2 sum (c_i - b_i)^2 / (c_i + b_i); a class only one version predicted counts
    with its whole share (the `or` arms). A controller has no significance test, so the
    value between two identical versions at n_b and n_c predictions,
    E[V^2] ~ (k - 1)(1/n_b + 1/n_c)/4 for k classes (0.098^2 at 470 each over 10 classes,
    against a threshold of 0.1), is subtracted from V^2 (floored at 0): an identical canary
    reads about 0, a real shift keeps its size once the counts are large.
    """
    c, b = _class_shares(model, canary, window), _class_shares(model, baseline, window)
    n_c = _inc(_v(mn.PREDICTIONS.sample_name, model, canary), window)
    n_b = _inc(_v(mn.PREDICTIONS.sample_name, model, baseline), window)
    v2 = (f"0.5 * sum(\n  (({c}) - ({b})) ^ 2 / clamp_min(({c}) + ({b}), 1e-12)\n"
          f"  or ({c})\n  or ({b})\n)")
    chance = f"(count(\n  ({c})\n  or ({b})\n) - 1)\n* (1 / clamp_min({n_b}, 1) + 1 / clamp_min({n_c}, 1)) / 4"
    return f"sqrt(clamp_min(\n{v2}\n- on ()\n{chance}\n, 0))"


def canary_drift_share(model: str, canary: str, window: str) -> str:
    """Share of the window the canary's combined drift alarm was up (worst replica)."""
    return f"max(avg_over_time({_v(mn.DRIFT_ALARM.name, model, canary, detector=COMBINED_DETECTOR)}[{window}]))"


def canary_contract_ratio(model: str, canary: str, window: str) -> str:
    """Canary's share of sampled inputs violating the input contract."""
    return f"{contract_violating(model, canary, window)}\n/ clamp_min({contract_checked(model, canary, window)}, 1)"


def drift_share_beyond_baseline(model: str, baseline: str, canary: str, window: str, max_share: float) -> str:
    """The canary's drift alarm share; 0 when the baseline's alarm was up more than `max_share` too.

    Both see the same traffic: a baseline alarming as long says the traffic drifted (as the gate).
    """
    c, b = canary_drift_share(model, canary, window), canary_drift_share(model, baseline, window)
    return f"(\n{c}\nunless on () ({b} > {max_share!r})\n)\nor on () (0 * {c})"


def contract_ratio_beyond_baseline(model: str, baseline: str, canary: str, window: str, max_ratio: float,
                                   min_checked: int) -> str:
    """The canary's contract-violation ratio; its excess over the baseline's when the baseline's
    inputs (checked at least `min_checked` times) violate beyond `max_ratio` too (as the gate)."""
    c, b = canary_contract_ratio(model, canary, window), canary_contract_ratio(model, baseline, window)
    base_bad = f"(({b}) > {max_ratio!r}) and on () ({contract_checked(model, baseline, window)} >= {min_checked})"
    return f"(\n{c}\nunless on () ({base_bad})\n)\nor on () (\n({c})\n- on ()\n({b})\n)"

"""Each criterion and the overall verdict on literal counts: pass, fail with numbers, inconclusive, skipped."""

from __future__ import annotations

import math

import pytest

from sentinel.gate import criteria, stats
from sentinel.gate.criteria import Verdict, VersionData
from sentinel.gate.judge import TESTED_CRITERIA, GateReport, judge
from sentinel.gate.report import as_dict, text, to_json
from sentinel.gate.settings import GateSettings

pytestmark = pytest.mark.unit

S = GateSettings()
ALPHA = S.alpha / TESTED_CRITERIA
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, math.inf)


def hist(counts: list[float]) -> dict[float, float]:
    """Cumulative buckets from per-bucket counts."""
    out, acc = {}, 0.0
    for le, c in zip(BUCKETS, counts, strict=True):
        acc += c
        out[le] = acc
    return out


FAST = hist([300, 150, 40, 10, 0, 0, 0])
SLOW = hist([0, 0, 0, 20, 300, 180, 0])
CLASSES = {str(k): 50.0 for k in range(10)}
SKEWED = {**{str(k): 50.0 for k in range(10)}, "1": 150.0, "8": 5.0, "9": 5.0}


def version(**kw) -> VersionData:
    base = dict(codes={"200": 500.0}, buckets=FAST, classes=CLASSES, agreement={"agree": 495.0, "disagree": 5.0},
                verdicts={"likely_correct": 480.0, "likely_wrong": 10.0, "unknown": 10.0}, reliable=1.0,
                drift={"combined": 0.0, "bbsd": 0.0})
    base.update(kw)
    return VersionData(**base)


def test_identical_versions_pass_every_criterion():
    results = judge(version(), version(), S, 0.001)
    assert [c.verdict for c in results if c.name != "input_contract"] == [Verdict.PASS] * 6
    assert results[-1].verdict == Verdict.SKIPPED   # no contract series


def test_error_ratio_fails_against_baseline_and_budget_and_names_numbers():
    c = criteria.error_ratio(version(), version(codes={"200": 470.0, "503": 30.0}), S, ALPHA, 0.001, "5..")
    assert c.verdict == Verdict.FAIL
    assert c.canary == pytest.approx(0.06) and c.baseline == 0
    assert "0.0600 (30/500)" in c.summary and "above the SLO budget" in c.summary
    # 4xx are the client's: not errors under the SLO's bad-code rule (same share on both versions)
    ok = criteria.error_ratio(version(codes={"200": 470.0, "404": 30.0}), version(codes={"200": 470.0, "404": 30.0}),
                              S, ALPHA, 0.001, "5..")
    assert ok.verdict == Verdict.PASS and "above the SLO budget" not in ok.summary
    # a code that a newer proxy uses for cut responses counts when the rule says so
    cut = criteria.error_ratio(version(), version(codes={"200": 470.0, "599": 30.0}), S, ALPHA, 0.001, "5..")
    assert cut.verdict == Verdict.FAIL


def test_canary_refusing_requests_the_baseline_serves_fails_on_client_errors():
    # same traffic: the canary answers 400/404 where the baseline answers 200 (a changed input
    # contract, a missing route). No 5xx, so the SLO rule alone would pass it.
    for refused in ({"400": 500.0}, {"200": 470.0, "404": 30.0}):
        c = criteria.error_ratio(version(), version(codes=refused), S, ALPHA, 0.001, "5..")
        assert c.verdict == Verdict.FAIL, c.summary
        assert "client errors (4xx)" in c.summary and "higher than baseline" in c.summary
        assert "above the SLO budget" not in c.summary
    # a few more 4xx than the baseline, within max_client_error_increase, is not a failure
    few = criteria.error_ratio(version(codes={"200": 4950.0, "400": 50.0}), version(codes={"200": 4920.0, "400": 80.0}),
                               S, ALPHA, 0.001, "5..")
    assert few.verdict == Verdict.PASS, few.summary


def test_a_canary_better_than_a_baseline_over_budget_is_not_failed_on_the_budget():
    # baseline 0.5% errors, canary 0.3%, budget 0.1%: both above the budget; the canary is the fix
    base = version(codes={"200": 9950.0, "503": 50.0})
    r = criteria.error_ratio(base, version(codes={"200": 9970.0, "503": 30.0}), S, ALPHA, 0.001, "5..")
    assert r.verdict == Verdict.PASS and "baseline is above the SLO budget too" in r.summary, r.summary
    # still failed when clearly worse than that baseline
    r = criteria.error_ratio(base, version(codes={"200": 9800.0, "503": 200.0}), S, ALPHA, 0.001, "5..")
    assert r.verdict == Verdict.FAIL and "higher than baseline" in r.summary, r.summary
    # and a canary over budget against a baseline within it still fails on the budget
    r = criteria.error_ratio(version(codes={"200": 10000.0}), version(codes={"200": 9970.0, "503": 30.0}), S,
                             ALPHA, 0.001, "5..")
    assert r.verdict == Verdict.FAIL and "above the SLO budget" in r.summary, r.summary


def test_one_error_in_five_hundred_is_not_proof_of_a_budget_breach():
    c = criteria.error_ratio(version(), version(codes={"200": 499.0, "500": 1.0}), S, ALPHA, 0.001, "5..")
    assert c.verdict == Verdict.PASS


def test_latency_fails_on_slower_quantiles_and_passes_on_same_distribution():
    slow = criteria.latency(version(), version(buckets=SLOW), S, ALPHA)
    assert slow.verdict == Verdict.FAIL and "P95" in slow.summary and "P99" in slow.summary
    assert slow.effect > S.latency_tolerance
    assert criteria.latency(version(), version(), S, ALPHA).verdict == Verdict.PASS


def test_latency_difference_below_the_minimum_is_not_a_failure():
    # significant (many samples) but only ~3 ms slower at the tail: within latency_min_diff_s
    a = hist([3000, 1500, 400, 100, 0, 0, 0])
    b = hist([2500, 1800, 550, 150, 0, 0, 0])
    c = criteria.latency(version(buckets=a), version(buckets=b), S, ALPHA)
    assert c.p_value < ALPHA and c.verdict == Verdict.PASS


def test_latency_compares_different_bucket_layouts_only_at_shared_bounds():
    # same latencies (all between 50 and 100 ms); the canary's sidecar has extra bounds.
    # A missing bound is not a count of 0: compared on the shared bounds, nothing differs.
    base = {0.05: 0.0, 0.1: 1000.0, 0.4: 1000.0, math.inf: 1000.0}
    finer = {0.05: 0.0, 0.06: 400.0, 0.075: 700.0, 0.1: 1000.0, 0.2: 1000.0, 0.4: 1000.0, math.inf: 1000.0}
    r = criteria.latency(version(codes={"200": 1000.0}, buckets=base),
                         version(codes={"200": 1000.0}, buckets=finer), S, ALPHA)
    assert r.verdict == Verdict.PASS, r.summary
    assert "bucket layouts differ" in r.summary and r.effect == pytest.approx(1.0)
    # still fails a really slower canary with its own layout
    slow = {0.05: 0.0, 0.1: 0.0, 0.2: 900.0, 0.4: 1000.0, math.inf: 1000.0}
    r = criteria.latency(version(codes={"200": 1000.0}, buckets=base),
                         version(codes={"200": 1000.0}, buckets=slow), S, ALPHA)
    assert r.verdict == Verdict.FAIL, r.summary


def test_latency_beyond_the_highest_bound_is_not_a_pass_on_the_bound():
    # baseline P95/P99 at 8-10 s, canary all in +Inf (> 10 s): its quantiles read as "10 s",
    # x1.0-1.2, which is a lower bound, not a measurement
    base = {1.0: 0.0, 5.0: 0.0, 10.0: 1000.0, math.inf: 1000.0}
    canary = {1.0: 0.0, 5.0: 0.0, 10.0: 0.0, math.inf: 1000.0}
    r = criteria.latency(version(codes={"200": 1000.0}, buckets=base),
                         version(codes={"200": 1000.0}, buckets=canary), S, ALPHA)
    assert r.verdict == Verdict.INCONCLUSIVE, r.summary
    assert "above the highest shared bucket bound (10000 ms)" in r.summary and "P95 >10000.0 ms" in r.summary
    # both beyond the top bound: nothing to tell them apart, not inconclusive on that account
    same = criteria.latency(version(codes={"200": 1000.0}, buckets=canary),
                            version(codes={"200": 1000.0}, buckets=canary), S, ALPHA)
    assert same.verdict == Verdict.PASS


def test_latency_without_a_shared_finite_bucket_is_inconclusive_not_pass():
    only_inf = {math.inf: 1000.0}
    r = criteria.latency(version(buckets=only_inf), version(buckets=only_inf), S, ALPHA)
    assert r.verdict == Verdict.INCONCLUSIVE and "no finite bucket bound" in r.summary
    disjoint = criteria.latency(version(buckets={0.1: 900.0, math.inf: 1000.0}),
                                version(buckets={0.05: 0.0, 0.2: 1000.0, math.inf: 1000.0}), S, ALPHA)
    assert disjoint.verdict == Verdict.INCONCLUSIVE, disjoint.summary
    assert "baseline: 0.1, inf" in disjoint.summary and "canary: 0.05, 0.2, inf" in disjoint.summary


def test_latency_histogram_without_the_inf_bucket_is_inconclusive_not_pass():
    # a relabelling dropped le="+Inf": the canary's slowest tenth (above 1 s) is in no bucket
    base = {0.1: 9000.0, 0.25: 10000.0, 1.0: 10000.0, math.inf: 10000.0}
    canary = {0.1: 8100.0, 0.25: 9000.0, 1.0: 9000.0}
    r = criteria.latency(version(buckets=base), version(buckets=canary), S, ALPHA)
    assert r.verdict == Verdict.INCONCLUSIVE, r.summary
    assert "canary's (top bound 1000 ms)" in r.summary and 'le="+Inf"' in r.summary and "baseline" not in r.summary
    both = criteria.latency(version(buckets=canary), version(buckets=canary), S, ALPHA)
    assert both.verdict == Verdict.INCONCLUSIVE and "baseline's" in both.summary and "canary's" in both.summary


def test_prediction_distribution_fails_with_effect_size():
    c = criteria.prediction_distribution(version(), version(classes=SKEWED), S, ALPHA)
    assert c.verdict == Verdict.FAIL and c.effect > S.max_cramers_v
    assert "class 1" in c.summary


def test_prediction_shift_of_a_one_percent_canary_is_judged_by_a_split_free_effect_size():
    # 1% canary that never predicts class 3 (10% of the baseline's answers): plain Cramér's V
    # is ~0.03 at a 200:20000 split, under 0.1 whatever the canary does
    base = {str(k): 2000.0 for k in range(10)}
    never3 = {**{str(k): 22.0 for k in range(10)}, "3": 0.0, "4": 24.0}
    r = criteria.prediction_distribution(version(classes=base), version(classes=never3), S, ALPHA)
    assert r.verdict == Verdict.FAIL, r.summary
    assert r.effect > S.max_cramers_v and "at equal traffic" in r.summary
    # a class the baseline never predicts, 10% of a 1% canary's answers: the chi-square has to
    # merge it into a neighbour (p 0.04, not significant); the per-class exact test is not fooled
    new_class = {**{str(k): 18.0 for k in range(10)}, "10": 20.0}
    r = criteria.prediction_distribution(version(classes=base), version(classes=new_class), S, ALPHA)
    assert r.verdict == Verdict.FAIL and "(class 10)" in r.summary, r.summary
    # the same distribution at 1% is not a shift; nor is it at 50%
    same = {k: v / 100 for k, v in base.items()}
    assert criteria.prediction_distribution(version(classes=base), version(classes=same), S, ALPHA).verdict \
        == Verdict.PASS
    # at an equal split the effect is the plain Cramér's V (thresholds keep their meaning)
    r = criteria.prediction_distribution(version(), version(classes=SKEWED), S, ALPHA)
    assert r.effect == pytest.approx(stats.homogeneity(list(CLASSES.values()), list(SKEWED.values())).balanced_v)


def test_agreement_and_accuracy_drop():
    worse = version(agreement={"agree": 390.0, "disagree": 110.0},
                    verdicts={"likely_correct": 300.0, "likely_wrong": 150.0, "unknown": 50.0})
    assert criteria.reference_agreement(version(), worse, S, ALPHA).verdict == Verdict.FAIL
    acc = criteria.accuracy(version(), worse, S, ALPHA, 500, 500)
    assert acc.verdict == Verdict.FAIL and acc.canary == pytest.approx(0.6)


def test_unreliable_accuracy_estimate_is_inconclusive():
    c = criteria.accuracy(version(), version(reliable=0.0), S, ALPHA, 500, 500)
    assert c.verdict == Verdict.INCONCLUSIVE and "canary" in c.summary


def test_unreliable_atc_estimate_is_inconclusive_not_pass():
    # no verdicts exported: the ATC branch must honour the reliability flag too
    b, c = version(verdicts={}, atc=0.9), version(verdicts={}, atc=0.9, reliable=0.0)
    r = criteria.accuracy(b, c, S, ALPHA, 500, 500)
    assert r.verdict == Verdict.INCONCLUSIVE and "canary" in r.summary and "unreliable" in r.summary


def test_accuracy_falls_back_to_the_atc_estimate_without_verdicts():
    b, c = version(verdicts={}, atc=0.95), version(verdicts={}, atc=0.40)
    r = criteria.accuracy(b, c, S, ALPHA, 500, 500)
    assert r.verdict == Verdict.FAIL and "ATC" in r.summary
    assert criteria.accuracy(version(verdicts={}), version(verdicts={}), S, ALPHA, 500, 500).verdict == Verdict.SKIPPED


def test_too_few_samples_is_inconclusive_never_pass():
    few = version(codes={"200": 20.0}, buckets=hist([10, 10, 0, 0, 0, 0, 0]), classes={"1": 20.0},
                  agreement={"agree": 20.0}, verdicts={"likely_correct": 20.0})
    results = judge(version(), few, S, 0.001)
    by = {c.name: c for c in results}
    for name in ("error_ratio", "latency", "prediction_distribution", "accuracy", "reference_agreement"):
        assert by[name].verdict == Verdict.INCONCLUSIVE, name
        assert "need" in by[name].summary
    report = GateReport("http://p", "digits", "v3", "v4", "10m", 0.0, S.alpha, results)
    assert report.verdict == Verdict.INCONCLUSIVE and report.exit_code == 3


def test_drift_and_contract_judge_the_canary_only():
    drifting = version(drift={"combined": 0.8, "bbsd": 0.9}, diagnosis_kind=("covariate",),
                       diagnosis_transform=("blur",))
    d = criteria.drift(drifting, S)
    assert d.verdict == Verdict.FAIL and "80%" in d.summary and "blur" in d.summary and "bbsd" in d.summary
    bad = version(contract_checked=500.0, contract_violating=60.0, contract_by_check={"range": 60.0})
    k = criteria.input_contract(bad, S, ALPHA)
    assert k.verdict == Verdict.FAIL and "range 60" in k.summary
    ok = version(contract_checked=500.0, contract_violating=2.0)
    assert criteria.input_contract(ok, S, ALPHA).verdict == Verdict.PASS


def test_drift_and_contract_violations_the_baseline_shares_are_the_traffics_not_the_canarys():
    # the inputs shifted for everyone: the baseline alarmed 90% of the window, the canary 80%
    drifting = version(drift={"combined": 0.8})
    d = criteria.drift(drifting, S, version(drift={"combined": 0.9}))
    assert d.verdict == Verdict.PASS and "baseline's was up 90%" in d.summary and "traffic drifted" in d.summary
    assert criteria.drift(drifting, S, version(drift={"combined": 0.1})).verdict == Verdict.FAIL
    # clients send 12% malformed inputs to both versions
    base = version(contract_checked=500.0, contract_violating=60.0)
    same = version(contract_checked=500.0, contract_violating=62.0)
    k = criteria.input_contract(same, S, ALPHA, base)
    assert k.verdict == Verdict.PASS and "traffic breaks the contract" in k.summary and "60/500" in k.summary
    worse = version(contract_checked=500.0, contract_violating=150.0)   # the canary's contract rejects more
    assert criteria.input_contract(worse, S, ALPHA, base).verdict == Verdict.FAIL
    clean = version(contract_checked=500.0, contract_violating=0.0)
    assert criteria.input_contract(same, S, ALPHA, clean).verdict == Verdict.FAIL
    by = {r.name: r for r in judge(base, same, S, 0.001)}
    assert by["input_contract"].verdict == Verdict.PASS


def test_failure_outranks_inconclusive_and_reports_render():
    results = judge(version(), version(classes=SKEWED, codes={"200": 20.0}), S, 0.001)
    report = GateReport("http://p", "digits", "v3", "v4", "10m", 1_700_000_000.0, S.alpha, results)
    assert report.verdict == Verdict.FAIL and report.exit_code == 1
    out = text(report)
    assert out.splitlines()[1] == "FAIL: prediction_distribution"
    assert "INCONCLUSIVE" in out and "2023-11-14 22:13:20 UTC" in out
    data = as_dict(report)
    assert data["failed"] == ["prediction_distribution"] and data["exit_code"] == 1
    assert to_json(report)   # no NaN reaches JSON


def test_inconclusive_headline_names_criteria_more_traffic_will_not_settle():
    only_inf = {math.inf: 500.0}
    results = judge(version(buckets=only_inf), version(buckets=only_inf), S, 0.001)
    report = GateReport("http://p", "digits", "v3", "v4", "10m", 1_700_000_000.0, S.alpha, results)
    assert report.exit_code == 3
    head = text(report).splitlines()[1]
    assert head.startswith("INCONCLUSIVE: latency could not be judged") and "send more traffic" not in head
    few = judge(version(), version(codes={"200": 20.0}, buckets=hist([10, 10, 0, 0, 0, 0, 0])), S, 0.001)
    report = GateReport("http://p", "digits", "v3", "v4", "10m", 1_700_000_000.0, S.alpha, few)
    assert "send more traffic" in text(report).splitlines()[1]


def test_a_pass_on_answers_prometheus_warned_about_is_inconclusive():
    results = judge(version(), version(), S, 0.001)
    clean = GateReport("http://p", "digits", "v3", "v4", "10m", 1_700_000_000.0, S.alpha, results)
    assert clean.exit_code == 0
    # a Thanos querier with a store down answers "success" with a warning: the counts miss replicas
    partial = GateReport("http://p", "digits", "v3", "v4", "10m", 1_700_000_000.0, S.alpha, results,
                         ("No StoreAPIs matched for this query",))
    assert partial.verdict == Verdict.INCONCLUSIVE and partial.exit_code == 3
    out = text(partial)
    assert out.splitlines()[1].startswith("INCONCLUSIVE: Prometheus warned that its answers may be incomplete")
    assert "  Prometheus warning: No StoreAPIs matched for this query" in out
    assert as_dict(partial)["warnings"] == ["No StoreAPIs matched for this query"]
    failing = judge(version(), version(classes=SKEWED), S, 0.001)
    assert GateReport("http://p", "digits", "v3", "v4", "10m", 0.0, S.alpha, failing, ("x",)).exit_code == 1

"""The latency criterion's exact tail test: a slow tail of a handful of requests, which the chi-square merges away."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from sentinel.gate import criteria, stats
from sentinel.gate.criteria import Verdict, VersionData
from sentinel.gate.judge import TESTED_CRITERIA
from sentinel.gate.settings import GateSettings
from sentinel.metricnames import DEFAULT_LATENCY_BUCKETS

pytestmark = pytest.mark.unit

S = GateSettings()
ALPHA = S.alpha / TESTED_CRITERIA
BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, math.inf)


def tail(n: int, k: int, slow: bool) -> dict[float, float]:
    """n requests: half under 50 ms, the rest under 100 ms but the k slowest, which take
    100-250 ms (slow=False) or 10x that, 1-2.5 s (slow=True)."""
    counts = [n / 2, n / 2 - k, 0 if slow else k, 0, 0, k if slow else 0, 0]
    return dict(zip(BOUNDS, np.cumsum(counts).tolist(), strict=True))


def judge(base: dict[float, float], canary: dict[float, float]) -> criteria.Criterion:
    return criteria.latency(VersionData(buckets=base), VersionData(buckets=canary), S, ALPHA)


def test_a_tail_ten_times_slower_in_six_of_300_canary_requests_fails():
    # a 10% canary: its 6 slowest requests take 1-2.5 s, the baseline's 54 slowest of 2,700 100-250 ms.
    # The chi-square merged the sparse tail buckets and passed this at p=1.
    r = judge(tail(2700, 54, False), tail(300, 6, True))
    assert r.verdict == Verdict.FAIL, r.summary
    assert "P99 1750.0 ms vs 175.0 ms (x10.00)" in r.summary and "P99 slower than x1.25" in r.summary
    assert "tail above 1000 ms: canary 6/300 vs baseline 0/2700" in r.summary
    assert r.p_value < ALPHA
    # at an equal split 9 slow canary requests against none are significant as well
    assert judge(tail(300, 9, False), tail(300, 9, True)).verdict == Verdict.FAIL


def test_six_slow_of_300_at_an_equal_split_is_inconclusive_not_a_pass():
    # 6 of 300 against 0 of 300: all six slowest of 600 requests land on the canary by chance
    # 1.5% of the time, which no test can call significant at alpha / criteria. Not a pass either.
    r = judge(tail(300, 6, False), tail(300, 6, True))
    assert r.verdict == Verdict.INCONCLUSIVE, r.summary
    assert "P99 looks slower than x1.25" in r.summary and "too few slow requests to tell" in r.summary


def test_two_slow_of_300_is_a_pass():
    # 2 of 300 do not reach the P99 (the 3 slowest): the quantiles the criterion holds to its
    # tolerance are unchanged, and 2 against 0 happens by chance a quarter of the time
    r = judge(tail(300, 2, False), tail(300, 2, True))
    assert r.verdict == Verdict.PASS, r.summary
    assert "x1.00" in r.summary and "canary 2/300 vs baseline 0/300" in r.summary


def test_a_canary_faster_in_the_tail_passes():
    r = judge(tail(2700, 54, True), tail(300, 6, False))
    assert r.verdict == Verdict.PASS, r.summary
    assert "P99 175.0 ms vs 1750.0 ms (x0.10)" in r.summary and r.p_value == 1.0


def test_a_slow_tail_in_another_bucket_layout_or_beyond_the_top_bound_still_fails():
    # the canary's sidecar has an extra bound (an SLO threshold): compared on the shared ones
    finer = tail(300, 6, True)
    finer[0.3] = finer[0.25]
    assert judge(tail(2700, 54, False), finer).verdict == Verdict.FAIL
    # 6 canary requests slower than the top finite bound (+Inf only): counted above it
    base = {0.05: 1350.0, 0.1: 2640.0, 0.25: 2700.0, 2.5: 2700.0, math.inf: 2700.0}
    over = {0.05: 150.0, 0.1: 294.0, 0.25: 294.0, 2.5: 294.0, math.inf: 300.0}
    t = stats.tail_shift(base, over)
    assert (t.bound, t.above_b, t.above_c) == (2.5, 0, 6) and t.p_value < 1e-5
    assert judge(base, over).verdict != Verdict.PASS


def test_tail_shift_counts_only_distinct_tables_with_a_request_above():
    base = {0.1: 90.0, 0.2: 99.0, 0.3: 100.0, 0.4: 100.0, 0.5: 100.0, math.inf: 100.0}
    same = stats.tail_shift(base, base)
    # 0.1 (10 above each) and 0.2 (1 above each) are tested; 0.3-0.5 have no request above
    assert same.tested == 2 and same.p_value == 1.0
    canary = {0.1: 90.0, 0.2: 90.0, 0.3: 90.0, 0.4: 90.0, 0.5: 100.0, math.inf: 100.0}
    t = stats.tail_shift(base, canary)
    # 0.2, 0.3 and 0.4 share the table (baseline 1 or 0 above, canary 10): 0.1, {0.2}, {0.3, 0.4}
    assert t.tested == 3 and t.bound == 0.4 and (t.above_b, t.above_c) == (0, 10)
    from scipy.stats import fisher_exact

    one = fisher_exact([[10, 90], [0, 100]], alternative="greater").pvalue
    assert t.p_value == pytest.approx(3 * one)
    with pytest.raises(ValueError, match="share their bounds"):
        stats.tail_shift(base, {0.1: 1.0, math.inf: 1.0})


def test_same_latency_distribution_passes_at_least_95_percent_of_seeded_draws():
    # calibration: both versions drawn from one distribution (a lognormal, and one with a 1% tail
    # 10x slower), 300-2,000 requests each, 200 seeded draws on sentinel's default buckets
    from scipy.stats import lognorm

    bounds = np.array((*DEFAULT_LATENCY_BUCKETS, math.inf))
    rng = np.random.default_rng(20261204)
    for slow_share in (0.0, 0.01):
        cdf = (1 - slow_share) * lognorm.cdf(bounds, 1.0, scale=0.02) + slow_share * lognorm.cdf(bounds, 1.0, scale=0.2)
        p = np.diff(np.concatenate([[0.0], cdf]))
        n_b, n_c = rng.integers(300, 2001, 200), rng.integers(300, 2001, 200)
        cum_b = rng.multinomial(n_b, p / p.sum()).cumsum(axis=1).astype(float)
        cum_c = rng.multinomial(n_c, p / p.sum()).cumsum(axis=1).astype(float)
        verdicts = Counter(
            judge(dict(zip(bounds.tolist(), b.tolist(), strict=True)),
                  dict(zip(bounds.tolist(), c.tolist(), strict=True))).verdict
            for b, c in zip(cum_b, cum_c, strict=True))
        assert verdicts[Verdict.PASS] >= 190, (slow_share, verdicts)
        assert verdicts[Verdict.FAIL] <= 4, (slow_share, verdicts)


def test_a_thin_tail_above_the_top_bound_is_inconclusive_like_a_thin_slower_one():
    # the canary's 6 slowest of 300 lie above 2.5 s (+Inf), the baseline's P99 just below the
    # top bound (2-2.5 s): "x1.11" is only a lower bound; 6 against 0 is suggestive, not significant
    base = {0.05: 150.0, 0.1: 294.0, 2.0: 294.0, 2.5: 300.0, math.inf: 300.0}
    canary = {0.05: 150.0, 0.1: 294.0, 2.0: 294.0, 2.5: 294.0, math.inf: 300.0}
    r = judge(base, canary)
    assert r.verdict == Verdict.INCONCLUSIVE, r.summary
    assert "P99 >2500.0 ms vs 2250.0 ms (x>1.11)" in r.summary and "P99 looks slower, but the tail test" in r.summary


def test_a_slower_looking_p99_on_a_tail_the_test_could_judge_is_a_pass_not_inconclusive():
    # dozens of requests above 300 ms (25 of 451 vs 11 of 483, p=0.007: a replica under more
    # load): the test could have rejected at the criterion's alpha and did not, so its answer stands
    base = {0.1: 300.0, 0.3: 472.0, 1.0: 483.0, math.inf: 483.0}
    canary = {0.1: 280.0, 0.3: 426.0, 1.0: 451.0, math.inf: 451.0}
    r = judge(base, canary)
    assert r.verdict == Verdict.PASS, r.summary
    assert "P95 368.6 ms vs 284.7 ms (x1.29)" in r.summary and ALPHA / 2 < stats.tail_shift(base, canary).p_value < S.alpha

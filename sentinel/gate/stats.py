"""The statistical tests of `sentinel gate`: counts in, a test result out; no I/O.

Every test here compares two independent samples of counts taken over the same window:
the baseline version's and the canary's. All tests are one scipy call or a few lines of
arithmetic; their settings (alpha, effect sizes) live in `sentinel.gate.settings`.

* `two_proportions`: pooled two-proportion z-test (one-sided: is the canary's rate of bad
  events higher?). Falls back to Fisher's exact test when an expected cell count is
  below 5, where the normal approximation is poor.
* `above_rate`: exact one-sided binomial test of "the canary's bad-event rate exceeds a
  fixed budget" (the SLO's 1 - objective).
* `homogeneity`: Pearson's chi-square test of homogeneity on a 2 x k table (predicted
  classes, latency buckets), after merging adjacent sparse columns so every expected
  count is at least 5 (Cochran's rule); effect size Cramér's V = sqrt(chi2 / n), and the
  same V with both rows scaled to equal totals (`balanced_v`, independent of the split).
* `category_shift`: per-category 2 x 2 tests (Fisher's exact when sparse), Bonferroni-corrected:
  a class only one version predicts, which the chi-square's column merging would dilute.
* `quantile`: the quantile of a histogram from its bucket counts, interpolated linearly
  inside the bucket as Prometheus' `histogram_quantile` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Cochran's rule for the chi-square approximation: every expected count at least 5.
MIN_EXPECTED = 5.0


@dataclass(frozen=True)
class TestResult:
    """One test: its name, statistic and p-value (nan when no test could run)."""

    test: str
    statistic: float
    p_value: float


def two_proportions(bad_a: int, n_a: int, bad_b: int, n_b: int) -> TestResult:
    """One-sided test that sample b's rate of bad events is higher than sample a's."""
    if n_a <= 0 or n_b <= 0:
        return TestResult("none", math.nan, math.nan)
    pooled = (bad_a + bad_b) / (n_a + n_b)
    expected = (n_a * pooled, n_a * (1 - pooled), n_b * pooled, n_b * (1 - pooled))
    if min(expected) < MIN_EXPECTED:
        from scipy.stats import fisher_exact

        # rows: b, a; columns: bad, good. alternative "greater": b's odds of bad are higher.
        res = fisher_exact([[bad_b, n_b - bad_b], [bad_a, n_a - bad_a]], alternative="greater")
        return TestResult("fisher_exact", float(res.statistic), float(res.pvalue))
    from scipy.stats import norm

    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    z = (bad_b / n_b - bad_a / n_a) / se if se > 0 else 0.0
    return TestResult("two_proportion_z", z, float(norm.sf(z)))


def above_rate(bad: int, n: int, rate: float) -> TestResult:
    """Exact one-sided binomial test that the true bad-event rate exceeds `rate`."""
    if n <= 0:
        return TestResult("none", math.nan, math.nan)
    from scipy.stats import binomtest

    res = binomtest(int(bad), int(n), rate, alternative="greater")
    return TestResult("binomial", bad / n, float(res.pvalue))


@dataclass(frozen=True)
class Homogeneity:
    """A chi-square test of homogeneity and its effect size."""

    statistic: float
    p_value: float
    dof: int
    cramers_v: float
    columns: int   # after merging sparse columns
    # Cramér's V of the same two distributions with equal row totals: the effect size
    # without the traffic split in it (plain V of a 1% canary stays below ~0.1 even when
    # its distribution shares nothing with the baseline's). Equals cramers_v at a 50/50 split.
    balanced_v: float = 0.0


def homogeneity(a: Sequence[float], b: Sequence[float]) -> Homogeneity:
    """Chi-square test that two count vectors over the same categories share one distribution."""
    if len(a) != len(b):
        raise ValueError(f"count vectors differ in length: {len(a)} and {len(b)}")
    cols = _merge_sparse([float(x) for x in a], [float(x) for x in b])
    n = sum(x for c in cols for x in c)
    if len(cols) < 2 or n <= 0:
        return Homogeneity(0.0, 1.0, 0, 0.0, len(cols))
    balanced = _balanced_v(cols)
    from scipy.stats import chi2

    row_a = sum(c[0] for c in cols)
    row_b = sum(c[1] for c in cols)
    stat = 0.0
    for ca, cb in cols:
        col = ca + cb
        for obs, row in ((ca, row_a), (cb, row_b)):
            exp = row * col / n
            if exp > 0:
                stat += (obs - exp) ** 2 / exp
    dof = len(cols) - 1
    return Homogeneity(stat, float(chi2.sf(stat, dof)), dof, math.sqrt(stat / n), len(cols), balanced)


def _balanced_v(cols: list[tuple[float, float]]) -> float:
    """Cramér's V of a 2 x k table after scaling both rows to the same total.

    With row shares a_i and b_i, V^2 = sum (a_i - b_i)^2 / (2 (a_i + b_i)): 0 for identical
    distributions, 1 for disjoint ones, whatever the rows' sizes.
    """
    total_a = sum(c[0] for c in cols)
    total_b = sum(c[1] for c in cols)
    if total_a <= 0 or total_b <= 0:
        return 0.0
    v2 = 0.0
    for ca, cb in cols:
        sa, sb = ca / total_a, cb / total_b
        if sa + sb > 0:
            v2 += (sa - sb) ** 2 / (2 * (sa + sb))
    return math.sqrt(min(1.0, v2))


def category_shift(a: Sequence[int], b: Sequence[int]) -> tuple[int, float]:
    """The category whose share differs most significantly between a and b, and its p-value.

    One 2 x 2 test per category (that category against the rest; two-sided Fisher's exact
    test when an expected count is below 5, else the two-proportion z-test), Bonferroni-
    corrected over the categories. The chi-square test has to merge sparse columns first,
    which hides a class only one version predicts; this test needs no merging.
    """
    if len(a) != len(b):
        raise ValueError(f"count vectors differ in length: {len(a)} and {len(b)}")
    n_a, n_b = sum(a), sum(b)
    if n_a <= 0 or n_b <= 0 or len(a) < 2:
        return -1, 1.0
    from scipy.stats import fisher_exact, norm

    best, best_p = -1, 1.0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        pooled = (x + y) / (n_a + n_b)
        if min(n_a * pooled, n_a * (1 - pooled), n_b * pooled, n_b * (1 - pooled)) < MIN_EXPECTED:
            p = float(fisher_exact([[x, n_a - x], [y, n_b - y]]).pvalue)
        else:
            se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
            p = float(2 * norm.sf(abs(x / n_a - y / n_b) / se)) if se > 0 else 1.0
        if p < best_p:
            best, best_p = i, p
    return best, min(1.0, best_p * len(a))


def _merge_sparse(a: list[float], b: list[float]) -> list[tuple[float, float]]:
    """Merge adjacent columns (left to right, remainder into the last) until each expected count is >= 5."""
    total_a, total_b = sum(a), sum(b)
    n = total_a + total_b
    if n <= 0:
        return []
    share = min(total_a, total_b) / n
    cols: list[tuple[float, float]] = []
    acc_a = acc_b = 0.0
    for x, y in zip(a, b, strict=True):
        acc_a += x
        acc_b += y
        if (acc_a + acc_b) * share >= MIN_EXPECTED:
            cols.append((acc_a, acc_b))
            acc_a = acc_b = 0.0
    if acc_a or acc_b:
        if cols:
            last = cols.pop()
            cols.append((last[0] + acc_a, last[1] + acc_b))
        else:
            cols.append((acc_a, acc_b))
    return cols


def quantile(q: float, buckets: Mapping[float, float]) -> float:
    """The q-quantile of a cumulative histogram ({upper bound: cumulative count}, +Inf included).

    Linear interpolation inside the bucket that holds the rank, the lowest bucket starting
    at 0, as Prometheus' `histogram_quantile`; a rank in the +Inf bucket returns the
    highest finite bound. nan without observations.
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    total = buckets[bounds[-1]]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank and count > prev_count:
            if math.isinf(bound):
                return prev_bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = (bound if not math.isinf(bound) else prev_bound), count
    return prev_bound


def differences(cumulative: Mapping[float, float]) -> list[float]:
    """Per-bucket counts from cumulative ones (sorted by bound), negatives clamped to 0."""
    out, prev = [], 0.0
    for bound in sorted(cumulative):
        c = cumulative[bound]
        out.append(max(0.0, c - prev))
        prev = max(prev, c)
    return out


@dataclass(frozen=True)
class TailShift:
    """One-sided exact tests of "a larger share of the canary's requests lies above bound b"."""

    p_value: float        # the smallest p over the tested bounds, Bonferroni-corrected (1.0 when none)
    bound: float          # the bound of that p (nan when none was tested)
    above_b: int          # the baseline's requests above it
    above_c: int          # the canary's requests above it
    tested: int           # tests counted in the correction (distinct tables with a request above)
    # The smallest p that bound's table could give, corrected the same way (every request above
    # it the canary's): above the alpha it is held to, the test could not have rejected whatever
    # the split, and "not significant" says nothing (a handful of slow requests).
    attainable: float = 1.0


def tail_shift(cum_a: Mapping[float, float], cum_b: Mapping[float, float], tail_share: float = 0.9) -> TailShift:
    """Is sample b's upper tail heavier than a's? Exact tests at every bound of the pooled tail, nothing merged.

    Both mappings are cumulative histograms over the same bounds, +Inf included. The tested
    bounds are the finite ones from the lowest bound holding `tail_share` of the pooled
    requests up (chosen from the pooled counts, which the versions' labels do not change, so
    the choice costs the test no validity). At each, the 2 x 2 table (above / not above, by
    version) gets a one-sided Fisher exact test, i.e. the hypergeometric tail of b's count
    above given the pooled count above. A bound with no request above it cannot reject and
    is not counted, and bounds with the same table are one test: the minimum p is multiplied
    by the number of distinct tables left (Bonferroni). The chi-square test needs every expected
    count at least 5 and merges the sparse tail buckets into their neighbours; a tail shift of
    a handful of requests (P99 of 300 requests is the 3 slowest) is only visible this way.
    """
    bounds = sorted(cum_a)
    if not bounds or sorted(cum_b) != bounds:
        raise ValueError("the histograms must share their bounds")
    n_a, n_b = int(round(cum_a[bounds[-1]])), int(round(cum_b[bounds[-1]]))
    total = n_a + n_b
    none = TailShift(1.0, math.nan, 0, 0, 0)
    if n_a <= 0 or n_b <= 0:
        return none
    finite = [le for le in bounds if not math.isinf(le)]
    start = next((i for i, le in enumerate(finite) if cum_a[le] + cum_b[le] >= tail_share * total), len(finite))
    tables: dict[tuple[int, int], float] = {}
    for le in finite[start:]:
        above_a = max(0, n_a - int(round(cum_a[le])))
        above_b = max(0, n_b - int(round(cum_b[le])))
        if above_a + above_b > 0:
            tables[(above_a, above_b)] = le   # the highest bound of a table names it
    if not tables:
        return none
    from scipy.stats import hypergeom

    keys = list(tables)
    # P(b's count above >= observed | pooled count above, n_b drawn from the pooled requests)
    p = hypergeom.sf([k[1] - 1 for k in keys], total, [k[0] + k[1] for k in keys], n_b)
    i = min(range(len(keys)), key=lambda j: (float(p[j]), -tables[keys[j]]))
    above = keys[i][0] + keys[i][1]
    best = float(hypergeom.sf(min(above, n_b) - 1, total, above, n_b))
    return TailShift(min(1.0, float(p[i]) * len(keys)), tables[keys[i]], keys[i][0], keys[i][1], len(keys),
                     min(1.0, best * len(keys)))

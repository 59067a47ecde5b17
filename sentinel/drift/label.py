"""Label shift: chi-square test of homogeneity on predicted-class counts, sparse classes pooled."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from sentinel.drift.result import DetectorResult, abstain, decide
from sentinel.drift.univariate import MIN_SAMPLES

# Cochran's rule: the chi-square approximation needs every expected cell count ≥ 5.
MIN_EXPECTED = 5.0


def pool_sparse(table: np.ndarray, min_expected: float = MIN_EXPECTED) -> np.ndarray:
    """Merge the rarest classes of a 2×K count table until each pooled column's expected counts ≥ `min_expected`.

    Columns are visited from the smallest total up and accumulated into a bin until the
    bin's smallest expected cell (smaller row total × bin total / N) reaches the minimum;
    a remainder too small to stand alone joins the last bin. Classes seen in neither row
    are dropped.
    """
    t = np.asarray(table, dtype=np.float64)
    t = t[:, t.sum(axis=0) > 0]
    if t.shape[1] == 0:
        return t
    total = float(t.sum())
    r_min = float(t.sum(axis=1).min())
    t = t[:, np.argsort(t.sum(axis=0), kind="stable")]
    sizes = t.sum(axis=0).tolist()
    cum = np.cumsum(sizes).tolist()         # counts: every partial sum is an exact integer
    k = len(sizes)

    def enough(count: float) -> bool:
        return r_min * count / total >= min_expected

    # Bins are runs of the sorted columns; each closes at the first column that brings it to the
    # minimum (found by bisection on the cumulative counts, then checked with the rule itself).
    # Columns are sorted by size, so once one column is enough alone, every later one is a bin.
    starts: list[int] = []
    start, base = 0, 0.0
    guess = min_expected * total / r_min if r_min > 0 else math.inf
    while start < k:
        if enough(sizes[start]):
            starts.extend(range(start, k))
            start = k
            break
        end = max(start, bisect.bisect_left(cum, base + guess))
        while end > start and enough(cum[end - 1] - base):
            end -= 1
        while end < k and not enough(cum[end] - base):
            end += 1
        if end >= k:
            break                           # the remainder, too small to stand alone
        starts.append(start)
        start, base = end + 1, cum[end]
    if not starts:
        starts = [0]                        # no bin reached the minimum: everything is one bin
    # a remainder (columns from `start` on) joins the last bin: reduceat sums to the end
    return np.add.reduceat(t, starts, axis=1)


@dataclass(frozen=True)
class LabelShiftTest:
    """Chi-square test that window predicted classes follow the reference's class frequencies.

    A 2×K contingency test (scipy.stats.chi2_contingency, no Yates correction) rather than a
    goodness-of-fit test against fixed proportions, because the reference itself is a finite
    sample (the golden set) and its counts carry sampling error.
    """

    reference_counts: np.ndarray          # K counts of predicted classes in the reference
    alpha: float = 0.05                   # alarm when the p-value is below this
    min_samples: int = MIN_SAMPLES
    min_expected: float = MIN_EXPECTED
    name: str = "label"

    def test(self, predicted: np.ndarray) -> DetectorResult:
        """Test a window of predicted class indices (integers in [0, K))."""
        from scipy.stats import chi2_contingency

        ref = np.asarray(self.reference_counts, dtype=np.float64)
        k = len(ref)
        pred = np.asarray(predicted).astype(np.int64)
        n, m = int(ref.sum()), int(len(pred))
        if min(n, m) < self.min_samples:
            return abstain(self.name, self.alpha, n, m,
                           f"needs at least {self.min_samples} reference and window samples, has {n} and {m}")
        if pred.size and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"{self.name}: predicted classes must lie in [0, {k}), got {pred.min()}..{pred.max()}")
        table = pool_sparse(np.stack([ref, np.bincount(pred, minlength=k).astype(np.float64)]), self.min_expected)
        if table.shape[1] < 2:
            return abstain(self.name, self.alpha, n, m,
                           f"fewer than 2 class bins with expected count ≥ {self.min_expected:g} after pooling")
        res = chi2_contingency(table, correction=False)
        return decide(self.name, float(res.statistic), float(res.pvalue), self.alpha, n, m,
                      f"{table.shape[1]} bins")

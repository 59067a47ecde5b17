"""A log-linear latency histogram (HdrHistogram's layout), 3 significant digits from 1 µs.

Values are integer microseconds. The first 2,048 buckets are 1 µs wide; above that each
power of two is split into 1,024 equal buckets, so a recorded value is known to within
1/1,024 of itself (better than 0.1%): at least 3 significant digits everywhere from
100 µs (exact to the microsecond) to 60 s and beyond, in about 27 k counters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

_SUB_BITS = 11                       # 2,048 linear sub-buckets → 3 significant digits
_SUB = 1 << _SUB_BITS
_HALF = _SUB >> 1
MAX_MICROS = (1 << 36) - 1           # about 19 hours; larger values are clamped (and counted)


def bucket_index(us: int) -> int:
    """Index of the bucket holding `us` microseconds."""
    if us < _SUB:
        return us
    shift = us.bit_length() - _SUB_BITS
    return _SUB + (shift - 1) * _HALF + ((us >> shift) - _HALF)


def bucket_bounds(index: int) -> tuple[int, int]:
    """Lowest and highest microsecond value that fall into bucket `index`."""
    if index < _SUB:
        return index, index
    shift = (index - _SUB) // _HALF + 1
    low = ((index - _SUB) % _HALF + _HALF) << shift
    return low, low + (1 << shift) - 1


_N_BUCKETS = bucket_index(MAX_MICROS) + 1


@dataclass(frozen=True)
class Percentiles:
    """Latency summary in milliseconds."""

    count: int
    p50: float
    p90: float
    p95: float
    p99: float
    p999: float
    max: float
    min: float
    mean: float

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in ("count", "p50", "p90", "p95", "p99", "p999", "max", "min", "mean")}


class LatencyHistogram:
    """Counts of latencies in log-linear buckets; exact min, max and sum beside them."""

    def __init__(self) -> None:
        self.counts = np.zeros(_N_BUCKETS, dtype=np.int64)
        self.count = 0
        self.clamped = 0
        self.min_us = 0
        self.max_us = 0
        self.sum_us = 0

    def record(self, seconds: float) -> None:
        """Add one latency given in seconds (negative values count as 0)."""
        us = int(round(seconds * 1e6)) if seconds > 0 else 0
        if us > MAX_MICROS:
            self.clamped += 1
            us = MAX_MICROS
        self.counts[bucket_index(us)] += 1
        if self.count == 0 or us < self.min_us:
            self.min_us = us
        if us > self.max_us:
            self.max_us = us
        self.count += 1
        self.sum_us += us

    def merge(self, other: LatencyHistogram) -> None:
        if other.count == 0:
            return
        self.counts += other.counts
        self.min_us = other.min_us if self.count == 0 else min(self.min_us, other.min_us)
        self.max_us = max(self.max_us, other.max_us)
        self.count += other.count
        self.sum_us += other.sum_us
        self.clamped += other.clamped

    def value_at(self, percentile: float) -> float:
        """Latency in seconds at `percentile` (0–100): the highest value of the bucket holding
        that rank (nearest-rank, as HdrHistogram reports), never above the recorded maximum."""
        if self.count == 0:
            return math.nan
        # In exact decimal arithmetic: as floats, 99.9 / 100 * 1000 is 999.0000000000001, whose
        # ceiling made P99.9 of 1,000 requests the slowest one (the 1,000th) instead of the 999th.
        rank = max(1, math.ceil(Fraction(repr(float(percentile))) * self.count / 100))
        idx = int(np.searchsorted(np.cumsum(self.counts), rank))
        return min(bucket_bounds(idx)[1], self.max_us) / 1e6

    def fraction_within(self, seconds: float) -> float:
        """Fraction of recorded values at or below `seconds` (bucket-exact to 0.1%)."""
        if self.count == 0:
            return math.nan
        us = int(round(seconds * 1e6))
        idx = bucket_index(min(max(us, 0), MAX_MICROS))
        # A bucket straddling the threshold counts as within only if its top is.
        top = idx + 1 if bucket_bounds(idx)[1] <= us else idx
        return float(self.counts[:top].sum()) / self.count

    def summary(self) -> Percentiles:
        """P50/P90/P95/P99/P99.9/max/min/mean in milliseconds."""
        if self.count == 0:
            nan = math.nan
            return Percentiles(0, nan, nan, nan, nan, nan, nan, nan, nan)
        ms = lambda p: round(self.value_at(p) * 1e3, 3)  # noqa: E731
        return Percentiles(self.count, ms(50), ms(90), ms(95), ms(99), ms(99.9),
                           round(self.max_us / 1e3, 3), round(self.min_us / 1e3, 3),
                           round(self.sum_us / self.count / 1e3, 3))

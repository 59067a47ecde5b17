"""The log-linear latency histogram: 3 significant digits from 100 µs to 60 s, HdrHistogram percentiles."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel.replay.histogram import LatencyHistogram, bucket_bounds, bucket_index

pytestmark = pytest.mark.unit


@given(st.integers(min_value=100, max_value=60_000_000))
@settings(max_examples=300, deadline=None)
def test_every_value_from_100us_to_60s_keeps_three_significant_digits(us):
    lo, hi = bucket_bounds(bucket_index(us))
    assert lo <= us <= hi
    assert (hi - lo) / us < 1e-3


def test_buckets_are_contiguous():
    prev_hi = -1
    for i in range(bucket_index(70_000_000)):
        lo, hi = bucket_bounds(i)
        assert lo == prev_hi + 1
        prev_hi = hi


def test_percentiles_match_numpy_nearest_rank_within_resolution():
    rng = np.random.default_rng(1)
    values = rng.lognormal(mean=-5, sigma=1.2, size=20_000)   # seconds, ~7 ms median
    h = LatencyHistogram()
    for v in values:
        h.record(float(v))
    for p in (50, 90, 99, 99.9):
        exact = np.sort(values)[math.ceil(Fraction(str(p)) * len(values) / 100) - 1]   # nearest rank, exactly
        assert abs(h.value_at(p) - exact) <= max(exact * 1e-3, 1e-6), p
    s = h.summary()
    assert s.count == 20_000
    assert s.max == round(float(values.max()) * 1e3, 3)


def test_merge_and_empty():
    a, b = LatencyHistogram(), LatencyHistogram()
    assert math.isnan(a.value_at(50))
    a.record(0.001)
    b.record(2.0)
    a.merge(b)
    assert a.count == 2 and a.value_at(100) == 2.0 and a.summary().min == 1.0


@pytest.mark.parametrize("n", [1000, 2000, 20_000])
def test_p999_of_a_round_count_is_the_nearest_rank_not_the_maximum(n):
    # 1..n ms: nearest rank of P99.9 is ceil(0.999 n), the (n - n/1000)th value. As floats,
    # 99.9 / 100 * 1000 is 999.0000000000001, and P99.9 of 1,000 requests read as the slowest one.
    h = LatencyHistogram()
    for ms in range(1, n + 1):
        h.record(ms / 1000)
    want = n - n // 1000
    assert abs(h.value_at(99.9) * 1000 - want) <= want * 1e-3
    assert h.value_at(99.9) < h.value_at(100)
    assert h.summary().p999 < h.summary().max

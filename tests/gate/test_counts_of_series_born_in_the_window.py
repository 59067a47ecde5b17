"""The gate's counts include the events of series that began within the window (promtool, real PromQL).

A sidecar creates a labelled series at its first event: the first 503 or `incomplete`, the
first `disagree`, every series of a canary pod that started a few minutes ago. `increase()`
counts from a series' first sample, so what that sample already holds was lost: a canary whose
20 errors came between two scrapes showed 0 errors in 420 requests and passed the gate.
"""

from __future__ import annotations

import shutil

import pytest
from rulefiles import promql_expr_test

from sentinel import metricnames as mn
from sentinel.gate import criteria, queries
from sentinel.gate.criteria import Verdict, VersionData
from sentinel.gate.judge import TESTED_CRITERIA
from sentinel.gate.settings import GateSettings

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")

REQ = mn.REQUESTS.sample_name
LAT = mn.REQUEST_DURATION.sample_name
AGREE = mn.REFERENCE_AGREEMENT.sample_name
V4 = 'model="digits",protocol="v2",version="v4"'
SHADOW = 'model="digits",version="v4",source="shadow"'

# Scraped every 15 s for 20 minutes; the gate judges the last 10. 10 requests a scrape answered
# 200 all along (a second replica's scrape failed at the window's start: a stale marker there).
# At minute 15, 20 requests answered 503 between two scrapes: the series appears holding 20 and
# never moves. Shadow comparisons: 9 agreements a scrape all along; the first disagreements at
# minute 18 (3 by the first scrape, then one a scrape: 11 in all). prometheus_client's `_created`
# series say when each series began.
SERIES = [
    (f'{REQ}{{{V4},code="200"}}', "0+10x80"),
    (f'sentinel_requests_created{{{V4},code="200"}}', "0x80"),
    (f'{REQ}{{{V4},code="200",instance="b"}}', "0+10x39 stale 410+10x39"),
    (f'sentinel_requests_created{{{V4},code="200",instance="b"}}', "0x39 stale 0x39"),
    (f'{REQ}{{{V4},code="503"}}', "_x60 20x20"),
    (f'sentinel_requests_created{{{V4},code="503"}}', "_x60 899x20"),
    *[(f'{LAT}{{{V4},code="200",le="{le}"}}', "0+10x80") for le in ("0.05", "+Inf")],
    (f'sentinel_request_duration_seconds_created{{{V4},code="200"}}', "0x80"),
    *[(f'{LAT}{{{V4},code="503",le="{le}"}}', "_x60 20x20") for le in ("0.05", "+Inf")],
    (f'sentinel_request_duration_seconds_created{{{V4},code="503"}}', "_x60 899x20"),
    (f'{AGREE}{{{SHADOW},result="agree"}}', "0+9x80"),
    (f'{AGREE}{{{SHADOW},result="disagree"}}', "_x72 3+1x8"),
    (f'sentinel_reference_agreement_created{{{SHADOW},result="disagree"}}', "_x72 1075x8"),
]


def test_events_of_series_born_in_the_window_are_counted(tmp_path):
    checks = [
        {"expr": queries.requests_by_code("digits", "v4", "10m"), "eval_time": "20m",
         "exp_samples": [{"labels": '{code="200"}', "value": 800}, {"labels": '{code="503"}', "value": 20}]},
        {"expr": queries.latency_buckets("digits", "v4", "10m", counted=True), "eval_time": "20m",
         "exp_samples": [{"labels": '{le="0.05"}', "value": 420}, {"labels": '{le="+Inf"}', "value": 420}]},
        {"expr": queries.agreement_by_result("digits", "v4", "10m"), "eval_time": "20m",
         "exp_samples": [{"labels": '{result="agree"}', "value": 360}, {"labels": '{result="disagree"}', "value": 11}]},
    ]
    promql_expr_test(tmp_path, SERIES, checks, interval="15s")
    # ...and on those counts the burst of errors fails the canary
    s = GateSettings()
    verdict = criteria.error_ratio(VersionData(codes={"200": 400.0}), VersionData(codes={"200": 400.0, "503": 20.0}),
                                   s, s.alpha / TESTED_CRITERIA, 0.001, queries.BAD_CODE_REGEX)
    assert verdict.verdict == Verdict.FAIL


def test_a_canary_pod_gone_before_the_query_still_counts_whole(tmp_path):
    """A pod born at minute 12 answered 10 requests 507 and was gone by minute 13. At minute 20 its
    `_created` series had been stale for 7 minutes (past Prometheus' 5-minute lookback), so an
    instant read of `_created` called it an old series and `increase()` counted 6 of its 10."""
    pod = f'{V4},code="507",instance="c"'
    series = [(f"{REQ}{{{pod}}}", "_x48 4+2x3 _x29"), (f"sentinel_requests_created{{{pod}}}", "_x48 719x3 _x29")]
    checks = [{"expr": queries.requests_by_code("digits", "v4", "10m"), "eval_time": "20m",
               "exp_samples": [{"labels": '{code="507"}', "value": 10}]}]
    promql_expr_test(tmp_path, series, checks, interval="15s")

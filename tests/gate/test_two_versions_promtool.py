"""Two versions serving at once: the generated SLO rules still give one ratio per model, and the
gate's per-version queries split it correctly (promtool test rules on literal series)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sentinel.gate import queries
from sentinel.slo.rules import generate_rule_files
from sentinel.slo.spec import load_slo_file

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")

# v3 (two replicas) answers 10 req/s without errors and fast; v4 (one replica) answers
# 10 req/s, one in ten a 503, half of them slower than the 0.15 s latency threshold.
SERIES = [
    ('sentinel_requests_total{model="digits",version="v3",code="200",instance="a"}', "0+6x600"),
    ('sentinel_requests_total{model="digits",version="v3",code="200",instance="b"}', "0+4x600"),
    ('sentinel_requests_total{model="digits",version="v4",code="200",instance="c"}', "0+9x600"),
    ('sentinel_requests_total{model="digits",version="v4",code="503",instance="c"}', "0+1x600"),
    ('sentinel_request_duration_seconds_bucket{model="digits",version="v3",le="0.15",instance="a"}', "0+6x600"),
    ('sentinel_request_duration_seconds_bucket{model="digits",version="v3",le="0.15",instance="b"}', "0+4x600"),
    ('sentinel_request_duration_seconds_bucket{model="digits",version="v4",le="0.15",instance="c"}', "0+5x600"),
    ('sentinel_request_duration_seconds_count{model="digits",version="v3",instance="a"}', "0+6x600"),
    ('sentinel_request_duration_seconds_count{model="digits",version="v3",instance="b"}', "0+4x600"),
    ('sentinel_request_duration_seconds_count{model="digits",version="v4",instance="c"}', "0+10x600"),
]


def test_slo_ratios_aggregate_versions_and_gate_queries_split_them(tmp_path):
    spec = dataclasses.replace(load_slo_file(REPO / "slo.yaml"), period="4h", scrape_interval="1s")
    files = generate_rule_files(spec)
    for f in files:
        (tmp_path / f.filename).write_text(f.render())
    ratio = "slo:sentinel_sli_error:ratio_rate40s"
    tests = {
        "rule_files": [f.filename for f in files],
        "evaluation_interval": "1s",
        "tests": [{
            "interval": "1s",
            "input_series": [{"series": s, "values": v} for s, v in SERIES],
            "promql_expr_test": [
                # one series per SLO and model, over both versions: 1 error in 20 requests
                {"expr": f'{ratio}{{slo="availability"}}', "eval_time": "5m",
                 "exp_samples": [{"labels": f'{ratio}{{model="digits",slo="availability",sli="availability"}}',
                                  "value": 0.05}]},
                {"expr": f'{ratio}{{slo="latency"}}', "eval_time": "5m",
                 "exp_samples": [{"labels": f'{ratio}{{model="digits",slo="latency",sli="latency"}}',
                                  "value": 0.25}]},
                # the gate's per-version error ratios
                {"expr": queries.error_ratio("digits", "v4", "1m"), "eval_time": "5m",
                 "exp_samples": [{"labels": "{}", "value": 0.1}]},
                {"expr": queries.error_ratio("digits", "v3", "1m"), "eval_time": "5m",
                 "exp_samples": [{"labels": "{}", "value": 0}]},
                {"expr": queries.request_count("digits", "v3", "1m"), "eval_time": "5m",
                 "exp_samples": [{"labels": "{}", "value": 600}]},
            ],
        }],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

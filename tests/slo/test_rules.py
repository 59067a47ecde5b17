"""Generated rules: PromQL built from metricnames, NaN-safe, small groups, one burn alert name, promtool-clean."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sentinel import metricnames as mn
from sentinel.slo import recorded
from sentinel.slo.rules import BURN_ALERT, generate_rule_files
from sentinel.slo.sli import le_regex
from sentinel.slo.spec import load_slo_file

REPO = Path(__file__).resolve().parents[2]
SPEC = load_slo_file(REPO / "slo.yaml")
FILES = generate_rule_files(SPEC)
RULES = [r for f in FILES for g in f.groups for r in g.rules]

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


@pytest.mark.parametrize("threshold,spelling", [
    (0.15, "0.15"), (0.15, "0.150"), (0.15, "0.1500"), (0.15, "1.5e-01"), (0.15, "1.5E-1"),
    (1.0, "1"), (1.0, "1.0"), (1.0, "1e+00"), (0.001, "0.001"), (0.001, "1e-03"), (10.0, "10"), (10.0, "1e+01"),
    (2.5, "2.5"), (2.5, "2.50"),
], ids=lambda v: str(v))
def test_le_regex_matches_every_spelling(threshold, spelling):
    assert re.fullmatch(le_regex(threshold), spelling)


@pytest.mark.parametrize("threshold,spelling", [
    (0.15, "0.1"), (0.15, "0.151"), (0.15, "10.15"), (0.15, "1.5"), (0.15, "+Inf"), (1.0, "10"), (1.0, "0.1"),
    (1.0, "1.01"), (10.0, "1"), (0.001, "0.0011"),
], ids=lambda v: str(v))
def test_le_regex_rejects_other_bounds(threshold, spelling):
    assert not re.fullmatch(le_regex(threshold), spelling)


def test_every_metric_in_the_rules_comes_from_metricnames():
    known = {m.sample_name for m in mn.METRICS} | {m.name for m in mn.METRICS}
    known |= {m.name + s for m in mn.METRICS if m.kind == "histogram" for s in ("_bucket", "_count", "_sum")}
    used = {tok for r in RULES for tok in re.findall(r"(?<![:\w])(sentinel_[a-z_]+)", r.expr)}
    assert used and used <= known, used - known
    records = {r.record for r in RULES if r.record}
    assert all(name.startswith(("slo:sentinel_",)) for name in records)
    assert recorded.BUDGET_REMAINING in records and recorded.OBJECTIVE in records


def test_ratio_denominators_are_clamped_and_missing_bad_series_count_as_zero():
    ratios = [r for r in RULES if r.record and r.record.startswith(recorded.ERROR_RATIO_PREFIX)]
    assert len(ratios) == 4 * 8  # 4 SLOs x (7 distinct windows + the period)
    for r in ratios:
        if r.labels[1][1] == "estimated_accuracy":
            assert "avg_over_time(slo:sentinel_estimated_accuracy:ratio" in r.expr
        else:
            assert "clamp_min(" in r.expr and ", 1e-12)" in r.expr
        assert r.expr.startswith("round(")
    availability = next(r for r in ratios if r.labels[0][1] == "availability")
    assert ' or 0 * sum by (model) (rate(sentinel_requests_total{model="digits"}[' in availability.expr


def test_one_burn_alert_name_with_slo_model_severity_and_annotations():
    burns = [r for r in RULES if r.alert == BURN_ALERT]
    assert len(burns) == 2 * len(SPEC.slos)
    for r in burns:
        labels = dict(r.labels)
        assert set(labels) == {"slo", "model", "severity"} and labels["severity"] in ("page", "ticket")
        ann = dict(r.annotations)
        assert set(ann) == {"summary", "description", "runbook_url"}
        assert '{{ $value | printf "%.1f" }}x the sustainable rate' in ann["description"]
    page = next(r for r in burns if dict(r.labels) == {"severity": "page", "slo": "availability", "model": "digits"})
    assert "slo:sentinel_sli_error:ratio_rate1h{slo=\"availability\",model=\"digits\"} / 0.001 > 14.4" in page.expr
    assert "slo:sentinel_sli_error:ratio_rate30m{slo=\"availability\",model=\"digits\"} / 0.001 > 6" in page.expr


def test_operational_alerts_exist():
    names = {r.alert for r in RULES if r.alert}
    assert names >= {"SentinelDown", "SentinelMetricsAbsent", "SentinelSampleDropRatioHigh", "SentinelDriftAlarm",
                     "SentinelEstimatedAccuracyBelowObjective", "SentinelGpuMemoryHigh",
                     "SentinelGpuHeadroomNegative", "SentinelCanaryReplayFailing", BURN_ALERT}
    gpu = next(r for r in RULES if r.alert == "SentinelGpuMemoryHigh")
    assert gpu.for_ == "5m" and "> 0.9" in gpu.expr
    absent = [r.expr for r in RULES if r.alert == "SentinelMetricsAbsent"]
    assert any('le=~"0\\\\.150*|' in e for e in absent)  # the exact latency bucket must exist too


def test_groups_stay_small():
    # Grafana Mimir / Cortex limit rules per group (20 by default on hosted tiers)
    assert max(len(g.rules) for f in FILES for g in f.groups) <= 20


@needs_promtool
def test_promtool_check_rules_is_clean_on_the_committed_files():
    files = sorted(str(p) for p in (REPO / "rules").glob("*.yml"))
    proc = subprocess.run(["promtool", "check", "rules", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAILED" not in proc.stdout + proc.stderr

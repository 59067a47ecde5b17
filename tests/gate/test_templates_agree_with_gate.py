"""The controller templates decide as `sentinel gate` does on the same series: each Argo query is
evaluated by `promtool test rules` on literal series, and the gate's criterion on the same counts."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from rulefiles import argo_queries, promql_expr_test

from sentinel import metricnames as mn
from sentinel.gate import criteria, stats
from sentinel.gate.criteria import Verdict, VersionData
from sentinel.gate.judge import TESTED_CRITERIA
from sentinel.gate.templates import argo_analysis_template
from sentinel.slo.spec import load_slo_file

REPO = Path(__file__).resolve().parents[2]
SPEC = load_slo_file(REPO / "slo.yaml")
S = SPEC.gate

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")

LAT = mn.REQUEST_DURATION.sample_name
REQ = mn.REQUESTS.sample_name
CHECKED = mn.INPUT_CONTRACT_CHECKED.sample_name
VIOLATING = mn.INPUT_CONTRACT_VIOLATING.sample_name
VERDICTS = mn.ACCURACY_VERDICTS.sample_name
RELIABLE = mn.ACCURACY_ESTIMATE_RELIABLE.name

# 10 requests/s each over 10 minutes. A fast model: v3 answers within 1 ms, v4 half within
# 1 ms and half within 2 ms: twice as slow at P95/P99, but by under a millisecond, less than
# latency_min_diff_s (10 ms). v4's sidecar checks no inputs against the contract in the window.
SERIES = [
    (f'{REQ}{{model="digits",version="v3",code="200"}}', "0+10x600"),
    (f'{REQ}{{model="digits",version="v4",code="200"}}', "0+10x600"),
    (f'{LAT}{{model="digits",version="v3",le="0.001"}}', "0+10x600"),
    (f'{LAT}{{model="digits",version="v3",le="0.002"}}', "0+10x600"),
    (f'{LAT}{{model="digits",version="v3",le="0.05"}}', "0+10x600"),
    (f'{LAT}{{model="digits",version="v3",le="+Inf"}}', "0+10x600"),
    (f'{LAT}{{model="digits",version="v4",le="0.001"}}', "0+5x600"),
    (f'{LAT}{{model="digits",version="v4",le="0.002"}}', "0+10x600"),
    (f'{LAT}{{model="digits",version="v4",le="0.05"}}', "0+10x600"),
    (f'{LAT}{{model="digits",version="v4",le="+Inf"}}', "0+10x600"),
    (f'{CHECKED}{{model="digits",version="v4"}}', "0x600"),
    (f'{VIOLATING}{{model="digits",version="v4"}}', "0x600"),
    # v5: really slower (P95 ~48 ms against 1 ms), refuses one request in ten (400) and one in
    # ten checked inputs violates the contract
    (f'{REQ}{{model="digits",version="v5",code="200"}}', "0+9x600"),
    (f'{REQ}{{model="digits",version="v5",code="400"}}', "0+1x600"),
    (f'{LAT}{{model="digits",version="v5",le="0.001"}}', "0x600"),
    (f'{LAT}{{model="digits",version="v5",le="0.002"}}', "0x600"),
    (f'{LAT}{{model="digits",version="v5",le="0.05"}}', "0+10x600"),
    (f'{LAT}{{model="digits",version="v5",le="+Inf"}}', "0+10x600"),
    (f'{CHECKED}{{model="digits",version="v5"}}', "0+1x600"),
    (f'{VIOLATING}{{model="digits",version="v5"}}', "0+0.1x600"),
    # accuracy verdicts: v3 and v4 alike (v4 exports no reliability flag); v5 half wrong, but
    # its estimate was flagged unreliable during the window
    (f'{VERDICTS}{{model="digits",version="v3",verdict="likely_correct"}}', "0+1x600"),
    (f'{VERDICTS}{{model="digits",version="v4",verdict="likely_correct"}}', "0+1x600"),
    (f'{VERDICTS}{{model="digits",version="v5",verdict="likely_correct"}}', "0+0.5x600"),
    (f'{VERDICTS}{{model="digits",version="v5",verdict="likely_wrong"}}', "0+0.5x600"),
    (f'{RELIABLE}{{model="digits",version="v3"}}', "1x600"),
    (f'{RELIABLE}{{model="digits",version="v5"}}', "1x300 0x10 1x290"),
]


def _queries(baseline: str, canary: str) -> dict[str, str]:
    return argo_queries(SPEC, baseline, canary)


def test_templates_judge_latency_and_contract_as_the_gate_does(tmp_path):
    inf = math.inf
    base = VersionData(codes={"200": 6000.0}, buckets={0.001: 6000.0, 0.002: 6000.0, inf: 6000.0})
    canary = VersionData(codes={"200": 6000.0}, buckets={0.001: 3000.0, 0.002: 6000.0, inf: 6000.0},
                         contract_checked=0.0, contract_violating=0.0)
    alpha = S.alpha / TESTED_CRITERIA
    lat = criteria.latency(base, canary, S, alpha)
    assert lat.verdict == Verdict.PASS and lat.effect > S.latency_tolerance   # ratio x1.9, but < 10 ms
    assert criteria.input_contract(canary, S, alpha).verdict == Verdict.INCONCLUSIVE
    half_wrong = VersionData(verdicts={"likely_correct": 300.0, "likely_wrong": 300.0}, reliable=0.0)
    sure = VersionData(verdicts={"likely_correct": 600.0}, reliable=1.0)
    assert criteria.accuracy(sure, half_wrong, S, alpha, 600, 600).verdict == Verdict.INCONCLUSIVE
    refusing = VersionData(codes={"200": 5400.0, "400": 600.0})
    assert criteria.error_ratio(base, refusing, S, alpha, 0.001, "5..").verdict == Verdict.FAIL

    q, q5 = _queries("v3", "v4"), _queries("v3", "v5")
    tests = {"evaluation_interval": "1m", "tests": [{
        "interval": "1s",
        "input_series": [{"series": s, "values": v} for s, v in SERIES],
        "promql_expr_test": [
            # a ratio that is not a failure for the gate must not fail the rollout either
            {"expr": f"({q['latency-p95-ratio']}) <= {S.latency_tolerance}", "eval_time": "10m",
             "exp_samples": [{"labels": "{}", "value": 1.0}]},
            {"expr": f"({q['latency-p99-ratio']}) <= {S.latency_tolerance}", "eval_time": "10m",
             "exp_samples": [{"labels": "{}", "value": 1.0}]},
            # no inputs checked: no result (Argo: Inconclusive), not a passing 0
            {"expr": q["contract-violation-ratio"], "eval_time": "10m", "exp_samples": []},
            # a really slower canary and one violating the contract still fail
            {"expr": f"({q5['latency-p95-ratio']}) > {S.latency_tolerance} > bool 0", "eval_time": "10m",
             "exp_samples": [{"labels": "{}", "value": 1.0}]},
            {"expr": f"({q5['client-error-increase']}) > {S.max_client_error_increase} > bool 0",
             "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1.0}]},
            {"expr": q["client-error-increase"], "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 0.0}]},
            # unreliable estimate: no result (Inconclusive), as the gate; without a flag: judged
            {"expr": q5["accuracy-drop"], "eval_time": "10m", "exp_samples": []},
            {"expr": q["accuracy-drop"], "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 0.0}]},
            {"expr": f"({q5['contract-violation-ratio']}) > {S.max_contract_violation_ratio} > bool 0",
             "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1.0}]},
        ],
    }]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


PRED = mn.PREDICTIONS.sample_name


def _promtool(tmp_path: Path, series: list[tuple[str, str]], checks: list[dict]) -> None:
    promql_expr_test(tmp_path, series, checks)


def test_prediction_shift_is_the_gates_effect_size_held_to_max_cramers_v(tmp_path):
    import dataclasses

    # The template's threshold is the SLO file's max_cramers_v, not a constant of its own.
    strict = dataclasses.replace(SPEC, gate=dataclasses.replace(S, max_cramers_v=0.07))
    metrics = {m["name"]: m for m in argo_analysis_template(strict, "http://p:9090")["spec"]["metrics"]}
    assert metrics["prediction-shift"]["successCondition"].endswith("<= 0.07")

    # Over 10 minutes, 300 predictions each: v3 uniform over 10 classes; v4 the same model
    # with the sampling noise of 300 draws (plain V 0.108 > 0.1: chance alone); v6 never
    # predicts class 0, which v3 gives 10% of the time.
    counts = {"v3": [30] * 10, "v4": [21, 40, 24, 36, 30, 38, 22, 33, 25, 31],
              "v6": [0, 33, 33, 33, 33, 33, 33, 33, 33, 36]}
    series = [(f'{PRED}{{model="digits",version="{v}",class="{k}"}}', f"0+{n / 600!r}x600")
              for v, row in counts.items() for k, n in enumerate(row)]
    alpha = S.alpha / TESTED_CRITERIA
    checks = []
    for canary, verdict in (("v4", Verdict.PASS), ("v6", Verdict.FAIL)):
        b = VersionData(classes={str(k): float(n) for k, n in enumerate(counts["v3"])})
        c = VersionData(classes={str(k): float(n) for k, n in enumerate(counts[canary])})
        judged = criteria.prediction_distribution(b, c, S, alpha)
        assert judged.verdict == verdict
        # the gate's balanced V, less its value between identical versions at 300 each over 10 classes
        expected = math.sqrt(max(0.0, judged.effect ** 2 - 9 * (1 / 300 + 1 / 300) / 4))
        query = _queries("v3", canary)["prediction-shift"]
        checks.append({"expr": f"abs(({query}) - {expected!r}) < bool 1e-6", "eval_time": "10m",
                       "exp_samples": [{"labels": "{}", "value": 1.0}]})
        passes = "<=" if verdict == Verdict.PASS else ">"
        checks.append({"expr": f"({query}) {passes} bool {S.max_cramers_v}", "eval_time": "10m",
                       "exp_samples": [{"labels": "{}", "value": 1.0}]})
    assert stats.homogeneity(counts["v3"], counts["v4"]).balanced_v > S.max_cramers_v   # uncorrected: a false fail
    _promtool(tmp_path, series, checks)


def test_latency_ratio_reads_replicas_with_different_bucket_layouts_as_the_gate(tmp_path):
    # v4's second replica (a tenth of the traffic) has the SLO file's newer threshold 0.2 as an
    # extra bound. Summed by `le`, that bound holds only its replica's count, Prometheus'
    # histogram_quantile "fixes" the non-monotonic sum, and P95 came out 245.8 ms where the
    # gate, on the bounds every replica has, reads 237.5 ms.
    rates = {  # requests per second at or below each bound
        ("v3", "a"): {"0.05": 2, "0.1": 8, "0.25": 10, "+Inf": 10},
        ("v4", "a"): {"0.05": 0, "0.1": 4, "0.25": 10, "+Inf": 10},
        ("v4", "b"): {"0.05": 0, "0.1": 0.4, "0.2": 0.4, "0.25": 1, "+Inf": 1},
    }
    series = [(f'{LAT}{{model="digits",version="{v}",pod="{pod}",le="{le}"}}', f"0+{r!r}x600")
              for (v, pod), row in rates.items() for le, r in row.items()]
    series += [(f'{REQ}{{model="digits",version="{v}",code="200"}}', f"0+{n}x600") for v, n in (("v3", 10), ("v4", 11))]
    inf = math.inf
    base = VersionData(codes={"200": 6000.0}, buckets={0.05: 1200.0, 0.1: 4800.0, 0.25: 6000.0, inf: 6000.0})
    # judge.fetch leaves out 0.2 (one of v4's two series carries it)
    canary = VersionData(codes={"200": 6600.0}, buckets={0.05: 0.0, 0.1: 2640.0, 0.25: 6600.0, inf: 6600.0})
    judged = criteria.latency(base, canary, S, S.alpha / TESTED_CRITERIA)
    p95 = stats.quantile(0.95, canary.buckets) / stats.quantile(0.95, base.buckets)
    p99 = stats.quantile(0.99, canary.buckets) / stats.quantile(0.99, base.buckets)
    assert judged.verdict == Verdict.PASS and math.isclose(judged.effect, max(p95, p99))
    # P99 247.5 ms vs 242.5 ms: slower by less than latency_min_diff_s, so the template reads 1
    assert stats.quantile(0.99, canary.buckets) - stats.quantile(0.99, base.buckets) < S.latency_min_diff_s
    q = _queries("v3", "v4")
    _promtool(tmp_path, series, [
        {"expr": f"abs(({q['latency-p95-ratio']}) - {p95!r}) < bool 1e-6", "eval_time": "10m",
         "exp_samples": [{"labels": "{}", "value": 1.0}]},
        {"expr": f"({q['latency-p99-ratio']})", "eval_time": "10m",
         "exp_samples": [{"labels": "{}", "value": 1.0}]},
    ])


def test_drift_and_contract_the_baseline_shares_do_not_fail_the_canary_in_the_templates(tmp_path):
    drift, checked, violating = mn.DRIFT_ALARM.name, CHECKED, VIOLATING
    # v3 and v4 see inputs that drifted and that break the contract 12% of the time; v6 rejects
    # 30%; v9 (a baseline on clean traffic) neither alarms nor rejects
    series = [(f'{drift}{{model="digits",version="{v}",detector="combined"}}', vals)
              for v, vals in (("v3", "1x600"), ("v4", "1x600"), ("v9", "0x600"))]
    series += [(f'{checked}{{model="digits",version="{v}"}}', "0+1x600") for v in ("v3", "v4", "v6", "v9")]
    series += [(f'{violating}{{model="digits",version="{v}"}}', f"0+{r}x600")
               for v, r in (("v3", 0.12), ("v4", 0.12), ("v6", 0.3), ("v9", 0))]
    alpha = S.alpha / TESTED_CRITERIA
    data = {v: VersionData(drift={"combined": share}, contract_checked=600.0, contract_violating=600.0 * r)
            for v, share, r in (("v3", 1.0, 0.12), ("v4", 1.0, 0.12), ("v6", 0.0, 0.3), ("v9", 0.0, 0.0))}
    checks = []
    for base, canary, verdict in (("v3", "v4", Verdict.PASS), ("v3", "v6", Verdict.FAIL), ("v9", "v4", Verdict.FAIL)):
        gate = criteria.input_contract(data[canary], S, alpha, data[base])
        assert gate.verdict == verdict, (base, canary, gate.summary)
        q = _queries(base, canary)
        cond = "<=" if verdict == Verdict.PASS else ">"
        checks.append({"expr": f"({q['contract-violation-ratio']}) {cond} bool {S.max_contract_violation_ratio}",
                       "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1.0}]})
    assert criteria.drift(data["v4"], S, data["v3"]).verdict == Verdict.PASS
    assert criteria.drift(data["v4"], S, data["v9"]).verdict == Verdict.FAIL
    checks.append({"expr": _queries("v3", "v4")["drift-alarm-share"], "eval_time": "10m",
                   "exp_samples": [{"labels": "{}", "value": 0.0}]})
    checks.append({"expr": _queries("v9", "v4")["drift-alarm-share"], "eval_time": "10m",
                   "exp_samples": [{"labels": "{}", "value": 1.0}]})
    _promtool(tmp_path, series, checks)

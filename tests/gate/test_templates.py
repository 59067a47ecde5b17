"""Argo Rollouts and Flagger templates: committed = generated, and shaped like the published CRDs.

Field names checked here are those of the CRDs: Argo Rollouts `AnalysisTemplate`
(argoproj.io/v1alpha1: spec.args[].name/value, spec.metrics[].name, interval, count,
failureLimit, inconclusiveLimit, successCondition, failureCondition,
provider.prometheus.{address,query}, provider.job.spec = a batch/v1 JobSpec) and Flagger
(flagger.app/v1beta1 `MetricTemplate` spec.provider.{type,address}, spec.query; `Canary`
spec.targetRef, spec.service.port, spec.analysis.{interval,threshold,maxWeight,stepWeight,
metrics[].{name,interval,templateRef.name,thresholdRange.{min,max}}}).
Set SENTINEL_UPDATE_GOLDEN=1 to rewrite deploy/argo and deploy/flagger.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.gate.templates import checks, render
from sentinel.slo.spec import load_slo_file

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SPEC = load_slo_file(REPO / "slo.yaml")
PROM = "http://prometheus-operated.monitoring:9090"
IMAGE = "ghcr.io/sentinel-densenet/sentinel:latest"
DOCS = render(SPEC, PROM, IMAGE)

ARGO_METRIC_FIELDS = {"name", "interval", "initialDelay", "count", "failureLimit", "inconclusiveLimit",
                      "consecutiveErrorLimit", "successCondition", "failureCondition", "provider"}
FLAGGER_CANARY_METRIC_FIELDS = {"name", "interval", "templateRef", "thresholdRange", "query", "templateVariables"}


@pytest.mark.parametrize("rel", sorted(DOCS))
def test_committed_templates_match_the_generator(rel):
    path = REPO / "deploy" / rel
    if os.environ.get("SENTINEL_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(DOCS[rel])
    assert path.read_text() == DOCS[rel], f"deploy/{rel} is stale: run `sentinel gate templates --slo slo.yaml -o deploy`"


def test_argo_analysis_template_fields():
    doc = yaml.safe_load(DOCS["argo/analysistemplate.yaml"])
    assert doc["apiVersion"] == "argoproj.io/v1alpha1" and doc["kind"] == "AnalysisTemplate"
    arg_names = [a["name"] for a in doc["spec"]["args"]]
    assert {"baseline-version", "canary-version", "model", "window"} <= set(arg_names)
    assert set(doc["spec"]) == {"args", "metrics"}
    names = []
    for m in doc["spec"]["metrics"]:
        assert set(m) <= ARGO_METRIC_FIELDS, set(m) - ARGO_METRIC_FIELDS
        assert set(m["provider"]) == {"prometheus"}
        assert set(m["provider"]["prometheus"]) == {"address", "query"}
        assert m["provider"]["prometheus"]["address"] == PROM
        assert "result[0]" in m["successCondition"] and "result[0]" in m["failureCondition"]
        # every {{args.x}} used is declared
        used = set(re.findall(r"\{\{args\.([a-z-]+)\}\}", yaml.safe_dump(m)))
        assert used <= set(arg_names), used - set(arg_names)
        names.append(m["name"])
    assert len(names) == len(set(names))
    assert {"error-ratio-increase", "client-error-increase", "latency-p95-ratio", "latency-p99-ratio", "prediction-shift",
            "agreement-drop", "accuracy-drop", "drift-alarm-share", "contract-violation-ratio"} == set(names)


def test_argo_conditions_use_the_slo_budget_and_gate_settings():
    doc = yaml.safe_load(DOCS["argo/analysistemplate.yaml"])
    by = {m["name"]: m for m in doc["spec"]["metrics"]}
    assert by["error-ratio-increase"]["failureCondition"] == "len(result) == 1 && result[0] > 0.001"
    assert by["latency-p99-ratio"]["successCondition"].endswith(f"<= {SPEC.gate.latency_tolerance:g}")
    # too few samples: the guarded query is empty, neither condition holds -> Inconclusive
    assert f">= {SPEC.gate.min_requests}" in by["error-ratio-increase"]["provider"]["prometheus"]["query"]


def test_argo_job_variant_runs_sentinel_gate_with_real_options():
    doc = yaml.safe_load(DOCS["argo/analysistemplate-job.yaml"])
    assert doc["apiVersion"] == "argoproj.io/v1alpha1" and doc["kind"] == "AnalysisTemplate"
    (metric,) = doc["spec"]["metrics"]
    job = metric["provider"]["job"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] == 0
    (container,) = pod["containers"]
    cmd = container["command"]
    assert cmd[:2] == ["sentinel", "gate"]
    flags = [c for c in cmd if c.startswith("--")]
    help_text = CliRunner().invoke(app, ["gate", "--help"], terminal_width=200).output
    for flag in flags:
        assert flag in help_text, flag
    assert {v["name"] for v in pod["volumes"]} == {m["name"] for m in container["volumeMounts"]}


def test_flagger_metric_templates_and_canary_fields():
    templates = [d for d in yaml.safe_load_all(DOCS["flagger/metrictemplates.yaml"]) if d]
    assert len(templates) == len(checks(SPEC))
    for t in templates:
        assert t["apiVersion"] == "flagger.app/v1beta1" and t["kind"] == "MetricTemplate"
        assert set(t["spec"]) == {"provider", "query"}
        assert t["spec"]["provider"] == {"type": "prometheus", "address": PROM}
        assert "{{ interval }}" in t["spec"]["query"] and "{{ target }}" in t["spec"]["query"]
    canary = yaml.safe_load(DOCS["flagger/canary-analysis.yaml"])
    assert canary["apiVersion"] == "flagger.app/v1beta1" and canary["kind"] == "Canary"
    assert canary["spec"]["targetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "digits"}
    assert isinstance(canary["spec"]["service"]["port"], int)
    analysis = canary["spec"]["analysis"]
    assert {"interval", "threshold", "maxWeight", "stepWeight", "metrics"} <= set(analysis)
    names = {t["metadata"]["name"] for t in templates}
    for m in analysis["metrics"]:
        assert set(m) <= FLAGGER_CANARY_METRIC_FIELDS
        assert m["templateRef"]["name"] in names
        assert set(m["thresholdRange"]) <= {"min", "max"}


def test_templates_command_writes_only_under_the_given_directory(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["gate", "templates", "--slo", str(REPO / "slo.yaml"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(f"out/{rel}" for rel in DOCS)


@pytest.mark.skipif(__import__("shutil").which("promtool") is None, reason="promtool not installed")
def test_every_template_and_gate_query_parses_with_promtool(tmp_path):
    """Placeholders substituted, every query goes through `promtool check rules` as a recording rule."""
    import subprocess

    from sentinel.gate import queries as q

    exprs = []
    argo = yaml.safe_load(DOCS["argo/analysistemplate.yaml"])
    subst = {"{{args.model}}": "digits", "{{args.baseline-version}}": "v3", "{{args.canary-version}}": "v4",
             "{{args.window}}": "10m"}
    for m in argo["spec"]["metrics"]:
        expr = m["provider"]["prometheus"]["query"]
        for k, v in subst.items():
            expr = expr.replace(k, v)
        exprs.append(expr)
    for d in yaml.safe_load_all(DOCS["flagger/metrictemplates.yaml"]):
        if d:
            exprs.append(d["spec"]["query"].replace("{{ target }}", "digits").replace("{{ interval }}", "1m"))
    for fn in (q.requests_by_code, q.latency_buckets, q.latency_bucket_series, q.predictions_by_class, q.agreement_by_result, q.verdicts,
               q.estimate_reliable, q.atc_estimate, q.drift_alarm_share, q.contract_checked, q.contract_violating,
               q.contract_by_check):
        exprs.append(fn("digits", "v4", "10m"))
    exprs += list(q.presence("digits", "v3|v4", "10m").values()) + list(q.diagnosis("digits", "v4").values())
    assert all("{{" not in e for e in exprs)
    rules = {"groups": [{"name": "gate", "rules": [{"record": f"gate:check:{i}", "expr": e}
                                                   for i, e in enumerate(exprs)]}]}
    (tmp_path / "gate.yml").write_text(yaml.safe_dump(rules))
    proc = subprocess.run(["promtool", "check", "rules", str(tmp_path / "gate.yml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(exprs)} rules found" in proc.stdout

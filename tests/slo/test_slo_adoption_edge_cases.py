"""SLO files an adopting SRE writes that the example does not: several models and SLOs per SLI,
odd names, replicas with another bucket layout, broken files and output paths."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from sentinel.errors import ConfigError
from sentinel.slo.generate import render_rules, write_rules
from sentinel.slo.generate import test_rules as run_promtool_tests
from sentinel.slo.spec import load_slo_file

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


def _spec(tmp_path: Path, text: str):
    path = tmp_path / "slo.yaml"
    path.write_text(textwrap.dedent(text))
    return load_slo_file(path)


def test_the_same_slo_name_for_two_models_generates_and_pins_each(tmp_path):
    # the generated tests keyed outage lengths by SLO name: the second model's overwrote the first's
    # ("availability: recovery: no clear check instants")
    spec = _spec(tmp_path, """\
        slos:
          - {name: availability, model: digits, objective: 0.999, sli: availability}
          - {name: availability, model: mnist, objective: 0.99, sli: availability}
        """)
    _files, tests = render_rules(spec)
    assert [(p.model, p.slo, p.page_within_s) for p in tests.pins] == [
        ("digits", "availability", 60), ("mnist", "availability", 540)]


TWO_PER_SLI = """\
    slos:
      - {name: availability, model: digits, objective: 0.999, sli: availability}
      - {name: availability-loose, model: digits, objective: 0.99, sli: availability}
      - {name: latency-fast, model: digits, objective: 0.9, sli: latency, threshold: 0.1}
      - {name: latency, model: digits, objective: 0.99, sli: latency, threshold: 0.5}
    """


def test_slos_reading_the_same_series_get_their_own_test_rounds(tmp_path):
    # two availability SLOs of one model read one counter: in one test the second's series were
    # dropped as duplicates and its expected alerts never came (promtool FAILED); two latency SLOs
    # of one model could not be generated at all (a 2.25x burn rate on a rounding tie)
    _files, tests = render_rules(_spec(tmp_path, TWO_PER_SLI))
    doc = yaml.safe_load(tests.text)
    names = [t["name"] for t in doc["tests"]]
    assert sum("[round 1 of 2" in n for n in names) == 4 and sum("[round 2 of 2" in n for n in names) == 4
    for t in doc["tests"]:
        series = [s["series"] for s in t["input_series"]]
        assert len(series) == len(set(series)), t["name"]


@pytest.mark.slow
@needs_promtool
def test_slos_reading_the_same_series_pass_their_generated_tests(tmp_path):
    write_rules(_spec(tmp_path, TWO_PER_SLI), tmp_path / "rules", None)
    assert "SUCCESS" in run_promtool_tests(tmp_path / "rules")
    proc = subprocess.run(["promtool", "check", "rules", *map(str, sorted((tmp_path / "rules").glob("*.yml")))],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "duplicate rule" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@needs_promtool
def test_a_replica_without_the_threshold_bucket_is_left_out_of_the_latency_sli_and_named(tmp_path):
    # replica b's histogram has no 0.15 bucket (a sidecar started with another SLO file): every one
    # of its requests counted as slow and paged, and SentinelMetricsAbsent stayed quiet
    write_rules(_spec(tmp_path, "slos: [{name: latency, model: digits, objective: 0.99, sli: latency, "
                                "threshold: 0.15}]\n"), tmp_path / "rules", None)
    hist = "sentinel_request_duration_seconds"

    def series(instance: str, suffix: str, le: str | None = None) -> dict[str, str]:
        le_label = f',le="{le}"' if le else ""
        return {"series": f'{hist}_{suffix}{{instance="{instance}",model="digits",code="200",protocol="v2"{le_label}}}',
                "values": "0+100x120"}

    test = {
        "rule_files": ["rules/sentinel-slo.rules.yml", "rules/sentinel-ops.rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [series("a", "bucket", "0.15"), series("a", "bucket", "+Inf"), series("a", "count"),
                             series("b", "bucket", "0.1"), series("b", "bucket", "0.25"),
                             series("b", "bucket", "+Inf"), series("b", "count")],
            "promql_expr_test": [{
                "expr": 'slo:sentinel_sli_error:ratio_rate1h{slo="latency"}', "eval_time": "90m",
                "exp_samples": [{"labels": 'slo:sentinel_sli_error:ratio_rate1h{model="digits",sli="latency",'
                                           'slo="latency"}', "value": 0}]}],
            "alert_rule_test": [
                {"eval_time": "90m", "alertname": "SentinelErrorBudgetBurn", "exp_alerts": []},
                {"eval_time": "90m", "alertname": "SentinelMetricsAbsent", "exp_alerts": [{
                    "exp_labels": {"severity": "ticket", "model": "digits", "instance": "b", "threshold": "0.15",
                                   "metric": f"{hist}_bucket", "scope": "replica"},
                    "exp_annotations": {
                        "summary": "digits: b has no latency bucket at 0.15s",
                        "description": f"Replica b exports {hist} for model digits without a bucket at the latency "
                                       "SLO threshold 0.15s (le), so its requests are left out of the latency SLO. "
                                       "Its sidecar probably runs with another SLO file: restart it with the one "
                                       "these rules were generated from.",
                        "runbook_url": "https://github.com/sentinel-densenet/sentinel/blob/main/deploy/RUNBOOK.md"
                                       "#sentinelmetricsabsent"}}]},
            ],
        }],
    }
    (tmp_path / "t.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    proc = subprocess.run(["promtool", "test", "rules", "t.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("field,value", [("name", '"avail\\n"'), ("model", '"digits\\n"')])
def test_a_name_ending_in_a_newline_is_refused_not_written_into_promql(tmp_path, field, value):
    # `$` matched before a trailing newline: rules were written that promtool cannot parse
    entry = {"name": "avail", "model": "digits"}
    entry[field] = value
    (tmp_path / "slo.yaml").write_text(
        f"slos:\n  - {{name: {entry['name']}, model: {entry['model']}, objective: 0.999, sli: availability}}\n")
    with pytest.raises(ConfigError) as info:
        load_slo_file(tmp_path / "slo.yaml")
    assert any(f"slos[0].{field}: must be" in p for p in info.value.problems)


def test_a_job_ending_in_a_newline_is_refused(tmp_path):
    (tmp_path / "slo.yaml").write_text('job: "sentinel\\n"\nslos: [{name: a, model: m, objective: 0.99, '
                                       'sli: availability}]\n')
    with pytest.raises(ConfigError) as info:
        load_slo_file(tmp_path / "slo.yaml")
    assert any("job: must be a Prometheus job name" in p for p in info.value.problems)


def test_openslo_target_percent_that_is_not_a_number_is_a_config_error(tmp_path):
    data = Path(__file__).resolve().parent / "data" / "openslo.yaml"
    (tmp_path / "o.yaml").write_text(data.read_text().replace("- target: 0.999", "- targetPercent: abc"))
    with pytest.raises(ConfigError) as info:   # was a ValueError traceback
        load_slo_file(tmp_path / "o.yaml")
    assert any("targetPercent: expected a number of percent (99.9), got 'abc'" in p for p in info.value.problems)


def test_a_slo_file_that_is_not_utf8_is_a_config_error(tmp_path):
    (tmp_path / "slo.yaml").write_bytes(b"slos:\n  - {name: a, model: m\xff, objective: 0.9, sli: availability}\n")
    with pytest.raises(ConfigError) as info:   # was a UnicodeDecodeError traceback
        load_slo_file(tmp_path / "slo.yaml")
    assert "not UTF-8" in info.value.problems[0]


@pytest.mark.parametrize("group", ["rules", "dashboards"])
def test_rules_generate_into_a_path_that_is_a_file_exits_2(tmp_path, group):
    (tmp_path / "f").write_text("")
    proc = subprocess.run([sys.executable, "-m", "sentinel", group, "generate", "--slo",
                           str(Path(__file__).resolve().parents[2] / "slo.yaml"), "-o", str(tmp_path / "f")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr   # was a FileExistsError traceback (exit 1)
    assert "is a file, not a directory" in proc.stderr and "Traceback" not in proc.stderr

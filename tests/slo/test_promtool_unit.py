"""`promtool test rules` on the generated unit tests: they pass, and they catch a broken rule."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rulefiles import keep_test_groups

from sentinel.errors import CheckFailed
from sentinel.slo.generate import test_rules as run_promtool_tests
from sentinel.slo.generate import write_rules
from sentinel.slo.spec import load_slo_file

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")]


def test_committed_rules_pass_their_generated_tests():
    out = run_promtool_tests(REPO / "rules")
    assert "SUCCESS" in out


def test_seven_day_period_rules_pass_their_generated_tests(tmp_path):
    text = (REPO / "slo.yaml").read_text().replace("period: 30d", "period: 7d")
    (tmp_path / "slo.yaml").write_text(text)
    write_rules(load_slo_file(tmp_path / "slo.yaml"), tmp_path / "rules", None)
    assert "SUCCESS" in run_promtool_tests(tmp_path / "rules")


def test_the_tests_catch_a_page_that_waits_too_long(tmp_path):
    """Raise the fast page threshold tenfold: the detection checks must fail."""
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    keep_test_groups(tmp_path / "rules", "recovery:")   # the group that times the fast page
    assert "SUCCESS" in run_promtool_tests(tmp_path / "rules")   # it passes as generated...
    slo_rules = tmp_path / "rules" / "sentinel-slo.rules.yml"
    text = slo_rules.read_text()
    assert "> 14.4\n" in text
    slo_rules.write_text(text.replace("> 14.4\n", "> 144\n"))
    with pytest.raises(CheckFailed) as info:   # ... and fails once the page waits too long
        run_promtool_tests(tmp_path / "rules")
    assert "FAILED" in str(info.value)


def test_low_objectives_generate_rules_that_page_and_pass_their_tests(tmp_path):
    # objective 0.9: 14.4x its budget is an error ratio of 1.44 (generation crashed on an infinite
    # detection time); 0.93 accuracy: an estimate of 1 - 0.07 = 0.9299999999999999 read as below 0.93
    (tmp_path / "slo.yaml").write_text(
        "period: 1d\nslos:\n"
        "  - {name: availability, model: digits, objective: 0.9, sli: availability}\n"
        "  - {name: accuracy, model: digits, objective: 0.93, sli: estimated_accuracy}\n")
    result = write_rules(load_slo_file(tmp_path / "slo.yaml"), tmp_path / "rules", None)
    text = (tmp_path / "rules" / "sentinel-slo.rules.yml").read_text()
    assert "/ 0.1 > 5.5\n" in text and "> 14.4" not in text.split("digits:availability:alerts")[1].split("accuracy")[0]
    assert "SUCCESS" in run_promtool_tests(tmp_path / "rules")
    assert result is not None


def test_the_nginx_engine_alerts_fire_on_a_pause_and_on_lost_lines(tmp_path):
    """SentinelCapturesPaused after 10 minutes of a pause (not before, not for the other reason),
    SentinelAccessLogLinesLost while lines were lost in the last 10 minutes, each with its annotations."""
    import yaml

    rules = yaml.safe_load((REPO / "rules" / "sentinel-ops.rules.yml").read_text())
    ann = {r["alert"]: r["annotations"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    shutil.copy(REPO / "rules" / "sentinel-ops.rules.yml", tmp_path)

    def expected(alert: str, summary: str, **labels: str) -> dict:
        return {"exp_labels": {**labels, "severity": "ticket"},
                "exp_annotations": {**ann[alert], "summary": summary}}
    paused = expected("SentinelCapturesPaused", "a: nginx captures nothing for sampling (disk)", instance="a",
                      reason="disk")
    lost = expected("SentinelAccessLogLinesLost", "a: access-log lines lost (requests not counted)", instance="a")
    test = {"rule_files": ["../sentinel-ops.rules.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'sentinel_captures_paused{instance="a",job="sentinel",reason="disk"}', "values": "0 0 1x40"},
            {"series": 'sentinel_captures_paused{instance="a",job="sentinel",reason="stalled"}', "values": "0x42"},
            {"series": 'sentinel_access_log_lost_total{instance="a",job="sentinel"}', "values": "0x5 7x37"}],
        "alert_rule_test": [
            {"eval_time": "9m", "alertname": "SentinelCapturesPaused", "exp_alerts": []},
            {"eval_time": "13m", "alertname": "SentinelCapturesPaused", "exp_alerts": [paused]},
            {"eval_time": "4m", "alertname": "SentinelAccessLogLinesLost", "exp_alerts": []},
            {"eval_time": "8m", "alertname": "SentinelAccessLogLinesLost", "exp_alerts": [lost]},
            {"eval_time": "30m", "alertname": "SentinelAccessLogLinesLost", "exp_alerts": []}]}]}
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "nginx.test.yml").write_text(yaml.safe_dump(test))
    assert "SUCCESS" in run_promtool_tests(tmp_path)
    # and the checks bite: a pause that pages at once would fire at 9m
    (tmp_path / "sentinel-ops.rules.yml").write_text(
        (tmp_path / "sentinel-ops.rules.yml").read_text().replace("for: 10m\n", "for: 1m\n"))
    with pytest.raises(CheckFailed):
        run_promtool_tests(tmp_path)

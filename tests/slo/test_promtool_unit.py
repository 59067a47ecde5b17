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
